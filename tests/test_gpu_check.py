"""The prepared GPU check (benchmark/gpu_check.sh, issue 14) can only run on a lent GPU machine, for a few minutes, on
a bare image: these static checks keep it from rotting between GPU sessions. Its time limits (`timeout -k`, every
step) fit its 6.5 minutes (5 without step 5, perf --official), it records the commit where .git does not travel, each step's results reach OUT as the step
ends, OUT holds at most 8 files, it measures and runs every script (with flags that each script accepts),
tests/test_cuda.py compares every script, and every package that the check's code imports is either on the GPU image
or shipped by benchmark/gpu_wheels.sh, at a version that pyproject.toml allows.
(`GPU_CHECK_DRY=1 bash benchmark/gpu_check.sh /tmp/dry` runs the whole check on a CPU, tiny, its limits x5.)"""
import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions, requires

import pytest
from harness import ROOT, check_flags, load_script, parse
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CHECK = (ROOT / "benchmark" / "gpu_check.sh").read_text()
WHEELS_SCRIPT = (ROOT / "benchmark" / "gpu_wheels.sh").read_text()
SCRIPT_NAMES = sorted(path.stem for path in (ROOT / "cleanrl_moe").glob("*.py"))
sys.path.insert(0, str(ROOT / "benchmark"))
import gpu_real_runs  # noqa: E402

BUDGET_S = 6.5 * 60  # a 15-minute device lease (about 1.5 minutes of start) leaves room for a rerun
BUDGET_WITHOUT_OFFICIAL_S = 5 * 60  # GPU_CHECK_OFFICIAL=0: the check without step 5
OVERHEAD_S = 10  # beyond the limited steps: mktemp, summary.md and the tarball after each step (13 times)
# What the GPU machines' image holds, of what the check needs (/work/.library/device/KINDS.md, image 'cuda', as read
# on 2026-11-17: PyTorch, numpy, OpenCV, TensorBoard, rich, pytest, pytest-xdist and the packages below).
DEVICE_IMAGE = {"torch", "numpy", "opencv-python-headless", "tensorboard", "rich", "pytest", "pytest-xdist",
                "cloudpickle", "typing-extensions", "jax", "jaxlib", "flax", "optax", "chex", "absl-py", "ml-dtypes",
                "opt-einsum", "msgpack", "pyyaml", "tensorstore", "orbax-checkpoint", "treescope", "etils", "toolz",
                "packaging"}
# Installed without its dependencies (they include TensorFlow, which tests/official/conftest.py stands in for), as the
# README's test command installs it; what its compared modules import is on the image or a wheel (tests/official).
NO_DEPS_WHEELS = {"dopamine-rl"}
# Imported by code that the check never runs: wandb (--track), moviepy (--capture-video), rliable, matplotlib, pandas
# (benchmark.sh report).
NOT_ON_THE_CHECK_PATH = {"wandb", "moviepy", "rliable", "matplotlib", "pandas"}
# The code that the check runs: the scripts, benchmark.sh perf (the bench package; report.py is imported by its CLI
# but needs rliable only inside `report`), and the CUDA tests with their harness.
# and step 5, `perf --official` (bench/official.py), with the tests/official modules that it imports
CHECK_CODE = [*sorted((ROOT / "cleanrl_moe").glob("*.py")), *sorted((ROOT / "benchmark" / "bench").glob("*.py")),
              ROOT / "benchmark" / "gpu_real_runs.py", ROOT / "tests" / "test_cuda.py", ROOT / "tests" / "harness.py",
              ROOT / "tests" / "conftest.py", ROOT / "tests" / "official" / "conftest.py",
              ROOT / "tests" / "official" / "official_mapping.py",
              ROOT / "tests" / "official" / "test_official_dqn_softmoe.py",
              ROOT / "tests" / "official" / "test_official_rainbow_der.py"]
LOCAL_MODULES = {"bench", "harness", "official_config", "official_mapping"}
# `timeout -k K N` or `timeout -k K $((N * X))` (X: 1 on the GPU, 5 on the dry run); the worst case is N + K seconds
TIMEOUT = re.compile(r"\btimeout (?:-k (\d+) )?(?:\$\(\()?(\d+)\b")


