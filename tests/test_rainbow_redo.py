"""ReDo in the Rainbow scripts (rainbow_tokenized.py and der_single_expert.py, each with its own
RecyclableQNetwork.redo_layers, the network that --redo builds; the recycling itself is the `redo` block shared with
dqn_redo.py): one recycling step on small networks with planted dormant neurons, checked entry by entry against a
restatement (conv channels, noisy units, the experts' (expert, unit) pairs, the conv -> flatten and conv -> token
boundaries, Adam's moments); function preservation at tau 0 in every network configuration; the ReDo events of
--redo's after-update hook in train_step."""
import math

import numpy as np
import pytest
import torch
from harness import build_network, load_script

SCRIPTS = ("rainbow_tokenized", "der_single_expert")
NUM_ACTIONS = 3


def recyclable(m, **flags):
    """The network that --redo builds for `flags` (research_knobs), which lists its layers for ReDo."""
    return build_network(m, m.Args(redo=True, redo_period=1, **flags), NUM_ACTIONS)


def observations(n=8, seed=0):
    return torch.randint(0, 256, (n, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def perturbed(net, seed=1):
    """Every parameter that does not start at zero moved off its initial value by 0.3 x its RMS, so that the noisy
    layers' sigmas are no constant that a reset could hide in (the zero biases stay, so that no neuron dies here)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3 * p.pow(2).mean().sqrt())
    return net


def adam_with_state(m, net, seed=2):
    """The script's optimizer after one real step (learning rate 0: the weights stay), with every moment set to a
    non-zero value and the step to 7."""
    optimizer = m.make_optimizer(m.Args(learning_rate=0.0), net)
    net(observations(2, seed))[1].sum().backward()
    optimizer.step()
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        state = optimizer.state[p]
        state["exp_avg"].copy_(torch.randn(p.shape, generator=g))
        state["exp_avg_sq"].copy_(torch.rand(p.shape, generator=g) + 0.5)
        state["step"].fill_(7)
    return optimizer


def snapshot(net, optimizer):
    params = {name: p.detach().clone() for name, p in net.named_parameters()}
    state = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in net.named_parameters()}
    return params, state


def assert_only_changed(net, optimizer, before, changed, weights):
    """Every parameter entry outside `changed` {name: mask} is bit-identical; Adam's moments are zero exactly at the
    changed entries of the parameters named in `weights` and untouched elsewhere (biases: everywhere); step stays 7."""
    params, state = before
    for name, p in net.named_parameters():
        mask = changed.get(name, torch.zeros_like(p, dtype=torch.bool))
        assert torch.equal(p[~mask], params[name][~mask]), f"{name} changed outside the recycled entries"
        reset = mask if name in weights else torch.zeros_like(mask)
        new = optimizer.state[p]
        assert new["step"].item() == 7, name
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new[key][reset], torch.zeros_like(new[key][reset])), f"{name} {key} not reset"
            assert torch.equal(new[key][~reset], state[name][key][~reset]), f"{name} {key} changed elsewhere"


# ---------------------------------------------------------------------------------------------------------------------
# Nature CNN -> flatten -> noisy dense 32 -> noisy dueling heads: the official recycled Rainbow networks' layers
# ---------------------------------------------------------------------------------------------------------------------
DEAD = {"conv1": [3], "conv2": [10, 11], "conv3": [5, 40], "hidden": [7, 20]}  # biases -1000: silent
WEAK = {"conv2": [20], "hidden": [9]}  # incoming weights x 0.01, a small positive bias: active, but scores far below 0.1
HW = 121  # conv3's 11 x 11 positions, flattened NCHW


def baseline_network(m):
    torch.manual_seed(0)
    net = perturbed(recyclable(m, encoder="nature", moe_type="baseline", num_experts=1, expert_hidden_units=32,
                               n_atoms=5))
    with torch.no_grad():
        net.moe.bias_mu.fill_(0.5)  # every unit alive on random frames (most would be silent)
        for name, units in DEAD.items():
            (net.moe.bias_mu if name == "hidden" else getattr(net.encoder, name).bias)[units] = -1000.0
        for name, units in WEAK.items():
            if name == "hidden":  # the baseline's noisy dense layer, recorded as "hidden"
                net.moe.weight_mu[units] *= 0.01
                net.moe.bias_mu[units] = 0.02
            else:
                getattr(net.encoder, name).weight[units] *= 0.01
                getattr(net.encoder, name).bias[units] = 1e-3
    return net


def baseline_changes(net, dead):
    """{parameter name: entries ReDo may change}, restated by hand: each dormant neuron's incoming row and bias (mu and
    sigma), and the next layer's weights that read it (mu and sigma); conv3 channel c feeds the flattened inputs
    c*121 ... c*121 + 120 of the noisy dense layer; a dense unit feeds both heads."""
    changed = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in net.named_parameters()}
    following = {"conv1": ["encoder.conv2"], "conv2": ["encoder.conv3"], "conv3": ["moe"],
                 "hidden": ["head.advantage", "head.value"]}
    for name, units in dead.items():
        own = ["moe.weight_mu", "moe.weight_sigma", "moe.bias_mu", "moe.bias_sigma"] if name == "hidden" \
            else [f"encoder.{name}.weight", f"encoder.{name}.bias"]
        for unit in units:
            for param in own:
                changed[param][unit] = True
            columns = slice(unit * HW, (unit + 1) * HW) if name == "conv3" else slice(unit, unit + 1)
            for layer in following[name]:
                for param in ((f"{layer}.weight",) if layer.startswith("encoder") else (f"{layer}.weight_mu",
                                                                                        f"{layer}.weight_sigma")):
                    changed[param][:, columns] = True
    return changed


@pytest.fixture(scope="module", params=SCRIPTS)
def recycled_baseline(request):
    m = load_script(request.param)
    net = baseline_network(m)
    optimizer = adam_with_state(m, net)
    obs = observations()
    before = snapshot(net, optimizer)
    net.eval()
    with torch.no_grad():
        q_before = net(obs)[1]
    net.train()
    masks, _ = m.dormant_neurons(net, obs, 0.0)
    masks_weak, _ = m.dormant_neurons(net, obs, 0.1)
    counts = m.recycle_dormant(net, optimizer, masks)
    return dict(m=m, net=net, optimizer=optimizer, obs=obs, before=before, q_before=q_before, masks=masks,
                masks_weak=masks_weak, counts=counts)


def test_the_planted_neurons_and_only_they_are_dormant_at_tau_0(recycled_baseline):
    r = recycled_baseline
    assert [name for name, _, _ in r["net"].redo_layers()] == list(DEAD)  # the heads are never scored nor recycled
    for name, units in DEAD.items():
        assert r["masks"][name].nonzero().flatten().tolist() == units, name
        assert set(units + WEAK.get(name, [])) <= set(r["masks_weak"][name].nonzero().flatten().tolist()), name
    assert r["counts"] == {name: len(units) for name, units in DEAD.items()}


def test_recycling_changes_exactly_the_dormant_neurons_entries_and_their_adam_moments(recycled_baseline):
    r = recycled_baseline
    net = r["net"]
    changed = baseline_changes(net, DEAD)
    weights = {name for name, _ in net.named_parameters() if name.endswith(("weight", "weight_mu", "weight_sigma"))}
    assert_only_changed(net, r["optimizer"], r["before"], changed, weights)


def test_incoming_parameters_start_afresh_and_outgoing_weights_are_zero(recycled_baseline):
    r = recycled_baseline
    net, params = r["net"], r["before"][0]
    for name in ("conv1", "conv2", "conv3"):
        conv, units = getattr(net.encoder, name), DEAD[name]
        assert torch.equal(conv.bias[units], torch.zeros(len(units)))
        w, old = conv.weight[units], params[f"encoder.{name}.weight"][units]
        fan_in, fan_out = w[0].numel(), conv.weight.shape[0] * w[0, 0].numel()
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # xavier-uniform of the whole kernel, the construction-time init
        previous = {"conv2": "conv1", "conv3": "conv2"}.get(name)
        fed = torch.zeros(w.shape[1], dtype=torch.bool)
        if previous:  # inputs from a recycled neuron of the previous layer end at zero (zeros win)
            fed[DEAD[previous]] = True
            assert torch.equal(w[:, fed], torch.zeros_like(w[:, fed]))
        assert w[:, ~fed].abs().max() <= bound and (w[:, ~fed] != old[:, ~fed]).all(), name
        following = net.encoder.conv2 if name == "conv1" else net.encoder.conv3 if name == "conv2" else None
        if following is not None:
            assert torch.equal(following.weight[:, units], torch.zeros_like(following.weight[:, units]))
    # the noisy dense layer's recycled units, noise and all: mu redrawn from U(+-1/sqrt(fan_in)), sigma at its initial
    # sigma0 / sqrt(fan_in), bias mu zero; its inputs from recycled conv3 channels zero in mu and in sigma
    hidden, units = net.moe, DEAD["hidden"]
    bound = 1.0 / math.sqrt(hidden.weight_mu.shape[1])
    fed = torch.zeros(hidden.weight_mu.shape[1], dtype=torch.bool)
    for c in DEAD["conv3"]:
        fed[c * HW:(c + 1) * HW] = True
    for p in (hidden.weight_mu, hidden.weight_sigma):
        assert torch.equal(p[:, fed], torch.zeros_like(p[:, fed]))  # every unit's, the recycled ones' too
    rows, old = hidden.weight_mu[units][:, ~fed], params["moe.weight_mu"][units][:, ~fed]
    assert rows.abs().max() <= bound and (rows != old).all()
    assert abs(rows.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    sigma = hidden.sigma0 * bound
    assert torch.equal(hidden.weight_sigma[units][:, ~fed], torch.full_like(rows, sigma))
    assert torch.equal(hidden.bias_sigma[units], torch.full((len(units),), sigma))
    assert torch.equal(hidden.bias_mu[units], torch.zeros(len(units)))
    for name in ("advantage", "value"):  # both heads read the recycled units: mu and sigma zero
        head = getattr(net.head, name)
        for p in (head.weight_mu, head.weight_sigma):
            assert torch.equal(p[:, units], torch.zeros_like(p[:, units]))
        assert torch.equal(head.bias_mu, params[f"head.{name}.bias_mu"])


def test_recycling_at_tau_0_keeps_the_noise_free_outputs_and_revives_the_neurons(recycled_baseline):
    r = recycled_baseline
    net = r["net"]
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(r["obs"])[1], r["q_before"], rtol=1e-5, atol=1e-5)
    net.train()
    after, _ = r["m"].dormant_neurons(net, r["obs"], 0.0)
    assert sum(int(after[name].sum()) for name in DEAD) < sum(len(units) for units in DEAD.values()) / 2


# ---------------------------------------------------------------------------------------------------------------------
# Experts and the conv -> token boundary
# ---------------------------------------------------------------------------------------------------------------------
def moe_network(m, moe_type="softmoe", experts=3, units=8):
    torch.manual_seed(0)
    return perturbed(recyclable(m, encoder="nature", moe_type=moe_type, num_experts=experts, expert_hidden_units=units,
                                n_atoms=5))


def no_masks(net):
    record = {}
    with torch.no_grad():
        net(observations(1), record)
    return {name: torch.zeros(record[name].shape[1], dtype=torch.bool) for name, _, _ in net.redo_layers()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_dormant_expert_unit_is_recycled_within_its_expert_only(script):
    m = load_script(script)
    net = moe_network(m)
    experts = net.moe.experts
    with torch.no_grad():
        experts.b1_mu[1, 5] = -1000.0  # expert 1, unit 5: recorded as neuron 1 * 8 + 5
    masks, _ = m.dormant_neurons(net, observations(), 0.0)
    assert masks["experts"].shape == (24,) and masks["experts"][13] and masks["experts"].view(3, 8)[1, 5]
    optimizer = adam_with_state(m, net)
    before = snapshot(net, optimizer)
    masks = no_masks(net)
    masks["experts"][13] = True
    assert m.recycle_dormant(net, optimizer, masks)["experts"] == 1
    changed = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in net.named_parameters()}
    for name in ("w1_mu", "w1_sigma"):
        changed[f"moe.experts.{name}"][1, :, 5] = True
    for name in ("b1_mu", "b1_sigma"):
        changed[f"moe.experts.{name}"][1, 5] = True
    changed["moe.experts.w2"][1, 5, :] = True
    assert_only_changed(net, optimizer, before, changed, {"moe.experts.w1_mu", "moe.experts.w1_sigma", "moe.experts.w2"})
    bound, old = 1.0 / math.sqrt(64), before[0]["moe.experts.w1_mu"][1, :, 5]
    assert experts.w1_mu[1, :, 5].abs().max() <= bound and (experts.w1_mu[1, :, 5] != old).all()
    assert torch.equal(experts.w1_sigma[1, :, 5], torch.full((64,), 0.1 * bound))
    assert experts.b1_mu[1, 5] == 0 and experts.b1_sigma[1, 5] == 0.1 * bound
    assert torch.equal(experts.w2[1, 5], torch.zeros(64))


@pytest.mark.parametrize("moe_type", ["softmoe", "top1"])
def test_a_dormant_conv3_channel_is_cut_from_every_expert_and_the_router(moe_type):
    # per-position tokens: channel c is dimension c of every token, read by each expert's first layer and the router
    m = load_script("rainbow_tokenized")
    net = moe_network(m, moe_type)
    optimizer = adam_with_state(m, net)
    before = snapshot(net, optimizer)
    masks = no_masks(net)
    masks["conv3"][7] = True
    m.recycle_dormant(net, optimizer, masks)
    changed = {name: torch.zeros_like(p, dtype=torch.bool) for name, p in net.named_parameters()}
    changed["encoder.conv3.weight"][7] = changed["encoder.conv3.bias"][7] = True
    changed["moe.experts.w1_mu"][:, 7, :] = changed["moe.experts.w1_sigma"][:, 7, :] = True
    router = "moe.phi" if moe_type == "softmoe" else "moe.router.weight"
    if moe_type == "softmoe":
        changed[router][7] = True  # phi [d, n, p]
    else:
        changed[router][:, 7] = True  # the linear router [n, d]
    assert_only_changed(net, optimizer, before, changed,
                        {"encoder.conv3.weight", "moe.experts.w1_mu", "moe.experts.w1_sigma", router})
    params = dict(net.named_parameters())
    for name in ("moe.experts.w1_mu", "moe.experts.w1_sigma", router):
        assert not params[name][changed[name]].any(), name
    assert net.encoder.conv3.bias[7] == 0


# every network configuration of both scripts that --redo recycles: (script, flags)
CONFIGS = [
    ("rainbow_tokenized", dict(encoder="impala")),
    ("rainbow_tokenized", dict(encoder="nature")),
    ("rainbow_tokenized", dict(encoder="nature", moe_type="top1")),
    ("rainbow_tokenized", dict(encoder="nature", moe_normalization=True)),
    ("rainbow_tokenized", dict(encoder="nature", tokenization="perpatch")),
    ("rainbow_tokenized", dict(encoder="nature", tokenization="persample")),
    ("rainbow_tokenized", dict(encoder="nature", tokenization="perfeat")),
    ("rainbow_tokenized", dict(encoder="nature", moe_type="baseline")),
    ("rainbow_tokenized", dict(encoder="impala", moe_type="baseline", baseline_aggregation="mean")),
    ("der_single_expert", dict(encoder="der")),
    ("der_single_expert", dict(encoder="nature")),
    ("der_single_expert", dict(encoder="impala", moe_type="top1")),
    ("der_single_expert", dict(encoder="nature", moe_type="baseline", baseline_aggregation="sum")),
    # with the research knobs of the MoE scripts
    ("rainbow_tokenized", dict(encoder="nature", use_extra_linear_layer=True)),
    ("rainbow_tokenized", dict(encoder="nature", moe_type="baseline", use_extra_linear_layer=True)),
    ("rainbow_tokenized", dict(encoder="nature", moe_type="simplicial_embedding_v1")),
    ("rainbow_tokenized", dict(encoder="nature", moe_type="top1", num_selected_experts=2)),
    ("der_single_expert", dict(encoder="nature", use_random_phi=True)),
]
LAYERS = {
    "impala": [f"stack{i}.block{j}.relu1" for i in range(3) for j in range(2)],
    "nature": ["conv1", "conv2", "conv3"],
}


@pytest.mark.parametrize("script,flags", CONFIGS, ids=lambda x: x if isinstance(x, str) else
                         "-".join(f"{v}" for v in x.values()))
def test_recycling_at_tau_0_keeps_the_function_in_every_configuration(script, flags):
    """A silent neuron planted in every recycled layer (its biases at -1000); at tau 0 its new incoming weights would
    make it fire, so only zeroing every weight that reads it (the next conv, the flattened dense layer, the tokens'
    experts and router, the patch embedding, both heads) keeps the noise-free outputs."""
    m = load_script(script)
    torch.manual_seed(0)
    extra = {} if flags.get("encoder") == "der" else dict(num_experts=2, expert_hidden_units=8)
    net = perturbed(recyclable(m, n_atoms=5, **extra, **flags))
    names = [name for name, _, _ in net.redo_layers()]
    if flags.get("encoder") == "der":
        assert names == ["conv1", "conv2", "value_hidden", "advantage_hidden"]
    else:
        unread = flags.get("tokenization") == "perfeat" or flags.get("moe_type") == "simplicial_embedding_v1"
        encoder = LAYERS[flags["encoder"]][:2] if unread else LAYERS[flags["encoder"]]
        moe = flags.get("moe_type", "softmoe") in ("softmoe", "top1")
        assert names == encoder + ["experts" if moe else "hidden"] + ["extra"] * flags.get("use_extra_linear_layer", 0)
    with torch.no_grad():
        for _, renewed, _ in net.redo_layers():
            for param, axes, fresh in renewed:
                if len(axes) == param.dim() and not fresh(param).any():  # the bias (mu), zero when renewed
                    param.view(-1)[0] = -1000.0  # neuron 0 of the layer
    obs = observations(4)
    net.eval()
    with torch.no_grad():
        q_before = net(obs)[1]
    masks, _ = m.dormant_neurons(net, obs, 0.0)
    assert all(masks[name][0] for name in names), {name: masks[name][0].item() for name in names}
    incoming_before = {name: [p.detach().clone() for p, _, _ in renewed] for name, renewed, _ in net.redo_layers()}
    m.recycle_dormant(net, torch.optim.Adam(net.parameters()), masks)
    with torch.no_grad():
        torch.testing.assert_close(net(obs)[1], q_before, rtol=1e-5, atol=1e-5)
    for name, renewed, _ in net.redo_layers():
        assert any(not torch.equal(p, old) for (p, _, _), old in zip(renewed, incoming_before[name])), name


def test_the_heads_and_the_impala_residual_stream_are_never_recycled():
    m = load_script("rainbow_tokenized")
    torch.manual_seed(0)
    net = recyclable(m, num_experts=2, expert_hidden_units=8, n_atoms=5)
    record = {}
    with torch.no_grad():
        net(observations(2), record)
    recorded = {k for k in record if k not in ("dispatch", "combine")}
    recycled = {name for name, _, _ in net.redo_layers()}
    assert recycled < recorded and recorded - recycled == {"encoder"} | {
        f"stack{i}.block{j}.relu0" for i in range(3) for j in range(2)}  # logged, not recycled
    heads = {id(p) for p in net.head.parameters()}
    assert not any(id(p) in heads for _, renewed, zeroed in net.redo_layers() for p, *_ in renewed + zeroed)


# ---------------------------------------------------------------------------------------------------------------------
# The ReDo events of train_step
# ---------------------------------------------------------------------------------------------------------------------
def test_update_numbers_count_gradient_updates_from_the_warm_up():
    m = load_script("rainbow_tokenized")
    args = m.Args(learning_starts=10, train_frequency=4)
    assert {s: m.update_number(args, s) for s in range(41) if m.update_number(args, s)} == {
        12: 1, 16: 2, 20: 3, 24: 4, 28: 5, 32: 6, 36: 7, 40: 8}
    args = m.Args(learning_starts=1600, train_frequency=1)
    assert m.update_number(args, 1600) == 0 and m.update_number(args, 1601) == 1 and m.update_number(args, 99_999) == 98_399


def filled_memory(m, seed=0):
    memory = m.PrioritizedReplayMemory(300, n_step=3)
    rng = np.random.default_rng(seed)
    for t in range(100):
        frame = rng.integers(0, 256, (84, 84), dtype=np.uint8)
        memory.add(frame, int(rng.integers(4)), float(rng.choice([-1.0, 0.0, 1.0])), t % 37 == 36, False, frame)
    return memory


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("redo", [True, False])
def test_redo_events_follow_every_redo_period_th_update_and_only_with_redo(script, redo):
    # an update every 2 agent steps after 20 (numbers 1 ... 10 at steps 22 ... 40); period 3: events after updates 3, 6
    # and 9, at steps 26, 32 and 38; tau huge: every event recycles every hidden neuron
    m = load_script(script)
    network = dict(encoder="der") if script == "der_single_expert" else dict(
        encoder="nature", moe_type="baseline", num_experts=1, expert_hidden_units=16)
    args = m.Args(**network, n_step=3, learning_starts=20, train_frequency=2, batch_size=8, redo=redo, redo_period=3,
                  redo_tau=1e9, redo_batch_size=4, total_timesteps=100)
    hooks = m.research_knobs(args)
    assert (hooks.after_update is not None) == redo
    torch.manual_seed(0)
    q, target = hooks.make_network(4), hooks.make_network(4)
    target.load_state_dict(q.state_dict())
    optimizer = m.make_optimizer(args, q)
    memory, rng, noise = filled_memory(m), np.random.default_rng(0), torch.Generator().manual_seed(0)
    events, updates = {}, []
    for step in range(1, 41):
        done, logged = m.train_step(step, args, q, target, optimizer, memory, rng, noise,
                                    after_update=hooks.after_update)
        updates += [step] * len(done)
        if logged:
            recycled = {tag[len("redo/"):-len("_recycled_count")]: count for tag, count in logged.items()
                        if tag != "redo/recycled_count"}
            assert logged["redo/recycled_count"] == sum(recycled.values())
            events[step] = recycled
    assert updates == list(range(22, 41, 2))
    sizes = ({"conv1": 32, "conv2": 64, "value_hidden": 256, "advantage_hidden": 256} if script == "der_single_expert"
             else {"conv1": 32, "conv2": 64, "conv3": 64, "hidden": 16})
    assert events == ({26: sizes, 32: sizes, 38: sizes} if redo else {})
    assert {optimizer.state[p]["step"].item() for p in q.parameters()} == {10.0}  # ReDo keeps Adam's step count
