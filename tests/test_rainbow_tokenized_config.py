"""rainbow_tokenized.py against Dopamine's `labs/moes/configs/full_rainbow.gin` (JaxFullRainbowAgent) and, for ReDo,
the ReDo lab's recycled Rainbow agent: every default measured on the script's own code path (Args, make_optimizer,
make_replay, make_training_env, train_step with its prioritized sampling and, with --redo's after-update hook, its
ReDo events, update, beta_at, clip_reward, evaluation_settings, the network the script builds) and compared with a
table of the official values; then the schedule and the choices by behaviour, and the rewards of a real training run:
clipped for learning, raw in the logged return."""
import dataclasses
import math

import numpy as np
import pytest
from harness import build_network, load_script
from official_config import (
    assert_matches_official, assert_rewards_clipped_for_learning_and_raw_in_the_return, categorical_candidates,
    categorical_settings, clip_settings, crafted_categorical_update, env_settings, evaluation_run,
    first_update_and_period, optimizer_settings, prioritized_schedule, priority_settings, redo_settings,
    replay_settings, run_and_replay)

m = load_script("rainbow_tokenized")

REDO = "labs/redo"
GIN = "labs/moes/configs/full_rainbow.gin"
# Dopamine's official values, each with the gin line (or the code, where the gin sets nothing) it comes from
OFFICIAL = {
    "optimizer": ("Adam", f"{GIN}: JaxDQNAgent.optimizer = 'adam'"),
    "learning rate": (6.25e-5, f"{GIN}: create_optimizer.learning_rate = 0.0000625"),
    "Adam epsilon": (1.5e-4, f"{GIN}: create_optimizer.eps = 0.00015"),
    "Adam betas": ((0.9, 0.999), "dqn_agent.create_optimizer: beta1 = 0.9, beta2 = 0.999"),
    "weight decay": (0.0, "dqn_agent.create_optimizer: plain optax.adam"),
    # deviation 8 in docs/rainbow_tokenized.md: clipping is a flag, off by default as in Dopamine
    "gradient clipping": ("none", "dqn_agent.create_optimizer: plain optax.adam"),
    "replay": ("prioritized", f"{GIN}: JaxFullRainbowAgent.replay_scheme = 'prioritized'"),
    "replay capacity": (1_000_000, f"{GIN}: OutOfGraphPrioritizedReplayBuffer.replay_capacity = 1000000"),
    "batch size": (32, f"{GIN}: OutOfGraphPrioritizedReplayBuffer.batch_size = 32"),
    "n-step": (3, f"{GIN}: JaxDQNAgent.update_horizon = 3"),
    "gamma": (0.99, f"{GIN}: JaxDQNAgent.gamma = 0.99"),
    "frame stack": (4, "dqn_agent: NATURE_DQN_STACK_SIZE = 4"),
    "priority exponent": (0.5, "full_rainbow_agent: priorities jnp.sqrt(loss + 1e-10)"),
    # deviation 9 in docs/rainbow_tokenized.md: (N p)^-beta normalized by the batch max, beta fixed at Dopamine's 0.5
    "importance-sampling exponent at the first update": (0.5, "full_rainbow_agent: loss weights 1 / jnp.sqrt(p + 1e-10)"),
    "importance-sampling exponent at the last step": (0.5, "full_rainbow_agent: fixed, no annealing"),
    "warm-up (agent steps)": (20_000, f"{GIN}: JaxDQNAgent.min_replay_history = 20000"),
    "update period (agent steps)": (4, f"{GIN}: JaxDQNAgent.update_period = 4"),
    "updates per training step": (1, f"{GIN}: JaxFullRainbowAgent.num_updates_per_train_step = 1"),
    "target update period (agent steps)": (8_000, f"{GIN}: JaxDQNAgent.target_update_period = 8000"),
    "training length (agent steps)": (50_000_000, f"{GIN}: Runner.num_iterations = 200 x Runner.training_steps = 250000"),
    # deviation 10 in docs/rainbow_tokenized.md: current Dopamine's zero_epsilon (the April 2024 MoE release: 0.01)
    "epsilon (train)": (0.0, f"{GIN}: JaxFullRainbowAgent.noisy = True replaces the epsilon_fn by zero_epsilon"),
    "epsilon (evaluation)": (0.001, f"{GIN}: JaxDQNAgent.epsilon_eval = 0.001"),
    "noisy sigma0": (0.1, "jax/networks.NoisyNetwork: sigma initialised to 0.1 / sqrt(fan_in)"),
    "support": ((-10.0, 10.0, 51), f"{GIN}: JaxFullRainbowAgent.vmax = 10., num_atoms = 51; vmin = -vmax"),
    "dueling noisy heads": (True, f"{GIN}: JaxFullRainbowAgent.dueling = True, noisy = True"),
    "loss": ("cross-entropy", "full_rainbow_agent: softmax_cross_entropy with the projected target"),
    "TD target": ("double Q", f"{GIN}: JaxFullRainbowAgent.double_dqn = True"),
    "sticky actions": (0.25, f"{GIN}: atari_lib.create_atari_environment.sticky_actions = True (p = 0.25)"),
    "frame skip": (4, "atari_lib.AtariPreprocessing: frame_skip = 4, max-pool over the last two frames"),
    # deviation 11 in docs/rainbow_tokenized.md: the cap is the ALE's 108,000-frame cap
    "max agent steps per episode": (27_000, f"{GIN}: Runner.max_steps_per_episode = 27000"),
    "no-op starts (training)": (0, "run_experiment.Runner: none"),
    "minimal action set": (True, "atari_lib: gym's <Game>NoFrameskip-v0 minimal action set"),
    "observation": (((84, 84), True), "atari_lib.AtariPreprocessing: 84x84 greyscale"),
    "life loss ends the environment's episode": (False, "atari_lib.AtariPreprocessing.terminal_on_life_loss = False"),
    "reward clipping": ((-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0), "run_experiment.Runner: reward = np.clip(reward, -1, 1)"),
    "encoder": ("ImpalaEncoder", f"{GIN}: FullRainbowMoENetwork.encoder_type = 'IMPALA', nn_scale = 1"),
    "MoE layer": ("SoftMoE", f"{GIN}: FullRainbowMoENetwork.moe_type = 'SOFTMOE'"),
    "experts": (4, f"{GIN}: FullRainbowMoENetwork.num_experts = 4"),
    "expert hidden units": (512, f"{GIN}: FullRainbowMoENetwork.expert_hidden_units = 512"),
    "tokens": (121, "networks.FullRainbowMoENetwork: routing_type = 'PER_PIXEL' on the 11x11 Impala output"),
    "slots per expert": (31, "softmoe.SoftMoE.capacity_factor = 1.0: ceil(121 x 1.0 / 4)"),
    "expert type": ("small", f"{GIN}: FullRainbowMoENetwork.expert_type = 'SMALL'"),
    "extra linear layer before the heads": (False, f"{GIN}: FullRainbowMoENetwork.use_extra_linear_layer = False"),
    # ReDo: the lab's recycled_rainbow_agent.py and its NeuronRecycler (weight_recyclers.py); configs/rainbow_dense.gin
    # binds none of these
    "ReDo": (False, f"{REDO}/recycled_rainbow_agent.py:36: reset_mode = None (no recycler)"),
    "ReDo period (gradient updates)": (200_000, f"{REDO}/weight_recyclers.py:149: BaseRecycler.reset_period = 200_000"),
    "ReDo threshold tau": (0.0, f"{REDO}/weight_recyclers.py:147: BaseRecycler.dead_neurons_threshold = 0.0"),
    "ReDo probe batch": (256, f"{REDO}/recycled_rainbow_agent.py:39: batch_size_statistics = 256"),
    "ReDo probe sampling": ("prioritized", f"{REDO}/recycled_rainbow_agent.py:184: "
                            "replay.sample_transition_batch, by priority in Dopamine's prioritized buffer"),
}


