"""The report: per game mean and std over seeds (against the published score where references.csv has one),
human-normalized IQM, median and mean with 95% stratified-bootstrap CIs (rliable: Agarwal et al. 2021), checks against
benchmark/references.csv, learning curves and an aggregate plot; from the runs directory and the committed results
alike; exit 1 when a run is not finished or a check fails."""
import csv
import datetime
import importlib
import shlex
from importlib.metadata import version
from pathlib import Path

import numpy as np

from .common import BENCHMARK, fail, files_dir, find_one, fmt, load_result, log_tail, read_status, run_score, states_of

MIN_GAMES_FOR_AGGREGATE = 10  # rainbow_der.md section 10: no HNS aggregates from a handful of games


# ---------------------------------------------------------------------------------------------------------------
# Data: human/random scores, reference numbers
# ---------------------------------------------------------------------------------------------------------------
def read_csv(path):
    """Rows of a CSV file whose lines starting with # are comments."""
    with open(path) as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def human_random_table(path=BENCHMARK / "human_random.csv"):
    """{game: (random, human)} from benchmark/human_random.csv (Dopamine's normalization_utils.py)."""
    return {row["game"]: (float(row["random"]), float(row["human"])) for row in read_csv(path)}


def hns(score, game, table):
    """Human-normalized score (score - random) / (human - random); None for a game without human and random scores."""
    if game not in table or score is None:
        return None
    random_score, human_score = table[game]
    return (score - random_score) / (human_score - random_score)


def references(suite_name, path=BENCHMARK / "references.csv"):
    return [row for row in read_csv(path) if row["suite"] == suite_name]


# ---------------------------------------------------------------------------------------------------------------
# Aggregation: per game mean and std over seeds; per suite human-normalized IQM, median and mean with 95%
# stratified-bootstrap CIs (rliable: Agarwal et al. 2021)
# ---------------------------------------------------------------------------------------------------------------
def aggregates_of_matrix(scores):
    """[IQM, median, mean] of a runs x games matrix: rliable's aggregate_iqm, aggregate_median, aggregate_mean."""
    from rliable import metrics

    return np.array([metrics.aggregate_iqm(scores), metrics.aggregate_median(scores), metrics.aggregate_mean(scores)])


def aggregates_of_games(*games):
    """[IQM, median, mean] from one runs x 1 array per game (games with unequal run counts), with rliable's metrics:
    the IQM over all runs pooled, the median and the mean over games of each game's mean."""
    from rliable import metrics

    game_means = np.array([[game.mean() for game in games]])  # 1 x games, as rliable's runs x games matrix
    return np.array([metrics.aggregate_iqm(np.concatenate(games)), metrics.aggregate_median(game_means),
                     metrics.aggregate_mean(game_means)])


def aggregate_with_ci(per_game, reps=20_000, seed=0):
    """(point estimates, 95% CIs as [[low, ...], [high, ...]]) of [IQM, median, mean] over {game: [run scores]}, from
    rliable's get_interval_estimates: a stratified bootstrap (runs resampled with replacement within each game) and
    percentile intervals. Equal runs per game: rliable's runs x games matrix; unequal (after a failed run): one
    array per game, each resampled on its own. Seeded: the same data give the same CIs."""
    from rliable import library as rly

    runs = [np.asarray(per_game[game], dtype=float).reshape(-1, 1) for game in sorted(per_game)]
    if len({len(r) for r in runs}) == 1:
        data, func = np.concatenate(runs, axis=1), aggregates_of_matrix
    else:
        data, func = runs, aggregates_of_games
    saved = np.random.get_state()
    np.random.seed(seed)  # rliable's StratifiedBootstrap draws from numpy's global generator
    try:
        points, cis = rly.get_interval_estimates({"x": data}, func, reps=reps)
    finally:
        np.random.set_state(saved)
    return np.asarray(points["x"], dtype=float), np.asarray(cis["x"], dtype=float)


def collect(runs):
    """One row per planned run: state, score and its source, HNS."""
    table = human_random_table()
    rows = []
    for run, state in states_of(runs).items():
        score, source = run_score(load_result(run)) if state == "done" else (None, "")
        rows.append({"run": run, "state": state, "score": score, "source": source, "hns": hns(score, run.game, table)})
    return rows


