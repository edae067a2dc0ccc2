"""der_single_expert.py end to end on the real ALE with tiny budgets: the JSON result of the Atari 100k protocol,
life loss terminal for learning only, a resumed run, bad flags."""
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import (assert_same_scalars, check_flags, fake_checkpoint, load_script, only_run_dir, parse, read_checkpoint,
                     result, run_script, scalars, start_script, wait_for_checkpoint)

m = load_script("der_single_expert")
SCRIPT = "der_single_expert"
# the van Hasselt et al. network (cheap on a CPU); Assault loses a life every 40-170 agent steps under a fixed
# action, so that every 250-step episode holds lost lives
TINY = ["--encoder", "der", "--env-id", "ALE/Assault-v5", "--total-timesteps", 800, "--learning-starts", 100,
        "--max-episode-steps", 250, "--buffer-size", 2008, "--batch-size", 8, "--log-frequency", 50, "--stats-frequency", 250,
        "--stats-batch-size", 16, "--eval-episodes", 2]


def episode_ends(run_dir):
    """(terminations, episode ends) of the transitions in the checkpoint's replay memory, and the episode count."""
    checkpoint = read_checkpoint(run_dir)
    replay = checkpoint["replay"]
    n = replay["cursor"]
    assert n < 2008, "the memory must hold the whole run for this count"
    transition = replay["is_transition"][:n].numpy()
    terminated = replay["terminated"][:n].numpy() & transition
    ends = replay["episode_end"][:n].numpy() & transition
    return int(terminated.sum()), int(ends.sum()), checkpoint["run"]["episode"][2]


def game_first_frames(run_dir):
    """The frame each learning episode starts on, from the checkpoint's replay memory (slot 0 and every slot after an
    episode's final frame): with --no-terminal-on-life-loss, the frame each game starts on."""
    replay = read_checkpoint(run_dir)["replay"]
    final = ~replay["is_transition"][:replay["cursor"]].numpy()
    return [replay["frames"][slot].numpy().tobytes() for slot in [0, *(np.flatnonzero(final[:-1]) + 1)]]


# the lost-life test needs episodes, not learning: 200 updates (from step 600) instead of 700
LIVES = [*TINY, "--learning-starts", 600]


