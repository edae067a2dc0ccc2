"""The per-game table of the Atari-100k suite in docs/der_single_expert.md ("Atari 100k, the 26 games"), made from the
committed results (docs/results/atari100k_26_der_vh2019/<game>/seed<N>/result.json), so that the doc shows every
committed run and nothing else.

    python tools/results_table.py            # print the table
    python tools/results_table.py --write    # rewrite it in docs/der_single_expert.md

tests/test_docs.py fails when the doc's table differs from what this prints: a result committed without its row, or
a row without its result, cannot land."""
import json
import re
import sys
import textwrap
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmark"))
from bench.report import human_random_table, references  # noqa: E402
from bench.suites import load_suite  # noqa: E402

DOC = ROOT / "docs" / "der_single_expert.md"
START, END = "<!-- results table: made by tools/results_table.py -->", "<!-- end of results table -->"
SUITE, VARIANT = "atari100k_26", "der_vh2019"
RESULTS = ROOT / "docs" / "results" / f"{SUITE}_{VARIANT}"


def committed_results(results=RESULTS):
    """{game: {seed: result}} of the committed runs."""
    found = {}
    for path in sorted(results.glob("*/seed*/result.json")):
        match = re.fullmatch(r"seed(\d+)", path.parent.name)
        if match:
            found.setdefault(path.parents[1].name, {})[int(match.group(1))] = json.loads(path.read_text())
    return found


def per_seed_cell(runs, seeds, key):
    """One value per seed of the table, "-" for a seed this game has not run."""
    return " / ".join(f"{runs[seed][key]:,.1f}" if seed in runs else "-" for seed in seeds)


def table(results=RESULTS):
    games = load_suite(SUITE)["games"]
    published = {ref["game"]: float(ref["reference"]) for ref in references(SUITE)
                 if ref["statistic"] == "mean_score" and ref["variant"] in (VARIANT, "*") and ref["reference"]}
    random_scores = {game: pair[0] for game, pair in human_random_table().items()}
    found = committed_results(results)
    seeds = sorted({seed for runs in found.values() for seed in runs})
    per_seed = " / ".join(f"seed {seed}" for seed in seeds) or "per seed"
    run_count = sum(map(len, found.values()))
    lines = [textwrap.fill(f"**{len(found)} of {len(games)} games have a committed run, {run_count} "
                           f"run{'s' * (run_count != 1)} in all** (seed{'s' * (len(seeds) != 1)} "
                           f"{', '.join(map(str, seeds)) or 'none'}; the target is seeds 1-3 for every game). "
                           "Evaluation: the mean of 100 episodes of the final agent; the seed mean is over the seeds "
                           "that ran.", 120), "",
             f"| game (curves) | evaluation score ({per_seed}) | seed mean ± std | episodes of all seeds: min / median / "
             f"max | training return, last 100 episodes ({per_seed}) | van Hasselt et al. 2019 (DER) | "
             "(mean - random) / (paper - random) |", "|---|---|---|---|---|---|---|"]
    for game in games:
        if game not in found:
            continue
        runs = found[game]
        scores = np.array([runs[s]["eval_return_mean"] for s in sorted(runs)])
        episodes = np.concatenate([runs[s]["eval_returns"] for s in sorted(runs)])
        spread = f" ± {scores.std(ddof=1):,.1f}" if len(scores) > 1 else ""
        gain = (scores.mean() - random_scores[game]) / (published[game] - random_scores[game])
        flag = " **below half**" if gain < 0.5 else ""
        cells = [f"[{game}](results/{RESULTS.name}/curves/{game}.png)", per_seed_cell(runs, seeds, "eval_return_mean"),
                 f"{scores.mean():,.1f}{spread}",
                 f"{episodes.min():,.0f} / {np.median(episodes):,.0f} / {episodes.max():,.0f}",
                 per_seed_cell(runs, seeds, "train_return_last100"), f"{published[game]:,.1f}", f"{gain:.2f}{flag}"]
        lines.append(f"| {' | '.join(cells)} |")
    missing = [game for game in games if game not in found]
    if missing:
        lines += ["", textwrap.fill(f"No committed run yet ({len(missing)}): {', '.join(missing)}.", 120)]
    return "\n".join(lines)


def write(doc=DOC):
    text = doc.read_text()
    head, rest = text.split(START, 1)
    doc.write_text(f"{head}{START}\n{table()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(table())
