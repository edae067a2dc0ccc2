"""How long a run takes to leave after SIGTERM with a full replay memory (Slurm's KillWait is 30 s by default).

    python benchmark/sigterm_exit.py                        # dqn_softmoe, 1M transitions, a checkpoint every 100k
    python benchmark/sigterm_exit.py --script der_single_expert --buffer-size 200000 --checkpoint-every 20000

The script runs with a warm-up longer than the run (random actions, no learning: the memory fills at full speed) until
the memory is full, then gets SIGTERM about `--margin` steps after a periodic checkpoint (the worst case is a signal
just before the next periodic checkpoint: --margin close to --checkpoint-every). It prints the
seconds from the signal to the process's exit, what the signal's save wrote, and the checkpoint's size on disk.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def folder_bytes(folder):
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="dqn_softmoe")
    parser.add_argument("--buffer-size", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=100_000)
    parser.add_argument("--margin", type=int, default=90_000, 
                        help="steps after the last periodic checkpoint (the speed comes from the period before)")
    parser.add_argument("--workdir", default=None, help="where the run writes (default: a temporary directory)")
    opts = parser.parse_args()
    full = opts.buffer_size + opts.checkpoint_every  # a full memory with at least one save of it behind
    full = (full // opts.checkpoint_every + 1) * opts.checkpoint_every
    stop_at = full + opts.margin
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="sigterm_exit_"))
    command = [sys.executable, str(ROOT / "cleanrl_moe" / f"{opts.script}.py"), "--no-cuda",
               "--buffer-size", str(opts.buffer_size), "--checkpoint-every", str(opts.checkpoint_every),
               "--total-timesteps", str(stop_at * 2), "--learning-starts", str(stop_at * 2 - 10)]
    print(f"$ cd {workdir} && {' '.join(command)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # progress lines come every 30 s into a pipe
        if line.startswith("step "):
            print(line.rstrip(), flush=True)
            if int(line.split("step ")[1].split("/")[0].replace(",", "")) >= full - 2 * opts.checkpoint_every:
                break
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    state_path = next(workdir.glob("runs/*/checkpoint/state.pt"))

    def wait_for_save(step):  # the time at which the periodic save at `step` is on disk
        while torch.load(state_path, weights_only=True, mmap=True)["global_step"] < step:
            time.sleep(0.1)
        return time.time()

    # the speed over the last whole checkpoint period (saves included), then about `margin` steps after the save
    before = wait_for_save(full - opts.checkpoint_every)
    saved = wait_for_save(full)
    seconds_per_step = max(saved - before, 1e-3) / opts.checkpoint_every
    time.sleep(max(0.0, opts.margin * seconds_per_step - (time.time() - saved)))
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    seconds = time.time() - start
    state = torch.load(state_path, weights_only=True, mmap=True)
    after = folder_bytes(state_path.parent)
    written = sum(p.stat().st_size for p in state_path.parent.iterdir() if p.stat().st_mtime >= start)
    report = {"script": opts.script, "buffer_size": opts.buffer_size, "checkpoint_every": opts.checkpoint_every,
              "signal_at_step": state["global_step"], "steps_since_the_periodic_save": state["global_step"] - full,
              "exit_code": code, "sigterm_to_exit_s": round(seconds, 2),
              "written_by_the_signal_mb": round(written / 1e6, 1),
              "checkpoint_size_gb": round(after / 1e9, 2), "stored_transitions": min(state["replay"]["cursor"],
                                                                                      opts.buffer_size)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
