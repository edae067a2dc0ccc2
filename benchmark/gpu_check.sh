#!/usr/bin/env bash
# The prepared GPU check (issue 14): one command, at most 8 minutes on an H100/H200, results in one folder.
#
#     bash benchmark/gpu_wheels.sh                  # here, once: the wheels a bare GPU machine lacks, into .whl/
#     bash benchmark/gpu_check.sh OUT               # there: OUT/ receives every result
#     GPU_CHECK_DRY=1 bash benchmark/gpu_check.sh /tmp/dry   # here, on a CPU: the same steps at tiny budgets
#
# 1. tests/test_cuda.py: the CUDA-graphed update and acting forward against the eager ones, all four scripts;
# 2. the environment alone (random actions through each script's make_env): t_env, the env-bound limit 1/t_env;
# 3. per script, its default network with the replay memory on the GPU, eager and --cuda-graphs side by side
#    (benchmark.sh perf: learning SPS, warm-up SPS, peak GPU memory, peak host RSS), about 40 s a run.
# OUT/summary.md gathers the tables. Each step has its own time limit, so a hang cannot eat the GPU budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)  # at most 8 files come back from a device run:
WORK=$(mktemp -d /tmp/gpu_check.XXXX)                               # the runs' folders go here, a tarball of them to OUT
DRY=${GPU_CHECK_DRY:-0}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import gymnasium, ale_py, tyro" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_check: the wheels in .whl/ did not install"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import gymnasium, ale_py, tyro, torch" || { echo "gpu_check: run benchmark/gpu_wheels.sh here first"; exit 1; }
{ date -u; git log -1 --format='commit %h %s' 2>/dev/null; nvidia-smi 2>&1 | head -15
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } > "$OUT/machine.txt"
cat "$OUT/machine.txt"

# 1. graphed against eager
timeout 90 python3 -m pytest -q -p no:cacheprovider -n 0 tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"

# 2. the environment's own speed: 1/t_env bounds every script's SPS
ENV_STEPS=$([ "$DRY" = 1 ] && echo 500 || echo 5000)
timeout 20 python3 - "$ENV_STEPS" "$WORK/t_env" <<'EOF' 2>&1 | tee "$OUT/env_speed.txt"
import sys, time
steps, sys.argv = int(sys.argv[1]), ["x", *sys.argv[1:]]
sys.path.insert(0, "cleanrl_moe")
import dqn_softmoe as m
env = m.make_env("ALE/Breakout-v5", 1, 0.25, 27_000)
env.reset(seed=1)
start = time.perf_counter()
for _ in range(steps):
    _, _, terminated, truncated, _ = env.step(env.action_space.sample())
    if terminated or truncated:
        env.reset()
t_env = (time.perf_counter() - start) / steps
print(f"t_env {t_env * 1e3:.3f} ms per agent step (Breakout, sticky actions, frame skip 4): env-bound limit {1 / t_env:,.0f} SPS")
open(sys.argv[2], "w").write(repr(t_env))
EOF

# 3. eager and graphed, each script's default network; budgets sized for about 30 s a run on an H100 (the eager
#    dqn_softmoe learned at about 300 SPS there, before perf made it run its acting forward pass at every learning
#    step), 88 s at most per script: with the limits of steps 1 and 2 the whole check stays under 8 minutes
budget() {  # SCRIPT -> "--steps N --learning-starts M"
    if [ "$DRY" = 1 ]; then echo "--steps 400 --learning-starts 300 --log-frequency 50"; return; fi
    case $1 in
        dqn_softmoe|dqn_redo) echo "--steps 9000 --learning-starts 3000 --log-frequency 1000" ;;
        rainbow_tokenized) echo "--steps 8000 --learning-starts 3000 --log-frequency 1000" ;;
        der_single_expert) echo "--steps 3000 --learning-starts 1200 --log-frequency 300" ;;
    esac
}
for script in dqn_softmoe dqn_redo rainbow_tokenized der_single_expert; do
    # shellcheck disable=SC2046
    timeout 88 ./benchmark.sh perf --variant "${script}_eager $script" --variant "${script}_graphs $script --cuda-graphs" \
        --buffer-size 100000 $(budget "$script") --out "$WORK/perf_$script" 2>&1 | tail -20 > "$WORK/perf_$script.txt"
done

{ echo "# GPU check"; echo; echo '```'; cat "$OUT/machine.txt"; echo '```'; echo
  echo "## tests/test_cuda.py"; echo; echo '```'; tail -5 "$OUT/test_cuda.txt"; echo '```'; echo
  echo "## Environment"; echo; cat "$OUT/env_speed.txt"; echo
  for script in dqn_softmoe dqn_redo rainbow_tokenized der_single_expert; do
      echo "## $script"; echo; grep '^|' "$WORK/perf_$script/perf.md" 2>/dev/null || tail -5 "$WORK/perf_$script.txt"; echo
  done
  echo "## Learning SPS as a fraction of the env-bound limit 1/t_env"; echo
  python3 - "$WORK" <<'EOF'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1])
t_env = float((work / "t_env").read_text()) if (work / "t_env").is_file() else None
print("| variant | learning SPS | fraction of 1/t_env |\n|---|---|---|")
for path in sorted(work.glob("perf_*/perf.json")):
    for row in json.loads(path.read_text()):
        sps = row.get("learning_sps")
        share = f"{sps * t_env:.3f}" if sps and t_env else ""
        print(f"| {row['variant']} | {f'{sps:,.0f}' if sps else row.get('note', '')} | {share} |")
EOF
  } > "$OUT/summary.md"
tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.npz' --exclude='state.pt' . 2>/dev/null  # logs, events, perf.md
cat "$OUT/summary.md"
echo "gpu_check: results in $OUT (summary.md, test_cuda.txt, env_speed.txt, machine.txt, runs.tar.gz)"
