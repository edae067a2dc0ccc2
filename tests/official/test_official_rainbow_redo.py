"""ReDo of rainbow_tokenized.py and der_single_expert.py against dopamine's ReDo lab: the scripts' Rainbow network with
the official recycled agents' layers (Nature CNN -> flatten -> dense 512 -> dueling heads, `--moe-type baseline`)
against the lab's `FullRainbowNetwork` (labs/redo/networks.py, the network of `RecycledAtari100kRainbowAgent`), and the
dormant scores, masks and one recycling step against `NeuronRecycler` (labs/redo/weight_recyclers.py) with the layer
list that agent builds (the dense layer feeds both heads), on every weight perturbed and dead and weak neurons planted
in every hidden layer, in float64.

The lab's network has no noise: it builds plain Dense layers whatever `noisy` says (pinned below), so the script's
noisy layers are compared through their mean weights (mu), with the noise off, and their sigmas, which the official
recycler never sees, are checked to follow their mu. The masks agree on every boundary but the flatten (conv3 ->
dense, the official `jnp.repeat` over an NHWC flatten: tests/official/test_official_dqn_redo.py and docs/dqn_redo.md);
the official recycler redraws from xavier-uniform and logs the heads' outputs as neurons: deviations that
docs/der_single_expert.md and docs/rainbow_tokenized.md list, pinned by the last tests."""
import copy
import functools
import importlib.util
import pathlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from harness import build_network, load_script
from official_mapping import (Mapper, assert_close, base_networks, encoder_input, frames, perturb_, redo_networks,
                              weight_recyclers, x64)

SCRIPTS = ("rainbow_tokenized", "der_single_expert")
NUM_ACTIONS = 6
NUM_ATOMS = 51
BATCH = 8
TAU = 0.1
# script layer, official layer, next official layers
LAYERS = [("conv1", "Conv_0", ["Conv_1"]), ("conv2", "Conv_1", ["Conv_2"]), ("conv3", "Conv_2", ["Dense_0"]),
          ("hidden", "Dense_0", ["Dense_1", "Dense_2"])]
SCRIPT_KERNEL = {"Conv_0": "encoder.conv1.weight", "Conv_1": "encoder.conv2.weight", "Conv_2": "encoder.conv3.weight",
                 "Dense_0": "moe.weight_mu", "Dense_1": "head.advantage.weight_mu", "Dense_2": "head.value.weight_mu"}
DEAD = {"conv1": [3], "conv2": [10, 11], "conv3": [5, 40], "hidden": [7, 100, 300]}  # bias -1000: silent
WEAK = {"conv2": [20], "hidden": [50]}  # incoming weights x 0.01, bias 0: active, but far below tau


def bias(net, name):
    return net.moe.bias_mu if name == "hidden" else getattr(net.encoder, name).bias  # the baseline's dense layer


def weight(net, name):
    return net.moe.weight_mu if name == "hidden" else getattr(net.encoder, name).weight


@functools.cache
def script_network(script):
    m = load_script(script)
    torch.manual_seed(0)
    args = m.Args(encoder="nature", moe_type="baseline", num_experts=1, expert_hidden_units=512, n_atoms=NUM_ATOMS)
    net = perturb_(m.RecyclableQNetwork.of(build_network(m, args, NUM_ACTIONS)), seed=1).double()  # as --redo builds it
    with torch.no_grad():
        for name, units in DEAD.items():
            bias(net, name)[units] = -1000.0
        for name, units in WEAK.items():
            weight(net, name)[units] *= 0.01
            bias(net, name)[units] = 0.0
    return net.eval()  # the noise off: the official network has none


def to_official(net):
    """The script's mean weights in the official layout; the noisy layers' sigmas have no official counterpart."""
    mp = Mapper(net, np.float64)
    mp.nature("")
    for path, name in (("Dense_0", "moe"), ("Dense_1", "head.advantage"), ("Dense_2", "head.value")):
        w = mp.take(f"{name}.weight_mu")
        if name == "moe":  # the baseline's dense layer, after the flatten: NCHW -> NHWC
            w = w.reshape(-1, 64, 11, 11).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        mp.put(f"{path}/kernel", w.T)
        mp.put(f"{path}/bias", mp.take(f"{name}.bias_mu"))
        mp.take(f"{name}.weight_sigma"), mp.take(f"{name}.bias_sigma")
    return mp


