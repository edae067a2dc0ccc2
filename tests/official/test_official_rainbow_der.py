"""rainbow_tokenized.py and der_single_expert.py against dopamine's FullRainbowMoENetwork
(labs/moes/architectures/networks.py) with its NoisyNetwork layers (dopamine/jax/networks.py): every weight perturbed,
copied into the official module; the same Q-values and atom probabilities with the noise off, and with the noise on,
the script's noise buffers set to the draws that the official module makes from its key. float64: <= 1e-12 on the
same float64 frames / 255; float32: <= 1e-5 relative.

Noise, as the official code draws it, and how the comparisons feed it to the script:
- one key per network call (the official agents split one key per sample and vmap; here one key serves the whole
  batch, which is how the scripts draw noise: once per forward, shared by the batch);
- the experts' first layer draws from one key for all experts (nn.vmap does not split a module attribute), and its
  `eval_mode` is never set, so its noise stays on in evaluation (softmoe.md section 10.3). The scripts switch all noise
  off in evaluation and draw each expert's noise independently; the comparison with the noise off therefore zeroes the
  official experts' sigma, and the comparison with the noise on gives every expert of the script the official draw;
- the advantage and value heads are two NoisyNetwork modules built from one key (`feature_layer(key_1, ...)`): see
  test_the_official_heads_draw_their_noise_from_one_key."""
import contextlib
import copy
import functools

import jax
import numpy as np
import pytest
import torch
from harness import build_network, load_script
from official_mapping import (Mapper, assert_close, encoder_input, eps, frames, moe_networks, nhwc, x64,
                              num_official_params, num_params, official_noise_draws, perturb_, preprocessed)

NUM_ACTIONS = 6
NUM_ATOMS = 51
BATCH = 2

# name: (script, script flags, official attributes)
CONFIGS = {
    "rainbow_tokenized defaults (Impala, SoftMoE-4)": (
        "rainbow_tokenized", dict(), dict(encoder_type="IMPALA", num_experts=4, expert_hidden_units=512)),
    "der_single_expert defaults (Nature CNN, SoftMoE-1 x2048)": (
        "der_single_expert", dict(), dict(encoder_type="CNN", num_experts=1, expert_hidden_units=2048)),
    "der_single_expert DER.gin (Nature CNN, SoftMoE-4 x512)": (
        "der_single_expert", dict(num_experts=4, expert_hidden_units=512),
        dict(encoder_type="CNN", num_experts=4, expert_hidden_units=512)),
    # issue 15's knobs, on small experts: --use-random-phi (gin-bound SoftMoE.use_random_phi; the official phi is the
    # draw from the call's key, which the script's fixed buffer is set to) and --use-extra-linear-layer (a plain
    # Dense(512) + ReLU before the noisy heads)
    "rainbow_tokenized random phi (Nature CNN, SoftMoE-4 x64)": (
        "rainbow_tokenized", dict(encoder="nature", num_experts=4, expert_hidden_units=64, use_random_phi=True),
        dict(encoder_type="CNN", num_experts=4, expert_hidden_units=64)),
    "der_single_expert extra linear layer (Nature CNN, SoftMoE-2 x64)": (
        "der_single_expert", dict(num_experts=2, expert_hidden_units=64, use_extra_linear_layer=True),
        dict(encoder_type="CNN", num_experts=2, expert_hidden_units=64, use_extra_linear_layer=True)),
}


# float64 and float32 for each, except the random phi in float32: its N(0, 1) phi makes logits ~20x those of the
# learned phi (std 1 / sqrt(n d)), which amplifies float32 rounding to ~1e-5 of the Q-values; float64 agrees to 1e-15
CASES = [pytest.param(config, dtype, id=f"{config}-{dtype.__name__}") for config in CONFIGS
         for dtype in (np.float64, np.float32) if not (dtype == np.float32 and CONFIGS[config][1].get("use_random_phi"))]


@functools.cache
def script_network(config):
    script, flags, _ = CONFIGS[config]
    m = load_script(script)
    torch.manual_seed(0)
    return perturb_(build_network(m, m.Args(**flags), NUM_ACTIONS), seed=1).double()


def official_params(net, attributes, shapes, dtype, zero_expert_sigma=False):
    mp = Mapper(net, dtype)
    if attributes["encoder_type"] == "IMPALA":
        mp.impala("encoder/")
    else:
        mp.nature("encoder/")
    moe = "moe.moe" if "moe.extra.weight" in mp.params else "moe"  # an ExtraLinearLayer wraps the MoE layer
    if isinstance(getattr(net.moe, "moe", net.moe).phi, torch.nn.Parameter):  # else --use-random-phi's buffer
        mp.put("SoftMoE_0/phi_weights", mp.take(f"{moe}.phi"))
    mp.experts(noisy=True, moe=moe)
    if "moe.extra.weight" in mp.params:
        mp.dense("Dense_0", "moe.extra")
    mp.noisy("NoisyNetwork_0", "head.advantage")  # the first head built: adv = net(x, num_actions * num_atoms)
    mp.noisy("NoisyNetwork_1", "head.value")
    params = mp.finish(shapes, {"SoftMoE_0/scalar": np.array([3.7])})  # unused without normalization
    if zero_expert_sigma:  # the official experts ignore eval_mode: without noise is with sigma = 0
        experts = params["params"]["ExpertModel_0"]["net"]
        experts["kernel_sigma"], experts["bias_sigma"] = 0 * experts["kernel_sigma"], 0 * experts["bias_sigma"]
    return params


