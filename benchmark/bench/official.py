"""`perf --official`: one update of a script next to the official Dopamine training step on the same network, the same
weights and the same replay batch. For each configuration:

- the script's network (every weight perturbed, float32) and its official Flax module, the weights copied in by the
  mappings of tests/official (`official_params` of test_official_dqn_softmoe.py and test_official_rainbow_der.py);
- the same batch on both sides: uint8 frame stacks, actions, (n-step) rewards, terminals, and for Rainbow the
  importance weights and the n-step discount gamma^n (0 after a termination), as the official `train` takes them;
- a check: one update of the script (`update` of the script, fed the batch by a stand-in replay memory) and one of the
  official jitted `train` (dopamine/labs/moes/agents/dqn_moe_agent.py, full_rainbow_moe_agent.py,
  rainbow_100k_moe_agent.py) give the same loss (<= 1e-5 relative) and the same gradients (per parameter tensor,
  <= 1e-4 x its largest official gradient; the official gradients read off Adam's first moment), float32; the
  largest difference of the parameter updates is reported in learning rates. The Rainbow noise is off on both sides
  for this check (the script's `set_noise`, the official NoisyNetwork drawing zeros): the two sides draw their noise
  differently (tests/official/test_official_rainbow_der.py);
- timing: the CPU time (time.process_time) per update of each side, interleaved, on one thread (torch one thread,
  XLA with `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`), noise on, the official `train` as
  its agent calls it (its statistics flags at the agent's defaults, or the closest that run where those crash).
- on a GPU (where torch and JAX both see one, unless --cpu): the script's network, batch and update on cuda:0 and
  the official `train` on JAX's GPU; the wall time per update, each update waited for (the loss read back, as
  `update`'s caller does at a log step; `block_until_ready` on the official side). The check runs with TF32 off on
  both sides (torch's cuDNN and JAX's default matmul precision at "highest"), as float32 on the CPU; the timing at
  each side's default precision, what a user of each gets (torch: TF32 in cuDNN convolutions, not in matmuls; JAX:
  TF32 in both). benchmark/gpu_check.sh runs it.

Needs the `official` extra and dopamine-rl (see tests/official/conftest.py) and pytest (the stand-ins of that conftest
are reused)."""
import contextlib
import copy
import datetime
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
ONE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
NUM_ACTIONS = 18
LOSS_RTOL = 1e-5  # |loss ours - loss official| / |loss official|
GRAD_RTOL = 1e-4  # per parameter tensor: max |gradient ours - official| / max |gradient official|
# the same two measures with both sides in float64, where float32 rounding decides a max-pool pick or a ReLU mask
# differently on the two sides (a flip moves a conv gradient by up to ~4e-3): DQN agrees to ~1e-14 in float64; Rainbow
# to ~6e-7 (a residual in the C51 target whose source is not traced), both far below what a wrong loss, target or
# mapping gives (O(1))
FLOAT64_RTOL = 1e-5

# name: (script, test module, its configuration, the official agent module)
CONFIGS = {
    "dqn_softmoe SoftMoE-8": ("dqn_softmoe", "test_official_dqn_softmoe", "softmoe8-perconv", "dqn_moe_agent"),
    "dqn_softmoe --moe-type baseline": ("dqn_softmoe", "test_official_dqn_softmoe", "baseline-8-scaled",
                                        "dqn_moe_agent"),
    "rainbow_tokenized defaults": ("rainbow_tokenized", "test_official_rainbow_der",
                                   "rainbow_tokenized defaults (Impala, SoftMoE-4)", "full_rainbow_moe_agent"),
    "der_single_expert defaults": ("der_single_expert", "test_official_rainbow_der",
                                   "der_single_expert defaults (Nature CNN, SoftMoE-1 x2048)",
                                   "rainbow_100k_moe_agent"),
    "der_single_expert --encoder der": ("der_single_expert", None, None, "rainbow_100k_moe_agent"),
}
STATIC = {"dqn_moe_agent": ("network_def", "optimizer", "cumulative_gamma", "log_moe_statistics",
                            "log_dormant_statistics", "loss_type"),
          "full_rainbow_moe_agent": ("network_def", "optimizer", "cumulative_gamma", "double_dqn", "distributional",
                                     "mse_loss", "log_moe_statistics", "log_network_statistics"),
          "rainbow_100k_moe_agent": ("network_def", "optimizer", "cumulative_gamma", "double_dqn", "distributional",
                                     "mse_loss", "log_moe_statistics")}