def test_end_to_end_writes_the_atari_100k_result_and_ends_learning_episodes_at_a_lost_life(tmp_path):
    # a random evaluation policy, so that the episodes' scores differ and their mean differs from their best
    proc = run_script(SCRIPT, *LIVES, "--checkpoint-every", 800, "--save-model", "--eval-episodes", 3,
                      "--eval-epsilon", 1.0, cwd=tmp_path)
    assert "score" in proc.stdout and "human-normalized" in proc.stdout
    progress = [line for line in proc.stdout.splitlines() if line.startswith("evaluation: ")]  # like training's
    assert [line.split(" | ")[0] for line in progress] == [f"evaluation: {i}/3 episodes" for i in (1, 2, 3)]
    assert "mean return" in progress[-1] and progress[-1].endswith("ETA 0m00s")
    run_dir = only_run_dir(tmp_path)
    info = result(run_dir)
    assert set(info) >= {"script", "env_id", "game", "seed", "steps", "episodes", "eval_returns", "score", "hns",
                         "wall_time_s", "args"}
    assert (info["script"], info["game"], info["seed"], info["steps"]) == ("der_single_expert", "Assault", 1, 800)
    assert len(info["eval_returns"]) == 3 and len(set(info["eval_returns"])) > 1
    assert info["score"] == pytest.approx(np.mean(info["eval_returns"]))
    assert info["hns"] == pytest.approx((info["score"] - 222.4) / (742.0 - 222.4))
    assert info["args"]["n_step"] == 10 and info["args"]["encoder"] == "der" and info["wall_time_s"] > 0
    assert (run_dir / "der_single_expert.cleanrl_model").exists()
    tags = scalars(run_dir)
    for tag in ("charts/episodic_return", "charts/SPS", "losses/td_loss", "losses/q_values", "replay/max_priority",
                "dormant/tau0_pct", "dormant/value_hidden_tau0.1_pct", "eval/episodic_return", "eval/score",
                "eval/human_normalized_score"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert [s for s, _ in tags["losses/td_loss"]] == list(range(649, 800, 50))  # an update every step after 600

    # a lost life ends the n-step return in the replay memory, but the episode (and its return) goes on to game over
    terminations, ends, episodes = episode_ends(run_dir)
    assert episodes == len(tags["charts/episodic_return"]) == info["episodes"] >= 3
    # every agent step is one transition: the no-op steps that start an episode are neither stored nor counted
    assert read_checkpoint(run_dir)["replay"]["is_transition"].numpy().sum() == 800
    assert ends > episodes and terminations >= ends - episodes  # every extra end is a lost life, and terminal
    assert max(v for _, v in tags["charts/episodic_length"]) > 100  # longer than one life
    # the agent's own frame stack restarts at a lost life, as the replay memory's does: stop the same run right
    # after its first lost life (the runs are deterministic) and look at the stack it would act on next
    replay = read_checkpoint(run_dir)["replay"]
    transition = replay["is_transition"].numpy()
    first_loss = int(np.flatnonzero(replay["terminated"].numpy() & transition)[0])
    step = int(transition[:first_loss].sum())  # the agent step whose transition lost the life
    for total, restarted in ((step + 1, True), (step, False)):
        cwd = tmp_path / f"stop_at_{total}"
        cwd.mkdir()
        run_script(SCRIPT, *LIVES, "--total-timesteps", total, "--checkpoint-every", total, "--eval-episodes", 0,
                   cwd=cwd)
        stack = read_checkpoint(only_run_dir(cwd))["stack"]
        assert all(torch.equal(stack[k], stack[3]) for k in range(3)) == restarted
    (tmp_path / "no_life_loss").mkdir()
    run_script(SCRIPT, *LIVES, "--checkpoint-every", 800, "--eval-episodes", 0, "--no-terminal-on-life-loss",
               cwd=tmp_path / "no_life_loss")
    terminations, ends, episodes = episode_ends(only_run_dir(tmp_path / "no_life_loss"))
    assert ends == episodes >= 3  # only game overs and the time limit end a learning episode
    # the games start after 0-29 random no-op steps (Dopamine's Atari 100k runner), not always on the same frame as
    # the deterministic ALE (no sticky actions) would have them; the first game's count is the run generator's first draw
    starts = game_first_frames(only_run_dir(tmp_path / "no_life_loss"))
    assert len(starts) == episodes + 1 and len(set(starts[1:])) > 1
    first, _ = m.start_episode(m.make_env("ALE/Assault-v5", 1, 0.0, 250), 30, np.random.default_rng(1), seed=1)
    assert starts[0] == first.tobytes()
    assert result(only_run_dir(tmp_path / "no_life_loss"))["score"] is None


# target copies at 150, 300, 450, 600 (DER.gin: every 2,000): the interruption comes after the first; ReDo events
# after every 50th update (steps 150, 200, ..., 550) on both sides of it
# an update every 2 steps (half the cost): ReDo every 25 updates still comes at steps 150, 200, ..., 550
RESUME = [*TINY, "--total-timesteps", 600, "--checkpoint-every", 100, "--eval-episodes", 0, "--train-frequency", 2,
          "--target-network-frequency", 150, "--redo", "--redo-period", 25, "--redo-tau", 0.1, "--redo-batch-size", 16]


def test_sigterm_then_resume_is_bit_identical(tmp_path):
    (tmp_path / "uninterrupted").mkdir()
    run_script(SCRIPT, *RESUME, cwd=tmp_path / "uninterrupted")
    uninterrupted = read_checkpoint(only_run_dir(tmp_path / "uninterrupted"))
    cwd = tmp_path / "interrupted"
    cwd.mkdir()
    proc = start_script(SCRIPT, *RESUME, cwd=cwd)
    run_dir = wait_for_checkpoint(cwd, proc, min_step=200)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    interrupted_at = read_checkpoint(run_dir)["global_step"]
    assert 200 <= interrupted_at < 600
    resumed = run_script(SCRIPT, "--resume", run_dir, cwd=cwd)
    assert f"at step {interrupted_at:,}" in resumed.stdout
    assert "evaluation     none (--eval-episodes 0)" in resumed.stdout  # the summary: DER evaluates without --save-model
    final = read_checkpoint(run_dir)
    assert final["global_step"] == uninterrupted["global_step"] == 600
    assert final["run"]["episode"] == uninterrupted["run"]["episode"]  # return, length, episodes, updates
    assert final["lives"] == uninterrupted["lives"]
    assert np.array_equal(final["stack"], uninterrupted["stack"])
    for key in ("q_network", "target_network"):
        for name, tensor in uninterrupted[key].items():
            assert torch.equal(tensor, final[key][name]), f"{key}.{name} differs"
    for key in ("terminated", "reward", "action", "frames"):
        assert torch.equal(uninterrupted["replay"][key], final["replay"][key]), key
    assert torch.equal(uninterrupted["replay"]["priorities"], final["replay"]["priorities"])
    assert_same_scalars(only_run_dir(tmp_path / "uninterrupted"), run_dir)
    tags = scalars(run_dir)
    assert [s for s, _ in tags["redo/recycled_count"]] == list(range(150, 600, 50))
    assert sum(v for _, v in tags["redo/recycled_count"]) > 0


@pytest.mark.parametrize("kwargs,flag", [
    (dict(eval_episodes=-1), "--eval-episodes"),
    (dict(noop_max=-1), "--noop-max"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm"),
    (dict(eval_epsilon=1.5), "--eval-epsilon"),
    (dict(n_step=0), "--n-step"),
    (dict(learning_starts=15, n_step=10), "--learning-starts"),
    (dict(capacity_factor=0.0), "--capacity-factor"),
    (dict(encoder="der", capacity_factor=0.5), "--capacity-factor"),
    (dict(redo_period=-5), "--redo-period"),
    (dict(redo_batch_size=0), "--redo-batch-size"),
    (dict(redo_tau=-1.0), "--redo-tau"),
    # the official period (200,000 updates) never comes in 100k agent steps: --redo alone would never recycle
    (dict(redo=True), "--redo-period"),
])
def test_bad_flags_stop_with_one_clear_line(kwargs, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_flags(m, m.Args(**kwargs))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


def test_redo_needs_a_period_that_comes_within_the_run(capsys):
    with pytest.raises(SystemExit):
        check_flags(m, m.Args(redo=True))
    assert capsys.readouterr().err.strip() == (
        "error: --redo-period 200000 is more than the run's 98,399 gradient updates, so --redo would never recycle; use "
        "a smaller --redo-period (the paper's Atari runs: 1000)")
    check_flags(m, m.Args(redo=True, redo_period=1000, redo_tau=0.1, redo_batch_size=64))  # the paper's settings
    check_flags(m, m.Args(redo=True, redo_period=98_399))  # one event, after the last update


def test_cli_bad_flag_exits_fast_with_one_line(tmp_path):
    proc = run_script(SCRIPT, "--encoder", "der", "--num-experts", 4, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --num-experts does not apply to --encoder der")
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_checkpoint_with_flags_the_script_no_longer_has(tmp_path, capsys):
    # a run of the script before --noop-max: it trained without no-op starts and evaluated with --eval-noop-max
    old = {**{k: v for k, v in vars(m.Args()).items() if k != "noop_max"}, "eval_noop_max": 30}
    folder = fake_checkpoint(tmp_path / "checkpoint", SCRIPT, SimpleNamespace(**old))
    with pytest.raises(SystemExit):
        parse(m, ["--resume", str(folder)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "(eval_noop_max)" in err[0] and "start a new run" in err[0], err
