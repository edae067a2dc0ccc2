"""Perf: steps per second, CPU time and peak memory of scripts, or of named variants of them side by side, at one
small configuration; the variants run one at a time, interleaved (A B A B ...) over --rounds."""
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import BENCHMARK, SCRIPTS, GiB, fail, fmt
from .machine import cpu_count

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PERF_DIR = BENCHMARK / "perf"  # variant files: ./benchmark.sh perf NAME
PERF_SCRIPTS = ["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"]
# flags that make a script's measured run act as a long run does, and keep it to its training. The DQN scripts decay
# epsilon from 1 to 0.01 over the 250,000 steps after the warm-up (Dopamine's schedule), so a short run would almost
# never run the acting forward pass, which a long run runs at 99% of its steps: --exploration-steps 1 puts epsilon at
# end-e from the first learning step, as CleanRL's run (`cleanrl_variant`). The Rainbow scripts act greedily on
# noisy networks every step anyway; der_single_expert evaluates 100 episodes after every run.
PERF_SCRIPT_FLAGS = {"dqn_softmoe": ["--exploration-steps", "1"], "dqn_redo": ["--exploration-steps", "1"],
                     "der_single_expert": ["--eval-episodes", "0"]}
# runs a script as __main__ in this process (as `python script.py`), then records its replay bytes per transition
# and, when it used CUDA, PyTorch's peak GPU memory (the GPU hook: any torch script, no print or log needed)
PERF_WRAPPER = """
import json, os, runpy, sys
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
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
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        stats["device"] = torch.cuda.get_device_name()
        stats["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        stats["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    with open(os.environ["BENCH_PERF_STATS"], "w") as f:
        json.dump(stats, f)
sys.exit(code)
"""


# ---------------------------------------------------------------------------------------------------------------
# Variants: the scripts (default), a TOML file, --variant, --cleanrl
# ---------------------------------------------------------------------------------------------------------------
def script_path(script):
    """cleanrl_moe/<script>.py, or a path to any .py file (a modified copy, CleanRL's dqn_atari.py)."""
    return Path(script).resolve() if script.endswith(".py") else SCRIPTS / f"{script}.py"


def variant(name, script, flags, config):
    """A variant's name, script and flags: perf's configuration, the script's perf flags, then its own."""
    path = script_path(script)
    return {"name": name, "path": path, "flags": [*config, *PERF_SCRIPT_FLAGS.get(path.stem, []), *flags]}


def load_variants(name, config):
    """The variants of benchmark/perf/<name>.toml, or of a TOML file by path: `flags` (optional) for every variant,
    then `variants = [{ name, script, flags }]`, each variant's flags after those."""
    path = Path(name) if name.endswith(".toml") else PERF_DIR / f"{name}.toml"
    if not path.is_file():
        fail(f"no perf variants file {name!r}; the ones in {PERF_DIR}: "
             f"{', '.join(sorted(p.stem for p in PERF_DIR.glob('*.toml'))) or 'none'}")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    entries = data.get("variants")
    if not entries or not all(isinstance(v, dict) and {"name", "script"} <= set(v) <= {"name", "script", "flags"}
                              for v in entries):
        fail(f"{path}: `variants` must be a non-empty list of {{ name, script, flags }}")
    return [variant(v["name"], v["script"], [*shlex.split(data.get("flags", "")), *shlex.split(v.get("flags", ""))],
                    config) for v in entries]


