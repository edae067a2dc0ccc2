"""The GPU memory kept free beside the replay memory grows with the network and the batch (`update_gpu_bytes`,
counted on the meta device): big experts reserve tens of GiB where the default networks reserve about one, the
activations it counts are those a real forward pass saves for backward, it draws no random number, and `place_replay`
puts the memory on the GPU only when it fits beside the reserve."""
import random

import numpy as np
import pytest
import torch
from harness import load_script, parse

SCRIPTS = ["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"]
GiB = 2**30


def make_network(name, *flags):
    m = load_script(name)
    args, _ = parse(m, list(flags))
    return m, m.research_knobs(args).make_network


def parameter_bytes(make):
    with torch.device("meta"):
        return sum(p.numel() * p.element_size() for p in make(18).parameters())


def saved_bytes_of_a_real_forward(make, batch_size):
    """What a CPU forward pass of a zero batch saves for backward, its storages counted once (not the parameters')."""
    torch.manual_seed(0)
    network = make(18)
    own = {t.untyped_storage().data_ptr() for t in [*network.parameters(), *network.buffers()]}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            saved[tensor.untyped_storage().data_ptr()] = (tensor.untyped_storage().nbytes(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(torch.zeros(batch_size, 4, 84, 84, dtype=torch.uint8))
    return sum(nbytes for nbytes, _ in saved.values())


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_counted_activations_are_what_a_real_forward_pass_saves(name):
    m, make = make_network(name)
    counted = m.update_gpu_bytes(make, 8, activation_factor=1, margin=0) - 5 * parameter_bytes(make)
    assert counted == pytest.approx(saved_bytes_of_a_real_forward(make, 8), rel=0.1)


@pytest.mark.parametrize("name, flags", [("dqn_softmoe", ["--encoder", "impala"]), ("rainbow_tokenized", [])])
def test_big_experts_reserve_tens_of_gib_and_the_default_networks_about_one(name, flags):
    m, default = make_network(name, *flags)
    _, big = make_network(name, *flags, "--expert-type", "big")
    assert 1 * GiB < m.update_gpu_bytes(default, 32) < 2 * GiB
    assert 25 * GiB < m.update_gpu_bytes(big, 32) < 45 * GiB  # one update of big experts took ~30 GiB on a CPU


def test_the_reserve_grows_with_the_batch_and_the_parameters():
    m, dqn = make_network("dqn_softmoe", "--moe-type", "baseline", "--num-experts", "1")
    _, scaled = make_network("dqn_softmoe", "--moe-type", "baseline", "--num-experts", "8")
    assert m.update_gpu_bytes(dqn, 64) > m.update_gpu_bytes(dqn, 32) > m.update_gpu_bytes(dqn, 8)
    grown = m.update_gpu_bytes(scaled, 32) - m.update_gpu_bytes(dqn, 32)
    assert grown >= 5 * (parameter_bytes(scaled) - parameter_bytes(dqn))  # weights, gradients, Adam, target


@pytest.mark.parametrize("name, flags", [("rainbow_tokenized", ["--shuffle-tokens"]), ("dqn_softmoe", [])])
def test_the_estimate_draws_no_random_number(name, flags):
    m, make = make_network(name, *flags)
    states = []
    for estimate in (False, True):
        random.seed(1), np.random.seed(1), torch.manual_seed(1)
        noise = torch.Generator().manual_seed(1)
        if estimate:
            m.update_gpu_bytes(make, 32)
        states.append((random.random(), np.random.random(), noise.get_state(), torch.get_rng_state(),
                       [p.detach() for p in make(18).parameters()]))
    (r0, n0, g0, t0, p0), (r1, n1, g1, t1, p1) = states
    assert r0 == r1 and n0 == n1 and torch.equal(g0, g1) and torch.equal(t0, t1)
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_replay_memory_goes_to_the_gpu_only_beside_the_reserve(name, monkeypatch, capsys):
    m = load_script(name)
    free = 10 * GiB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))
    cuda = torch.device("cuda")
    slot = m.ReplayMemory.bytes_per_slot()
    capacity = 1_000_000  # 6.6 GiB
    assert m.place_replay(capacity, cuda, slot, gpu_reserve=free - capacity * slot) == cuda
    assert capsys.readouterr().out == ""
    assert m.place_replay(1_000, cuda, slot, gpu_reserve=free - 1_000 * slot + 1) == torch.device("cpu")
    assert "does not fit on cuda beside the" in capsys.readouterr().out
