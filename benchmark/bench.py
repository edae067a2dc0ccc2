#!/usr/bin/env python3
"""Regression runs of the cleanrl-moe scripts across variants, games and seeds, locally or on Slurm (`benchmark.sh`).

    ./benchmark.sh list                          # the suites (benchmark/suites/*.toml)
    ./benchmark.sh smoke                         # run a suite here, with as many parallel runs as the machine holds
    ./benchmark.sh smoke --workers 2 --games Pong --seeds 1
    ./benchmark.sh dqn_redo --slurm --partition gpu --time 24:00:00 --gpus 1    # one Slurm array job
    ./benchmark.sh status smoke [--wait]         # runs done, failed, running, queued; ETA
    ./benchmark.sh report smoke                  # markdown table, PNG curves, checks against references (exit 1 if off)
    ./benchmark.sh perf                          # steps/s, peak memory, replay bytes per transition of each script

A suite is a TOML file: games x seeds x variants, a variant being a script with its flags. Every run has its own
directory `<out>/<variant>/<game>/seed<N>/` (`<out>` = runs/benchmark/<suite>) holding `log.txt` (the run's output,
written as it comes), `status.json` (state, exit code, attempts) and the script's own `runs/<run_name>/` (TensorBoard
events, result.json, checkpoint.pt). Running a suite again skips finished runs, resumes interrupted ones from their
checkpoints and retries failed ones. A run's score is its evaluation mean when it has one, else its training return
over the last 100 episodes; the report says which.
"""
import argparse
import csv
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

HERE = Path(__file__).resolve().parent
SCRIPTS = Path(os.environ.get("CLEANRL_MOE_SCRIPTS", HERE.parent / "cleanrl_moe"))
SUITES = HERE / "suites"
GiB = 2**30
# host memory of one run besides its replay memory: 0.5 GiB peak RSS measured for dqn_softmoe on a CPU
# (`benchmark.sh perf`), plus room for the CUDA libraries on a GPU machine
RUN_OVERHEAD_BYTES = 2 * GiB
# GPU memory of one run besides its replay memory (the reserve that the scripts' place_replay keeps free)
GPU_RUN_OVERHEAD_BYTES = 2 * GiB
DEFAULT_BYTES_PER_TRANSITION = 7068  # frames stored once (dqn_softmoe.py's ReplayMemory.bytes_per_slot())
MIN_GAMES_FOR_AGGREGATE = 10  # rainbow_der.md section 10: no HNS aggregates from a handful of games
STEP_RE = re.compile(r"step ([\d,]+)/([\d,]+)")  # the scripts' progress line


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# Data: suites, human/random scores, reference numbers
# ---------------------------------------------------------------------------------------------------------------
def load_suite(name):
    """A suite by name (benchmark/suites/<name>.toml) or by path (a copy a user edited)."""
    path = Path(name) if name.endswith(".toml") else SUITES / f"{name}.toml"
    if not path.is_file():
        fail(f"no suite {name!r}; the suites are: {', '.join(sorted(p.stem for p in SUITES.glob('*.toml')))}")
    with open(path, "rb") as f:
        suite = tomllib.load(f)
    suite.setdefault("name", path.stem)
    suite.setdefault("references", suite["name"])
    suite.setdefault("flags", "")
    suite.setdefault("checkpoint_every", 0)
    for key, kind in (("games", str), ("seeds", int), ("variants", dict)):
        if not suite.get(key) or not all(isinstance(x, kind) for x in suite[key]):
            fail(f"suite {path}: `{key}` must be a non-empty list of {kind.__name__}")
    for variant in suite["variants"]:
        if set(variant) - {"name", "script", "flags"} or not {"name", "script"} <= set(variant):
            fail(f"suite {path}: a variant has keys name, script and flags, got {variant}")
    names = [v["name"] for v in suite["variants"]]
    if len(set(names)) < len(names):
        fail(f"suite {path}: variant names repeat: {names}")
    return suite


def read_csv(path):
    """Rows of a CSV file whose lines starting with # are comments."""
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def human_random_table(path=HERE / "human_random.csv"):
    """{game: (random, human)} from benchmark/human_random.csv (Dopamine's normalization_utils.py)."""
    return {row["game"]: (float(row["random"]), float(row["human"])) for row in read_csv(path)}


def hns(score, game, table):
    """Human-normalized score (score - random) / (human - random); None for a game without human and random scores."""
    if game not in table or score is None:
        return None
    random_score, human_score = table[game]
    return (score - random_score) / (human_score - random_score)


def references(suite_name, path=HERE / "references.csv"):
    return [row for row in read_csv(path) if row["suite"] == suite_name]


# ---------------------------------------------------------------------------------------------------------------
# Plan: a suite becomes runs (variant x game x seed), each a command and a directory
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    variant: str
    script: str
    game: str
    seed: int
    flags: tuple  # the script's command-line flags
    dir: str
    total_steps: int = 0  # filled in by resolve()
    memory_bytes: int = 0  # host memory estimate, filled in by resolve()

    @property
    def id(self):
        return f"{self.variant}/{self.game}/seed{self.seed}"


def plan(suite, out, variants=None, games=None, seeds=None, extra_flags=""):
    """Every run of the suite, optionally restricted to some variants, games and seeds. Flags in order: the suite's,
    the variant's, --checkpoint-every, the command line's extra flags, then --env-id and --seed (later flags win)."""
    known = {"variants": [v["name"] for v in suite["variants"]], "games": suite["games"], "seeds": suite["seeds"]}
    for key, chosen in (("variants", variants), ("games", games), ("seeds", seeds)):
        unknown = [x for x in chosen or [] if x not in known[key]]
        if unknown:
            fail(f"--{key} {' '.join(map(str, unknown))}: not in suite {suite['name']} ({' '.join(map(str, known[key]))})")
    checkpoint = ["--checkpoint-every", str(suite["checkpoint_every"])] if suite["checkpoint_every"] else []
    runs = []
    for variant in suite["variants"]:
        if variants and variant["name"] not in variants:
            continue
        for game in suite["games"]:
            if games and game not in games:
                continue
            for seed in suite["seeds"]:
                if seeds and seed not in seeds:
                    continue
                flags = [*shlex.split(suite["flags"]), *shlex.split(variant.get("flags", "")), *checkpoint,
                         *shlex.split(extra_flags), "--env-id", f"ALE/{game}-v5", "--seed", str(seed)]
                runs.append(Run(variant["name"], variant["script"], game, seed, tuple(flags),
                                str(Path(out) / variant["name"] / game / f"seed{seed}")))
    return runs


def load_script(name):
    """Import cleanrl_moe/<name>.py without running it (the scripts have no import side effects)."""
    import importlib.util

    path = SCRIPTS / f"{name}.py"
    if not path.is_file():
        fail(f"{path} does not exist (yet); leave its variants out with --variants")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tyro reads the flags' docstrings through the module
    spec.loader.exec_module(module)
    return module


