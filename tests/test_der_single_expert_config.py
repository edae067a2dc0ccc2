"""der_single_expert.py against Dopamine's `labs/moes/configs/DER.gin` (Atari 100k) and, for ReDo, the ReDo lab's
recycled Atari-100k Rainbow agent: every default measured on the script's own code path (Args, make_optimizer,
make_replay, make_training_env, train_step with its prioritized sampling and, with --redo's after-update hook, its
ReDo events, update, beta_at, clip_reward, the network the script builds) and compared with a table of the official
values; then the schedule and the choices by behaviour, and the rewards of a real training run: clipped for learning,
raw in the logged return, with a lost life terminal for learning only. The evaluation protocol's behaviour is tested
in test_der_single_expert.py."""
import dataclasses
import math

import numpy as np
import pytest
from harness import build_network, load_script
from official_config import (
    assert_matches_official, assert_rewards_clipped_for_learning_and_raw_in_the_return, categorical_candidates,
    categorical_settings, clip_settings, crafted_categorical_update, env_settings, first_update_and_period,
    optimizer_settings, prioritized_schedule, priority_settings, redo_settings, replay_settings, run_and_replay)

m = load_script("der_single_expert")

REDO = "labs/redo"
GIN = "labs/moes/configs/DER.gin"
# Dopamine's official values, each with the gin line (or the code, where the gin sets nothing) it comes from; where
# the project deviates on purpose, the row holds the project's value and names the deviation
OFFICIAL = {
    "optimizer": ("Adam", "JaxDQNAgent: optimizer = 'adam'"),
    "learning rate": (1e-4, f"{GIN}: create_optimizer.learning_rate = 0.0001"),
    "Adam epsilon": (1.5e-4, f"{GIN}: create_optimizer.eps = 0.00015"),
    "Adam betas": ((0.9, 0.999), "dqn_agent.create_optimizer: beta1 = 0.9, beta2 = 0.999"),
    "weight decay": (0.0, "dqn_agent.create_optimizer: plain optax.adam"),
    "gradient clipping": ("none", "dqn_agent.create_optimizer: plain optax.adam (van Hasselt et al.: 10)"),
    "replay": ("prioritized", f"{GIN}: JaxFullRainbowAgent.replay_scheme = 'prioritized'"),
    # deviation 4 in docs/der_single_expert.md: 200k slots instead of 1M, both hold every transition of the run
    "replay capacity": (200_000, f"{GIN}: OutOfGraphPrioritizedReplayBuffer.replay_capacity = 1000000"),
    "batch size": (32, f"{GIN}: OutOfGraphPrioritizedReplayBuffer.batch_size = 32"),
    "n-step": (10, f"{GIN}: JaxDQNAgent.update_horizon = 10"),
    "gamma": (0.99, f"{GIN}: JaxDQNAgent.gamma = 0.99"),
    "frame stack": (4, "dqn_agent: NATURE_DQN_STACK_SIZE = 4"),
    "priority exponent": (0.5, "full_rainbow_agent: priorities jnp.sqrt(loss + 1e-10)"),
    "importance-sampling exponent at the first update": (0.5, "full_rainbow_agent: loss weights 1 / jnp.sqrt(p + 1e-10)"),
    "importance-sampling exponent at the last step": (0.5, "full_rainbow_agent: fixed, no annealing"),
    "warm-up (agent steps)": (1600, f"{GIN}: JaxDQNAgent.min_replay_history = 1600"),
    "update period (agent steps)": (1, f"{GIN}: JaxDQNAgent.update_period = 1"),
    "updates per training step": (1, f"{GIN}: JaxFullRainbowAgent.num_updates_per_train_step = 1"),
    "target update period (agent steps)": (2000, f"{GIN}: JaxDQNAgent.target_update_period = 2000"),
    "training length (agent steps)": (100_000, f"{GIN}: Runner.num_iterations = 10 x Runner.training_steps = 10000"),
    "epsilon (train)": (0.0, f"{GIN}: JaxFullRainbowAgent.noisy = True replaces the epsilon_fn by zero_epsilon"),
    "epsilon (evaluation)": (0.001, f"{GIN}: JaxDQNAgent.epsilon_eval = 0.001"),
    "evaluation episodes": (100, "labs/atari_100k/README.md: 100 evaluation episodes after training"),
    "no-op starts (agent steps, training and evaluation)": (
        30, "labs/moes/atari_100k_train.py runs DataEfficientAtariRunner (max_noops = 30, DER.gin sets none): "
            "_initialize_episode takes randint(0, 30) no-op steps at every episode start, training and evaluation"),
    "noisy sigma0": (0.1, "jax/networks.NoisyNetwork: sigma initialised to 0.1 / sqrt(fan_in)"),
    "support": ((-10.0, 10.0, 51), f"{GIN}: JaxFullRainbowAgent.vmax = 10., num_atoms = 51; vmin = -vmax"),
    "dueling noisy heads": (True, f"{GIN}: JaxFullRainbowAgent.dueling = True, noisy = True"),
    "loss": ("cross-entropy", "full_rainbow_agent: softmax_cross_entropy with the projected target"),
    "TD target": ("double Q", f"{GIN}: JaxFullRainbowAgent.double_dqn = True"),
    "sticky actions": (0.0, f"{GIN}: atari_lib.create_atari_environment.sticky_actions = False"),
    "frame skip": (4, "atari_lib.AtariPreprocessing: frame_skip = 4, max-pool over the last two frames"),
    # deviation 7 in docs/der_single_expert.md: the cap is the ALE's 108,000-frame cap
    "max agent steps per episode": (27_000, f"{GIN}: Runner.max_steps_per_episode = 27000"),
    "no-op starts in the environment wrapper": (0, "none: the no-op steps above are the runner's, not the wrapper's"),
    "minimal action set": (True, "atari_lib: gym's <Game>NoFrameskip-v0 minimal action set"),
    "observation": (((84, 84), True), "atari_lib.AtariPreprocessing: 84x84 greyscale"),
    # the life loss is handled by the training loop (terminal for learning, the game goes on), not by the wrapper
    "life loss ends the environment's episode": (False, "Runner: episodes and returns end at game over"),
    "life loss terminal for learning": (True, f"{GIN}: AtariPreprocessing.terminal_on_life_loss = True"),
    "reward clipping": ((-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0), "run_experiment.Runner: reward = np.clip(reward, -1, 1)"),
    "encoder": ("NatureEncoder", f"{GIN}: FullRainbowMoENetwork.encoder_type = 'CNN' (RainbowCNNet, SAME padding)"),
    "MoE layer": ("SoftMoE", f"{GIN}: FullRainbowMoENetwork.moe_type = 'SOFTMOE'"),
    # deviation 1 in docs/der_single_expert.md: one expert of 4 x 512 units, the paper's finding, instead of 4 of 512
    "experts": (1, f"{GIN}: FullRainbowMoENetwork.num_experts = 4"),
    "expert hidden units": (2048, "networks.FullRainbowMoENetwork: expert_hidden_units = 512"),
    "tokens": (121, "networks.FullRainbowMoENetwork: routing_type = 'PER_PIXEL' on the 11x11 CNN output"),
    "slots per expert": (121, "softmoe.SoftMoE.capacity_factor = 1.0: ceil(121 x 1.0 / 1)"),
    "expert type": ("small", "networks.FullRainbowMoENetwork: expert_type = 'SMALL' (DER.gin sets none)"),
    "extra linear layer before the heads": (False, f"{GIN}: FullRainbowMoENetwork.use_extra_linear_layer = False"),
    # ReDo: the lab's recycled_atari100k_rainbow_agent.py and its NeuronRecycler (weight_recyclers.py);
    # configs/DrQ_eps_dense.gin binds none of these
    "ReDo": (False, f"{REDO}/recycled_atari100k_rainbow_agent.py:38: reset_mode = None (no recycler)"),
    "ReDo period (gradient updates)": (200_000, f"{REDO}/weight_recyclers.py:149: BaseRecycler.reset_period = 200_000"),
    "ReDo threshold tau": (0.0, f"{REDO}/weight_recyclers.py:147: BaseRecycler.dead_neurons_threshold = 0.0"),
    "ReDo probe batch": (256, f"{REDO}/recycled_atari100k_rainbow_agent.py:40: batch_size_statistics = 256"),
    "ReDo probe sampling": ("prioritized", f"{REDO}/recycled_atari100k_rainbow_agent.py:204: "
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


def wrapper_noops(settings):
    """env_settings with its training no-op entry named for what it reads here: the wrapper's frame no-ops."""
    settings["no-op starts in the environment wrapper"] = settings.pop("no-op starts (training)")
    return settings


@pytest.fixture(scope="module")
def default_schedule():
    """train_step with the default Args over the first 6,000 agent steps (the update stood in for)."""
    return prioritized_schedule(m, m.Args(), 6_000)


def test_defaults_match_the_official_der_gin_with_one_scaled_expert(default_schedule, monkeypatch):
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
        "epsilon (train)": args.epsilon_train, "epsilon (evaluation)": args.eval_epsilon,
        "evaluation episodes": args.eval_episodes, "no-op starts (agent steps, training and evaluation)": args.noop_max,
        "noisy sigma0": round(net.head.value.weight_sigma[0, 0].item() * math.sqrt(net.head.value.weight_mu.shape[1]),
                              6),
        "support": (net.support[0].item(), net.support[-1].item(), len(net.support)),
        "dueling noisy heads": isinstance(net.head.value, m.NoisyLinear) and isinstance(net.head.advantage, m.NoisyLinear),
        **categorical_settings(m), **wrapper_noops(env_settings(m, args)),
        "life loss terminal for learning": args.terminal_on_life_loss, "reward clipping": clip_settings(m),
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
    # deviation 4: the smaller memory still never overwrites (one slot per transition, one more per episode or life end)
    assert args.buffer_size >= 2 * args.total_timesteps
    # the paper's default network: tokens of the Nature CNN per conv position
    assert (args.encoder, args.tokenization) == ("nature", "perconv")


def test_an_update_every_step_after_the_warm_up_and_a_target_copy_every_2000(default_schedule):
    updates, copies, calls, _ = default_schedule
    assert updates[:3] == [1601, 1602, 1603] and updates[-1] == 6000 and len(updates) == 4400
    assert copies == [2000, 4000, 6000]
    assert all(call["max_grad_norm"] == 0.0 for call in calls)


def test_the_loss_is_the_cross_entropy_to_the_double_q_target():
    expected = categorical_candidates()
    assert crafted_categorical_update(m) == pytest.approx(expected[("cross-entropy", "double Q")], rel=1e-5)


def test_rewards_are_clipped_for_learning_and_raw_in_the_logged_return_and_a_lost_life_is_terminal(tmp_path):
    # Assault scores 21 an enemy; without sticky actions, with frame skip 4 and no no-ops (--noop-max 0), the actions
    # the memory recorded replay the same run (the cheap van Hasselt et al. network; random actions, since an untrained noisy
    # network tends to repeat one action and score nothing)
    flags = ["--env-id", "ALE/Assault-v5", "--encoder", "der", "--total-timesteps", 400, "--learning-starts", 100,
             "--buffer-size", 1000, "--max-episode-steps", 150, "--checkpoint-every", 400, "--batch-size", 8,
             "--epsilon-train", 1.0, "--eval-episodes", 0, "--noop-max", 0]
    _, tags, played, stored, returns = run_and_replay("der_single_expert", flags, tmp_path, sticky=0.0,
                                                      life_loss_terminal=True)
    assert_rewards_clipped_for_learning_and_raw_in_the_return(played, stored, returns, tags)
    # lives were lost before game over: each ended a learning episode in the memory, not the logged episode
    assert played["life_lost"].any() and stored["terminated"][played["life_lost"]].all()