def cleanrl_variant(path, opts):
    """CleanRL's dqn_atari.py at the flags it shares with the configuration: the same game as <game>NoFrameskip-v4
    (its wrappers skip frames themselves), seed, steps, learning starts, buffer size, train frequency, device; and an
    exploration fraction that brings its epsilon to end-e (0.01) at the first learning step, as PERF_SCRIPT_FLAGS
    does for the DQN scripts: both run the acting forward pass at 99% of the learning steps."""
    match = re.fullmatch(r"ALE/(\w+)-v5", opts.env_id)
    if not match:
        fail(f"--cleanrl needs an --env-id of the form ALE/<Game>-v5 (CleanRL runs <Game>NoFrameskip-v4), got {opts.env_id}")
    flags = ["--env-id", f"{match.group(1)}NoFrameskip-v4", "--seed", "1", "--total-timesteps", str(opts.steps),
             "--learning-starts", str(opts.learning_starts), "--buffer-size", str(opts.buffer_size),
             "--exploration-fraction", str(max(opts.learning_starts, 1) / opts.steps),  # CleanRL divides by it
             *(["--train-frequency", str(opts.train_frequency)] if opts.train_frequency else []),
             *(["--no-cuda"] if opts.cpu else [])]
    return {"name": "cleanrl_dqn_atari", "path": Path(path).resolve(), "flags": flags}


def variants_of(opts, config):
    found = load_variants(opts.file, config) if opts.file else []
    for text in opts.variant or []:
        words = shlex.split(text)
        if len(words) < 2:
            fail(f"--variant {text!r}: give 'NAME SCRIPT [FLAGS...]', e.g. --variant 'e1 dqn_softmoe --num-experts 1'")
        found.append(variant(words[0], words[1], words[2:], config))
    if not found:
        found = [variant(name, name, [], config) for name in opts.scripts]
    if opts.cleanrl:
        found.append(cleanrl_variant(opts.cleanrl, opts))
    names = [v["name"] for v in found]
    if len(set(names)) < len(names):
        fail(f"perf variant names repeat: {names}")
    return found