def resolve(runs):
    """Check every variant's flags with its script's own parser and start-up checks before anything starts, and fill
    in each run's step count and memory estimate. Returns the runs and {variant: parsed Args}."""
    import gymnasium as gym

    modules, parsed, resolved = {}, {}, []
    for run in runs:
        if run.variant not in parsed:
            module = modules.get(run.script) or modules.setdefault(run.script, load_script(run.script))
            import tyro

            try:
                args = tyro.cli(module.Args, args=list(run.flags))
                if hasattr(module, "check_args"):
                    module.check_args(args)
            except SystemExit:
                fail(f"variant {run.variant}: {run.script}.py rejects its flags {shlex.join(run.flags)} (above)")
            replay = getattr(module, "ReplayMemory", None)
            bytes_per_transition = replay.bytes_per_slot() if hasattr(replay, "bytes_per_slot") else DEFAULT_BYTES_PER_TRANSITION
            parsed[run.variant] = (args, bytes_per_transition)
        args, bytes_per_transition = parsed[run.variant]
        try:
            gym.spec(f"ALE/{run.game}-v5")
        except gym.error.Error:
            fail(f"game {run.game}: ALE/{run.game}-v5 is not an environment of ale-py")
        replay_bytes = min(args.buffer_size, args.total_timesteps) * bytes_per_transition
        resolved.append(Run(**{**asdict(run), "flags": run.flags, "total_steps": args.total_timesteps,
                               "memory_bytes": replay_bytes + RUN_OVERHEAD_BYTES}))
    return resolved, {variant: args for variant, (args, _) in parsed.items()}


# ---------------------------------------------------------------------------------------------------------------
# The state of a run, from its directory: pending, queued, running, done, interrupted, failed, lost
# ---------------------------------------------------------------------------------------------------------------
def find_one(run_dir, name):
    return next(iter(sorted(Path(run_dir).glob(f"runs/*/{name}"))), None)


def read_status(run_dir):
    try:
        with open(Path(run_dir) / "status.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_status(run_dir, **changes):
    status = {**read_status(run_dir), **changes}
    tmp = Path(run_dir) / "status.json.tmp"
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, Path(run_dir) / "status.json")
    return status


def slurm_queue():
    """Job ids (`<array job>_<task>`) that Slurm still holds, or None when there is no Slurm here."""
    if not shutil.which("squeue"):
        return None
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True)
    return set(out.stdout.split()) if out.returncode == 0 else None


