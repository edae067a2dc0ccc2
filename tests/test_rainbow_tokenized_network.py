"""rainbow_tokenized.py networks: noisy layers against float64 restatements, when noise is on and off, the dueling
distributional head, the tokenized baseline, shapes, and the official parameter counts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import build_network, load_script

m = load_script("rainbow_tokenized")


def args(**kw):
    return m.Args(**kw)


def network(a, num_actions):
    """The network the script builds for the flags `a`, research knobs included."""
    return build_network(m, a, num_actions)


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def generator(seed):
    return torch.Generator().manual_seed(seed)


def f(e):
    return np.sign(e) * np.sqrt(np.abs(e))


def test_noisy_linear_init_is_dopamines():
    torch.manual_seed(0)
    layer = m.NoisyLinear(400, 300, sigma0=0.1)
    bound = 1 / math.sqrt(400)
    for mu in (layer.weight_mu, layer.bias_mu):  # U(+-1/sqrt(fan_in)), biases included
        assert mu.abs().max().item() <= bound
        assert abs(mu.std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    for sigma in (layer.weight_sigma, layer.bias_sigma):  # 0.1/sqrt(fan_in), biases included
        assert torch.all(sigma == 0.1 * bound)
    assert layer.weight_mu.shape == (300, 400) and layer.bias_sigma.shape == (300,)
    assert set(dict(layer.named_parameters())) == {"weight_mu", "weight_sigma", "bias_mu", "bias_sigma"}


def test_noisy_linear_matches_factorized_reference():
    torch.manual_seed(0)
    layer = m.NoisyLinear(7, 5, sigma0=0.5).double()
    x = torch.randn(3, 7, dtype=torch.float64)
    layer.sample_noise(generator(4))
    # the noise is f of standard normals drawn from the generator: first the 7 inputs, then the 5 outputs
    e = torch.randn(12, generator=generator(4)).double().numpy()
    e_in, e_out = f(e[:7]), f(e[7:])
    np.testing.assert_allclose(layer.eps_in.numpy(), e_in, rtol=1e-6)
    w = layer.weight_mu.detach().numpy() + layer.weight_sigma.detach().numpy() * np.outer(e_out, e_in)
    b = layer.bias_mu.detach().numpy() + layer.bias_sigma.detach().numpy() * e_out
    np.testing.assert_allclose(layer(x).detach().numpy(), x.numpy() @ w.T + b, rtol=1e-6)
    # the noise stays until the next draw, and a new draw changes the output
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    before = layer(x).detach()
    layer.sample_noise(generator(5))
    assert not torch.allclose(layer(x), before)


def test_noise_off_in_eval_mode_and_when_asked():
    torch.manual_seed(0)
    layer = m.NoisyLinear(6, 4)
    x = torch.randn(2, 6)
    mean_output = F.linear(x, layer.weight_mu, layer.bias_mu)
    layer.sample_noise(generator(1))
    assert not torch.allclose(layer(x), mean_output)
    layer.eval()
    torch.testing.assert_close(layer(x), mean_output, rtol=0, atol=0)
    layer.train()
    m.set_noise(layer, False)
    torch.testing.assert_close(layer(x), mean_output, rtol=0, atol=0)
    m.set_noise(layer, True)
    assert not torch.allclose(layer(x), mean_output)


def test_noisy_experts_match_reference_with_independent_noise_per_expert():
    torch.manual_seed(0)
    n, d, h = 3, 4, 6
    experts = m.NoisyExperts(n, d, h, sigma0=0.3).double()
    with torch.no_grad():
        experts.b2.normal_()
    experts.sample_noise(generator(2))
    e_in, e_out = experts.eps_in.numpy(), experts.eps_out.numpy()
    assert e_in.shape == (n, d) and e_out.shape == (n, h)
    for a in range(n):  # each expert draws its own noise (the official experts share one key)
        for b in range(a):
            assert not np.allclose(e_in[a], e_in[b]) and not np.allclose(e_out[a], e_out[b])
    slots = torch.randn(2, n, 5, d, dtype=torch.float64)
    out = experts(slots).detach().numpy()
    p = {k: v.detach().numpy() for k, v in experts.named_parameters()}
    for j in range(n):
        w1 = p["w1_mu"][j] + p["w1_sigma"][j] * np.outer(e_in[j], e_out[j])
        b1 = p["b1_mu"][j] + p["b1_sigma"][j] * e_out[j]
        ref = np.maximum(slots[:, j].numpy() @ w1 + b1, 0) @ p["w2"][j] + p["b2"][j]
        np.testing.assert_allclose(out[:, j], ref, rtol=1e-10, atol=1e-12)
    experts.eval()  # the official experts keep their noise at evaluation: these do not
    ref = np.stack([np.maximum(slots[:, j].numpy() @ p["w1_mu"][j] + p["b1_mu"][j], 0) @ p["w2"][j] + p["b2"][j]
                    for j in range(n)], axis=1)
    np.testing.assert_allclose(experts(slots).detach().numpy(), ref, rtol=1e-10, atol=1e-12)


def test_noisy_experts_init_is_official():
    torch.manual_seed(0)
    d, h = 32, 512
    experts = m.NoisyExperts(4, d, h, sigma0=0.1)
    bound = 1 / math.sqrt(d)  # NoisyNetwork's first layer: fan-in d
    assert experts.w1_mu.abs().max().item() <= bound and experts.b1_mu.abs().max().item() <= bound
    assert torch.all(experts.w1_sigma == 0.1 * bound) and torch.all(experts.b1_sigma == 0.1 * bound)
    xavier = math.sqrt(6 / (h + d))  # the plain second layer: xavier of each expert's own [h, d] kernel
    for e in range(4):
        assert experts.w2[e].abs().max().item() <= xavier * (1 + 1e-6)
        assert abs(experts.w2[e].std().item() / (xavier / math.sqrt(3)) - 1) < 0.05
    assert torch.all(experts.b2 == 0)


SMALL = dict(num_experts=2, expert_hidden_units=8, n_atoms=11)


@pytest.mark.parametrize("kw", [dict(), dict(moe_type="top1"), dict(moe_type="baseline"),
                                dict(moe_type="baseline", baseline_aggregation="mean")], ids=str)
def test_evaluation_is_deterministic_across_noise_seeds(kw):
    torch.manual_seed(0)
    net = network(args(encoder="nature", **{**SMALL, **kw}), 3)
    x = torch.randint(0, 256, (4, 4, 84, 84), dtype=torch.uint8)
    net.eval()
    outputs = []
    for seed in (1, 2, 3):
        m.resample_noise(net, generator(seed))
        outputs.append(net(x)[0])
    for out in outputs[1:]:
        torch.testing.assert_close(out, outputs[0], rtol=0, atol=0)
    # ... and equal to the training-mode network with every sigma at zero
    net.train()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "sigma" in name:
                p.zero_()
    torch.testing.assert_close(net(x)[0], outputs[0], rtol=0, atol=1e-6)


def test_training_mode_noise_reaches_every_noisy_layer():
    torch.manual_seed(0)
    net = network(args(encoder="nature", **SMALL), 3)
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    m.resample_noise(net, generator(1))
    base = net(x)[0].detach()
    torch.testing.assert_close(net(x)[0], base, rtol=0, atol=0)  # no new draw, no change
    for layer in (net.moe.experts, net.head.advantage, net.head.value):  # changing one layer's noise changes the output
        saved = layer.eps_out.clone()
        layer.sample_noise(generator(7))
        assert not torch.allclose(net(x)[0], base), type(layer).__name__
        layer.eps_out.copy_(saved)


def test_select_action_draws_fresh_noise_at_every_step():
    torch.manual_seed(0)
    net = network(args(encoder="nature", **SMALL), 3)
    noise, rng = generator(0), np.random.default_rng(0)
    stack = np.random.default_rng(1).integers(0, 256, (4, 84, 84), dtype=np.uint8)
    seen = []
    for _ in range(3):
        m.select_action(net, stack, 0.0, rng, noise, "cpu")
        seen.append(net.head.advantage.eps_in.clone())
    assert not torch.equal(seen[0], seen[1]) and not torch.equal(seen[1], seen[2])
    # with epsilon 1 the action is random and uniform over the actions
    actions = [m.select_action(net, stack, 1.0, rng, noise, "cpu") for _ in range(300)]
    assert set(actions) == {0, 1, 2}


def test_update_draws_fresh_noise_for_each_forward():
    """Online noise for the next-state argmax and again for the loss; the target network draws its own."""
    torch.manual_seed(0)
    a = args(encoder="nature", **SMALL)
    online, target = network(a, 3), network(a, 3)
    target.load_state_dict(online.state_dict())
    seen = []
    for name, net in (("online", online), ("target", target)):
        net.register_forward_pre_hook(lambda module, inp, name=name: seen.append((name, module.head.value.eps_in.clone())))
    batch = dict(obs=torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8),
                 next_obs=torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8), actions=torch.tensor([0, 2]),
                 returns=torch.tensor([0.5, -1.0]), discounts=torch.tensor([0.9, 0.0]))
    m.categorical_loss(online, target, batch, generator(3))
    assert [name for name, _ in seen] == ["online", "target", "online"]
    eps = [e for _, e in seen]
    assert not torch.equal(eps[0], eps[1]) and not torch.equal(eps[0], eps[2]) and not torch.equal(eps[1], eps[2])


def test_dueling_distributional_head_matches_reference():
    torch.manual_seed(0)
    a = args(encoder="nature", **SMALL)
    net = network(a, 5)
    with torch.no_grad():  # make the value head matter
        net.head.value.bias_mu.normal_()
    x = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    m.resample_noise(net, generator(1))
    log_probs, q = net(x)
    assert log_probs.shape == (3, 5, 11) and q.shape == (3, 5)
    features = net.moe(net.tokenizer(net.encoder(x.float() / 255))).flatten(1).double()
    assert features.shape == (3, 121 * 64)  # the heads read the flattened MoE output directly

    def noisy(layer, z):  # float64 restatement of the factorized noisy layer
        p = {k: v.detach().double() for k, v in layer.named_parameters()}
        w = p["weight_mu"] + p["weight_sigma"] * torch.outer(layer.eps_out, layer.eps_in).double()
        return z @ w.T + p["bias_mu"] + p["bias_sigma"] * layer.eps_out.double()

    adv = noisy(net.head.advantage, features).view(3, 5, 11)
    value = noisy(net.head.value, features).view(3, 1, 11)
    logits = value + adv - adv.mean(dim=1, keepdim=True)  # the mean over actions, per atom
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(log_probs.double().exp(), probs, rtol=1e-5, atol=1e-6)
    support = torch.linspace(-10, 10, 11, dtype=torch.float64)
    torch.testing.assert_close(net.support.double(), support)
    torch.testing.assert_close(q.double(), (probs * support).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
@pytest.mark.parametrize("tokenization,tokens", [("perconv", (121, 64)), ("perfeat", (64, 121))])
def test_tokenized_baseline_applies_the_dense_layer_per_token(aggregation, tokenization, tokens):
    torch.manual_seed(0)
    net = network(args(encoder="nature", moe_type="baseline", baseline_aggregation=aggregation,
                          tokenization=tokenization, num_experts=2, expert_hidden_units=4, n_atoms=5), 3)
    assert net.moe.weight_mu.shape == (8, tokens[1])
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    m.resample_noise(net, generator(1))
    record = {}
    log_probs, _ = net(x, record)
    fmap = net.encoder(x.float() / 255)
    token_list = fmap.flatten(2).transpose(1, 2) if tokenization == "perconv" else fmap.flatten(2)
    h = net.moe
    w = h.weight_mu + h.weight_sigma * torch.outer(h.eps_out, h.eps_in)
    per_token = torch.relu(token_list @ w.T + h.bias_mu + h.bias_sigma * h.eps_out)  # [B, m, units]
    assert per_token.shape == (2, tokens[0], 8)
    pooled = per_token.sum(1) if aggregation == "sum" else per_token.mean(1)
    adv = net.head.advantage(pooled).view(2, 3, 5)
    logits = net.head.value(pooled).view(2, 1, 5) + adv - adv.mean(1, keepdim=True)
    torch.testing.assert_close(log_probs, logits.log_softmax(-1), rtol=1e-5, atol=1e-5)
    assert record["hidden"].shape == (2, 8, tokens[0])


def noisy(i, o):
    """Dopamine's NoisyNetwork(o) on a fan-in of i: kernel_mu, kernel_sigma [i, o], bias_mu, bias_sigma [o]."""
    return 2 * (i * o + o)


