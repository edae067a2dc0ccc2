"""rainbow_tokenized.py end to end on the real ALE with tiny budgets: logging, priorities, evaluation,
checkpoint/resume (sum tree and noise generator included), bad input."""
import signal

import numpy as np
import pytest
import torch
from harness import (assert_same_scalars, check_flags, load_script, only_run_dir, read_checkpoint, result, run_script,
                     scalars, start_script, wait_for_checkpoint)

m = load_script("rainbow_tokenized")
SCRIPT = "rainbow_tokenized"
# the default network shrunk for a CPU: Impala SoftMoE with 2 experts of 16 units, batches of 8
TINY = ["--total-timesteps", 400, "--learning-starts", 100, "--buffer-size", 600, "--log-frequency", 50,
        "--stats-frequency", 100, "--stats-batch-size", 16, "--max-episode-steps", 150, "--num-experts", 2,
        "--expert-hidden-units", 16, "--batch-size", 8]


def test_end_to_end_logs_checkpoint_and_evaluation(tmp_path):
    proc = run_script(SCRIPT, *TINY, "--env-id", "ALE/SpaceInvaders-v5", "--checkpoint-every", 200, "--save-model",
                      "--eval-episodes", 1, cwd=tmp_path)
    assert "bytes per transition with priorities" in proc.stdout and "(mean of 1 episodes)" in proc.stdout
    progress = [line for line in proc.stdout.splitlines() if line.startswith("evaluation: ")]  # like training's
    assert [line.split(" | ")[0] for line in progress] == ["evaluation: 1/1 episodes"]
    assert "mean return" in progress[-1] and progress[-1].endswith("ETA 0m00s")
    run_dir = only_run_dir(tmp_path)
    tags = scalars(run_dir)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/beta", "losses/td_loss",
                "losses/q_values", "replay/is_weight_mean", "replay/max_priority", "replay/mean_priority",
                "moe/dispatch_entropy", "moe/combine_entropy", "moe/expert_usage_entropy", "dormant/tau0_pct",
                "dormant/experts_tau0.1_pct", "dormant/stack0.block0.relu0_tau0_pct", "eval/episodic_return"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert max(v for _, v in tags["charts/episodic_length"]) <= 150  # --max-episode-steps truncates
    assert max(v for _, v in tags["charts/episodic_return"]) >= 5  # raw Space Invaders scores, not clipped rewards
    assert [s for s, _ in tags["losses/td_loss"]] == [149, 199, 249, 299, 349, 399]
    assert all(v == 0.5 for _, v in tags["charts/beta"])  # Dopamine's fixed exponent
    assert all(0 < v <= 1 for _, v in tags["replay/is_weight_mean"])
    assert tags["replay/max_priority"][-1][1] > 1  # sqrt of cross-entropies near log(51) replaced the initial 1
    checkpoint = read_checkpoint(run_dir)
    assert checkpoint["global_step"] == 400
    replay = checkpoint["replay"]
    assert replay["reward"].max() == 1.0 and replay["reward"].min() >= -1.0  # the memory holds clipped rewards
    memory = m.PrioritizedReplayMemory(600, n_step=3, gamma=0.99)
    m.Checkpoint(run_dir / "checkpoint").load_replay(memory, replay, run_dir / "checkpoint")
    lo, hi = memory.sample_range()
    valid = np.arange(lo, hi + 1)[memory.is_valid(np.arange(lo, hi + 1))]
    assert memory.num_prioritized() == len(valid) > 0  # exactly the valid transitions carry a priority
    assert (memory.tree.get(valid % 600) != 1.0).sum() > 50  # many priorities came from updates
    info = result(run_dir)
    assert info["steps"] == 400 and info["episodes"] == len(tags["charts/episodic_return"])
    assert len(info["eval_returns"]) == 1


# target copies at 150, 300, 450, 600: the interruption (at 200 or later) comes after the first, and after the first
# priority updates and noise draws; ReDo events after every 25th update, at steps 200, 300, 400 and 500, recycle the
# experts' units and the convs' channels on both sides of it; the experts shrunk and perturbed after updates 60 and 120
# (steps 340 and 580: the fresh draws come from torch's generator); the importance loss, whose interval sums must
# resume too
RESUME = [*TINY, "--encoder", "nature", "--total-timesteps", 600, "--checkpoint-every", 100,
          "--target-network-frequency", 150, "--redo", "--redo-period", 25, "--redo-tau", 0.1, "--redo-batch-size", 16,
          "--expert-reset", "shrink_perturb", "--expert-reset-period", 60, "--aux-loss-fns", "importance_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    run_script(SCRIPT, *RESUME, cwd=cwd)
    run_dir = only_run_dir(cwd)
    tags = scalars(run_dir)
    assert tags["moe/expert_resets"] == [(340, 1.0), (580, 2.0)]
    assert len(tags["losses/importance_loss"]) == 10
    return run_dir


def assert_same(x, y, name):
    if isinstance(x, dict):
        assert set(x) == set(y), name
        for k in x:
            assert_same(x[k], y[k], f"{name}.{k}")
    else:
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f"{name} differs"


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"] == 600
    for key in ("q_network", "target_network", "rng", "stack"):
        assert_same(a[key], b[key], key)  # rng includes the noise generator
    for key in ("episode", "recent_returns", "metric_sums", "num_logged", "weight_sum"):
        assert_same(a["run"][key], b["run"][key], f"run.{key}")
    # the replay, priorities included: the same data, however the saves split it into segments
    assert_same({k: v for k, v in a["replay"].items() if k != "segments"},
                {k: v for k, v in b["replay"].items() if k != "segments"}, "replay")
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}.{k} differs"
    assert torch.equal(a["env"]["ale"], b["env"]["ale"])


