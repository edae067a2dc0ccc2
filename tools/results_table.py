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
from bench.report import MIN_GAMES_FOR_AGGREGATE, aggregates_of_games, hns, human_random_table, references  # noqa: E402
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


def aggregates(found, published):
    """The human-normalized IQM, median and mean (rliable's point estimates, as the report's) of the committed runs,
    set beside the median and mean of van Hasselt et al.'s per-game scores over the same games and over all 26; empty
    below the report's minimum of games. The CIs take a bootstrap: they are in the report, not here."""
    human_random = human_random_table()
    normalized = {game: np.array([hns(result["eval_return_mean"], game, human_random) for result in runs.values()])
                  for game, runs in found.items() if game in human_random}
    if len(normalized) < MIN_GAMES_FOR_AGGREGATE:
        return []
    iqm, median, mean = aggregates_of_games(*normalized.values())
    same = [hns(published[game], game, human_random) for game in normalized]
    every = [hns(score, game, human_random) for game, score in published.items()]
    runs = sum(map(len, normalized.values()))
    return ["", textwrap.fill(
        f"Human-normalized over these {len(normalized)} games ({runs} runs): IQM {iqm:.3f} over all runs, median "
        f"{median:.3f} and mean {mean:.3f} of the game means. Van Hasselt et al.'s per-game scores give median "
        f"{np.median(same):.3f} and mean {np.mean(same):.3f} over the same {len(normalized)} games (median "
        f"{np.median(every):.3f} and mean {np.mean(every):.3f} over all {len(every)}). Point estimates: the 95% "
        f"CIs are in the [report](results/{RESULTS.name}/report.md#aggregates-human-normalized), with the "
        f"[picture](results/{RESULTS.name}/aggregate.png)" + (
            "; they have zero width while every game has one run (the bootstrap resamples runs within a game)."
            if runs == len(normalized) else "."), 120)]


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
    return "\n".join(lines + aggregates(found, published))


def write(doc=DOC):
    text = doc.read_text()
    head, rest = text.split(START, 1)
    doc.write_text(f"{head}{START}\n{table()}\n{END}{rest.split(END, 1)[1]}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(table())
