"""The research knobs of issue 15 that the three MoE scripts share (the random router, Top-k routing, the auxiliary
losses, the extra linear layer, the simplicial embeddings, shuffled tokens), on each script's own network: what each
one changes, that the losses reach the gradient, and that every bad combination stops at start-up with one line.
The comparisons with the official modules are in tests/official/ (test_official_dqn_softmoe.py,
test_official_rainbow_der.py, test_official_moe_losses.py)."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import build_network, check_flags, load_script

SCRIPTS = ("dqn_softmoe", "rainbow_tokenized", "der_single_expert")
SMALL = dict(encoder="nature", num_experts=4, expert_hidden_units=16)
RAINBOW_SMALL = dict(n_atoms=5)


def small_args(m, **kw):
    extra = RAINBOW_SMALL if hasattr(m, "NoisyExperts") else {}
    return m.Args(**{**SMALL, **extra, **kw})


def q_values(net, obs, record=None):
    out = net(obs, record)
    return out[1] if isinstance(out, tuple) else out


def frames(batch=3, seed=0):
    return torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_random_phi_is_a_fixed_standard_normal_buffer(script):
    m = load_script(script)
    torch.manual_seed(0)
    net = build_network(m, small_args(m, use_random_phi=True), 4)
    phi = net.moe.phi
    assert not isinstance(phi, torch.nn.Parameter) and not phi.requires_grad
    assert "moe.phi" in net.state_dict() and all(p is not phi for p in net.parameters())
    assert abs(phi.mean().item()) < 0.05 and abs(phi.std().item() - 1.0) < 0.05  # N(0, 1), not lecun's 1/sqrt(n d)
    learned = build_network(m, small_args(m), 4).moe.phi
    assert isinstance(learned, torch.nn.Parameter) and learned.std().item() < 0.2
    target = build_network(m, small_args(m, use_random_phi=True), 4)  # another draw, until the target copy
    assert not torch.equal(target.moe.phi, phi)
    target.load_state_dict(net.state_dict())
    assert torch.equal(target.moe.phi, phi)


def _batch(m, batch_size=4):
    memory = m.ReplayMemory(64, n_step=1)
    rng = np.random.default_rng(0)
    for t in range(40):
        frame = rng.integers(0, 256, (84, 84), dtype=np.uint8)
        memory.add(frame, int(rng.integers(4)), float(rng.normal()), t % 13 == 12, False, frame)
    return memory, torch.arange(4, 4 + batch_size)


@pytest.mark.parametrize("script,moe_type,losses", [
    ("dqn_softmoe", "top1", ("naive_entropy", "importance_loss", "load_loss")),
    ("dqn_softmoe", "softmoe", ("importance_loss",)),
    ("rainbow_tokenized", "top1", ("importance_loss", "load_loss")),
    ("der_single_expert", "softmoe", ("naive_entropy", "importance_loss")),
])
def test_the_update_follows_the_gradient_of_the_td_loss_plus_the_auxiliary_losses(script, moe_type, losses):
    m = load_script(script)
    rainbow = hasattr(m, "NoisyExperts")
    torch.manual_seed(0)
    args = small_args(m, moe_type=moe_type, aux_loss_fns=losses, importance_weight=3.0)
    net = build_network(m, args, 4)
    with torch.no_grad():  # an uneven router, so that the balancing losses have a gradient worth comparing
        router = net.moe.router.weight if moe_type == "top1" else net.moe.phi
        router.mul_(8.0)
    target = copy.deepcopy(net)
    memory, index = _batch(m)
    extra_losses = m.research_knobs(args).extra_losses  # the hook the main block passes to `update`

    def gradients(network, with_aux):
        network = copy.deepcopy(network)
        batch = memory.get(index)
        torch.manual_seed(5)  # the same noise for the load loss (and the noisy layers' generator below)
        record = {}
        if rainbow:
            loss = m.categorical_loss(network, target, batch, torch.Generator().manual_seed(1), record)[0].mean()
        else:
            loss = m.dqn_loss(network, target, batch, record)[0]
        aux = m.moe_aux_losses(args, record)
        (loss + (sum(aux.values()) if with_aux else 0.0)).backward()
        return {name: p.grad.clone() for name, p in network.named_parameters() if p.grad is not None}, aux

    def update_gradients(network):
        network = copy.deepcopy(network)
        optimizer = m.make_optimizer(args, network)
        torch.manual_seed(5)
        if rainbow:
            out = m.update(network, target, optimizer, memory, index, torch.ones(len(index)),
                           torch.Generator().manual_seed(1), 0.0, extra_losses=extra_losses)
        else:
            out = m.update(network, target, optimizer, memory, index, extra_losses=extra_losses)
        return {name: p.grad for name, p in network.named_parameters() if p.grad is not None}, out

    expected, aux = gradients(net, with_aux=True)
    without, _ = gradients(net, with_aux=False)
    got, logged = update_gradients(net)
    assert set(aux) == set(losses) and set(losses) <= set(logged)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-8)
    router_name = "moe.router.weight" if moe_type == "top1" else "moe.phi"
    assert (expected[router_name] - without[router_name]).abs().max() > 1e-6, "the auxiliary losses changed nothing"
    if "naive_entropy" in losses:  # computed from counts: a value, no gradient (as the official)
        record = {}
        q_values(net, frames(), record)
        value = m.moe_aux_losses(small_args(m, moe_type=moe_type, aux_loss_fns=("naive_entropy",)), record)
        assert 0 < value["naive_entropy"].item() < args.entropy_weight and not value["naive_entropy"].requires_grad


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_extra_linear_layer_is_a_512_unit_relu_layer_before_the_head(script):
    m = load_script(script)
    torch.manual_seed(0)
    net = build_network(m, small_args(m, use_extra_linear_layer=True), 4)
    extra = net.moe.extra  # the ExtraLinearLayer wraps the MoE layer
    assert extra.in_features == 121 * 64 and extra.out_features == 512
    assert isinstance(extra, torch.nn.Linear)  # plain, as Dopamine's Dense (the Rainbow heads stay noisy)
    record = {}
    net.eval()
    q = q_values(net, frames(), record)
    features = net.moe.moe(net.tokenizer(record["conv3"]), None).flatten(1)
    hidden = torch.relu(extra(features))
    torch.testing.assert_close(record["extra"], hidden)
    if hasattr(net.head, "advantage"):  # Rainbow's noisy dueling head reads the 512 units
        assert net.head.advantage.weight_mu.shape[1] == 512 and net.head.value.weight_mu.shape[1] == 512
        torch.testing.assert_close(q, (net.head(hidden).softmax(dim=-1) * net.support).sum(-1))  # Q reads them
    else:
        torch.testing.assert_close(q, net.head(hidden))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_simplicial_embeddings_restated(script, version):
    """V1: softmax(x / tau) over the width axis of the encoder output, then the scaled dense layer and ReLU; V2: the
    scaled dense layer, then softmax(x / tau) within each of n groups of h units (the ReLU changes nothing)."""
    m = load_script(script)
    torch.manual_seed(0)
    net = build_network(m, small_args(m, moe_type=f"simplicial_embedding_{version}", sem_tau=0.3), 4).double()
    net.eval()  # noise off in the Rainbow scripts
    record = {}
    obs = frames()
    with torch.no_grad():
        conv = net.encoder(obs.double() / 255.0)
        x = conv.clone()
        if version == "v1":
            x = torch.exp(x / 0.3) / torch.exp(x / 0.3).sum(3, keepdim=True)  # over W of [B, C, H, W]
        dense = net.moe  # the (scaled) dense layer takes the MoE layer's place
        weight = dense.weight if hasattr(dense, "weight") else dense.weight_mu
        bias = dense.bias if hasattr(dense, "bias") else dense.bias_mu
        h = x.flatten(1) @ weight.T + bias
        assert h.shape[1] == 4 * 16  # scaled: num_experts x expert_hidden_units
        if version == "v2":
            groups = torch.exp(h.view(3, 4, 16) / 0.3)
            h = (groups / groups.sum(-1, keepdim=True)).flatten(1)
            assert torch.allclose(h.view(3, 4, 16).sum(-1), torch.ones(3, 4, dtype=h.dtype))
        h = h.clamp_min(0)
        net.encoder.register_forward_pre_hook(lambda module, args: (obs.double() / 255.0,) + args[1:])  # float64 input
        q_values(net, obs, record)
    torch.testing.assert_close(record["hidden"], h, rtol=1e-12, atol=1e-12)


def test_a_fixed_token_order_permutation_would_change_nothing():
    """Why --shuffle-tokens permutes features, not whole tokens: the Soft MoE is permutation-equivariant in its tokens
    (dispatch mixes them, combine returns them in their order), so permuting whole tokens only permutes the flattened
    features, which a freshly initialized head absorbs: the network with permuted tokens is the unpermuted network with
    the head's columns permuted, exactly."""
    m = load_script("dqn_softmoe")
    torch.manual_seed(0)
    net = build_network(m, m.Args(num_experts=4, expert_hidden_units=16), 4).double()
    tokens = torch.randn(2, 121, 64, dtype=torch.float64)
    order = torch.randperm(121, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out, out_permuted = net.moe(tokens, None), net.moe(tokens[:, order], None)
        torch.testing.assert_close(out_permuted, out[:, order], rtol=1e-12, atol=1e-12)
        head = net.head.weight.view(4, 121, 64)
        q = out.flatten(1) @ net.head.weight.T
        q_permuted = out_permuted.flatten(1) @ head[:, order].flatten(1).T
        torch.testing.assert_close(q_permuted, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shuffled_tokens_take_a_fixed_permutation_of_the_features(script):
    m = load_script(script)
    torch.manual_seed(0)
    net = build_network(m, small_args(m, shuffle_tokens=True, seed=3), 4)
    permutation = net.tokenizer.shuffle
    assert sorted(permutation.tolist()) == list(range(64 * 121)) and "tokenizer.shuffle" in net.state_dict()
    again = build_network(m, small_args(m, shuffle_tokens=True, seed=3), 4).tokenizer.shuffle
    assert torch.equal(again, permutation)  # from --seed
    assert not torch.equal(build_network(m, small_args(m, shuffle_tokens=True, seed=4), 4).tokenizer.shuffle, permutation)
    net.eval()
    record = {}
    obs = frames()
    with torch.no_grad():
        q = q_values(net, obs, record)
        conv = record["conv3"]
        tokenizer = net.tokenizer.tokenizer  # the tokenizer that the shuffle feeds
        tokens = tokenizer(conv.flatten(1)[:, permutation].view_as(conv))
        assert torch.equal(tokens, net.tokenizer(conv))
        # a token no longer holds the 64 channels of one position
        assert not torch.equal(tokens, tokenizer(conv))
        plain = copy.deepcopy(net)
        plain.tokenizer = plain.tokenizer.tokenizer  # the same weights, no shuffle
        plain.encoder.register_forward_hook(lambda module, args, out: out.flatten(1)[:, permutation].view_as(out))
        torch.testing.assert_close(q, q_values(plain, obs))  # = the unshuffled network on the shuffled features


BAD_MOE_FLAGS = [
    (dict(moe_type="top1", use_random_phi=True), "--use-random-phi"),
    (dict(num_selected_experts=2), "--num-selected-experts"),
    (dict(moe_type="top1", num_selected_experts=9, num_experts=8), "--num-selected-experts"),
    (dict(moe_type="top1", num_selected_experts=0), "--num-selected-experts"),
    (dict(noisy_routing=True), "--noisy-routing"),
    (dict(moe_type="top1", noise_std=2.0), "--noise-std"),
    (dict(moe_type="top1", noisy_routing=True, noise_std=0.0), "--noise-std"),
    (dict(aux_loss_fns=("load_loss",)), "--aux-loss-fns"),
    (dict(aux_loss_fns=("importance_loss", "importance_loss")), "--aux-loss-fns"),
    (dict(moe_type="baseline", aux_loss_fns=("importance_loss",)), "--aux-loss-fns"),
    (dict(num_experts=1, aux_loss_fns=("importance_loss",)), "--aux-loss-fns"),
    (dict(importance_weight=2.0), "--importance-weight"),
    (dict(aux_loss_fns=("importance_loss",), importance_weight=-1.0), "--importance-weight"),
    (dict(moe_type="top1", aux_loss_fns=("load_loss",), std_scale=0.0), "--std-scale"),
    (dict(entropy_weight=0.1), "--entropy-weight"),
    (dict(sem_tau=0.5), "--sem-tau"),
    (dict(moe_type="simplicial_embedding_v1", sem_tau=0.0), "--sem-tau"),
    (dict(moe_type="simplicial_embedding_v2", tokenization="perfeat"), "--tokenization"),
    (dict(moe_type="simplicial_embedding_v2", capacity_factor=0.5), "--capacity-factor"),
    (dict(moe_type="baseline", shuffle_tokens=True), "--shuffle-tokens"),
    (dict(moe_type="baseline", expert_reset="reset"), "--expert-reset"),
    (dict(expert_reset_period=100), "--expert-reset-period"),
    (dict(expert_reset="reset", expert_reset_period=0), "--expert-reset-period"),
    (dict(expert_reset="reset", shrink_factor=0.5), "--shrink-factor"),
    (dict(expert_reset="shrink_perturb", shrink_factor=1.0), "--shrink-factor"),
    (dict(expert_type="big", shuffle_tokens=True), "--shuffle-tokens"),
    (dict(expert_type="big", expert_reset="reset"), "--expert-reset"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kwargs,flag", BAD_MOE_FLAGS, ids=[f"{k}" for k, _ in BAD_MOE_FLAGS])
def test_bad_moe_flags_stop_with_one_line_naming_the_flag(script, kwargs, flag, capsys):
    m = load_script(script)
    if script == "der_single_expert":  # its default is one scaled expert
        kwargs = {"num_experts": 4, "expert_hidden_units": 512, **kwargs}
    with pytest.raises(SystemExit) as exit_info:
        check_flags(m, m.Args(**kwargs))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and flag in err[0], err


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_knobs_pass_the_start_up_checks_together(script):
    m = load_script(script)
    for kwargs in (dict(moe_type="top1", num_selected_experts=2, noisy_routing=True, noise_std=2.0,
                        aux_loss_fns=("naive_entropy", "importance_loss", "load_loss"), entropy_weight=0.1,
                        std_scale=0.5, use_extra_linear_layer=True, shuffle_tokens=True),
                   dict(use_random_phi=True, aux_loss_fns=("importance_loss",), importance_weight=0.1),
                   dict(moe_type="simplicial_embedding_v1", sem_tau=0.5),
                   dict(moe_type="simplicial_embedding_v2", use_extra_linear_layer=True)):
        if script == "der_single_expert":  # its default is one scaled expert
            kwargs = {"num_experts": 4, "expert_hidden_units": 512, **kwargs}
        check_flags(m, m.Args(**kwargs))


def test_der_refuses_the_moe_knobs_with_its_own_encoder(capsys):
    m = load_script("der_single_expert")
    for flag, kwargs in (("--use-random-phi", dict(use_random_phi=True)),
                         ("--aux-loss-fns", dict(aux_loss_fns=("importance_loss",))),
                         ("--use-extra-linear-layer", dict(use_extra_linear_layer=True)),
                         ("--shuffle-tokens", dict(shuffle_tokens=True)),
                         ("--expert-reset", dict(expert_reset="shrink_perturb"))):
        with pytest.raises(SystemExit):
            check_flags(m, m.Args(encoder="der", **kwargs))
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0] and "--encoder der" in err[0], err


def test_the_load_loss_thresholds_at_the_k_th_noisy_logit():
    """Riquelme et al. (2021)'s load loss for Top-k, restated with numpy for k = 2 (the official code only runs k = 1,
    where the k-th and the best noisy logit coincide): the probability that a token's clean logit for an expert,
    under fresh noise, beats the token's k-th largest noisy logit; the squared CV over experts of its mean."""
    from math import erf, sqrt

    m = load_script("dqn_softmoe")
    args = m.Args(moe_type="top1", num_experts=4, num_selected_experts=2, aux_loss_fns=("load_loss",), std_scale=2.0,
                  load_weight=0.7)
    logits = torch.randn(3, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(3, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch_randn_like = torch.randn_like
    try:
        torch.randn_like = lambda x: noise
        ours = m.moe_aux_losses(args, {"router_logits": logits, "router_probs": logits.softmax(-1),
                                       "top_experts": logits.topk(2, -1).indices})["load_loss"].item()
    finally:
        torch.randn_like = torch_randn_like
    std = 2.0 / 4
    terms = []
    for b in range(3):
        noisy = logits[b].numpy() + std * noise[b].numpy()
        threshold = np.sort(noisy, axis=1)[:, -2]  # the second largest noisy logit of each token
        p = np.array([[1 - 0.5 * (1 + erf((threshold[i] - logits[b, i, e].item()) / std / sqrt(2))) for e in range(4)]
                      for i in range(10)])
        mean = p.mean(0)
        terms.append((mean.std() / mean.mean()) ** 2)
    assert ours == pytest.approx(0.7 * np.mean(terms), rel=1e-10)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("mode", ["reset", "shrink_perturb"])
def test_reset_experts_redraws_or_interpolates_the_experts_only(script, mode):
    m = load_script(script)
    torch.manual_seed(0)
    args = small_args(m, expert_reset=mode)
    net = build_network(m, args, 4)
    optimizer = m.make_optimizer(args, net)
    q_values(net, frames()).sum().backward()
    optimizer.step()  # Adam's moments are non-zero everywhere
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    moments = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in net.named_parameters()}
    torch.manual_seed(11)
    fresh = copy.deepcopy(net.moe.experts)
    fresh.reset_parameters()  # the draw reset_experts makes from the same generator state
    torch.manual_seed(11)
    factor = 0.8 if mode == "shrink_perturb" else 0.0
    m.reset_experts(net.moe.experts, optimizer, factor)
    expert_params = {f"moe.experts.{name}" for name, _ in net.moe.experts.named_parameters()}
    assert len(expert_params) in (4, 6)
    fresh_params = dict(fresh.named_parameters())
    for name, p in net.named_parameters():
        state = optimizer.state[p]
        if name in expert_params:
            expected = factor * before[name] + (1 - factor) * fresh_params[name[len("moe.experts."):]]
            torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
            assert state["exp_avg"].abs().max() == 0 and state["exp_avg_sq"].abs().max() == 0, name
            assert torch.equal(state["step"], moments[name]["step"])  # the step count stays
        else:
            assert torch.equal(p.detach(), before[name]), f"{name} changed"
            assert torch.equal(state["exp_avg"], moments[name]["exp_avg"]), f"{name}'s moments changed"
    assert not torch.equal(net.moe.experts.w2.detach(), before["moe.experts.w2"])  # the experts did change


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_experts_are_reset_every_period_updates_after_the_warm_up(script, monkeypatch):
    m = load_script(script)
    rainbow = hasattr(m, "NoisyExperts")
    args = small_args(m, expert_reset="reset", expert_reset_period=3, learning_starts=100, train_frequency=4,
                      target_network_frequency=10_000)
    resets, updates = [], []
    monkeypatch.setattr(m, "reset_experts", lambda experts, optimizer, factor: resets.append((step, factor)))

    class Stub:  # stands in for the network and the memory: train_step only passes them on
        moe = SimpleNamespace(experts=None)

    def update_fn(*a):
        updates.append(step)
        return {"td_loss": torch.tensor(0.0), "sample_losses": torch.zeros(args.batch_size)}

    memory = SimpleNamespace(sample_indices=lambda n, rng: np.zeros(n, np.int64), device="cpu",
                             sample_prioritized=lambda n, rng: (np.zeros(n, np.int64), np.full(n, 0.5)),
                             update_priorities=lambda index, priority: None)
    extra = (None,) if rainbow else ()
    after_update = m.research_knobs(args).after_update  # --expert-reset's hook, as the main block gets it
    logged = {}
    for step in range(1, 161):
        _, events = m.train_step(step, args, Stub(), Stub(), None, memory, None, *extra, update_fn=update_fn,
                                 after_update=after_update)
        logged.update({step: events["moe/expert_resets"]} if events else {})
    assert updates == list(range(104, 161, 4))  # update number k at step 100 + 4k
    assert [s for s, _ in resets] == [112, 124, 136, 148, 160]  # after updates 3, 6, 9, ...
    assert [m.expert_reset_number(args, s) for s, _ in resets] == [1, 2, 3, 4, 5]
    assert logged == {112: 1, 124: 2, 136: 3, 148: 4, 160: 5}
    assert {factor for _, factor in resets} == {0.0}


@pytest.mark.parametrize("script", ["rainbow_tokenized", "der_single_expert"])
@pytest.mark.parametrize("kwargs,flag", [(dict(expert_type="big"), "--expert-type big"),
                                         (dict(shuffle_tokens=True), "--shuffle-tokens"),
                                         (dict(moe_type="simplicial_embedding_v2"), "--moe-type simplicial_embedding_v2")])
def test_redo_refuses_the_networks_it_cannot_recycle(script, kwargs, flag, capsys):
    m = load_script(script)
    with pytest.raises(SystemExit):
        check_flags(m, m.Args(redo=True, redo_period=1000, num_experts=4, expert_hidden_units=512, **kwargs))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--redo" in err[0] and flag in err[0], err
