"""Measuring a script's configuration on its own code path, for the tests that compare it with the official configs
(tests/test_<script>_config.py): the optimizer `make_optimizer` builds, the replay memory `make_replay` builds, the
environment `make_training_env` builds, the update schedule `train_step` follows, and the rewards a real training run
stores and logs."""
import inspect
import math
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import torch
from harness import only_run_dir, read_checkpoint, run_script, scalars


def assert_matches_official(official, measured):
    """Compare the values measured on a script's code path with a table {name: (official value, source)}; every
    mismatch is reported at once, with the gin line or document its official value comes from."""
    assert set(measured) == set(official), f"rows without a measurement or an official value: {set(measured) ^ set(official)}"
    wrong = [f"{name}: measured {measured[name]!r}, official {value!r} ({source})"
             for name, (value, source) in official.items() if measured[name] != value]
    assert not wrong, "\n".join(wrong)


def optimizer_settings(m, args):
    """The optimizer `make_optimizer(args, network)` returns, read off its param_groups."""
    optimizer = m.make_optimizer(args, torch.nn.Linear(2, 2))
    group = optimizer.param_groups[0]
    return {"optimizer": type(optimizer).__name__, "learning rate": group["lr"], "Adam epsilon": group["eps"],
            "Adam betas": tuple(group["betas"]), "weight decay": group["weight_decay"]}


def replay_settings(m, args, monkeypatch):
    """The replay memory `make_replay(args, device)` builds: its class and every constructor argument (recorded by a
    stand-in, so that a 1M-slot memory is never allocated)."""
    built = {}
    with monkeypatch.context() as patch:
        for name in ("ReplayMemory", "PrioritizedReplayMemory"):
            if hasattr(m, name):
                signature = inspect.signature(getattr(m, name).__init__)

                def record(*a, _name=name, _signature=signature, **kw):
                    bound = _signature.bind(None, *a, **kw)
                    bound.apply_defaults()
                    built.update(kind=_name, **{k: v for k, v in bound.arguments.items() if k != "self"})

                patch.setattr(m, name, record)
        m.make_replay(args, "cpu")
    return {"replay": "prioritized" if built["kind"] == "PrioritizedReplayMemory" else "uniform",
            "replay capacity": built["capacity"], "n-step": built["n_step"], "gamma": built["gamma"],
            "frame stack": built["stack_size"]}


def preprocessing(env):
    while not isinstance(env, gym.wrappers.AtariPreprocessing):
        env = env.env
    return env


def env_settings(m, args):
    """The training environment `make_training_env(args, run_name)` builds, read off the ALE and its wrappers."""
    env = m.make_training_env(args, "config-test")
    try:
        ale, pre = env.unwrapped.ale, preprocessing(env)
        return {
            "sticky actions": ale.getFloat("repeat_action_probability"),
            "frame skip": pre.frame_skip * ale.getInt("frame_skip"),
            "max agent steps per episode": ale.getInt("max_num_frames_per_episode") // pre.frame_skip,
            "no-op starts (training)": pre.noop_max,
            "minimal action set": env.action_space.n == len(ale.getMinimalActionSet()),
            "observation": (pre.screen_size, pre.grayscale_obs),
            "life loss ends the environment's episode": pre.terminal_on_life_loss,
        }
    finally:
        env.close()


def clip_settings(m):
    """What `clip_reward` makes of a few raw game rewards."""
    return tuple(float(m.clip_reward(r)) for r in (-21.0, -1.0, -0.5, 0.0, 0.5, 1.0, 21.0))


def filled_memory(memory, num, rng):
    """`num` random transitions of 1-pixel frames, in episodes of 1 to 40 steps."""
    for t in range(num):
        frame = np.array([t % 250], np.uint8)
        memory.add(frame, int(rng.integers(3)), float(rng.choice([-1.0, 0.0, 1.0])), rng.random() < 0.03, False, frame)
    return memory


