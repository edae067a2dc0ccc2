"""Plant known bugs in copies of the scripts and check that the tests catch every one.

    python tools/check_mutants.py            # all mutants
    python tools/check_mutants.py redo       # those whose description or script contains "redo"

Mutants live in tools/mutants/<script>.py. Each replaces one exact snippet (which must occur once) and names the tests that must then fail.
A mutant that survives means a test cannot fail for the bug it was written to guard."""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_mutants():
    """Every tools/mutants/<script>.py defines MUTANTS for its script."""
    mutants = []
    for path in sorted((ROOT / "tools" / "mutants").glob("*.py")):
        namespace = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        mutants += namespace["MUTANTS"]
    return mutants


def main(pattern=""):
    selected = [mu for mu in load_mutants() if pattern in mu[0] or pattern in mu[1]]
    survivors = []
    for script, description, old, new, tests in selected:
        with tempfile.TemporaryDirectory() as tmp:
            for path in (ROOT / "cleanrl_moe").glob("*.py"):
                shutil.copy(path, tmp)
            target = Path(tmp) / f"{script}.py"
            text = target.read_text()
            assert text.count(old) == 1, f"{script}: snippet for '{description}' occurs {text.count(old)} times"
            target.write_text(text.replace(old, new))
            env = dict(os.environ, CLEANRL_MOE_SCRIPTS=tmp)
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", *tests],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
        # 1: a test failed; 2: collection stopped (the mutant breaks the import). 4 and 5 (a test id that does not
        # exist, no tests collected) would count a mutant as caught that no test ran against: an error instead
        if proc.returncode in (4, 5):
            raise SystemExit(f"{script}: {description}: pytest exit code {proc.returncode}, tests {tests} not found\n"
                             f"{proc.stdout[-2000:]}")
        caught = proc.returncode in (1, 2)
        print(f"{'caught  ' if caught else 'SURVIVED'} {script}: {description}", flush=True)
        if not caught:
            survivors.append(description)
    print(f"{len(selected) - len(survivors)}/{len(selected)} mutants caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
