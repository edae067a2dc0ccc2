#!/usr/bin/env bash
# The prepared GPU check (issue 14): one command, at most 6.5 minutes on an H100/H200, results in one folder.
#
#     bash benchmark/gpu_wheels.sh                  # here, once: the wheels a bare GPU machine lacks, into .whl/
#     bash benchmark/gpu_check.sh --prepare         # here, before each device run: the commit, into GPU_CHECK_COMMIT
#     bash benchmark/gpu_check.sh OUT               # there: OUT/ receives every result
#     GPU_CHECK_DRY=1 bash benchmark/gpu_check.sh /tmp/dry   # here, on a CPU: the same steps, tiny, limits x5
#
# 1. tests/test_cuda.py: the CUDA-graphed update and acting forward against the eager ones, all four scripts;
# 2. the environment alone (random actions through each script's make_env): t_env, the env-bound limit 1/t_env;
# 3. benchmark/gpu_real_runs.py: per script a tiny real run with --cuda-graphs, statistics and a periodic checkpoint,
#    SIGTERM in training, --resume to the end and an evaluation episode; dqn_redo at --replay-ratio 1 against eager;
# 4. per script, its default network with the replay memory on the GPU, eager and --cuda-graphs one after the other
#    (benchmark.sh perf: learning SPS, warm-up SPS, peak GPU memory, peak host RSS), about 10 s a run;
# 5. benchmark.sh perf --official (issue 28): each script's update next to the official Dopamine `train` on the GPU
#    (JAX's CUDA build is on the image; gin-config and dopamine-rl come as wheels), same loss and gradients, wall ms
#    per update of each; GPU_CHECK_OFFICIAL=0 skips it.
# Every step runs under `timeout -k`; the limits add up to under 6.5 minutes, 5 without step 5
# (tests/test_gpu_check.py), so that a 15-minute device lease (about 1.5 minutes of start) leaves room for a rerun.
# Each step's results reach OUT when it ends and OUT/summary.md is rebuilt after each step: a step that times out
# loses only its own results. At most 8 files come back from a device run: OUT holds 7 (machine.txt, test_cuda.txt,
# env_speed.txt, real_runs.txt, steps.md, summary.md, runs.tar.gz; perf --official's table is in summary.md, its
# JSON in runs.tar.gz).
set -uo pipefail
cd "$(dirname "$0")/.."

commit() {  # the commit checked: from git here; from GPU_CHECK_COMMIT there, where .git does not travel
    if [ -e .git ] && git rev-parse -q --verify HEAD >/dev/null 2>&1; then
        git log -1 --format='commit %H %s'
        git status --short --untracked-files=no | head -20 | sed 's/^/  not committed:/'
    elif [ -f GPU_CHECK_COMMIT ]; then
        cat GPU_CHECK_COMMIT
    else
        echo "commit unknown: no .git and no GPU_CHECK_COMMIT (run 'bash benchmark/gpu_check.sh --prepare' before)"
    fi
}
if [ "${1:-}" = --prepare ]; then  # GPU_CHECK_COMMIT is not git-ignored: it travels with the working tree
    { commit; echo "prepared $(date -u '+%F %T') UTC"; } > GPU_CHECK_COMMIT.tmp && mv GPU_CHECK_COMMIT.tmp GPU_CHECK_COMMIT
    cat GPU_CHECK_COMMIT
    exit 0
fi

OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
WORK=$(mktemp -d /tmp/gpu_check.XXXX)  # the runs' folders; their logs go to OUT as one tarball
DRY=${GPU_CHECK_DRY:-0}
X=$([ "$DRY" = 1 ] && echo 5 || echo 1)  # the limits are sized for the GPU; a CPU takes longer
export PYTHONUNBUFFERED=1
rm -f "$OUT"/*.txt "$OUT"/*.md "$OUT/runs.tar.gz"
echo "| step | outcome | seconds |" > "$OUT/steps.md"
echo "|---|---|---|" >> "$OUT/steps.md"

summarize() {  # OUT/summary.md from whatever the steps have written so far; the runs' logs as OUT/runs.tar.gz
    { echo "# GPU check"; echo; echo '```'; cat "$OUT/machine.txt" 2>/dev/null; echo '```'; echo
      echo "## Steps"; echo; cat "$OUT/steps.md"; echo
      echo "## 1. tests/test_cuda.py"; echo; echo '```'; tail -5 "$OUT/test_cuda.txt" 2>/dev/null; echo '```'; echo
      echo "## 2. Environment"; echo; cat "$OUT/env_speed.txt" 2>/dev/null; echo
      echo "## 3. Real runs"; echo; echo '```'; cat "$OUT/real_runs.txt" 2>/dev/null; echo '```'; echo
      echo "## 4. Eager and --cuda-graphs"; echo
      n=1; for perf in "$WORK"/perf_*/perf.md; do [ -f "$perf" ] && grep '^|' "$perf" | tail -n +$n && n=3; done
      echo; echo "## 5. perf --official"; echo; cat "$WORK/perf_official/perf-official.md" 2>/dev/null
      echo; echo "## Learning SPS as a fraction of the env-bound limit 1/t_env"; echo
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
    } > "$OUT/summary.md.tmp" && mv "$OUT/summary.md.tmp" "$OUT/summary.md"
    tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.npz' --exclude='state.pt' --exclude='*.cleanrl_model' . \
        2>/dev/null
}
ran() {  # STEP EXIT_CODE: a row of OUT/steps.md (with the seconds since the last row), then the summary
    local outcome="exit code $2"
    [ "$2" = 0 ] && outcome=ok
    { [ "$2" = 124 ] || [ "$2" = 137 ]; } && outcome="TIMED OUT"
    echo "| $1 | $outcome | $SECONDS |" >> "$OUT/steps.md"
    SECONDS=0
    summarize
}