def summarize(rows, reps=20_000):
    """Per (variant, game): runs, mean and sample std of scores, mean HNS; per variant: aggregates with CIs."""
    per_game, per_variant = {}, {}
    for row in rows:
        if row["score"] is not None:
            per_game.setdefault((row["run"].variant, row["run"].game), []).append(row)
    games = {}
    for (variant, game), group in per_game.items():
        scores = np.array([row["score"] for row in group])
        sources = sorted({row["source"] for row in group})
        games[variant, game] = {
            "n": len(scores), "mean": scores.mean(), "std": scores.std(ddof=1) if len(scores) > 1 else None,
            "source": sources[0] if len(sources) == 1 else "mixed: " + "; ".join(sources),
            "hns": None if group[0]["hns"] is None else float(np.mean([row["hns"] for row in group]))}
    for variant in dict.fromkeys(row["run"].variant for row in rows):
        normalized = {game: [row["hns"] for row in group] for (v, game), group in per_game.items()
                      if v == variant and group[0]["hns"] is not None}
        without = sorted({row["run"].game for row in rows if row["run"].variant == variant and
                          row["run"].game not in human_random_table()})
        suite_games = {row["run"].game for row in rows if row["run"].variant == variant} - set(without)
        entry = {"games": len(normalized), "runs": sum(map(len, normalized.values())), "without_human": without,
                 "aggregate_games": sorted(normalized), "one_run_games": sum(len(v) == 1 for v in normalized.values())}
        if len(normalized) < MIN_GAMES_FOR_AGGREGATE:
            entry["skipped"] = (f"{len(normalized)} games with human-normalized scores; aggregates need at least "
                                f"{MIN_GAMES_FOR_AGGREGATE} (rainbow_der.md section 10)")
        else:
            entry["point"], entry["ci"] = aggregate_with_ci(normalized, reps=reps)
            if len(normalized) < len(suite_games):  # a published aggregate over all of them is another statistic
                entry["partial"] = f"{len(normalized)} of the suite's {len(suite_games)} games"
        per_variant[variant] = entry
    return games, per_variant


# ---------------------------------------------------------------------------------------------------------------
# Comparison with reference numbers
# ---------------------------------------------------------------------------------------------------------------
def number(text):
    return float(text) if text not in (None, "") else None


def within(value, low, high):
    return value is not None and (low is None or value >= low) and (high is None or value <= high)


def compare(reference_rows, rows, games, per_variant):
    """[(reference row, variant, verdict, our value as text)] with verdict pass, FAIL or skip."""
    variants = list(dict.fromkeys(row["run"].variant for row in rows))
    stat_index = {"iqm_hns": 0, "median_hns": 1, "mean_hns": 2}
    checks = []
    for ref in reference_rows:
        low, high, published = number(ref["low"]), number(ref["high"]), number(ref["reference"])
        slack = number(ref["slack"]) or 0.0
        for variant in variants if ref["variant"] == "*" else [ref["variant"]]:
            mine = [row for row in rows if row["run"].variant == variant and ref["game"] in ("*", row["run"].game)]
            if not mine:
                checks.append((ref, variant, "skip", "not in this run of the suite"))
                continue
            if ref["statistic"] == "run_score":
                unfinished = [row["run"].id for row in mine if row["state"] != "done"]
                outside = [f"{row['run'].id}: {row['score']}" for row in mine
                           if row["state"] == "done" and not within(row["score"], low, high)]
                verdict = "FAIL" if outside or unfinished else "pass"
                text = "; ".join(outside + [f"{run_id}: not finished" for run_id in unfinished]) or (
                    f"{len(mine)} runs in range, min {min(r['score'] for r in mine):.1f}, "
                    f"max {max(r['score'] for r in mine):.1f}")
                checks.append((ref, variant, verdict, text))
            elif ref["statistic"] == "mean_score":
                stats = games.get((variant, ref["game"]))
                if stats is None:
                    checks.append((ref, variant, "skip", "no finished run yet"))
                    continue
                checks.append((ref, variant, "pass" if within(stats["mean"], low, high) else "FAIL",
                               f"{stats['mean']:.1f} over {stats['n']} runs"))
            elif ref["statistic"] in stat_index:
                entry = per_variant.get(variant, {})
                if "point" not in entry:
                    checks.append((ref, variant, "skip", entry.get("skipped", "no aggregate")))
                    continue
                i = stat_index[ref["statistic"]]
                value, ci_low, ci_high = entry["point"][i], entry["ci"][0][i], entry["ci"][1][i]
                if entry.get("partial"):
                    checks.append((ref, variant, "skip", f"{value:.3f} [{ci_low:.3f}, {ci_high:.3f}] over "
                                   f"{entry['partial']}: checked when all of them have run"))
                    continue
                ok = (ci_low - slack <= published <= ci_high + slack) if ref["check"] in ("ci", "info") else within(
                    value, low, high)
                verdict = ("inside" if ok else "outside") if ref["check"] == "info" else ("pass" if ok else "FAIL")
                checks.append((ref, variant, verdict, f"{value:.3f} [{ci_low:.3f}, {ci_high:.3f}]"))
            else:
                fail(f"references.csv: unknown statistic {ref['statistic']!r}")
    return checks


