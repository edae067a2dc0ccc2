"""dqn_softmoe.py against dopamine's NatureDQNMoE and ImpalaMoE (labs/moes/architectures/networks.py): every weight
of the script's network perturbed, then copied into the official module; the same Q-values in float64 (<= 1e-12, on
the same float64 frames / 255) and in float32 (<= 1e-5 relative, each side preprocessing the uint8 frames itself);
the same parameter count, plus SoftMoE's `scalar`, which the official module creates even without normalization."""
import contextlib
import copy
import functools

import jax
import numpy as np
import pytest
import torch
from harness import build_network, load_script
from official_mapping import (Mapper, assert_close, encoder_input, frames, moe_networks, nhwc, num_official_params, x64,
                              num_params, perturb_, preprocessed)

m = load_script("dqn_softmoe")
NUM_ACTIONS = 6
BATCH = 3
TOP1_FAVOURITE = 3  # the Top-1 router is biased towards this expert, whose queue then overflows

# name: (script flags, official module, its attributes)
CONFIGS = {
    "softmoe8-perconv": (dict(), moe_networks.NatureDQNMoE, dict(num_experts=8)),
    "softmoe8-perfeat": (dict(tokenization="perfeat"), moe_networks.NatureDQNMoE,
                         dict(num_experts=8, routing_type="PER_FEATUREMAP")),
    "softmoe8-perpatch": (dict(tokenization="perpatch"), moe_networks.NatureDQNMoE,
                          dict(num_experts=8, routing_type="PER_PATCH")),
    "top1-8-dropping": (dict(moe_type="top1"), moe_networks.NatureDQNMoE, dict(num_experts=8, moe_type="MOE")),
    "baseline-1": (dict(moe_type="baseline", num_experts=1), moe_networks.NatureDQNMoE,
                   dict(num_experts=1, moe_type="BASELINE")),
    "baseline-8-scaled": (dict(moe_type="baseline", num_experts=8), moe_networks.NatureDQNMoE,
                          dict(num_experts=8, moe_type="BASELINE", scale_hidden_layer=True)),
    "impala-softmoe8": (dict(encoder="impala"), moe_networks.ImpalaMoE, dict(num_experts=8)),
    # --capacity-factor, the official SoftMoE.capacity_factor / MoE.capacity_factor (gin-bound: the networks never
    # pass it): 2 slots per expert instead of 16, 1 slot, and Top-1 capacity 8 instead of 16
    "softmoe8-slots-0.1": (dict(capacity_factor=0.1), moe_networks.NatureDQNMoE, dict(num_experts=8)),
    "softmoe8-one-slot": (dict(capacity_factor=0.05), moe_networks.NatureDQNMoE, dict(num_experts=8)),
    "top1-8-capacity-0.5": (dict(moe_type="top1", capacity_factor=0.5), moe_networks.NatureDQNMoE,
                            dict(num_experts=8, moe_type="MOE")),
    # --use-random-phi: the official draws phi ~ N(0, 1) from the call's key; one key for every sample here, so the
    # official phi is one fixed draw, which the script's buffer is set to (RANDOM_PHI)
    "softmoe8-random-phi": (dict(use_random_phi=True), moe_networks.NatureDQNMoE, dict(num_experts=8)),
    # --use-extra-linear-layer: Dense(512) + ReLU before the head, after the MoE and after the baseline's hidden layer
    "softmoe8-extra-layer": (dict(use_extra_linear_layer=True), moe_networks.NatureDQNMoE,
                             dict(num_experts=8, use_extra_linear_layer=True)),
    "baseline-1-extra-layer": (dict(moe_type="baseline", num_experts=1, use_extra_linear_layer=True),
                               moe_networks.NatureDQNMoE, dict(num_experts=1, moe_type="BASELINE",
                                                               use_extra_linear_layer=True)),
    # the simplicial-embedding baselines; V1's dense layer is scaled like the script's baseline (scale_hidden_layer)
    "sem-v1-4": (dict(moe_type="simplicial_embedding_v1", num_experts=4, sem_tau=0.5), moe_networks.NatureDQNMoE,
                 dict(num_experts=4, moe_type="SIMPLICIAL_EMBEDDING_V1", scale_hidden_layer=True, tau=0.5)),
    "sem-v2-4": (dict(moe_type="simplicial_embedding_v2", num_experts=4), moe_networks.NatureDQNMoE,
                 dict(num_experts=4, moe_type="SIMPLICIAL_EMBEDDING_V2")),
    "impala-sem-v2-2": (dict(encoder="impala", moe_type="simplicial_embedding_v2", num_experts=2),
                        moe_networks.ImpalaMoE, dict(num_experts=2, moe_type="SIMPLICIAL_EMBEDDING_V2")),
}
RANDOM_PHI = "softmoe8-random-phi"


@contextlib.contextmanager
def gin_bound(config):
    """The official modules with the config's capacity factor bound as its gin file would bind it."""
    import gin

    flags = CONFIGS[config][0]
    bindings = {}
    if "capacity_factor" in flags:
        name = "MoE.capacity_factor" if flags.get("moe_type") == "top1" else "SoftMoE.capacity_factor"
        bindings[name] = flags["capacity_factor"]
    if flags.get("use_random_phi"):
        bindings["SoftMoE.use_random_phi"] = True
    if not bindings:
        yield
        return
    for name, value in bindings.items():
        gin.bind_parameter(name, value)
    try:
        yield
    finally:
        gin.clear_config()


