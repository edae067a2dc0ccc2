"""der_single_expert.py: the official parameter counts (SoftMoE DER and the van Hasselt et al. network), the DER
network against a float64 restatement, gradient clipping, and the Atari 100k evaluation protocol (noise off, epsilon,
no-op starts, life loss, HNS arithmetic). Its defaults against Dopamine's DER.gin are in
test_der_single_expert_config.py. The Rainbow machinery itself is shared with rainbow_tokenized.py (identical blocks)
and tested there."""
import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn
from harness import build_network, check_flags, load_script

m = load_script("der_single_expert")


def network(args, num_actions):
    """The network the script builds for the flags `args`, research knobs included."""
    return build_network(m, args, num_actions)


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def noisy(fan_in, units):  # Dopamine's NoisyNetwork: mu and sigma for the kernel and the bias
    return 2 * (fan_in * units + units)


def dense(fan_in, units):
    return fan_in * units + units


def conv(cin, cout, k):
    return k * k * cin * cout + cout


NATURE = conv(4, 32, 8) + conv(32, 64, 4) + conv(64, 64, 3)


def test_official_parameter_counts():
    # Dopamine FullRainbowMoENetwork on the CNN encoder (SAME padding: 121 tokens of d = 64), 18 actions, 51 atoms:
    # SoftMoE phi (d, n, p = ceil(121 / n)), the always-created scalar, n experts [NoisyNetwork(h) on d, Dense(d)],
    # then flatten 121 * 64 = 7744 -> NoisyNetwork(18 * 51) and NoisyNetwork(51).
    assert NATURE == 77_984
    heads = noisy(7744, 18 * 51) + noisy(7744, 51)
    for n, h in ((1, 2048), (4, 512)):
        official = NATURE + 64 * n * math.ceil(121 / n) + 1 + n * (noisy(64, h) + dense(h, 64)) + heads
        net = network(m.Args(num_experts=n, expert_hidden_units=h), 18)
        assert num_params(net) == official - 1  # the scalar exists here only with --moe-normalization
    assert num_params(network(m.Args(), 18)) == 15_492_914
    # the flatten baseline scaled 4x: NoisyNetwork(2048) on the 7744 features, then the two heads on 2048
    baseline = NATURE + noisy(7744, 2048) + noisy(2048, 18 * 51) + noisy(2048, 51)
    assert num_params(network(m.Args(moe_type="baseline"), 18)) == baseline
    # DER.gin's own network (Dopamine's Rainbow torso: flatten -> NoisyNetwork(512) -> the heads), the command the docs
    # give for it: --moe-type baseline --num-experts 1 --expert-hidden-units 512
    der_gin = NATURE + noisy(7744, 512) + noisy(512, 18 * 51) + noisy(512, 51)
    net = network(m.Args(moe_type="baseline", num_experts=1, expert_hidden_units=512), 18)
    assert num_params(net) == der_gin == 9_003_058


def test_der_encoder_is_the_van_hasselt_network():
    # Kaixhin/Rainbow --architecture data-efficient: conv 32 5x5/5, conv 64 5x5/5 (84 -> 16 -> 3, 576 features),
    # a noisy 256-unit hidden layer for each dueling stream, noisy outputs 51 and A * 51
    official = conv(4, 32, 5) + conv(32, 64, 5) + 2 * noisy(576, 256) + noisy(256, 51) + noisy(256, 18 * 51)
    net = network(m.Args(encoder="der"), 18)
    assert num_params(net) == official == 1_143_410
    record = {}
    log_probs, q = net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8), record)
    assert record["conv1"].shape == (2, 32, 16, 16) and record["conv2"].shape == (2, 64, 3, 3)
    assert record["value_hidden"].shape == record["advantage_hidden"].shape == (2, 256)
    assert log_probs.shape == (2, 18, 51) and q.shape == (2, 18)


