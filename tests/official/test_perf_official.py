"""`./benchmark.sh perf --official` (benchmark/bench/official.py) on one small case: dqn_softmoe's SoftMoE-8 and the
official dqn_moe_agent.train, from the same weights and a batch of 2, give the same loss and parameter updates, and
both sides are timed; also the markdown table it writes."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmark"))
from bench import official  # noqa: E402


@pytest.fixture(scope="module")
def mods():
    return official.setup()


def test_one_update_matches_the_official_train_and_is_timed(mods):
    row = official.run_config(mods, "dqn_softmoe SoftMoE-8", rounds=1, updates=1, batch_size=2)
    assert "error" not in row, row
    check = row["check"]
    assert check["loss_rel"] <= official.LOSS_RTOL, check
    assert check["grad_rel"] <= official.GRAD_RTOL and check["update_diff_over_lr"] <= 0.01, check
    assert check["largest_update_over_lr"] > 0.5 and check["passed"], check
    assert row["ours_ms"] > 0 and row["official_ms"] > 0
    # the official DQN MoE agent's default statistics flags crash its train (MoEType has no DROPLESSMOE): recorded
    assert any("DROPLESSMOE" in error for error in row["official_errors"]), row
    info = dict(official.machine(), command="./benchmark.sh perf --official")
    table = official.markdown([row], info, 1, 1, 2)
    assert "| dqn_softmoe SoftMoE-8 |" in table and "yes: loss" in table


def test_a_different_batch_gives_a_different_loss(mods):
    """The check can fail: the two sides fed different batches disagree (in the loss and in the gradients)."""
    pair = official.Pair(mods, "dqn_softmoe SoftMoE-8", batch_size=2)
    pair.batch["returns"] += 1.0  # the script's copy only
    check = official.check(pair)
    assert check["loss_rel"] > official.LOSS_RTOL and check["grad_rel"] > official.GRAD_RTOL and not check["passed"]


def test_the_device_is_the_gpu_only_where_both_sides_see_one(mods, monkeypatch):
    import jax
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert official.pick_device(cpu_only=False) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert official.pick_device(cpu_only=True) == "cpu"  # --cpu
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    with pytest.raises(SystemExit, match=r"JAX does not .*or pass --cpu"):  # never torch on the GPU, JAX on the CPU
        official.pick_device(cpu_only=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert official.pick_device(cpu_only=False) == "cuda"


def test_the_gpu_table_says_what_it_timed():
    row = {"config": "dqn_softmoe SoftMoE-8", "official_network": "MoE", "ours_ms": 2.0, "official_ms": 3.0,
           "ratio": 1.5}
    info = {"cpu": "x", "commit": "0" * 40, "command": "c", "device": "cuda", "gpu": "NVIDIA H100", "torch": "2",
            "jax": "0.11", "jax_device": "cuda:0"}
    table = official.markdown([row], info, 5, 5, 32)
    assert table.startswith("GPU wall ms per update, each update waited for (NVIDIA H100") and "TF32 off" in table
    assert official.markdown([row], dict(info, device="cpu"), 5, 5, 32).startswith("CPU ms per update, one thread")


def test_both_sides_in_float64_compute_the_same_update(mods):
    """The float64 check (where float32 rounding flips a max-pool pick or a ReLU mask) is exact: the DQN update of both
    sides in float64 agrees to rounding, in the loss and in every gradient, once the same float32 inputs go in."""
    pair = official.Pair(mods, "dqn_softmoe SoftMoE-8", batch_size=2)
    loss_official, official64 = official.official_float64_gradients(pair, pair.params, official.check_train(pair))
    loss_ours, ours64 = official.ours_float64_gradients(pair)
    assert abs(loss_ours - loss_official) <= 1e-12 * abs(loss_official)
    assert set(ours64) == set(official64)
    assert max(official._rel(ours64[k], g) for k, g in official64.items()) <= 1e-12
    assert all(g.dtype == np.float64 for g in ours64.values())
