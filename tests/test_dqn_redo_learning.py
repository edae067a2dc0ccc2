"""dqn_redo.py learning: a Q-network with most hidden units dead reaches the optimal Q-values of a small MDP
only when ReDo recycles them; the update, target-sync and ReDo schedules at several replay ratios."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import load_script

m = load_script("dqn_redo")

NUM_STATES, NUM_ACTIONS, TERMINAL, GAMMA = 6, 3, 5, 0.9


def make_mdp(seed=0):
    rng = np.random.default_rng(seed)
    next_state = rng.integers(0, NUM_STATES, (NUM_STATES, NUM_ACTIONS))
    next_state[0, 0] = TERMINAL  # a few ways to terminate
    next_state[3, 2] = TERMINAL
    reward = rng.choice([-1.0, -0.5, 0.0, 0.5, 1.0], (NUM_STATES, NUM_ACTIONS))
    return next_state, reward


def optimal_q(next_state, reward):
    q = np.zeros((NUM_STATES, NUM_ACTIONS))
    for _ in range(2000):
        v = q.max(1)
        v[TERMINAL] = 0.0
        q = reward + GAMMA * v[next_state]
    return q


def fill_memory(next_state, reward, seed=1, max_len=4):
    """Random-policy episodes from random starts, truncated after max_len steps; 1x1 'frames' hold the state."""
    rng = np.random.default_rng(seed)
    memory = m.ReplayMemory(20_000, frame_shape=(1,), stack_size=1, n_step=1, gamma=GAMMA)
    while memory.cursor < 15_000:
        state, steps = int(rng.integers(0, TERMINAL)), 0
        while True:
            action = int(rng.integers(NUM_ACTIONS))
            nxt = int(next_state[state, action])
            steps += 1
            terminated, truncated = nxt == TERMINAL, steps == max_len and nxt != TERMINAL
            memory.add(np.array([state], np.uint8), action, reward[state, action], terminated, truncated,
                       np.array([nxt], np.uint8))
            if terminated or truncated:
                break
            state = nxt
    return memory


class MLPQ(torch.nn.Module):
    """One-hot state -> dense (hidden units, ReLU) -> Q-values; all but `alive` hidden units start dead."""

    def __init__(self, seed, hidden=32, alive=2):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = m.xavier_(torch.nn.Linear(NUM_STATES, hidden))
        self.head = m.xavier_(torch.nn.Linear(hidden, NUM_ACTIONS))
        with torch.no_grad():
            self.fc.bias[alive:] = -10.0

    def forward(self, frames, record=None):
        h = F.relu(self.fc(F.one_hot(frames[:, -1, 0].long(), NUM_STATES).float()))
        if record is not None:
            record["fc"] = h
        return self.head(h)

    def redo_layers(self):
        return [("fc", m.incoming(self.fc), m.outgoing(self.head))]


def make_args(**overrides):
    args = dict(learning_starts=0, train_frequency=1, replay_ratio=1.0, target_network_frequency=50, batch_size=128,
                redo=True, redo_tau=0.0, redo_period=300, redo_batch_size=64, redo_reset_adam_step=False)
    return SimpleNamespace(**{**args, **overrides})


def train(redo, steps=3000):
    next_state, reward = make_mdp()
    q_network, target_network = MLPQ(0), MLPQ(1)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.01, adam_eps=1e-8), q_network)
    args, memory, rng = make_args(redo=redo), fill_memory(next_state, reward), np.random.default_rng(2)
    events = []
    for step in range(1, steps + 1):
        _, logged = m.train_step(step, args, q_network, target_network, optimizer, memory, rng)
        if logged:
            assert logged["redo/recycled_count"] == logged["redo/fc_recycled_count"]
            events.append((step, logged["redo/fc_recycled_count"]))
    with torch.no_grad():
        q = q_network(torch.arange(NUM_STATES, dtype=torch.uint8).view(-1, 1, 1)).numpy().astype(np.float64)
    return np.abs(q[:TERMINAL] - optimal_q(next_state, reward)[:TERMINAL]).max(), events


def test_redo_revives_dead_units_and_reaches_optimal_q():
    error, events = train(redo=True)
    assert [step for step, _ in events] == list(range(300, 3001, 300))
    assert events[0][1] >= 30  # the 30 planted dead units (and any that died meanwhile) were recycled
    assert error < 0.05, error
    error_without, events_without = train(redo=False)
    assert events_without == [] and error_without > 1.0, error_without  # 2 live units cannot represent Q*


def test_update_numbers_at_each_replay_ratio():
    def numbers(replay_ratio, train_frequency=4, learning_starts=10):
        args = make_args(replay_ratio=replay_ratio, train_frequency=train_frequency, learning_starts=learning_starts)
        return {step: list(m.updates_at(args, step)) for step in range(41) if m.updates_at(args, step)}

    assert numbers(0.25) == {12: [1], 16: [2], 20: [3], 24: [4], 28: [5], 32: [6], 36: [7], 40: [8]}
    assert numbers(0.5)[12] == [1, 2] and numbers(0.5)[40] == [15, 16]
    assert numbers(1.0)[12] == [1, 2, 3, 4] and numbers(1.0)[16] == [5, 6, 7, 8] and len(numbers(1.0)) == 8
    assert numbers(2.0)[40] == list(range(57, 65))
    assert numbers(0.125, train_frequency=8, learning_starts=3) == {8: [1], 16: [2], 24: [3], 32: [4], 40: [5]}


@pytest.mark.parametrize("replay_ratio", [0.25, 1.0])
def test_target_copied_every_target_frequency_agent_steps_whatever_the_replay_ratio(replay_ratio):
    next_state, reward = make_mdp()
    q_network, target_network = MLPQ(0, alive=32), MLPQ(1, alive=32)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.01, adam_eps=1e-8), q_network)
    args = make_args(learning_starts=10, train_frequency=4, replay_ratio=replay_ratio, target_network_frequency=12,
                     batch_size=8, redo=False)
    memory, rng = fill_memory(next_state, reward), np.random.default_rng(0)
    for step in range(1, 41):
        updates, logged = m.train_step(step, args, q_network, target_network, optimizer, memory, rng)
        assert len(updates) == len(m.updates_at(args, step)) and logged == {}
        synced = all(torch.equal(a, b) for a, b in zip(q_network.parameters(), target_network.parameters()))
        if step in (12, 24, 36):
            assert synced, step
        elif step > 12 and updates:
            assert not synced, step  # updated after the last copy
    assert optimizer.state[q_network.fc.weight]["step"].item() == 8 * round(4 * replay_ratio)


@pytest.mark.parametrize("reset_step", [False, True])
def test_redo_events_follow_gradient_updates(reset_step):
    # period 6 at 4 updates per training step: events after updates 6, 12, 18 and 24, i.e. at agent steps
    # 16, 20, 28 and 32; with tau huge every event recycles all 32 hidden units
    next_state, reward = make_mdp()
    q_network, target_network = MLPQ(0, alive=32), MLPQ(1, alive=32)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.01, adam_eps=1e-8), q_network)
    args = make_args(learning_starts=10, train_frequency=4, replay_ratio=1.0, batch_size=8, redo_period=6,
                     redo_tau=1e9, redo_reset_adam_step=reset_step)
    memory, rng = fill_memory(next_state, reward), np.random.default_rng(0)
    events = {}
    after_recycle = m.research_knobs(args).after_recycle  # --redo-reset-adam-step's hook, as the main block gets it
    for step in range(1, 33):
        _, logged = m.train_step(step, args, q_network, target_network, optimizer, memory, rng,
                                 after_recycle=after_recycle)
        if logged:
            events[step] = logged
    counts = {"redo/fc_recycled_count": 32, "redo/recycled_count": 32}
    assert events == {16: counts, 20: counts, 28: counts, 32: counts}
    steps = {optimizer.state[p]["step"].item() for p in q_network.parameters()}
    assert steps == ({0.0} if reset_step else {24.0})  # the last event follows the last update


def test_each_update_keeps_its_own_metrics_when_the_update_returns_the_same_tensors():
    """A CUDA graph returns the same output tensors at every replay: train_step keeps each update's own values, so the
    loop logs every update's loss (not the last one N times) and sees a non-finite loss in any of them."""
    out = {"td_loss": torch.zeros(()), "q_values": torch.zeros(())}

    def graphed(*_):  # stands in for CudaGraph(update): the same tensors, overwritten by each replay
        out["td_loss"].fill_(float("nan") if graphed.calls == 1 else graphed.calls)
        out["q_values"].fill_(-graphed.calls)
        graphed.calls += 1
        return out

    graphed.calls = 0
    memory = SimpleNamespace(sample_indices=lambda n, rng: np.zeros(n, np.int64), device="cpu")
    args = make_args(learning_starts=10, train_frequency=4, replay_ratio=1.0, redo=False, target_network_frequency=1000)
    updates, _ = m.train_step(12, args, None, None, None, memory, None, update_fn=graphed)
    losses = [u["td_loss"].item() for u in updates]
    assert losses[0] == 0 and math.isnan(losses[1]) and losses[2:] == [2, 3]
    assert [u["q_values"].item() for u in updates] == [0, -1, -2, -3]
    run = object.__new__(m.Run)  # the loop's logging: the non-finite second update ends the run
    run.updates, run.sums, run.num_logged, run.writer = 0, {}, 0, None
    run.args, run.checkpoint = SimpleNamespace(learning_rate=1e-4), SimpleNamespace(folder="ckpt")
    saved = []
    with pytest.raises(SystemExit) as stop:
        run.log_training(12, updates, {}, saved.append)
    assert stop.value.code == 1 and saved == [13] and run.updates == 2
