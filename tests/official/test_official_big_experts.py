"""--expert-type big (each expert holds its own encoder) against dopamine's BigExpertModel and SoftMoE(expert_type="BIG")
(labs/moes/architectures/networks.py, softmoe.py): every weight of the script's network perturbed, copied into the
official module (the experts' grouped convs into nn.vmap's stacked kernels, see official_mapping.Mapper.big_experts);
the same Q-values (and Rainbow's atom probabilities) in float64 (<= 1e-12) and float32 (<= 1e-5 relative), the same
parameter count plus SoftMoE's unused `scalar`, and the official slot counts.

What the official networks do with expert_type "BIG" (dopamine-rl 4.1.2):
- ImpalaMoE skips its encoder (`if self.expert_type != 'BIG'`) and routes the 7,056 pixels of the frames as tokens;
  its experts hold the Impala encoder that `_maybe_create_moe_module` builds by default (encoder_type='IMPALA').
- FullRainbowMoENetwork skips its encoder likewise (`if self.expert_type == 'SMALL'`) and passes its encoder_type,
  so that its experts hold its own encoder (IMPALA, or CNN = RainbowCNNet for DER.gin); their first layer is noisy.
- NatureDQNMoE does not skip its convs: the tokens are the 121 Nature-CNN features, and each expert runs an Impala
  encoder (the default encoder_type, which NatureDQNMoE never passes) on a 4 x 4 x 64 image of them. The script's
  --encoder nature builds the working version instead (the Nature convs inside the experts, pixels as tokens), and is
  compared here with ImpalaMoE's own BIG branch whose experts the official factory builds with encoder_type='CNN'
  (`NatureBigReference`); test_the_official_nature_dqn_keeps_its_convs_for_big pins what NatureDQNMoE does."""
import contextlib
import copy
import functools

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from harness import build_network, load_script
from official_mapping import (Mapper, assert_close, base_networks, encoder_input, eps, frames, moe_networks, nhwc,
                              num_official_params, num_params, official_noise_draws, perturb_, preprocessed, x64)

NUM_ACTIONS = 6
NUM_ATOMS = 51
BATCH = 1  # at the default capacity a sample's routing weights are 7,056 x 7,056 (the official module vmaps samples)


class NatureBigReference(nn.Module):
    """ImpalaMoE's BIG branch (networks.py: the encoder skipped, PER_PIXEL tokens of the frames, the SoftMoE of
    `_maybe_create_moe_module`, flatten, Dense head) with the experts' encoder_type 'CNN': dopamine's own modules
    for the network that --encoder nature --expert-type big builds."""

    num_actions: int
    num_experts: int = 8
    inputs_preprocessed: bool = False

    @nn.compact
    def __call__(self, x, *, key):
        if not self.inputs_preprocessed:
            x = base_networks.preprocess_atari_inputs(x)
        moe = moe_networks._maybe_create_moe_module(
            moe_type="SOFTMOE", num_features=512, num_experts=self.num_experts, num_selected_experts=1,
            routing_type="PER_PIXEL", noisy=False, rng_key=key, expert_type="BIG", encoder_type="CNN")
        values = moe(x.reshape(x.shape[0] * x.shape[1], x.shape[2]), key=key).values
        return moe_networks.types.BaselineNetworkReturn(
            q_values=nn.Dense(self.num_actions, kernel_init=nn.initializers.xavier_uniform())(values.reshape(-1)),
            hidden_act=None)