def redo_defaults(args, monkeypatch):
    """The ReDo period, tau, probe batch and probe sampling that --redo runs with at the other defaults, measured at
    update numbers around the paper's period (1000) and the official one (200,000): the events depend on the update
    number only."""
    numbers = [1, 999, 1000, 1001, 199_999, 200_000, 200_001, 400_000]
    redo = redo_settings(m, dataclasses.replace(args, redo=True), numbers, monkeypatch)
    period = redo["events"][0]
    assert redo["events"] == [n for n in numbers if n % period == 0], redo["events"]
    return {"ReDo period (gradient updates)": period, "ReDo threshold tau": redo["tau"],
            "ReDo probe batch": redo["probe batch"], "ReDo probe sampling": redo["probe sampling"]}


@pytest.fixture(scope="module")
def default_schedule():
    """train_step with the default Args over the first 32,000 agent steps (the update stood in for)."""
    return prioritized_schedule(m, m.Args(), 32_000)


def test_defaults_match_the_official_full_rainbow_gin(default_schedule, monkeypatch):
    args = m.Args()
    updates, copies, calls, memory = default_schedule
    warm_up, period = first_update_and_period(updates)
    net = build_network(m, args, 18)
    features = net.tokenizer.num_tokens * net.tokenizer.token_dim
    measured = {
        **optimizer_settings(m, args), **replay_settings(m, args, monkeypatch), "batch size": len(calls[0]["index"]),
        **priority_settings(m, args, calls, memory),
        "warm-up (agent steps)": warm_up, "update period (agent steps)": period,
        "updates per training step": max(np.bincount(updates)),
        "target update period (agent steps)": int(np.diff(copies)[0]), "training length (agent steps)": args.total_timesteps,
        "epsilon (train)": args.epsilon_train, "epsilon (evaluation)": m.evaluation_settings(args)["epsilon"],
        "noisy sigma0": round(net.head.value.weight_sigma[0, 0].item() * math.sqrt(net.head.value.weight_mu.shape[1]),
                              6),
        "support": (net.support[0].item(), net.support[-1].item(), len(net.support)),
        "dueling noisy heads": isinstance(net.head.value, m.NoisyLinear) and isinstance(net.head.advantage, m.NoisyLinear),
        **categorical_settings(m), **env_settings(m, args), "reward clipping": clip_settings(m),
        "encoder": type(net.encoder).__name__, "MoE layer": type(net.moe).__name__,
        "experts": net.moe.experts.w1_mu.shape[0], "expert hidden units": net.moe.experts.w1_mu.shape[2],
        "tokens": net.tokenizer.num_tokens,
        "slots per expert": net.moe.slots_per_expert,
        "expert type": "big" if isinstance(net.moe.experts, m.BigExperts) else "small",
        "extra linear layer before the heads": net.head.value.weight_mu.shape[1] != features,
        "ReDo": bool(redo_settings(m, args, [args.redo_period], monkeypatch)["events"]),
        **redo_defaults(args, monkeypatch),
    }
    assert {len(call["index"]) for call in calls} == {32}
    assert_matches_official(OFFICIAL, measured)


