"""The docs stay true to the code: every docs/<script>.md has the same sections in the same order, its method table is
what tools/method_table.py makes of the script now (so its line numbers cannot go stale), the Atari-100k results table
is what tools/results_table.py makes of the committed results, every relative link of the
README and the docs points at a file that exists, and the README stays a front page."""
import json
import re
import sys

import numpy as np
import pytest
from harness import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import method_table  # noqa: E402
import results_table  # noqa: E402

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


def test_the_atari100k_results_table_is_current():
    text = results_table.DOC.read_text()
    table = text.split(results_table.START, 1)[1].split(results_table.END, 1)[0].strip()
    assert table == results_table.table(), "docs/der_single_expert.md: run python tools/results_table.py --write"


def test_the_results_table_shows_every_committed_run(tmp_path):
    """Two seeds of one game and one of another, made up: per-seed cells, the seed mean and std, the pooled episodes,
    the gain over random against the paper (Pong: random -20.7, paper -19.3) and its flag."""
    def result(game, seed, scores, train):
        path = tmp_path / game / f"seed{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"eval_returns": scores, "eval_return_mean": float(np.mean(scores)),
                                    "train_return_last100": train}))

    result("Pong", 1, [-21.0, -19.0], -20.0)
    result("Pong", 3, [-18.0, -16.0], -17.5)
    result("Boxing", 3, [1.0, 2.0, 3.0], 0.5)
    (tmp_path / "Pong" / "seed1_probe").mkdir()  # an investigation's folder is no run
    text = results_table.table(tmp_path)
    assert "**2 of 26 games have a committed run, 3 runs in all** (seeds 1, 3;" in text
    assert f"| [Pong](results/{results_table.RESULTS.name}/curves/Pong.png) | -20.0 / -17.0 | -18.5 ± 2.1 | -21 / -18 / -16 " \
           "| -20.0 / -17.5 | -19.3 | 1.57 |" in text, text  # (-18.5 + 20.7) / (-19.3 + 20.7)
    assert "| [Boxing](" in text and "| - / 2.0 | 2.0 | 1 / 2 / 3 | - / 0.5 | 0.2 | " in text, text
    assert text.index("[Boxing]") < text.index("[Pong]")  # the suite's order
    assert "No committed run yet (24): Alien, Amidar," in text and "Pong" not in text.split("run yet")[1]
    assert "Human-normalized" not in text  # 2 games: no aggregates (the report's minimum is 10)


def test_the_results_table_gives_the_aggregates_from_ten_games_on(tmp_path):
    """Ten games with made-up human-normalized scores 0.0, 0.1, ..., 0.9 (seed 1), the first with a second seed at 3.0:
    IQM over the 11 runs pooled (floor(11/4) = 2 cut at each end: 0.2 ... 0.8), median and mean over the game means
    (1.5, 0.1, ..., 0.9), set beside the paper's per-game scores over the same ten games and over all 26."""
    human_random = results_table.human_random_table()
    published = {ref["game"]: float(ref["reference"]) for ref in results_table.references(results_table.SUITE)
                 if ref["statistic"] == "mean_score"}
    games = results_table.load_suite(results_table.SUITE)["games"][:10]

    def result(game, seed, normalized):
        random_score, human_score = human_random[game]
        score = random_score + normalized * (human_score - random_score)
        path = tmp_path / game / f"seed{seed}" / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"eval_returns": [score], "eval_return_mean": score, "train_return_last100": 0.0}))

    for i, game in enumerate(games):
        result(game, 1, 0.1 * i)
    result(games[0], 2, 3.0)
    text = " ".join(results_table.table(tmp_path).split())
    paper = [(published[g] - human_random[g][0]) / (human_random[g][1] - human_random[g][0]) for g in games]
    assert ("Human-normalized over these 10 games (11 runs): IQM 0.500 over all runs, median 0.550 and mean 0.600 of "
            "the game means.") in text, text
    assert (f"per-game scores give median {np.median(paper):.3f} and mean {np.mean(paper):.3f} over the same 10 games "
            "(median 0.161 and mean 0.285 over all 26).") in text, text


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