# the statistics flags of `train` at the agents' defaults (DQNMoEAgent: True, True; the Rainbow MoE agents: False)
AGENT_FLAGS = {"dqn_moe_agent": (True, True), "full_rainbow_moe_agent": (False, False),
               "rainbow_100k_moe_agent": (False,)}


def setup():
    """jax on one thread, the official modules imported with the stand-ins of tests/official/conftest.py (plus snappy,
    which dopamine's replay memory imports), tests/ on sys.path. Returns a namespace of the modules used."""
    if "jax" not in sys.modules:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {ONE_THREAD_XLA}".strip()
    for path in (TESTS, TESTS / "official"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import jax
    import torch

    torch.set_num_threads(1)
    jax.devices()  # the backend starts with the flags above (conftest's own flags come too late to change it)
    spec = importlib.util.spec_from_file_location("official_conftest", TESTS / "official" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    if conftest._reason is not None:
        raise SystemExit(f"perf --official: {conftest._reason}")
    conftest.STAND_INS = conftest.STAND_INS + ("snappy",)
    with conftest._stand_ins():
        import dopamine.jax.agents.dqn.dqn_agent as dqn_agent
        import dopamine.labs.moes.agents.dqn_moe_agent as dqn_moe_agent
        import dopamine.labs.moes.agents.full_rainbow_moe_agent as full_rainbow_moe_agent
        import dopamine.labs.moes.agents.rainbow_100k_moe_agent as rainbow_100k_moe_agent
    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)
    return dict(dqn_agent=dqn_agent, dqn_moe_agent=dqn_moe_agent, full_rainbow_moe_agent=full_rainbow_moe_agent,
                rainbow_100k_moe_agent=rainbow_100k_moe_agent)


OPTIMIZERS = {}


class StandInMemory:
    """Stands in for a script's replay memory: `update` gathers this batch whatever the indices."""

    def __init__(self, batch, device):
        self.batch, self.device = batch, device

    def get(self, index):
        return self.batch


class Pair:
    """A configuration's two sides: the script's network, target, optimizer and update; the official module, params,
    optimizer and the arguments of its `train`."""

    def __init__(self, mods, name, batch_size=32, seed=0, device="cpu"):
        import jax
        import torch
        from harness import build_network, load_script
        from official_mapping import frames, nhwc, perturb_

        script, test, config, agent = CONFIGS[name]
        self.name, self.agent, self.rainbow = name, mods[agent], agent != "dqn_moe_agent"
        m = self.m = load_script(script)
        if test is None:
            flags = {"encoder": "der"}
        else:
            flags = __import__(test).CONFIGS[config][1 if self.rainbow else 0]
        self.args = args = m.Args(**flags)
        torch.manual_seed(seed)
        self.net = perturb_(build_network(m, args, NUM_ACTIONS), seed=seed + 1).float()
        self.target = copy.deepcopy(self.net)
        self.initial = copy.deepcopy(self.net)  # the float32 weights both sides start from (for the float64 check)
        self.optimizer = m.make_optimizer(args, self.net)
        n = args.n_step if self.rainbow else 1
        rng = np.random.default_rng(seed)
        obs, next_obs = frames(batch_size, seed + 2), frames(batch_size, seed + 3)
        actions = rng.integers(0, NUM_ACTIONS, batch_size)
        terminals = (rng.random(batch_size) < 0.25).astype(np.float32)
        rewards = rng.integers(-1, 2, (batch_size, n)).astype(np.float64) @ (args.gamma ** np.arange(n))
        discount = args.gamma ** n
        self.batch = {"obs": obs, "actions": torch.from_numpy(actions).long(),
                      "returns": torch.from_numpy(rewards).float(),
                      "discounts": torch.from_numpy(np.where(terminals > 0, 0.0, discount)).float(),
                      "next_obs": next_obs}
        probabilities = rng.uniform(0.1, 1.0, batch_size)
        self.weights = (probabilities / probabilities.min()) ** -0.5  # Dopamine's 1/sqrt(p) / max
        hooks = m.research_knobs(args)
        self.extra_losses = getattr(hooks, "extra_losses", None)

        # the official side
        # one optax optimizer per setting: it is a static argument of the jitted `train`, hashed by identity, so that
        # a new one would compile `train` again
        key = (args.learning_rate, args.adam_eps)
        if key not in OPTIMIZERS:
            OPTIMIZERS[key] = mods["dqn_agent"].create_optimizer("adam", learning_rate=key[0], eps=key[1])
        self.optax = OPTIMIZERS[key]
        self.error = None
        x = np.zeros((84, 84, 4), np.uint8)
        if test is None:
            self.module, self.params, self.error = self.closest_der_module(x, args)
            self.note = ("no official network: FullRainbowMoENetwork without an MoE crashes; timed: "
                         "dopamine.jax.networks.FullRainbowNetwork (Nature CNN, noisy dueling 512), its own init")
        else:
            T = __import__(test)
            _, cls_or_flags, attributes = T.CONFIGS[config]
            if self.rainbow:
                self.support = self.net.support.numpy()
                self.module = T.moe_networks.FullRainbowMoENetwork(num_actions=NUM_ACTIONS, num_atoms=args.n_atoms,
                                                                   nn_scale=1, inputs_preprocessed=False, **attributes)
                shapes = jax.eval_shape(lambda: self.module.init(jax.random.PRNGKey(0), x, self.support,
                                                                 key=jax.random.PRNGKey(0)))
                self.params = T.official_params(self.net, attributes, shapes, np.float32)
            else:
                self.module = cls_or_flags(num_actions=NUM_ACTIONS, inputs_preprocessed=False, **attributes)
                shapes = jax.eval_shape(lambda: self.module.init(jax.random.PRNGKey(0), x, key=jax.random.PRNGKey(0)))
                self.params = T.official_params(self.net, flags, shapes, np.float32)
            self.map = lambda net, dtype=np.float32: (T.official_params(net, attributes, shapes, dtype)
                                                      if self.rainbow else T.official_params(net, flags, shapes, dtype))
            self.note = f"{type(self.module).__name__}, {self.agent.__name__.rsplit('.', 1)[-1]}.train"
        if self.rainbow and test is None:
            self.support = self.net.support.numpy()
        self.target_params = self.params
        self.opt_state = self.optax.init(self.params)
        self.states, self.next_states = nhwc(obs), nhwc(next_obs)
        self.actions, self.terminals = actions.astype(np.int32), terminals
        self.rewards, self.discount = rewards.astype(np.float32), discount
        self.flags = AGENT_FLAGS[agent]
        self.key = jax.random.PRNGKey(seed)

        # the script's side on its device (the official weights above were read off the CPU copy)
        self.device = torch.device(device)
        if self.device.type != "cpu":
            self.net, self.target = self.net.to(self.device), self.target.to(self.device)
            self.optimizer = m.make_optimizer(args, self.net)
            self.batch = {k: v.to(self.device) for k, v in self.batch.items()}
        self.weights_t = torch.from_numpy(self.weights).float().to(self.device)
        self.memory = StandInMemory(self.batch, self.device)
        self.index = torch.arange(batch_size, device=self.device)
        self.noise = torch.Generator(self.device).manual_seed(seed + 4)

    def closest_der_module(self, x, args):
        """The official Rainbow MoE network without an MoE (what --encoder der has none of) crashes; the closest that
        runs is Dopamine's non-MoE FullRainbowNetwork."""
        import jax
        from official_mapping import base_networks, moe_networks

        error = None
        try:
            moe_networks.FullRainbowMoENetwork(num_actions=NUM_ACTIONS, num_atoms=args.n_atoms, nn_scale=1,
                                               encoder_type="CNN", moe_type="BASELINE").init(
                jax.random.PRNGKey(0), x, self.net.support.numpy(), key=jax.random.PRNGKey(0))
        except Exception as e:  # noqa: BLE001
            error = f"FullRainbowMoENetwork(moe_type='BASELINE'): {type(e).__name__}: {e}"
        module = base_networks.FullRainbowNetwork(num_actions=NUM_ACTIONS, num_atoms=args.n_atoms)
        params = module.init(jax.random.PRNGKey(0), x, self.net.support.numpy(), key=jax.random.PRNGKey(0))
        return module, params, error

    def ours(self, check=False, net=None, target=None, optimizer=None, memory=None, weights=None, noise=None):
        """One update of the script (of its own network, or of those given); returns its loss (a float)."""
        m = self.m
        net = self.net if net is None else net  # (not `or`: a module that defines __len__ can be falsy)
        target = self.target if target is None else target
        optimizer = self.optimizer if optimizer is None else optimizer
        memory = self.memory if memory is None else memory
        extra = {"extra_losses": self.extra_losses} if self.extra_losses else {}
        if self.rainbow:
            if check:
                m.set_noise(net, False)
                m.set_noise(target, False)
            weights = self.weights_t if weights is None else weights
            noise = self.noise if noise is None else noise
            out = m.update(net, target, optimizer, memory, self.index.to(memory.device), weights, noise,
                           self.args.max_grad_norm, **extra)
        else:
            out = m.update(net, target, optimizer, memory, self.index.to(memory.device), **extra)
        return float(out["td_loss"])

    def train_args(self, flags):
        if self.rainbow:
            return (self.module, self.params, self.target_params, self.optax, self.opt_state, self.states, self.actions,
                    self.next_states, self.rewards, self.terminals, self.weights.astype(np.float32), self.support,
                    self.discount, True, True, False, self.key, *flags)
        return (self.module, self.params, self.target_params, self.optax, self.opt_state, self.states, self.actions,
                self.next_states, self.rewards, self.terminals, self.discount, self.key, *flags)

    def official(self, train=None, flags=None):
        """One official update (the agent's jitted `train`, or `train`); returns its loss (a float)."""
        import jax

        out = (train or self.agent.train)(*self.train_args(self.flags if flags is None else flags))
        jax.block_until_ready(out["online_params"])
        self.params, self.opt_state, self.key = out["online_params"], out["optimizer_state"], out["rng"]
        return float(out["mean_td_loss" if self.rainbow else "td_loss"])


def zero_noise():
    """The official NoisyNetwork drawing zeros (so no noise), for the check."""
    import jax.numpy as jnp
    from official_mapping import base_networks

    @contextlib.contextmanager
    def patched():
        original = base_networks.NoisyNetwork.sample_noise
        base_networks.NoisyNetwork.sample_noise = staticmethod(lambda key, shape: jnp.zeros(shape))
        try:
            yield
        finally:
            base_networks.NoisyNetwork.sample_noise = staticmethod(original)

    return patched()


CHECK_TRAIN = {}


def check_train(pair):
    """A separate jit of the official `train` for the checks (one per agent, so that its compilations are cached)."""
    import jax

    agent = pair.agent.__name__.rsplit(".", 1)[-1]
    if agent not in CHECK_TRAIN:
        CHECK_TRAIN[agent] = jax.jit(pair.agent.train.__wrapped__, static_argnames=STATIC[agent])
    return CHECK_TRAIN[agent]


def gradients_as_network(net):
    """A copy of `net` whose parameters are its gradients (zeros where it has none: sigma with the noise off), so that
    the weight mapping turns them into official paths."""
    import torch

    grads = copy.deepcopy(net)
    with torch.no_grad():
        for p, q in zip(net.parameters(), grads.parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return grads


def _cpu(net):
    return copy.deepcopy(net).cpu()


@contextlib.contextmanager
def full_float32():
    """TF32 off on both sides (on a GPU; a no-op on the CPU): torch's cuDNN convolutions and JAX's matmuls and
    convolutions in full float32."""
    import jax
    import torch

    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def check(pair):
    """One update on each side from the same weights and batch: the losses, the gradients (the script's `.grad`; the
    official ones read off Adam's first moment after its first step, mu = (1 - b1) g) and the parameter updates. A
    separate jit of the official `train` (noise drawn as zeros) keeps the timed one untouched."""
    import torch

    initial = pair.params
    before = {k: np.asarray(v) for k, v in _flat(pair.params).items()}
    train = check_train(pair)
    with full_float32():
        with zero_noise():
            loss_official = pair.official(train, flags=tuple(False for _ in pair.flags))  # no statistics
        loss_ours = pair.ours(check=True)
    lr = pair.args.learning_rate
    ours, official = _flat(pair.map(_cpu(pair.net))), _flat(pair.params)
    ours_grad = _flat(pair.map(_cpu(gradients_as_network(pair.net))))
    official_grad = _flat({"params": pair.opt_state[0].mu["params"]})
    grad_rel, grad_where, update, update_where = 0.0, "", 0.0, ""
    for path, value in official.items():
        if path == "SoftMoE_0/scalar":  # unused without normalization, not a script parameter (the mapping's filler)
            continue
        g = np.asarray(official_grad[path]) / (1 - 0.9)  # optax.adam's default b1, Dopamine's beta1
        scale = np.abs(g).max()
        diff = np.abs(np.asarray(ours_grad[path]) - g).max()
        rel = diff / scale if scale > 0 else (np.inf if diff > 0 else 0.0)
        if rel > grad_rel:
            grad_rel, grad_where = float(rel), path
        diff = np.abs((np.asarray(ours[path]) - before[path]) - (np.asarray(value) - before[path])).max() / lr
        if diff > update:
            update, update_where = float(diff), path
    moved = max(np.abs(np.asarray(v) - before[p]).max() for p, v in official.items()) / lr
    rel = abs(loss_ours - loss_official) / abs(loss_official)
    result = {"loss_ours": loss_ours, "loss_official": loss_official, "loss_rel": rel, "grad_rel": grad_rel,
              "worst_grad": grad_where, "update_diff_over_lr": update, "worst_update": update_where,
              "largest_update_over_lr": float(moved)}
    grads_agree = grad_rel <= GRAD_RTOL
    if not grads_agree:
        # float32 rounding can decide a max-pool's pick or a ReLU's mask differently on the two sides (ties a few ulps
        # apart), which moves a conv gradient by up to ~1e-3 of its largest: the same update with both sides in
        # float64 settles whether the two compute the same function
        with full_float32():
            loss64_official, official64 = official_float64_gradients(pair, initial, train)
        loss64_ours, ours64 = ours_float64_gradients(pair)
        result["grad_rel_to_official_float64"] = max(_rel(ours_grad[k], g) for k, g in official64.items())
        result["official_float32_vs_float64"] = max(_rel(np.asarray(official_grad[k]) / (1 - 0.9), g)
                                                    for k, g in official64.items())
        result["float64_loss_rel"] = abs(loss64_ours - loss64_official) / abs(loss64_official)
        result["float64_grad_rel"] = max(_rel(ours64[k], g) for k, g in official64.items())
        grads_agree = result["float64_loss_rel"] <= FLOAT64_RTOL and result["float64_grad_rel"] <= FLOAT64_RTOL
    result["passed"] = bool(rel <= LOSS_RTOL and grads_agree and moved > 0.5)
    return result


def _rel(ours, reference):
    scale = np.abs(reference).max()
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / scale) if scale > 0 else 0.0


def official_float64_gradients(pair, initial, train):
    """The official loss and gradients of the same update in float64 (JAX's x64 mode; the same weights, batch and zero
    noise): (loss, {path: gradient}), without SoftMoE's unused scalar."""
    import jax
    import jax.numpy as jnp
    from official_mapping import x64

    with x64(True):
        cast = lambda tree: jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), np.float64), tree)  # noqa
        pair.params = pair.target_params = cast(initial)
        pair.opt_state = pair.optax.init(pair.params)
        pair.weights, pair.rewards = pair.weights.astype(np.float64), pair.rewards.astype(np.float64)
        pair.terminals = pair.terminals.astype(np.float64)
        if pair.rainbow:
            pair.support = pair.support.astype(np.float64)
        with zero_noise():
            loss = pair.official(train, flags=tuple(False for _ in pair.flags))
        mu = _flat({"params": pair.opt_state[0].mu["params"]})
        return loss, {k: np.asarray(v, np.float64) / (1 - 0.9) for k, v in mu.items() if k != "SoftMoE_0/scalar"}