def published_over_same_games(entry, variant, published, table):
    """The median and mean HNS of the published per-game scores ({(variant, game): mean_score reference row}) over
    the games of a partial aggregate, its like-for-like comparison while the suite is unfinished; None when one of
    those games has no published score."""
    games = entry["aggregate_games"]
    if not all((variant, game) in published for game in games):
        return None
    scores = [hns(float(published[variant, game]["reference"]), game, table) for game in games]
    sources = sorted({short_source(published[variant, game]) for game in games})
    return {"median": float(np.median(scores)), "mean": float(np.mean(scores)), "source": ", ".join(sources)}


def tolerance_text(ref):
    if ref["check"] in ("ci", "info"):
        return (f"{ref['reference']} inside our 95% CI" + (f" +- {ref['slack']}" if number(ref["slack"]) else "") +
                (" (shown, never fails)" if ref["check"] == "info" else ""))
    low, high = ref["low"] or "-inf", ref["high"] or "+inf"
    return f"in [{low}, {high}]"


# ---------------------------------------------------------------------------------------------------------------
# Report: markdown, learning curves and aggregate plot (PNG), checks; exit 1 when a run failed or a check fails
# ---------------------------------------------------------------------------------------------------------------
def episodic_returns(run):
    """(steps, returns) of charts/episodic_return from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = files_dir(run)  # the script's runs/<name>/, or the run's committed copy
    if folder is None:
        return np.zeros(0), np.zeros(0)
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    if "charts/episodic_return" not in acc.Tags()["scalars"]:
        return np.zeros(0), np.zeros(0)
    events = acc.Scalars("charts/episodic_return")
    return np.array([e.step for e in events]), np.array([e.value for e in events])


def short_source(ref):
    """'van Hasselt et al. 2019' from a reference's source text."""
    return ref["source"].split(" (")[0].split(",")[0]


