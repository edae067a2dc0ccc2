"""`./benchmark.sh perf --official` (benchmark/bench/official.py) on one small case: dqn_softmoe's SoftMoE-8 and the
official dqn_moe_agent.train, from the same weights and a batch of 2, give the same loss and parameter updates, and
both sides are timed; also the markdown table it writes."""
import sys
from pathlib import Path

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