def kernel_layout(path, w):
    """A script weight (or a mask over it) in the layout of the official kernel."""
    w = w.detach().numpy() if torch.is_tensor(w) else w
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    if path == "Dense_0":  # [512, 64*11*11] NCHW -> [11*11*64, 512]
        return w.reshape(-1, 64, 11, 11).transpose(0, 2, 3, 1).reshape(w.shape[0], -1).T
    return w.T


def official_network():
    redo_networks.FullRainbowNetwork.layer_names.clear()  # a class attribute it appends to at every init, never clears
    return redo_networks.FullRainbowNetwork(num_actions=NUM_ACTIONS, num_atoms=NUM_ATOMS, noisy=True, dueling=True)


@functools.cache
def setup(script):
    """The script's network and the official one with the same weights, the probe batch, the official layer names, the
    official intermediates (post-ReLU activations, captured per sample and vmapped, as the official agent does) and
    Q-values."""
    net = script_network(script)
    obs = frames(BATCH, seed=3)
    official = official_network()
    x = np.ascontiguousarray(obs.numpy().transpose(0, 2, 3, 1))
    with x64(True):
        support = jnp.asarray(net.support.numpy())  # the script's atoms (a float32 linspace), the same for both
        shapes = jax.eval_shape(lambda: official.init(jax.random.PRNGKey(0), x[0], support=support))
        names = list(redo_networks.FullRainbowNetwork.layer_names)
        params = to_official(net).finish(shapes)
        apply = jax.jit(jax.vmap(lambda p, s: official.apply(
            p, s, support=support, capture_intermediates=lambda module, _: module.name is not None and
            module.name.endswith("_act"), mutable=["intermediates"]), in_axes=(None, 0)))
        out, state = apply(params, x)
    return net, obs, names, params, out.q_values, state["intermediates"]


@functools.cache
def official_input(obs):
    """obs / 255 as the official network computes it (see tests/official/test_official_dqn_redo.py)."""
    x = np.array(jax.jit(base_networks.preprocess_atari_inputs)(obs.numpy()))
    return torch.from_numpy(x).double()


def script_masks(script, net, obs):
    with encoder_input(net, official_input(obs)):
        return load_script(script).dormant_neurons(net, obs, TAU)


def recycler(names):
    """The recycler as RecycledAtari100kRainbowAgent builds it: the two heads as one list entry after the dense layer
    (recycled_atari100k_rainbow_agent.py:58-61), so that the dense layer's outgoing weights are both heads'."""
    assert names == ["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1", "Dense_2"]  # Dense_1: the advantage head
    return weight_recyclers.NeuronRecycler(names[:-2] + [names[-2:]], dead_neurons_threshold=TAU, reset_period=1,
                                           network="nature")


def activations(intermediates):
    return flax.traverse_util.flatten_dict(intermediates, sep="/")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_networks_match_with_the_noise_off(script):
    net, obs, _, _, official_q, _ = setup(script)
    with torch.no_grad(), encoder_input(net, official_input(obs)):
        q = net(obs)[1]
    assert_close(f"{script} baseline network vs the ReDo lab's FullRainbowNetwork", q.numpy(), official_q, np.float64)


@pytest.mark.parametrize("script", SCRIPTS)
def test_dormant_scores_and_masks_match_the_official_recycler(script):
    net, obs, names, _, _, intermediates = setup(script)
    masks, scores = script_masks(script, net, obs)
    acts = activations(intermediates)
    rec = recycler(names)
    for name, official_name, _ in LAYERS:
        with x64(True):
            official_score = np.asarray(rec.estimate_neuron_score(acts[f"{official_name}_act/__call__"][0]))
        assert_close(f"{script} dormant scores {name}", scores[name].numpy(), official_score, np.float64)
        np.testing.assert_array_equal(masks[name].numpy(), official_score <= TAU)
        assert set(DEAD[name] + WEAK.get(name, [])) <= set(np.flatnonzero(official_score <= TAU))


