"""dqn_softmoe.py networks: SoftMoE and Top-1 against independent float64 restatements, shapes, init, counts."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import build_network, load_script

m = load_script("dqn_softmoe")


def make_softmoe(num_tokens, dim, num_experts, hidden=7, normalize=False):
    torch.manual_seed(0)
    experts = m.Experts(num_experts, dim, hidden)
    layer = m.SoftMoE(num_tokens, dim, num_experts, experts, normalize=normalize).double()
    with torch.no_grad():  # non-zero biases and scale, so that the reference checks them too
        for p in (experts.b1, experts.b2):
            p.normal_()
        if normalize:
            layer.scale.fill_(1.7)
    return layer


def softmoe_reference(x, layer):
    """Soft MoE of Puigcerver et al. / Dopamine, one sample at a time, in float64 numpy."""
    phi = layer.phi.detach().numpy()
    w1, b1, w2, b2 = (p.detach().numpy() for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2,
                                                    layer.experts.b2))
    d, n, p = phi.shape
    out = np.zeros_like(x)
    for b, tokens in enumerate(x):
        xl, ph = tokens, phi
        if layer.scale is not None:
            xl = tokens / (np.linalg.norm(tokens, axis=1, keepdims=True) + 1e-6)
            ph = layer.scale.item() * phi / (np.linalg.norm(phi, axis=0, keepdims=True) + 1e-6)
        logits = (xl @ ph.reshape(d, n * p))  # [m, n*p]
        dispatch = np.exp(logits - logits.max(0)) / np.exp(logits - logits.max(0)).sum(0)  # over tokens
        combine = np.exp(logits - logits.max(1, keepdims=True))
        combine /= combine.sum(1, keepdims=True)  # over all slots
        slot_inputs = dispatch.T @ tokens  # [n*p, d]
        slot_outputs = np.zeros_like(slot_inputs)
        for j in range(n):
            rows = slice(j * p, (j + 1) * p)
            slot_outputs[rows] = np.maximum(slot_inputs[rows] @ w1[j] + b1[j], 0) @ w2[j] + b2[j]
        out[b] = combine @ slot_outputs
    return out


@pytest.mark.parametrize("num_tokens,dim,num_experts", [(121, 6, 8), (121, 5, 4), (5, 3, 2), (7, 4, 3), (1, 9, 4),
                                                         (6, 5, 1), (3, 2, 5)])
@pytest.mark.parametrize("normalize", [False, True])
def test_softmoe_matches_float64_reference(num_tokens, dim, num_experts, normalize):
    layer = make_softmoe(num_tokens, dim, num_experts, normalize=normalize)
    assert layer.slots_per_expert == math.ceil(num_tokens / num_experts)
    x = torch.randn(3, num_tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = layer(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out.detach().numpy(), softmoe_reference(x.numpy(), layer), rtol=1e-10, atol=1e-12)


def test_softmoe_softmax_axes_and_recorded_weights():
    layer = make_softmoe(13, 4, 3)
    record = {}
    layer(torch.randn(2, 13, 4, dtype=torch.float64), record)
    dispatch, combine = record["dispatch"], record["combine"]  # [B, m, n, p]
    assert dispatch.shape == combine.shape == (2, 13, 3, 5)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(2, 3, 5, dtype=torch.float64))  # over tokens per slot
    torch.testing.assert_close(combine.sum((2, 3)), torch.ones(2, 13, dtype=torch.float64))  # over slots per token


def test_softmoe_samples_never_mix():
    layer = make_softmoe(11, 4, 3)
    x = torch.randn(5, 11, 4, dtype=torch.float64)
    out = layer(x)
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(layer(x[perm]), out[perm], rtol=0, atol=1e-12)
    x2 = x.clone()
    x2[2] = torch.randn(11, 4, dtype=torch.float64) * 5
    out2 = layer(x2)
    others = [0, 1, 3, 4]
    torch.testing.assert_close(out2[others], out[others], rtol=0, atol=1e-12)
    assert not torch.allclose(out2[2], out[2])


def topk_reference(x, layer):
    """Token-choice Top-k with capacity ceil(k m / n): the first choices of all tokens in token order, then the second
    choices, ...; an assignment beyond its expert's capacity is dropped; output = sum of expert(token) x gate."""
    router = layer.router.weight.detach().numpy()  # [n, d]
    w1, b1, w2, b2 = (p.detach().numpy() for p in (layer.experts.w1, layer.experts.b1, layer.experts.w2,
                                                    layer.experts.b2))
    out = np.zeros_like(x)
    for b, tokens in enumerate(x):
        logits = tokens @ router.T
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        load = np.zeros(router.shape[0], int)
        for choice in range(layer.k):
            for i, token in enumerate(tokens):
                e = int(np.argsort(-probs[i], kind="stable")[choice])
                if load[e] < layer.capacity:
                    load[e] += 1
                    out[b, i] += (np.maximum(token @ w1[e] + b1[e], 0) @ w2[e] + b2[e]) * probs[i, e]
    return out


