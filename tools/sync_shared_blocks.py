"""Copy the shared blocks of one script into every other script that carries them.

    python tools/sync_shared_blocks.py dqn_softmoe            # every block of cleanrl_moe/dqn_softmoe.py
    python tools/sync_shared_blocks.py dqn_softmoe replay     # only its `replay` block

Blocks are the text between `# >>> shared block: NAME` and `# <<< shared block: NAME`; tests/test_shared_blocks.py
fails while two copies differ. Edit one copy, run this, and review the diff."""
import re
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "cleanrl_moe"
BLOCK = re.compile(r"^# >>> shared block: (\S+)\n(.*?)^# <<< shared block: \1$", re.M | re.S)


def main(source, *names):
    blocks = dict(BLOCK.findall((SCRIPTS / f"{source}.py").read_text()))
    unknown = set(names) - set(blocks)
    if unknown:
        sys.exit(f"{source}.py has no shared block named {', '.join(sorted(unknown))}")
    chosen = {name: blocks[name] for name in (names or blocks)}
    for path in sorted(SCRIPTS.glob("*.py")):
        if path.stem == source:
            continue
        text = path.read_text()
        new = BLOCK.sub(lambda m: m.group(0) if m.group(1) not in chosen else
                        f"# >>> shared block: {m.group(1)}\n{chosen[m.group(1)]}# <<< shared block: {m.group(1)}", text)
        if new != text:
            path.write_text(new)
            print(f"updated {path.name}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