class Counter(torch.nn.Module):
    """A stand-in network with one weight: each update adds 1 to the online copy, so a target copy shows."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def schedule(m, args, last_step, update_fn, memory, **train_step_kwargs):
    """Run the script's `train_step` with `args` at agent steps 1..last_step, with `update_fn` standing in for the update.

    Returns the agent steps with an update and those at which the target network was copied."""
    q_network, target_network = Counter(), Counter()
    target_network.w.data.fill_(-1.0)
    rng = np.random.default_rng(0)
    calls = []

    def counting_update(q, *rest):
        calls.append(True)
        with torch.no_grad():
            q.w += 1.0
        return update_fn(q, *rest)

    updates, copies = [], []
    for step in range(1, last_step + 1):
        before, target_before = len(calls), target_network.w.item()
        m.train_step(step, args, q_network, target_network, None, memory, rng, update_fn=counting_update,
                     **train_step_kwargs)
        updates += [step] * (len(calls) - before)
        if target_network.w.item() != target_before:
            assert target_network.w.item() == q_network.w.item()
            copies.append(step)
    return updates, copies


def first_update_and_period(updates):
    """(warm-up, update period) of a list of update steps: the warm-up ends one period before the first update."""
    steps = sorted(set(updates))
    gaps = set(np.diff(steps).tolist())
    assert len(gaps) == 1, f"updates at irregular steps: gaps {sorted(gaps)}"
    period = gaps.pop()
    return steps[0] - period, period


def run_and_replay(script, flags, tmp_path, sticky, life_loss_terminal):
    """Train `script` for a few hundred steps with a checkpoint at the end, then play the actions its replay memory
    recorded again in an environment built here with the official settings (sticky-action probability `sticky`, frame
    skip 4 with max-pool, no no-ops, the same seed; a lost life terminal for learning when `life_loss_terminal`).
    Returns the checkpoint, the logged scalars, what the replay played per transition (frames, raw rewards,
    terminations, episode ends, lives lost before game over), what the memory stored per transition, and the raw and
    clipped returns of every finished episode.

    The loop resets the environment with seed --seed once, and without a seed after every episode; a memory larger
    than the run keeps every transition."""
    run_script(script, *flags, cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    checkpoint = read_checkpoint(run_dir)
    args, replay = checkpoint["args"], checkpoint["replay"]
    assert replay["cursor"] < args["buffer_size"], "the memory must hold the whole run"
    transition = replay["is_transition"].numpy()
    env = gym.make(args["env_id"], frameskip=1, repeat_action_probability=sticky, full_action_space=False,
                   max_num_frames_per_episode=4 * args["max_episode_steps"])
    env = gym.wrappers.AtariPreprocessing(env, noop_max=0, frame_skip=4, screen_size=84)
    frame, info = env.reset(seed=args["seed"])
    lives = info["lives"]
    played = {"frames": [], "raw": [], "terminated": [], "episode_end": [], "life_lost": []}
    returns, clipped, episode_return, episode_clipped = [], [], 0.0, 0.0  # the sums of each finished episode
    for action in replay["action"].numpy()[transition]:
        played["frames"].append(frame)
        frame, reward, terminated, truncated, info = env.step(int(action))
        life_lost = info["lives"] < lives
        lives = info["lives"]
        played["life_lost"].append(life_lost and not terminated)
        life_lost = life_lost and life_loss_terminal
        episode_return, episode_clipped = episode_return + reward, episode_clipped + float(np.clip(reward, -1, 1))
        played["raw"].append(reward)
        played["terminated"].append(terminated or life_lost)
        played["episode_end"].append(terminated or truncated or life_lost)
        if terminated or truncated:
            returns.append(episode_return)
            clipped.append(episode_clipped)
            episode_return, episode_clipped = 0.0, 0.0
            frame, info = env.reset()
            lives = info["lives"]
    env.close()
    stored = {key: replay[key].numpy()[transition] for key in ("frames", "reward", "terminated", "episode_end")}
    played = {k: np.array(v) for k, v in played.items()}
    return checkpoint, scalars(run_dir), played, stored, {"raw": returns, "clipped": clipped}


def assert_rewards_clipped_for_learning_and_raw_in_the_return(played, stored, returns, tags):
    """The replayed run is the script's run (same frames and episode ends); the memory holds the clipped rewards, the
    logged episodic returns the raw game score."""
    np.testing.assert_array_equal(stored["frames"], played["frames"])
    np.testing.assert_array_equal(stored["terminated"], played["terminated"])
    np.testing.assert_array_equal(stored["episode_end"], played["episode_end"])
    assert played["raw"].max() > 1, "no reward above 1 in the run: the test cannot tell clipped from raw"
    np.testing.assert_array_equal(stored["reward"], np.clip(played["raw"], -1.0, 1.0).astype(np.float32))
    logged = [value for _, value in tags["charts/episodic_return"]]
    assert len(returns["raw"]) >= 2 and logged == returns["raw"]  # raw scores (Assault: 21 an enemy), exact in float32
    assert returns["raw"] != returns["clipped"], "no finished episode tells its raw return from its clipped one"


# ---------------------------------------------------------------------------------------------------------------------
# DQN scripts (dqn_softmoe.py, dqn_redo.py)
# ---------------------------------------------------------------------------------------------------------------------
def dopamine_epsilon(decay_period, step, warmup_steps, epsilon):
    """Dopamine's linearly_decaying_epsilon (dopamine/jax/agents/dqn/dqn_agent.py), the oracle of the schedule."""
    steps_left = decay_period + warmup_steps - step
    bonus = (1.0 - epsilon) * steps_left / decay_period
    return epsilon + float(np.clip(bonus, 0.0, 1.0 - epsilon))