def is_alive(status, queue):
    if status.get("slurm_job"):
        if queue is None or status["slurm_job"] in queue:  # without squeue we cannot tell: assume it lives
            return True
        for _ in range(3):  # a task being requeued can leave squeue's list for a moment: ask again before giving up
            time.sleep(1.0)
            if status["slurm_job"] in (slurm_queue() or set()):
                return True
        return False
    if status.get("host") != socket.gethostname():
        return True
    try:
        with open(f"/proc/{status['pid']}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        if not cmdline:  # a process being exec'd (just started) or a zombie
            with open(f"/proc/{status['pid']}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        return status.get("script", "") in cmdline
    except (OSError, KeyError, IndexError):
        return False


def run_state(run, queue=None):
    if find_one(run.dir, "result.json"):
        return "done"
    status = read_status(run.dir)
    state = status.get("state", "pending")
    if state != "running" and queue is not None and status.get("slurm_job") in queue:
        return "queued"  # submitted, or requeued by Slurm after a preemption
    if state in ("queued", "running") and not is_alive(status, queue):
        return "lost"  # killed without a chance to say so (SIGKILL, out of memory, a cancelled Slurm task)
    return "failed" if state == "done" else state  # "done" without result.json: someone deleted it


def states_of(runs):
    """{run: state}; asks Slurm's queue only when some run was submitted to Slurm."""
    queue = slurm_queue() if any(read_status(run.dir).get("slurm_job") for run in runs) else None
    return {run: run_state(run, queue) for run in runs}


def log_tail(run, lines=20, max_bytes=64 * 1024):
    try:
        with open(Path(run.dir) / "log.txt", "rb") as f:
            f.seek(max(0, os.path.getsize(f.name) - max_bytes))
            text = f.read().decode(errors="replace").replace("\r", "\n")
    except OSError:
        return "(no log)"
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def steps_done(run, state):
    """Agent steps a run has done: all of them when done, else the last progress line of its log."""
    if state == "done":
        return run.total_steps
    match = None
    for match in STEP_RE.finditer(log_tail(run, 5, max_bytes=4096)):  # read often, for every run: keep it short
        pass
    return int(match.group(1).replace(",", "")) if match else 0


# ---------------------------------------------------------------------------------------------------------------
# Execute one run: fresh, or resumed from its checkpoint; output streams to log.txt as it is written
# ---------------------------------------------------------------------------------------------------------------
def run_env(threads, gpu=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def start_run(run, env, slurm_job=None):
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = find_one(run_dir, "checkpoint.pt")
    argv = [sys.executable, str(SCRIPTS / f"{run.script}.py"), *run.flags]
    if checkpoint:
        argv += ["--resume", str(checkpoint.relative_to(run_dir))]
    else:
        shutil.rmtree(run_dir / "runs", ignore_errors=True)  # a run without checkpoint starts again from scratch
    attempt = read_status(run_dir).get("attempt", 0) + 1
    with open(run_dir / "log.txt", "a") as log:
        log.write(f"==== attempt {attempt} on {socket.gethostname()} at {datetime.datetime.now():%Y-%m-%d %H:%M:%S}"
                  f"{' (Slurm job ' + slurm_job + ')' if slurm_job else ''}: "
                  f"{'resumed from ' + str(checkpoint.relative_to(run_dir)) if checkpoint else 'fresh start'}\n"
                  f"$ cd {run_dir} && {shlex.join(argv)}\n")
        log.flush()
        # own session: a Ctrl-C in the terminal reaches only benchmark.sh, which then stops the runs with SIGTERM
        proc = subprocess.Popen(argv, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    write_status(run_dir, state="running", attempt=attempt, pid=proc.pid, host=socket.gethostname(),
                 script=f"{run.script}.py", slurm_job=slurm_job, exit_code=None, started=time.time(), ended=None,
                 command=argv)
    return proc


def finish_run(run, exit_code, keep_checkpoints=False):
    """Record how a run ended: done (exit 0 and a result.json), interrupted (SIGTERM: it saved a checkpoint) or failed."""
    if exit_code == 0 and find_one(run.dir, "result.json"):
        state = "done"
        checkpoint = find_one(run.dir, "checkpoint.pt")
        if checkpoint and not keep_checkpoints:  # up to 7 GB each with a 1M replay memory
            checkpoint.unlink()
    elif exit_code in (143, -signal.SIGTERM):
        state = "interrupted"
    else:
        state = "failed"
    write_status(run.dir, state=state, exit_code=exit_code, ended=time.time())
    return state


def run_summary(run):
    """'score -9.5 (eval, 2 episodes)' from a finished run's result.json."""
    score, source = run_score(load_result(run))
    return f"score {score:.1f} ({source})" if score is not None else "no score (no episode ended)"


def load_result(run):
    path = find_one(run.dir, "result.json")
    with open(path) as f:
        return json.load(f)


def run_score(result):
    """(score, source): the evaluation mean when the run has one, else the last-100 training mean."""
    if result.get("eval_return_mean") is not None:
        n = len(result.get("eval_returns") or [])
        return result["eval_return_mean"], f"eval, {n} episode{'s' if n != 1 else ''}"
    if result.get("train_return_last100") is not None:
        return result["train_return_last100"], "train, last 100 episodes"
    return None, "none"


# ---------------------------------------------------------------------------------------------------------------
# Progress: runs done, failed, running, queued; ETA from the agent steps done since this command started
# ---------------------------------------------------------------------------------------------------------------
class Progress:
    def __init__(self, name, runs, interval=None):
        self.name, self.runs = name, runs
        self.tty = sys.stdout.isatty()
        self.interval = interval or (1.0 if self.tty else 30.0)
        self.start, self.last_print, self.first_steps = time.time(), 0.0, None
        self.total_steps = sum(run.total_steps for run in runs) or 1

    def states(self):
        return states_of(self.runs)

    def line(self, states):
        count = {s: sum(1 for x in states.values() if x == s) for s in set(states.values())}
        steps = sum(steps_done(run, state) for run, state in states.items())
        if self.first_steps is None:
            self.first_steps = steps
        elapsed = time.time() - self.start
        rate = (steps - self.first_steps) / max(elapsed, 1e-9)
        eta = format_seconds((self.total_steps - steps) / rate) if rate > 0 else "?"
        return (f"{self.name}: {count.get('done', 0)}/{len(states)} done, "
                f"{count.get('failed', 0) + count.get('lost', 0)} failed, {count.get('running', 0)} running, "
                f"{count.get('queued', 0) + count.get('pending', 0) + count.get('interrupted', 0)} to run"
                f"{' (%d interrupted)' % count['interrupted'] if count.get('interrupted') else ''} | "
                f"{100 * steps / self.total_steps:.0f}% of steps | {format_seconds(elapsed)} elapsed | ETA {eta}")

    def show(self, force=False):
        if not force and time.time() - self.last_print < self.interval:
            return
        self.last_print = time.time()
        line = self.line(self.states())
        print(("\r" + line.ljust(110)) if self.tty else line, end="" if self.tty and not force else "\n", flush=True)

    def event(self, message):
        print(("\r" + " " * 110 + "\r" if self.tty else "") + message, flush=True)


def print_failures(runs, states, lines=15):
    bad = [run for run in runs if states[run] in ("failed", "lost")]
    for run in bad:
        status = read_status(run.dir)
        why = ("ended without an exit code (killed: out of memory, a cancelled Slurm task?)" if states[run] == "lost"
               else f"exit code {status.get('exit_code')}")
        print(f"\nFAILED {run.id}: {why}\n  log: {Path(run.dir) / 'log.txt'}\n" +
              "\n".join("  | " + line for line in log_tail(run, lines).splitlines()))
    return len(bad)


# ---------------------------------------------------------------------------------------------------------------
# Local execution: N runs at a time, default = what the machine holds (CPU cores, RAM, GPU memory)
# ---------------------------------------------------------------------------------------------------------------
def cpu_count():
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:  # a container's CPU quota (cgroup v2)
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def available_ram():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def gpus():
    """[(index, free bytes)] of the visible NVIDIA GPUs, read with nvidia-smi (no CUDA context in this process)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    found = []
    for line in out.stdout.strip().splitlines() if out.returncode == 0 else []:
        index, total, used = (int(x) for x in line.split(","))
        found.append((index, (total - used) * 2**20))
    if visible:
        wanted = [int(x) for x in visible.split(",") if x.strip().isdigit()]
        found = [(index, free) for index, free in found if index in wanted]
    return found


def worker_slots(runs, uses_cuda, workers=None):
    """[(gpu index or None)] per parallel worker, and the reason for their number."""
    cpus = cpu_count()
    per_run = max(run.memory_bytes for run in runs)
    by_ram = max(1, int((available_ram() - GiB) // per_run))
    limits = [cpus, by_ram]
    why = f"{cpus} CPUs, {available_ram() / GiB:.1f} GiB RAM free / {per_run / GiB:.1f} GiB per run = {by_ram}"
    gpu_slots = []
    found = gpus() if uses_cuda else []
    if found:
        replay = per_run - RUN_OVERHEAD_BYTES
        for index, free in found:
            # all replay memories on the GPU if they fit there (the scripts' place_replay), else in RAM
            fit = int(0.9 * free // (replay + GPU_RUN_OVERHEAD_BYTES)) or int(0.9 * free // GPU_RUN_OVERHEAD_BYTES)
            gpu_slots.append([index] * max(1, fit))
        limits.append(sum(map(len, gpu_slots)))
        why += f", {len(found)} GPU(s) holding {limits[-1]} runs"
    count = workers or min(limits)
    if found:  # interleave GPUs so that a few workers spread over all of them
        order = [slot for group in zip(*[g + [None] * (max(map(len, gpu_slots)) - len(g)) for g in gpu_slots])
                 for slot in group if slot is not None]
        slots = [order[i % len(order)] for i in range(count)]
    else:
        slots = [None] * count
    return slots, (f"{count} workers (--workers)" if workers else f"{count} workers ({why})")


def run_local(name, runs, slots, keep_checkpoints=False):
    """Run the unfinished runs, len(slots) at a time; Ctrl-C or SIGTERM stops them with a checkpoint."""
    states = states_of(runs)
    todo = [run for run in runs if states[run] not in ("done", "running", "queued")]
    for run in runs:
        if states[run] in ("running", "queued"):
            status = read_status(run.dir)
            where = f"Slurm job {status['slurm_job']}" if status.get("slurm_job") else f"pid {status.get('pid')}"
            print(f"{run.id} is already {states[run]} ({where}): not started here")
    if len(todo) < len(runs):
        print(f"{sum(s == 'done' for s in states.values())} of {len(runs)} runs already done: skipped")
    threads = max(1, cpu_count() // max(1, len(slots)))
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
    progress = Progress(name, runs)
    free, active, stopping = list(range(len(slots))), {}, False
    try:
        while todo or active:
            if len(stop) == 1 and not stopping:
                progress.event(f"stopping: {len(active)} runs get SIGTERM and save a checkpoint (a second Ctrl-C kills them)")
                todo.clear()
                stopping = True
                for run, proc in active.values():
                    proc.send_signal(signal.SIGTERM)
            if len(stop) > 1:
                for run, proc in active.values():
                    proc.kill()
            while todo and free and not stop:
                slot = free.pop(0)
                run = todo.pop(0)
                resumed = find_one(run.dir, "checkpoint.pt") is not None
                active[slot] = (run, start_run(run, run_env(threads, slots[slot])))
                progress.event(f"start  {run.id}{' (resumed)' if resumed else ''}")
            for slot, (run, proc) in list(active.items()):
                code = proc.poll()
                if code is None:
                    continue
                state = finish_run(run, code, keep_checkpoints)
                del active[slot]
                free.append(slot)
                started = read_status(run.dir).get("started", time.time())
                detail = run_summary(run) if state == "done" else f"exit code {code}, log {Path(run.dir) / 'log.txt'}"
                progress.event(f"{state:<6} {run.id}: {detail} ({format_seconds(time.time() - started)})")
            progress.show()
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    progress.show(force=True)
    final = progress.states()
    failed = print_failures(runs, final)
    if stop:
        print("\ninterrupted: run the same command again to resume")
        return 130
    unfinished = sum(state != "done" for state in final.values())
    print(f"\n{len(runs) - unfinished}/{len(runs)} runs done" + (f", {failed} failed" if failed else ""))
    return 1 if unfinished else 0


# ---------------------------------------------------------------------------------------------------------------
# Slurm: one array job, a task per unfinished run; tasks resume from their checkpoints after preemption or requeue
# ---------------------------------------------------------------------------------------------------------------
SBATCH_TEMPLATE = """#!/bin/bash
# {suite}: {count} runs of cleanrl-moe as one Slurm array job, written by benchmark.sh. Each task runs one
# (script, flags, game, seed) of {manifest}, resuming from its checkpoint when a run was interrupted.
# --requeue: a preempted task is requeued by Slurm; the runs save a checkpoint on the SIGTERM that precedes the kill
# (Slurm's KillWait, often 30 s, must cover writing it: up to 7 GB with a 1M replay memory).
# --signal: {grace} s before the time limit the task stops its run with a checkpoint and requeues itself.
#SBATCH --job-name={job_name}
#SBATCH --array=0-{last}{throttle}
#SBATCH --output={log_dir}/%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@{grace}
#SBATCH --cpus-per-task={cpus}
#SBATCH --mem={mem}
{options}
exec {python} {bench} task {manifest} "$SLURM_ARRAY_TASK_ID"
"""


def submit_slurm(suite, runs, opts):
    states = states_of(runs)
    todo = [run for run in runs if states[run] not in ("done", "running", "queued")]
    if len(todo) < len(runs):
        print(f"{len(runs) - len(todo)} of {len(runs)} runs done, running or queued: not submitted")
    if not todo:
        return wait_slurm(suite["name"], runs) if opts.wait else 0
    job_dir = Path(opts.out) / "slurm" / datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    manifest = job_dir / "runs.json"
    options = [f"#SBATCH --partition={opts.partition}" if opts.partition else "",
               f"#SBATCH --time={opts.time}" if opts.time else "",
               f"#SBATCH --gres=gpu:{opts.gpus}" if opts.gpus else ""]
    script = SBATCH_TEMPLATE.format(
        suite=suite["name"], count=len(todo), manifest=manifest, job_name=f"bench-{suite['name']}", last=len(todo) - 1,
        throttle=f"%{opts.max_parallel}" if opts.max_parallel else "", log_dir=job_dir, grace=opts.signal_grace,
        cpus=opts.cpus_per_task, mem=f"{math.ceil(max(run.memory_bytes for run in todo) / GiB)}G",
        options="\n".join(line for line in options if line), python=sys.executable, bench=Path(__file__).resolve())
    command = ["sbatch", "--parsable", *shlex.split(opts.sbatch_args or ""), str(job_dir / "job.sbatch")]
    if opts.dry_run:
        print(f"would write {manifest} ({len(todo)} runs) and {job_dir / 'job.sbatch'}, then run {shlex.join(command)}:\n")
        print(script)
        return 0
    job_dir.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"suite": suite["name"], "keep_checkpoints": opts.keep_checkpoints,
                                    "runs": [asdict(run) for run in todo]}, indent=1))
    (job_dir / "job.sbatch").write_text(script)
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        fail(f"{shlex.join(command)} failed: {out.stderr.strip()}")
    job = out.stdout.strip().split(";")[0]
    for index, run in enumerate(todo):
        Path(run.dir).mkdir(parents=True, exist_ok=True)
        write_status(run.dir, state="queued", slurm_job=f"{job}_{index}", exit_code=None)
    with open(Path(opts.out) / "slurm" / "jobs.txt", "a") as f:
        f.write(f"{job} {job_dir}\n")
    print(f"submitted {len(todo)} runs as Slurm array job {job} ({job_dir / 'job.sbatch'})")
    filters = [f"--{key} {' '.join(map(str, getattr(opts, key)))}" for key in ("variants", "games", "seeds") if getattr(opts, key)]
    print(f"follow with: {Path(__file__).parent.parent / 'benchmark.sh'} status {' '.join([opts.suite, *filters])} --wait")
    return wait_slurm(suite["name"], runs) if opts.wait else 0


def wait_slurm(name, runs, poll=2.0):
    """Wait while runs are queued or running, showing progress; then list failures."""
    progress = Progress(name, runs)
    while True:
        states = progress.states()
        if not any(state in ("queued", "running") for state in states.values()):
            break
        progress.show()
        time.sleep(poll)
    progress.show(force=True)
    failed = print_failures(runs, states)
    unfinished = sum(state != "done" for state in states.values())
    print(f"\n{len(runs) - unfinished}/{len(runs)} runs done" + (f", {failed} failed" if failed else ""))
    return 1 if unfinished else 0


def slurm_task(manifest, index):
    """One array task: run (or resume) one run. SIGTERM (preemption, scancel) stops the run with a checkpoint;
    SIGUSR1 (the time limit is near, --signal) does the same, then requeues this task so that it resumes."""
    with open(manifest) as f:
        data = json.load(f)
    entry = data["runs"][index]
    run = Run(**{**entry, "flags": tuple(entry["flags"])})
    if run_state(run) == "done":
        print(f"{run.id}: already done")
        return 0
    received, proc = [], None

    def on_signal(signum, frame):
        received.append(signum)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', index)}"
    threads = int(os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    proc = start_run(run, run_env(threads), slurm_job=job)
    if received:
        proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    state = finish_run(run, code, data.get("keep_checkpoints", False))
    print(f"{run.id}: {state} (exit code {code})", flush=True)
    if signal.SIGUSR1 in received and state == "interrupted":
        write_status(run.dir, state="queued")
        subprocess.run(["scontrol", "requeue", os.environ["SLURM_JOB_ID"]])
    return code


# ---------------------------------------------------------------------------------------------------------------
# Aggregation: per game mean and std over seeds; per suite human-normalized IQM, median and mean with 95%
# stratified-bootstrap CIs (rliable: Agarwal et al. 2021)
# ---------------------------------------------------------------------------------------------------------------
def iqm(values):
    """Interquartile mean: the mean of the middle 50% of the values, as rliable's aggregate_iqm (scipy's
    trim_mean(0.25): the values sorted, floor(n/4) of them cut at each end)."""
    values = np.sort(np.asarray(values, dtype=float).ravel())
    cut = len(values) // 4
    return float(values[cut:len(values) - cut].mean())


def aggregate_stats(*runs):
    """[IQM, median, mean] from one array of run scores per game: the IQM over all runs pooled, the median and the
    mean over games of each game's mean (rliable's aggregate_iqm, aggregate_median, aggregate_mean)."""
    game_means = np.array([np.mean(r) for r in runs])
    return np.array([iqm(np.concatenate([np.ravel(r) for r in runs])), np.median(game_means), game_means.mean()])


def bootstrap_backend():
    """('rliable', version) when rliable's bootstrap imports, else ('numpy', why not). rliable's library needs the
    `arch` package, whose 7.x releases (the ones rliable 1.2 accepts) break on import with pandas 3."""
    try:
        import rliable
        from rliable import library  # noqa: F401  (imports arch)
    except Exception as error:  # ImportError, or arch's TypeError under pandas 3
        return "numpy", f"rliable unusable here ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    from importlib.metadata import version

    try:
        return "rliable", version("rliable")
    except Exception:
        return "rliable", getattr(rliable, "__version__", "?")


def bootstrap_numpy(runs, reps, rng, chunk=1000):
    """[reps, 3] bootstrap replicates of aggregate_stats: each game's runs resampled with replacement on their own
    (a stratified bootstrap, rliable's StratifiedBootstrap / StratifiedIndependentBootstrap), in chunks of reps."""
    out = np.empty((reps, 3))
    for start in range(0, reps, chunk):
        n = min(chunk, reps - start)
        samples = [r[rng.integers(0, len(r), size=(n, len(r)))] for r in runs]  # per game: [n, runs of that game]
        pooled = np.sort(np.concatenate(samples, axis=1), axis=1)
        cut = pooled.shape[1] // 4
        game_means = np.stack([s.mean(axis=1) for s in samples], axis=1)  # [n, games]
        out[start:start + n] = np.stack([pooled[:, cut:pooled.shape[1] - cut].mean(axis=1),
                                         np.median(game_means, axis=1), game_means.mean(axis=1)], axis=1)
    return out


def aggregate_with_ci(per_game, reps=20_000, seed=0, backend=None):
    """(point estimates, 95% CIs as [[low, ...], [high, ...]]) of [IQM, median, mean] over {game: [run scores]}:
    a stratified bootstrap (runs resampled with replacement within each game), percentile intervals (2.5% and
    97.5%, numpy's linear interpolation), as rliable's get_interval_estimates. backend 'rliable' uses rliable
    itself (equal runs per game: its runs x games matrix; unequal, e.g. after a failed run: one array per game),
    'numpy' the same computation here; None: rliable when it is usable. Seeded: the same data give the same CIs."""
    backend = backend or bootstrap_backend()[0]
    runs = [np.asarray(per_game[game], dtype=float).ravel() for game in sorted(per_game)]
    if backend == "numpy":
        points = aggregate_stats(*runs)
        replicates = bootstrap_numpy(runs, reps, np.random.default_rng(seed))
        return points, np.percentile(replicates, [2.5, 97.5], axis=0)
    from rliable import library as rly
    from rliable import metrics

    if len({len(r) for r in runs}) == 1:
        data = np.stack(runs, axis=1)  # [runs, games]
        func = lambda m: np.array([metrics.aggregate_iqm(m), metrics.aggregate_median(m), metrics.aggregate_mean(m)])  # noqa: E731
    else:
        data, func = [r.reshape(-1, 1) for r in runs], aggregate_stats
    saved = np.random.get_state()
    np.random.seed(seed)  # rliable's StratifiedBootstrap draws from numpy's global generator
    try:
        points, cis = rly.get_interval_estimates({"x": data}, func, reps=reps)
    finally:
        np.random.set_state(saved)
    return np.asarray(points["x"], dtype=float), np.asarray(cis["x"], dtype=float)


def collect(runs):
    """One row per planned run: state, score and its source, HNS."""
    table = human_random_table()
    rows = []
    for run, state in states_of(runs).items():
        score, source = run_score(load_result(run)) if state == "done" else (None, "")
        rows.append({"run": run, "state": state, "score": score, "source": source, "hns": hns(score, run.game, table)})
    return rows


def summarize(rows, reps=20_000, backend=None):
    """Per (variant, game): runs, mean and sample std of scores, mean HNS; per variant: aggregates with CIs."""
    per_game, per_variant = {}, {}
    for row in rows:
        if row["score"] is not None:
            per_game.setdefault((row["run"].variant, row["run"].game), []).append(row)
    games = {}
    for (variant, game), group in per_game.items():
        scores = np.array([row["score"] for row in group])
        sources = sorted({row["source"] for row in group})
        games[variant, game] = {
            "n": len(scores), "mean": scores.mean(), "std": scores.std(ddof=1) if len(scores) > 1 else None,
            "source": sources[0] if len(sources) == 1 else "mixed: " + "; ".join(sources),
            "hns": None if group[0]["hns"] is None else float(np.mean([row["hns"] for row in group])),
            "scores": scores}
    for variant in dict.fromkeys(row["run"].variant for row in rows):
        normalized = {game: [row["hns"] for row in group] for (v, game), group in per_game.items()
                      if v == variant and group[0]["hns"] is not None}
        without = sorted({row["run"].game for row in rows if row["run"].variant == variant and
                          row["run"].game not in human_random_table()})
        entry = {"games": len(normalized), "runs": sum(map(len, normalized.values())), "without_human": without}
        if len(normalized) < MIN_GAMES_FOR_AGGREGATE:
            entry["skipped"] = (f"{len(normalized)} games with human-normalized scores; aggregates need at least "
                                f"{MIN_GAMES_FOR_AGGREGATE} (rainbow_der.md section 10)")
        else:
            entry["point"], entry["ci"] = aggregate_with_ci(normalized, reps=reps, backend=backend)
        per_variant[variant] = entry
    return games, per_variant


# ---------------------------------------------------------------------------------------------------------------
# Comparison with reference numbers
# ---------------------------------------------------------------------------------------------------------------
def number(text):
    return float(text) if text not in (None, "") else None


def within(value, low, high):
    return value is not None and (low is None or value >= low) and (high is None or value <= high)


def compare(reference_rows, rows, games, per_variant):
    """[(reference row, variant, verdict, our value as text)] with verdict pass, FAIL or skip."""
    variants = list(dict.fromkeys(row["run"].variant for row in rows))
    stat_index = {"iqm_hns": 0, "median_hns": 1, "mean_hns": 2}
    checks = []
    for ref in reference_rows:
        low, high, slack, published = number(ref["low"]), number(ref["high"]), number(ref["slack"]) or 0.0, number(ref["reference"])
        for variant in variants if ref["variant"] == "*" else [ref["variant"]]:
            mine = [row for row in rows if row["run"].variant == variant and ref["game"] in ("*", row["run"].game)]
            if not mine:
                checks.append((ref, variant, "skip", "not in this run of the suite"))
                continue
            if ref["statistic"] == "run_score":
                unfinished = [row["run"].id for row in mine if row["state"] != "done"]
                outside = [f"{row['run'].id}: {row['score']}" for row in mine
                           if row["state"] == "done" and not within(row["score"], low, high)]
                verdict = "FAIL" if outside or unfinished else "pass"
                text = "; ".join(outside + [f"{run_id}: not finished" for run_id in unfinished]) or (
                    f"{len(mine)} runs in range, min {min(r['score'] for r in mine):.1f}, max {max(r['score'] for r in mine):.1f}")
                checks.append((ref, variant, verdict, text))
            elif ref["statistic"] == "mean_score":
                stats = games.get((variant, ref["game"]))
                if stats is None:
                    checks.append((ref, variant, "FAIL", "no finished run"))
                    continue
                checks.append((ref, variant, "pass" if within(stats["mean"], low, high) else "FAIL",
                               f"{stats['mean']:.1f} over {stats['n']} runs"))
            elif ref["statistic"] in stat_index:
                entry = per_variant.get(variant, {})
                if "point" not in entry:
                    checks.append((ref, variant, "skip", entry.get("skipped", "no aggregate")))
                    continue
                i = stat_index[ref["statistic"]]
                value, ci_low, ci_high = entry["point"][i], entry["ci"][0][i], entry["ci"][1][i]
                ok = (ci_low - slack <= published <= ci_high + slack) if ref["check"] == "ci" else within(value, low, high)
                checks.append((ref, variant, "pass" if ok else "FAIL", f"{value:.3f} [{ci_low:.3f}, {ci_high:.3f}]"))
            else:
                fail(f"references.csv: unknown statistic {ref['statistic']!r}")
    return checks


def tolerance_text(ref):
    if ref["check"] == "ci":
        return f"{ref['reference']} inside our 95% CI" + (f" +- {ref['slack']}" if number(ref["slack"]) else "")
    low, high = ref["low"] or "-inf", ref["high"] or "+inf"
    return f"in [{low}, {high}]"


# ---------------------------------------------------------------------------------------------------------------
# Report: markdown, learning curves and aggregate plot (PNG), checks; exit 1 when a run failed or a check fails
# ---------------------------------------------------------------------------------------------------------------
def episodic_returns(run):
    """(steps, returns) of charts/episodic_return from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = sorted(Path(run.dir).glob("runs/*/"))
    if not run_dirs:
        return np.zeros(0), np.zeros(0)
    acc = EventAccumulator(str(run_dirs[0]), size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/episodic_return" not in acc.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    events = acc.Scalars("charts/episodic_return")
    return np.array([e.step for e in events]), np.array([e.value for e in events])


def plot_curves(rows, out_dir, bins=50):
    """One PNG per game: per variant, the mean over seeds of the episodic return (averaged in step bins), with the
    seeds' min-max band."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for game in dict.fromkeys(row["run"].game for row in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in dict.fromkeys(row["run"].variant for row in rows):
            data = [episodic_returns(row["run"]) for row in rows if row["run"].game == game and row["run"].variant == variant]
            data = [(steps, returns) for steps, returns in data if len(steps)]
            if not data:
                continue
            edges = np.linspace(0, max(steps.max() for steps, _ in data) + 1, bins + 1)
            curves = []
            for steps, returns in data:
                which = np.clip(np.digitize(steps, edges) - 1, 0, bins - 1)
                sums, counts = np.bincount(which, returns, bins), np.bincount(which, minlength=bins)
                curves.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
            with warnings.catch_warnings():  # bins where no seed finished an episode stay empty
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
            centers = (edges[1:] + edges[:-1]) / 2
            line, = ax.plot(centers, mean, marker="." if len(data[0][0]) < 20 else None, label=f"{variant} ({len(data)} seeds)")
            ax.fill_between(centers, low, high, color=line.get_color(), alpha=0.2)
        if ax.lines:
            ax.set(title=game, xlabel="agent steps", ylabel="episodic return (training)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{game}.png"
            fig.savefig(path, dpi=100)
            paths.append(path)
        plt.close(fig)
    return paths


def plot_aggregates(per_variant, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v, entry in per_variant.items() if "point" in entry]
    if not variants:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.5 * len(variants) + 1.6), sharey=True)
    for i, (ax, name) in enumerate(zip(axes, ("IQM", "Median", "Mean"))):
        for y, variant in enumerate(variants):
            point, (low, high) = per_variant[variant]["point"][i], (per_variant[variant]["ci"][0][i], per_variant[variant]["ci"][1][i])
            ax.errorbar(point, y, xerr=[[point - low], [high - point]], fmt="o", capsize=4)
        ax.set(title=name, xlabel="human-normalized score", yticks=range(len(variants)), yticklabels=variants)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("95% stratified-bootstrap CIs", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def fmt(value, digits=1):
    return "" if value is None else f"{value:,.{digits}f}"


def plotting_unavailable():
    """None when matplotlib imports, else why not (the report then has tables and no PNGs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        return f"no plots: matplotlib is not installed ({error}); pip install \".[benchmark]\" adds it"
    return None


def report(suite, runs, out, reps=20_000):
    rows = collect(runs)
    backend, backend_note = bootstrap_backend()
    games, per_variant = summarize(rows, reps=reps, backend=backend)
    checks = compare(references(suite["references"]), rows, games, per_variant)
    out = Path(out)
    no_plots = plotting_unavailable()
    curves = [] if no_plots else plot_curves(rows, out / "curves")
    aggregate_png = None if no_plots else plot_aggregates(per_variant, out / "aggregate.png")
    states = {row["run"]: row["state"] for row in rows}
    done = sum(state == "done" for state in states.values())
    failures = [row for row in rows if row["state"] != "done"]
    failed_checks = [c for c in checks if c[2] == "FAIL"]

    md = [f"# Benchmark report: {suite['name']}", "", suite.get("description", ""), "",
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {out}: {done}/{len(rows)} runs done. "
          "Score of a run: its evaluation mean if it has one, else its training return over the last 100 episodes "
          "(column `score of`). Std: sample standard deviation over seeds.", ""]
    md += ["## Per game", "", "| variant | game | runs | score (mean ± std) | score of | HNS (mean) |", "|---|---|---|---|---|---|"]
    for (variant, game), stats in games.items():
        std = f" ± {stats['std']:,.1f}" if stats["std"] is not None else ""
        md.append(f"| {variant} | {game} | {stats['n']} | {stats['mean']:,.1f}{std} | {stats['source']} | "
                  f"{fmt(stats['hns'], 3) if stats['hns'] is not None else 'no human score'} |")
    md += ["", "## Aggregates (human-normalized)", ""]
    if any("point" in entry for entry in per_variant.values()):
        md += [f"IQM over all runs, median and mean over games of the per-game means; 95% stratified-bootstrap CIs "
               f"({reps:,} resamples, percentile intervals; " + (f"rliable {backend_note})." if backend == "rliable" else
               f"numpy implementation of rliable's stratified bootstrap: {backend_note}).") + "", "",
               "| variant | games | runs | IQM [95% CI] | median [95% CI] | mean [95% CI] |", "|---|---|---|---|---|---|"]
    for variant, entry in per_variant.items():
        if "point" in entry:
            cells = [f"{p:.3f} [{lo:.3f}, {hi:.3f}]" for p, lo, hi in zip(entry["point"], *entry["ci"])]
            md.append(f"| {variant} | {entry['games']} | {entry['runs']} | " + " | ".join(cells) + " |")
    for variant, entry in per_variant.items():
        if "skipped" in entry:
            md.append(f"- {variant}: no aggregates: {entry['skipped']}.")
        if entry["without_human"]:
            md.append(f"- {variant}: reported raw, left out of the aggregates (no human score in "
                      f"benchmark/human_random.csv): {', '.join(entry['without_human'])}.")
    md += ["", "## Checks against references (benchmark/references.csv)", ""]
    if checks:
        md += ["| result | variant | game | statistic | ours | tolerance | source |", "|---|---|---|---|---|---|---|"]
        md += [f"| {verdict} | {variant} | {ref['game']} | {ref['statistic']} | {text} | {tolerance_text(ref)} | {ref['source']} |"
               for ref, variant, verdict, text in checks]
    else:
        md.append(f"No reference numbers for suite {suite['references']}.")
    if failures:
        md += ["", "## Runs not finished", ""]
        for row in failures:
            status = read_status(row["run"].dir)
            md += [f"### {row['run'].id}: {row['state']}" + (f" (exit code {status['exit_code']})" if status.get("exit_code") is not None else ""),
                   "", f"log: `{Path(row['run'].dir) / 'log.txt'}`", "", "```", log_tail(row["run"]), "```", ""]
    md += ["", "## Plots", ""]
    md += [f"![{path.stem}]({path.relative_to(out)})" for path in curves]
    no_curve = [game for game in dict.fromkeys(row["run"].game for row in rows) if game not in {p.stem for p in curves}]
    if no_plots:
        md.append(no_plots + ".")
    elif no_curve:
        md.append(f"No learning curve (no training episode ended in any run): {', '.join(no_curve)}.")
    if aggregate_png:
        md.append(f"![aggregates]({aggregate_png.relative_to(out)})")
    text = "\n".join(md) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text)
    verdict = []
    if failures:
        verdict.append(f"{len(failures)} runs not finished")
    if failed_checks:
        verdict.append(f"{len(failed_checks)} checks outside their tolerance")
    print(f"report written to {out / 'report.md'}: " + ("; ".join(verdict) if verdict else "all runs done, all checks pass"))
    return 1 if verdict else 0


# ---------------------------------------------------------------------------------------------------------------
# Perf: steps per second, peak memory and replay bytes per transition of each script at a fixed small configuration
# ---------------------------------------------------------------------------------------------------------------
PERF_SCRIPTS = ["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"]
# runs a script as __main__ in this process, then records its peak host and GPU memory and replay bytes per transition
PERF_WRAPPER = """
import json, os, resource, runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
stats, code = {}, 0
try:
    module = runpy.run_path(script, run_name="__main__")
    for name, obj in module.items():
        if isinstance(obj, type) and hasattr(obj, "bytes_per_slot"):
            try:
                stats.setdefault("replay_bytes_per_transition", {})[name] = int(obj.bytes_per_slot())
            except TypeError:
                pass
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
finally:
    import torch
    stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["device"] = torch.cuda.get_device_name()
        stats["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        stats["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    with open(os.environ["BENCH_PERF_STATS"], "w") as f:
        json.dump(stats, f)
sys.exit(code)
"""


def sps_by_phase(sps_events, learning_starts):
    """Median charts/SPS of the log intervals that lie wholly in the warm-up and wholly in the learning phase. The
    event at step g measures the steps after the previous event's step p up to g, p + 1 ... g; the scripts update
    the network at the steps after learning_starts."""
    warmup, learning, previous = [], [], -1
    for step, value in sps_events:
        if step <= learning_starts:
            warmup.append(value)
        elif previous >= learning_starts:
            learning.append(value)
        previous = step
    return (float(np.median(warmup)) if warmup else None), (float(np.median(learning)) if learning else None)


# flags that keep a script's measured run to its training: der_single_expert evaluates 100 episodes after every run
PERF_SCRIPT_FLAGS = {"der_single_expert": ["--eval-episodes", "0"]}


def perf(opts):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = Path(opts.out).resolve()  # the runs' working directories are below it
    config = ["--env-id", opts.env_id, "--seed", "1", "--total-timesteps", str(opts.steps),
              "--learning-starts", str(opts.learning_starts), "--buffer-size", str(opts.buffer_size),
              "--log-frequency", str(opts.log_frequency),
              *(["--no-cuda"] if opts.cpu else []), *shlex.split(opts.flags)]
    rows = []
    for name in opts.scripts:
        path = SCRIPTS / f"{name}.py"
        if not path.is_file():
            rows.append({"script": name, "note": "not present yet: skipped"})
            print(f"perf {name}: {path} not present: skipped", flush=True)
            continue
        work = out / name
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", BENCH_PERF_STATS=str(work / "stats.json"))
        if opts.threads:
            env.update(OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
        argv = [sys.executable, "-c", PERF_WRAPPER, str(path), *config, *PERF_SCRIPT_FLAGS.get(name, [])]
        print(f"perf {name}: {shlex.join([str(path), *config, *PERF_SCRIPT_FLAGS.get(name, [])])}", flush=True)
        with open(work / "log.txt", "w") as log:
            code = subprocess.run(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        row = {"script": name, "exit_code": code}
        if (work / "stats.json").is_file():
            row.update(json.loads((work / "stats.json").read_text()))
        result_path = next(iter(work.glob("runs/*/result.json")), None)
        if code != 0 or result_path is None:
            tail = (work / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
            row["note"] = f"failed (exit code {code}): " + " / ".join(tail)
        else:
            result = json.loads(result_path.read_text())
            acc = EventAccumulator(str(result_path.parent), size_guidance={"scalars": 0})
            acc.Reload()
            events = [(e.step, e.value) for e in acc.Scalars("charts/SPS")] if "charts/SPS" in acc.Tags()["scalars"] else []
            row["warmup_sps"], row["learning_sps"] = sps_by_phase(events, opts.learning_starts)
            row["wall_time_s"] = result.get("wall_time_s")
            row.setdefault("device", "cpu")
        rows.append(row)
        print(f"perf {name}: {row.get('note') or 'ok'}", flush=True)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    used_gpus = sorted({row["device"] for row in rows if row.get("device", "cpu") != "cpu"})
    md = [f"# benchmark.sh perf: {datetime.datetime.now():%Y-%m-%d %H:%M} on {socket.gethostname()}", "",
          f"Machine: {cpu}, {cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end; "
          f"GPU: {', '.join(used_gpus) or 'none used'}. Torch threads: "
          f"{opts.threads or 'its default (one per CPU)'}; one script at a time.",
          f"Configuration: each script's default network, `{shlex.join(config)}`. SPS: median `charts/SPS` of the log "
          "intervals wholly in the warm-up (no updates) and wholly in the learning phase. Peak RSS: "
          "the process's maximum resident set; peak GPU memory: PyTorch's allocator (allocated / reserved), without "
          "the CUDA context. Replay bytes per transition: the replay class's `bytes_per_slot()`.", "",
          "| script | device | warm-up SPS | learning SPS | peak host RSS | peak GPU memory | replay bytes / transition | wall time | note |",
          "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rss = f"{row['peak_rss_bytes'] / GiB:.2f} GiB" if "peak_rss_bytes" in row else ""
        gpu = (f"{row['peak_gpu_allocated_bytes'] / GiB:.2f} / {row['peak_gpu_reserved_bytes'] / GiB:.2f} GiB"
               if "peak_gpu_allocated_bytes" in row else "")
        replay = ", ".join(f"{v:,} ({k})" for k, v in row.get("replay_bytes_per_transition", {}).items())
        wall = f"{row['wall_time_s']:.0f} s" if row.get("wall_time_s") else ""
        md.append(f"| {row['script']} | {row.get('device', '')} | {fmt(row.get('warmup_sps'), 0)} | "
                  f"{fmt(row.get('learning_sps'), 0)} | {rss} | {gpu} | {replay} | {wall} | {row.get('note', '').replace('|', '/')} |")
    text = "\n".join(md) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.md").write_text(text)
    (out / "perf.json").write_text(json.dumps(rows, indent=1))
    print("\n" + text + f"\nwritten to {out / 'perf.md'}")
    return 1 if any("failed" in row.get("note", "") for row in rows) else 0


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def list_suites():
    for path in sorted(SUITES.glob("*.toml")):
        suite = load_suite(str(path))
        scripts = sorted({v["script"] for v in suite["variants"]})
        missing = [s for s in scripts if not (SCRIPTS / f"{s}.py").is_file()]
        count = len(suite["variants"]) * len(suite["games"]) * len(suite["seeds"])
        print(f"{suite['name']:<18} {count:>4} runs  {suite.get('description', '')}" +
              (f"  [not yet present: {', '.join(missing)}]" if missing else ""))
    return 0


def parser():
    p = argparse.ArgumentParser(prog="benchmark.sh", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def suite_args(q):
        q.add_argument("suite", help="a suite name (benchmark/suites/<name>.toml) or the path of a suite file")
        q.add_argument("--out", help="directory of the suite's runs (default: runs/benchmark/<suite>)")
        q.add_argument("--variants", nargs="+", help="only these variants")
        q.add_argument("--games", nargs="+", help="only these games")
        q.add_argument("--seeds", nargs="+", type=int, help="only these seeds")

    run = sub.add_parser("run", help="run a suite (the default command: `benchmark.sh SUITE`)")
    suite_args(run)
    run.add_argument("--flags", default="", help="extra flags for every run, after the suite's (e.g. '--no-cuda')")
    run.add_argument("--workers", type=int, help="parallel runs here (default: what CPUs, RAM and GPU memory hold)")
    run.add_argument("--dry-run", action="store_true", help="print the plan (or the sbatch script) and start nothing")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoint.pt")
    slurm = run.add_argument_group("Slurm (one array job, a task per unfinished run)")
    slurm.add_argument("--slurm", action="store_true", help="submit to Slurm instead of running here")
    slurm.add_argument("--partition", help="sbatch --partition")
    slurm.add_argument("--time", help="sbatch --time per run, e.g. 24:00:00 (runs that need longer requeue themselves)")
    slurm.add_argument("--gpus", type=int, default=0, help="GPUs per run (sbatch --gres=gpu:N)")
    slurm.add_argument("--cpus-per-task", type=int, default=2, help="CPUs per run")
    slurm.add_argument("--max-parallel", type=int, help="at most this many runs at once (array throttle %%N)")
    slurm.add_argument("--signal-grace", type=int, default=300,
                       help="seconds before the time limit at which a run checkpoints and requeues itself")
    slurm.add_argument("--sbatch-args", help="more sbatch options, e.g. '--account=x --qos=y'")
    slurm.add_argument("--wait", action="store_true", help="wait for the array job, showing progress")

    status = sub.add_parser("status", help="runs done, failed, running, queued, and ETA")
    suite_args(status)
    status.add_argument("--wait", action="store_true", help="wait until no run is queued or running")

    rep = sub.add_parser("report", help="tables, curves and checks against references; exit 1 if a run failed or a check fails")
    suite_args(rep)
    rep.add_argument("--reps", type=int, default=20_000, help="bootstrap resamples for the CIs")

    pf = sub.add_parser("perf", help="steps/s, peak memory and replay bytes per transition of each script")
    pf.add_argument("--scripts", nargs="+", default=PERF_SCRIPTS)
    pf.add_argument("--env-id", default="ALE/Breakout-v5")
    pf.add_argument("--steps", type=int, default=3000, help="--total-timesteps of each measured run")
    pf.add_argument("--learning-starts", type=int, default=1000)
    pf.add_argument("--buffer-size", type=int, default=10_000)
    pf.add_argument("--log-frequency", type=int, default=250, help="steps per charts/SPS interval")
    pf.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is available")
    pf.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the measured runs (default: torch's, one per CPU)")
    pf.add_argument("--flags", default="", help="extra flags for every measured run")
    pf.add_argument("--out", default="runs/benchmark/perf")

    sub.add_parser("list", help="the suites")
    task = sub.add_parser("task", help=argparse.SUPPRESS)  # one Slurm array task
    task.add_argument("manifest")
    task.add_argument("index", type=int)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in ("run", "status", "report", "perf", "list", "task"):
        argv.insert(0, "run")  # benchmark.sh SUITE ...
    opts = parser().parse_args(argv)
    if opts.command == "list":
        return list_suites()
    if opts.command == "task":
        return slurm_task(opts.manifest, opts.index)
    if opts.command == "perf":
        return perf(opts)
    suite = load_suite(opts.suite)
    opts.out = str(Path(opts.out or Path("runs") / "benchmark" / suite["name"]).resolve())
    runs = plan(suite, opts.out, opts.variants, opts.games, opts.seeds, getattr(opts, "flags", ""))
    if opts.command == "report":
        return report(suite, runs, opts.out, opts.reps)
    runs, parsed = resolve(runs)
    if opts.command == "status":
        if opts.wait:
            return wait_slurm(suite["name"], runs)
        progress = Progress(suite["name"], runs)
        progress.show(force=True)
        print_failures(runs, progress.states())
        return 0
    print(f"{suite['name']}: {len(runs)} runs ({len(parsed)} variants x {len({r.game for r in runs})} games x "
          f"{len({r.seed for r in runs})} seeds) in {opts.out}")
    if opts.slurm:
        return submit_slurm(suite, runs, opts)
    slots, why = worker_slots(runs, any(args.cuda for args in parsed.values()), opts.workers)
    print(why)
    if opts.dry_run:
        for run in runs:
            print(f"{run.id}: cd {run.dir} && {shlex.join(['python', str(SCRIPTS / (run.script + '.py')), *run.flags])}")
        return 0
    return run_local(suite["name"], runs, slots, opts.keep_checkpoints)


if __name__ == "__main__":
    sys.exit(main())
