"""Each script reads in four parts, each under a banner: the method as the paper states it, with no research knob in
it; the research knobs, which enter the method through one start-up call and can be cut away in one piece; the run
plumbing; a short, CleanRL-shaped main block. Its first line points at its real doc."""
import ast
import json
import os
import re
import subprocess
import sys

import pytest
from harness import ROOT, SCRIPTS, python_command

sys.path.insert(0, str(ROOT / "tools"))
import equivalence  # noqa: E402

PARTS = ("# The method:", "# Research knobs", "# Run plumbing:", "# Main:")
# the research-knob flags of each script: no line of the method reads one
MOE_KNOBS = {"use_random_phi", "num_selected_experts", "noisy_routing", "noise_std", "aux_loss_fns", "entropy_weight",
             "importance_weight", "load_weight", "std_scale", "use_extra_linear_layer", "sem_tau", "shuffle_tokens",
             "expert_reset", "expert_reset_period", "shrink_factor", "expert_type"}
RAINBOW_KNOBS = MOE_KNOBS | {"baseline_aggregation", "redo", "redo_period", "redo_tau", "redo_batch_size"}
KNOBS = {"dqn_softmoe": MOE_KNOBS, "rainbow_tokenized": RAINBOW_KNOBS, "der_single_expert": RAINBOW_KNOBS,
         "dqn_redo": {"redo_reset_adam_step"}}
METHOD = ("Args", "make_env", "ReplayMemory", "make_replay", "make_optimizer", "update", "train_step")
PLUMBING = ("get_env_state", "fail", "place_replay", "Checkpoint", "parse_args", "Progress", "Run", "CudaGraph",
            "check_args", "evaluate")
MAIN_LINES = 120


def scripts():
    return sorted(SCRIPTS.glob("*.py"))


def banners(path):
    """The line (1-based) of each part's banner: a top-level comment line that opens with the part's name, right after
    a line of '='."""
    lines = path.read_text().split("\n")
    found = {}
    for part in PARTS:
        hits = [i + 1 for i, line in enumerate(lines) if line.startswith(part) and lines[i - 1].startswith("# ====")]
        assert len(hits) == 1, f"{path.name}: one '{part}' banner expected, found {len(hits)}"
        found[part] = hits[0]
    assert list(found.values()) == sorted(found.values()), f"{path.name}: the parts are out of order: {found}"
    return found


def definitions(path):
    """{name: line} of the top-level functions and classes."""
    tree = ast.parse(path.read_text())
    return {node.name: node.lineno for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_four_parts_in_order(path):
    parts = banners(path)
    defs = definitions(path)
    for name in METHOD:
        assert defs[name] < parts["# Research knobs"], f"{path.name}: {name} belongs to the method"
    assert parts["# Research knobs"] < defs["research_knobs"] < parts["# Run plumbing:"]
    for name in PLUMBING:
        assert parts["# Run plumbing:"] < defs[name] < parts["# Main:"], f"{path.name}: {name} belongs to the plumbing"
    method = [line for line in defs.values() if line < parts["# Research knobs"]]
    assert max(method) in (defs["train_step"], defs.get("evaluation_settings")), "train_step closes the method"
    lines = path.read_text().split("\n")
    main = next(i + 1 for i, line in enumerate(lines) if line.startswith('if __name__ == "__main__":'))
    assert main > parts["# Main:"] > max(defs.values()), f"{path.name}: the main block comes last"


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_the_method_reads_no_research_knob(path):
    knobs_banner = banners(path)["# Research knobs"]
    tree = ast.parse(path.read_text())
    reads = sorted({(node.lineno, node.attr) for node in ast.walk(tree)
                    if isinstance(node, ast.Attribute) and node.attr in KNOBS[path.stem] and node.lineno < knobs_banner})
    assert not reads, f"{path.name}: knob flags read in the method (line, flag): {reads}"


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_main_block_is_short(path):
    tree = ast.parse(path.read_text())
    (main,) = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    length = main.end_lineno - main.lineno + 1
    assert length <= MAIN_LINES, f"{path.name}: the main block has {length} lines, at most {MAIN_LINES}"


def cut_knobs(text):
    """The script without its research-knob part (from its banner to the next banner), its one start-up call
    replaced by the statement its comment names."""
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("# Research knobs")) - 1  # the '=' line above
    end = next(i for i, line in enumerate(lines) if line.startswith("# Run plumbing:")) - 1
    calls = [i for i, line in enumerate(lines) if "# without the knobs: " in line]
    assert len(calls) == 1, f"one start-up call with a '# without the knobs: ' comment expected, found {len(calls)}"
    call = lines[calls[0]]
    indent = call[:len(call) - len(call.lstrip())]
    lines[calls[0]] = indent + call.split("# without the knobs: ", 1)[1].strip()
    return "\n".join(lines[:start] + lines[end:])


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_without_the_knobs_the_script_trains_its_defaults_to_the_same_numbers(path, tmp_path):
    """Cut part 2 and replace the start-up call: the script still runs its defaults on the real ALE and learns exactly
    what the whole script (as recorded in tests/fixtures/equivalence.json) learns."""
    cut = tmp_path / "scripts"
    cut.mkdir()
    (cut / path.name).write_text(cut_knobs(path.read_text()))
    tree = ast.parse((cut / path.name).read_text())
    knob_functions = {"research_knobs", "check_moe_args", "make_knob_network", "moe_aux_losses"}
    assert not knob_functions & {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'tools')!r}); import equivalence, json; "
            f"print(json.dumps(equivalence.compact(equivalence.run_config({path.stem!r}, "
            f"equivalence.flags_of({path.stem!r}, 'defaults')))))")
    env = dict(os.environ, CLEANRL_MOE_SCRIPTS=str(cut), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    (tmp_path / "run.py").write_text(code)
    proc = subprocess.run(python_command(tmp_path / "run.py"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().split("\n")[-1])
    assert got == equivalence.expected(path.stem, "defaults"), "the cut script learns other numbers"


@pytest.mark.parametrize("path", scripts(), ids=lambda p: p.name)
def test_first_line_points_at_the_scripts_doc(path):
    first = path.read_text().split("\n")[0]
    match = re.fullmatch(r"# docs and experiment results: (\S+)", first)
    assert match, first
    assert match.group(1) == f"docs/{path.stem}.md" and (ROOT / match.group(1)).is_file()