# SIGTERM only: a SIGKILL resumes from the last periodic save through the same shared checkpoint code, which
# tests/test_dqn_softmoe_e2e.py kills; the sum tree and the noise generator are in both kinds of save
@pytest.mark.parametrize("kill", [signal.SIGTERM])
def test_killed_run_resumes_bit_identically(tmp_path, uninterrupted, kill):
    proc = start_script(SCRIPT, *RESUME, cwd=tmp_path)
    run_dir = wait_for_checkpoint(tmp_path, proc, min_step=200)  # interrupt it while it learns
    proc.send_signal(kill)
    out, err = proc.communicate(timeout=120)
    if kill == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert "SIGTERM at step" in out and "checkpoint saved" in out
    interrupted_at = read_checkpoint(run_dir)["global_step"]
    assert 200 <= interrupted_at < 600, "the run was not interrupted mid-way"
    resumed = run_script(SCRIPT, "--resume", run_dir, cwd=tmp_path)
    assert f"at step {interrupted_at:,}" in resumed.stdout
    assert_same_training_state(read_checkpoint(uninterrupted), read_checkpoint(run_dir))
    assert_same_scalars(uninterrupted, run_dir)  # the log interval in progress at the stop included
    tags = scalars(run_dir)
    assert [s for s, _ in tags["redo/recycled_count"]] == [200, 300, 400, 500]
    assert {f"redo/{layer}_recycled_count" for layer in ("conv1", "conv2", "conv3", "experts")} <= set(tags)
    assert sum(v for _, v in tags["redo/experts_recycled_count"]) > 0
    steps = [s for s, _ in scalars(run_dir)["charts/SPS"]]
    assert steps == sorted(set(steps)), "a resumed run must not log the same step twice"


def test_nonfinite_loss_stops_after_saving_a_checkpoint(tmp_path):
    proc = run_script(SCRIPT, *TINY, "--encoder", "nature", "--learning-rate", "1e30", "--total-timesteps", 300,
                      cwd=tmp_path, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "non-finite loss" in proc.stderr and "--learning-rate" in proc.stderr
    checkpoint = read_checkpoint(only_run_dir(tmp_path))
    assert 100 < checkpoint["global_step"] <= 300


BAD_FLAGS = [
    (dict(total_timesteps=0), "--total-timesteps"),
    (dict(capacity_factor=-1.0), "--capacity-factor"),
    (dict(moe_type="baseline", capacity_factor=0.5), "--capacity-factor"),
    (dict(num_experts=0), "--num-experts"),
    (dict(expert_hidden_units=-3), "--expert-hidden-units"),
    (dict(n_step=0), "--n-step"),
    (dict(n_atoms=1), "--n-atoms"),
    (dict(v_min=5.0, v_max=5.0), "--v-min"),
    (dict(noisy_sigma0=-0.1), "--noisy-sigma0"),
    (dict(priority_exponent=-1.0), "--priority-exponent"),
    (dict(priority_beta_start=1.5), "--priority-beta-start"),
    (dict(priority_beta_end=-0.1), "--priority-beta-end"),
    (dict(epsilon_train=2.0), "--epsilon-train"),
    (dict(gamma=1.5), "--gamma"),
    (dict(learning_rate=-1e-4), "--learning-rate"),
    (dict(env_id="CartPole-v1"), "--env-id"),
    (dict(buffer_size=40, batch_size=32), "--buffer-size"),
    (dict(learning_starts=5), "--learning-starts"),
    (dict(learning_starts=12, n_step=10), "--learning-starts"),
    (dict(moe_type="baseline", tokenization="perfeat"), "--tokenization"),
    (dict(baseline_aggregation="sum"), "--baseline-aggregation"),
    (dict(moe_type="top1", moe_normalization=True), "--moe-normalization"),
    (dict(redo_period=0), "--redo-period"),
    (dict(redo_batch_size=0), "--redo-batch-size"),
    (dict(redo_tau=-0.1), "--redo-tau"),
    (dict(redo_tau=float("nan")), "--redo-tau"),
    (dict(redo=True, total_timesteps=100_000), "--redo-period"),  # 20,000 updates: the period of 200,000 never comes
]


@pytest.mark.parametrize("kwargs,flag", BAD_FLAGS)
def test_bad_flags_stop_with_one_clear_line(kwargs, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_flags(m, m.Args(**kwargs))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


def test_good_variants_pass_the_checks():
    for kwargs in (dict(), dict(moe_type="baseline"), dict(moe_type="baseline", baseline_aggregation="mean",
                                                           tokenization="perfeat"), dict(moe_type="top1"),
                   dict(num_experts=1, expert_hidden_units=2048), dict(priority_beta_start=0.4, priority_beta_end=1.0),
                   dict(redo=True), dict(redo=True, redo_period=1000, redo_tau=0.1, redo_batch_size=64)):
        check_flags(m, m.Args(**kwargs))


def test_cli_bad_flag_exits_fast_with_one_line(tmp_path):
    proc = run_script(SCRIPT, "--n-step", 0, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --n-step must be positive, got 0"
    assert not (tmp_path / "runs").exists()
