"""benchmark.sh: aggregation (IQM, stratified-bootstrap CIs, HNS) against hand values, the regression checks, the
smoke suite end to end on the real ALE (2 local workers, interrupted and resumed), and perf on the CPU."""
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# the directory that holds the bench package; a mutation check may point this at a mutated copy of benchmark/
BENCH = Path(os.environ.get("CLEANRL_MOE_BENCH", ROOT / "benchmark"))
sys.path.insert(0, str(BENCH))
from bench import cli, common, local, machine, perf, report, suites  # noqa: E402
from harness import load_script, only_run_dir, scalars  # noqa: E402


def bench_process(*args, env=None):
    """argv and environment of `benchmark.sh ARGS` run from the package under test."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("WANDB_API_KEY", None)
    return [sys.executable, "-m", "bench", *map(str, args)], env


def bench(*args, cwd, timeout=300, check=None, env=None):
    argv, env = bench_process(*args, env=env)
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None and proc.returncode != check:
        raise AssertionError(f"benchmark {' '.join(map(str, args))} exited {proc.returncode}, expected {check}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def bench_here(*args, capsys):
    """(exit code, stdout) of `benchmark.sh ARGS` run in this process: its imports (rliable, torch) are paid once."""
    code = cli.main(list(map(str, args)))
    return code, capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Aggregation against hand values
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("values, expected", [
    ([1, 2, 3, 4], 2.5),  # n = 4: one value cut at each end
    ([1, 2, 3, 4, 5, 100], 3.5),  # n = 6: 25% is 1.5 values; rliable (scipy's trim_mean) cuts floor(1.5) = 1
    ([10, 1, 7, 3, 100, -50, 4, 2], 4.0),  # n = 8, unsorted: middle four of -50,1,2,3,4,7,10,100
    ([0, 0, 1, 9, 9], 10 / 3),  # n = 5: floor(1.25) = 1 cut at each end
    ([5, 1, 3], 3.0),  # n = 3: floor(0.75) = 0, the plain mean
])
def test_iqm_hand_values(values, expected):
    # one game: the report's IQM (rliable's aggregate_iqm, scipy's trim_mean(0.25)) of its runs
    assert report.aggregate_with_ci({"A": values}, reps=10)[0][0] == pytest.approx(expected)


def test_aggregates_pool_runs_for_iqm_and_average_game_means():
    # equal runs per game (rliable's runs x games matrix)
    points, _ = report.aggregate_with_ci({"A": [0, 1, 2], "B": [10, 20, 30], "C": [4, 4, 4]}, reps=200)
    # IQM over the 9 runs pooled: sorted 0,1,2,4,4,4,10,20,30, floor(9/4) = 2 cut at each end -> (2+4+4+4+10)/5
    # median and mean over the game means 1, 20, 4
    assert points == pytest.approx([4.8, 4.0, 25 / 3])
    # unequal runs per game (a failed run): each game still counts once in the median and the mean
    points, _ = report.aggregate_with_ci({"A": [0, 1], "B": [10, 20, 30, 40]}, reps=200)
    assert points == pytest.approx([(1 + 10 + 20 + 30) / 4, 12.75, 12.75])


@pytest.mark.parametrize("per_game, low, high", [
    # no spread within a game: a stratified bootstrap (runs resampled within each game) has no spread either;
    # resampling the 4 runs pooled would mix the games and give a wide interval
    ({"A": [0, 0], "B": [1, 1]}, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    # A's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4: the mean (and the median of 2 games) over games is
    # 2.5, 2.75 or 3; the IQM (middle 2 of 4 pooled runs) is 2.5 (A resampled as 0,0) or 3
    ({"A": [0, 1], "B": [5, 5]}, [2.5, 2.5, 2.5], [3.0, 3.0, 3.0]),
    # unequal runs: IQM = middle 3 of 5 pooled runs: 10/3 (A as 0,0) or 11/3
    ({"A": [0, 1], "B": [5, 5, 5]}, [10 / 3, 2.5, 2.5], [11 / 3, 3.0, 3.0]),
    # one game, runs 0,0,0,4, k fours in a resample (binomial, 4 draws, p 1/4): the mean is k, the IQM (middle 2
    # of 4) is 0 for k <= 1, 2 for k = 2 and 4 for k >= 3; P(k = 0) = 81/256 and P(k >= 3) = 13/256 both exceed
    # 2.5%. A percentile interval, not the 'basic' one (2 * point - percentiles: [-4, 0] for the IQM)
    ({"A": [0, 0, 0, 4]}, [0.0, 0.0, 0.0], [4.0, 3.0, 3.0]),
])
def test_stratified_bootstrap_percentile_ci_hand_values(per_game, low, high):
    _, ci = report.aggregate_with_ci(per_game, reps=2000)
    assert ci[0] == pytest.approx(low) and ci[1] == pytest.approx(high)


def test_bootstrap_is_reproducible_and_leaves_numpy_alone():
    state = np.random.get_state()[1].copy()
    per_game = {g: np.random.default_rng(i).random(3) for i, g in enumerate("ABCDE")}
    first = report.aggregate_with_ci(per_game, reps=500)[1]
    assert np.array_equal(first, report.aggregate_with_ci(per_game, reps=500)[1])
    assert not np.array_equal(first, report.aggregate_with_ci(per_game, reps=500, seed=1)[1])
    assert np.array_equal(state, np.random.get_state()[1])


def test_cis_contain_the_point_and_are_rliables_own():
    """On data with spread, for equal and unequal runs per game: each CI contains its point estimate, and both equal
    what rliable returns when called directly (games in sorted order, numpy's global generator seeded)."""
    from rliable import library, metrics

    def matrix_aggregates(m):  # rliable's documented use: a runs x games matrix
        return np.array([metrics.aggregate_iqm(m), metrics.aggregate_median(m), metrics.aggregate_mean(m)])

    def list_aggregates(*games):  # one runs x 1 array per game
        means = np.array([[g.mean() for g in games]])
        return np.array([metrics.aggregate_iqm(np.concatenate(games)), np.median(means), np.mean(means)])

    rng = np.random.default_rng(0)
    for runs in ([5] * 12, [5, 3, 5, 4, 5, 5, 2, 5, 5, 5, 5, 5]):
        per_game = {f"g{i:02d}": rng.gamma(1.0 + i / 4, 0.3, size=n) for i, n in enumerate(runs)}
        points, ci = report.aggregate_with_ci(per_game, reps=1000, seed=3)
        assert np.all(ci[0] < points) and np.all(points < ci[1]), (points, ci)
        games = [per_game[g].reshape(-1, 1) for g in sorted(per_game)]
        np.random.seed(3)
        if len(set(runs)) == 1:
            direct = library.get_interval_estimates({"x": np.concatenate(games, axis=1)}, matrix_aggregates, reps=1000)
        else:
            direct = library.get_interval_estimates({"x": games}, list_aggregates, reps=1000)
        assert np.array_equal(points, direct[0]["x"]) and np.array_equal(ci, direct[1]["x"])


# the spec's 26-game table (rainbow_der.md section 7): random and human from Dopamine's normalization_utils.py,
# van Hasselt et al. 2019 DER scores, and their HNS rounded to 3 decimals
SPEC_TABLE = """game,random,human,der_vh2019,der_vh2019_hns
Alien,227.8,7127.7,739.9,0.074
Amidar,5.8,1719.5,188.6,0.107
Assault,222.4,742.0,431.2,0.402
Asterix,210.0,8503.3,470.8,0.031
BankHeist,14.2,753.1,51.0,0.050
BattleZone,2360.0,37187.5,10124.6,0.223
Boxing,0.1,12.1,0.2,0.008
Breakout,1.7,30.5,1.9,0.007
ChopperCommand,811.0,7387.8,861.8,0.008
CrazyClimber,10780.5,35829.4,16185.3,0.216
DemonAttack,152.1,1971.0,508.0,0.196
Freeway,0.0,29.6,27.9,0.943
Frostbite,65.2,4334.7,866.8,0.188
Gopher,257.6,2412.5,349.5,0.043
Hero,1027.0,30826.4,6857.0,0.196
Jamesbond,29.0,302.8,301.6,0.996
Kangaroo,52.0,3035.0,779.3,0.244
Krull,1598.0,2665.5,2851.5,1.174
KungFuMaster,258.5,22736.3,14346.1,0.627
MsPacman,307.3,6951.6,1204.1,0.135
Pong,-20.7,14.6,-19.3,0.040
PrivateEye,24.9,69571.3,97.8,0.001
Qbert,163.9,13455.0,1152.9,0.074
RoadRunner,11.5,7845.0,9600.0,1.224
Seaquest,68.4,42054.7,354.1,0.007
UpNDown,533.4,11693.2,2877.4,0.210
"""


def test_hns_against_the_spec_table():
    table = report.human_random_table()
    rows = list(csv.DictReader(io.StringIO(SPEC_TABLE)))
    scores = []
    for row in rows:
        assert table[row["game"]] == (float(row["random"]), float(row["human"])), row["game"]
        scores.append(report.hns(float(row["der_vh2019"]), row["game"], table))
        assert round(scores[-1], 3) == float(row["der_vh2019_hns"]), row["game"]
    # the published DER aggregates (van Hasselt et al. 2019): mean 0.285, median 0.161
    assert round(np.mean(scores), 3) == 0.285 and round(np.median(scores), 3) == 0.161
    assert report.hns(-20.7, "Pong", table) == 0.0 and report.hns(14.6, "Pong", table) == pytest.approx(1.0)


def test_games_without_human_scores_are_reported_raw_and_left_out_of_aggregates(tmp_path):
    table = report.human_random_table()
    assert len(table) == 55 and "AirRaid" not in table and "Defender" not in table
    assert report.hns(1000.0, "AirRaid", table) is None
    games = ["AirRaid", "Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
             "ChopperCommand", "CrazyClimber"]
    suite = write_suite(tmp_path, games, seeds=[1, 2])
    runs = suites.plan(suites.load_suite(str(suite)), tmp_path / "out")
    for run in runs:
        fake_result(run, eval_mean=1000.0 + run.seed)
    games_stats, per_variant = report.summarize(report.collect(runs), reps=200)
    entry = per_variant["v"]
    assert entry["without_human"] == ["AirRaid"] and entry["games"] == 10 and entry["runs"] == 20
    assert games_stats["v", "AirRaid"]["hns"] is None and games_stats["v", "AirRaid"]["mean"] == 1001.5
    assert games_stats["v", "AirRaid"]["std"] == pytest.approx(np.std([1001, 1002], ddof=1))


def test_score_of_a_run_is_the_evaluation_mean_else_the_training_mean():
    assert common.run_score({"eval_return_mean": 5.0, "eval_returns": [4, 6], "train_return_last100": 1.0}) == (
        5.0, "eval, 2 episodes")
    assert common.run_score({"eval_return_mean": None, "train_return_last100": 1.5}) == (1.5, "train, last 100 episodes")
    assert common.run_score({"eval_return_mean": None, "train_return_last100": None})[0] is None


# ----------------------------------------------------------------------------------------------------------------
# Suites and references are data a user reads; check they are consistent
# ----------------------------------------------------------------------------------------------------------------
def test_suites_are_valid_data():
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)
    names = sorted(p.stem for p in (ROOT / "benchmark" / "suites").glob("*.toml"))
    assert {"smoke", "atari100k", "atari100k_26", "atari100k_redo", "dqn_softmoe", "rainbow_tokenized", "dqn_redo",
            "moe_routing", "moe_baselines", "tokenize_ablations"} <= set(names)
    known_scripts = {"dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"}
    for name in names:
        suite = suites.load_suite(name)
        runs = suites.plan(suite, "/tmp/x")
        count = len(suite["variants"]) * len(suite["games"]) * len(suite["seeds"])
        assert len({run.dir for run in runs}) == len(runs) == count
        for game in suite["games"]:
            gym.spec(f"ALE/{game}-v5")
        assert {v["script"] for v in suite["variants"]} <= known_scripts, name
        _, parsed = suites.resolve(runs)  # every variant's flags pass its script's parser and start-up checks
        assert set(parsed) == {v["name"] for v in suite["variants"]}, name
    smoke = suites.load_suite("smoke")
    for variant in smoke["variants"]:  # the smoke suite runs in CI: its scripts must exist
        assert (ROOT / "cleanrl_moe" / f"{variant['script']}.py").is_file()
    assert len(suites.load_suite("atari100k_26")["games"]) == 26
    assert len(suites.load_suite("dqn_redo")["games"]) == 17