@functools.cache
def script_network(config):
    """The script's network for `config`, every parameter perturbed, in float64."""
    flags = CONFIGS[config][0]
    torch.manual_seed(0)
    net = perturb_(build_network(m, m.Args(**flags), NUM_ACTIONS), seed=1).double()
    if flags.get("moe_type") == "top1":
        with torch.no_grad():
            net.moe.router.weight[TOP1_FAVOURITE] += 0.3 * net.moe.router.weight.abs().mean()
    return net


def official_params(net, flags, shapes, dtype):
    mp = Mapper(net, dtype)
    if flags.get("encoder") == "impala":
        mp.impala("encoder/")
    else:
        mp.nature("")
    extra = {}
    moe = "moe.moe" if flags.get("use_extra_linear_layer") else "moe"  # an ExtraLinearLayer wraps the MoE layer
    if flags.get("moe_type", "softmoe") not in ("softmoe", "top1"):  # the baseline and the simplicial embeddings
        mp.dense("Dense_0", moe, nchw=net.encoder.output_shape)  # after the flatten: NCHW -> NHWC
        dense = 1
    else:
        if flags.get("tokenization") == "perpatch":
            mp.conv("embedding", "tokenizer.embedding")
        if flags.get("moe_type") == "top1":
            mp.put("MoE_0/router/Dense_0/kernel", mp.take(f"{moe}.router.weight").T)
        else:
            if not flags.get("use_random_phi"):  # else a buffer, set to the official draw (`run_both`)
                mp.put("SoftMoE_0/phi_weights", mp.take(f"{moe}.phi"))
            extra["SoftMoE_0/scalar"] = np.array([3.7])  # unused without normalization: any value
        mp.experts(moe=moe)
        dense = 0  # after the MoE: tokens [m, d] flatten token-major in both frameworks
    if flags.get("use_extra_linear_layer"):
        mp.dense(f"Dense_{dense}", "moe.extra")
        dense += 1
    mp.dense(f"Dense_{dense}", "head")
    return mp.finish(shapes, extra)


def official_random_phi(shape, dtype):
    """The phi that the official SoftMoE draws with use_random_phi from the key the networks get (PRNGKey(0) here)."""
    key, _ = jax.random.split(jax.random.PRNGKey(0))
    with x64(dtype == np.float64):
        return np.array(jax.random.normal(key, shape, dtype=dtype))  # a writable copy


def run_official(official, params, x):
    """As the official agents do: the module on one unbatched sample, vmapped over the batch."""
    return jax.jit(lambda p, x: jax.vmap(lambda s: official.apply(p, s, key=jax.random.PRNGKey(0)))(x))(params, x)


@functools.cache
def official_shapes(config):
    _, cls, attributes = CONFIGS[config]
    official = cls(num_actions=NUM_ACTIONS, inputs_preprocessed=True, **attributes)
    with gin_bound(config):
        return jax.eval_shape(lambda: official.init(jax.random.PRNGKey(0), np.zeros((84, 84, 4), np.float32),
                                                    key=jax.random.PRNGKey(0)))


@functools.cache
def run_both(config, dtype):
    flags, cls, attributes = CONFIGS[config]
    obs = frames(BATCH)
    net = script_network(config) if dtype == np.float64 else copy.deepcopy(script_network(config)).float()
    if config == RANDOM_PHI:
        net = copy.deepcopy(net)
        net.moe.phi.copy_(torch.from_numpy(official_random_phi(tuple(net.moe.phi.shape), dtype)))
    exact = dtype == np.float64  # float64: the same float64 frames / 255 on both sides
    official = cls(num_actions=NUM_ACTIONS, inputs_preprocessed=exact, **attributes)
    x = preprocessed(obs, dtype) if exact else nhwc(obs)
    shapes = official_shapes(config)
    with x64(exact), gin_bound(config):
        out = run_official(official, official_params(net, flags, shapes, dtype), x)
    record = {}
    with torch.no_grad(), encoder_input(net, obs.double() / 255.0) if exact else contextlib.nullcontext():
        q = net(obs, record)
    return net, shapes, out, q.numpy(), record


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_q_values_and_parameter_count_match_the_official_module(config, dtype):
    net, shapes, out, q, record = run_both(config, dtype)
    assert_close(f"dqn_softmoe {config}", q, out.q_values, dtype)
    softmoe = CONFIGS[config][0].get("moe_type", "softmoe") == "softmoe"
    assert num_official_params(shapes) == num_params(net) + softmoe


def test_the_capacity_factor_sets_the_official_number_of_slots():
    for config, slots in (("softmoe8-perconv", 16), ("softmoe8-slots-0.1", 2), ("softmoe8-one-slot", 1)):
        phi = official_shapes(config)["params"]["SoftMoE_0"]["phi_weights"].shape  # (d, n, p)
        assert phi[2] == slots == script_network(config).moe.slots_per_expert, config
    assert script_network("top1-8-capacity-0.5").moe.capacity == 8


def test_top1_drops_the_same_tokens_as_the_official_moe():
    net, _, out, _, record = run_both("top1-8-dropping", np.float64)
    dropped = ~record["kept"][..., 0].numpy()  # [B, m] (k = 1)
    assert dropped.sum(axis=1).min() >= 10, "the test needs tokens really dropped in every sample"
    experts = np.asarray(out.moe_out.router_out.top_experts)[..., 0]  # [B, m], official
    np.testing.assert_array_equal(experts, record["router_probs"].argmax(-1).numpy())
    # the official MoE outputs exactly zero for the tokens it drops, and for no other token
    official_dropped = np.all(np.asarray(out.moe_out.values) == 0, axis=-1)  # [B, m]
    np.testing.assert_array_equal(dropped, official_dropped)
