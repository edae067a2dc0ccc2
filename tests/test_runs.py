"""Runs as a cluster user has them: checkpoints that grow with what is stored, signals in every phase (training and
evaluation, SIGTERM and Ctrl-C), unique run directories, resume edge cases, bad flag values, storage faults, memory
limits from cgroups, and tracking with wandb (offline) plus evaluation videos, for the four scripts."""
import builtins
import contextlib
import io
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import harness
from harness import (build_network, fake_checkpoint, parse, load_script, offline_wandb_runs, only_run_dir, read_checkpoint, result, run_dirs,
                     run_script, script_command, start_script)

NAMES = ["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"]
# each script's network shrunk for a CPU, short episodes (Breakout ends a few per 150 steps) and a tiny memory
SMALL = {
    "dqn_softmoe": ["--num-experts", 2, "--expert-hidden-units", 16, "--batch-size", 8],
    "dqn_redo": ["--redo-period", 10, "--batch-size", 8],
    "rainbow_tokenized": ["--encoder", "nature", "--num-experts", 2, "--expert-hidden-units", 16, "--batch-size", 8],
    "der_single_expert": ["--encoder", "der", "--batch-size", 8],
}
COMMON = ["--total-timesteps", 300, "--learning-starts", 100, "--buffer-size", 1000, "--max-episode-steps", 120,
          "--log-frequency", 50, "--stats-frequency", 100, "--stats-batch-size", 16]


def flags(name, *extra):
    return [*COMMON, *SMALL[name], *extra]


def wait_for_file(pattern, cwd, proc, timeout=240):
    start = time.time()
    while not list(Path(cwd).glob(pattern)):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout, f"no {pattern} in time"
        time.sleep(0.02)
    return next(Path(cwd).glob(pattern))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation stopped by Ctrl-C and resumed, with wandb (offline) and videos: every script
# ---------------------------------------------------------------------------------------------------------------------
def has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.skipif(not (has("wandb") and has("moviepy")),
                    reason='needs the track and video extras: pip install ".[track,video]"')