def epsilon_settings(m, args):
    """The exploration schedule `epsilon_at(args, step)` follows: its values through the warm-up, its final value, and
    the agent steps after the warm-up it takes to get there."""
    warm_up = sorted({m.epsilon_at(args, t) for t in range(args.learning_starts + 1)})
    final = m.epsilon_at(args, 10**12)
    lo, hi = 0, 10**9  # the first step after the warm-up at which epsilon is final (it only decreases)
    while lo < hi:
        mid = (lo + hi) // 2
        if m.epsilon_at(args, args.learning_starts + mid) <= final + 1e-12:
            hi = mid
        else:
            lo = mid + 1
    return {"epsilon through the warm-up": tuple(warm_up), "epsilon (train) after the decay": final,
            "epsilon decay (agent steps after the warm-up)": lo}


class TabularQ(torch.nn.Module):
    """Q-values read from a table, the state id being the 1-pixel frame."""
    args = SimpleNamespace(aux_loss_fns=())  # the scripts' losses read it: no auxiliary MoE losses

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.tensor(table))

    def forward(self, frames, record=None):
        return self.table[frames[:, -1, 0].long()]


# Two transitions whose targets tell every candidate apart: s0 -(a0, r 1)-> s1, then s1 -(a1, r 0.5)-> termination.
# At s1 the online network prefers action 0 (5 > -29.5) and the target network action 1 (2 > -1), so the target of the
# first transition is 1 + 0.99 * 2 = 2.98 with Dopamine DQN's max over the target network, 1 + 0.99 * (-1) = 0.01 with
# double Q, and 1 + 0.99 * 5 = 5.95 with the online network's max; the second one's is 0.5 either way.
# TD errors Q(s, a) - target with the max over the target network: 3 and -30.
ONLINE_Q = [[5.98, 0.0], [5.0, -29.5], [0.0, 0.0]]
TARGET_Q = [[0.0, 0.0], [-1.0, 2.0], [0.0, 0.0]]


def huber(x):
    return np.where(np.abs(x) <= 1, 0.5 * x**2, np.abs(x) - 0.5)


def td_errors(target):
    first = {"max over the target network": 2.98, "double Q": 0.01, "max over the online network": 5.95}[target]
    return np.array([5.98 - first, -29.5 - 0.5])


def loss_candidates():
    """{(loss, reduction over the batch, target): its value on the two transitions}."""
    per_sample = {"mse": lambda e: e**2, "huber": huber}
    return {(kind, reduce, target): float(getattr(per_sample[kind](td_errors(target)), reduce)())
            for kind in per_sample for reduce in ("mean", "sum")
            for target in ("max over the target network", "double Q", "max over the online network")}


