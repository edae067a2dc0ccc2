"""Evaluate one saved `der_single_expert.py` network under several evaluation policies, side by side: a `--save-model`
file, or a checkpoint's state.pt (`benchmark.sh` keeps a finished run's as `runs/<run>/final_state.pt`).

    python benchmark/probe_eval.py runs/<run>/der_single_expert.cleanrl_model
    python benchmark/probe_eval.py runs/benchmark/<suite>/<variant>/<game>/seed1/runs/<run>/final_state.pt
    python benchmark/probe_eval.py MODEL --episodes 30 --policies protocol noisy --out probe.json

Made for issue 28's question: when a run's evaluation score (noise off, epsilon 0.001, the Atari 100k protocol) is far
below its training return (noise on), is the evaluation wrong, or is the mean-weight policy of that network worse than
its noisy one? Each policy plays the same episodes (episode i: environment seed and no-op count of the run's own
evaluation, `seed + 1000 + i`) through the script's own `evaluate`:

- `protocol`: the run's evaluation as it is (noise off, --eval-epsilon of the run). With the run's model it must give
  back the run's `eval_returns` exactly, which checks that the model and the evaluation are the ones the run used.
- `eps0.01`, `eps0.05`, `eps0.1`: noise off, epsilon-greedy with that epsilon.
- `noisy`: noise on and epsilon 0, a fresh noise sample before every action, as the training loop acts (one episode
  at a time, so that no two episodes share a sample).
- `noisy_fixed`: noise on, one noise sample per episode, kept for the whole episode.

For each policy it prints the mean, median, min and max score, the mean episode length and how often each action is
taken, and writes them as JSON with --out.
"""
import argparse
import contextlib
import io
import importlib.util
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EPSILON_POLICIES = {"eps0.01": 0.01, "eps0.05": 0.05, "eps0.1": 0.1}
POLICIES = ["protocol", *EPSILON_POLICIES, "noisy", "noisy_fixed"]


def load_script(name="der_single_expert"):
    spec = importlib.util.spec_from_file_location(f"probe_{name}", ROOT / "cleanrl_moe" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CountingPolicy(torch.nn.Module):
    """The network as `evaluate` sees it, counting the greedy actions and the steps it is asked for. With `noise`
    "step" it keeps the noisy layers on in eval mode and draws a fresh noise sample before every forward; with
    "episode" it draws one when `new_episode` is called. `evaluate` must then run one episode at a time."""

    def __init__(self, m, net, noise=None, seed=0):
        super().__init__()
        self.m, self.net, self.noise, self.num_actions = m, net, noise, net.num_actions
        self.generator = torch.Generator().manual_seed(seed)
        self.counts = np.zeros(net.num_actions, dtype=np.int64)

    def train(self, mode=True):
        self.training = mode
        self.net.train(mode or self.noise is not None)  # noise on: the noisy layers read `training`
        return self

    def new_episode(self):
        self.m.resample_noise(self.net, self.generator)

    def forward(self, states):
        if self.noise == "step":
            self.m.resample_noise(self.net, self.generator)
        out = self.net(states)
        self.counts += np.bincount(out[1].argmax(1).numpy(), minlength=self.num_actions)
        return out


def play(m, policy, args, episodes, seed, noise):
    """{episode: score} of `episodes` evaluation episodes of `policy`; noise on: one episode at a time, so that no two
    episodes share a noise sample."""
    if not noise:
        return m.evaluate(policy, args, episodes, "cpu", seed)
    scores = {}
    for i in range(episodes):
        if noise == "episode":
            policy.new_episode()
        scores = m.evaluate(policy, args, i + 1, "cpu", seed, scores=scores, parallel=1)
    return scores


def probe(m, model_path, policies, episodes, noop_max=None):
    """{policy: its scores and action shares} for the saved model (a `--save-model` file or a checkpoint's state.pt,
    whose online network it takes); `noop_max` replaces the run's --noop-max."""
    saved = torch.load(model_path, weights_only=True)
    if "q_network" in saved:  # a checkpoint
        saved = {"model": saved["q_network"], "args": saved["args"]}
    args = SimpleNamespace(**saved["args"])
    if "noop_max" not in saved["args"]:  # saved before --noop-max: training had no no-ops, evaluation 1-30 frames
        raise SystemExit(f"{model_path}: saved by a der_single_expert.py older than --noop-max; probe it with "
                         f"benchmark/probe_eval.py of commit c62ff5f")
    env = m.make_env(args.env_id, args.seed)
    num_actions = env.action_space.n
    env.close()
    net = m.make_network(num_actions, **m.network_flags(args))
    net.load_state_dict(saved["model"])
    net.eval()
    seed = args.seed + 1000  # the run's evaluation seed (the main block's `evaluate` call)
    results = {}
    for name in policies:
        start = time.time()
        run_args = SimpleNamespace(**vars(args))
        if noop_max is not None:
            run_args.noop_max = noop_max
        noise = {"noisy": "step", "noisy_fixed": "episode"}.get(name)
        if name in EPSILON_POLICIES:
            run_args.eval_epsilon = EPSILON_POLICIES[name]
        elif noise:
            run_args.eval_epsilon = 0.0
        policy = CountingPolicy(m, net, noise, seed=args.seed)
        with contextlib.redirect_stdout(io.StringIO()):  # evaluate's per-episode progress lines
            scores = play(m, policy, run_args, episodes, seed, noise)
        returns = np.array([scores[i] for i in range(episodes)])
        results[name] = {
            "epsilon": run_args.eval_epsilon, "noise": noise or "off", "returns": returns.tolist(),
            "mean": float(returns.mean()), "median": float(np.median(returns)), "min": float(returns.min()),
            "max": float(returns.max()), "mean_length": float(policy.counts.sum() / episodes),
            "greedy_action_share": (policy.counts / policy.counts.sum()).round(4).tolist(),
            "seconds": round(time.time() - start, 1)}
        results[name]["noop_max"] = run_args.noop_max
        print(f"{name:12s} mean {returns.mean():8.1f} | median {np.median(returns):7.1f} | min {returns.min():7.1f} | "
              f"max {returns.max():7.1f} | steps/episode {results[name]['mean_length']:7.1f} | greedy actions "
              f"{' '.join(f'{s:.2f}' for s in results[name]['greedy_action_share'])}", flush=True)
    return args, results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a `--save-model` file of der_single_expert.py, or a checkpoint's state.pt")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES)
    parser.add_argument("--noop-max", type=int, help="no-op starts of every policy (default: the run's --noop-max; 0: "
                        "none)")
    parser.add_argument("--out", help="write the results as JSON here")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    args, results = probe(load_script(), opts.model, opts.policies, opts.episodes, opts.noop_max)
    result_json = Path(opts.model).with_name("result.json")
    if "protocol" in results and result_json.exists() and opts.noop_max in (None, args.noop_max):
        logged = json.loads(result_json.read_text())["eval_returns"][:opts.episodes]
        same = results["protocol"]["returns"] == logged
        print(f"protocol against the run's result.json: {'identical' if same else 'DIFFERENT'}")
        results["protocol"]["matches_run"] = same
    if opts.out:
        Path(opts.out).write_text(json.dumps({"model": opts.model, "env_id": args.env_id, "seed": args.seed,
                                              "episodes": opts.episodes, "policies": results}, indent=1))


if __name__ == "__main__":
    main()
