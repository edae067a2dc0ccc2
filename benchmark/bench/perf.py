"""Perf: steps per second, peak memory and replay bytes per transition of each script at a fixed small configuration."""
import datetime
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from .common import SCRIPTS, GiB, fmt
from .machine import cpu_count

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