def crafted_dqn_update(m):
    """The script's `update` on the two transitions above (read from its own ReplayMemory, gamma 0.99), with a zero
    learning rate: (loss, gradient on the online table)."""
    memory = m.ReplayMemory(8, frame_shape=(1,), stack_size=1, n_step=1, gamma=0.99)
    memory.add(np.array([0], np.uint8), 0, 1.0, False, False, np.array([1], np.uint8))
    memory.add(np.array([1], np.uint8), 1, 0.5, True, False, np.array([2], np.uint8))
    online, target = TabularQ(ONLINE_Q), TabularQ(TARGET_Q)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.0, adam_eps=1.5e-4), online)
    out = m.update(online, target, optimizer, memory, torch.tensor([0, 1]))
    loss = out["td_loss"] if isinstance(out, dict) else out[0]
    return loss.item(), online.table.grad


def loss_settings(m):
    """The loss, its reduction and its target, recognised from the loss `update` computes on the crafted transitions."""
    loss, _ = crafted_dqn_update(m)
    found = [key for key, value in loss_candidates().items() if abs(loss - value) <= 1e-4 * value]
    kind, reduce, target = found[0] if len(found) == 1 else (f"unknown ({loss})", "unknown", "unknown")
    return {"loss": kind, "loss over the batch": reduce, "TD target": target}


def gradient_clipping(m, monkeypatch):
    """Whether `update` changes the gradient of the loss before Adam's step: a loss whose gradient has norm 1000."""
    online = TabularQ([[0.0, 0.0]])
    memory = m.ReplayMemory(8, frame_shape=(1,), stack_size=1, n_step=1)
    memory.add(np.array([0], np.uint8), 0, 0.0, True, False, np.array([0], np.uint8))

    def steep_loss(q_network, target_network, batch, record=None):
        loss = 1000.0 * q_network.table.sum() / math.sqrt(2)
        return (loss, q_network.table[0]) if "record" in inspect.signature(m.dqn_loss).parameters else (
            loss, q_network.table[0], {})

    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.0, adam_eps=1.5e-4), online)
    with monkeypatch.context() as patch:
        patch.setattr(m, "dqn_loss", steep_loss)
        m.update(online, TabularQ([[0.0, 0.0]]), optimizer, memory, torch.tensor([0]))
    norm = online.table.grad.norm().item()
    return "none" if abs(norm - 1000.0) < 1e-3 else f"to norm {norm:g}"


class PreferredAction(torch.nn.Module):
    """A stand-in for the saved network that `evaluate` loads: it prefers action 1 and records its mode."""

    made = []

    def __init__(self, args, num_actions, distributional=False):
        super().__init__()
        self.num_actions, self.distributional, self.modes = num_actions, distributional, []
        PreferredAction.made.append(self)

    def load_state_dict(self, state, strict=True):
        return None

    def forward(self, x, record=None):
        self.modes.append(self.training)
        q = torch.zeros(x.shape[0], self.num_actions)
        q[:, 1] = 1.0
        return (None, q) if self.distributional else q


def evaluation_run(m, monkeypatch, tmp_path, args, episodes=2, distributional=False):
    """The script's `evaluate`, after --save-model, with `evaluation_settings(args)`, on a stand-in network. Returns
    the make_env arguments of the evaluation environment, the actions taken, the network's modes and the returns."""
    made, actions = [], []
    real_make_env = m.make_env
    signature = inspect.signature(real_make_env)

    class RecordActions(gym.Wrapper):
        def step(self, action):
            actions.append(action)
            return self.env.step(action)

    def make_env(*a, **kw):
        bound = signature.bind(*a, **kw)
        bound.apply_defaults()
        made.append(dict(bound.arguments))
        return RecordActions(real_make_env(*a, **kw))

    PreferredAction.made = []
    path = tmp_path / "model.cleanrl_model"
    torch.save({"model": {}, "args": vars(args)}, path)
    with monkeypatch.context() as patch:
        patch.setattr(m, "make_env", make_env)
        make_network = lambda n: PreferredAction(args, n, distributional)  # noqa: E731
        if "make_network" in inspect.signature(m.evaluate).parameters:
            returns = m.evaluate(str(path), make_network, episodes, "cpu", **m.evaluation_settings(args))
        else:  # a script that builds its network from the saved flags
            patch.setattr(m, "QNetwork", lambda a, n: PreferredAction(a, n, distributional))
            returns = m.evaluate(str(path), episodes, "cpu", **m.evaluation_settings(args))
    modes = [mode for net in PreferredAction.made for mode in net.modes]
    return made, np.array(actions), modes, returns


