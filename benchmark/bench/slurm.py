"""Slurm: one array job, a task per unfinished run, each task the same start_run/finish_run as a local worker; a
task resumes from its checkpoint after a preemption or when it requeued itself at its time limit."""
import datetime
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from .common import BENCHMARK, GiB, Progress, Run, fail, print_done, print_failures, run_state, states_of, write_status
from .local import finish_run, run_env, start_run

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
export PYTHONPATH={package_dir}${{PYTHONPATH:+:$PYTHONPATH}}
exec {python} -m bench task {manifest} "$SLURM_ARRAY_TASK_ID"
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
        options="\n".join(line for line in options if line), package_dir=shlex.quote(str(BENCHMARK)),
        python=sys.executable)
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
    filters = [f"--{key} {' '.join(map(str, getattr(opts, key)))}" for key in ("variants", "games", "seeds")
               if getattr(opts, key)]
    print(f"follow with: {BENCHMARK.parent / 'benchmark.sh'} status {' '.join([opts.suite, *filters])} --wait")
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
    return print_done(runs, states, print_failures(runs, states))


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

    def on_signal(signum, _frame):
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