@pytest.mark.parametrize("num_tokens,num_experts,k", [(121, 8, 1), (7, 3, 1), (5, 5, 1), (9, 2, 1), (4, 1, 1),
                                                      (121, 8, 2), (7, 3, 2), (9, 4, 3)])
def test_topk_matches_reference_with_capacity_and_dropping(num_tokens, num_experts, k):
    torch.manual_seed(0)
    dim = 4
    layer = m.TopKMoE(num_tokens, dim, num_experts, m.Experts(num_experts, dim, 6), k=k).double()
    with torch.no_grad():
        layer.experts.b1.normal_()
        layer.experts.b2.normal_()
        layer.router.weight[0] += 2.0  # crowd expert 0 so that its capacity overflows
    assert layer.capacity == math.ceil(k * num_tokens / num_experts)
    x = torch.randn(4, num_tokens, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).abs()
    record = {}
    out = layer(x, record)
    np.testing.assert_allclose(out.detach().numpy(), topk_reference(x.numpy(), layer), rtol=1e-10, atol=1e-12)
    assert record["kept"].shape == record["top_experts"].shape == (4, num_tokens, k)
    if num_experts > 1:
        assert (~record["kept"]).any(), "the crowded expert should drop tokens"
        dropped = (~record["kept"]).all(-1)  # dropped by every chosen expert
        assert torch.all(out[dropped] == 0)


def test_topk_gate_receives_gradient():
    for k in (1, 2):
        layer = m.TopKMoE(10, 4, 3, m.Experts(3, 4, 5), k=k)
        layer(torch.randn(2, 10, 4)).sum().backward()
        assert layer.router.weight.grad.abs().sum() > 0


def test_noisy_routing_adds_noise_of_std_noise_std_over_n_to_the_logits():
    layer = m.TopKMoE(50, 4, 5, m.Experts(5, 4, 3), noisy_routing=True, noise_std=2.0)
    x = torch.randn(3, 50, 4)
    torch.manual_seed(7)
    record = {}
    layer(x, record)
    torch.manual_seed(7)
    noise = torch.randn(3, 50, 5) * (2.0 / 5)
    torch.testing.assert_close(record["router_probs"], (layer.router(x) + noise).softmax(-1))
    torch.testing.assert_close(record["router_logits"], layer.router(x))  # the clean logits, for the load loss
    quiet = m.TopKMoE(50, 4, 5, m.Experts(5, 4, 3))
    assert quiet.noise_std == 0.0


def args(**kw):
    return m.Args(**kw)


def num_params(net):
    return sum(p.numel() for p in net.parameters())


def test_official_parameter_counts():
    # google/dopamine NatureDQNMoE, 18 actions: plain baseline and SoftMoE-8 per-conv tokens. The official
    # layer also creates an unused normalization scalar; ours exists only with --moe-normalization.
    assert num_params(build_network(m, args(moe_type="baseline", num_experts=1), 18)) == 4_052_658
    assert num_params(build_network(m, args(), 18)) == 754_483 - 1
    assert num_params(build_network(m, args(moe_normalization=True), 18)) == 754_483
    assert num_params(m.NatureEncoder()) == 77_984
    assert num_params(m.ImpalaEncoder()) == 97_744
    # scaled baseline: 512 x 4 units
    assert num_params(build_network(m, args(moe_type="baseline", num_experts=4), 18)) == 77_984 + 7744 * 2048 + 2048 + 2048 * 18 + 18


def test_single_scaled_expert_parameter_difference():
    # SoftMoE-k vs one expert of k x 512 units: the difference is d*(n*p - m) + (k - 1)*d (softmoe.md section 6)
    for encoder, k, d in (("nature", 8, 64), ("impala", 4, 32)):
        many = num_params(build_network(m, args(encoder=encoder, num_experts=k), 18))
        one = num_params(build_network(m, args(encoder=encoder, num_experts=1, expert_hidden_units=512 * k), 18))
        p = math.ceil(121 / k)
        assert many - one == d * (k * p - 121) + (k - 1) * d


@pytest.mark.parametrize("encoder,channels", [("nature", 64), ("impala", 32)])
@pytest.mark.parametrize("kind", ["perconv", "perfeat", "perpatch", "persample"])
def test_token_shapes_and_q_shape(encoder, channels, kind):
    expected = {"perconv": (121, channels), "perfeat": (channels, 121), "perpatch": (9, channels),
                "persample": (1, 121 * channels)}[kind]
    net = build_network(m, args(encoder=encoder, tokenization=kind, num_experts=4, expert_hidden_units=16), 5)
    x = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    fmap = net.encoder(x.float() / 255)
    assert fmap.shape == (2, channels, 11, 11)
    tokens = net.tokenizer(fmap)
    assert tokens.shape == (2, *expected)
    assert net.moe.slots_per_expert == math.ceil(expected[0] / 4)
    assert net.head.in_features == expected[0] * expected[1]
    assert net(x).shape == (2, 5)


