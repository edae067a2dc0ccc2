"""Small shared test harness: load a script as a module, run it as a user would, read its TensorBoard events."""
import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tools/check_mutants.py points this at mutated copies of the scripts
SCRIPTS = Path(os.environ.get("CLEANRL_MOE_SCRIPTS", ROOT / "cleanrl_moe"))


@functools.cache
def load_script(name):
    """Import cleanrl_moe/<name>.py without running its main block."""
    spec = importlib.util.spec_from_file_location(f"cleanrl_moe_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_command(name, *flags):
    return [sys.executable, str(SCRIPTS / f"{name}.py"), *map(str, flags)]


def test_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WANDB_API_KEY", None)
    return env


def run_script(name, *flags, cwd, timeout=600, check=True):
    """Run a script in a subprocess (CPU, one thread) and return the CompletedProcess."""
    proc = subprocess.run(script_command(name, *flags), cwd=cwd, env=test_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, flags))} exited with {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_script(name, *flags, cwd):
    return subprocess.Popen(script_command(name, *flags), cwd=cwd, env=test_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_dirs(cwd):
    return sorted(p for p in (Path(cwd) / "runs").iterdir() if p.is_dir())


def only_run_dir(cwd):
    dirs = run_dirs(cwd)
    assert len(dirs) == 1, dirs
    return dirs[0]


def scalars(run_dir):
    """{tag: [(step, value), ...]} from the TensorBoard events in run_dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def result(run_dir):
    with open(Path(run_dir) / "result.json") as f:
        return json.load(f)