# name: (script, script flags, official module class, its attributes)
DQN = {
    "dqn_softmoe --encoder impala --expert-type big (ImpalaMoE BIG, 8 experts)": (
        dict(encoder="impala", expert_type="big"), moe_networks.ImpalaMoE, dict(num_experts=8, expert_type="BIG")),
    "dqn_softmoe --expert-type big (Nature CNN in the experts, working version)": (
        dict(expert_type="big"), NatureBigReference, dict(num_experts=8)),
}
# the defaults at 1,764 and 7,056 slots, compared with the noise off; the capacity-factor configurations (gin-bound on
# the official side) have a few hundred slots: odd image sides (13 x 13, 9 x 9), compared with the noise on
RAINBOW = {
    "rainbow_tokenized --expert-type big (Impala, SoftMoE-4)": (
        "rainbow_tokenized", dict(expert_type="big"), dict(encoder_type="IMPALA", num_experts=4, expert_hidden_units=512)),
    # the script's default single expert (2,048 units) at 256 units: 24M instead of 107M parameters to copy
    "der_single_expert --expert-type big --expert-hidden-units 256 (1 expert, 84 x 84)": (
        "der_single_expert", dict(expert_type="big", expert_hidden_units=256),
        dict(encoder_type="CNN", num_experts=1, expert_hidden_units=256)),
    "rainbow_tokenized --expert-type big --capacity-factor 0.1 (13 x 13)": (
        "rainbow_tokenized", dict(expert_type="big", capacity_factor=0.1),
        dict(encoder_type="IMPALA", num_experts=4, expert_hidden_units=512)),
    "der_single_expert --expert-type big, DER.gin 4 x 512, --capacity-factor 0.05 (9 x 9)": (
        "der_single_expert", dict(expert_type="big", num_experts=4, expert_hidden_units=512, capacity_factor=0.05),
        dict(encoder_type="CNN", num_experts=4, expert_hidden_units=512)),
}
SLOTS = {config: slots for config, slots in zip(RAINBOW, (1764, 7056, 169, 81))}


@contextlib.contextmanager
def gin_bound(flags):
    """The official SoftMoE with the script's --capacity-factor bound as a gin file would bind it."""
    import gin

    if "capacity_factor" not in flags:
        yield
        return
    gin.bind_parameter("SoftMoE.capacity_factor", flags["capacity_factor"])
    try:
        yield
    finally:
        gin.clear_config()


@functools.cache
def script_network(script, flags):
    m = load_script(script)
    torch.manual_seed(0)
    net = perturb_(build_network(m, m.Args(**dict(flags)), NUM_ACTIONS), seed=1).double()
    if script != "dqn_softmoe":  # logits far from uniform over the atoms, so that Q is not ~0 (a weak comparison)
        with torch.no_grad():
            for head in (net.head.advantage, net.head.value):
                head.weight_mu.mul_(30.0)
                head.bias_mu.mul_(30.0)
    return net


def network_copy(script, flags, dtype):
    net = script_network(script, tuple(sorted(flags.items())))
    return net if dtype == np.float64 else copy.deepcopy(net).float()


def official_params(net, encoder, shapes, dtype, rainbow=False, zero_expert_sigma=False):
    mp = Mapper(net, dtype)  # the script's shared encoder is `Frames`, without parameters
    mp.put("SoftMoE_0/phi_weights", mp.take("moe.phi"))
    mp.big_experts(net.moe.experts.w2.shape[0], encoder, net.moe.experts.encoding_shape, noisy=rainbow)
    if rainbow:
        mp.noisy("NoisyNetwork_0", "head.advantage")
        mp.noisy("NoisyNetwork_1", "head.value")
    else:
        mp.dense("Dense_0", "head")  # after the MoE: tokens [m, d] flatten token-major in both frameworks
    params = mp.finish(shapes, {"SoftMoE_0/scalar": np.array([3.7])})  # unused without normalization: any value
    if zero_expert_sigma:  # the official experts ignore eval_mode: without noise is with sigma = 0
        experts = params["params"]["BigExpertModel_0"]["net"]
        experts["kernel_sigma"], experts["bias_sigma"] = 0 * experts["kernel_sigma"], 0 * experts["bias_sigma"]
    return params


# ----------------------------------------------------------------------------------------------------------------
# dqn_softmoe
# ----------------------------------------------------------------------------------------------------------------
def dqn_module(config, exact):
    _, cls, attributes = DQN[config]
    return cls(num_actions=NUM_ACTIONS, inputs_preprocessed=exact, **attributes)