def test_der_network_matches_a_float64_restatement():
    torch.manual_seed(0)
    net = network(m.Args(encoder="der", n_atoms=5), 3).eval()  # eval: noise off; float32 vs the float64 reference
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    log_probs, q = net(x)

    def conv_valid(inp, layer, stride):  # direct sum over the 5x5 window, no padding
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        size = (inp.shape[-1] - 5) // stride + 1
        out = np.zeros((inp.shape[0], w.shape[0], size, size))
        for i in range(size):
            for j in range(size):
                patch = inp[:, :, i * stride:i * stride + 5, j * stride:j * stride + 5]
                out[:, :, i, j] = np.einsum("bchw,ochw->bo", patch, w) + b
        return np.maximum(out, 0)

    def linear(inp, layer):
        return inp @ layer.weight_mu.detach().double().numpy().T + layer.bias_mu.detach().double().numpy()

    h = conv_valid(conv_valid(x.double().numpy() / 255, net.encoder.conv1, 5), net.encoder.conv2, 5).reshape(2, -1)
    head = net.head
    value = linear(np.maximum(linear(h, head.value_hidden), 0), head.value).reshape(2, 1, 5)
    advantage = linear(np.maximum(linear(h, head.advantage_hidden), 0), head.advantage).reshape(2, 3, 5)
    logits = value + advantage - advantage.mean(1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(log_probs.exp().detach().numpy(), probs, rtol=1e-5)
    np.testing.assert_allclose(q.detach().numpy(), (probs * np.linspace(-10, 10, 5)).sum(-1), rtol=1e-5, atol=1e-6)


def test_der_encoder_rejects_moe_flags(capsys):
    for kw, flag in ((dict(num_experts=4), "--num-experts"), (dict(moe_type="baseline"), "--moe-type"),
                     (dict(tokenization="perfeat"), "--tokenization")):
        with pytest.raises(SystemExit) as exit_info:
            check_flags(m, m.Args(encoder="der", **kw))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0] and "--encoder der" in err[0]
    check_flags(m, m.Args(encoder="der", n_step=20, max_grad_norm=10.0))


def recording_optimizer(network):
    """The script's optimizer with a zero learning rate, remembering the global gradient norm it was asked to apply."""
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.0, adam_eps=1.5e-4), network)
    optimizer.norms, step = [], optimizer.step

    def recording_step(closure=None):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        return step(closure)

    optimizer.step = recording_step
    return optimizer


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-3])
def test_max_grad_norm_clips_the_global_norm(max_grad_norm):
    args = m.Args(encoder="der", n_step=3, buffer_size=300, learning_starts=20, batch_size=8,
                  max_grad_norm=max_grad_norm)
    torch.manual_seed(0)
    q, target = network(args, 4), network(args, 4)
    target.load_state_dict(q.state_dict())
    opt = recording_optimizer(q)
    rb = m.PrioritizedReplayMemory(300, n_step=3)
    rng = np.random.default_rng(0)
    for t in range(100):
        frame = rng.integers(0, 256, (84, 84), dtype=np.uint8)
        rb.add(frame, int(rng.integers(4)), float(rng.choice([-1.0, 0.0, 1.0])), t % 37 == 36, False, frame)
    noise = torch.Generator().manual_seed(0)
    for step in range(21, 24):
        m.train_step(step, args, q, target, opt, rb, rng, noise)
    assert len(opt.norms) == 3
    if max_grad_norm:
        assert max(opt.norms) <= max_grad_norm * (1 + 1e-4)
    else:
        assert min(opt.norms) > 1e-2  # unclipped gradients of a fresh network are far larger than the bound above


# ---------------------------------------------------------------------------------------------------------------
# The Atari 100k evaluation protocol
# ---------------------------------------------------------------------------------------------------------------
class PreferredAction(nn.Module):
    """A stand-in network that prefers one action and records what evaluation shows it."""

    def __init__(self, num_actions, preferred):
        super().__init__()
        self.num_actions, self.preferred = num_actions, preferred
        self.inputs, self.modes = [], []

    def forward(self, x, record=None):
        self.inputs.append(x.numpy().copy())
        self.modes.append(self.training)
        q = torch.zeros(x.shape[0], self.num_actions)
        q[:, self.preferred] = 1.0
        return None, q