def dense(i, o):
    return i * o + o


def conv3x3(i, o):
    return 9 * i * o + o


# Impala (nn_scale 1): per stack a conv into the stack's width and two residual blocks of two convs each
IMPALA = (conv3x3(4, 16) + 4 * conv3x3(16, 16) + conv3x3(16, 32) + 4 * conv3x3(32, 32) + conv3x3(32, 32)
          + 4 * conv3x3(32, 32))


def test_official_parameter_counts():
    # google/dopamine FullRainbowMoENetwork (labs/moes/configs/full_rainbow.gin: Impala, SOFTMOE, 4 experts of 512,
    # PER_PIXEL), 18 actions, 51 atoms, derived from its layer list:
    #   ImpalaEncoder -> 121 tokens of d = 32 -> SoftMoE: phi_weights (d, n, p = ceil(121/4) = 31), the scalar
    #   `scalar` (1, always created), n experts of [NoisyNetwork(512) on d, Dense(d) on 512]
    #   -> flatten 121 * 32 = 3872 -> NoisyNetwork(18 * 51) (advantage) and NoisyNetwork(51) (value).
    heads_adv, heads_value = noisy(3872, 18 * 51), noisy(3872, 51)
    assert (heads_adv, heads_value) == (7_110_828, 395_046)  # spec softmoe.md section 2.4
    assert IMPALA == 97_744
    experts = 4 * (noisy(32, 512) + dense(512, 32))
    official = IMPALA + 32 * 4 * 31 + 1 + experts + heads_adv + heads_value
    assert official == 7_808_419
    net = network(args(), 18)
    assert num_params(net) == official - 1  # the unused normalization scalar exists here only with normalization
    assert num_params(network(args(moe_normalization=True), 18)) == official
    assert num_params(net.head.advantage) == heads_adv and num_params(net.head.value) == heads_value
    assert num_params(net.moe.experts) == experts
    # the Rainbow baseline (the official branch crashes; with its one-line fix): flatten -> NoisyNetwork(512 k)
    # -> ReLU -> the two noisy heads on 512 k; scale_hidden_layer gives k = num_experts
    for k in (1, 4):
        units = 512 * k
        baseline = IMPALA + noisy(3872, units) + noisy(units, 18 * 51) + noisy(units, 51)
        assert num_params(network(args(moe_type="baseline", num_experts=k), 18)) == baseline
    assert num_params(network(args(moe_type="baseline", num_experts=1), 18)) == 5_057_890
    # Dopamine's Nature-CNN encoder (RainbowCNNet), SoftMoE-4: 7744 features into the heads
    nature = 8 * 8 * 4 * 32 + 32 + 4 * 4 * 32 * 64 + 64 + 3 * 3 * 64 * 64 + 64
    assert num_params(network(args(encoder="nature"), 18)) == (
        nature + 64 * 4 * 31 + 4 * (noisy(64, 512) + dense(512, 64)) + noisy(7744, 18 * 51) + noisy(7744, 51))


