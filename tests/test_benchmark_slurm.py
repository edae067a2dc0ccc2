"""benchmark.sh --slurm against a real Slurm: one array job for the smoke suite, a task stopped by the time-limit
signal (SIGUSR1) checkpoints, requeues itself and resumes. Skipped, with the reason, when no Slurm answers here
(`sudo benchmark/start_local_slurm.sh` starts a one-node cluster on Debian/Ubuntu)."""
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_benchmark import TINY, bench, common, suites


def slurm_unavailable():
    if not shutil.which("sbatch") or not shutil.which("sinfo"):
        return "no Slurm client (sbatch, sinfo) on PATH; sudo benchmark/start_local_slurm.sh installs and starts one"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo does not answer within 20 s (no slurmctld running?)"
    if out.returncode != 0:
        return f"sinfo fails: {out.stderr.strip()[:200]}"
    if not any(state.rstrip("*~#") in ("idle", "mixed", "allocated") for state in out.stdout.split()):
        return f"no usable Slurm node (states: {out.stdout.split()})"
    return None


pytestmark = pytest.mark.skipif(slurm_unavailable() is not None, reason=str(slurm_unavailable()))


def wait_until(predicate, timeout=180, what=""):
    start = time.time()
    while not predicate():
        assert time.time() - start < timeout, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_slurm_array_job_runs_the_suite_and_resumes_a_requeued_task(tmp_path):
    out = tmp_path / "smoke"
    subset = ["--variants", "dqn_softmoe", "--games", "Pong"]
    proc = bench("smoke", *subset, "--slurm", "--cpus-per-task", 1, "--out", out, "--flags",
                 TINY.replace("--total-timesteps 300", "--total-timesteps 500"), cwd=tmp_path, check=0)
    assert "submitted 2 runs as Slurm array job" in proc.stdout, proc.stdout
    job = proc.stdout.split("Slurm array job ")[1].split()[0]
    runs = suites.plan(suites.load_suite("smoke"), out, variants=["dqn_softmoe"], games=["Pong"])
    first = Path(runs[0].dir)
    assert json.loads((first / "status.json").read_text())["slurm_job"] in (f"{job}_0", f"{job}_1")

    # the time limit approaches (sbatch --signal=B:USR1): the task checkpoints its run and requeues itself
    wait_until(lambda: list(first.glob("runs/*/checkpoint/state.pt")), what="a checkpoint")
    task = json.loads((first / "status.json").read_text())["slurm_job"]
    subprocess.run(["scancel", "--batch", "--signal=USR1", task], check=True)
    wait_until(lambda: common.read_status(first).get("exit_code") == 143, what="the run to stop with a checkpoint")
    # Slurm holds a requeued job for about 2 minutes (BeginTime); release it now, but only once the old instance is
    # gone: a requeued job started at once is killed ("Job credential revoked") and looks lost
    wait_until(lambda: "PENDING" in subprocess.run(["squeue", "-h", "-r", "-j", task, "-o", "%T"], capture_output=True,
                                                   text=True).stdout, timeout=60, what="the requeued task to be pending")
    time.sleep(5)
    wait_until(lambda: subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"],
                                      capture_output=True).returncode == 0, timeout=60, what="the requeued task")

    proc = bench("status", "smoke", *subset, "--out", out, "--wait", cwd=tmp_path, check=0, timeout=300)
    assert "2/2 runs done" in proc.stdout, proc.stdout
    log = (first / "log.txt").read_text()
    assert "==== attempt 2" in log and "resumed ALE-Pong-v5" in log and "(Slurm job" in log, log
    for run in runs:
        result = json.loads(next(Path(run.dir).glob("runs/*/result.json")).read_text())
        assert result["steps"] == 500 and result["seed"] == run.seed
    slurm_logs = "".join(p.read_text() for p in out.glob("slurm/*/*.out"))
    assert f"{runs[0].id}: interrupted (exit code 143)" in slurm_logs and f"{runs[0].id}: done" in slurm_logs
    bench("report", "smoke", *subset, "--out", out, cwd=tmp_path, check=0)
