"""benchmark.sh's code: suites (plan), local and Slurm execution, report, perf; `python -m bench` runs its command line."""