def test_perf_variant_files_are_valid_data():
    names = sorted(p.stem for p in (ROOT / "benchmark" / "perf").glob("*.toml"))
    assert "dqn_softmoe_networks" in names
    for name in names:
        variants = perf.load_variants(name, ["--seed", "1"])
        assert all(v["path"].is_file() and v["flags"][:2] == ["--seed", "1"] for v in variants), name
        assert len({v["name"] for v in variants}) == len(variants), name


def test_reference_numbers_follow_their_stated_rules():
    table = report.human_random_table()
    spec = {row["game"]: float(row["der_vh2019"]) for row in csv.DictReader(io.StringIO(SPEC_TABLE))}
    rows = report.references("atari100k")
    assert {row["game"] for row in rows} == set(suites.load_suite("atari100k")["games"])
    per_game_26 = [row for row in report.references("atari100k_26") if row["statistic"] == "mean_score"]
    assert sorted(row["game"] for row in per_game_26) == sorted(suites.load_suite("atari100k_26")["games"])
    assert {row["variant"] for row in per_game_26} == {"der_vh2019"}
    for row in rows + per_game_26:  # published DER score, low = half the gain over random
        random_score = table[row["game"]][0]
        assert float(row["reference"]) == spec[row["game"]]
        assert float(row["low"]) == pytest.approx(random_score + (spec[row["game"]] - random_score) / 2, abs=0.01)
    smoke_rows = report.references("smoke")
    assert {row["game"] for row in smoke_rows} == set(suites.load_suite("smoke")["games"])
    for suite in ("atari100k", "atari100k_26", "dqn_redo"):
        variants = {v["name"] for v in suites.load_suite(suite)["variants"]}
        assert all(row["variant"] in variants | {"*"} and row["source"] for row in report.references(suite))


# ----------------------------------------------------------------------------------------------------------------
# Regression checks: report exits 1 when a result is outside its tolerance or a run failed
# ----------------------------------------------------------------------------------------------------------------
def write_suite(tmp_path, games, seeds=(1,), references="none"):
    path = tmp_path / "suite.toml"
    path.write_text(f'description = "test"\ngames = {json.dumps(list(games))}\nseeds = {json.dumps(list(seeds))}\n'
                    f'references = "{references}"\nvariants = [{{ name = "v", script = "dqn_softmoe", flags = "" }}]\n')
    return path


