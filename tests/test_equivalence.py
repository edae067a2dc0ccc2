"""Nothing changed numerically when the scripts took their minimal layout: every script, in its defaults and in
every knob configuration of the suites (tools/equivalence.py), learns bit-identical parameters, Adam state and
logged scalars to the scripts before the change (commit 31ca6d2, recorded in tests/fixtures/equivalence.json).
der_single_expert's entries were recorded again when its episodes began to start with Dopamine's no-op steps
(--noop-max, issue 28), a deliberate change of what it computes."""
import json
import os
import subprocess
import sys

import pytest
from harness import ROOT, python_command

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
def test_same_numbers_as_before_the_minimal_layout(script, name, tmp_path):
    # in another process: the tool forks one child per run, which a pytest worker that has imported JAX
    # (tests/official) must not do
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'tools')!r}); import equivalence; "
            f"print(json.dumps(equivalence.compact(equivalence.run_config({script!r}, "
            f"equivalence.flags_of({script!r}, {name!r})))))")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    (tmp_path / "run.py").write_text(code)
    proc = subprocess.run(python_command(tmp_path / "run.py"), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().split("\n")[-1])
    want = equivalence.expected(script, name)
    for key in want:
        assert got[key] == want[key], f"{script}/{name}: {key} differs"