# ---------------------------------------------------------------------------------------------------------------------
# Rainbow scripts (rainbow_tokenized.py, der_single_expert.py)
# ---------------------------------------------------------------------------------------------------------------------
class TabularDistribution(torch.nn.Module):
    """Return distributions read from a logit table [S, A, K] on `support`, the state id being the 1-pixel frame."""
    args = SimpleNamespace(aux_loss_fns=())  # the scripts' losses read it: no auxiliary MoE losses

    def __init__(self, logits, support):
        super().__init__()
        self.num_actions = len(logits[0])
        self.logits = torch.nn.Parameter(torch.tensor(logits))
        self.register_buffer("support", torch.tensor(support))

    def forward(self, frames, record=None):
        log_probs = self.logits[frames[:, -1, 0].long()].log_softmax(-1)
        return log_probs, (log_probs.exp() * self.support).sum(-1)


# One transition s0 -(a0, r 0)-> s1 with discount 1 on the support [-1, 0, 1], so that the target distribution is the
# next state's distribution unshifted. At s1 the online network prefers action 0 (its Q is about +1) and the target
# network action 1 (its Q is positive, action 0's negative): double Q takes the target network's distribution of
# action 0, softmax(2, 1, 0); the target network's own argmax would take softmax(0, 1, 2).
SUPPORT = [-1.0, 0.0, 1.0]
ONLINE_LOGITS = [[[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[-5.0, -5.0, 5.0], [5.0, -5.0, -5.0]]]
TARGET_LOGITS = [[[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]]


def categorical_candidates():
    """{(loss, target): its value on the transition}."""
    softmax = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
    log_p = np.log(softmax(np.array(ONLINE_LOGITS[0][0])))
    targets = {"double Q": softmax(np.array(TARGET_LOGITS[1][0])),
               "argmax of the target network": softmax(np.array(TARGET_LOGITS[1][1])),
               "online network only": softmax(np.array(ONLINE_LOGITS[1][0]))}
    out = {}
    for name, t in targets.items():
        out[("cross-entropy", name)] = float(-(t * log_p).sum())
        out[("KL divergence", name)] = float((t * (np.log(t) - log_p)).sum())
    return out


def crafted_categorical_update(m):
    """The script's `update` on that transition (read from its own PrioritizedReplayMemory, 1 step, gamma 1), with
    importance weight 1 and a zero learning rate: the per-sample loss."""
    memory = m.PrioritizedReplayMemory(8, frame_shape=(1,), stack_size=1, n_step=1, gamma=1.0)
    memory.add(np.array([0], np.uint8), 0, 0.0, False, False, np.array([1], np.uint8))
    memory.add(np.array([1], np.uint8), 0, 0.0, True, False, np.array([0], np.uint8))
    online, target = TabularDistribution(ONLINE_LOGITS, SUPPORT), TabularDistribution(TARGET_LOGITS, SUPPORT)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.0, adam_eps=1.5e-4), online)
    out = m.update(online, target, optimizer, memory, torch.tensor([0]), torch.tensor([1.0]),
                   torch.Generator().manual_seed(0), 0.0)
    assert out["td_loss"].item() == out["sample_losses"].item()  # importance weight 1
    return out["sample_losses"].item()


def categorical_settings(m):
    """The loss and its target, recognised from the loss `update` computes on the crafted transition."""
    loss = crafted_categorical_update(m)
    found = [key for key, value in categorical_candidates().items() if abs(loss - value) <= 1e-5 * max(value, 1e-3)]
    kind, target = found[0] if len(found) == 1 else (f"unknown ({loss})", "unknown")
    return {"loss": kind, "TD target": target}