# ---------------------------------------------------------------------------------------------------------------
# One measured process: its CPU time sampled from /proc while it runs, its rusage at exit, its SPS events
# ---------------------------------------------------------------------------------------------------------------
def measure(argv, work, env, poll=0.05):
    """Run argv in work/ (output to work/log.txt). Returns its exit code, wall seconds, peak RSS in bytes and
    [(time, user + sys CPU seconds)] read from /proc/<pid>/stat every `poll` seconds while it ran."""
    ticks = os.sysconf("SC_CLK_TCK")
    samples = []
    with open(work / "log.txt", "w") as log:
        start = time.time()
        proc = subprocess.Popen(argv, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            try:
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # fields 14 and 15: utime, stime in clock ticks
                samples.append((time.time(), (int(fields[11]) + int(fields[12])) / ticks))
            except (OSError, IndexError):
                pass
            time.sleep(poll)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    return proc.returncode, time.time() - start, usage.ru_maxrss * 1024, samples


def sps_events(work):
    """[(step, wall time)] of the charts/SPS events that the script wrote below work/runs/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = next(iter(sorted(work.glob("runs/*/"))), None)
    if run_dir is None:
        return []
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.wall_time) for e in acc.Scalars("charts/SPS")] if "charts/SPS" in acc.Tags()["scalars"] else []


def phase_stats(events, learning_starts, cpu):
    """(warm-up SPS, learning SPS, CPU seconds per 1,000 learning steps). Two consecutive charts/SPS events at steps
    p < g, written at wall times t0 < t1, bracket a log interval: the steps p+1 ... g in t1 - t0 seconds. SPS is the
    median over the intervals wholly in the warm-up (g <= learning_starts) or wholly in the learning phase
    (p >= learning_starts: the scripts update at the steps after learning_starts); CPU time is summed over the
    learning intervals, from the [(time, CPU seconds)] samples interpolated at their ends. Rates from wall times
    rather than the logged values: CleanRL logs an average since its start."""
    warmup, learning, steps, seconds = [], [], 0, 0.0
    times, used = zip(*cpu) if cpu else ((), ())
    for (p, t0), (g, t1) in zip(events, events[1:]):
        if g <= learning_starts:
            warmup.append((g - p) / (t1 - t0))
        elif p >= learning_starts:
            learning.append((g - p) / (t1 - t0))
            steps += g - p
            if cpu:
                seconds += np.interp(t1, times, used) - np.interp(t0, times, used)
    return (float(np.median(warmup)) if warmup else None, float(np.median(learning)) if learning else None,
            1000 * seconds / steps if cpu and steps else None)


def run_once(entry, work, env, learning_starts):
    """One round of one variant: its command, exit code, SPS, CPU time, memory, or why it failed."""
    work.mkdir(parents=True)
    command = [str(entry["path"]), *entry["flags"]]
    code, wall, rss, cpu = measure([sys.executable, "-c", PERF_WRAPPER, *command], work,
                                   {**env, "BENCH_PERF_STATS": str(work / "stats.json")})
    row = {"command": shlex.join(command), "exit_code": code, "wall_time_s": wall, "peak_rss_bytes": rss}
    if (work / "stats.json").is_file():
        row.update(json.loads((work / "stats.json").read_text()))
    events = sps_events(work)
    if code != 0 or len(events) < 2:
        tail = (work / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        why = f"exit code {code}" if code else "fewer than 2 charts/SPS events"
        row["note"] = f"failed ({why}): " + " / ".join(tail)
        return row
    row["warmup_sps"], row["learning_sps"], row["cpu_s_per_1000_learning_steps"] = phase_stats(events, learning_starts, cpu)
    row.setdefault("device", "cpu")
    return row


# ---------------------------------------------------------------------------------------------------------------
# The comparison: every variant once per round, medians over rounds
# ---------------------------------------------------------------------------------------------------------------
def summary(name, rounds):
    """A variant's row: medians over its measured rounds (SPS, CPU, wall time), maxima (memory), the first failure."""
    ok = [r for r in rounds if "note" not in r]
    row = {"variant": name, "command": rounds[0]["command"], "rounds": rounds,
           "exit_code": next((r["exit_code"] for r in rounds if r["exit_code"]), 0)}
    for key in ("warmup_sps", "learning_sps", "cpu_s_per_1000_learning_steps", "wall_time_s"):
        values = [r[key] for r in ok if r.get(key) is not None]
        row[key] = float(np.median(values)) if values else None
        if values:
            row[key + "_range"] = [min(values), max(values)]
    for key in ("peak_rss_bytes", "peak_gpu_allocated_bytes", "peak_gpu_reserved_bytes"):
        if any(key in r for r in rounds):
            row[key] = max(r.get(key, 0) for r in rounds)
    for key in ("device", "replay_bytes_per_transition"):
        if any(key in r for r in ok):
            row[key] = next(r[key] for r in ok if key in r)
    failed = [r["note"] for r in rounds if "note" in r]
    if failed:
        row["note"] = f"{len(failed)} of {len(rounds)} rounds " + failed[0]
    return row


def cell(row, key, digits):
    """'305' or, over several rounds, '305 (298-310)': the median and the range."""
    if row.get(key) is None:
        return ""
    low, high = row[key + "_range"]
    return fmt(row[key], digits) + (f" ({fmt(low, digits)}-{fmt(high, digits)})" if len(row["rounds"]) > 1 else "")


def perf(opts):
    if opts.rounds < 1:
        fail(f"--rounds {opts.rounds}: must be at least 1")
    out = Path(opts.out).resolve()  # the runs' working directories are below it
    config = ["--env-id", opts.env_id, "--seed", "1", "--total-timesteps", str(opts.steps),
              "--learning-starts", str(opts.learning_starts), "--buffer-size", str(opts.buffer_size),
              "--log-frequency", str(opts.log_frequency),
              *(["--train-frequency", str(opts.train_frequency)] if opts.train_frequency else []),
              *(["--no-cuda"] if opts.cpu else []), *shlex.split(opts.flags)]
    variants = variants_of(opts, config)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if opts.threads:
        env.update(OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    load_before = os.getloadavg()[0]
    present = [v for v in variants if v["path"].is_file()]
    for v in variants:
        shutil.rmtree(out / v["name"], ignore_errors=True)
        if v not in present:
            print(f"perf {v['name']}: {v['path']} not present: skipped", flush=True)
    rounds = {v["name"]: [] for v in present}
    for k in range(1, opts.rounds + 1):
        for v in present:  # interleaved: a slow spell of the machine hits every variant alike
            print(f"perf round {k}/{opts.rounds} {v['name']}", flush=True)
            row = run_once(v, out / v["name"] / f"round{k}", env, opts.learning_starts)
            rounds[v["name"]].append(row)
            print(f"perf round {k}/{opts.rounds} {v['name']}: {row.get('note') or 'ok'}", flush=True)
    rows = [summary(v["name"], rounds[v["name"]]) if v in present else
            {"variant": v["name"], "command": str(v["path"]), "rounds": [], "note": "not present yet: skipped"}
            for v in variants]

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    used_gpus = sorted({row["device"] for row in rows if row.get("device", "cpu") != "cpu"})
    md = [f"# benchmark.sh perf: {datetime.datetime.now():%Y-%m-%d %H:%M} on {socket.gethostname()}", "",
          f"Machine: {cpu}, {cpu_count()} CPUs, load average {load_before:.1f} at the start and "
          f"{os.getloadavg()[0]:.1f} at the end; GPU: {', '.join(used_gpus) or 'none used'}. Torch threads: "
          f"{opts.threads or 'its default (one per CPU)'}; one process at a time, {opts.rounds} round(s), the variants "
          "interleaved.",
          f"Configuration: `{shlex.join(config)}`, then each variant's flags (CleanRL: the flags it shares). Acting: "
          "epsilon 0.01 from the first learning step in the DQN scripts and CleanRL (PERF_SCRIPT_FLAGS), as in a long "
          "run; the Rainbow scripts act on noisy networks at every step. SPS: median over the log intervals wholly in "
          "the warm-up (no updates) and wholly in the learning phase, each from the steps and wall times of two "
          "consecutive `charts/SPS` events. CPU: user + sys seconds of the process per "
          "1,000 learning steps, over the same learning intervals. Several rounds: the median, and the range in "
          "brackets. Peak RSS: the process's maximum resident set (its rusage); peak GPU memory: PyTorch's allocator "
          "(allocated / reserved), without the CUDA context. Replay bytes per transition: the replay class's "
          "`bytes_per_slot()`.", "",
          "| variant | device | warm-up SPS | learning SPS | CPU s / 1k learning steps | peak host RSS | peak GPU memory "
          "| replay bytes / transition | wall time | note |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rss = f"{row['peak_rss_bytes'] / GiB:.2f} GiB" if "peak_rss_bytes" in row else ""
        gpu = (f"{row['peak_gpu_allocated_bytes'] / GiB:.2f} / {row['peak_gpu_reserved_bytes'] / GiB:.2f} GiB"
               if "peak_gpu_allocated_bytes" in row else "")
        replay = ", ".join(f"{v:,} ({k})" for k, v in row.get("replay_bytes_per_transition", {}).items())
        wall = f"{row['wall_time_s']:.0f} s" if row.get("wall_time_s") else ""
        md.append(f"| {row['variant']} | {row.get('device', '')} | {cell(row, 'warmup_sps', 0)} | "
                  f"{cell(row, 'learning_sps', 0)} | {cell(row, 'cpu_s_per_1000_learning_steps', 1)} | {rss} | {gpu} | "
                  f"{replay} | {wall} | {row.get('note', '').replace('|', '/')} |")
    md += ["", "Commands (in `<out>/<variant>/round<N>/`):", ""]
    md += [f"- {row['variant']}: `python {row['command']}`" for row in rows if row["rounds"]]
    text = "\n".join(md) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "perf.md").write_text(text)
    (out / "perf.json").write_text(json.dumps(rows, indent=1))
    print("\n" + text + f"\nwritten to {out / 'perf.md'}")
    return 1 if any("failed" in row.get("note", "") for row in rows) else 0
