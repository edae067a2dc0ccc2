"""What local workers, Slurm tasks, `status`, `report` and `collect` share: paths, errors, a run and the files of its
directory (status.json, log.txt, the script's result.json) or of its committed copy, its state, and the progress
line."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1]  # benchmark/: suites, CSV tables, this package
SCRIPTS = Path(os.environ.get("CLEANRL_MOE_SCRIPTS", BENCHMARK.parent / "cleanrl_moe"))
RESULTS = BENCHMARK.parent / "docs" / "results"  # committed runs: <suite>_<variant>/<game>/seed<N>/
COMMITTED_FILES = ("events.out.tfevents.*", "log.txt", "result.json")  # what `collect` copies (result.json last)
GiB = 2**30
STEP_RE = re.compile(r"step ([\d,]+)/([\d,]+)")  # the scripts' progress line


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fmt(value, digits=1):
    return "" if value is None else f"{value:,.{digits}f}"


def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


@dataclass(frozen=True)
class Run:
    variant: str
    script: str
    game: str
    seed: int
    flags: tuple  # the script's command-line flags
    dir: str
    committed: str = ""  # its committed copy, <results>/<suite>_<variant>/<game>/seed<N>: done when it holds result.json
    total_steps: int = 0  # filled in by suites.resolve()
    memory_bytes: int = 0  # host memory estimate, filled in by suites.resolve()

    @property
    def id(self):
        return f"{self.variant}/{self.game}/seed{self.seed}"


# ---------------------------------------------------------------------------------------------------------------
# The state of a run, from its directory: pending, queued, running, done, interrupted, failed, lost
# ---------------------------------------------------------------------------------------------------------------
def find_one(run_dir, name):
    return next(iter(sorted(Path(run_dir).glob(f"runs/*/{name}"))), None)


def committed_result(run):
    """The result.json of the run's committed copy, or None."""
    path = Path(run.committed) / "result.json" if run.committed else None
    return path if path and path.is_file() else None


def result_path(run):
    """The run's result.json: the script's own in the run's directory, else its committed copy's; or None."""
    return find_one(run.dir, "result.json") or committed_result(run)


def files_dir(run):
    """The folder of the run's TensorBoard events: that of its result.json, else the script's runs/<name>/ of an
    unfinished run; or None."""
    result = result_path(run)
    return result.parent if result else next(iter(sorted(Path(run.dir).glob("runs/*/"))), None)


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
    if result_path(run):  # finished here, or committed (by a session on another machine, say)
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


def load_result(run):
    with open(result_path(run)) as f:
        return json.load(f)


def run_score(result):
    """(score, source): the evaluation mean when the run has one, else the last-100 training mean."""
    if result.get("eval_return_mean") is not None:
        n = len(result.get("eval_returns") or [])
        return result["eval_return_mean"], f"eval, {n} episode{'s' if n != 1 else ''}"
    if result.get("train_return_last100") is not None:
        return result["train_return_last100"], "train, last 100 episodes"
    return None, "none"


def run_summary(run):
    """'score -9.5 (eval, 2 episodes)' from a finished run's result.json."""
    score, source = run_score(load_result(run))
    return f"score {score:.1f} ({source})" if score is not None else "no score (no episode ended)"


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


def print_done(runs, states, failed):
    """The last line of a run or a wait: how many runs are done; exit code 1 when some are not."""
    unfinished = sum(state != "done" for state in states.values())
    print(f"\n{len(runs) - unfinished}/{len(runs)} runs done" + (f", {failed} failed" if failed else ""))
    return 1 if unfinished else 0