def ours_float64_gradients(pair):
    """The script's loss and gradients of the same update in float64, on the CPU: its `update` on a float64 copy of the
    initial weights, float64 returns, noise off. Three values stay the float32 ones that the official Rainbow `train`
    has under x64 too: the importance weights (as `train_args` hands them over), gamma^n (`cumulative_gamma * (1 -
    terminals.astype(float32))`); and in every `train`, the
    frames / 255 (`preprocess_atari_inputs` divides in float32, where XLA's quotient is 1 ulp off torch's for some
    pixel values; a hook on the encoder's input puts in XLA's value of each pixel, read off a 256-entry table).
    Returns (loss, {official path: gradient})."""
    import jax
    import jax.numpy as jnp
    import torch
    from official_mapping import x64

    table = torch.from_numpy(np.asarray(jax.jit(lambda k: k.astype(jnp.float32) / 255.0)(
        jnp.arange(256, dtype=jnp.uint8)), np.float64))

    net = copy.deepcopy(pair.initial).double()
    target = copy.deepcopy(net)
    as_xla = lambda module, args: (table[torch.round(args[0].double() * 255.0).long()], *args[1:])  # noqa: E731
    hooks = [n.encoder.register_forward_pre_hook(as_xla) for n in (net, target)]
    batch = {k: v.cpu() for k, v in pair.batch.items()}
    batch["returns"] = torch.as_tensor(pair.rewards, dtype=torch.float64)
    weights = pair.weights.astype(np.float32)  # the values that `train_args` hands the official `train`
    if pair.rainbow:  # float32 gamma^n, as the official Rainbow `train` rounds it
        batch["discounts"] = batch["discounts"].double()
    else:  # the DQN `train`'s rewards + cumulative_gamma * max_q * (1 - terminals) stays in float64
        batch["discounts"] = torch.as_tensor(np.where(pair.terminals > 0, 0.0, pair.discount), dtype=torch.float64)
    try:
        loss = pair.ours(check=True, net=net, target=target, optimizer=pair.m.make_optimizer(pair.args, net),
                         memory=StandInMemory(batch, "cpu"), weights=torch.as_tensor(weights, dtype=torch.float64),
                         noise=torch.Generator().manual_seed(0))
    finally:
        for hook in hooks:
            hook.remove()
    with x64(True):  # the mapping makes JAX arrays: float32 outside x64 mode
        flat = _flat(pair.map(gradients_as_network(net), np.float64))
    return loss, {k: np.asarray(v, np.float64) for k, v in flat.items() if k != "SoftMoE_0/scalar"}