@contextlib.contextmanager
def random_phi(config, net, key, dtype):
    """With --use-random-phi: the official SoftMoE.use_random_phi bound, and the script's phi set to the official draw
    for the call key `key` (FullRainbowMoENetwork gives the MoE key_3 of split(key, 3); SoftMoE draws from the first
    half of its split)."""
    import gin

    if not CONFIGS[config][1].get("use_random_phi"):
        yield
        return
    _, _, key_3 = jax.random.split(key, 3)
    phi_key, _ = jax.random.split(key_3)
    with torch.no_grad():
        phi = getattr(net.moe, "moe", net.moe).phi
        phi.copy_(torch.from_numpy(np.array(jax.random.normal(phi_key, tuple(phi.shape), dtype=dtype))))
    gin.bind_parameter("SoftMoE.use_random_phi", True)
    try:
        yield
    finally:
        gin.clear_config()


def official_module(config, exact):
    return moe_networks.FullRainbowMoENetwork(num_actions=NUM_ACTIONS, num_atoms=NUM_ATOMS, nn_scale=1,
                                              inputs_preprocessed=exact, **CONFIGS[config][2])


@functools.cache
def official_shapes(config):
    import gin

    x, support = np.zeros((84, 84, 4), np.float32), np.zeros(NUM_ATOMS, np.float32)
    if CONFIGS[config][1].get("use_random_phi"):
        gin.bind_parameter("SoftMoE.use_random_phi", True)
    try:
        return jax.eval_shape(lambda: official_module(config, True).init(jax.random.PRNGKey(0), x, support,
                                                                         key=jax.random.PRNGKey(0)))
    finally:
        gin.clear_config()


def prepare(config, dtype):
    obs = frames(BATCH, seed=2)
    net = script_network(config) if dtype == np.float64 else copy.deepcopy(script_network(config)).float()
    exact = dtype == np.float64
    x = preprocessed(obs, dtype) if exact else nhwc(obs)
    support = net.support.numpy()  # the same atoms on both sides (torch's and jnp's float32 linspace differ by 1 ulp)
    return net, obs, x, support, official_module(config, exact), official_shapes(config)


def script_outputs(net, obs, dtype):
    with torch.no_grad(), encoder_input(net, obs.double() / 255.0) if dtype == np.float64 else contextlib.nullcontext():
        log_probs, q = net(obs)
    return log_probs.exp().numpy(), q.numpy()


@pytest.mark.parametrize("config,dtype", CASES)
def test_noise_off_matches_the_official_eval_mode(config, dtype):
    net, obs, x, support, official, shapes = prepare(config, dtype)
    with x64(dtype == np.float64), random_phi(config, net, jax.random.PRNGKey(5), dtype):
        params = official_params(net, CONFIGS[config][2], shapes, dtype, zero_expert_sigma=True)
        out = jax.jit(lambda p, x: jax.vmap(
            lambda s: official.apply(p, s, support, eval_mode=True, key=jax.random.PRNGKey(5)))(x))(params, x)
    net.eval()
    probs, q = script_outputs(net, obs, dtype)
    assert_close(f"{config} noise off, Q", q, out.q_values, dtype)
    assert_close(f"{config} noise off, atom probabilities", probs, out.probabilities, dtype)
    assert num_official_params(shapes) == num_params(net) + 1  # + SoftMoE's unused scalar


