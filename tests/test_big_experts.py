"""--expert-type big (experts that hold their own encoder, Dopamine's BigExpertModel) in dqn_softmoe.py,
rainbow_tokenized.py and der_single_expert.py: BigExperts against a per-expert float64 restatement (one ungrouped
encoder per expert, the slot image built pixel by pixel), expert independence, init, slot counts and parameter counts,
the chunked statistics probe, start-up validation and a tiny real run of each script. tests/official compares the
networks with dopamine's own modules."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import build_network, check_flags, load_script, only_run_dir, result, run_script, scalars

dqn, rainbow, der = (load_script(name) for name in ("dqn_softmoe", "rainbow_tokenized", "der_single_expert"))
ENCODERS = {"nature": dqn.NatureEncoder, "impala": dqn.ImpalaEncoder}


def big_experts(m, num_experts, dim, slots, hidden, make_encoder, sigma0=None):
    """The script's big experts: plain (BigExperts), or with a noisy first dense layer (Rainbow's NoisyBigExperts)."""
    if sigma0 is None:
        return m.BigExperts(num_experts, dim, slots, hidden, make_encoder)
    return m.NoisyBigExperts(num_experts, dim, slots, hidden, make_encoder, sigma0)


def make_experts(m, encoder, num_experts=3, side=5, hidden=7, sigma0=None, seed=0):
    torch.manual_seed(seed)
    experts = big_experts(m, num_experts, 4, side * side, hidden, getattr(m, ENCODERS[encoder].__name__), sigma0).double()
    with torch.no_grad():  # non-zero biases everywhere, so that the restatement checks them too
        for name, p in experts.named_parameters():
            if name.endswith("bias") or name in ("b1", "b2", "b1_mu"):
                p.normal_()
    return experts


def expert_encoder(m, experts, encoder, j):
    """Expert j's encoder on its own: a fresh encoder holding the j-th slices of every grouped conv."""
    single = getattr(m, ENCODERS[encoder].__name__)().double()
    n = experts.w2.shape[0]
    with torch.no_grad():
        for name, conv in single.named_modules():
            if isinstance(conv, torch.nn.Conv2d):
                grouped = experts.encoder.get_submodule(name)
                assert grouped.groups == n and grouped.weight.shape[0] == n * conv.weight.shape[0]
                conv.weight.copy_(grouped.weight.view(n, *conv.weight.shape)[j])
                conv.bias.copy_(grouped.bias.view(n, -1)[j])
    return single


def reference(m, experts, encoder, slots, noise=False):
    """BigExperts one expert and one sample at a time: slot r * side + c is pixel (r, c) of the expert's image."""
    batch, n, p, d = slots.shape
    side = math.isqrt(p)
    out = torch.zeros_like(slots)
    for j in range(n):
        single = expert_encoder(m, experts, encoder, j)
        if hasattr(experts, "w1_mu"):  # NoisyBigExperts
            w1, b1 = experts.w1_mu[j], experts.b1_mu[j]
            if noise:
                w1 = w1 + experts.w1_sigma[j] * torch.outer(experts.eps_in[j], experts.eps_out[j])
                b1 = b1 + experts.b1_sigma[j] * experts.eps_out[j]
        else:
            w1, b1 = experts.w1[j], experts.b1[j]
        for b in range(batch):
            image = torch.zeros(1, d, side, side, dtype=slots.dtype)
            for r in range(side):
                for c in range(side):
                    image[0, :, r, c] = slots[b, j, r * side + c]
            hidden = F.relu(single(image).flatten() @ w1 + b1)
            out[b, j] = (hidden @ experts.w2[j] + experts.b2[j]).view(p, d)
    return out