def test_single_scaled_expert_parameter_difference():
    # SoftMoE-4 vs one expert of 4 x 512 units differ by d*(n*p - m) + (k - 1)*d, the noisy first layer included
    k, d = 4, 32
    many = num_params(network(args(num_experts=k), 18))
    one = num_params(network(args(num_experts=1, expert_hidden_units=512 * k), 18))
    assert many - one == d * (k * math.ceil(121 / k) - 121) + (k - 1) * d


@pytest.mark.parametrize("encoder,channels", [("nature", 64), ("impala", 32)])
@pytest.mark.parametrize("kind", ["perconv", "perfeat", "perpatch", "persample"])
def test_token_shapes_and_output_shapes(encoder, channels, kind):
    expected = {"perconv": (121, channels), "perfeat": (channels, 121), "perpatch": (9, channels),
                "persample": (1, 121 * channels)}[kind]
    net = network(args(encoder=encoder, tokenization=kind, num_experts=4, expert_hidden_units=8, n_atoms=7), 5)
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    tokens = net.tokenizer(net.encoder(x.float() / 255))
    assert tokens.shape == (2, *expected)
    assert net.moe.slots_per_expert == math.ceil(expected[0] / 4)
    assert net.head.advantage.weight_mu.shape == (5 * 7, expected[0] * expected[1])
    log_probs, q = net(x)
    assert log_probs.shape == (2, 5, 7) and q.shape == (2, 5)


