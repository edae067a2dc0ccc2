"""Runs here: N at a time (default: what the CPUs, RAM and GPU memory hold), each fresh or resumed from its
checkpoint, its output streaming to log.txt; Ctrl-C or SIGTERM stops them with a checkpoint. A Slurm task starts and
finishes its run with the same start_run and finish_run."""
import datetime
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import (SCRIPTS, GiB, Progress, find_one, format_seconds, print_done, print_failures, read_status,
                     run_summary, states_of, write_status)
from .machine import available_ram_bytes, cpu_count, gpus
from .suites import RUN_OVERHEAD_BYTES

# GPU memory of one run besides its replay memory (the reserve that the scripts' place_replay keeps free)
GPU_RUN_OVERHEAD_BYTES = 2 * GiB


# ---------------------------------------------------------------------------------------------------------------
# One run: fresh, or resumed from its checkpoint; output streams to log.txt as it is written
# ---------------------------------------------------------------------------------------------------------------
def run_env(threads, gpu=None):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def code_version(script):
    """The commit the scripts run from, and whether `script` differs from it: each run's log names the code it ran."""
    git = lambda *a: subprocess.run(["git", *a], cwd=script.parent, capture_output=True, text=True)  # noqa: E731
    commit = git("rev-parse", "HEAD").stdout.strip() or "unknown (not a git checkout)"
    modified = git("diff", "--quiet", "HEAD", "--", script.name).returncode == 1
    return f"commit {commit}" + (f", {script.name} modified since" if modified else "")


def start_run(run, env, slurm_job=None):
    run_dir = Path(run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = find_one(run_dir, "checkpoint/state.pt")
    checkpoint = checkpoint and checkpoint.parent  # the script's checkpoint folder: state.pt and replay segments
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
                  f"# code: {code_version(SCRIPTS / f'{run.script}.py')}; OMP_NUM_THREADS={env.get('OMP_NUM_THREADS')}\n"
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
        checkpoint = find_one(run.dir, "checkpoint/state.pt")
        if checkpoint and not keep_checkpoints:  # up to 7 GB each with a 1M replay memory; its state.pt, the final
            checkpoint.replace(checkpoint.parents[1] / "final_state.pt")  # networks, stays for benchmark/probe_eval.py
            shutil.rmtree(checkpoint.parent)
    elif exit_code in (143, -signal.SIGTERM, 130, -signal.SIGINT):
        state = "interrupted"
    else:
        state = "failed"
    write_status(run.dir, state=state, exit_code=exit_code, ended=time.time())
    return state


# ---------------------------------------------------------------------------------------------------------------
# N runs at a time, default = what the machine holds (CPU cores, RAM, GPU memory)
# ---------------------------------------------------------------------------------------------------------------
def worker_slots(runs, uses_cuda, workers=None):
    """[(gpu index or None)] per parallel worker, and the reason for their number."""
    cpus = cpu_count()
    per_run = max(run.memory_bytes for run in runs)
    free_ram = available_ram_bytes()
    by_ram = max(1, int((free_ram - GiB) // per_run))
    limits = [cpus, by_ram]
    why = f"{cpus} CPUs, {free_ram / GiB:.1f} GiB RAM free / {per_run / GiB:.1f} GiB per run = {by_ram}"
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


def run_local(name, runs, slots, keep_checkpoints=False, threads=None):
    """Run the unfinished runs, len(slots) at a time, each with `threads` torch threads (default: the CPUs shared
    out); Ctrl-C or SIGTERM stops them with a checkpoint."""
    states = states_of(runs)
    todo = [run for run in runs if states[run] not in ("done", "running", "queued")]
    for run in runs:
        if states[run] in ("running", "queued"):
            status = read_status(run.dir)
            where = f"Slurm job {status['slurm_job']}" if status.get("slurm_job") else f"pid {status.get('pid')}"
            print(f"{run.id} is already {states[run]} ({where}): not started here")
    if len(todo) < len(runs):
        committed = sum(states[run] == "done" and not find_one(run.dir, "result.json") for run in runs)
        print(f"{sum(s == 'done' for s in states.values())} of {len(runs)} runs already done: skipped" +
              (f" ({committed} of them committed under {Path(runs[0].committed).parents[2]})" if committed else ""))
    threads = threads or max(1, cpu_count() // max(1, len(slots)))
    stop = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: stop.append(signum)) for sig in (signal.SIGINT, signal.SIGTERM)}
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
                resumed = find_one(run.dir, "checkpoint/state.pt") is not None
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
    return print_done(runs, final, failed)
