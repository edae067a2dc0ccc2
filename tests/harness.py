"""Small shared test harness: load a script as a module, run it as a user would, read its TensorBoard events."""
import atexit
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tools/check_mutants.py points this at mutated copies of the scripts
SCRIPTS = Path(os.environ.get("CLEANRL_MOE_SCRIPTS", ROOT / "cleanrl_moe"))
ZYGOTE = Path(__file__).with_name("zygote.py")


@functools.cache
def load_script(name):
    """Import cleanrl_moe/<name>.py without running its main block."""
    spec = importlib.util.spec_from_file_location(f"cleanrl_moe_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_network(m, args, num_actions):
    """The network a script builds for `args` (its research knobs included), as its main block does."""
    if hasattr(m, "research_knobs"):
        return m.research_knobs(args).make_network(num_actions)
    return m.QNetwork(args, num_actions)


def parse(m, argv):
    """A script's flags and checkpoint from `argv`, as its main block reads them."""
    if "replay_fields" in m.parse_args.__code__.co_varnames:
        return m.parse_args(m.Args, m.RESUMABLE_FIELDS, m.segment_fields(m.ReplayMemory(1)), argv)
    return m.parse_args(m.Args, m.RESUMABLE_FIELDS, argv)


def check_flags(m, args):
    """Every start-up check of a script's flags, as its main block makes them: check_args, then the research knobs'."""
    m.check_args(args)
    if hasattr(m, "research_knobs"):
        m.research_knobs(args)


@functools.cache
def fork_server():
    """The address of this test process's fork server (tests/zygote.py: a script run then starts without importing
    torch again), started on first use; None where it is turned off (CLEANRL_MOE_TEST_FORK=0) or cannot start."""
    if os.environ.get("CLEANRL_MOE_TEST_FORK", "1") == "0" or not hasattr(socket, "send_fds"):
        return None
    address = os.path.join(tempfile.mkdtemp(prefix="zygote-"), "socket")
    server = subprocess.Popen([sys.executable, "-u", str(ZYGOTE), "serve", address], env=test_env(),
                              stdout=subprocess.PIPE, text=True)
    atexit.register(server.kill)
    return address if server.stdout.readline().strip() == "ready" else None


def python_command(path, *args):
    """The command line that runs `python path args` (through the fork server when it runs)."""
    command = [str(path), *map(str, args)]
    address = fork_server()
    return [sys.executable, *command] if address is None else [sys.executable, "-S", str(ZYGOTE), "run", address, *command]


def script_command(name, *flags):
    return python_command(SCRIPTS / f"{name}.py", *flags)


def test_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WANDB_API_KEY", None)
    return env


def run_script(name, *flags, cwd, timeout=600, check=True):
    """Run a script in a subprocess (CPU, one thread) in `cwd` (created if need be); return the CompletedProcess."""
    Path(cwd).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(script_command(name, *flags), cwd=cwd, env=test_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} {' '.join(map(str, flags))} exited with {proc.returncode}:\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_script(name, *flags, cwd):
    Path(cwd).mkdir(parents=True, exist_ok=True)
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


def read_checkpoint(run_dir):
    """A run's checkpoint (runs/<run>/checkpoint/) as one dict: its state.pt, where "replay" also holds the memory's
    per-slot data (slot-indexed tensors of the stored slots, merged from the segment files, later ones winning)."""
    import numpy as np
    import torch

    folder = Path(run_dir) / "checkpoint"
    state = torch.load(folder / "state.pt", weights_only=True)
    replay = state["replay"]
    if replay is None:
        return state
    capacity = state["args"]["buffer_size"]
    slots = {}
    for first, end in replay["segments"]:
        with np.load(folder / f"replay-{first:012d}-{end:012d}.npz", allow_pickle=False) as f:
            for key in f.files:
                data = f[key]
                if key not in slots:
                    slots[key] = np.zeros((capacity, *data.shape[1:]), data.dtype)
                slots[key][np.arange(first, end) % capacity] = data
    stored = min(replay["cursor"], capacity)
    state["replay"] = {**replay, **{key: torch.from_numpy(value[:stored]) for key, value in slots.items()}}
    return state


def wait_for_checkpoint(cwd, proc, min_step=0, timeout=180):
    """The run directory under cwd once its checkpoint reaches step `min_step` (the run must still be going)."""
    import time

    import torch

    start = time.time()
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, "no checkpoint in time"
        states = list(Path(cwd).glob("runs/*/checkpoint/state.pt"))
        if states and torch.load(states[0], weights_only=True)["global_step"] >= min_step:
            return states[0].parents[1]
        time.sleep(0.05)


def fake_checkpoint(folder, script, args, global_step=0, **state):
    """A minimal checkpoint folder of `script` with flags `args` (for the tests of --resume's checks)."""
    import torch

    module = load_script(script)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"format": module.CHECKPOINT_FORMAT, "script": f"{script}.py", "args": vars(args),
                "global_step": global_step, "replay": {"cursor": 0, "episode_step": 0, "segments": []}, **state},
               folder / "state.pt")
    return folder


def wandb_records(path):
    """The protobuf Records of an offline wandb run file (run-<id>.wandb: a LevelDB-style log of 32 KiB blocks after
    a 7-byte header), parsed here since recent wandb releases ship no Python reader."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = Path(path).read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        length, kind = int.from_bytes(data[position + 4:position + 6], "little"), data[position + 6]
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        if kind == 0:  # zero padding up to the end of the block
            position += left - 7 - length
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_wandb_runs(cwd):
    """{offline run folder: (run id, set of logged history keys, logged media file names)} under cwd/wandb."""
    runs = {}
    for folder in sorted(Path(cwd).glob("wandb/offline-run-*")):
        run_id, keys = None, set()
        for record in wandb_records(next(folder.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        media = {p.name for p in folder.glob("files/media/**/*") if p.is_file()}
        runs[folder] = (run_id, keys, media)
    return runs


def assert_same_scalars(run_a, run_b, ignore=("charts/SPS",)):
    """Two runs logged the same scalars at the same steps, bit for bit (wall-clock speed aside)."""
    a, b = scalars(run_a), scalars(run_b)
    assert set(a) == set(b), set(a) ^ set(b)
    for tag in sorted(set(a) - set(ignore)):
        assert a[tag] == b[tag], f"{tag}: {a[tag]} != {b[tag]}"
