"""`benchmark.sh collect`: copy every finished run's evidence (result.json, TensorBoard events, log.txt; never a
checkpoint) from the suite's runs directory into its committed folder <results>/<suite>_<variant>/<game>/seed<N>/,
which `run`, `status` and `report` then count as done."""
import shutil
from pathlib import Path

from .common import COMMITTED_FILES, find_one, read_status


def evidence(run):
    """The files of a finished run to commit, result.json last (a copy cut short does not count as done), or []."""
    result = find_one(run.dir, "result.json")
    if not result or read_status(run.dir).get("state") != "done":  # done: the script exited 0 after writing it
        return []
    return [path for pattern in COMMITTED_FILES
            for path in sorted((Path(run.dir) if pattern == "log.txt" else result.parent).glob(pattern))]


def collect_runs(runs):
    """Copy the files of every finished run that its committed folder lacks; a committed file that differs from the
    run's is left as it is (delete the folder to collect the run again). Returns 1 when one differs, else 0."""
    copied, present, differ = 0, 0, 0
    for run in runs:
        files, target = evidence(run), Path(run.committed)
        if not files:
            continue
        clash = [f.name for f in files if (target / f.name).is_file() and (target / f.name).read_bytes() != f.read_bytes()]
        if clash:
            print(f"{run.id}: {target} holds another {', '.join(clash)}: left as it is (delete the folder and run "
                  "collect again to replace it)")
            differ += 1
            continue
        new = [f for f in files if not (target / f.name).is_file()]
        if not new:
            present += 1
            continue
        target.mkdir(parents=True, exist_ok=True)
        for f in new:
            shutil.copy2(f, target / f"{f.name}.tmp")
            (target / f"{f.name}.tmp").replace(target / f.name)
        print(f"copied {run.id}: {', '.join(f.name for f in new)} ({sum(f.stat().st_size for f in new) / 1024:,.0f} "
              f"KiB) -> {target}")
        copied += 1
    unfinished = sum(1 for run in runs if not evidence(run))
    print(f"{copied} runs copied, {present} already committed, {differ} differing from their committed copy, "
          f"{unfinished} not finished here (of {len(runs)})")
    return 1 if differ else 0
