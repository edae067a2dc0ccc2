"""The docs stay true to the code: every docs/<script>.md has the same sections in the same order, its method table is
what tools/method_table.py makes of the script now (so its line numbers cannot go stale), every relative link of the
README and the docs points at a file that exists, and the README stays a front page."""
import re
import sys

import pytest
from harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import method_table  # noqa: E402

SECTIONS = ["Usage", "The method, top to bottom", "Public surface", "Logged metrics", "Deviations from the official code",
            "Host syncs on CUDA", "Tests", "Results"]
SCRIPTS = sorted(p.stem for p in (ROOT / "cleanrl_moe").glob("*.py"))
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_script_doc_has_the_same_sections(name):
    text = (ROOT / "docs" / f"{name}.md").read_text()
    assert re.findall(r"^## (.+)$", text, flags=re.M) == SECTIONS


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_method_table_is_current(name):
    text = (ROOT / "docs" / f"{name}.md").read_text()
    table = text.split(method_table.START, 1)[1].split(method_table.END, 1)[0].strip()
    assert table == method_table.table(name), f"docs/{name}.md: run python tools/method_table.py --write"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.name}: link to {target}, which does not exist"


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.split("\n")) <= 120
    for name in SCRIPTS:
        assert f"cleanrl_moe/{name}.py" in text and f"docs/{name}.md" in text


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().split("\n")[-1]
    assert ci in readme, "the README's test command and .ci/run's last line differ"