@pytest.fixture
def recorded_envs(monkeypatch):
    """Evaluation's environments, wrapped to record the make_env calls, the actions and the lives."""
    made, real_make_env = [], m.make_env

    class Recorder(gym.Wrapper):
        def reset(self, **kw):
            frame, info = self.env.reset(**kw)
            self.first_frame, self.actions, self.lives = frame, [], [info["lives"]]
            return frame, info

        def step(self, action):
            out = self.env.step(action)
            self.actions.append(action)
            self.lives.append(out[4]["lives"])
            return out

    def make_env(*args, **kwargs):
        made.append((args, kwargs))
        env = Recorder(real_make_env(*args, **kwargs))
        made[-1] = (args, kwargs, env)
        return env

    monkeypatch.setattr(m, "make_env", make_env)
    return made


def test_evaluation_runs_the_network_noise_free_and_restores_training_mode(recorded_envs):
    net = PreferredAction(7, 2)
    args = m.Args(env_id="ALE/Assault-v5", max_episode_steps=30, eval_epsilon=0.0)
    scores = m.evaluate(net, args, 3, "cpu", seed=5)
    assert len(scores) == 3 and len(recorded_envs) == 3
    assert net.modes and not any(net.modes), "evaluation must run the network in eval mode (noise off)"
    assert net.training, "evaluation must give the network back in training mode"
    for _, kwargs, env in recorded_envs:
        assert "noop_max" not in kwargs  # the wrapper takes no no-ops of its own: start_episode takes them
        noops = env.actions.index(2)
        # 0-29 no-op steps, then the network's actions; the 108k-frame cap (here 4 x 30) counts the no-op steps too
        assert env.actions == [0] * noops + [2] * (30 - noops)
    assert [inp.shape[0] for inp in net.inputs[:3]] == [3, 3, 3]  # the episodes run side by side in one batch


def test_evaluation_epsilon_takes_uniform_random_actions(recorded_envs):
    net = PreferredAction(7, 2)
    m.evaluate(net, m.Args(env_id="ALE/Assault-v5", max_episode_steps=700, eval_epsilon=1.0, noop_max=0), 1, "cpu", seed=0)
    actions = np.array(recorded_envs[0][2].actions)
    counts = np.bincount(actions, minlength=7)
    assert len(actions) > 300 and counts.min() > 0.6 * len(actions) / 7  # uniform over all 7 actions
    recorded_envs.clear()
    m.evaluate(net, m.Args(env_id="ALE/Assault-v5", max_episode_steps=700, noop_max=0), 1, "cpu", seed=0)  # epsilon 0.001
    actions = np.array(recorded_envs[0][2].actions)
    assert (actions != 2).sum() <= 5 and len(actions) > 300


def test_evaluation_starts_episodes_with_random_noop_steps(recorded_envs):
    first = {}
    for noop_max in (0, 30):
        recorded_envs.clear()
        net = PreferredAction(7, 2)
        args = m.Args(env_id="ALE/Assault-v5", max_episode_steps=40, noop_max=noop_max, eval_epsilon=0.0)
        m.evaluate(net, args, 8, "cpu", seed=3)
        # episode i draws its no-op count from its own generator, before any epsilon draw (Dopamine: randint(0, 30))
        expected = [int(np.random.default_rng([3, i]).integers(noop_max)) if noop_max else 0 for i in range(8)]
        assert [env.actions.index(2) for _, _, env in recorded_envs] == expected
        first[noop_max] = [state[-1].tobytes() for state in net.inputs[0]]  # the frame each episode first acts on
    # the ALE without sticky actions is deterministic: without no-ops every episode starts on the same frame
    assert len(set(first[0])) == 1 and len(set(first[30])) >= 4


class LosesALifeAt:
    """A stand-in environment: in its first game, lives 3 until the `at`-th step, then 2; counts resets and actions."""

    def __init__(self, at):
        self.at, self.resets, self.actions = at, 0, []

    def reset(self, seed=None):
        self.resets, self.t = self.resets + 1, 0
        return np.full((84, 84), self.resets, np.uint8), {"lives": 3}

    def step(self, action):
        self.t += 1
        self.actions.append(action)
        return np.full((84, 84), 100 + self.t, np.uint8), 0.0, False, False, {"lives": 2 if self.resets == 1 and self.t >= self.at else 3}


