"""Step 3 of benchmark/gpu_check.sh: what a real run does and the check's other steps do not, per script, tiny.

    python benchmark/gpu_real_runs.py RESULTS WORK [--dry]

Each script runs with --cuda-graphs (off by itself without CUDA), statistics probes and a periodic checkpoint, gets
SIGTERM after its first checkpoint, in training, then resumes from the folder that it printed, to the end and its one
evaluation episode. dqn_redo runs at --replay-ratio 1 (an update every step) and an eager run of the same flags,
uninterrupted, must end with the same parameters and losses. The scripts run side by side, one per CPU (up to 5);
a line per script is appended to RESULTS as soon as it is known, and the runs' logs stay in WORK/real_<script>/."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"]
# tiny networks, as tests/test_runs.py; the evaluation needs --save-model except in der_single_expert
SMALL = {
    "dqn_softmoe": ["--num-experts", 2, "--expert-hidden-units", 16, "--batch-size", 8, "--save-model"],
    "dqn_redo": ["--redo-period", 10, "--batch-size", 8, "--save-model", "--replay-ratio", 1],
    "rainbow_tokenized": ["--encoder", "nature", "--num-experts", 2, "--expert-hidden-units", 16, "--batch-size", 8,
                          "--save-model"],
    "der_single_expert": ["--encoder", "der", "--batch-size", 8, "--noop-max", 5],
}
STEPS = 1000  # the signal comes at the first checkpoint, at step 150: a GPU run has 850 steps left to be stopped in


def flags(script, steps, graphs=True):
    return [str(flag) for flag in [
        "--total-timesteps", steps, "--learning-starts", 100, "--buffer-size", 1000, "--max-episode-steps", 120,
        "--log-frequency", 50, "--stats-frequency", 50, "--stats-batch-size", 16, "--checkpoint-every", 150,
        "--eval-episodes", 1, *(["--cuda-graphs"] if graphs else []), *SMALL[script]]]


def start(script, args, cwd, log):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(ROOT / "cleanrl_moe" / f"{script}.py"), *args], cwd=cwd,
                            stdout=open(cwd / log, "w"), stderr=subprocess.STDOUT, env=env)


def tail(path, lines=4):
    return " / ".join(Path(path).read_text(errors="replace").strip().splitlines()[-lines:])


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def interrupted_and_resumed(script, work, steps):
    """(passed, one line): the run stopped by SIGTERM after its first checkpoint, resumed to the end."""
    began, cwd = time.time(), work / f"real_{script}"
    cwd.mkdir(parents=True)
    proc = start(script, flags(script, steps), cwd, "first.log")
    while not list(cwd.glob("runs/*/checkpoint/state.pt")):
        if proc.poll() is not None:
            return False, f"exited ({proc.returncode}) before its first checkpoint: {tail(cwd / 'first.log')}"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    if proc.wait(timeout=60) != 143:
        return False, f"SIGTERM: exit code {proc.returncode}, not 143: {tail(cwd / 'first.log')}"
    first = (cwd / "first.log").read_text(errors="replace")
    stop = re.search(r"SIGTERM at step ([\d,]+): checkpoint saved; resume with\n\s*python \S+ --resume (\S+)", first)
    if not stop:
        return False, f"no resume line after SIGTERM: {tail(cwd / 'first.log')}"
    stopped_at, folder = int(stop.group(1).replace(",", "")), stop.group(2)
    if not 100 < stopped_at < steps:
        return False, f"SIGTERM at step {stopped_at}, not in training (steps 101 to {steps - 1})"
    resumed = start(script, ["--resume", folder], cwd, "resumed.log")
    if resumed.wait(timeout=120) != 0:
        return False, f"--resume {folder}: exit code {resumed.returncode}: {tail(cwd / 'resumed.log')}"
    run_dir = (cwd / folder).parent
    result = json.loads((run_dir / "result.json").read_text())
    device = re.search(r"parameters on (\w+), replay memory on (\w+)", first)
    problems = [f"result.json: {result['steps']} steps, not {steps}"] * (result["steps"] != steps)
    problems += [f"{len(result['eval_returns'])} evaluation episodes, not 1"] * (len(result["eval_returns"]) != 1)
    problems += ["no statistics (dormant/tau0_pct) logged"] * (not scalars(run_dir, "dormant/tau0_pct"))
    graphs = "on" if device and device.group(1) == device.group(2) == "cuda" else "off"
    on = f"on {device.group(1)}, replay memory on {device.group(2)}" if device else "device not printed"
    line = (f"{on}, CUDA graphs {graphs}; SIGTERM at step {stopped_at:,}, resumed from {folder} to step {result['steps']:,}, "
            f"evaluation return {result['eval_returns'][0] if result['eval_returns'] else '-'}; "
            f"{time.time() - began:.0f} s")
    return not problems, "; ".join(problems) + (": " if problems else "") + line


def eager_run(work, steps):
    """(passed, one line): dqn_redo at the same flags without --cuda-graphs, uninterrupted: the reference."""
    cwd = work / "real_dqn_redo_eager"
    cwd.mkdir(parents=True)
    if start("dqn_redo", flags("dqn_redo", steps, graphs=False), cwd, "eager.log").wait(timeout=120) != 0:
        return False, f"exit code not 0: {tail(cwd / 'eager.log')}"
    return True, "ran"


def graphed_against_eager(work):
    """(passed, one line): dqn_redo's graphed run (interrupted, resumed) against the eager one."""
    runs = [next((work / name).glob("runs/*/")) for name in ("real_dqn_redo", "real_dqn_redo_eager")]
    states = [torch.load(run / "checkpoint" / "state.pt", weights_only=True)["q_network"] for run in runs]
    worst = max(float((states[0][k].float() - states[1][k].float()).abs().max()) for k in states[1])
    close = all(torch.allclose(states[0][k].float(), states[1][k].float(), rtol=1e-3, atol=1e-4) for k in states[1])
    losses = [torch.tensor(scalars(run, "losses/td_loss")) for run in runs]
    same_losses = len(losses[0]) == len(losses[1]) > 0 and torch.allclose(losses[0], losses[1], rtol=1e-3, atol=1e-6)
    return close and same_losses, (f"final parameters {'match' if close else 'DIFFER'} (largest difference "
                                   f"{worst:.2e}), {len(losses[1])} logged TD losses {'match' if same_losses else 'DIFFER'}")