def prioritized_schedule(m, args, last_step, capacity=1000):
    """train_step with `args` at agent steps 1..last_step on a small prioritized memory, the update stood in for by
    one that returns per-sample losses 0.2 + 0.5 (index mod 7). Returns (updates, copies, calls): each call records the
    batch, the sampling probabilities, the importance weights, max_grad_norm and the losses; the memory comes last."""
    memory = filled_memory(m.PrioritizedReplayMemory(capacity, frame_shape=(1,), stack_size=1, n_step=args.n_step,
                                                     gamma=args.gamma), 300, np.random.default_rng(0))
    calls = []

    def update(q_network, target_network, optimizer, rb, index, weights, noise, max_grad_norm):
        index = np.asarray(index.cpu())
        loss = torch.as_tensor(0.2 + 0.5 * (index % 7), dtype=torch.float32)
        probabilities = rb.tree.get(index % rb.capacity) / rb.tree.total()
        calls.append({"index": index, "probabilities": probabilities, "weights": weights.cpu().double().numpy(),
                      "max_grad_norm": max_grad_norm, "loss": loss.double().numpy()})
        return {"td_loss": loss.mean(), "q_values": torch.tensor(0.0), "sample_losses": loss}

    updates, copies = schedule(m, args, last_step, update, memory, noise=torch.Generator().manual_seed(0))
    return updates, copies, calls, memory


def priority_settings(m, args, calls, memory):
    """The exponents that train_step applied: beta of the importance weights (N p)^-beta / max, and the priority
    exponent of the priorities it set after the last update (nothing overwrote them since)."""
    betas = []
    for call in calls:
        ratio = call["probabilities"] / call["probabilities"].min()
        useful = ratio > 1.01
        betas += list(-np.log(call["weights"][useful]) / np.log(ratio[useful]))
    assert betas and np.ptp(betas[: len(betas) // 10 + 1]) < 1e-3
    last = calls[-1]
    priorities = memory.tree.get(last["index"] % memory.capacity)
    exponents = np.log(priorities) / np.log(last["loss"] + 1e-10)
    assert np.ptp(exponents) < 1e-4
    return {"importance-sampling exponent at the first update": round(float(betas[0]), 4),
            "importance-sampling exponent at the last step": m.beta_at(args, args.total_timesteps),
            "priority exponent": round(float(exponents.mean()), 4),
            "gradient clipping": "none" if calls[0]["max_grad_norm"] == 0 else f"to norm {calls[0]['max_grad_norm']}"}


def redo_settings(m, args, numbers, monkeypatch):
    """The ReDo events train_step makes with `args` at the agent steps of the gradient updates numbered `numbers` (the
    update stood in for, the scoring and the recycling recorded), on a prioritized memory of 1-pixel frames whose
    priority sits on one transition: {"events": the numbers followed by an event, "probe batch", "tau", "probe
    sampling"}; a prioritized probe holds that transition only, a uniform one mixes many."""
    memory = filled_memory(m.PrioritizedReplayMemory(1000, frame_shape=(1,), stack_size=1, n_step=args.n_step,
                                                     gamma=args.gamma), 300, np.random.default_rng(0))
    lo, hi = memory.sample_range()
    valid = np.arange(lo, hi + 1)[memory.is_valid(np.arange(lo, hi + 1))]
    favoured = valid[len(valid) // 2]
    memory.update_priorities(valid, np.where(valid == favoured, 1.0, 1e-12))
    probes = []

    def update(q_network, target_network, optimizer, rb, index, weights, noise, max_grad_norm):
        loss = torch.full((len(index),), 0.5)
        return {"td_loss": loss.mean(), "q_values": torch.tensor(0.0), "sample_losses": loss}

    def dormant_neurons(network, obs, tau):
        probes.append((obs, tau))
        return {}, {}

    with monkeypatch.context() as patch:
        patch.setattr(m, "dormant_neurons", dormant_neurons)
        patch.setattr(m, "recycle_dormant", lambda network, optimizer, masks: {"layer": 1})
        events = []
        for number in numbers:
            step = (args.learning_starts // args.train_frequency + number) * args.train_frequency
            assert m.update_number(args, step) == number
            _, logged = m.train_step(step, args, Counter(), Counter(), None, memory, np.random.default_rng(number),
                                     torch.Generator().manual_seed(0), update_fn=update,
                                     after_update=m.redo_hook(args) if args.redo else None)  # as research_knobs
            if logged:
                events.append(number)
    settings = {"events": events}
    if probes:
        obs, tau = probes[0]
        frames = obs[:, -1, 0].numpy()
        settings.update({"probe batch": len(obs), "tau": tau, "probe sampling": "prioritized" if (
            frames == memory.frames[favoured % memory.capacity].item()).all() else "uniform"})
    return settings