@pytest.mark.parametrize("name", NAMES)
def test_ctrl_c_in_evaluation_resumes_only_the_rest_with_tracking_and_videos(name, tmp_path):
    m = load_script(name)
    env = dict(harness.test_env(), WANDB_MODE="offline", WANDB_SILENT="true")
    eval_flags = ["--save-model", "--eval-episodes", 4, "--eval-epsilon", 0.5] if name != "der_single_expert" else \
        ["--save-model", "--eval-episodes", 4, "--eval-epsilon", 0.5, "--noop-max", 5]
    proc = subprocess.Popen(script_command(name, *flags(name, "--track", "--capture-video", *eval_flags)), cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    model = wait_for_file(f"runs/*/{name}.cleanrl_model", tmp_path, proc)  # saved just before the evaluation
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in out + err and "SIGINT at step 300: checkpoint saved; resume with" in out
    run_dir = model.parent
    stopped = read_checkpoint(run_dir)
    assert stopped["global_step"] == 300 and stopped["replay"] is None  # no --checkpoint-every: memory left out
    done = stopped["run"]["eval_returns"]
    assert len(done) < 4, "the evaluation was not interrupted"

    resumed = subprocess.run(script_command(name, "--resume", run_dir), cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "evaluation" in resumed.stdout
    returns = result(run_dir)["eval_returns"]
    # the reference: the same saved model evaluated without interruption, in this process
    if name == "der_single_expert":
        saved = torch.load(model, weights_only=True)
        args = m.Args(**saved["args"])
        net = build_network(m, args, m.make_env(args.env_id, 0).action_space.n)
        net.load_state_dict(saved["model"])
        expected = m.evaluate(net, args, 4, "cpu", args.seed + 1000)
        expected = [expected[i] for i in range(4)]
    else:
        args = m.Args(**torch.load(model)["args"])
        expected = m.evaluate(str(model), lambda n: build_network(m, args, n), 4, "cpu", **m.evaluation_settings(args))
    assert returns == expected
    if name == "der_single_expert":
        assert {i: returns[i] for i in done} == done  # the finished episodes were not run again
    else:
        assert returns[:len(done)] == done

    # wandb: both processes wrote to the same run; its history holds the TensorBoard scalars
    runs = offline_wandb_runs(tmp_path)
    assert len(runs) == 2 and len({run_id for run_id, _, _ in runs.values()}) == 1
    keys = set().union(*(keys for _, keys, _ in runs.values()))
    assert {"charts/episodic_return", "losses/td_loss", "losses/q_values"} <= keys, sorted(keys)
    # videos of training and of evaluation episodes, readable, uploaded with --track
    import cv2

    eval_videos = sorted((tmp_path / "videos" / f"{run_dir.name}-eval").glob("*.mp4"))
    assert eval_videos and sorted((tmp_path / "videos" / run_dir.name).glob("*.mp4"))
    for video in eval_videos:
        capture = cv2.VideoCapture(str(video))
        ok, frame = capture.read()
        assert ok and frame.shape[0] > 100 and capture.get(cv2.CAP_PROP_FRAME_COUNT) > 10
    media = set().union(*(media for _, _, media in runs.values()))
    assert any(name.endswith(".mp4") for name in media), media


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: size, segments, two runs, edge cases of --resume
# ---------------------------------------------------------------------------------------------------------------------
def test_checkpoint_grows_with_the_stored_transitions_only(tmp_path):
    name = "dqn_redo"
    run_script(name, *flags(name, "--buffer-size", 200_000, "--checkpoint-every", 150), cwd=tmp_path)
    folder = only_run_dir(tmp_path) / "checkpoint"
    state = read_checkpoint(folder.parent)
    stored = state["replay"]["cursor"]
    assert 300 <= stored < 320  # one slot per step, plus each episode's final frame
    segments = sum(p.stat().st_size for p in folder.glob("replay-*.npz"))
    per_slot = load_script(name).ReplayMemory.bytes_per_slot()
    assert stored * per_slot <= segments < stored * per_slot + 20_000  # not 200,000 slots (1.4 GB)
    assert [tuple(s) for s in state["replay"]["segments"]] == [(0, stored)]  # one partial: the save at 150's replaced


def committed_segments(folder):
    state = torch.load(Path(folder) / "state.pt", weights_only=True)
    return [tuple(segment) for segment in state["replay"]["segments"]], state["replay"]["cursor"]


def test_replay_segments_stream_as_the_memory_fills_and_the_disk_holds_what_it_stores(tmp_path):
    """Full segments (here up to each pass over a 200-slot memory) are written as the memory fills; a save adds the
    partial one; segments the memory has overwritten go once no committed state names them."""
    m = load_script("dqn_redo")
    run_script("dqn_redo", *flags("dqn_redo", "--buffer-size", 200, "--total-timesteps", 700, "--checkpoint-every", 700),
               cwd=tmp_path)
    folder = only_run_dir(tmp_path) / "checkpoint"
    segments, cursor = committed_segments(folder)
    assert cursor > 700 and segments[-1][1] == cursor and segments[0][1] > cursor - 200  # what the memory holds
    assert all(first % 200 == 0 and end - first == 200 for first, end in segments[:-1])  # streamed full segments
    assert sorted(p.name for p in folder.glob("replay-*.npz")) == sorted(m.segment_name(*s) for s in segments)


def test_sigterm_without_periodic_checkpoints_writes_one_partial_segment(tmp_path):
    """--checkpoint-every 0: the signal's save finds the full segments already on disk and adds one partial segment and
    state.pt, whatever the memory holds."""
    name = "dqn_redo"
    proc = start_script(name, *flags(name, "--buffer-size", 200, "--total-timesteps", 100_000, "--learning-starts",
                                     99_000, "--checkpoint-every", 0), cwd=tmp_path)
    streamed = wait_for_file("runs/*/checkpoint/replay-000000000600-000000000800.npz", tmp_path, proc)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    folder = streamed.parent
    segments, cursor = committed_segments(folder)
    written_after = {p.name for p in folder.iterdir() if p.stat().st_mtime >= signalled}
    assert written_after == {"state.pt", load_script(name).segment_name(segments[-1][0], cursor)}
    assert segments[-1][1] - segments[-1][0] < 200  # the partial one


@pytest.mark.parametrize("name", ["dqn_softmoe", "dqn_redo"])
def test_a_copied_checkpoint_folder_resumes_bit_identically_in_a_new_run_directory(name, tmp_path):
    run_script(name, *flags(name, "--total-timesteps", 400, "--checkpoint-every", 400), cwd=tmp_path / "whole")
    run_script(name, *flags(name, "--total-timesteps", 250, "--checkpoint-every", 250), cwd=tmp_path / "first")
    shutil.copytree(only_run_dir(tmp_path / "first") / "checkpoint", tmp_path / "elsewhere" / "copy1")
    shutil.rmtree(tmp_path / "first")  # nothing of the first machine is left
    proc = run_script(name, "--resume", "copy1", "--total-timesteps", 400, cwd=tmp_path / "elsewhere")
    run_dir = only_run_dir(tmp_path / "elsewhere")
    assert proc.stdout.splitlines()[0] == f"resuming copy1 in runs/{run_dir.name}"
    a, b = read_checkpoint(only_run_dir(tmp_path / "whole")), read_checkpoint(run_dir)
    assert a["global_step"] == b["global_step"] == 400 and a["run"]["episode"] == b["run"]["episode"]
    for key in ("q_network", "target_network"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for k, v in a["replay"].items():
        assert (torch.equal(v, b["replay"][k]) if torch.is_tensor(v) else v == b["replay"][k] or k == "segments"), k
    assert a["rng"]["numpy"] == b["rng"]["numpy"] and torch.equal(a["rng"]["torch"], b["rng"]["torch"])


def rewrite_segment(path, change):
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    change(data)
    with open(path, "wb") as f:
        np.savez(f, **data)


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the frames' stored bytes: the zip's CRC no longer matches
    path.write_bytes(bytes(data))


SEGMENT_DAMAGE = {
    "empty": (lambda p: p.write_bytes(b""), "is damaged or of another kind"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "is damaged or of another kind"),
    "corrupt": (flip_a_byte, "is damaged or of another kind"),
    "shape": (lambda p: rewrite_segment(p, lambda d: d.update(frames=d["frames"][:, :42])), "frames is"),
    "dtype": (lambda p: rewrite_segment(p, lambda d: d.update(reward=d["reward"].astype(np.float64))), "reward is"),
    "missing": (lambda p: p.unlink(), "is missing from"),
}


def test_damaged_missing_or_foreign_replay_segments_stop_before_anything_is_created(tmp_path):
    name = "dqn_redo"
    run_script(name, *flags(name, "--total-timesteps", 150, "--checkpoint-every", 150), cwd=tmp_path / "source")
    good = only_run_dir(tmp_path / "source") / "checkpoint"
    (segment,) = good.glob("replay-*.npz")
    for case, (damage, message) in SEGMENT_DAMAGE.items():
        folder = tmp_path / case / "saved"
        shutil.copytree(good, folder)
        damage(folder / segment.name)
        proc = run_script(name, "--resume", "saved", cwd=tmp_path / case, check=False)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), (case, proc.stderr[-2000:])
        assert segment.name in err[0] and message in err[0], (case, err[0])
        assert not (tmp_path / case / "runs").exists(), case  # no run directory, no event file


def test_two_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    m = load_script("dqn_softmoe")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "time", lambda: 1_000_000_000.0)
    first, second = m.make_run_dir(m.Args()), m.make_run_dir(m.Args())
    assert first != second and os.path.isdir(first) and second == f"{first}-2"
    monkeypatch.undo()
    # and two real processes at once
    procs = [start_script("dqn_redo", *flags("dqn_redo", "--total-timesteps", 120), cwd=tmp_path / "both")
             for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    dirs = run_dirs(tmp_path / "both")
    assert len(dirs) == 2 and all(list(d.glob("events.out.tfevents.*")) for d in dirs)
    assert all(len(list(d.glob("events.out.tfevents.*"))) == 1 for d in dirs)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_damaged_foreign_and_old_checkpoints_stop_with_one_line(tmp_path, capsys):
    m = load_script("dqn_softmoe")
    resume = lambda path: parse(m, ["--resume", str(path)])  # noqa: E731
    good = fake_checkpoint(tmp_path / "good", "dqn_softmoe", m.Args())
    cases = {}
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "state.pt").write_bytes(b"")
    cases["empty"] = "damaged or incomplete"
    (tmp_path / "truncated").mkdir()
    data = (good / "state.pt").read_bytes()
    (tmp_path / "truncated" / "state.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = "damaged or incomplete"
    fake_checkpoint(tmp_path / "partial", "dqn_softmoe", m.Args(),
                    replay={"cursor": 10, "episode_step": 0, "segments": [(0, 10)]})
    cases["partial"] = "replay segment replay-000000000000-000000000010.npz is missing"
    fake_checkpoint(tmp_path / "foreign", "rainbow_tokenized", load_script("rainbow_tokenized").Args())
    cases["foreign"] = "a checkpoint of rainbow_tokenized.py, not of dqn_softmoe.py"
    (tmp_path / "old").mkdir()
    torch.save({"args": vars(m.Args()), "global_step": 5}, tmp_path / "old" / "state.pt")
    cases["old"] = "checkpoint format 1, this script reads format 3"
    cases["nowhere"] = "no checkpoint there"
    for case, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            resume(tmp_path / case)
        assert exit_info.value.code == 2
        line = one_error_line(capsys)
        assert message in line and str(tmp_path / case) in line, line
    args, checkpoint = resume(good)  # a run directory, its checkpoint folder and its state.pt all resume
    assert checkpoint["folder"] == str(good) and resume(good / "state.pt")[1]["folder"] == str(good)


@contextlib.contextmanager
def unreadable(path, monkeypatch):
    """`path` (a folder or a file) unreadable: chmod 000 for an ordinary user; root reads through any mode, so there
    the calls that the checkpoint reader makes (os.access, os.path.isfile, open) fail under `path` as they would."""
    path = Path(path)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0)
        try:
            yield
        finally:
            path.chmod(mode)
        return
    inside = lambda name: Path(os.path.abspath(os.fspath(name))).is_relative_to(path.absolute())  # noqa: E731
    real_access, real_isfile, real_open, real_io_open = os.access, os.path.isfile, open, io.open

    def denied_open(real):
        def opener(name, *args, **kwargs):
            if isinstance(name, (str, os.PathLike)) and inside(name):
                raise PermissionError(13, "Permission denied", os.fspath(name))
            return real(name, *args, **kwargs)
        return opener
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda name, mode: not inside(name) and real_access(name, mode))
        if path.is_dir():  # a file in an unreadable folder cannot even be stat'ed
            patch.setattr(os.path, "isfile", lambda name: not (inside(name) and Path(name) != path) and real_isfile(name))
        patch.setattr(builtins, "open", denied_open(real_open))
        patch.setattr(io, "open", denied_open(real_io_open))
        yield


