"""Nothing changed numerically when the scripts took their minimal layout: every script, in its defaults and in
every knob configuration of the suites (tools/equivalence.py), learns bit-identical parameters, Adam state and
logged scalars to the scripts before the change (commit 31ca6d2, recorded in tests/fixtures/equivalence.json)."""
import os
import sys

import pytest
from harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import equivalence  # noqa: E402

# the suite's share: knobs of every kind (a network module, a loss, an after-update hook) beside the defaults, which
# tests/test_layout.py compares with the same fixture for the whole and the cut script; `python tools/equivalence.py
# check` (or CLEANRL_MOE_FULL_EQUIVALENCE=1) runs all 50 configurations
SUITE = {
    "dqn_softmoe": ("top1moe8_balanced", "softmoe8_extra_layer", "shrink_perturb"),
    "dqn_redo": ("redo_adam_step",),
    "rainbow_tokenized": ("top1_balanced", "redo"),
    "der_single_expert": ("der_vh2019",),
}
FULL = os.environ.get("CLEANRL_MOE_FULL_EQUIVALENCE") == "1"
CASES = [(script, name) for script, configs in equivalence.CONFIGS.items() for name in configs
         if FULL or name in SUITE[script]]


@pytest.mark.parametrize("script,name", CASES, ids=[f"{s}/{n}" for s, n in CASES])
def test_same_numbers_as_before_the_minimal_layout(script, name):
    got = equivalence.compact(equivalence.run_config(script, equivalence.flags_of(script, name)))
    want = equivalence.expected(script, name)
    for key in want:
        assert got[key] == want[key], f"{script}/{name}: {key} differs"