def _flat(params):
    import flax

    return flax.traverse_util.flatten_dict(params["params"], sep="/")


def time_pair(pair, rounds, updates):
    """ms per update of each side, interleaved (ours, official, ours, ...), after one warm-up round: CPU time on the
    CPU, wall time on a GPU (each update waited for: `ours` and `official` read their loss back)."""
    clock = time.process_time if pair.device.type == "cpu" else time.perf_counter
    times = {"ours": [], "official": []}
    for r in range(rounds + 1):
        for side, step in (("ours", pair.ours), ("official", pair.official)):
            start = clock()
            for _ in range(updates):
                step()
            if r:
                times[side].append((clock() - start) / updates * 1000)
    return {side: statistics.median(values) for side, values in times.items()}


def machine(device="cpu"):
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    info = {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "commit": commit,
            "device": device}
    if device != "cpu":
        import jax
        import torch

        info.update(gpu=torch.cuda.get_device_name(), torch=torch.__version__, jax=jax.__version__,
                    jax_device=str(jax.devices()[0]))
    return info


def pick_device(cpu_only):
    """"cuda" where torch and JAX both see a GPU (and --cpu is not given), else "cpu"; a GPU that torch sees and JAX
    does not is an error (the two sides would run on different hardware)."""
    import jax
    import torch

    if cpu_only or not torch.cuda.is_available():
        return "cpu"
    if jax.default_backend() != "gpu":
        raise SystemExit(f"perf --official: torch sees a GPU and JAX does not (its backend: {jax.default_backend()}): "
                         "install JAX's CUDA build (pip install 'jax[cuda12]'), or pass --cpu")
    return "cuda"