@functools.cache
def dqn_shapes(config):
    return jax.eval_shape(lambda: dqn_module(config, True).init(jax.random.PRNGKey(0), np.zeros((84, 84, 4), np.float32),
                                                                key=jax.random.PRNGKey(0)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", list(DQN))
def test_dqn_q_values_and_parameter_count_match_the_official_module(config, dtype):
    flags = DQN[config][0]
    net, obs, exact = network_copy("dqn_softmoe", flags, dtype), frames(BATCH, seed=3), dtype == np.float64
    official, shapes = dqn_module(config, exact), dqn_shapes(config)
    x = preprocessed(obs, dtype) if exact else nhwc(obs)
    with x64(exact):
        params = official_params(net, flags.get("encoder", "nature"), shapes, dtype)
        out = jax.jit(lambda p, x: jax.vmap(lambda s: official.apply(p, s, key=jax.random.PRNGKey(0)))(x))(params, x)
    with torch.no_grad(), encoder_input(net, obs.double() / 255.0) if exact else contextlib.nullcontext():
        q = net(obs)
    assert_close(config, q.numpy(), out.q_values, dtype)
    assert num_official_params(shapes) == num_params(net) + 1  # + SoftMoE's unused scalar


# ----------------------------------------------------------------------------------------------------------------
# rainbow_tokenized and der_single_expert: FullRainbowMoENetwork with its noisy heads and noisy expert layer
# ----------------------------------------------------------------------------------------------------------------
def rainbow_module(config, exact):
    return moe_networks.FullRainbowMoENetwork(num_actions=NUM_ACTIONS, num_atoms=NUM_ATOMS, nn_scale=1,
                                              inputs_preprocessed=exact, expert_type="BIG", **RAINBOW[config][2])


@functools.cache
def rainbow_shapes(config):
    x, support = np.zeros((84, 84, 4), np.float32), np.zeros(NUM_ATOMS, np.float32)
    with gin_bound(RAINBOW[config][1]):
        return jax.eval_shape(lambda: rainbow_module(config, True).init(jax.random.PRNGKey(0), x, support,
                                                                        key=jax.random.PRNGKey(0)))


def rainbow_prepare(config, dtype):
    script, flags, attributes = RAINBOW[config]
    net, obs, exact = network_copy(script, flags, dtype), frames(BATCH, seed=4), dtype == np.float64
    x = preprocessed(obs, dtype) if exact else nhwc(obs)
    encoder = "impala" if attributes["encoder_type"] == "IMPALA" else "nature"
    return net, obs, x, net.support.numpy(), encoder, rainbow_module(config, exact), rainbow_shapes(config)


def rainbow_outputs(net, obs, dtype):
    with torch.no_grad(), encoder_input(net, obs.double() / 255.0) if dtype == np.float64 else contextlib.nullcontext():
        log_probs, q = net(obs)
    return log_probs.exp().numpy(), q.numpy()


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", list(RAINBOW)[:2])  # the eval-mode path; the other two run with the noise on
def test_rainbow_noise_off_matches_the_official_eval_mode(config, dtype):
    net, obs, x, support, encoder, official, shapes = rainbow_prepare(config, dtype)
    with x64(dtype == np.float64), gin_bound(RAINBOW[config][1]):
        params = official_params(net, encoder, shapes, dtype, rainbow=True, zero_expert_sigma=True)
        out = jax.jit(lambda p, x: jax.vmap(
            lambda s: official.apply(p, s, support, eval_mode=True, key=jax.random.PRNGKey(5)))(x))(params, x)
    net.eval()
    probs, q = rainbow_outputs(net, obs, dtype)
    assert_close(f"{config} noise off, Q", q, out.q_values, dtype)
    assert_close(f"{config} noise off, atom probabilities", probs, out.probabilities, dtype)
    assert num_official_params(shapes) == num_params(net) + 1  # + SoftMoE's unused scalar


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", list(RAINBOW)[2:])
def test_rainbow_noise_on_matches_the_official_module_given_its_draws(config, dtype):
    """The official draws for the experts' noisy layer: one for all experts (a module attribute key under nn.vmap),
    p [F, 1] over the encoding flattened NHWC; every expert of the script gets it, its eps_in permuted to NCHW."""
    net, obs, x, support, encoder, official, shapes = rainbow_prepare(config, dtype)
    with x64(dtype == np.float64), gin_bound(RAINBOW[config][1]):
        params = official_params(net, encoder, shapes, dtype, rainbow=True)
        key = jax.random.PRNGKey(7)
        with official_noise_draws() as draws:
            out = jax.jit(lambda p, x: jax.vmap(
                lambda s: official.apply(p, s, support, eval_mode=False, key=key))(x))(params, x)
    assert {k: len(v) for k, v in draws.items()} == {"BigExpertModel_0/net": 2, "NoisyNetwork_0": 2, "NoisyNetwork_1": 2}
    c, h, w = net.moe.experts.encoding_shape
    with torch.no_grad():
        experts = net.moe.experts
        eps_in = eps(draws["BigExpertModel_0/net"][0]).reshape(h, w, c).permute(2, 0, 1).reshape(-1)
        experts.eps_in.copy_(eps_in.expand_as(experts.eps_in))
        experts.eps_out.copy_(eps(draws["BigExpertModel_0/net"][1]).expand_as(experts.eps_out))
        for layer, path in ((net.head.advantage, "NoisyNetwork_0"), (net.head.value, "NoisyNetwork_1")):
            layer.eps_in.copy_(eps(draws[path][0]))
            layer.eps_out.copy_(eps(draws[path][1]))
    net.train()
    probs, q = rainbow_outputs(net, obs, dtype)
    assert_close(f"{config} noise on, Q", q, out.q_values, dtype)
    assert_close(f"{config} noise on, atom probabilities", probs, out.probabilities, dtype)
    net.eval()  # and the noise really mattered
    assert np.abs(rainbow_outputs(net, obs, dtype)[1] - q).max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Slot counts and what the official NatureDQNMoE does
# ----------------------------------------------------------------------------------------------------------------
def test_the_square_slot_counts_are_the_official_ones():
    """p = floor(sqrt(ceil(m x capacity_factor / n)))^2 on the 7,056 pixel tokens (official phi_weights (d, n, p)),
    also with SoftMoE.capacity_factor bound by gin as a gin file would (0.1: ceil(88.2) = 89 -> 81 slots, 9 x 9)."""
    import gin

    for config, slots in zip(DQN, (841, 841)):
        assert dqn_shapes(config)["params"]["SoftMoE_0"]["phi_weights"].shape == (4, 8, slots)
        assert script_network("dqn_softmoe", tuple(sorted(DQN[config][0].items()))).moe.slots_per_expert == slots
    for config, slots in SLOTS.items():
        experts = RAINBOW[config][2]["num_experts"]
        assert rainbow_shapes(config)["params"]["SoftMoE_0"]["phi_weights"].shape == (4, experts, slots)
        m = load_script(RAINBOW[config][0])
        assert m.square_slots(7056, experts, RAINBOW[config][1].get("capacity_factor", 1.0)) == slots
    gin.bind_parameter("SoftMoE.capacity_factor", 0.1)
    try:
        shapes = jax.eval_shape(lambda: dqn_module(list(DQN)[0], True).init(
            jax.random.PRNGKey(0), np.zeros((84, 84, 4), np.float32), key=jax.random.PRNGKey(0)))
    finally:
        gin.clear_config()
    m = load_script("dqn_softmoe")
    net = build_network(m, m.Args(encoder="impala", expert_type="big", capacity_factor=0.1), NUM_ACTIONS)
    assert shapes["params"]["SoftMoE_0"]["phi_weights"].shape == (4, 8, 81) and net.moe.slots_per_expert == 81


def test_the_official_nature_dqn_keeps_its_convs_for_big():
    """Why --encoder nature --expert-type big deviates: NatureDQNMoE with expert_type 'BIG' still runs its three shared
    convs, routes their 121 features of dim 64 (16 slots per expert: 4 x 4 images of 64 channels) and gives every
    expert an Impala encoder, not a Nature CNN; the experts never see a pixel."""
    official = moe_networks.NatureDQNMoE(num_actions=NUM_ACTIONS, inputs_preprocessed=True, expert_type="BIG")
    x = np.zeros((84, 84, 4), np.float32)
    shapes = jax.eval_shape(lambda: official.init(jax.random.PRNGKey(0), x, key=jax.random.PRNGKey(0)))["params"]
    assert {"Conv_0", "Conv_1", "Conv_2"} <= set(shapes)  # the shared Nature convs
    assert shapes["SoftMoE_0"]["phi_weights"].shape == (64, 8, 16)
    assert set(shapes["BigExpertModel_0"]["encoder"]) == {"_stacks_0", "_stacks_1", "_stacks_2"}  # Impala
    assert shapes["BigExpertModel_0"]["encoder"]["_stacks_0"]["Conv_0"]["kernel"].shape == (8, 3, 3, 64, 16)
    out = jax.eval_shape(lambda p: official.apply(p, x, key=jax.random.PRNGKey(0)), {"params": shapes})
    assert out.q_values.shape == (NUM_ACTIONS,)  # it runs