def fake_result(run, eval_mean=None, train_mean=None):
    run_dir = Path(run.dir) / "runs" / "fake"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps({
        "script": run.script, "env_id": f"ALE/{run.game}-v5", "seed": run.seed, "steps": 100, "episodes": 3,
        "train_return_last100": train_mean, "eval_returns": None if eval_mean is None else [eval_mean] * 2,
        "eval_return_mean": eval_mean, "wall_time_s": 1.0, "args": {}}))
    common.write_status(run.dir, state="done", exit_code=0)


def test_regression_check_fails_when_a_result_is_outside_its_tolerance(tmp_path, capsys):
    out = tmp_path / "out"
    runs = suites.plan(suites.load_suite("smoke"), out)
    for run in runs:  # smoke bounds: Pong in [-21, 21], Breakout in [0, 864]
        fake_result(run, eval_mean=-20.0 if run.game == "Pong" else 3.0)
    assert bench_here("report", "smoke", "--out", out, capsys=capsys)[0] == 0
    assert "| pass | dqn_softmoe | Pong | run_score |" in (out / "report.md").read_text()

    fake_result(runs[0], eval_mean=-22.0)  # outside [-21, 21]
    code, stdout = bench_here("report", "smoke", "--out", out, capsys=capsys)
    text = (out / "report.md").read_text()
    assert code == 1 and f"| FAIL | dqn_softmoe | Pong | run_score | {runs[0].id}: -22.0 |" in text
    assert "1 checks outside their tolerance" in stdout
    fake_result(runs[0], eval_mean=21.0)  # the bound itself is inside
    assert bench_here("report", "smoke", "--out", out, capsys=capsys)[0] == 0


def test_failed_runs_are_listed_with_their_log_tail(tmp_path, capsys):
    out = tmp_path / "out"
    runs = suites.plan(suites.load_suite("smoke"), out)
    for run in runs[1:]:
        fake_result(run, eval_mean=0.0)
    Path(runs[0].dir).mkdir(parents=True)
    (Path(runs[0].dir) / "log.txt").write_text("line 1\nTraceback (most recent call last):\nValueError: boom\n")
    common.write_status(runs[0].dir, state="failed", exit_code=1)
    code, stdout = bench_here("report", "smoke", "--out", out, capsys=capsys)
    text = (out / "report.md").read_text()
    assert code == 1 and f"### {runs[0].id}: failed (exit code 1)" in text and "ValueError: boom" in text
    assert f"{runs[0].id}: not finished" in text and "1 runs not finished" in stdout
    # a run whose process vanished without recording an exit code is not left as "running"
    common.write_status(runs[0].dir, state="running", exit_code=None, pid=2**22 + 7, host=os.uname().nodename,
                        script="dqn_softmoe.py")
    assert common.run_state(runs[0]) == "lost"
    code, stdout = bench_here("status", "smoke", "--out", out, capsys=capsys)
    assert code == 0 and f"{len(runs) - 1}/{len(runs)} done, 1 failed" in stdout and "ValueError: boom" in stdout


def test_a_run_is_alive_while_its_process_runs_its_script():
    status = {"host": os.uname().nodename, "script": "sleep"}
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert common.is_alive({**status, "pid": proc.pid}, None)  # also while being exec'd (empty cmdline)
        while not Path(f"/proc/{proc.pid}/cmdline").read_bytes():
            time.sleep(0.01)
        assert not common.is_alive({**status, "pid": proc.pid, "script": "dqn_softmoe.py"}, None)  # a reused pid
        proc.kill()
        time.sleep(0.3)
        assert not common.is_alive({**status, "pid": proc.pid}, None)  # a zombie: empty cmdline, state Z
    finally:
        proc.kill()
        proc.wait()
    assert not common.is_alive({**status, "pid": proc.pid}, None)  # gone


def check_rows(statistic, check, reference="", low="", high="", slack=""):
    return {"suite": "s", "variant": "v", "game": "*" if statistic.endswith("hns") else "Pong", "statistic": statistic,
            "check": check, "reference": reference, "low": low, "high": high, "slack": slack, "source": "test"}


def test_mean_score_and_ci_checks():
    run = common.Run("v", "dqn_softmoe", "Pong", 1, (), "/nonexistent")
    rows = [{"run": run, "state": "done", "score": 10.0, "source": "eval", "hns": 0.5}]
    games = {("v", "Pong"): {"mean": 10.0, "n": 1}}
    per_variant = {"v": {"point": np.array([0.5, 0.4, 0.6]), "ci": np.array([[0.45, 0.3, 0.5], [0.55, 0.5, 0.7]])}}

    def verdict(ref):
        return report.compare([ref], rows, games, per_variant)[0][2]

    assert verdict(check_rows("mean_score", "range", low="9.5")) == "pass"
    assert verdict(check_rows("mean_score", "range", low="10.5")) == "FAIL"
    assert verdict(check_rows("mean_score", "range", high="9")) == "FAIL"
    assert verdict(check_rows("iqm_hns", "ci", reference="0.55")) == "pass"  # on the CI's edge
    assert verdict(check_rows("iqm_hns", "ci", reference="0.57")) == "FAIL"
    assert verdict(check_rows("iqm_hns", "ci", reference="0.57", slack="0.02")) == "pass"
    assert verdict(check_rows("median_hns", "ci", reference="0.29")) == "FAIL"  # median CI is [0.3, 0.5]
    assert verdict(check_rows("mean_hns", "range", low="0.61")) == "FAIL"  # point 0.6
    del per_variant["v"]["point"]
    per_variant["v"]["skipped"] = "too few games"
    assert verdict(check_rows("mean_hns", "ci", reference="0.6")) == "skip"