def run_config(mods, name, rounds, updates, batch_size=32, device="cpu"):
    """A configuration's row: the check (where the official network exists) and the timing."""
    row = {"config": name}
    try:
        pair = Pair(mods, name, batch_size, device=device)
        row["official_network"] = pair.note
        if pair.error:
            row["official_errors"] = [pair.error]
        if hasattr(pair, "map"):
            row["check"] = check(Pair(mods, name, batch_size, device=device))
        # the agent's default statistics flags, else the first flag (log_moe_statistics) off, else all off
        defaults = pair.flags
        for flags in dict.fromkeys([defaults, (False, *defaults[1:]), tuple(False for _ in defaults)]):
            pair.flags = flags
            try:
                pair.official()  # also the first compile
                break
            except Exception as error:  # noqa: BLE001
                row.setdefault("official_errors", []).append(
                    f"train with statistics flags {flags}{' (its agent defaults)' if flags == defaults else ''}: "
                    f"{type(error).__name__}: {error}")
        if pair.flags != defaults:
            row["official_network"] += f" (statistics flags {pair.flags})"
        row["official_flags"] = list(pair.flags)
        times = time_pair(pair, rounds, updates)
        row.update(ours_ms=times["ours"], official_ms=times["official"], ratio=times["official"] / times["ours"])
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    return row


