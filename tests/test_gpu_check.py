"""The prepared GPU check (benchmark/gpu_check.sh, issue 14) can only run on a lent GPU machine, for a few minutes, on
a bare image: these static checks keep it from rotting between GPU sessions. Its time limits fit its 8 minutes, it
measures every script, tests/test_cuda.py compares every script, and every package that the check's code imports is
either on the GPU image or shipped by benchmark/gpu_wheels.sh, at a version that pyproject.toml allows.
(`GPU_CHECK_DRY=1 bash benchmark/gpu_check.sh /tmp/dry` runs the whole check on a CPU, in about 2 minutes.)"""
import ast
import re
import sys
from importlib.metadata import packages_distributions, requires

import pytest
from harness import ROOT
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
BUDGET_S = 8 * 60
OVERHEAD_S = 15  # beyond the limited steps: installing the wheels, machine.txt, summary.md, the tarball
# What the GPU machines' image holds, of what the check needs (/work/.library/device/KINDS.md, image 'cuda', as read
# on 2026-11-17: PyTorch, numpy, OpenCV, TensorBoard, rich, pytest, pytest-xdist and the packages below).
DEVICE_IMAGE = {"torch", "numpy", "opencv-python-headless", "tensorboard", "rich", "pytest", "pytest-xdist",
                "cloudpickle", "typing-extensions"}
# Imported by code that the check never runs: wandb (--track), moviepy (--capture-video), rliable, matplotlib, pandas
# (benchmark.sh report).
NOT_ON_THE_CHECK_PATH = {"wandb", "moviepy", "rliable", "matplotlib", "pandas"}
# The code that the check runs: the scripts, benchmark.sh perf (the bench package; report.py is imported by its CLI
# but needs rliable only inside `report`), and the CUDA tests with their harness.
CHECK_CODE = [*sorted((ROOT / "cleanrl_moe").glob("*.py")), *sorted((ROOT / "benchmark" / "bench").glob("*.py")),
              ROOT / "tests" / "test_cuda.py", ROOT / "tests" / "harness.py", ROOT / "tests" / "conftest.py"]
LOCAL_MODULES = {"bench", "harness", "official_config"}


def wheels():
    """{canonical distribution name: pinned version} that gpu_wheels.sh downloads."""
    pins = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][A-Za-z0-9.]*)", WHEELS_SCRIPT)
    assert pins, "gpu_wheels.sh pins no package"
    return {canonicalize_name(name): Version(version) for name, version in pins}


def limited_seconds(script):
    """The worst case of a bash script's `timeout N` steps; a step inside `for x in a b c; do` counts once per item."""
    total, loop_items = 0, 1
    for line in script.splitlines():
        code = line.split("#", 1)[0]
        loop = re.match(r"\s*for \w+ in (.*); do", code)
        if loop:
            loop_items = len(loop.group(1).split())
        elif re.match(r"\s*done\b", code):
            loop_items = 1
        total += sum(int(seconds) * loop_items for seconds in re.findall(r"\btimeout (\d+)", code))
    return total


def test_the_gpu_check_fits_in_eight_minutes():
    total = limited_seconds(CHECK)
    assert total > 0
    assert total + OVERHEAD_S <= BUDGET_S, f"the check's time limits add up to {total} s, over {BUDGET_S - OVERHEAD_S} s"


def test_the_time_limit_count_sees_every_limit():
    # the count itself: a step in the loop weighs once per script, one outside it once
    script = "timeout 90 a\nfor s in x y z; do\n    timeout 10 b  # timeout 99 in a comment\ndone\ntimeout 5 c\n"
    assert limited_seconds(script) == 90 + 3 * 10 + 5


def test_the_gpu_check_measures_every_script_with_a_budget_of_its_own():
    loops = re.findall(r"for script in (.*); do", CHECK)
    assert loops and all(sorted(loop.split()) == SCRIPT_NAMES for loop in loops)
    cases = re.search(r"case \$1 in(.*?)esac", CHECK, re.S).group(1)
    budgeted = {name for pattern in re.findall(r"^\s*([\w|]+)\)", cases, re.M) for name in pattern.split("|")}
    assert budgeted == set(SCRIPT_NAMES)


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
