"""How long a run takes to leave after SIGTERM with a full replay memory (Slurm kills 30 s after SIGTERM by default).

    python benchmark/sigterm_exit.py                                   # dqn_softmoe, 1M transitions, no periodic save
    python benchmark/sigterm_exit.py --checkpoint-every 1000000        # a periodic save at 1M, the signal after it
    python benchmark/sigterm_exit.py --script der_single_expert --buffer-size 100000

The script runs with a warm-up longer than the run (random actions, no learning: the memory fills at full speed) until
the memory holds --buffer-size transitions, goes on for --margin more steps (the partial replay segment that the
signal's save writes grows with them: just under a segment's 50,000 slots is the worst case), then gets SIGTERM. It
prints the seconds from the signal to the process's exit, what the signal's save wrote, and the checkpoint's size.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", default="dqn_softmoe")
    parser.add_argument("--buffer-size", type=int, default=1_000_000)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--margin", type=int, default=45_000, help="steps after the memory is full")
    parser.add_argument("--workdir", default=None, help="where the run writes (default: a temporary directory)")
    opts = parser.parse_args()
    stop_at = opts.buffer_size + opts.margin
    workdir = Path(opts.workdir or tempfile.mkdtemp(prefix="sigterm_exit_"))
    command = [sys.executable, str(ROOT / "cleanrl_moe" / f"{opts.script}.py"), "--no-cuda",
               "--buffer-size", str(opts.buffer_size), "--checkpoint-every", str(opts.checkpoint_every),
               "--total-timesteps", str(stop_at * 2), "--learning-starts", str(stop_at * 2 - 10)]
    print(f"$ cd {workdir} && {' '.join(command)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    step, last = 0, (time.time(), 0)
    for line in proc.stdout:  # progress lines come every 30 s into a pipe
        if line.startswith("step "):
            print(line.rstrip(), flush=True)
            now, step = time.time(), int(line.split("step ")[1].split("/")[0].replace(",", ""))
            speed = (step - last[1]) / max(now - last[0], 1e-9)
            last = (now, step)
            if step + 30 * speed >= stop_at:  # the next progress line would come too late
                break
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    time.sleep(max(0.0, (stop_at - step) / max(speed, 1e-9)))
    start = time.time()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait()
    seconds = time.time() - start
    folder = next(workdir.glob("runs/*/checkpoint"))
    state = torch.load(folder / "state.pt", weights_only=True, mmap=True)
    files = [p for p in folder.iterdir() if p.is_file()]
    written = sum(p.stat().st_size for p in files if p.stat().st_mtime >= start)
    report = {"script": opts.script, "buffer_size": opts.buffer_size, "checkpoint_every": opts.checkpoint_every,
              "signal_at_step": state["global_step"], "exit_code": code, "sigterm_to_exit_s": round(seconds, 2),
              "written_by_the_signal_mb": round(written / 1e6, 1),
              "checkpoint_size_gb": round(sum(p.stat().st_size for p in files) / 1e9, 2),
              "stored_transitions": min(state["replay"]["cursor"], opts.buffer_size),
              "segments": len(state["replay"]["segments"])}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
