"""dqn_redo.py end to end on the real ALE with tiny budgets: ReDo events and dormancy logged, checkpoint and
bit-identical resume across ReDo events, non-finite loss, bad input."""
import math
import signal

import pytest
import torch
from harness import (parse, assert_same_scalars, fake_checkpoint, load_script, only_run_dir, read_checkpoint, result,
                     run_script, scalars, start_script, wait_for_checkpoint)

m = load_script("dqn_redo")
SCRIPT = "dqn_redo"
# 2 updates every 4 agent steps after step 100: updates 1..98, a ReDo event after every 5th
TINY = ["--env-id", "ALE/SpaceInvaders-v5", "--total-timesteps", 300, "--learning-starts", 100, "--buffer-size", 600,
        "--log-frequency", 50, "--stats-frequency", 100, "--stats-batch-size", 32, "--max-episode-steps", 150,
        "--replay-ratio", 0.5, "--redo-period", 5, "--redo-tau", 0.1, "--checkpoint-every", 100, "--batch-size", 8]
LAYERS = ("conv1", "conv2", "conv3", "hidden")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("uninterrupted")
    run_script(SCRIPT, *TINY, cwd=cwd)
    return only_run_dir(cwd)


def test_end_to_end_recycles_and_logs(uninterrupted):
    tags = scalars(uninterrupted)
    for tag in ("charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/epsilon", "losses/td_loss",
                "losses/q_values", "dormant/tau0_pct", "dormant/tau0.1_pct", "redo/recycled_count",
                *(f"dormant/{layer}_tau{tau}_pct" for layer in LAYERS for tau in ("0", "0.1")),
                *(f"redo/{layer}_recycled_count" for layer in LAYERS)):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    # update u is made at agent step 100 + 4 * ceil(u / 2); events follow updates 5, 10, ..., 95
    expected_steps = [100 + 4 * math.ceil(u / 2) for u in range(5, 99, 5)]
    events = tags["redo/recycled_count"]
    assert [step for step, _ in events] == expected_steps
    per_layer = [sum(v for layer in LAYERS for s, v in tags[f"redo/{layer}_recycled_count"] if s == step)
                 for step in expected_steps]
    assert [v for _, v in events] == per_layer
    assert sum(per_layer) > 0, "no neuron was recycled during the run"
    assert all(0 <= v <= 672 for v in per_layer)
    assert [s for s, _ in tags["dormant/tau0_pct"]] == [199, 299]  # every --stats-frequency steps after warm-up
    for step, value in tags["dormant/tau0.1_pct"]:
        tau0 = dict(tags["dormant/tau0_pct"])[step]
        assert 0 <= tau0 <= value <= 100
    assert [s for s, _ in tags["losses/td_loss"]] == [149, 199, 249, 299]
    info = result(uninterrupted)
    assert info["steps"] == 300 and info["args"]["redo_tau"] == 0.1 and info["env_id"] == "ALE/SpaceInvaders-v5"


def test_sigterm_then_resume_is_bit_identical(tmp_path, uninterrupted):
    proc = start_script(SCRIPT, *TINY, cwd=tmp_path)
    run_dir = wait_for_checkpoint(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM at step" in out and "checkpoint saved" in out
    interrupted_at = read_checkpoint(run_dir)["global_step"]
    assert 100 <= interrupted_at < 250, "the run was not interrupted before its last ReDo events"
    resumed = run_script(SCRIPT, "--resume", run_dir, cwd=tmp_path)
    assert f"at step {interrupted_at:,}" in resumed.stdout
    a, b = read_checkpoint(uninterrupted), read_checkpoint(run_dir)
    assert a["global_step"] == b["global_step"] == 300 and a["run"]["episode"] == b["run"]["episode"]
    for key in ("q_network", "target_network"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for p, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["optimizer"]["state"][p][k]), f"optimizer state {p}.{k} differs"
    for name in set(a["replay"]) - {"segments"}:  # the same data, however the saves split it into segments
        x, y = a["replay"][name], b["replay"][name]
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), f"replay {name} differs"
    assert a["rng"]["numpy"] == b["rng"]["numpy"] and torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert_same_scalars(uninterrupted, run_dir)  # ReDo counts and the log interval in progress at the stop included


def test_nonfinite_loss_stops_after_saving_a_checkpoint(tmp_path):
    proc = run_script(SCRIPT, *TINY, "--learning-rate", "1e20", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "non-finite loss" in proc.stderr and "--learning-rate" in proc.stderr
    checkpoint = read_checkpoint(only_run_dir(tmp_path))
    assert 100 < checkpoint["global_step"] <= 300


BAD_FLAGS = [
    (dict(replay_ratio=0.3), "--replay-ratio"),
    (dict(replay_ratio=0.0), "--replay-ratio"),
    (dict(replay_ratio=0.125), "--replay-ratio"),  # half an update every 4 steps
    (dict(replay_ratio=-1.0), "--replay-ratio"),
    (dict(redo_period=0), "--redo-period"),
    (dict(redo_batch_size=0), "--redo-batch-size"),
    (dict(redo_tau=-0.1), "--redo-tau"),
    (dict(redo_tau=float("nan")), "--redo-tau"),
    (dict(train_frequency=0), "--train-frequency"),
    (dict(total_timesteps=0), "--total-timesteps"),
    (dict(learning_rate=-1e-4), "--learning-rate"),
    (dict(gamma=1.5), "--gamma"),
    (dict(env_id="CartPole-v1"), "--env-id"),
    (dict(buffer_size=10, batch_size=32), "--buffer-size"),
    (dict(learning_starts=2), "--learning-starts"),
]


@pytest.mark.parametrize("kwargs,flag", BAD_FLAGS)
def test_bad_flags_stop_with_one_clear_line(kwargs, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        m.check_args(m.Args(**kwargs))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


@pytest.mark.parametrize("kwargs", [dict(), dict(replay_ratio=0.5), dict(replay_ratio=1.0), dict(replay_ratio=2.0),
                                    dict(replay_ratio=0.125, train_frequency=8), dict(redo=False)])
def test_paper_settings_pass(kwargs):
    m.check_args(m.Args(**kwargs))


def test_resume_keeps_the_redo_flags(tmp_path, capsys):
    path = fake_checkpoint(tmp_path / "checkpoint", SCRIPT, m.Args(redo_tau=0.1, replay_ratio=1.0))
    with pytest.raises(SystemExit):
        parse(m, ["--resume", str(path), "--redo-tau", "0.025"])
    assert "--redo-tau 0.025 differs from the checkpoint's 0.1" in capsys.readouterr().err
    args, _ = parse(m, ["--resume", str(path), "--total-timesteps", "99"])
    assert args.total_timesteps == 99 and args.redo_tau == 0.1 and args.replay_ratio == 1.0


def test_cli_bad_flag_exits_fast_with_one_line(tmp_path):
    proc = run_script(SCRIPT, "--replay-ratio", 0.3, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --replay-ratio 0.3 x --train-frequency 4")
    assert not (tmp_path / "runs").exists()