def test_report_aggregates_and_plots(tmp_path):
    games = ["Alien", "Amidar", "Assault", "Asterix", "BankHeist", "BattleZone", "Boxing", "Breakout",
             "ChopperCommand", "CrazyClimber"]
    out = tmp_path / "out"
    suite = write_suite(tmp_path, games, seeds=[1, 2])
    table = report.human_random_table()
    runs = suites.plan(suites.load_suite(str(suite)), out)
    expected = {}
    for i, run in enumerate(runs):  # human-normalized scores 0.05 * i, as raw game scores
        random_score, human_score = table[run.game]
        fake_result(run, eval_mean=random_score + 0.05 * i * (human_score - random_score))
        expected.setdefault(run.game, []).append(0.05 * i)
    pooled = np.sort(np.concatenate(list(expected.values())))  # 20 runs: floor(20/4) = 5 cut at each end
    game_means = [np.mean(v) for v in expected.values()]
    bench("report", str(suite), "--out", out, "--reps", 500, cwd=tmp_path, check=0)
    text = (out / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| v | 10 | 20 |"))
    assert f"{pooled[5:15].mean():.3f} [" in row and f"| {np.median(game_means):.3f} [" in row
    assert f"| {np.mean(game_means):.3f} [" in row
    assert f"(500 resamples, percentile intervals; rliable {version('rliable')})." in text
    assert (out / "aggregate.png").stat().st_size > 1000 and "![aggregates](aggregate.png)" in text
    assert "![Alien](curves/Alien.png)" not in text  # fake runs have no TensorBoard events: no curves


@pytest.mark.parametrize("name", ["rliable", "matplotlib"])
def test_report_without_rliable_or_matplotlib_says_how_to_add_them(tmp_path, name):
    blocked = tmp_path / "blocked" / name  # a module that fails to import shadows the installed one
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(f"raise ImportError('{name} blocked by the test')\n")
    proc = bench("report", "smoke", "--out", tmp_path / "out", cwd=tmp_path, check=2,
                 env={"PYTHONPATH": str(blocked.parent)})
    assert proc.stderr == (f"error: report needs {name}, which does not import here (ImportError: {name} blocked by "
                           f"the test); cd {BENCH.parent} && pip install \".[benchmark]\" adds it\n")
    assert proc.stdout == "" and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Committed results: docs/results/<suite>_<variant>/<game>/seed<N>/ counts as done; collect copies runs there
# ----------------------------------------------------------------------------------------------------------------
def fake_committed(run, eval_mean):
    Path(run.committed).mkdir(parents=True, exist_ok=True)
    (Path(run.committed) / "result.json").write_text(json.dumps({
        "env_id": f"ALE/{run.game}-v5", "seed": run.seed, "train_return_last100": None, "eval_returns": [eval_mean],
        "eval_return_mean": eval_mean}))


def test_a_committed_run_is_done_run_skips_it_and_status_counts_it(tmp_path, monkeypatch, capsys):
    scripts, out, results = tmp_path / "scripts", tmp_path / "out", tmp_path / "results"
    scripts.mkdir()
    fake_script(scripts, "fake", prioritized=False)
    source = (scripts / "fake.py").read_text()
    (scripts / "fake.py").write_text(source.replace("int = 50\n", "int = 50\n    cuda: bool = False\n"))
    with open(scripts / "fake.py", "a") as f:  # a run: result.json with the seed as its score
        f.write("\n\nif __name__ == '__main__':\n    import json, os, sys\n    os.makedirs('runs/r')\n"
                "    seed = float(sys.argv[sys.argv.index('--seed') + 1])\n"
                "    json.dump({'eval_return_mean': seed, 'eval_returns': [seed]}, open('runs/r/result.json', 'w'))\n")
    monkeypatch.setattr(suites, "SCRIPTS", scripts)
    monkeypatch.setattr(local, "SCRIPTS", scripts)
    suite = tmp_path / "t.toml"
    suite.write_text('games = ["Pong"]\nseeds = [1, 2]\nvariants = [{ name = "v", script = "fake" }]\n')
    runs = suites.plan(suites.load_suite(str(suite)), out, results=results)
    assert [run.committed for run in runs] == [str(results / "t_v" / "Pong" / f"seed{s}") for s in (1, 2)]
    fake_committed(runs[0], 7.0)
    assert common.run_state(runs[0]) == "done" and common.run_state(runs[1]) == "pending"

    code, stdout = bench_here("status", suite, "--out", out, "--results", results, capsys=capsys)
    assert code == 0 and "t: 1/2 done" in stdout and f"1 of the done runs are committed under {results}" in stdout
    code, stdout = bench_here("run", suite, "--out", out, "--results", results, "--workers", 1, capsys=capsys)
    assert code == 0 and f"1 of 2 runs already done: skipped (1 of them committed under {results})" in stdout
    assert "start  v/Pong/seed2" in stdout and "seed1" not in stdout.replace("committed", "") and "2/2 runs done" in stdout
    assert not Path(runs[0].dir).exists() and common.load_result(runs[0])["eval_return_mean"] == 7.0
    assert common.load_result(runs[1])["eval_return_mean"] == 2.0
    code, stdout = bench_here("status", suite, "--out", out, "--results", results, capsys=capsys)
    assert "t: 2/2 done" in stdout and "1 of the done runs are committed" in stdout


def test_collect_copies_finished_runs_evidence_once(tmp_path, capsys):
    out, results = tmp_path / "out", tmp_path / "results"
    suite = write_suite(tmp_path, ["Pong"], seeds=[1, 2])
    done, running = suites.plan(suites.load_suite(str(suite)), out, results=results)
    fake_result(done)
    for run in (done, running):
        folder = Path(run.dir) / "runs" / "fake"
        (folder / "checkpoint").mkdir(parents=True)
        (folder / "checkpoint" / "state.pt").write_bytes(b"weights")
        (folder / "events.out.tfevents.1.vm.2.0").write_bytes(b"events " + run.id.encode())
        (Path(run.dir) / "log.txt").write_text(f"log of {run.id}\n")
    (Path(running.dir) / "runs" / "fake" / "result.json").write_text("{}")  # written, the process not yet ended
    common.write_status(running.dir, state="running")
    code, stdout = bench_here("collect", suite, "--out", out, "--results", results, capsys=capsys)
    target = results / "suite_v" / "Pong" / "seed1"
    assert code == 0 and "copied v/Pong/seed1: events.out.tfevents.1.vm.2.0, log.txt, result.json" in stdout
    assert "1 runs copied, 0 already committed, 0 differing from their committed copy, 1 not finished here" in stdout
    assert sorted(p.name for p in target.iterdir()) == ["events.out.tfevents.1.vm.2.0", "log.txt", "result.json"]
    for name in ("events.out.tfevents.1.vm.2.0", "result.json"):
        assert (target / name).read_bytes() == (Path(done.dir) / "runs" / "fake" / name).read_bytes()
    assert (target / "log.txt").read_text() == "log of v/Pong/seed1\n"
    assert not (results / "suite_v" / "Pong" / "seed2").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in target.iterdir()}

    code, stdout = bench_here("collect", suite, "--out", out, "--results", results, capsys=capsys)  # idempotent
    assert code == 0 and "copied v/" not in stdout and "0 runs copied, 1 already committed" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamps
    fake_result(done, eval_mean=3.0)  # another result: the committed copy stays, and collect says so
    code, stdout = bench_here("collect", suite, "--out", out, "--results", results, capsys=capsys)
    assert code == 1 and f"v/Pong/seed1: {target} holds another result.json: left as it is" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in target.iterdir()} == stamps


def der_vh2019_runs(tmp_path):
    """(results folder, absent runs folder, human/random table, published per-game scores, planned runs) of the
    atari100k_26 suite's der_vh2019 variant, for reports made from committed results alone."""
    results, absent = tmp_path / "results", tmp_path / "absent"
    published = {row["game"]: float(row["reference"]) for row in report.references("atari100k_26")
                 if row["statistic"] == "mean_score"}
    runs = suites.plan(suites.load_suite("atari100k_26"), absent, variants=["der_vh2019"], results=results)
    return results, absent, report.human_random_table(), published, runs


def test_report_from_committed_results_alone_flags_games_below_half_the_published_gain(tmp_path, capsys):
    results, absent, table, published, runs = der_vh2019_runs(tmp_path)
    for run in runs:  # seed 1 of every game, and Assault's seed 2, at the published score; Alien at 0.4 of its gain
        if run.seed == 1 or (run.game, run.seed) == ("Assault", 2):
            random_score = table[run.game][0]
            fake_committed(run, published[run.game] if run.game != "Alien" else
                           random_score + 0.4 * (published[run.game] - random_score))
    code, stdout = bench_here("report", "atari100k_26", "--variants", "der_vh2019", "--out", absent, "--results",
                              results, "--reps", 200, capsys=capsys)
    out = results / "atari100k_26_der_vh2019"
    text = (out / "report.md").read_text()
    assert code == 1 and not absent.exists() and "103 runs not finished" in stdout
    assert f"27/130 runs done (runs directory {absent} (absent); 27 of the runs done read from the committed " in text
    assert "| der_vh2019 | Alien | 1 | 1 | 432.6 | eval, 1 episode | 0.030 | 739.9 | 0.40 **below half** |" in text
    assert "| der_vh2019 | Assault | 2 | 1, 2 | 431.2 ± 0.0 | eval, 1 episode | 0.402 | 431.2 | 1.00 |" in text
    assert text.count("0 **below half**") == 1 and "Below half the published gain over random: der_vh2019 Alien" in text
    assert "| FAIL | der_vh2019 | Alien | mean_score | 432.6 over 1 runs | in [483.85, +inf] |" in text
    assert "| pass | der_vh2019 | Amidar | mean_score | 188.6 over 1 runs |" in text
    assert "| der_vh2019 | 26 | 27 |" in text  # aggregates over the 26 games, 27 runs
    info = [line for line in text.splitlines() if "(shown, never fails)" in line]
    assert len(info) == 3 and all(line.startswith(("| inside |", "| outside |")) for line in info)
    assert "- der_vh2019, not started (103 runs): Alien (seeds 2, 3, 4, 5), Amidar (seeds 2, 3, 4, 5), " in text
    assert "Assault (seeds 3, 4, 5)" in text and (out / "aggregate.png").stat().st_size > 1000


