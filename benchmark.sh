#!/usr/bin/env bash
# Regression runs of the cleanrl-moe scripts across variants, games and seeds, here or on Slurm.
#
#     ./benchmark.sh list                     # the suites (benchmark/suites/*.toml)
#     ./benchmark.sh smoke                    # run a suite here; re-running skips finished runs, resumes the rest
#     ./benchmark.sh dqn_redo --slurm --partition gpu --gpus 1 --time 24:00:00   # or as one Slurm array job
#     ./benchmark.sh status smoke             # runs done, failed, running; ETA
#     ./benchmark.sh report smoke             # markdown + PNG; exit 1 if a run failed or a result is off its reference
#     ./benchmark.sh perf                     # steps/s, CPU time, peak memory, replay bytes per transition of each script
#     ./benchmark.sh perf dqn_softmoe_networks --rounds 3   # named variants side by side (benchmark/perf/*.toml)
#
# `./benchmark.sh COMMAND --help` lists the options; docs/benchmark.md explains the design.
# Uses the python on PATH (${PYTHON:-python3}); `pip install ".[benchmark]"` adds rliable and matplotlib for reports.
# The code is the package benchmark/bench/ (docs/benchmark.md lists its modules).
export PYTHONPATH="$(cd "$(dirname "$0")/benchmark" && pwd)${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench "$@"