@pytest.mark.parametrize("config,dtype", CASES)
def test_noise_on_matches_the_official_module_given_its_draws(config, dtype):
    net, obs, x, support, official, shapes = prepare(config, dtype)
    key = jax.random.PRNGKey(7)
    with x64(dtype == np.float64), random_phi(config, net, key, dtype):
        params = official_params(net, CONFIGS[config][2], shapes, dtype)
        with official_noise_draws() as draws:
            out = jax.jit(lambda p, x: jax.vmap(
                lambda s: official.apply(p, s, support, eval_mode=False, key=key))(x))(params, x)
    assert {k: len(v) for k, v in draws.items()} == {"ExpertModel_0/net": 2, "NoisyNetwork_0": 2, "NoisyNetwork_1": 2}
    with torch.no_grad():
        experts = getattr(net.moe, "moe", net.moe).experts  # inside an ExtraLinearLayer, if any
        experts.eps_in.copy_(eps(draws["ExpertModel_0/net"][0]).expand_as(experts.eps_in))
        experts.eps_out.copy_(eps(draws["ExpertModel_0/net"][1]).expand_as(experts.eps_out))
        for layer, path in ((net.head.advantage, "NoisyNetwork_0"), (net.head.value, "NoisyNetwork_1")):
            layer.eps_in.copy_(eps(draws[path][0]))
            layer.eps_out.copy_(eps(draws[path][1]))
    net.train()
    probs, q = script_outputs(net, obs, dtype)
    assert_close(f"{config} noise on, Q", q, out.q_values, dtype)
    assert_close(f"{config} noise on, atom probabilities", probs, out.probabilities, dtype)
    net.eval()  # and the noise really mattered
    assert np.abs(script_outputs(net, obs, dtype)[1] - q).max() > 1e-3


@pytest.mark.parametrize("partitionable", [True, False], ids=["threefry-partitionable", "threefry-original"])
def test_the_official_heads_draw_their_noise_from_one_key(partitionable):
    """Issue 13.5. FullRainbowMoENetwork.__call__ splits its key into key_1, key_2, key_3 and builds both dueling heads
    with `net = feature_layer(key_1, ...)`: `adv = net(x, A * atoms)` and `value = net(x, atoms)` are two NoisyNetwork
    modules with the same rng_key. Each splits it into (rng_p, rng_q) and draws p = normal(rng_p, [in, 1]) and
    q = normal(rng_q, [1, out]). Hence: the two heads' eps_in = f(p) are identical, always; their eps_out = f(q) come
    from one key with different shapes: under jax_threefry_partitionable (JAX's default since 0.5.0) the value head's
    51 draws equal the advantage head's first 51 (those of action 0); under the original threefry (the default of the
    JAX releases contemporary with dopamine-rl 4.1.2) they differ. The scripts draw the two heads independently.
    (A small network, to compile fast: the keys are split and passed the same way for any encoder and expert size.)"""
    with jax.threefry_partitionable(partitionable):
        official = moe_networks.FullRainbowMoENetwork(num_actions=NUM_ACTIONS, num_atoms=NUM_ATOMS, nn_scale=1,
                                                      inputs_preprocessed=True, encoder_type="CNN", num_experts=4,
                                                      expert_hidden_units=16)
        x = np.zeros((84, 84, 4), np.float32)
        support = np.linspace(-10, 10, NUM_ATOMS, dtype=np.float32)
        shapes = jax.eval_shape(lambda: official.init(jax.random.PRNGKey(0), x, support, key=jax.random.PRNGKey(1)))
        params = jax.tree_util.tree_map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes)  # the draws need none
        with official_noise_draws() as draws:
            jax.jit(lambda p: official.apply(p, x, support, eval_mode=False, key=jax.random.PRNGKey(3)))(params)
    (p_adv, q_adv), (p_value, q_value) = ([draw for draw, _ in draws[path]] for path in ("NoisyNetwork_0", "NoisyNetwork_1"))
    assert p_adv.shape == p_value.shape == (7744, 1) and q_adv.shape == (1, NUM_ACTIONS * NUM_ATOMS)
    np.testing.assert_array_equal(p_adv, p_value)  # eps_in: equal
    assert np.array_equal(q_adv[:, :NUM_ATOMS], q_value) == partitionable  # eps_out: a prefix, or not
    # and every expert gets the same noise: one draw for all four
    (p_expert, _), (q_expert, _) = draws["ExpertModel_0/net"]
    assert p_expert.shape == (64, 1) and q_expert.shape == (1, 16)


@pytest.mark.parametrize("moe_type", ["SIMPLICIAL_EMBEDDING_V1", "SIMPLICIAL_EMBEDDING_V2", "BASELINE"])
def test_the_official_rainbow_network_crashes_without_an_moe(moe_type):
    """Why the scripts' Rainbow baselines and simplicial embeddings are compared with the official DQN networks
    (tests/official/test_official_dqn_softmoe.py) and a restatement (tests/test_moe_knobs.py), not with
    FullRainbowMoENetwork: its branch without an MoE never sets `x_hidden` (softmoe.md section 10.2)."""
    official = moe_networks.FullRainbowMoENetwork(num_actions=NUM_ACTIONS, num_atoms=NUM_ATOMS, nn_scale=1,
                                                  inputs_preprocessed=True, encoder_type="CNN", num_experts=2,
                                                  expert_hidden_units=16, moe_type=moe_type)
    x, support = np.zeros((84, 84, 4), np.float32), np.zeros(NUM_ATOMS, np.float32)
    with pytest.raises(UnboundLocalError, match="x_hidden"):
        official.init(jax.random.PRNGKey(0), x, support, key=jax.random.PRNGKey(0))
