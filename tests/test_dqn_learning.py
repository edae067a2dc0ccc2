"""The DQN learning step converges to the optimal Q-values of a small MDP computed by value iteration.

It drives the script's own `train_step` (update schedule, target sync) and `ReplayMemory` with a tabular
Q-network, so it fails if the TD target's sign, the discount, the terminal mask, truncation bootstrapping,
the target sync or the action gather is wrong."""
from types import SimpleNamespace

import numpy as np
import torch
from harness import load_script

m = load_script("dqn_softmoe")

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


class TabularQ(torch.nn.Module):
    """Q-table read from 1x1 'frames' that hold the state id (stack size 1)."""
    args = SimpleNamespace(aux_loss_fns=())  # the scripts' losses read it: no auxiliary MoE losses

    def __init__(self, seed):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(NUM_STATES, NUM_ACTIONS, generator=torch.Generator().manual_seed(seed)))

    def forward(self, frames, record=None):
        return self.table[frames[:, -1, 0].long()]


def step_fn(args, q_network, target_network, optimizer, memory, rng):
    """The script's train_step with its eager update, as the training loop calls it on a CPU."""
    return lambda step: m.train_step(step, args, q_network, target_network, optimizer, memory, rng)


def fill_memory(next_state, reward, seed=1, max_len=4):
    """Random-policy episodes from random starts, truncated after max_len steps (truncation must bootstrap)."""
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


def train(next_state, reward, max_len=4, steps=3000, target_network_frequency=50):
    q_network, target_network = TabularQ(0), TabularQ(1)  # the target starts different from the online net
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.05, adam_eps=1e-8), q_network)
    args = SimpleNamespace(learning_starts=0, train_frequency=1, target_network_frequency=target_network_frequency,
                           batch_size=128)
    train_step = step_fn(args, q_network, target_network, optimizer, fill_memory(next_state, reward, max_len=max_len),
                         np.random.default_rng(2))
    for step in range(1, steps + 1):
        train_step(step)
    return q_network.table.detach().numpy().astype(np.float64)


def test_dqn_update_converges_to_optimal_q():
    next_state, reward = make_mdp()
    q_star = optimal_q(next_state, reward)
    q = train(next_state, reward)
    np.testing.assert_allclose(q[:TERMINAL], q_star[:TERMINAL], atol=0.02)


def test_truncated_episodes_do_not_change_the_fixed_point():
    # the same MDP learned from much shorter (more often truncated) episodes reaches the same Q*
    next_state, reward = make_mdp(seed=3)
    q_star = optimal_q(next_state, reward)
    memory = fill_memory(next_state, reward, max_len=1)
    assert memory.episode_end.sum() > 3 * memory.terminated.sum() > 0  # mostly truncations
    q = train(next_state, reward, max_len=1)
    np.testing.assert_allclose(q[:TERMINAL], q_star[:TERMINAL], atol=0.02)


def test_update_schedule_and_target_sync():
    # no update before the warm-up ends; one update every train_frequency; a hard copy every
    # target_network_frequency agent steps after the warm-up
    next_state, reward = make_mdp()
    q_network, target_network = TabularQ(0), TabularQ(1)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.01, adam_eps=1e-8), q_network)
    args = SimpleNamespace(learning_starts=10, train_frequency=4, target_network_frequency=8, batch_size=8)
    train_step = step_fn(args, q_network, target_network, optimizer, fill_memory(next_state, reward),
                         np.random.default_rng(0))
    updates = [s for s in range(1, 41) if train_step(s)[0]]
    assert updates == [12, 16, 20, 24, 28, 32, 36, 40]
    torch.testing.assert_close(target_network.table, q_network.table)  # synced at step 40
    train_step(44)  # an update, no sync
    assert not torch.equal(target_network.table, q_network.table)