def wheels():
    """{canonical distribution name: pinned version} that gpu_wheels.sh downloads."""
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", WHEELS_SCRIPT)
    assert pins, "gpu_wheels.sh pins no package"
    return {canonicalize_name(name): Version(version) for name, version in pins}


def code_lines(script):
    return [line.split("#", 1)[0] for line in script.splitlines()]


def limited_seconds(script):
    """The worst case of a bash script's `timeout -k K N` (or `timeout N`) steps, N + K seconds each; a step inside
    `for x in a b c; do` counts once per item."""
    total, loop_items = 0, 1
    for code in code_lines(script):
        loop = re.match(r"\s*for \w+ in (.*); do", code)
        if loop:
            loop_items = len(loop.group(1).split())
        elif re.match(r"\s*done\b", code):
            loop_items = 1
        total += sum((int(seconds) + int(grace or 0)) * loop_items for grace, seconds in TIMEOUT.findall(code))
    return total


def test_the_gpu_check_fits_in_its_minutes():
    total = limited_seconds(CHECK)
    assert total > 0
    assert total + OVERHEAD_S <= BUDGET_S, f"the check's time limits add up to {total} s, over {BUDGET_S - OVERHEAD_S} s"
    step5 = CHECK.split("# 5. the update next to the official one", 1)[1]
    assert 'if [ "${GPU_CHECK_OFFICIAL:-1}" = 1 ]; then' in step5 and limited_seconds(step5) > 0
    without = total - limited_seconds(step5)
    assert without + OVERHEAD_S <= BUDGET_WITHOUT_OFFICIAL_S, f"without step 5: {without} s"


def test_the_gpu_check_runs_perf_official_on_what_it_builds():
    # step 5 runs every configuration (the dry run one), and its table reaches summary.md
    step5 = CHECK.split("# 5. the update next to the official one", 1)[1]
    assert "./benchmark.sh perf --official" in step5 and "--official-configs" in step5.split("DRY", 1)[1]
    assert 'cat "$WORK/perf_official/perf-official.md"' in CHECK
    assert re.search(r'import gymnasium, ale_py, tyro, gin, dopamine"', CHECK), "the wheels' install must see them"


def test_the_time_limit_count_sees_every_limit():
    # the count itself: a step in the loop weighs once per script, one outside it once
    script = ("timeout 90 a\nfor s in x y z; do\n    timeout -k 2 10 b  # timeout 99 in a comment\ndone\n"
              "timeout -k 5 $((7 * X)) c | tee d\n")
    assert limited_seconds(script) == 90 + 3 * (10 + 2) + 7 + 5


def test_every_step_has_a_kill_grace_and_a_literal_limit():
    # `timeout N` alone leaves a process that ignores SIGTERM running; a limit that is not a number escapes the sum
    for code in code_lines(CHECK):
        for call in re.findall(r"\btimeout\b.*", code):
            assert TIMEOUT.match(call) and call.startswith("timeout -k "), call


def test_each_step_reaches_out_when_it_ends():
    # a step that times out must not take the others' results with it: `ran` (steps.md, summary.md, the tarball)
    # follows every limited step of the check proper, before the next one starts
    lines = [code.strip() for code in code_lines(CHECK.split("# 1. graphed against eager", 1)[1]) if code.strip()]
    steps = [i for i, code in enumerate(lines) if code.startswith("timeout -k")]
    assert len(steps) >= 3 + 2
    for i, j in zip(steps, steps[1:] + [len(lines)]):
        assert any(code.startswith("ran ") for code in lines[i + 1:j]), lines[i]
    assert re.search(r"^ran\(\) \{.*?^    summarize$", CHECK, re.S | re.M)


def test_out_holds_at_most_eight_files():
    # a device run brings back at most 8 files
    names = set(re.findall(r'"\$OUT/([\w.]+)"', CHECK)) - {"summary.md.tmp"}
    assert "summary.md" in names and len(names) <= 8, sorted(names)


