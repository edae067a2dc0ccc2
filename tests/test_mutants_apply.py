"""tools/check_mutants.py plants each bug by replacing one exact snippet of a script: a snippet that no longer occurs
exactly once (the code moved on) would make the mutant check stop, so every snippet is checked here, cheaply."""
import re
import sys

from harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import check_mutants  # noqa: E402


def test_every_mutant_snippet_occurs_exactly_once():
    stale = []
    for script, description, old, new, tests in check_mutants.load_mutants():
        text = (ROOT / "cleanrl_moe" / f"{script}.py").read_text()
        if text.count(old) != 1 or old == new or not tests:
            stale.append(f"{script}: {description} (snippet found {text.count(old)} times)")
        for test in tests:  # a test the mutant names must exist: pytest would only say "no tests ran"
            file, *names = test.split("::")
            assert (ROOT / file).exists(), f"{description}: no test file {test}"
            for name in names:
                assert re.search(rf"^\s*(def|class) {re.escape(name.split('[')[0])}\b", (ROOT / file).read_text(), re.M), \
                    f"{description}: no test {test}"
    assert not stale, stale
