"""dqn_softmoe.py end to end on the real ALE with tiny budgets: logging, checkpoint/resume, bad input."""
import signal
import time

import pytest
import torch
from harness import (parse, assert_same_scalars, fake_checkpoint, load_script, only_run_dir, read_checkpoint, result,
                     run_script, scalars, start_script, wait_for_checkpoint)

m = load_script("dqn_softmoe")
SCRIPT = "dqn_softmoe"
# the default network shrunk for a CPU (4 experts of 64 units, batches of 8: the statistics probe runs in 4 chunks)
TINY = ["--total-timesteps", 400, "--learning-starts", 100, "--buffer-size", 600, "--log-frequency", 50,
        "--stats-frequency", 100, "--stats-batch-size", 32, "--max-episode-steps", 150, "--num-experts", 4,
        "--expert-hidden-units", 64, "--batch-size", 8]


def test_end_to_end_logs_and_checkpoint(tmp_path):
    run_script(SCRIPT, *TINY, "--env-id", "ALE/SpaceInvaders-v5", "--checkpoint-every", 200, cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    tags = scalars(run_dir)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/epsilon", "losses/td_loss",
                "losses/q_values", "moe/dispatch_entropy", "moe/combine_entropy", "moe/slot_usage_entropy",
                "moe/expert_usage_entropy", "moe/expert_usage_max", "dormant/tau0_pct", "dormant/tau0.1_pct",
                "dormant/conv1_tau0_pct", "dormant/experts_tau0.1_pct"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    lengths = [v for _, v in tags["charts/episodic_length"]]
    assert max(lengths) <= 150  # --max-episode-steps truncates
    returns = [v for _, v in tags["charts/episodic_return"]]
    assert max(returns) >= 5  # raw Space Invaders scores (5 to 30 a kill), not clipped rewards
    assert all(0 <= v <= 100 for _, v in tags["dormant/tau0.1_pct"])
    assert [s for s, _ in tags["losses/td_loss"]] == [149, 199, 249, 299, 349, 399]
    checkpoint = read_checkpoint(run_dir)
    assert checkpoint["global_step"] == 400
    rewards = checkpoint["replay"]["reward"]
    assert rewards.max() == 1.0 and rewards.min() >= -1.0  # the memory holds clipped rewards
    info = result(run_dir)
    assert info["steps"] == 400 and info["episodes"] == len(returns) and info["env_id"] == "ALE/SpaceInvaders-v5"


# a target copy every 150 steps (after the warm-up of 100: at 150, 300, ...): the interruption comes after the first.
# A Top-2 MoE with noisy routing and the three auxiliary losses: the router's and the load loss's noise come from
# torch's generator, and the log interval's auxiliary sums must resume too
RESUME = [*TINY, "--total-timesteps", 700, "--checkpoint-every", 100, "--target-network-frequency", 150,
          "--moe-type", "top1", "--num-selected-experts", 2, "--noisy-routing", "--aux-loss-fns", "naive_entropy",
          "importance_loss", "load_loss"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    run_script(SCRIPT, *RESUME, cwd=cwd)
    run_dir = only_run_dir(cwd)
    tags = scalars(run_dir)
    for name in ("naive_entropy", "importance_loss", "load_loss"):
        assert len(tags[f"losses/{name}"]) == 12 and all(v >= 0 for _, v in tags[f"losses/{name}"]), name
    return run_dir


def assert_same_training_state(a, b):
    assert a["global_step"] == b["global_step"] == 700
    assert a["run"]["episode"] == b["run"]["episode"]
    for key in ("q_network", "target_network"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for name in set(a["replay"]) - {"segments"}:  # the same data, however the saves split it into segments
        x, y = a["replay"][name], b["replay"][name]
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f"replay {name} differs"
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}.{k} differs"
    assert a["rng"]["numpy"] == b["rng"]["numpy"]
    assert torch.equal(a["env"]["ale"], b["env"]["ale"])


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL])
def test_killed_run_resumes_bit_identically(tmp_path, uninterrupted, kill):
    proc = start_script(SCRIPT, *RESUME, cwd=tmp_path)
    run_dir = wait_for_checkpoint(tmp_path, proc, min_step=200)  # after the first target copy
    proc.send_signal(kill)
    out, err = proc.communicate(timeout=120)
    if kill == signal.SIGTERM:
        assert proc.returncode == 143, err
        assert "SIGTERM at step" in out and "checkpoint saved" in out
    interrupted_at = read_checkpoint(run_dir)["global_step"]
    assert 200 <= interrupted_at < 700, "the run was not interrupted between target copies"
    resumed = run_script(SCRIPT, "--resume", run_dir, cwd=tmp_path)
    assert "resumed" in resumed.stdout and f"at step {interrupted_at:,}" in resumed.stdout
    assert_same_training_state(read_checkpoint(uninterrupted), read_checkpoint(run_dir))
    assert_same_scalars(uninterrupted, run_dir)  # the log interval in progress at the stop included
    steps = [s for s, _ in scalars(run_dir)["charts/SPS"]]
    assert steps == sorted(set(steps)), "a resumed run must not log the same step twice"


