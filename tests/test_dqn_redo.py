"""dqn_redo.py: the network against a float64 restatement, dormant scores against an independent computation,
and every property of one recycling step on a network with planted dead and weak neurons."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import build_network, load_script

m = load_script("dqn_redo")

LAYERS = ("conv1", "conv2", "conv3", "hidden")
SAME_PADS = {"conv1": (2, 2), "conv2": (1, 2), "conv3": (1, 1)}  # TF 'SAME' (before, after): 84 -> 21 -> 11 -> 11
STRIDES = {"conv1": 4, "conv2": 2, "conv3": 1}
DEAD = {"conv1": [3], "conv2": [10, 11], "conv3": [5, 40], "hidden": [7, 100, 300]}  # bias -1000: silent
WEAK = {"conv2": [20], "hidden": [50]}  # incoming weights x 0.01: active, but scores far below 0.1


def observations(n=16, seed=0):
    return torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def reference_forward(net, obs):
    """Post-ReLU activations of the hidden layers and Q-values, in float64, restated without the script's code."""
    x, acts = obs.double() / 255.0, {}
    for name in ("conv1", "conv2", "conv3"):
        conv = getattr(net.encoder, name)
        lo, hi = SAME_PADS[name]
        x = torch.relu(F.conv2d(F.pad(x, (lo, hi, lo, hi)), conv.weight.double(), conv.bias.double(), STRIDES[name]))
        acts[name] = x
    h = torch.relu(x.reshape(len(x), -1) @ net.hidden.weight.double().T + net.hidden.bias.double())
    acts["hidden"] = h
    return acts, h @ net.head.weight.double().T + net.head.bias.double()


def reference_scores(activation):
    """Mean |a| of each neuron over every other axis, divided by the layer's mean (ReDo, mean normalization)."""
    a = activation.detach().numpy()
    raw = np.array([np.abs(a[:, i]).mean() for i in range(a.shape[1])])
    return raw / (raw.mean() + 1e-9)


def layer(net, name):
    return net.hidden if name == "hidden" else getattr(net.encoder, name)


def planted_network(seed=0, num_actions=6):
    torch.manual_seed(seed)
    net = build_network(m, m.Args(), num_actions)
    with torch.no_grad():
        for name, units in DEAD.items():
            layer(net, name).bias[units] = -1000.0
        for name, units in WEAK.items():
            layer(net, name).weight[units] *= 0.01
    return net


def test_network_matches_float64_reference_and_official_sizes():
    net = planted_network()
    obs = observations(4)
    record = {}
    q = net(obs, record)
    acts, q_ref = reference_forward(net, obs)
    assert q.shape == (4, 6)
    torch.testing.assert_close(q.double(), q_ref, rtol=1e-4, atol=1e-5)
    assert list(record) == list(LAYERS)  # the Q head is never recorded, hence never scored
    for name in LAYERS:
        torch.testing.assert_close(record[name].double(), acts[name], rtol=1e-4, atol=1e-5)
    assert record["conv3"].shape == (4, 64, 11, 11) and net.hidden.in_features == 7744
    assert sum(record[name].shape[1] for name in LAYERS) == 672  # 32 + 64 + 64 + 512 hidden neurons
    assert [name for name, _, _ in net.redo_layers()] == list(LAYERS)
    # Dopamine's Nature DQN with SAME padding: 4,052,658 parameters for 18 actions
    assert sum(p.numel() for p in build_network(m, m.Args(), 18).parameters()) == 4_052_658


def test_initialization_is_xavier_uniform_with_zero_biases():
    torch.manual_seed(0)
    net = build_network(m, m.Args(), 18)
    for name, lay in [*((n, layer(net, n)) for n in LAYERS), ("head", net.head)]:
        w = lay.weight
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound, name
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name
        assert torch.equal(lay.bias, torch.zeros_like(lay.bias)), name