def test_start_episode_takes_noop_steps_and_starts_again_when_a_life_is_lost_in_them():
    rng, counts = np.random.default_rng(0), []
    for _ in range(300):
        env = LosesALifeAt(at=1000)
        frame, info = m.start_episode(env, 30, rng)
        counts.append(len(env.actions))
        assert set(env.actions) <= {0} and env.resets == 1
        assert frame[0, 0] == (100 + len(env.actions) if env.actions else 1)  # the frame after the last no-op
    assert sorted(set(counts)) == list(range(30))  # randint(0, 30): 0 to 29, each about as often
    assert max(np.bincount(counts)) < 3 * 300 / 30
    assert m.start_episode(env := LosesALifeAt(at=1), 0, rng)[0][0, 0] == 1 and env.actions == []
    env = LosesALifeAt(at=3)
    twin = np.random.default_rng(7)
    frame, info = m.start_episode(env, 30, np.random.default_rng(7))
    n = int(twin.integers(30))
    assert n >= 3 and env.resets == 2 and len(env.actions) == n  # the lost life at step 3 restarts the game
    assert frame[0, 0] == 100 + n - 3 and info["lives"] == 3


def test_evaluation_restarts_the_frame_stack_at_a_lost_life_and_ends_at_game_over(recorded_envs):
    net = PreferredAction(7, 0)  # NOOP in Assault: the lives go one by one, the score stays 0
    scores = m.evaluate(net, m.Args(env_id="ALE/Assault-v5", noop_max=0), 1, "cpu", seed=0)
    env = recorded_envs[0][2]
    lives = np.array(env.lives)
    assert lives[0] > 1 and lives[-1] == 0 and scores == {0: 0.0}  # one episode = the whole game
    inputs = [x[0] for x in net.inputs]  # the stack seen before action t
    assert len(inputs) == len(env.actions)
    lost = [t for t in range(1, len(lives) - 1) if lives[t] < lives[t - 1]]
    assert len(lost) == lives[0] - 1
    for t in lost:  # after the life is lost, the stack holds only the newest frame
        assert all(np.array_equal(inputs[t][k], inputs[t][3]) for k in range(3))
        assert not all(np.array_equal(inputs[t - 1][k], inputs[t - 1][3]) for k in range(3))
    eval_without = PreferredAction(7, 0)
    m.evaluate(eval_without, m.Args(env_id="ALE/Assault-v5", noop_max=0, terminal_on_life_loss=False), 1, "cpu",
               seed=0)
    assert not all(np.array_equal(eval_without.inputs[lost[0]][0][k], eval_without.inputs[lost[0]][0][3])
                   for k in range(3))


# the spec's table (rainbow_der.md section 7): game, random, human, DER (van Hasselt et al. 2019) and its HNS
SPEC_TABLE = """Alien,227.8,7127.7,739.9,0.074
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
UpNDown,533.4,11693.2,2877.4,0.210"""


def test_human_normalized_scores_match_the_spec_table():
    rows = [line.split(",") for line in SPEC_TABLE.splitlines()]
    assert sorted(m.ATARI_100K_SCORES) == sorted(r[0] for r in rows)
    for game, random_score, human_score, der, der_hns in rows:
        assert m.ATARI_100K_SCORES[game] == (float(random_score), float(human_score))
        assert round(m.human_normalized_score(f"ALE/{game}-v5", float(der)), 3) == float(der_hns)
        assert m.human_normalized_score(f"ALE/{game}-v5", float(random_score)) == 0.0
        assert m.human_normalized_score(f"ALE/{game}-v5", float(human_score)) == pytest.approx(1.0, abs=1e-12)
    hns = [m.human_normalized_score(f"ALE/{r[0]}-v5", float(r[3])) for r in rows]
    assert round(float(np.mean(hns)), 3) == 0.285 and round(float(np.median(hns)), 3) == 0.161  # the paper's
    assert m.human_normalized_score("ALE/Tennis-v5", 1.0) is None
    assert m.game_name("ALE/MsPacman-v5") == "MsPacman"
