"""Each script reads like the paper's method section: the method first (environment, networks, replay, loss,
train_step), then one banner and the run plumbing, then the loop; its first line points at its real doc."""
import ast
import re

import pytest
from harness import ROOT, SCRIPTS

BANNER = "# Run plumbing:"
METHOD_LAST = "train_step"  # the method ends with the training step
PLUMBING = ("get_env_state", "fail", "place_replay", "Checkpoint", "parse_args", "Progress", "CudaGraph",
            "check_args", "evaluate")


def scripts():
    return sorted(SCRIPTS.glob("*.py"))


def definitions(path):
    """{name: line} of the top-level functions and classes."""
    tree = ast.parse(path.read_text())
    return {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_method_comes_before_the_plumbing(path):
    lines = path.read_text().split("\n")
    banners = [i + 1 for i, line in enumerate(lines) if line.startswith(BANNER)]
    assert len(banners) == 1, f"{path.name}: one '{BANNER}' banner expected, found {len(banners)}"
    defs = definitions(path)
    method = {name: line for name, line in defs.items() if line < banners[0]}
    plumbing = {name: line for name, line in defs.items() if line > banners[0]}
    for name in ("make_env", "QNetwork", "ReplayMemory", "make_optimizer", "update", METHOD_LAST):
        assert name in method, f"{path.name}: {name} belongs to the method, before the banner"
    for name in PLUMBING:
        assert name in plumbing, f"{path.name}: {name} belongs to the plumbing, after the banner"
    last = max(line for name, line in method.items() if name != "evaluation_settings")  # the protocol may follow
    assert last == method[METHOD_LAST], f"{path.name}: train_step should close the training method"
    assert defs["make_env"] < defs["make_training_env"] < defs["QNetwork"] < defs["ReplayMemory"] < defs["make_replay"]
    assert defs["make_replay"] < defs["update"] < defs["train_step"]
    main = next(i for i, line in enumerate(lines) if line.startswith('if __name__ == "__main__":'))
    assert main + 1 > max(defs.values()), f"{path.name}: the loop comes last"


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_first_line_points_at_the_scripts_doc(path):
    first = path.read_text().split("\n")[0]
    match = re.fullmatch(r"# docs and experiment results: (\S+)", first)
    assert match, first
    assert match.group(1) == f"docs/{path.stem}.md" and (ROOT / match.group(1)).is_file()