def checked(function, *args):
    try:
        return function(*args)
    except Exception as error:  # a failed check, not a crash of the others
        return False, f"{type(error).__name__}: {error}"


def main():
    results, work = Path(sys.argv[1]), Path(sys.argv[2])
    steps = 300 if "--dry" in sys.argv else STEPS
    results.write_text(f"# real runs ({steps} steps; CUDA available: {torch.cuda.is_available()}): --cuda-graphs, "
                       "statistics, a checkpoint, SIGTERM, --resume, an evaluation episode\n")
    outcomes = {}

    def record(name, outcome):
        outcomes[name] = outcome
        line = f"{name}: {'pass' if outcome[0] else 'FAIL'}: {outcome[1]}"
        with open(results, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)

    with ThreadPoolExecutor(min(5, len(os.sched_getaffinity(0)))) as pool:
        jobs = {pool.submit(checked, interrupted_and_resumed, script, work, steps): script for script in SCRIPTS}
        jobs[pool.submit(checked, eager_run, work, steps)] = "dqn_redo eager"
        for job in as_completed(jobs):
            if jobs[job] == "dqn_redo eager":
                outcomes["dqn_redo eager"] = job.result()
            else:
                record(jobs[job], job.result())
    eager = outcomes["dqn_redo eager"]
    record("dqn_redo graphed against eager", checked(graphed_against_eager, work) if outcomes["dqn_redo"][0] and eager[0]
           else (False, "not compared: " + ("the graphed run failed" if eager[0] else f"the eager run failed: {eager[1]}")))
    return 0 if all(passed for passed, _ in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