def test_perconv_token_order_is_row_major_positions():
    tok = m.Tokenizer("perconv", 3, 11, 11)
    fmap = torch.randn(2, 3, 11, 11)
    tokens = tok(fmap)
    for k in (0, 5, 11, 60, 120):
        torch.testing.assert_close(tokens[:, k], fmap[:, :, k // 11, k % 11])
    assert m.Tokenizer("perconv", 64, 11, 11).num_tokens == 121


def test_slots_per_expert_official_values():
    for n, p in ((1, 121), (2, 61), (4, 31), (8, 16)):
        assert m.SoftMoE(121, 64, n, m.Experts(n, 64, 8)).slots_per_expert == p


def test_nature_same_padding_matches_explicit_pads():
    enc = m.NatureEncoder().double()  # float64: the convs' own padding and F.pad sum in different orders
    x = torch.rand(2, 4, 84, 84, dtype=torch.float64)
    h = F.relu(F.conv2d(F.pad(x, (2, 2, 2, 2)), enc.conv1.weight, enc.conv1.bias, stride=4))
    assert h.shape[-1] == 21
    h = F.relu(F.conv2d(F.pad(h, (1, 2, 1, 2)), enc.conv2.weight, enc.conv2.bias, stride=2))  # asymmetric
    assert h.shape[-1] == 11
    h = F.relu(F.conv2d(F.pad(h, (1, 1, 1, 1)), enc.conv3.weight, enc.conv3.bias, stride=1))
    torch.testing.assert_close(enc(x), h, rtol=0, atol=1e-12)


def brute_force_max_pool_same(x, kernel=3, stride=2):
    size = x.shape[-1]
    out_size = math.ceil(size / stride)
    before = max((out_size - 1) * stride + kernel - size, 0) // 2
    out = torch.empty(*x.shape[:2], out_size, out_size)
    for i in range(out_size):
        for j in range(out_size):
            r0, c0 = i * stride - before, j * stride - before
            rows = slice(max(r0, 0), min(r0 + kernel, size))
            cols = slice(max(c0, 0), min(c0 + kernel, size))
            out[:, :, i, j] = x[:, :, rows, cols].amax(dim=(-2, -1))
    return out


@pytest.mark.parametrize("size,out", [(84, 42), (42, 21), (21, 11)])
def test_impala_pool_pads_with_minus_inf(size, out):
    x = -torch.rand(1, 2, size, size) - 0.5  # all negative: zero padding would show up as 0 at the border
    pooled = m.max_pool_same(x)
    assert pooled.shape[-1] == out
    torch.testing.assert_close(pooled, brute_force_max_pool_same(x))
    assert (pooled < 0).all()


def test_initialization_matches_official():
    torch.manual_seed(0)
    d, n, h = 64, 8, 512
    moe = m.SoftMoE(121, d, n, m.Experts(n, d, h))
    phi = moe.phi.detach()
    assert phi.shape == (d, n, 16)
    std = 1 / math.sqrt(n * d)
    assert abs(phi.std().item() / std - 1) < 0.05
    assert phi.abs().max().item() <= 2 * std / 0.87962566103423978 + 1e-6  # truncated at 2 sigma
    bound = math.sqrt(6 / (d + h))  # xavier of each expert's own [d, h] kernel, not of the stacked tensor
    for w in (moe.experts.w1, moe.experts.w2):
        for e in range(n):
            assert w[e].abs().max().item() <= bound * (1 + 1e-6)
            assert abs(w[e].std().item() / (bound / math.sqrt(3)) - 1) < 0.05
    assert torch.all(moe.experts.b1 == 0) and torch.all(moe.experts.b2 == 0)
    net = build_network(m, args(moe_type="baseline"), 6)
    for layer in (net.encoder.conv1, net.encoder.conv2, net.encoder.conv3, net.moe, net.head):
        fan_in = layer.weight[0].numel()
        fan_out = layer.weight.shape[0] * layer.weight[0, 0].numel()
        assert layer.weight.abs().max().item() <= math.sqrt(6 / (fan_in + fan_out)) * (1 + 1e-6)
        assert torch.all(layer.bias == 0)
    block = m.ImpalaEncoder().blocks[2][0]
    assert abs(block.conv0.weight.std().item() * math.sqrt(32 * 9) - 1) < 0.05  # lecun_normal
    assert torch.all(block.conv0.bias == 0)


def test_record_exposes_every_hidden_layer():
    for kw, layers in ((dict(), {"conv1", "conv2", "conv3", "experts", "dispatch", "combine"}),
                       (dict(moe_type="baseline"), {"conv1", "conv2", "conv3", "hidden"}),
                       (dict(use_extra_linear_layer=True), {"conv1", "conv2", "conv3", "experts", "dispatch", "combine",
                                                            "extra"}),
                       (dict(moe_type="simplicial_embedding_v2"), {"conv1", "conv2", "conv3", "hidden"}),
                       (dict(moe_type="top1"), {"conv1", "conv2", "conv3", "experts", "router_logits", "router_probs",
                                                "top_experts", "kept"})):
        net = build_network(m, args(num_experts=2, expert_hidden_units=8, **kw), 3)
        record = {}
        net(torch.zeros(2, 4, 84, 84, dtype=torch.uint8), record)
        assert set(record) == layers
    assert record["experts"].shape == (2, 2 * 8, 61)  # neurons (expert, unit) on dim 1, slots after