def test_the_check_records_its_commit_where_git_does_not_travel():
    assert "git log -1" in CHECK and "cat GPU_CHECK_COMMIT" in CHECK and "--prepare" in CHECK
    assert re.search(r'^\{ date -u; commit;.*?> "\$OUT/machine.txt"', CHECK, re.S | re.M)  # into machine.txt
    # GPU_CHECK_COMMIT must travel with the working tree: git must not ignore it
    ignored = subprocess.run(["git", "check-ignore", "-q", "GPU_CHECK_COMMIT"], cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 1, ".gitignore ignores GPU_CHECK_COMMIT: it would not reach the GPU machine"


def test_the_gpu_check_measures_every_script_with_a_budget_of_its_own():
    loops = re.findall(r"for script in (.*); do", CHECK)
    assert loops and all(sorted(loop.split()) == SCRIPT_NAMES for loop in loops)
    cases = re.search(r"^budget\(\) \{.*?case \$1 in(.*?)esac", CHECK, re.S | re.M).group(1)
    budgeted = {name for pattern in re.findall(r"^\s*([\w|]+)\)", cases, re.M) for name in pattern.split("|")}
    assert budgeted == set(SCRIPT_NAMES)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_the_real_runs_cover_every_script_with_flags_it_accepts(name):
    assert sorted(gpu_real_runs.SCRIPTS) == SCRIPT_NAMES
    m = load_script(name)
    for graphs in (True, False):
        args, _ = parse(m, gpu_real_runs.flags(name, gpu_real_runs.STEPS, graphs))
        check_flags(m, args)
        assert args.cuda_graphs == graphs and args.checkpoint_every and args.eval_episodes == 1
        assert args.stats_frequency < args.total_timesteps - args.learning_starts
        assert args.save_model or name == "der_single_expert"  # the others evaluate a saved model
    assert name != "dqn_redo" or args.replay_ratio == 1


def test_the_cuda_tests_compare_every_script():
    import test_cuda

    assert sorted(test_cuda.SCRIPTS) == SCRIPT_NAMES


def third_party_imports(path):
    """Top-level names of the modules that a file imports anywhere (also inside functions), stdlib and ours left out;
    not the fallbacks in `except` clauses (tomli for Python 3.10: the image runs 3.12)."""
    names, nodes = set(), [ast.parse(path.read_text())]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
        children = [child for child in ast.iter_child_nodes(node) if not isinstance(child, ast.ExceptHandler)]
        nodes.extend(children)
    return {name for name in names if name not in sys.stdlib_module_names and name not in LOCAL_MODULES}


@pytest.mark.parametrize("path", CHECK_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_what_the_check_imports_is_on_the_image_or_in_the_wheels(path):
    shipped = DEVICE_IMAGE | set(wheels()) | NOT_ON_THE_CHECK_PATH
    distributions = packages_distributions()
    for module in third_party_imports(path):
        names = {canonicalize_name(name) for name in distributions.get(module, [module])}
        assert names & shipped, (f"{path.name} imports {module} ({', '.join(sorted(names))}), which the GPU image "
                                 "lacks: add it to benchmark/gpu_wheels.sh")


@pytest.mark.parametrize("name", sorted(wheels()))
def test_each_wheel_brings_what_it_needs(name):
    # gpu_wheels.sh downloads with --no-deps: every requirement that applies on the image's Python 3.12 must be
    # another wheel or on the image
    environment = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
                   "sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    shipped = DEVICE_IMAGE | set(wheels())
    if name in NO_DEPS_WHEELS:
        return
    for line in requires(name) or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            assert canonicalize_name(requirement.name) in shipped, f"{name} needs {requirement}: add it to gpu_wheels.sh"


def test_the_wheels_are_versions_that_the_project_allows():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    allowed = {canonicalize_name(req.name): req.specifier for req in map(Requirement, dependencies)}
    pins = wheels()
    for name in ("gymnasium", "ale-py", "tyro"):  # what the image lacks, of the project's own dependencies
        assert name in pins, f"gpu_wheels.sh must ship {name}"
        assert pins[name] in allowed[name], f"gpu_wheels.sh pins {name}=={pins[name]}, outside pyproject's {allowed[name]}"
    tested = re.search(r'^DOPAMINE_VERSION = "(.+?)"', (ROOT / "tests" / "official" / "conftest.py").read_text(), re.M)
    assert pins["dopamine-rl"] == Version(tested.group(1)), "gpu_wheels.sh must ship the dopamine-rl that tests use"
