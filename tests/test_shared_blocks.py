"""The scripts stand alone: shared blocks are copied on purpose and must stay identical, and no script
imports another project file."""
import ast
import re
import sys

import pytest
from harness import SCRIPTS

BLOCK = re.compile(r"^# >>> shared block: (\S+)\n(.*?)^# <<< shared block: \1$", re.M | re.S)

# blocks of every script; the method's encoders, MoE layers and replay, and the run plumbing
COMMON = {"env", "nature", "replay", "optimizer", "envstate", "dormant", "runtime", "checkpoint", "tracking", "progress",
          "run", "cudagraph"}
MOE = {"impala", "tokenizer", "softmoe", "topkmoe", "routing", "moe_losses", "moe_args", "expert_reset",
       "bigexperts"}
# the Rainbow machinery that rainbow_tokenized.py and der_single_expert.py share (their tests cover one another's copy)
RAINBOW = COMMON | MOE | {"noisy", "noisyexperts", "sumtree", "prioritized", "categorical", "rainbow_update", "redo",
                          "rainbow_network", "rainbow_knobs", "rainbow_knob_hooks", "rainbow_run"}
DQN = COMMON | {"epsilon_greedy", "dqn_update", "dqn_evaluate", "dqn_run"}
# the blocks each script must carry
EXPECTED = {
    "dqn_softmoe": DQN | MOE,
    "dqn_redo": DQN | {"redo"},  # the recycling, shared with the Rainbow scripts
    "rainbow_tokenized": RAINBOW,
    "der_single_expert": RAINBOW,
}
ALLOWED_IMPORTS = {"torch", "numpy", "gymnasium", "ale_py", "tyro", "wandb", "moviepy"} | set(sys.stdlib_module_names)


def scripts():
    return sorted(SCRIPTS.glob("*.py"))


def blocks(path):
    text = path.read_text()
    found = BLOCK.findall(text)
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), f"{path.name} repeats a shared block"
    assert text.count(">>> shared block:") == text.count("<<< shared block:") == len(found), \
        f"unbalanced markers in {path.name}"
    return dict(found)


def test_every_script_carries_its_shared_blocks():
    present = {p.stem: blocks(p) for p in scripts()}
    assert "dqn_softmoe" in present
    for name, expected in EXPECTED.items():
        if name in present:
            assert set(present[name]) == expected, f"{name}: {sorted(set(present[name]) ^ expected)}"


def test_shared_blocks_are_identical_across_scripts():
    present = {p.stem: blocks(p) for p in scripts()}
    reference = {}
    for script, found in sorted(present.items()):
        for block, text in found.items():
            if block in reference:
                first_script, first_text = reference[block]
                assert text == first_text, (f"shared block '{block}' of {script}.py drifted from {first_script}.py; "
                                            "copy the block again so that both are identical")
            else:
                reference[block] = (script, text)


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_scripts_import_no_project_file(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name} uses a relative import"
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        else:
            continue
        for module in modules:
            assert module.split(".")[0] in ALLOWED_IMPORTS, f"{path.name} imports {module}"
