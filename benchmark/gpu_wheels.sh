#!/usr/bin/env bash
# The Python packages that benchmark/gpu_check.sh needs and a bare GPU machine (PyTorch, numpy, OpenCV, TensorBoard,
# rich, pytest, JAX's CUDA build, Flax, optax and chex installed; nothing reachable) lacks, downloaded here as wheels
# into .whl/ (git-ignored) for Python 3.12 on x86-64 Linux. dopamine-rl and gin-config are for step 5 (perf --official);
# dopamine-rl installs without its dependencies, as the README's test command installs it.
# Run it where pip reaches PyPI:  bash benchmark/gpu_wheels.sh [PYTHON_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${1:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    gymnasium==1.4.0 farama-notifications==0.0.6 ale-py==0.12.1 tyro==1.0.17 typeguard==4.6.1 docstring-parser==0.18.0 \
    gin-config==0.5.0 dopamine-rl==4.1.2
ls -la .whl