def test_nonfinite_loss_stops_after_saving_a_checkpoint(tmp_path):
    proc = run_script(SCRIPT, *TINY, "--learning-rate", "1e20", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "--learning-rate" in proc.stderr
    checkpoint = read_checkpoint(only_run_dir(tmp_path))
    assert 100 < checkpoint["global_step"] <= 400


BAD_FLAGS = [
    (dict(total_timesteps=0), "--total-timesteps"),
    (dict(capacity_factor=0.0), "--capacity-factor"),
    (dict(moe_type="baseline", capacity_factor=0.5), "--capacity-factor"),
    (dict(num_experts=0), "--num-experts"),
    (dict(expert_hidden_units=-3), "--expert-hidden-units"),
    (dict(batch_size=0), "--batch-size"),
    (dict(learning_rate=-1e-4), "--learning-rate"),
    (dict(gamma=1.5), "--gamma"),
    (dict(env_id="NotAGame-v0"), "--env-id"),
    (dict(env_id="CartPole-v1"), "--env-id"),
    (dict(buffer_size=10, batch_size=32), "--buffer-size"),
    (dict(moe_type="baseline", tokenization="perfeat"), "--tokenization"),
    (dict(moe_type="top1", moe_normalization=True), "--moe-normalization"),
    (dict(learning_starts=2), "--learning-starts"),
]


@pytest.mark.parametrize("kwargs,flag", BAD_FLAGS)
def test_bad_flags_stop_with_one_clear_line(kwargs, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        m.check_args(m.Args(**kwargs))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


def test_replay_that_does_not_fit_stops_before_allocating(capsys):
    with pytest.raises(SystemExit):
        m.place_replay(10**9, torch.device("cpu"), m.ReplayMemory.bytes_per_slot())  # ~7 TB
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --buffer-size 1000000000") and "lower --buffer-size" in err


def test_resume_rejects_missing_file_and_changed_network(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse(m, ["--resume", str(tmp_path / "nope")])
    assert "--resume" in capsys.readouterr().err
    folder = fake_checkpoint(tmp_path / "checkpoint", SCRIPT, m.Args(num_experts=8))
    with pytest.raises(SystemExit):
        parse(m, ["--resume", str(folder), "--num-experts", "4"])
    assert "--num-experts 4 differs from the checkpoint's 8" in capsys.readouterr().err
    args, checkpoint = parse(m, ["--resume", str(folder), "--total-timesteps", "99"])
    assert args.total_timesteps == 99 and args.num_experts == 8 and checkpoint["folder"] == str(folder)


def test_cli_bad_flag_exits_fast_with_one_line(tmp_path):
    start = time.time()
    proc = run_script(SCRIPT, "--num-experts", 0, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --num-experts must be positive, got 0"
    assert not (tmp_path / "runs").exists()
    assert time.time() - start < 60


def test_progress_shows_the_evaluation_and_says_that_learning_is_slower_than_the_warm_up(tmp_path, capsys):
    proc = run_script(SCRIPT, *TINY, "--total-timesteps", 120, "--save-model", "--eval-episodes", 2,
                      "--max-episode-steps", 40, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("evaluation: ")]
    assert [line.split(" | ")[0] for line in lines] == ["evaluation: 1/2 episodes", "evaluation: 2/2 episodes"]
    assert "mean return" in lines[-1] and lines[-1].endswith("ETA 0m00s")
    progress = m.Progress(total_steps=1000, start_step=0, interval=0.0)
    progress.samples.appendleft((progress.samples[0][0] - 10.0, 0))  # 100 steps in 10 s
    progress.update(100, None, 0, 0.1, force=True, warm_up=True)
    assert "ETA over 1m30s (warm-up speed; learning is slower)" in capsys.readouterr().out
    progress.update(200, None, 0, 0.2, force=True)
    assert "learning is slower" not in capsys.readouterr().out
