"""Regression runs of the cleanrl-moe scripts across variants, games and seeds, locally or on Slurm (`benchmark.sh`).

    ./benchmark.sh list                          # the suites (benchmark/suites/*.toml)
    ./benchmark.sh smoke                         # run a suite here, with as many parallel runs as the machine holds
    ./benchmark.sh smoke --workers 2 --games Pong --seeds 1
    ./benchmark.sh dqn_redo --slurm --partition gpu --time 24:00:00 --gpus 1    # one Slurm array job
    ./benchmark.sh status smoke [--wait]         # runs done, failed, running, queued; ETA
    ./benchmark.sh report smoke                  # markdown table, PNG curves, checks against references (exit 1 if off)
    ./benchmark.sh collect atari100k_26          # copy finished runs into docs/results/<suite>_<variant>/ (to commit)
    ./benchmark.sh perf                          # steps/s, CPU time, peak memory, replay bytes per transition of each script
    ./benchmark.sh perf dqn_softmoe_networks --rounds 3    # variants side by side (benchmark/perf/*.toml), interleaved
    ./benchmark.sh perf --official --rounds 10   # each script's update next to Dopamine's official train step

A suite is a TOML file: games x seeds x variants, a variant being a script with its flags. Every run has its own
directory `<out>/<variant>/<game>/seed<N>/` (`<out>` = runs/benchmark/<suite>) holding `log.txt` (the run's output,
written as it comes), `status.json` (state, exit code, attempts) and the script's own `runs/<run_name>/` (TensorBoard
events, result.json, checkpoint/). Running a suite again skips finished runs, resumes interrupted ones from their
checkpoints and retries failed ones. A run's score is its evaluation mean when it has one, else its training return
over the last 100 episodes; the report says which. A run whose evidence is committed under
docs/results/<suite>_<variant>/<game>/seed<N>/ (`collect` copies it there) counts as done wherever the suite runs.
"""
import argparse
import shlex
import sys
from pathlib import Path