def test_dormant_scores_match_an_independent_computation():
    net = planted_network()
    obs = observations()
    acts, _ = reference_forward(net, obs)
    masks, scores = m.dormant_neurons(net, obs, 0.1)
    assert list(scores) == list(LAYERS)
    for name in LAYERS:
        expected = reference_scores(acts[name])
        np.testing.assert_allclose(scores[name].numpy(), expected, rtol=1e-4, atol=1e-6)
        assert abs(scores[name].mean().item() - 1.0) < 1e-4  # mean normalization: scores average to 1
        assert torch.equal(masks[name], torch.from_numpy(expected <= 0.1))


def test_planted_dead_and_weak_neurons_at_tau_0_and_0_1():
    net = planted_network()
    obs = observations()
    acts, _ = reference_forward(net, obs)
    masks0, scores = m.dormant_neurons(net, obs, 0.0)
    masks1, _ = m.dormant_neurons(net, obs, 0.1)
    for name in LAYERS:
        silent = (acts[name].abs().amax(dim=[d for d in range(acts[name].dim()) if d != 1]) == 0).numpy()
        assert silent[DEAD[name]].all()
        assert np.array_equal(masks0[name].numpy(), silent), name  # tau 0: exactly the silent neurons (score <= 0)
        assert masks1[name][DEAD[name]].all()
        for unit in WEAK.get(name, []):
            assert 0 < scores[name][unit] <= 0.1
            assert not masks0[name][unit] and masks1[name][unit]
        assert not (masks0[name] & ~masks1[name]).any()
    assert sum(int(masks1[name].sum()) for name in LAYERS) > sum(int(masks0[name].sum()) for name in LAYERS)