def plot_curves(rows, out_dir, bins=50, published=None):
    """One PNG per game: per variant, the mean over seeds of the episodic return (averaged in step bins), with the
    seeds' min-max band, each seed's own curve (thin), and each run's evaluation score, where it has one, as a dot at
    its last step labelled with its seed; the published score ({(variant, game): reference row}) dashed and the
    random score dotted."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for game in dict.fromkeys(row["run"].game for row in rows):
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant in dict.fromkeys(row["run"].variant for row in rows):
            data = [episodic_returns(row["run"]) for row in rows if row["run"].game == game and row["run"].variant == variant]
            data = [(steps, returns) for steps, returns in data if len(steps)]
            if not data:
                continue
            edges = np.linspace(0, max(steps.max() for steps, _ in data) + 1, bins + 1)
            curves = []
            for steps, returns in data:
                which = np.clip(np.digitize(steps, edges) - 1, 0, bins - 1)
                sums, counts = np.bincount(which, returns, bins), np.bincount(which, minlength=bins)
                curves.append(np.where(counts > 0, sums / np.maximum(counts, 1), np.nan))
            with warnings.catch_warnings():  # bins where no seed finished an episode stay empty
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
            centers = (edges[1:] + edges[:-1]) / 2
            line, = ax.plot(centers, mean, marker="." if len(data[0][0]) < 20 else None,
                            label=f"{variant} ({len(data)} seed{'s' if len(data) > 1 else ''})")
            ax.fill_between(centers, low, high, color=line.get_color(), alpha=0.2)
            for curve in curves:
                ax.plot(centers, curve, color=line.get_color(), linewidth=0.6, alpha=0.5)
            evaluated = [row for row in rows if row["run"].game == game and row["run"].variant == variant
                         and row["source"].startswith("eval") and row["score"] is not None]
            if evaluated:
                ax.scatter([edges[-1]] * len(evaluated), [row["score"] for row in evaluated], color=line.get_color(),
                           marker="o", zorder=3, label=f"{variant}: evaluation score of each run")
                for row in evaluated:
                    ax.annotate(f"seed {row['run'].seed}", (edges[-1], row["score"]), xytext=(4, -3), fontsize=7,
                                textcoords="offset points", color=line.get_color())
            ref = (published or {}).get((variant, game))
            if ref:
                ax.axhline(float(ref["reference"]), color=line.get_color(), linestyle="--", linewidth=1,
                           label=f"{variant}: published, {short_source(ref)}")
        if ax.lines and game in human_random_table():
            ax.axhline(human_random_table()[game][0], color="gray", linestyle=":", linewidth=1, label="random")
        if ax.lines:
            ax.margins(x=0.1)  # room for the seeds' labels
            ax.set(title=game, xlabel="agent steps", ylabel="episodic return (training)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out_dir / f"{game}.png"
            fig.savefig(path, dpi=100)
            paths.append(path)
        plt.close(fig)
    return paths


def plot_aggregates(per_variant, path, refs=()):
    """IQM, median and mean of each variant with their 95% CIs; each published aggregate of references.csv (ci and
    info checks) as a cross on its variant's line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v, entry in per_variant.items() if "point" in entry]
    if not variants:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.5 * len(variants) + 1.6), sharey=True)
    markers, labelled = {}, set()
    for i, (ax, name) in enumerate(zip(axes, ("IQM", "Median", "Mean"))):
        for y, variant in enumerate(variants):
            entry = per_variant[variant]
            point, low, high = entry["point"][i], entry["ci"][0][i], entry["ci"][1][i]
            ax.errorbar(point, y, xerr=[[point - low], [high - point]], fmt="o", capsize=4, color="C0")
            stat = ("iqm_hns", "median_hns", "mean_hns")[i]
            if entry.get("partial"):  # the published aggregates are over other games: the same games' instead
                same = entry.get("same_games")
                if same and name != "IQM":
                    label = f"{same['source']}, same {entry['games']} games"
                    ax.plot(same[name.lower()], y, marker="D", color="C2", linestyle="none", markersize=7, zorder=3,
                            label=label if label not in labelled else None)
                    labelled.add(label)
                continue
            for ref in refs:
                if ref["statistic"] == stat and ref["variant"] in (variant, "*") and ref["check"] in ("ci", "info"):
                    source = short_source(ref)
                    marker = markers.setdefault(source, "x+1*^v"[len(markers) % 6])
                    ax.plot(float(ref["reference"]), y, marker=marker, color="C3", linestyle="none", markersize=9, zorder=3,
                            label=source if source not in labelled else None)
                    labelled.add(source)
        ax.set(title=name, xlabel="human-normalized score", yticks=range(len(variants)), yticklabels=variants)
        ax.grid(axis="x", alpha=0.3)
    published = " (dots and bars); published numbers (other markers)" if labelled else ""
    fig.suptitle("95% stratified-bootstrap CIs" + published, fontsize=9)
    if labelled:  # below the plots, in half an inch added to the figure
        fig.set_figheight(fig.get_figheight() + 0.5)
        fig.legend(loc="lower center", ncol=len(labelled), fontsize=8)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight() if labelled else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def require_report_packages():
    """Stop with one line when rliable (the CIs) or matplotlib (the plots) does not import."""
    for module in ("rliable.library", "matplotlib"):
        try:
            importlib.import_module(module)
        except Exception as error:  # ImportError; or arch, which rliable imports, raising a TypeError under pandas 3
            first_line = str(error).split("\n")[0]
            fail(f"report needs {module.split('.')[0]}, which does not import here ({type(error).__name__}: "
                 f"{first_line}); cd {shlex.quote(str(BENCHMARK.parent))} && pip install \".[benchmark]\" adds it")