from .collect import collect_runs
from .common import RESULTS, SCRIPTS, Progress, find_one, print_failures
from .local import run_local, worker_slots
from .perf import PERF_SCRIPTS, perf
from .report import report
from .slurm import slurm_task, submit_slurm, wait_slurm
from .suites import list_suites, load_suite, plan, resolve


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
        q.add_argument("--results", default=str(RESULTS), help="where finished runs are committed, each in "
                       "<results>/<suite>_<variant>/<game>/seed<N>/, which counts as done (default: %(default)s)")

    run = sub.add_parser("run", help="run a suite (the default command: `benchmark.sh SUITE`)")
    suite_args(run)
    run.add_argument("--flags", default="", help="extra flags for every run, after the suite's (e.g. '--no-cuda')")
    run.add_argument("--workers", type=int, help="parallel runs here (default: what CPUs, RAM and GPU memory hold)")
    run.add_argument("--dry-run", action="store_true", help="print the plan (or the sbatch script) and start nothing")
    run.add_argument("--keep-checkpoints", action="store_true", help="keep finished runs' checkpoint folders")
    run.add_argument("--threads", type=positive_int, help="OMP_NUM_THREADS of each run here (default: CPUs / workers); 1 "
                     "leaves CPUs free for other work beside the suite")
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

    rep = sub.add_parser("report", help="tables, curves and checks against references; exit 1 if a run failed or a "
                         "check fails")
    suite_args(rep)
    rep.add_argument("--reps", type=int, default=20_000, help="bootstrap resamples for the CIs")
    rep.add_argument("--report-dir", help="where report.md and the PNGs go (default: <results>/<suite>_<variant>/ "
                     "when one variant is selected and that folder exists, else <out>)")

    col = sub.add_parser("collect", help="copy every finished run's result.json, TensorBoard events and log.txt "
                         "into <results>/<suite>_<variant>/<game>/seed<N>/, to be committed")
    suite_args(col)

    pf = sub.add_parser("perf", help="steps/s, CPU time and peak memory of each script, or of named variants side by side")
    pf.add_argument("file", nargs="?", help="variants to compare: benchmark/perf/<name>.toml or the path of such a file")
    pf.add_argument("--variant", action="append", metavar="'NAME SCRIPT [FLAGS...]'",
                    help="a variant to compare (repeatable); SCRIPT: a cleanrl_moe script's name or a .py path")
    pf.add_argument("--cleanrl", metavar="PATH", help="also CleanRL's dqn_atari.py (patched for gymnasium 1.x) at the "
                    "flags it shares: env id, seed, steps, learning starts, buffer size, train frequency; epsilon 0.01 "
                    "from the first learning step, as the DQN scripts here")
    pf.add_argument("--rounds", type=int, default=1, help="measure every variant this many times, interleaved")
    pf.add_argument("--scripts", nargs="+", default=PERF_SCRIPTS, help="the scripts measured without FILE or --variant")
    pf.add_argument("--env-id", default="ALE/Breakout-v5")
    pf.add_argument("--steps", type=int, default=3000, help="--total-timesteps of each measured run")
    pf.add_argument("--learning-starts", type=int, default=1000)
    pf.add_argument("--buffer-size", type=int, default=10_000)
    pf.add_argument("--log-frequency", type=int, default=250, help="steps per charts/SPS interval")
    pf.add_argument("--train-frequency", type=int, help="--train-frequency of every variant (default: each script's)")
    pf.add_argument("--cpu", action="store_true", help="measure on the CPU even when a GPU is available")
    pf.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the measured runs (default: torch's, one per CPU)")
    pf.add_argument("--flags", default="", help="extra flags for every measured run (not CleanRL's)")
    pf.add_argument("--out", default="runs/benchmark/perf")
    off = pf.add_argument_group("--official (benchmark/bench/official.py; needs the official extra and dopamine-rl)")
    off.add_argument("--official", action="store_true", help="instead: one update of each script next to the "
                     "official Dopamine train function on the same weights and batch (same loss and gradients?), and "
                     "the CPU time per update of both, one thread, interleaved over --rounds (on a GPU, where torch "
                     "and JAX both see one and --cpu is not given: the wall time per update); writes "
                     "perf-official.md/json to --out")
    off.add_argument("--official-configs", nargs="+", metavar="NAME", help="only these configurations (default: all)")
    off.add_argument("--updates", type=int, default=2, help="updates per side and round")
    off.add_argument("--batch-size", type=int, default=32)

    sc = sub.add_parser("scaling", help="CPU time per update with a small and a full replay memory, side by side")
    sc.add_argument("--scripts", nargs="+", default=["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"])
    sc.add_argument("--sizes", nargs="+", type=int, default=[20_000, 1_000_000], help="transitions stored")
    sc.add_argument("--rounds", type=int, default=20, help="interleaved rounds per size")
    sc.add_argument("--updates", type=int, default=8, help="updates per round")

    sub.add_parser("list", help="the suites")
    task = sub.add_parser("task", help=argparse.SUPPRESS)  # one Slurm array task
    task.add_argument("manifest")
    task.add_argument("index", type=int)
    return p


def positive_int(text):
    """An argparse type: an integer of at least 1 (argparse names the flag in its error line)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1; e.g. 1")
    return int(text)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in ("run", "status", "report", "collect", "perf",
                                                                 "scaling", "list", "task"):
        argv.insert(0, "run")  # benchmark.sh SUITE ...
    opts = parser().parse_args(argv)
    if opts.command == "list":
        return list_suites()
    if opts.command == "task":
        return slurm_task(opts.manifest, opts.index)
    if opts.command == "perf" and opts.official:
        from .official import official

        return official(opts)
    if opts.command == "perf":
        return perf(opts)
    if opts.command == "scaling":
        from .scaling import scaling

        return scaling(opts)
    suite = load_suite(opts.suite)
    opts.out = str(Path(opts.out or Path("runs") / "benchmark" / suite["name"]).resolve())
    runs = plan(suite, opts.out, opts.variants, opts.games, opts.seeds, getattr(opts, "flags", ""), opts.results)
    if opts.command == "collect":
        return collect_runs(runs)
    if opts.command == "report":
        variants = {run.variant for run in runs}
        committed = Path(opts.results) / f"{suite['name']}_{variants.pop()}" if len(variants) == 1 else None
        to = opts.report_dir or (committed if committed and committed.is_dir() else opts.out)
        return report(suite, runs, to, opts.reps, runs_dir=opts.out)
    runs, parsed = resolve(runs)
    if opts.command == "status":
        if opts.wait:
            return wait_slurm(suite["name"], runs)
        progress = Progress(suite["name"], runs)
        progress.show(force=True)
        states = progress.states()
        committed = sum(state == "done" and not find_one(run.dir, "result.json") for run, state in states.items())
        if committed:
            print(f"{committed} of the done runs are committed under {opts.results}, not in {opts.out}")
        print_failures(runs, states)
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
    return run_local(suite["name"], runs, slots, opts.keep_checkpoints, opts.threads)