def adam_with_state(net, seed=1):
    """An Adam optimizer whose moments are non-zero everywhere (so that zeroing them is visible) and step 7."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(observations(2, seed)).sum().backward()
    optimizer.step()
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        state = optimizer.state[p]
        state["exp_avg"].copy_(torch.randn(p.shape, generator=gen))
        state["exp_avg_sq"].copy_(torch.rand(p.shape, generator=gen) + 0.5)
        state["step"].fill_(7)
    return optimizer


def expected_touched(net, masks):
    """{parameter name: entries ReDo may change}, restated: a dormant neuron's incoming row and bias, and the
    inputs it feeds in the next layer; a conv channel c of conv3 feeds the flattened inputs c*121 ... c*121+120."""
    touched = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in net.named_parameters()}
    prefix = {"conv1": "encoder.conv1", "conv2": "encoder.conv2", "conv3": "encoder.conv3", "hidden": "hidden"}
    following = {"conv1": "encoder.conv2", "conv2": "encoder.conv3", "conv3": "hidden", "hidden": "head"}
    for name in LAYERS:
        for unit in masks[name].nonzero().flatten().tolist():
            touched[f"{prefix[name]}.weight"][unit] = True
            touched[f"{prefix[name]}.bias"][unit] = True
            columns = slice(unit * 121, (unit + 1) * 121) if name == "conv3" else slice(unit, unit + 1)
            touched[f"{following[name]}.weight"][:, columns] = True
    return touched


@pytest.fixture(scope="module")
def recycled_at_tau0():
    net = planted_network()
    optimizer = adam_with_state(net)
    obs = observations()
    before, opt_before = copy.deepcopy(net.state_dict()), copy.deepcopy(optimizer.state_dict())
    with torch.no_grad():
        q_before = net(obs)
    masks, _ = m.dormant_neurons(net, obs, 0.0)
    counts = m.recycle_dormant(net, optimizer, masks)
    return dict(net=net, optimizer=optimizer, obs=obs, before=before, opt_before=opt_before, q_before=q_before,
                masks=masks, counts=counts)


def test_recycling_at_tau0_preserves_the_function_on_the_probe_batch(recycled_at_tau0):
    r = recycled_at_tau0
    assert r["counts"] == {name: int(r["masks"][name].sum()) for name in LAYERS}
    assert all(r["counts"][name] >= len(DEAD[name]) for name in LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(r["net"](r["obs"]), r["q_before"], rtol=1e-5, atol=1e-5)


def test_recycled_neurons_are_redrawn_and_their_biases_zeroed(recycled_at_tau0):
    r = recycled_at_tau0
    net, before = r["net"], r["before"]
    prefix = {"conv1": "encoder.conv1", "conv2": "encoder.conv2", "conv3": "encoder.conv3", "hidden": "hidden"}
    previous = {"conv2": "conv1", "conv3": "conv2", "hidden": "conv3"}
    for name in LAYERS:
        w, b = layer(net, name).weight, layer(net, name).bias
        dead = r["masks"][name]
        assert torch.equal(b[dead], torch.zeros_like(b[dead]))
        fan_in, fan_out = w.shape[1] * w[0, 0].numel(), w.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier_uniform of the whole weight tensor
        rows, old_rows = w[dead], before[f"{prefix[name]}.weight"][dead]
        if name in previous:  # inputs from a recycled neuron of the previous layer end at zero (zeros win)
            fed = r["masks"][previous[name]].repeat_interleave(w.shape[1] // r["masks"][previous[name]].numel())
            assert fed.any() and torch.equal(rows[:, fed], torch.zeros_like(rows[:, fed]))
            rows, old_rows = rows[:, ~fed], old_rows[:, ~fed]
        assert rows.abs().max() <= bound
        assert abs(rows.std().item() - bound / math.sqrt(3)) < 0.15 * bound / math.sqrt(3), name
        assert (rows != old_rows).all(), name
    # the recycled neurons are alive again: the dormant count on the same batch drops
    after, _ = m.dormant_neurons(net, r["obs"], 0.0)
    assert sum(int(after[n].sum()) for n in LAYERS) < sum(int(r["masks"][n].sum()) for n in LAYERS) / 2


def test_outgoing_weights_zero_exactly_and_everything_else_bit_identical(recycled_at_tau0):
    r = recycled_at_tau0
    touched = expected_touched(r["net"], r["masks"])
    following = {"encoder.conv2": "conv1", "encoder.conv3": "conv2", "hidden": "conv3", "head": "hidden"}
    for name, p in r["net"].named_parameters():
        unchanged = ~touched[name]
        assert torch.equal(p[unchanged], r["before"][name][unchanged]), f"{name} changed outside the recycled entries"
        if name.endswith(".weight") and name[: -len(".weight")] in following:
            dead = r["masks"][following[name[: -len(".weight")]]]
            outgoing = p.flatten(1).view(p.shape[0], dead.numel(), -1)[:, dead]  # [out, dead inputs, positions]
            assert torch.equal(outgoing, torch.zeros_like(outgoing)), name
    assert torch.equal(r["net"].head.bias, r["before"]["head.bias"])


def test_adam_moments_zeroed_exactly_at_the_touched_weights(recycled_at_tau0):
    r = recycled_at_tau0
    touched = expected_touched(r["net"], r["masks"])
    names = [name for name, _ in r["net"].named_parameters()]
    after = r["optimizer"].state_dict()["state"]
    for index, name in enumerate(names):
        old, new = r["opt_before"]["state"][index], after[index]
        assert torch.equal(new["step"], old["step"]) and new["step"].item() == 7
        reset = touched[name] if name.endswith(".weight") else torch.zeros_like(touched[name])  # bias moments kept
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new[key][reset], torch.zeros_like(new[key][reset])), f"{name} {key}"
            assert torch.equal(new[key][~reset], old[key][~reset]), f"{name} {key}"


def test_the_q_head_is_never_recycled():
    net = planted_network()
    optimizer = adam_with_state(net)
    head_weight, head_bias = net.head.weight.clone(), net.head.bias.clone()
    masks, scores = m.dormant_neurons(net, observations(4), 1e9)  # every hidden neuron is "dormant"
    assert list(masks) == list(LAYERS) and sum(mask.numel() for mask in masks.values()) == 672
    counts = m.recycle_dormant(net, optimizer, masks)
    assert counts == {"conv1": 32, "conv2": 64, "conv3": 64, "hidden": 512}
    assert torch.equal(net.head.weight, torch.zeros_like(head_weight))  # outgoing weights of every hidden unit
    assert torch.equal(net.head.bias, head_bias) and not torch.equal(head_weight, torch.zeros_like(head_weight))
    torch.testing.assert_close(net(observations(3)), head_bias.expand(3, -1))


class SmallConvNet(torch.nn.Module):
    """conv (3 channels, 2x3 output) -> flatten (18) -> dense 5 -> linear 2: any layer sizes work."""

    def __init__(self):
        super().__init__()
        self.conv = m.xavier_(torch.nn.Conv2d(1, 3, 2))
        self.dense = m.xavier_(torch.nn.Linear(18, 5))
        self.out = m.xavier_(torch.nn.Linear(5, 2))

    def forward(self, x, record=None):
        c = F.relu(self.conv(x))
        h = F.relu(self.dense(c.flatten(1)))
        if record is not None:
            record["conv"], record["dense"] = c, h
        return self.out(h)

    def redo_layers(self):
        return [("conv", m.incoming(self.conv), m.outgoing(self.dense)),
                ("dense", m.incoming(self.dense), m.outgoing(self.out))]


def test_recycling_is_generic_and_maps_a_channel_to_its_flattened_inputs():
    torch.manual_seed(0)
    net = SmallConvNet()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)  # no per-entry state: nothing to reset
    with torch.no_grad():
        net.conv.bias[1] = -100.0
    x = torch.rand(8, 1, 3, 4)
    before = copy.deepcopy(net.state_dict())
    q = net(x).detach()
    masks, _ = m.dormant_neurons(net, x, 0.0)
    assert masks["conv"].tolist() == [False, True, False]
    m.recycle_dormant(net, optimizer, {"conv": masks["conv"], "dense": torch.zeros(5, dtype=torch.bool)})
    grid = net.dense.weight.view(5, 3, 2, 3)  # dense inputs in NCHW order: channel, row, column
    assert torch.equal(grid[:, 1], torch.zeros(5, 2, 3))
    assert torch.equal(grid[:, [0, 2]], before["dense.weight"].view(5, 3, 2, 3)[:, [0, 2]])
    assert net.conv.bias[1] == 0 and not torch.equal(net.conv.weight[1], before["conv.weight"][1])
    torch.testing.assert_close(net(x), q)


def test_huber_loss_with_plain_max_target():
    class Table(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = torch.nn.Parameter(torch.tensor(values))

        def forward(self, frames, record=None):
            return self.values[frames[:, -1, 0].long()]

    online = Table([[0.0, 1.0], [2.0, -1.0], [0.5, 0.5]])
    target = Table([[3.0, -2.0], [0.0, 0.25], [1.0, 4.0]])
    batch = {"obs": torch.tensor([0, 1, 2, 0]).view(4, 1, 1), "actions": torch.tensor([1, 0, 1, 0]),
             "returns": torch.tensor([1.0, -0.5, 0.2, 0.0]), "discounts": torch.tensor([0.9, 0.9, 0.0, 0.81]),
             "next_obs": torch.tensor([1, 2, 0, 2]).view(4, 1, 1)}
    loss, q_taken = m.dqn_loss(online, target, batch)
    targets = np.array([1.0 + 0.9 * 0.25, -0.5 + 0.9 * 4.0, 0.2, 0.81 * 4.0])  # max over the target's actions
    errors = np.array([1.0, 2.0, 0.5, 0.0]) - targets
    huber = np.where(np.abs(errors) <= 1, 0.5 * errors**2, np.abs(errors) - 0.5)  # Dopamine's huber_loss, delta 1
    assert np.abs(errors).min() < 1 < np.abs(errors).max()  # both branches
    np.testing.assert_allclose(loss.item(), huber.mean(), rtol=1e-6)
    np.testing.assert_allclose(q_taken.detach().numpy(), [1.0, 2.0, 0.5, 0.0])