def test_unreadable_checkpoints_stop_with_one_line(tmp_path, capsys, monkeypatch):
    """An unreadable folder, state.pt or replay segment: one line naming it, with the fix, exit code 2."""
    m = load_script("dqn_softmoe")
    segment = m.segment_name(0, 10)
    for case in ("folder", "state", "segment"):
        folder = fake_checkpoint(tmp_path / case, "dqn_softmoe", m.Args(),
                                 replay={"cursor": 10, "episode_step": 0, "segments": [(0, 10)]})
        (folder / segment).write_bytes(b"")
        target = {"folder": folder, "state": folder / "state.pt", "segment": folder / segment}[case]
        with unreadable(target, monkeypatch), pytest.raises(SystemExit) as exit_info:
            parse(m, ["--resume", str(folder)])
        assert exit_info.value.code == 2
        line = one_error_line(capsys)
        assert "cannot be read" in line and str(folder) in line, line
        if case != "folder":
            assert str(target) in line and f"chmod -R u+rX {folder}" in line, line


def test_resume_refuses_fewer_steps_and_takes_the_advice_it_gives(tmp_path, capsys):
    m = load_script("dqn_softmoe")
    folder = fake_checkpoint(tmp_path / "checkpoint", "dqn_softmoe", m.Args(), global_step=500)
    with pytest.raises(SystemExit):
        parse(m, ["--resume", str(folder), "--total-timesteps", "400"])
    assert "--total-timesteps 400 is below the checkpoint's step 500" in one_error_line(capsys)
    # a non-finite loss advises a lower --learning-rate, and resuming accepts it
    args, _ = parse(m, ["--resume", str(folder), "--learning-rate", "1e-5"])
    assert args.learning_rate == 1e-5
    # the RAM check of a resumed run advises what it can do: not a smaller --buffer-size
    with pytest.raises(SystemExit):
        m.place_replay(10**9, torch.device("cpu"), m.ReplayMemory.bytes_per_slot(), resuming=True)
    line = one_error_line(capsys)
    assert "lower --buffer-size" not in line and "resume on a machine with" in line