def markdown(rows, info, rounds, updates, batch_size):
    on_gpu = info.get("device", "cpu") != "cpu"
    what = (f"GPU wall ms per update, each update waited for ({info.get('gpu')}; torch {info.get('torch')} on cuda, "
            f"JAX {info.get('jax')} on {info.get('jax_device')}; each side at its default float32 precision)"
            if on_gpu else "CPU ms per update, one thread")
    lines = [f"{what} (median of {rounds} interleaved rounds of {updates} updates; batch "
             f"{batch_size}, {NUM_ACTIONS} actions, float32); CPU: {info['cpu']}; commit {info['commit'][:12]}; "
             f"`{info['command']}`" + (f"; load average {info['load_average_start'][0]:.1f} at the start, "
                                       f"{info['load_average_end'][0]:.1f} at the end" if "load_average_end" in info
                                       else ""), "",
             "| configuration | official network and train | same loss and gradients (check) | ours (ms) "
             "| official (ms) | official / ours |", "|---|---|---|---:|---:|---:|"]
    for row in rows:
        c = row.get("check")
        verdict = ("-" if c is None else
                   f"{'yes' if c['passed'] else 'NO'}: loss {c['loss_ours']:.6g} vs {c['loss_official']:.6g} "
                   f"(rel {c['loss_rel']:.1e}); gradients rel {c['grad_rel']:.1e}"
                   + (f" to the official float32 ones, {c['grad_rel_to_official_float64']:.1e} to its float64 ones "
                      f"(official float32 vs float64: {c['official_float32_vs_float64']:.1e}); both sides in float64: "
                      f"loss rel {c['float64_loss_rel']:.1e}, gradients rel {c['float64_grad_rel']:.1e}"
                      if "grad_rel_to_official_float64" in c else "")
                   + f"; updates within {c['update_diff_over_lr']:.1e} lr")
        if "error" in row:
            lines.append(f"| {row['config']} | error: {row['error']} | - | - | - | - |")
            continue
        lines.append(f"| {row['config']} | {row['official_network']} | {verdict} | {row['ours_ms']:.1f} | "
                     f"{row['official_ms']:.1f} | {row['ratio']:.2f} |")
    errors = [f"- {row['config']}: {error}" for row in rows for error in row.get("official_errors", [])]
    if errors:
        lines += ["", "Official code that crashed (caught; the closest configuration that runs was timed):", *errors]
    lines += ["", f"Check (float32{', TF32 off on both sides' if on_gpu else ''}): one update from the same weights "
              f"and batch, noise off on both sides; the loss within {LOSS_RTOL:g} relative, every gradient within "
              f"{GRAD_RTOL:g} x its parameter tensor's largest "
              f"official gradient (where not, both updates are rerun in float64 and held to {FLOAT64_RTOL:g}); the "
              f"updates' largest difference (in learning rates) is shown (Adam's first step is about "
              f"lr x sign(gradient), so a gradient near Adam's epsilon moves it most)."]
    return "\n".join(lines)