# 0. the wheels that a bare GPU machine lacks, and the machine
SECONDS=0
if [ -d .whl ] && ! timeout -k 2 $((5 * X)) python3 -c "import gymnasium, ale_py, tyro, gin, dopamine" 2>/dev/null; then
    timeout -k 2 $((15 * X)) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "gpu_check: the wheels in .whl/ did not install"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{ date -u; commit; timeout -k 2 5 nvidia-smi 2>&1 | head -15
  timeout -k 2 $((15 * X)) python3 -c "import gymnasium, ale_py, tyro, torch; print('torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } \
    > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
grep -q '^torch ' "$OUT/machine.txt" || { echo "gpu_check: a package is missing: run benchmark/gpu_wheels.sh here first"
                                          exit 1; }
ran "0. machine.txt" 0

# 1. graphed against eager
timeout -k 5 $((40 * X)) python3 -m pytest -q -p no:cacheprovider -n 0 tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
ran "1. tests/test_cuda.py" "${PIPESTATUS[0]}"

# 2. the environment's own speed: 1/t_env bounds every script's SPS
ENV_STEPS=$([ "$DRY" = 1 ] && echo 500 || echo 5000)
timeout -k 2 $((8 * X)) python3 - "$ENV_STEPS" "$WORK/t_env" <<'EOF' 2>&1 | tee "$OUT/env_speed.txt"
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
print(f"t_env {t_env * 1e3:.3f} ms per agent step (Breakout, sticky actions, frame skip 4): "
      f"env-bound limit {1 / t_env:,.0f} SPS")
open(sys.argv[2], "w").write(repr(t_env))
EOF
ran "2. environment speed" "${PIPESTATUS[0]}"

# 3. what a real run does: graphs, statistics, checkpoint, SIGTERM, --resume, evaluation (the scripts side by side)
timeout -k 5 $((60 * X)) python3 benchmark/gpu_real_runs.py "$OUT/real_runs.txt" "$WORK" $([ "$DRY" = 1 ] && echo --dry)
ran "3. real runs" $?

# 4. eager and graphed, each script's default network; budgets for about 8 s of running after a start-up of about
#    5 s on an H100 (the DQN scripts run their acting forward pass at every learning step); on the dry run, tiny
#    networks and budgets
budget() {  # SCRIPT -> perf's flags
    if [ "$DRY" = 1 ]; then echo "--steps 130 --learning-starts 100 --log-frequency 10 --buffer-size 1000"; return; fi
    case $1 in
        dqn_softmoe|dqn_redo) echo "--steps 2000 --learning-starts 1000 --log-frequency 200 --buffer-size 100000" ;;
        rainbow_tokenized) echo "--steps 1800 --learning-starts 1000 --log-frequency 160 --buffer-size 100000" ;;
        der_single_expert) echo "--steps 1300 --learning-starts 1000 --log-frequency 60 --buffer-size 100000" ;;
    esac
}
tiny() {  # SCRIPT -> the dry run's tiny network (tests/test_runs.py), after the script in perf's --variant
    [ "$DRY" = 1 ] || return 0
    case $1 in
        dqn_softmoe) echo "--num-experts 2 --expert-hidden-units 16 --batch-size 8" ;;
        dqn_redo) echo "--batch-size 8" ;;
        rainbow_tokenized) echo "--encoder nature --num-experts 2 --expert-hidden-units 16 --batch-size 8" ;;
        der_single_expert) echo "--encoder der --batch-size 8" ;;
    esac
}
for script in dqn_softmoe dqn_redo rainbow_tokenized der_single_expert; do  # one measurement at a time
    # shellcheck disable=SC2046
    timeout -k 2 $((13 * X)) ./benchmark.sh perf --variant "${script}_eager $script $(tiny "$script")" \
        $(budget "$script") --out "$WORK/perf_${script}_eager" > "$WORK/perf_${script}_eager.txt" 2>&1
    ran "4. $script eager" $?
    # shellcheck disable=SC2046
    timeout -k 2 $((13 * X)) ./benchmark.sh perf --variant "${script}_graphs $script --cuda-graphs $(tiny "$script")" \
        $(budget "$script") --out "$WORK/perf_${script}_graphs" > "$WORK/perf_${script}_graphs.txt" 2>&1
    ran "4. $script --cuda-graphs" $?
done

# 5. the update next to the official one (a GPU is used where torch and JAX both see one); the table is rewritten
#    after each configuration, so that a timeout keeps the ones done
if [ "${GPU_CHECK_OFFICIAL:-1}" = 1 ]; then
    official=(--rounds 5 --updates 5)
    [ "$DRY" = 1 ] && official=(--official-configs "dqn_softmoe SoftMoE-8" --rounds 1 --updates 1 --batch-size 2)
    timeout -k 5 $((85 * X)) ./benchmark.sh perf --official "${official[@]}" --out "$WORK/perf_official" \
        > "$WORK/perf_official.txt" 2>&1
    ran "5. perf --official" $?
fi

cat "$OUT/summary.md"
echo "gpu_check: results in $OUT (summary.md, steps.md, machine.txt, test_cuda.txt, env_speed.txt, real_runs.txt," \
     "runs.tar.gz)"