def test_aggregates_over_part_of_the_suite_are_set_beside_the_published_scores_of_the_same_games(tmp_path, capsys):
    # seed 1 of 11 of the 26 games: a median and mean over them are not the published ones over 26 games, so the
    # ci and info checks skip, and the report computes the published per-game scores' median and mean over the same
    # 11 games. With two seeds of Alien and one of every other game, it says that 10 games add no spread to the CIs.
    results, absent, table, published, runs = der_vh2019_runs(tmp_path)
    games = list(dict.fromkeys(run.game for run in runs))[:11]
    for run in runs:  # each at random + 2 x the published gain over random: HNS twice the published
        if run.game in games and (run.seed == 1 or (run.game, run.seed) == ("Alien", 2)):
            random_score = table[run.game][0]
            fake_committed(run, random_score + 2 * (published[run.game] - random_score))
    bench_here("report", "atari100k_26", "--variants", "der_vh2019", "--out", absent, "--results", results,
               "--reps", 200, capsys=capsys)
    text = (results / "atari100k_26_der_vh2019" / "report.md").read_text()
    paper = [report.hns(published[game], game, table) for game in games]
    ours = [2 * value for value in paper]
    assert "| der_vh2019 | 11 | 12 |" in text and f"| {np.median(ours):.3f} [" in text
    line = next(line for line in text.splitlines() if line.startswith("- der_vh2019: aggregates over 11 of"))
    assert "aggregates over 11 of the suite's 26 games, so the published aggregates" in line
    assert f"over the same 11 games give median {np.median(paper):.3f} (outside our 95% CI)" in line
    assert f"and mean {np.mean(paper):.3f} (outside our 95% CI)." in line
    assert "- der_vh2019: 10 of its 11 games have one run." in text
    skips = [line for line in text.splitlines() if line.startswith("| skip | der_vh2019 | * |")]
    assert len(skips) == 5 and all("over 11 of the suite's 26 games: checked when all of them have run" in line
                                   for line in skips)
    assert not any(line.startswith(("| pass | der_vh2019 | * |", "| FAIL | der_vh2019 | * |", "| inside |",
                                    "| outside |")) for line in text.splitlines())
    # published at our own scores: the same games' median and mean are our point estimates
    for run in runs:
        if run.game in games and run.seed == 1:
            fake_committed(run, published[run.game])
    for run in runs:
        if (run.game, run.seed) == ("Alien", 2):
            fake_committed(run, published["Alien"])
    bench_here("report", "atari100k_26", "--variants", "der_vh2019", "--out", absent, "--results", results,
               "--reps", 200, capsys=capsys)
    text = (results / "atari100k_26_der_vh2019" / "report.md").read_text()
    assert f"give median {np.median(paper):.3f} (inside our 95% CI) and mean {np.mean(paper):.3f} (inside" in text


def test_committed_results_follow_their_layout():
    """docs/results/<suite>_<variant>/<game>/seed<N>/: a suite's variant, game and seed, the run's small files only."""
    names = {f"{s['name']}_{v['name']}": s for s in map(suites.load_suite, ["atari100k", "atari100k_26"])
             for v in s["variants"]}
    # a suite run's folder is seed<N>; others (Asterix/seed1_rerun: an investigation's record) are not runs of a suite
    found = sorted(p for p in (ROOT / "docs" / "results").glob("*/*/seed*/result.json")
                   if re.fullmatch(r"seed\d+", p.parent.name))
    assert found  # the Assault runs of der_vh2019 (2 seeds) at least
    for path in found:
        # <suite>_<variant>_before_noops: runs from before commit 3a0183e (no no-op starts in training), kept as a record
        folder = path.parents[2].name.removesuffix("_before_noops")
        game, seed = path.parents[1].name, int(path.parent.name[4:])
        result = json.loads(path.read_text())
        assert folder in names and game in names[folder]["games"] and seed in names[folder]["seeds"], path
        assert result["env_id"] == f"ALE/{game}-v5" and result["seed"] == seed, path
        files = list(path.parent.iterdir())
        assert {f.name for f in files} <= {"result.json", "log.txt"} | {f.name for f in path.parent.glob("events.*")}
        assert all(f.is_file() and f.stat().st_size < 2**20 for f in files), path


# ----------------------------------------------------------------------------------------------------------------
# Default number of workers
# ----------------------------------------------------------------------------------------------------------------
def test_default_workers_follow_cpus_ram_and_gpu_memory(monkeypatch):
    GiB = 2**30
    run = common.Run("v", "s", "Pong", 1, (), "/x", total_steps=10, memory_bytes=7068 * 10**6 + suites.RUN_OVERHEAD_BYTES)
    monkeypatch.setattr(local, "cpu_count", lambda: 16)
    monkeypatch.setattr(local, "available_ram_bytes", lambda: 64 * GiB)
    monkeypatch.setattr(local, "gpus", lambda: [])
    slots, why = local.worker_slots([run], uses_cuda=True)
    assert slots == [None] * 7, why  # RAM: (64 - 1) GiB / 8.58 GiB per run
    monkeypatch.setattr(local, "available_ram_bytes", lambda: 500 * GiB)
    monkeypatch.setattr(local, "gpus", lambda: [(0, 80 * GiB), (1, 20 * GiB)])
    slots, why = local.worker_slots([run], uses_cuda=True)
    # GPU 0 holds 0.9 * 80 / (6.58 + 2) = 8 replay memories, GPU 1 holds 2; the workers alternate between GPUs
    assert sorted(slots) == [0] * 8 + [1] * 2 and slots[:4] == [0, 1, 0, 1], why
    assert local.worker_slots([run], uses_cuda=False)[0] == [None] * 16  # --no-cuda runs: CPUs only
    assert local.worker_slots([run], uses_cuda=True, workers=3)[0] == [0, 1, 0]