def test_updates_and_target_copies_follow_the_warm_up_and_their_periods(default_schedule):
    updates, copies, calls, _ = default_schedule
    assert updates[:3] == [20_004, 20_008, 20_012] and updates[-1] == 32_000 and len(updates) == 3_000
    assert copies == [24_000, 32_000]
    assert all(call["max_grad_norm"] == 0.0 for call in calls)


def test_the_loss_is_the_cross_entropy_to_the_double_q_target():
    expected = categorical_candidates()
    assert len({round(v, 4) for v in expected.values()}) == len(expected)  # the transition tells them all apart
    assert crafted_categorical_update(m) == pytest.approx(expected[("cross-entropy", "double Q")], rel=1e-5)


def test_evaluation_plays_the_noise_free_network_epsilon_greedy_with_epsilon_eval(monkeypatch, tmp_path):
    args = m.Args(env_id="ALE/Assault-v5", max_episode_steps=250)
    made, actions, modes, returns = evaluation_run(m, monkeypatch, tmp_path, args, distributional=True)
    assert len(returns) == 2 and len(made) == 1
    assert modes and not any(modes), "evaluation must run the network in eval mode: every noisy layer off"
    env_args = made[0]
    assert (env_args["repeat_action_probability"], env_args["noop_max"], env_args["max_episode_steps"]) == (0.25, 0, 250)
    assert len(actions) > 300 and (actions != 1).sum() <= 3  # epsilon 0.001: a random action about once in 1000
    _, actions, _, _ = evaluation_run(m, monkeypatch, tmp_path, m.Args(env_id="ALE/Assault-v5", max_episode_steps=250,
                                                                   eval_epsilon=1.0), distributional=True)
    assert np.bincount(actions, minlength=7).min() > 0.6 * len(actions) / 7  # uniform over Assault's 7 actions


def test_rewards_are_clipped_for_learning_and_raw_in_the_logged_return(tmp_path):
    # Assault scores 21 an enemy; with the default sticky actions (0.25), frame skip 4 and no no-ops, the actions the
    # memory recorded replay the same run (a small Nature-encoder network, for speed; random actions, since an untrained
    # noisy network tends to repeat one action and score nothing)
    flags = ["--env-id", "ALE/Assault-v5", "--total-timesteps", 300, "--learning-starts", 100, "--buffer-size", 1000,
             "--max-episode-steps", 100, "--checkpoint-every", 300, "--batch-size", 8, "--encoder", "nature",
             "--num-experts", 1, "--expert-hidden-units", 8, "--epsilon-train", 1.0]
    _, tags, played, stored, returns = run_and_replay("rainbow_tokenized", flags, tmp_path, sticky=0.25,
                                                      life_loss_terminal=False)
    assert_rewards_clipped_for_learning_and_raw_in_the_return(played, stored, returns, tags)