@functools.cache
def official_recycling(script):
    """One official recycle_dead_neurons step on the setup's params, every Adam moment at 1: (incoming masks, outgoing
    masks) as create_masks made them, the params before and after, and the new moments mu, flattened."""
    _, _, names, params, _, intermediates = setup(script)
    params = flax.core.freeze(params)
    rec = recycler(names)
    masks = []

    def create_masks(*args):
        result = weight_recyclers.NeuronRecycler.create_masks(rec, *args)
        masks.append(result[:2])
        return result

    rec.create_masks = create_masks

    def step(intermediates, params):
        state = optax.adam(1e-4).init(params)
        ones = jax.tree_util.tree_map(jnp.ones_like, params)
        state = (state[0]._replace(mu=ones, nu=ones),) + tuple(state[1:])
        new_params, new_state = rec.recycle_dead_neurons(intermediates, params, jax.random.PRNGKey(0), state)
        return masks[0], new_params, new_state[0].mu

    with x64(True):
        (incoming, outgoing), new_params, mu = jax.jit(step)(intermediates, params)
    flat = functools.partial(flax.traverse_util.flatten_dict, sep="/")
    return flat(incoming), flat(outgoing), flat(params), flat(new_params), flat(mu)


def script_touched(script, net, masks, only=None):
    """{script parameter: entries whose Adam moments recycle_dormant zeroed (all moments start at 1)} when only layer
    `only` (or every layer) is recycled, and the recycled network."""
    net = copy.deepcopy(net)
    optimizer = torch.optim.Adam(net.parameters())
    for p in net.parameters():
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}
    if only is not None:
        masks = {k: v if k == only else torch.zeros_like(v) for k, v in masks.items()}
    load_script(script).recycle_dormant(net, optimizer, masks)
    touched = {}
    for name, p in net.named_parameters():
        assert torch.equal(optimizer.state[p]["exp_avg"] == 0, optimizer.state[p]["exp_avg_sq"] == 0)
        touched[name] = (optimizer.state[p]["exp_avg"] == 0).numpy()
    return touched, net


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("name,official_name,next_official_names", LAYERS)
def test_incoming_and_outgoing_masks_match_the_official_recycler_away_from_the_flatten(script, name, official_name,
                                                                                       next_official_names):
    net, obs, *_ = setup(script)
    masks, _ = script_masks(script, net, obs)
    touched, _ = script_touched(script, net, masks, only=name)
    incoming, outgoing, *_ = official_recycling(script)
    official_in = np.asarray(incoming[f"params/{official_name}/kernel"]) == 1
    assert official_in.any()
    np.testing.assert_array_equal(kernel_layout(official_name, touched[SCRIPT_KERNEL[official_name]]), official_in)
    for next_name in next_official_names:  # the dense layer's: both heads
        official_out = np.asarray(outgoing[f"params/{next_name}/kernel"]) == 1
        assert official_out.any()
        ours = kernel_layout(next_name, touched[SCRIPT_KERNEL[next_name]])
        if name == "conv3":  # the official flatten boundary zeroes other inputs (test_official_dqn_redo.py)
            assert not np.array_equal(ours, official_out) and ours.sum() == official_out.sum()
        else:
            np.testing.assert_array_equal(ours, official_out)
    # the noisy layers' sigmas, which the official recycler never sees, follow their mu entry for entry
    for layer in ("moe", "head.advantage", "head.value"):
        np.testing.assert_array_equal(touched[f"{layer}.weight_sigma"], touched[f"{layer}.weight_mu"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_one_recycling_step_matches_the_official_recycler_away_from_the_flatten(script):
    """The whole step: the same biases (zeroed, the heads' kept), the same kernel entries redrawn, zeroed and left
    alone, the same moments zeroed; the redrawn values come from other RNGs (and another distribution, see below)."""
    net, obs, *_ = setup(script)
    masks, _ = script_masks(script, net, obs)
    touched, recycled = script_touched(script, net, masks)
    _, _, before, after, mu = official_recycling(script)
    ours = to_official(recycled).out
    for official_name in ("Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1", "Dense_2"):
        b = f"params/{official_name}/bias"
        np.testing.assert_array_equal(ours[b.removeprefix("params/")], np.asarray(after[b]))
        if official_name == "Dense_0":  # its rows are the flatten boundary
            continue
        kernel = f"params/{official_name}/kernel"
        np.testing.assert_array_equal(kernel_layout(official_name, touched[SCRIPT_KERNEL[official_name]]),
                                      np.asarray(mu[kernel]) == 0)
        old, official_new, our_new = (np.asarray(before[kernel]), np.asarray(after[kernel]),
                                      ours[kernel.removeprefix("params/")])
        np.testing.assert_array_equal(official_new == old, our_new == old)  # the same entries left alone
        np.testing.assert_array_equal(official_new == 0, our_new == 0)  # the same entries zeroed
        assert (official_new != old).any()
    # the noisy units' sigmas back at sigma0 / sqrt(fan_in): the script's extension to its noisy layers
    dead = masks["hidden"].numpy()
    sigma = recycled.moe.sigma0 / np.sqrt(64 * 11 * 11)
    np.testing.assert_array_equal(recycled.moe.bias_sigma.detach().numpy()[dead], sigma)
    rows = recycled.moe.weight_sigma.detach().numpy()[dead]
    assert set(np.unique(rows)) == {0.0, sigma}  # 0: the inputs of recycled conv3 channels (zeros win)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_official_recycler_redraws_from_xavier_uniform_the_script_from_each_layers_own_init(script):
    """weight_recyclers.py:87 redraws every kernel from xavier_uniform, whatever the network was built with; the
    script redraws a noisy unit's mu from its construction-time U(+-1/sqrt(fan_in)), narrower for the dense layer."""
    net, obs, *_ = setup(script)
    masks, _ = script_masks(script, net, obs)
    _, recycled = script_touched(script, net, masks, only="hidden")
    _, _, before, after, _ = official_recycling(script)
    fed = np.repeat(masks["conv3"].numpy(), 121)  # NCHW inputs zeroed by the conv3 recycling in the official step
    ours = recycled.moe.weight_mu.detach().numpy()[masks["hidden"].numpy()]
    fan_in, fan_out = 64 * 11 * 11, 512
    assert np.abs(ours).max() <= 1 / np.sqrt(fan_in)
    official = np.asarray(after["params/Dense_0/kernel"]).T[masks["hidden"].numpy()]
    assert np.abs(official[:, ~fed]).max() > 1.5 / np.sqrt(fan_in)
    assert np.abs(official).max() <= np.sqrt(6 / (fan_in + fan_out))


def test_the_labs_rainbow_network_is_noiseless_and_its_recycler_logs_the_heads_as_neurons():
    """Facts of the lab the docs cite: its FullRainbowNetwork builds plain Dense layers whatever `noisy` says (so its
    recycled DER trains without noisy nets, and with noisy = True the agent's epsilon is zero: no exploration); its
    logged dead-neuron percentage counts the two heads' outputs as neurons (they are not named `final_layer`), where
    the scripts log the hidden layers only; and the agents' `_sample_batch_for_statistics` calls
    `sample_transition_batch`, which dopamine 4.1's JAX replay buffer no longer has."""
    _, _, _, params, _, intermediates = setup("der_single_expert")
    assert not any("sigma" in path or "mu" in path for path in flax.traverse_util.flatten_dict(params, sep="/"))
    official = official_network()
    x = np.ascontiguousarray(frames(1, seed=5).numpy().transpose(0, 2, 3, 1))[0]
    with x64(True):
        support = jnp.linspace(-10.0, 10.0, NUM_ATOMS)
        a, b = (official.apply(params, x, support=support, key=jax.random.PRNGKey(k)).q_values for k in (1, 2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # no noise whatever the key
    rec = recycler(["Conv_0", "Conv_1", "Conv_2", "Dense_0", "Dense_1", "Dense_2"])
    with x64(True):
        logged = rec.log_dead_neurons_count(intermediates)
    assert logged["feature/total"] == 32 + 64 + 64 + 512 + NUM_ACTIONS * NUM_ATOMS + NUM_ATOMS
    assert "dead_feature_percentage/Dense_1_act" in logged and "dead_feature_percentage/Dense_2_act" in logged
    # read, not imported: the buffer imports snappy, which the networks never need
    buffer = pathlib.Path(importlib.util.find_spec("dopamine.jax").submodule_search_locations[0], "replay_memory",
                          "replay_buffer.py").read_text()
    assert "class ReplayBuffer" in buffer and "def sample(" in buffer and "sample_transition_batch" not in buffer