def test_available_ram_is_the_least_of_memavailable_and_every_cgroup_limit(tmp_path):
    GiB = 2**30
    unlimited_v1 = str(2**63 - 4096)  # what cgroup v1 reports without a limit

    def ram(own_cgroup, files, meminfo="MemTotal: 25165824 kB\nMemAvailable: 20971520 kB\n"):  # 20 GiB available
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for name, text in {"meminfo": meminfo, "cgroup": own_cgroup, **files}.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return machine.available_ram_bytes(root / "meminfo", root / "cgroup", root / "sys")

    assert ram("0::/user.slice/session-1.scope\n", {}) == 20 * GiB  # cgroup v2 without memory files
    assert ram("0::/job\n", {"sys/job/memory.max": f"{8 * GiB}\n", "sys/job/memory.current": f"{3 * GiB}\n"}) == 5 * GiB
    # Slurm (v2): the limit is on the job, the process sits in a step below it whose memory.max is "max"
    slurm = {"sys/job_1/memory.max": str(6 * GiB), "sys/job_1/memory.current": str(4 * GiB),
             "sys/job_1/step_0/memory.max": "max", "sys/job_1/step_0/memory.current": str(3 * GiB)}
    assert ram("0::/job_1/step_0\n", slurm) == 2 * GiB
    assert ram("0::/big\n", {"sys/big/memory.max": str(64 * GiB), "sys/big/memory.current": "0"}) == 20 * GiB
    assert ram("0::/over\n", {"sys/over/memory.max": str(GiB), "sys/over/memory.current": str(2 * GiB)}) == 0
    # cgroup v1 (and a hybrid layout, whose v2 hierarchy has no memory controller): the memory controller's own
    # hierarchy, unlimited at its root and on the step, 4 GiB on the job
    v1 = {"sys/memory/memory.limit_in_bytes": unlimited_v1, "sys/memory/memory.usage_in_bytes": str(9 * GiB),
          "sys/memory/slurm/job_2/memory.limit_in_bytes": str(4 * GiB),
          "sys/memory/slurm/job_2/memory.usage_in_bytes": str(GiB),
          "sys/memory/slurm/job_2/step_0/memory.limit_in_bytes": unlimited_v1,
          "sys/memory/slurm/job_2/step_0/memory.usage_in_bytes": str(GiB)}
    assert ram("4:memory:/slurm/job_2/step_0\n3:cpu,cpuacct:/\n0::/\n", v1) == 3 * GiB
    # a container sees its own cgroup as the hierarchy's root, whatever /proc/self/cgroup names
    container = {"sys/memory/memory.limit_in_bytes": str(2 * GiB), "sys/memory/memory.usage_in_bytes": str(GiB // 2)}
    assert ram("4:memory:/docker/0123abcd\n", container) == GiB * 3 // 2
    assert ram("", {}) == 20 * GiB  # no /proc/self/cgroup


def fake_script(directory, name, prioritized):
    """A script with the surface suites.resolve uses: Args, and replay classes whose sizes tell them apart."""
    (directory / f"{name}.py").write_text(
        "import dataclasses\n\n\n@dataclasses.dataclass\nclass Args:\n    env_id: str = ''\n    seed: int = 1\n"
        "    total_timesteps: int = 10\n    buffer_size: int = 50\n\n\nclass ReplayMemory:\n    @staticmethod\n"
        "    def bytes_per_slot(frame_shape=(84, 84)):\n        return 1000\n" + (
            "\n\nclass PrioritizedReplayMemory(ReplayMemory):\n    @staticmethod\n"
            "    def bytes_per_slot(frame_shape=(84, 84), capacity=1_000_000):\n        return 1000 + 10**6 // capacity\n"
            if prioritized else ""))


def test_runs_are_sized_by_their_scripts_replay_class(tmp_path, monkeypatch, capsys):
    # the smoke suite's --buffer-size 1000: 7,068 bytes a slot in ReplayMemory, 7,068 + ceil(16,384 / 1,000) with
    # the sum tree of PrioritizedReplayMemory (2 x 1,024 float64 nodes)
    runs, _ = suites.resolve(suites.plan(suites.load_suite("smoke"), tmp_path, games=["Pong"], seeds=[1]))
    assert {run.variant: run.memory_bytes - suites.RUN_OVERHEAD_BYTES for run in runs} == {
        "dqn_softmoe": 7_068_000, "dqn_redo": 7_068_000, "rainbow_tokenized": 7_085_000, "der_single_expert": 7_085_000}
    # the script's own classes, asked by name, the prioritized one with the capacity; all --buffer-size slots count,
    # also beyond --total-timesteps (the scripts allocate them up front)
    monkeypatch.setattr(suites, "SCRIPTS", tmp_path)
    fake_script(tmp_path, "uniform", prioritized=False)
    fake_script(tmp_path, "prioritized", prioritized=True)
    suite = {"name": "t", "games": ["Pong"], "seeds": [1], "flags": "", "checkpoint_every": 0,
             "variants": [{"name": "u", "script": "uniform"}, {"name": "p", "script": "prioritized"}]}
    runs, _ = suites.resolve(suites.plan(suite, tmp_path / "out"))
    assert [run.memory_bytes - suites.RUN_OVERHEAD_BYTES for run in runs] == [50 * 1000, 50 * (1000 + 20_000)]
    (tmp_path / "none.py").write_text((tmp_path / "uniform.py").read_text().split("\n\n\nclass ReplayMemory")[0])
    with pytest.raises(SystemExit):
        suites.resolve(suites.plan({**suite, "variants": [{"name": "n", "script": "none"}]}, tmp_path / "out"))
    assert capsys.readouterr().err == (f"error: {tmp_path / 'none.py'}: no class ReplayMemory (or PrioritizedReplayMemory) "
                                       "with a static bytes_per_slot(), which benchmark.sh asks for the bytes of a "
                                       "replay slot to size the runs; add one\n")


# ----------------------------------------------------------------------------------------------------------------
# End to end on the real ALE
# ----------------------------------------------------------------------------------------------------------------
TINY = ("--total-timesteps 300 --learning-starts 200 --buffer-size 500 --eval-episodes 1 --checkpoint-every 100 "
        "--max-episode-steps 100 --batch-size 8")  # episodes end in training: learning curves; small batches


def wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - start < timeout
        time.sleep(0.1)


def test_a_runs_log_names_the_commit_of_its_code_and_a_modified_script(tmp_path):
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=tmp_path,  # noqa
                                    check=True, capture_output=True, text=True).stdout.strip()
    assert local.code_version(tmp_path / "s.py").startswith("commit unknown")  # not a git checkout
    git("init", "-q")
    (tmp_path / "s.py").write_text("a = 1\n")
    (tmp_path / "other.py").write_text("b = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "m")
    assert local.code_version(tmp_path / "s.py") == f"commit {git('rev-parse', 'HEAD')}"
    (tmp_path / "other.py").write_text("b = 2\n")  # another file's change is not this run's code
    assert local.code_version(tmp_path / "s.py") == f"commit {git('rev-parse', 'HEAD')}"
    (tmp_path / "s.py").write_text("a = 2\n")
    assert local.code_version(tmp_path / "s.py") == f"commit {git('rev-parse', 'HEAD')}, s.py modified since"


def test_smoke_suite_end_to_end_interrupted_resumed_and_reported(tmp_path):
    """Every script of the smoke suite on one game and seed (CI's subset), at 300 steps: stopped with a checkpoint,
    resumed, reported."""
    out = tmp_path / "smoke"
    subset = ["--games", "Pong", "--seeds", 1]
    args = ["smoke", *subset, "--workers", 2, "--out", out, "--flags", TINY]
    argv, env = bench_process(*args)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: list(out.glob("*/*/*/runs/*/checkpoint/state.pt")), proc)
    proc.send_signal(signal.SIGTERM)  # as Ctrl-C: every run saves a checkpoint and stops
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, output
    interrupted = [p.parents[3] for p in out.glob("*/*/*/runs/*/checkpoint/state.pt")]
    assert interrupted and all(json.loads((d / "status.json").read_text())["state"] == "interrupted" for d in interrupted)

    proc = bench(*args, cwd=tmp_path, check=0)
    runs = suites.plan(suites.load_suite("smoke"), out, games=["Pong"], seeds=[1])
    assert len(runs) == len(suites.load_suite("smoke")["variants"]) >= 3
    assert f"{len(runs)}/{len(runs)} runs done" in proc.stdout, proc.stdout
    for run in runs:
        run_dir = Path(run.dir)
        log = (run_dir / "log.txt").read_text()
        assert (f"resumed ALE-{run.game}-v5" in log) == (run_dir in interrupted), log
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        assert log.count(f"# code: commit {commit}") == log.count("==== attempt") >= 1, log  # each attempt's code
        assert list(run_dir.glob("runs/*/events.out.tfevents.*")) and not list(run_dir.glob("runs/*/checkpoint"))
        import torch

        final = torch.load(next(run_dir.glob("runs/*/final_state.pt")), weights_only=True)  # kept for probes
        assert final["global_step"] == 300 and final["q_network"] and final["args"]["total_timesteps"] == 300
        result = json.loads(next(run_dir.glob("runs/*/result.json")).read_text())
        assert result["steps"] == 300 and result["env_id"] == f"ALE/{run.game}-v5" and result["seed"] == run.seed
        assert len(result["eval_returns"]) == 1

    bench("report", "smoke", *subset, "--out", out, cwd=tmp_path, check=0)
    text = (out / "report.md").read_text()
    for run in runs:
        assert f"| {run.variant} | Pong | 1 |" in text and f"| pass | {run.variant} | Pong | run_score |" in text
        assert f"| skip | {run.variant} | Breakout | run_score | not in this run of the suite |" in text
    assert text.count("| pass |") == len(runs) and "eval, 1 episode" in text
    assert (out / "curves" / "Pong.png").is_file()

    again = bench(*args, cwd=tmp_path, check=0)  # finished runs are skipped
    assert f"{len(runs)} of {len(runs)} runs already done: skipped" in again.stdout and "start " not in again.stdout


def test_slurm_dry_run_prints_the_array_job(tmp_path):
    """Without a Slurm: the sbatch script that --slurm would submit (tests/test_benchmark_slurm.py submits it)."""
    proc = bench("smoke", "--variants", "dqn_softmoe", "--games", "Pong", "--slurm", "--dry-run", "--partition", "gpu",
                 "--time", "2:00:00", "--gpus", 1, "--max-parallel", 1, "--sbatch-args=--qos=low",
                 "--out", tmp_path / "out", cwd=tmp_path, check=0)
    for line in ("#SBATCH --array=0-1%1", "#SBATCH --partition=gpu", "#SBATCH --time=2:00:00", "#SBATCH --gres=gpu:1",
                 "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "#SBATCH --cpus-per-task=2", "#SBATCH --mem=3G",
                 'task ', '"$SLURM_ARRAY_TASK_ID"', "sbatch --parsable --qos=low"):
        assert line in proc.stdout, (line, proc.stdout)
    assert not (tmp_path / "out").exists()


def test_bad_flags_stop_before_any_run_starts(tmp_path):
    proc = bench("smoke", "--out", tmp_path / "out", "--flags", "--batch-size 0", cwd=tmp_path, check=2)
    assert "--batch-size must be positive" in proc.stderr and "variant dqn_softmoe" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = bench("smoke", "--games", "Pongg", cwd=tmp_path, check=2)
    assert "--games Pongg: not in suite smoke" in proc.stderr
    proc = bench("smoke", "--threads", "0", cwd=tmp_path, check=2)
    assert "argument --threads: '0' is not a whole number of at least 1; e.g. 1" in proc.stderr


def test_threads_set_each_runs_torch_threads(tmp_path, monkeypatch, capsys):
    # --threads N: every run gets OMP_NUM_THREADS=N whatever the workers; without it, the CPUs shared out
    started = []

    class Done:
        def poll(self):
            return 0

    monkeypatch.setattr(local, "start_run", lambda run, env: started.append(env["OMP_NUM_THREADS"]) or Done())
    monkeypatch.setattr(local, "finish_run", lambda run, code, keep: "done")
    monkeypatch.setattr(local, "cpu_count", lambda: 4)
    runs = suites.plan(suites.load_suite(str(write_suite(tmp_path, ["Pong"], seeds=[1, 2]))), tmp_path / "out")
    monkeypatch.setattr(local, "run_summary", lambda run: "")
    local.run_local("t", runs, [None], threads=1)
    local.run_local("t", runs, [None, None])
    assert started == ["1", "1", "2", "2"]


def test_benchmark_sh_lists_the_suites(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmark.sh"), "list"], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0 and "smoke" in proc.stdout and "dqn_redo" in proc.stdout, proc.stderr


def test_phase_stats_keep_only_intervals_wholly_inside_a_phase():
    # consecutive charts/SPS events at steps p < g bracket the steps p+1..g; updates happen at steps > learning_starts.
    # Intervals of 100 steps at 10, 30, 5, 2, 4 and 9 steps per second: their wall times
    rates = [10, 30, 5, 2, 4, 9]
    walls = np.cumsum([0.0] + [100 / r for r in rates])
    events = list(zip(range(99, 700, 100), walls))

    def sps(events, learning_starts):
        return perf.phase_stats(events, learning_starts, [])[:2]

    assert sps(events, 300) == pytest.approx((20.0, 4.0))  # 299..399 covers 300..399, 300 without update: left out
    assert sps(events, 299) == pytest.approx((20.0, 4.5))  # 299..399: all updating, learning
    assert sps(events, 298) == pytest.approx((10.0, 4.5))  # 199..299 covers 200..299, 299 updates: left out
    assert sps(events[:4], 300) == pytest.approx((20.0, None))
    assert sps(events, 1000) == pytest.approx((7.0, None))  # all warm-up: median of 10, 30, 5, 2, 4, 9
    # CPU seconds per 1,000 learning steps: the CPU samples interpolated at the learning intervals' ends
    cpu = [(0.0, 0.0), (walls[3], 1.0), (walls[6], 4.0)]
    assert perf.phase_stats(events, 300, cpu)[2] == pytest.approx(1000 * 3.0 / 300)  # 399..699: CPU 1 -> 4
    assert perf.phase_stats(events, 299, cpu)[2] == pytest.approx(1000 * (4.0 - 0.4) / 400)  # from 299: 0.4
    assert perf.phase_stats(events, 1000, cpu)[2] is None  # no learning interval


FAKE_SCRIPT = """# a stand-in for a training script: perf's flags, charts/SPS events, CPU burnt per learning step
import argparse
import os
import sys
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

parser = argparse.ArgumentParser()
parser.add_argument("--env-id")
parser.add_argument("--total-timesteps", type=int)
parser.add_argument("--learning-starts", type=int)
parser.add_argument("--log-frequency", type=int, default=100)
parser.add_argument("--cpu-per-step", type=float, default=0.0)  # CPU seconds burnt per learning step
parser.add_argument("--name", default=Path(sys.argv[0]).stem)
args, _ = parser.parse_known_args()
with open(os.environ["FAKE_ORDER"], "a") as f:  # the order of the runs and their flags
    f.write(f"{args.name} {' '.join(sys.argv[1:])}\\n")
cleanrl = args.env_id.endswith("NoFrameskip-v4")  # as CleanRL: charts/SPS only once learning has started
writer = EventFileWriter(f"runs/{args.name}")
for step in range(args.log_frequency - 1, args.total_timesteps, args.log_frequency):
    if step > args.learning_starts:
        end = time.process_time() + args.cpu_per_step * args.log_frequency
        while time.process_time() < end:
            pass
    else:
        time.sleep(0.01)  # the warm-up: no CPU, at most 10,000 steps per second
    if step > args.learning_starts or not cleanrl:
        summary = Summary(value=[Summary.Value(tag="charts/SPS", simple_value=0.0)])
        writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))
writer.close()
"""


def test_perf_compares_variants_interleaved_with_their_cpu_time(tmp_path):
    """Variants from a TOML file, --variant and --cleanrl, two rounds, with fake scripts that burn a known CPU time
    per learning step: A B C A B C, each at perf's configuration (CleanRL at the flags it shares), CPU seconds
    counted over the learning intervals only (not the start-up, not the warm-up)."""
    fake = tmp_path / "fake.py"
    fake.write_text(FAKE_SCRIPT)
    (tmp_path / "cleanrl").mkdir()
    (tmp_path / "cleanrl" / "dqn_atari.py").write_text(FAKE_SCRIPT)
    (tmp_path / "ab.toml").write_text(f'flags = "--log-frequency 100"\nvariants = [{{ name = "A", script = "{fake}", '
                                      'flags = "--cpu-per-step 0.0005 --name A" }]\n')
    order = tmp_path / "order.txt"
    bench("perf", tmp_path / "ab.toml", "--variant", f"B {fake} --cpu-per-step 0.001 --name B",
          "--cleanrl", tmp_path / "cleanrl" / "dqn_atari.py", "--rounds", 2, "--steps", 800, "--learning-starts", 400,
          "--buffer-size", 1000, "--train-frequency", 4, "--cpu", "--out", tmp_path / "perf", cwd=tmp_path, check=0,
          env={"FAKE_ORDER": str(order)})
    config = ("--env-id ALE/Breakout-v5 --seed 1 --total-timesteps 800 --learning-starts 400 --buffer-size 1000 "
              "--log-frequency 250 --train-frequency 4 --no-cuda")
    runs = [f"A {config} --log-frequency 100 --cpu-per-step 0.0005 --name A",
            f"B {config} --cpu-per-step 0.001 --name B",
            "dqn_atari --env-id BreakoutNoFrameskip-v4 --seed 1 --total-timesteps 800 --learning-starts 400 "
            "--buffer-size 1000 --exploration-fraction 0.5 --train-frequency 4 --no-cuda"]
    assert order.read_text().splitlines() == runs + runs
    rows = {row["variant"]: row for row in json.loads((tmp_path / "perf" / "perf.json").read_text())}
    a, b, cleanrl = rows["A"], rows["B"], rows["cleanrl_dqn_atari"]
    assert [len(row["rounds"]) for row in (a, b, cleanrl)] == [2, 2, 2] and "note" not in a | b | cleanrl
    # B burns twice A's CPU per learning step; the fake scripts' start-up (imports: about 0.5 s) does not count
    assert 0.4 < a["cpu_s_per_1000_learning_steps"] < 0.65 and 0.85 < b["cpu_s_per_1000_learning_steps"] < 1.2, rows
    assert cleanrl["cpu_s_per_1000_learning_steps"] < 0.2
    # SPS from the events' wall times: a learning step of A takes at least 0.5 ms, of B 1 ms, a warm-up step 0.1 ms
    # (1% slack: the CPU clock that paces the fake scripts also counts their event writer's thread)
    assert 0 < a["learning_sps"] <= 2020 and 0 < b["learning_sps"] <= 1010 and 0 < a["warmup_sps"] <= 10_000
    assert cleanrl["warmup_sps"] is None and cleanrl["learning_sps"] > 0  # CleanRL logs SPS only while learning
    assert 10 * 2**20 < a["peak_rss_bytes"] < 2**30
    text = (tmp_path / "perf" / "perf.md").read_text()
    assert f"| A | cpu | {a['warmup_sps']:,.0f} ({min(r['warmup_sps'] for r in a['rounds']):,.0f}-" in text


def test_perf_on_the_cpu_skips_absent_scripts(tmp_path):
    out = tmp_path / "perf"
    bench("perf", "--scripts", "dqn_softmoe", "not_a_script", "--steps", 300, "--learning-starts", 200,
          "--buffer-size", 1000, "--log-frequency", 50, "--cpu", "--threads", 1, "--flags", "--num-experts 2",
          "--out", "perf", cwd=tmp_path, check=0)  # --out relative to the working directory
    rows = {row["variant"]: row for row in json.loads((out / "perf.json").read_text())}
    assert rows["not_a_script"]["note"] == "not present yet: skipped"
    dqn = rows["dqn_softmoe"]
    assert dqn["exit_code"] == 0 and dqn["device"] == "cpu" and dqn["learning_sps"] > 0 and dqn["warmup_sps"] > 0
    assert dqn["replay_bytes_per_transition"] == {"ReplayMemory": 7068}
    assert 100 * 2**20 < dqn["peak_rss_bytes"] < 8 * 2**30
    # one torch thread, one learning interval (249..299): at most about one CPU second per wall second
    assert 0 < dqn["cpu_s_per_1000_learning_steps"] * dqn["learning_sps"] / 1000 < 1.5
    assert "| dqn_softmoe | cpu |" in (out / "perf.md").read_text()
    # it acts as a long run does: epsilon at end-e (0.01) from the first learning step, so the acting forward runs
    epsilon = dict(scalars(only_run_dir(out / "dqn_softmoe" / "round1"))["charts/epsilon"])
    assert epsilon and all(value == pytest.approx(0.01) for step, value in epsilon.items() if step > 200), epsilon


@pytest.mark.parametrize("script", perf.PERF_SCRIPTS)
def test_perf_runs_act_greedily_in_the_learning_phase(script):
    """A short perf run acts as a long one: the DQN scripts' epsilon (Dopamine's: from 1 to 0.01 over the 250,000 steps
    after the warm-up) is end-e from the first learning step; the Rainbow scripts act greedily on noisy networks."""
    module = load_script(script)
    flags = perf.variant(script, script, [], ["--total-timesteps", "3000", "--learning-starts", "1000"])["flags"]
    args = module.tyro.cli(module.Args, args=flags)
    if script in ("dqn_softmoe", "dqn_redo"):
        assert module.epsilon_at(args, 1001) == pytest.approx(args.end_e) and args.end_e == 0.01
    else:
        assert args.epsilon_train == 0.0


def test_perf_runs_cleanrl_at_end_e_from_the_first_learning_step():
    """CleanRL's epsilon, linear_schedule(1, 0.01, exploration-fraction x total steps, step), ends at learning starts."""
    opts = cli.parser().parse_args(["perf", "--steps", "3000", "--learning-starts", "1000"])
    flags = perf.cleanrl_variant("dqn_atari.py", opts)["flags"]
    assert float(flags[flags.index("--exploration-fraction") + 1]) * 3000 == pytest.approx(1000)


def test_scaling_prints_the_cost_per_update_at_each_memory_size(tmp_path):
    """`benchmark.sh scaling` (the update with a small and a full memory, side by side): one row per script, one cell
    per size and their ratio; here at toy sizes, as a smoke test of the command (the docs report the 20k vs 1M run)."""
    proc = bench("scaling", "--scripts", "dqn_redo", "--sizes", "300", "600", "--rounds", "1", "--updates", "1",
                 cwd=tmp_path, check=0)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| dqn_redo |")]
    assert len(rows) == 1 and len(rows[0].split("|")) == 6, proc.stdout