def test_a_lowered_learning_rate_reaches_the_optimizer_on_resume(tmp_path):
    name = "dqn_redo"
    proc = run_script(name, *flags(name, "--learning-rate", "1e20"), cwd=tmp_path / "diverged", check=False)
    assert proc.returncode == 1 and "non-finite loss" in proc.stderr and "--learning-rate 2.5e+19" in proc.stderr
    diverged = read_checkpoint(only_run_dir(tmp_path / "diverged"))
    assert all(torch.isfinite(p).all() for p in diverged["q_network"].values())  # the bad step was skipped
    run_script(name, *flags(name, "--checkpoint-every", 150), cwd=tmp_path / "run")
    run_dir = only_run_dir(tmp_path / "run")
    run_script(name, "--resume", run_dir, "--learning-rate", "1e-5", "--total-timesteps", 330, cwd=tmp_path / "run")
    after = read_checkpoint(run_dir)
    assert after["optimizer"]["param_groups"][0]["lr"] == 1e-5 and after["global_step"] == 330


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("flag,value", [("seed", -1), ("seed", 2**31), ("learning_rate", math.inf),
                                        ("learning_rate", math.nan), ("gamma", math.nan), ("adam_eps", -math.inf)])
def test_bad_numbers_stop_before_anything_is_created(name, flag, value, capsys):
    m = load_script(name)
    with pytest.raises(SystemExit) as exit_info:
        m.check_args(m.Args(**{flag: value}))
    assert exit_info.value.code == 2 and f"--{flag.replace('_', '-')}" in one_error_line(capsys)