def shown(path):
    """A path as the report shows it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(BENCHMARK.parent)) if path.is_relative_to(BENCHMARK.parent) else str(path)


def seed_list(rows):
    seeds = sorted(row["run"].seed for row in rows)
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def report(suite, runs, out, reps=20_000, runs_dir=None):
    require_report_packages()
    rows = collect(runs)
    games, per_variant = summarize(rows, reps=reps)
    refs = references(suite["references"])
    checks = compare(refs, rows, games, per_variant)
    variants = list(dict.fromkeys(row["run"].variant for row in rows))
    published = {(variant, ref["game"]): ref for ref in refs if ref["statistic"] == "mean_score" and ref["reference"]
                 for variant in (variants if ref["variant"] == "*" else [ref["variant"]])}
    table = human_random_table()
    for variant, entry in per_variant.items():
        if entry.get("partial"):
            entry["same_games"] = published_over_same_games(entry, variant, published, table)
    out = Path(out)
    curves = plot_curves(rows, out / "curves", published=published)
    aggregate_png = plot_aggregates(per_variant, out / "aggregate.png", refs)
    states = {row["run"]: row["state"] for row in rows}
    done = sum(state == "done" for state in states.values())
    committed = [row["run"] for row in rows if row["state"] == "done" and not find_one(row["run"].dir, "result.json")]
    failures = [row for row in rows if row["state"] != "done"]
    failed_checks = [c for c in checks if c[2] == "FAIL"]

    read_from = f"runs directory {shown(runs_dir or out)}{'' if Path(runs_dir or out).is_dir() else ' (absent)'}"
    if committed:
        folders = sorted({shown(Path(run.committed).parents[1]) for run in committed})
        read_from += f"; {len(committed)} of the runs done read from the committed results in {', '.join(folders)}"
    md = [f"# Benchmark report: {suite['name']}", "", suite.get("description", ""), "",
          f"{datetime.datetime.now():%Y-%m-%d %H:%M}: {done}/{len(rows)} runs done ({read_from}). "
          "Score of a run: its evaluation mean if it has one, else its training return over the last 100 episodes "
          "(column `score of`). Std: sample standard deviation over seeds.", ""]
    md += ["## Per game", ""]
    header = "| variant | game | runs | seeds | score (mean ± std) | score of | HNS (mean) |"
    if published:
        header += " published | (mean - random) / (published - random) |"
        sources = ", ".join(sorted({short_source(ref) for ref in published.values()}))
        md += [f"`published`: the per-game score of {sources} (benchmark/references.csv, its mean_score checks); a game "
               "is flagged **below half** when its seed mean gained less than half the published gain over random "
               "(random from benchmark/human_random.csv).", ""]
    md += [header, "|---" * (header.count("|") - 1) + "|"]
    flagged = []
    for variant, game in dict.fromkeys((row["run"].variant, row["run"].game) for row in rows):
        stats = games.get((variant, game))
        scored = [row for row in rows if row["run"].variant == variant and row["run"].game == game and
                  row["score"] is not None]
        if stats:
            std = f" ± {stats['std']:,.1f}" if stats["std"] is not None else ""
            cells = [str(stats["n"]), ", ".join(str(row["run"].seed) for row in scored), f"{stats['mean']:,.1f}{std}",
                     stats["source"], fmt(stats["hns"], 3) if stats["hns"] is not None else "no human score"]
        else:
            cells = ["0", "", "no finished run", "", ""]
        ref = published.get((variant, game))
        if published:
            gain = ""
            if ref and stats and game in table and float(ref["reference"]) != table[game][0]:
                fraction = (stats["mean"] - table[game][0]) / (float(ref["reference"]) - table[game][0])
                gain = f"{fraction:.2f}" + (" **below half**" if fraction < 0.5 else "")
                if fraction < 0.5:
                    flagged.append(f"{variant} {game} ({fraction:.2f}, {seed_list(scored)})")
            cells += [ref["reference"] if ref else "", gain]
        md.append(f"| {variant} | {game} | " + " | ".join(cells) + " |")
    if published:
        md += ["", f"Below half the published gain over random: {'; '.join(flagged)}." if flagged else
               "No game with a finished run is below half the published gain over random."]
    md += ["", "## Aggregates (human-normalized)", ""]
    if any("point" in entry for entry in per_variant.values()):
        md += [f"IQM over all runs, median and mean over games of the per-game means; 95% stratified-bootstrap CIs "
               f"({reps:,} resamples, percentile intervals; rliable {version('rliable')}). Published numbers: "
               "checks below.", "",
               "| variant | games | runs | IQM [95% CI] | median [95% CI] | mean [95% CI] |", "|---|---|---|---|---|---|"]
    for variant, entry in per_variant.items():
        if "point" in entry:
            cells = [f"{p:.3f} [{lo:.3f}, {hi:.3f}]" for p, lo, hi in zip(entry["point"], *entry["ci"])]
            md.append(f"| {variant} | {entry['games']} | {entry['runs']} | " + " | ".join(cells) + " |")
    for variant, entry in per_variant.items():
        if "skipped" in entry:
            md.append(f"- {variant}: no aggregates: {entry['skipped']}.")
        if "point" in entry and entry["one_run_games"]:
            md.append(f"- {variant}: {entry['one_run_games']} of its {entry['games']} games have one run. The "
                      "stratified bootstrap resamples runs within each game, so those games add no spread: the CIs are "
                      "too narrow, of zero width when every game has one run.")
        if entry.get("partial"):
            line = (f"- {variant}: aggregates over {entry['partial']}, so the published aggregates over all of them "
                    "are not checked yet (skip below).")
            same = entry.get("same_games")
            if same:
                sides = []
                for i, stat in ((1, "median"), (2, "mean")):
                    inside = entry["ci"][0][i] <= same[stat] <= entry["ci"][1][i]
                    sides.append(f"{stat} {same[stat]:.3f} ({'inside' if inside else 'outside'} our 95% CI)")
                line += (f" Like for like, {same['source']}'s per-game scores over the same {entry['games']} games "
                         f"give {' and '.join(sides)}.")
            md.append(line)
        if entry["without_human"]:
            md.append(f"- {variant}: reported raw, left out of the aggregates (no human score in "
                      f"benchmark/human_random.csv): {', '.join(entry['without_human'])}.")
    md += ["", "## Checks against references (benchmark/references.csv)", ""]
    if checks:
        md += ["| result | variant | game | statistic | ours | tolerance | source |", "|---|---|---|---|---|---|---|"]
        md += [f"| {verdict} | {variant} | {ref['game']} | {ref['statistic']} | {text} | {tolerance_text(ref)} | "
               f"{ref['source']} |"
               for ref, variant, verdict, text in checks]
    else:
        md.append(f"No reference numbers for suite {suite['references']}.")
    if failures:
        md += ["", "## Runs not finished", ""]
        pending = [row for row in failures if row["state"] == "pending"]
        for variant in variants:
            missing = {}
            for row in pending:
                if row["run"].variant == variant:
                    missing.setdefault(row["run"].game, []).append(row)
            if missing:
                md.append(f"- {variant}, not started ({sum(map(len, missing.values()))} runs): " +
                          ", ".join(f"{game} ({seed_list(group)})" for game, group in missing.items()))
            none = [game for game in dict.fromkeys(row["run"].game for row in rows if row["run"].variant == variant)
                    if (variant, game) not in games]
            if none:
                md.append(f"- {variant}, games without a finished run ({len(none)}): {', '.join(none)}")
        md.append("")
        for row in failures:
            if row["state"] == "pending":
                continue
            status = read_status(row["run"].dir)
            code = f" (exit code {status['exit_code']})" if status.get("exit_code") is not None else ""
            md += [f"### {row['run'].id}: {row['state']}{code}",
                   "", f"log: `{Path(row['run'].dir) / 'log.txt'}`", "", "```", log_tail(row["run"]), "```", ""]
    md += ["", "## Plots", ""]
    md += [f"![{path.stem}]({path.relative_to(out)})" for path in curves]
    no_curve = [game for game in dict.fromkeys(row["run"].game for row in rows) if game not in {p.stem for p in curves}]
    if no_curve:
        md.append(f"No learning curve (no run yet, or no training episode ended in any run): {', '.join(no_curve)}.")
    if aggregate_png:
        md.append(f"![aggregates]({aggregate_png.relative_to(out)})")
    text = "\n".join(md) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    print(text)
    verdict = []
    if failures:
        verdict.append(f"{len(failures)} runs not finished")
    if failed_checks:
        verdict.append(f"{len(failed_checks)} checks outside their tolerance")
    print(f"report written to {out / 'report.md'}: " + ("; ".join(verdict) if verdict else "all runs done, all checks pass"))
    return 1 if verdict else 0