@pytest.mark.parametrize("encoder", ["nature", "impala"])
def test_big_experts_match_one_ungrouped_encoder_per_expert(encoder):
    experts = make_experts(dqn, encoder)
    slots = torch.randn(2, 3, 25, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        np.testing.assert_allclose(experts(slots).numpy(), reference(dqn, experts, encoder, slots).numpy(),
                                   rtol=1e-10, atol=1e-12)


def test_noisy_big_experts_draw_independent_noise_per_expert_and_none_in_eval():
    experts = make_experts(rainbow, "nature", sigma0=0.5)
    experts.sample_noise(torch.Generator().manual_seed(2))
    assert not torch.equal(experts.eps_in[0], experts.eps_in[1]) and not torch.equal(experts.eps_out[0], experts.eps_out[1])
    slots = torch.randn(2, 3, 25, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        experts.train()
        noisy = experts(slots)
        np.testing.assert_allclose(noisy.numpy(), reference(rainbow, experts, "nature", slots, noise=True).numpy(),
                                   rtol=1e-10, atol=1e-12)
        experts.eval()
        clean = experts(slots)
        np.testing.assert_allclose(clean.numpy(), reference(rainbow, experts, "nature", slots).numpy(),
                                   rtol=1e-10, atol=1e-12)
        experts.train()
        rainbow.set_noise(experts, False)
        assert torch.equal(experts(slots), clean) and (noisy - clean).abs().max() > 1e-3


@pytest.mark.parametrize("encoder", ["nature", "impala"])
def test_changing_one_expert_changes_only_its_slots(encoder):
    experts = make_experts(dqn, encoder, num_experts=4)
    slots = torch.randn(2, 4, 25, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = experts(slots)
        j, n = 2, 4
        for name, p in experts.named_parameters():  # every parameter is expert-major on dim 0
            p.view(n, -1)[j] += 0.3
        after = experts(slots)
    changed = (after - before).abs().flatten(2).amax(2)  # [B, n]
    assert (changed[:, j] > 1e-3).all()
    assert torch.equal(after[:, [0, 1, 3]], before[:, [0, 1, 3]])


@pytest.mark.parametrize("m,encoder,sigma0", [(dqn, "impala", None), (dqn, "nature", None), (rainbow, "impala", 0.1)])
def test_each_expert_is_a_separately_initialized_script_encoder(m, encoder, sigma0):
    """Expert j's encoder is exactly the j-th of n encoders made one after another (the scripts' own init: xavier, and
    lecun-normal residual convs, zero biases); the dense layers are xavier (plain) or NoisyLinear's (noisy) per expert."""
    make = getattr(m, ENCODERS[encoder].__name__)
    torch.manual_seed(5)
    experts = big_experts(m, 8, 4, 841, 512, make, sigma0)
    torch.manual_seed(5)
    separately = [make() for _ in range(8)]
    for j, single in enumerate(separately):
        mine = expert_encoder(m, experts.double(), encoder, j)
        for (name, a), (_, b) in zip(mine.named_parameters(), single.named_parameters()):
            assert torch.equal(a.float(), b), (j, name)
    assert not torch.equal(separately[0].state_dict()[next(iter(separately[0].state_dict()))],
                           separately[1].state_dict()[next(iter(separately[1].state_dict()))])
    features = math.prod(experts.encoding_shape)
    assert features == {"impala": 32 * 4 * 4, "nature": 64 * 4 * 4}[encoder]
    w1 = experts.w1_mu if sigma0 else experts.w1
    bound = 1 / math.sqrt(features) if sigma0 else math.sqrt(6 / (features + 512))
    assert bound * 0.99 < w1.abs().max() <= bound * (1 + 1e-6)  # per expert [F, h]: not the stacked tensor's fans
    assert abs(w1.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    if sigma0:
        assert torch.allclose(experts.w1_sigma, torch.full_like(experts.w1_sigma, sigma0 / math.sqrt(features)))
    else:
        assert not experts.b1.any()
    bound = math.sqrt(6 / (512 + 841 * 4))
    assert bound * 0.99 < experts.w2.abs().max() <= bound * (1 + 1e-6) and not experts.b2.any()


# script, flags, slots per expert, image side, the experts' encoding (C, H, W), parameters for 18 actions (the official
# module's count minus SoftMoE's unused scalar: tests/official)
NETWORKS = [
    (dqn, dict(encoder="impala"), 841, 29, (32, 4, 4), 17_224_018),
    (dqn, dict(), 841, 29, (64, 4, 4), 19_163_090),
    (rainbow, dict(), 1764, 42, (32, 6, 6), 74_320_850),
    (rainbow, dict(encoder="nature"), 1764, 42, (64, 6, 6), 78_960_402),
    (der, dict(), 7056, 84, (64, 11, 11), 144_360_754),
    (der, dict(num_experts=4, expert_hidden_units=512), 1764, 42, (64, 6, 6), 78_960_402),
]


@pytest.mark.parametrize("m,flags,slots,side,encoding,count", NETWORKS)
def test_slot_counts_shapes_and_parameter_counts(m, flags, slots, side, encoding, count):
    with torch.device("meta"):
        net = build_network(m, m.Args(expert_type="big", **flags), 18)
    assert type(net.encoder).__name__ == "Frames" and not list(net.encoder.parameters())  # no shared encoder
    assert (net.tokenizer.num_tokens, net.tokenizer.token_dim) == (7056, 4)  # pixels
    assert net.moe.slots_per_expert == slots and net.moe.experts.side == side
    assert net.moe.experts.encoding_shape == encoding
    assert sum(p.numel() for p in net.parameters()) == count


def test_square_slot_counts():
    cases = [((7056, 8, 1.0), 841), ((7056, 4, 1.0), 1764), ((7056, 1, 1.0), 7056), ((7056, 8, 0.1), 81),
             ((121, 8, 1.0), 16), ((121, 4, 1.0), 25), ((4, 8, 1.0), 1), ((7056, 2, 1.0), 3481)]
    for (tokens, experts, factor), slots in cases:
        assert dqn.square_slots(tokens, experts, factor) == slots
        soft_moe = dqn.SoftMoE(tokens, 4, experts, None, factor)  # the Soft MoE's own count: ceil(m x factor / n)
        assert soft_moe.slots_per_expert == math.ceil(tokens * factor / experts)


def small_big_network(m, **flags):
    torch.manual_seed(0)  # 7,056 pixel tokens into 4 x 16 slots (4 x 4 images): cheap
    return build_network(m, m.Args(expert_type="big", num_experts=4, expert_hidden_units=32, capacity_factor=0.01,
                             **flags), 5)


@pytest.mark.parametrize("m", [dqn, rainbow, der], ids=["dqn_softmoe", "rainbow_tokenized", "der_single_expert"])
def test_statistics_probe_records_the_experts_and_pools_chunks_exactly(m):
    net = small_big_network(m, encoder="nature").eval()
    probe = torch.randint(0, 256, (6, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    record = {}
    with torch.no_grad():
        net(probe, record)
    assert record["experts"].shape == (6, 4 * 32)  # (expert, unit) pairs, one hidden vector per expert and state
    assert record["experts.conv1"].shape == (6, 4 * 32, 1, 1)  # the experts' Nature convs on 4 x 4 images
    activations = {name: value for name, value in record.items() if name not in m.ROUTING_KEYS}
    whole = {**m.dormant_statistics(activations, (0.0, 0.1)), **m.routing_statistics(record)}
    assert {"dormant/experts_tau0_pct", "dormant/experts.conv3_tau0.1_pct", "moe/dispatch_entropy",
            "moe/slot_usage_entropy", "moe/expert_usage_entropy"} <= set(whole)
    for chunk in (6, 4, 1):
        pooled = m.probe_statistics(net, probe, (0.0, 0.1), chunk)
        assert set(pooled) == set(whole)
        for key, value in whole.items():
            assert pooled[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (chunk, key)


def test_evaluation_of_big_rainbow_experts_is_noise_free():
    net = small_big_network(rainbow)
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outputs = []
    for seed in (1, 2):
        rainbow.resample_noise(net, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            net.train()
            outputs.append(net(obs)[1])
            net.eval()
            outputs.append(net(obs)[1])
    assert torch.equal(outputs[1], outputs[3]) and not torch.equal(outputs[0], outputs[2])
    assert not torch.equal(net.moe.experts.eps_in[0], net.moe.experts.eps_in[1])


BAD_FLAGS = [
    (dict(expert_type="big", moe_type="top1"), "--expert-type big needs the Soft MoE"),
    (dict(expert_type="big", moe_type="baseline"), "--expert-type big needs the Soft MoE"),
    (dict(expert_type="big", tokenization="perfeat"), "--tokenization perconv"),
    (dict(expert_type="big", tokenization="persample"), "--tokenization perconv"),
    (dict(expert_type="big", tokenization="perpatch"), "--tokenization perconv"),
]


CASES = [(m, kwargs, message) for m in (dqn, rainbow, der) for kwargs, message in BAD_FLAGS]
CASES.append((der, dict(expert_type="big", encoder="der"), "--expert-type does not apply to --encoder der"))


@pytest.mark.parametrize("m,kwargs,message", CASES, ids=lambda v: v.__name__[12:] if hasattr(v, "Args") else None)
def test_bad_big_expert_flags_stop_with_one_line(m, kwargs, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check_flags(m, m.Args(**kwargs))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_big_experts_pass_the_checks_with_their_defaults():
    for m in (dqn, rainbow, der):
        check_flags(m, m.Args(expert_type="big"))
        check_flags(m, m.Args(expert_type="big", capacity_factor=0.1, moe_normalization=True))


# tiny real runs: 4 x 16 slots (--capacity-factor 0.01) keep each forward cheap; 6 updates, one statistics probe
RUN = ["--expert-type", "big", "--capacity-factor", "0.01", "--num-experts", 4, "--expert-hidden-units", 32,
       "--batch-size", 4, "--buffer-size", 200, "--total-timesteps", 30, "--learning-starts", 18, "--train-frequency", 2,
       "--log-frequency", 10, "--stats-frequency", 30, "--stats-batch-size", 6, "--env-id", "ALE/Breakout-v5"]
RUNS = {"dqn_softmoe": ["--encoder", "impala"], "rainbow_tokenized": [], "der_single_expert": ["--eval-episodes", 0]}


@pytest.mark.parametrize("script", list(RUNS))
def test_a_tiny_real_run_with_big_experts(script, tmp_path):
    proc = run_script(script, *RUN, *RUNS[script], cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    tags = scalars(run_dir)
    for tag in ("losses/td_loss", "dormant/experts_tau0_pct",
                "moe/dispatch_entropy", "moe/expert_usage_entropy"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert any(tag.startswith("dormant/experts.") for tag in tags)  # the experts' own encoder layers
    assert result(run_dir)["args"]["expert_type"] == "big" and "parameters" in proc.stdout