def test_bad_seed_on_the_command_line_creates_nothing(tmp_path):
    proc = run_script("dqn_softmoe", "--seed", -1, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --seed must be in [0, 2**31), got -1"
    proc = run_script("dqn_softmoe", "--learning-rate", "inf", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --learning-rate must be a finite number, got inf"
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Storage faults
# ---------------------------------------------------------------------------------------------------------------------
def mounted_tmpfs(path, size):
    """Mount a tmpfs of `size` at `path` (root and a kernel that lets us), else skip the test with the reason."""
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return path


@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def mount(name, size):
        mounts.append(mounted_tmpfs(tmp_path / name, size))
        return mounts[-1]

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_full_disk_ends_the_run_with_one_line_and_the_last_checkpoint_intact(tmpfs):
    disk = tmpfs("disk", "5m")  # the first checkpoint (~3.4 MB: 1.4 of frames, 2 of networks and Adam) fits, not a second
    name = "dqn_softmoe"
    proc = run_script(name, *flags(name, "--total-timesteps", 600, "--checkpoint-every", 200), cwd=disk, check=False)
    assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "previous checkpoint" in lines[0]
    assert "Traceback" not in proc.stderr
    run_dir = only_run_dir(disk)
    assert read_checkpoint(run_dir)["global_step"] == 200  # the last good one, loadable
    assert not list(run_dir.glob("checkpoint/*.tmp"))
    assert len(list(run_dir.glob("checkpoint/replay-*.npz"))) == 1  # the failed save's new segment is gone too


def test_a_read_only_working_directory_stops_with_one_line(tmpfs):
    folder = tmpfs("readonly", "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    proc = run_script("dqn_softmoe", "--total-timesteps", 10, "--buffer-size", 1000, cwd=folder, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: cannot create the run directory runs/")
    assert "Read-only file system" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Memory limits from cgroups
# ---------------------------------------------------------------------------------------------------------------------
def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


GiB = 2**30


@pytest.mark.parametrize("layout", ["v2", "v1", "unlimited", "missing"])
def test_available_ram_counts_cgroup_limits(tmp_path, layout):
    m = load_script("dqn_softmoe")
    root, proc_cgroup = tmp_path / "cgroup", tmp_path / "proc_self_cgroup"
    machine = m.available_ram_bytes(proc_cgroup=str(tmp_path / "none"))  # MemAvailable alone
    if layout == "v2":  # a Slurm job's limit sits on an ancestor of the task's cgroup
        write(proc_cgroup, "0::/slurm/job_7/step_0/task_0\n")
        write(root / "slurm/job_7/memory.max", str(3 * GiB))
        write(root / "slurm/job_7/memory.current", str(1 * GiB))
        write(root / "slurm/job_7/step_0/task_0/memory.max", "max\n")
        write(root / "slurm/job_7/step_0/task_0/memory.current", str(GiB // 2))
        expected = min(machine, 2 * GiB)
    elif layout == "v1":
        write(proc_cgroup, "12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n")
        write(root / "memory/docker/abc/memory.limit_in_bytes", str(4 * GiB))
        write(root / "memory/docker/abc/memory.usage_in_bytes", str(GiB))
        expected = min(machine, 3 * GiB)
    elif layout == "unlimited":
        write(proc_cgroup, "0::/user.slice\n")
        write(root / "user.slice/memory.max", "max\n")
        write(root / "user.slice/memory.current", str(GiB))
        expected = machine
    else:
        write(proc_cgroup, "0::/gone\n")
        expected = machine
    got = m.available_ram_bytes(proc_cgroup=str(proc_cgroup), cgroup_root=str(root))
    assert abs(got - expected) < 256 << 20  # MemAvailable moves a little between the two reads


@pytest.mark.parametrize("name", NAMES)
def test_every_run_keeps_freed_memory(name):
    """Each script's main block calls keep_freed_memory() before the networks are built."""
    text = (harness.SCRIPTS / f"{name}.py").read_text()
    main = text[text.index('if __name__ == "__main__":'):]
    assert "    keep_freed_memory()\n" in main
    built = "make_network(" if "make_network(" in main else "QNetwork("
    assert main.index("keep_freed_memory()") < main.index(built)


@pytest.mark.parametrize("name", NAMES)
def test_a_cpu_checkpoint_keeps_a_gpu_optimizer_capturable(name):
    """A checkpoint written on a CPU holds capturable=False; resumed on a GPU with --cuda-graphs, the optimizer must
    stay capturable (as make_optimizer built it there) or the graph of the update cannot be recorded."""
    m = load_script(name)
    net = torch.nn.Linear(3, 2)
    saved = m.make_optimizer(m.Args(), net).state_dict()
    assert saved["param_groups"][0]["capturable"] is False
    optimizer = m.make_optimizer(m.Args(), net)
    optimizer.param_groups[0]["capturable"] = True  # as on CUDA
    m.load_optimizer(optimizer, saved, 1e-5)
    assert optimizer.param_groups[0]["capturable"] is True and optimizer.param_groups[0]["lr"] == 1e-5


@pytest.mark.parametrize("name", ["rainbow_tokenized", "der_single_expert"])
def test_a_checkpoint_from_the_other_device_resumes_the_noise(name, capsys):
    """The noisy layers' generator state of a checkpoint written on the other kind of device (a CUDA generator's
    16 bytes on a CPU, a CPU generator's 5,056 on a GPU) used to crash `set_state` at resume: now the generator is
    reseeded from it, deterministically and saying so, while a same-device state still continues the stream exactly."""
    m = load_script(name)
    saved = torch.Generator().manual_seed(7)
    torch.rand(5, generator=saved)
    noise = torch.Generator()
    m.load_noise_state(noise, saved.get_state())
    assert torch.equal(torch.rand(5, generator=noise), torch.rand(5, generator=saved))
    assert capsys.readouterr().out == ""

    cuda_state = torch.arange(16, dtype=torch.uint8)  # a CUDA generator's state: seed and offset, 8 bytes each
    draws = []
    for _ in range(2):
        noise = torch.Generator()
        m.load_noise_state(noise, cuda_state)
        draws.append(torch.rand(5, generator=noise))
    assert torch.equal(draws[0], draws[1])  # deterministic: a resumed run can be resumed again identically
    other = torch.Generator()
    m.load_noise_state(other, torch.arange(1, 17, dtype=torch.uint8))
    assert not torch.equal(torch.rand(5, generator=other), draws[0])  # the saved state matters
    out = capsys.readouterr().out
    assert out.count("\n") == 3 and "noise generator" in out and "reseeded" in out
    resume = (harness.SCRIPTS / f"{name}.py").read_text().split("def resume(")[1].split("\ndef ")[0]
    assert 'load_noise_state(noise, checkpoint["rng"]["noise"])' in resume and "noise.set_state" not in resume