def official(opts):
    """`./benchmark.sh perf --official`."""
    names = opts.official_configs or list(CONFIGS)
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configurations {sorted(unknown)}; known: {list(CONFIGS)}")
    mods = setup()
    device = pick_device(opts.cpu)
    info = machine(device)
    info["command"] = shlex.join(["./benchmark.sh", *sys.argv[1:]])
    info["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info["load_average_start"] = os.getloadavg()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:  # the table is rewritten after each configuration: a run cut short keeps the ones done
        print(f"{name} ...", flush=True)
        rows.append(run_config(mods, name, opts.rounds, opts.updates, opts.batch_size, device))
        info["load_average_end"] = os.getloadavg()
        table = markdown(rows, info, opts.rounds, opts.updates, opts.batch_size)
        (out / "perf-official.md").write_text(table + "\n")
        (out / "perf-official.json").write_text(json.dumps({"machine": info, "rounds": opts.rounds,
                                                            "updates": opts.updates, "batch_size": opts.batch_size,
                                                            "rows": rows}, indent=2) + "\n")
    print(table)
    print(f"written: {out / 'perf-official.md'}, {out / 'perf-official.json'}")
    failed = [row["config"] for row in rows if "error" in row or (row.get("check") and not row["check"]["passed"])]
    return 1 if failed else 0
