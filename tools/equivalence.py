"""Bit-identity of the scripts' numbers across a change of their code: every script runs its defaults and every knob
configuration of the suites (plus the knobs no suite names) at a tiny budget on the real ALE, and what a run learned -
the final parameters of both networks, Adam's state and every logged scalar - is reduced to hashes that do not depend
on parameter names or their order. tests/fixtures/equivalence.json holds those of the scripts before the minimal
layout (commit 31ca6d2); tests/test_equivalence.py runs the same configurations on today's scripts and compares.

    python tools/equivalence.py record               # rewrite the fixture from the scripts in cleanrl_moe/
    python tools/equivalence.py check [NAME]          # compare today's scripts with the fixture (all or matching)

Each run is a fork of one process that has imported torch once, so a configuration costs its own run only."""
import hashlib
import json
import os
import runpy
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(os.environ.get("CLEANRL_MOE_SCRIPTS", ROOT / "cleanrl_moe"))
FIXTURE = ROOT / "tests" / "fixtures" / "equivalence.json"

# 60 agent steps of learning after a 100-step warm-up, a tiny memory, batches of 8, a target copy every 40 steps,
# losses logged every 20 steps, one statistics probe, and a checkpoint at the end (which holds what is compared)
COMMON = ["--total-timesteps", "160", "--learning-starts", "100", "--buffer-size", "400", "--batch-size", "8",
          "--target-network-frequency", "40", "--log-frequency", "20", "--stats-frequency", "150",
          "--stats-batch-size", "16", "--checkpoint-every", "160", "--max-episode-steps", "60"]
TINY = {
    "dqn_softmoe": COMMON,
    "dqn_redo": [*COMMON, "--redo-period", "5", "--redo-batch-size", "16"],
    "rainbow_tokenized": COMMON,
    "der_single_expert": [*COMMON, "--total-timesteps", "130", "--checkpoint-every", "130", "--stats-frequency", "120",
                          "--eval-episodes", "2"],
}
# the defaults, every variant of the suites (benchmark/suites/*.toml), and the knobs that no suite sets
CONFIGS = {
    "dqn_softmoe": {
        "defaults": "",
        "dqn": "--moe-type baseline --num-experts 1",
        "dqn_scaled8": "--moe-type baseline --num-experts 8",
        "top1moe8": "--moe-type top1 --num-experts 8",
        "softmoe8_random_phi": "--use-random-phi",
        "top2moe8": "--moe-type top1 --num-selected-experts 2",
        "top1moe8_balanced": "--moe-type top1 --noisy-routing --aux-loss-fns importance_loss load_loss",
        "sem_v1": "--moe-type simplicial_embedding_v1",
        "sem_v2": "--moe-type simplicial_embedding_v2",
        "softmoe8_extra_layer": "--use-extra-linear-layer",
        "impala": "--encoder impala",
        "impala_big": "--encoder impala --expert-type big --capacity-factor 0.05",
        "softmoe_aux": "--aux-loss-fns naive_entropy importance_loss --entropy-weight 0.3",
        "shrink_perturb": "--expert-reset shrink_perturb --expert-reset-period 4",
        "reset": "--expert-reset reset --expert-reset-period 6",
        "shuffled": "--shuffle-tokens",
        "perpatch_normalized": "--tokenization perpatch --moe-normalization",
        "perfeat": "--tokenization perfeat",
        "slots_10pct": "--capacity-factor 0.1",
    },
    "dqn_redo": {
        "defaults": "",
        "dqn_rr0.25": "--replay-ratio 0.25 --no-redo",
        "redo_rr0.25": "--replay-ratio 0.25 --redo --redo-tau 0.025",
        "dqn_rr1": "--replay-ratio 1 --no-redo",
        "redo_rr1": "--replay-ratio 1 --redo --redo-tau 0.1",
        "redo_rr2": "--replay-ratio 2 --redo --redo-tau 0.1",
        "redo_adam_step": "--redo --redo-reset-adam-step",
    },
    "rainbow_tokenized": {
        "defaults": "",
        "single_expert": "--moe-type softmoe --num-experts 1 --expert-hidden-units 2048",
        "baseline": "--moe-type baseline --num-experts 1",
        "baseline_scaled4": "--moe-type baseline --num-experts 4",
        "softmoe4_perfeat": "--tokenization perfeat",
        "softmoe4_perpatch": "--tokenization perpatch",
        "softmoe4_shuffled": "--shuffle-tokens",
        "softmoe4_slots_10pct": "--capacity-factor 0.1",
        "softmoe4_one_slot": "--capacity-factor 0.01",
        "softmoe4_reset": "--expert-reset reset --expert-reset-period 6",
        "softmoe4_shrink_perturb": "--expert-reset shrink_perturb --expert-reset-period 4",
        "softmoe4_big": "--expert-type big --capacity-factor 0.05",
        "top1_balanced": "--moe-type top1 --noisy-routing --aux-loss-fns importance_loss load_loss",
        "random_phi_extra_layer": "--use-random-phi --use-extra-linear-layer",
        "sem_v2": "--moe-type simplicial_embedding_v2",
        "redo": "--redo --redo-period 5 --redo-batch-size 16",
        "nature": "--encoder nature",
    },
    "der_single_expert": {
        "defaults": "",
        "der_vh2019": "--encoder der --n-step 20 --max-grad-norm 10 --priority-beta-start 0.4 --priority-beta-end 1.0",
        "softmoe4": "--num-experts 4 --expert-hidden-units 512",
        "baseline": "--moe-type baseline --num-experts 1 --expert-hidden-units 512",
        "baseline_redo": "--moe-type baseline --num-experts 1 --expert-hidden-units 512 --redo --redo-period 5 "
                         "--redo-tau 0.1 --redo-batch-size 16",
        "single_expert_redo": "--redo --redo-period 5 --redo-tau 0.1 --redo-batch-size 16",
        "top1_aux": "--moe-type top1 --num-experts 4 --expert-hidden-units 64 --aux-loss-fns naive_entropy",
        "shrink_perturb": "--expert-reset shrink_perturb --expert-reset-period 7",
    },
}
SKIPPED_TAGS = ("charts/SPS",)  # wall-clock speed