def test_record_exposes_every_hidden_layer():
    for kw, layers in ((dict(), {"conv1", "conv2", "conv3", "experts", "dispatch", "combine"}),
                       (dict(moe_type="baseline"), {"conv1", "conv2", "conv3", "hidden"}),
                       (dict(use_extra_linear_layer=True), {"conv1", "conv2", "conv3", "experts", "dispatch", "combine",
                                                            "extra"}),
                       (dict(moe_type="simplicial_embedding_v1"), {"conv1", "conv2", "conv3", "hidden"}),
                       (dict(moe_type="top1"), {"conv1", "conv2", "conv3", "experts", "router_logits", "router_probs",
                                                "top_experts", "kept"})):
        net = network(args(encoder="nature", num_experts=2, expert_hidden_units=8, n_atoms=5, **kw), 3)
        record = {}
        net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8), record)
        assert set(record) == layers
    assert record["experts"].shape == (2, 2 * 8, 61)  # neurons (expert, unit) on dim 1, slots after
    stats = m.dormant_statistics({k: v for k, v in record.items() if k not in m.ROUTING_KEYS}, (0.0,))
    assert "dormant/experts_tau0_pct" in stats and "moe/router_entropy" in m.routing_statistics(record)


@pytest.mark.parametrize("moe_type,factor,slots", [("softmoe", 0.1, 4), ("softmoe", 0.01, 1), ("top1", 0.5, 16)])
def test_capacity_factor_sets_the_slots_per_expert(moe_type, factor, slots):
    # Impala, 121 tokens, 4 experts: ceil(121 x factor / 4) slots each (Dopamine's capacity_factor); the network still
    # gives one distribution per action
    net = network(m.Args(moe_type=moe_type, capacity_factor=factor, expert_hidden_units=16), 6)
    assert (net.moe.slots_per_expert if moe_type == "softmoe" else net.moe.capacity) == slots
    log_probs, q = net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8))
    assert log_probs.shape == (2, 6, 51) and q.shape == (2, 6)
