"""Nothing changed numerically when the scripts took their minimal layout: every script, in its defaults and in
every knob configuration of the suites (tools/equivalence.py), learns bit-identical parameters, Adam state and
logged scalars to the scripts before the change (commit 31ca6d2, recorded in tests/fixtures/equivalence.json)."""
import sys

import pytest
from harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import equivalence  # noqa: E402

CASES = [(script, name) for script, configs in equivalence.CONFIGS.items() for name in configs]


@pytest.mark.parametrize("script,name", CASES, ids=[f"{s}/{n}" for s, n in CASES])
def test_same_numbers_as_before_the_minimal_layout(script, name):
    got = equivalence.compact(equivalence.run_config(script, equivalence.flags_of(script, name)))
    want = equivalence.expected(script, name)
    for key in want:
        assert got[key] == want[key], f"{script}/{name}: {key} differs"