def digest(tensor):
    import torch

    tensor = tensor.detach().cpu().contiguous()
    data = tensor.view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8)
    return f"{tuple(tensor.shape)}:{tensor.dtype}:{hashlib.sha256(data.numpy().tobytes()).hexdigest()[:24]}"


def fingerprint(run_dir):
    """What a finished run learned, independent of parameter names and order: sorted digests of each network's tensors
    and of Adam's state, and every logged scalar (speed aside) as exact floats."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state = torch.load(Path(run_dir) / "checkpoint" / "state.pt", weights_only=True)
    out = {name: sorted(map(digest, state[name].values())) for name in ("q_network", "target_network")}
    out["adam"] = sorted(digest(v) for s in state["optimizer"]["state"].values() for v in s.values()
                         if torch.is_tensor(v))
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out["scalars"] = {tag: [(e.step, e.value.hex()) for e in acc.Scalars(tag)]
                      for tag in sorted(acc.Tags()["scalars"]) if tag not in SKIPPED_TAGS}
    return out


def compact(fingerprint):
    """The fixture's form of a fingerprint: a digest of each part (networks, Adam's state, scalars)."""
    fingerprint = json.loads(json.dumps(fingerprint))  # tuples as JSON lists, as read back from the fixture
    return {key: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]
            for key, value in fingerprint.items()}


def run_config(script, flags):
    """Run `script` with `flags` in a forked child (CPU, one thread) in a fresh directory; its fingerprint."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        pid = os.fork()
        if pid == 0:  # the child: run the script's main block as `python script.py flags` would
            code = 1
            try:
                os.chdir(tmp)
                fd = os.open(os.devnull, os.O_WRONLY)
                os.dup2(fd, 1)
                torch.set_num_threads(1)
                sys.argv = [str(SCRIPTS / f"{script}.py"), *flags]
                runpy.run_path(sys.argv[0], run_name="__main__")
                code = 0
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{script} {' '.join(flags)} exited with {os.waitstatus_to_exitcode(status)}")
        (run_dir,) = [p for p in (Path(tmp) / "runs").iterdir() if p.is_dir()]
        return fingerprint(run_dir)


def expected(script, name):
    """The fixture's fingerprint of `script` in configuration `name`."""
    return json.loads(FIXTURE.read_text())[script][name]


def flags_of(script, name):
    return [*TINY[script], *CONFIGS[script][name].split(), "--no-cuda"]


def main(command="check", pattern=""):
    # AVX2 kernels, as tests/conftest.py holds them: the fixture was recorded on an AVX2 machine, and AVX-512 kernels
    # round float32 sums differently
    os.environ.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", MKL_CBWR="AVX2",
                      ONEDNN_MAX_CPU_ISA="AVX2")
    import torch

    torch.set_num_threads(1)
    os.environ.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    fixture = json.loads(FIXTURE.read_text()) if FIXTURE.exists() else {}
    failed = []
    for script, configs in CONFIGS.items():
        for name in configs:
            if pattern not in f"{script}/{name}":
                continue
            start = time.time()
            got = compact(run_config(script, flags_of(script, name)))
            if command == "record":
                fixture.setdefault(script, {})[name] = got
                FIXTURE.parent.mkdir(exist_ok=True)
                FIXTURE.write_text(json.dumps(fixture, indent=1, sort_keys=True) + "\n")
                print(f"recorded {script}/{name} in {time.time() - start:.1f} s", flush=True)
            else:
                same = fixture[script][name] == got
                print(f"{'same    ' if same else 'DIFFERS '} {script}/{name}", flush=True)
                failed += [] if same else [f"{script}/{name}"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
