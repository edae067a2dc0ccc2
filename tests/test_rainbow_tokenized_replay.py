"""rainbow_tokenized.py targets and prioritized replay: the C51 projection against a float64 brute force, the sum
tree (sampling frequencies, updates, checkpoint), priorities that follow the memory's valid transitions, importance
weights, and the whole n-step double-Q target against a brute force over episodes with terminations and
truncations."""
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import load_script

m = load_script("rainbow_tokenized")


def project_reference(atoms, probs, support):
    """Dopamine's formulation of the projection, in float64: target_i = sum_j clip(1 - |clip(atoms_j) - z_i| / dz,
    0, 1) probs_j (each atom's mass goes to its neighbours in proportion to closeness)."""
    support = np.asarray(support, np.float64)
    dz = (support[-1] - support[0]) / (len(support) - 1)
    atoms = np.clip(np.asarray(atoms, np.float64), support[0], support[-1])
    weights = np.clip(1 - np.abs(atoms[None, :] - support[:, None]) / dz, 0, 1)  # [K_target, K_source]
    return weights @ np.asarray(probs, np.float64)


def test_projection_matches_brute_force():
    rng = np.random.default_rng(0)
    support = torch.linspace(-10, 10, 51, dtype=torch.float64)
    batch = 64
    probs = torch.from_numpy(rng.dirichlet(np.ones(51) * 0.3, size=batch))
    returns = torch.from_numpy(rng.choice([-12.0, -3.3, -1.0, 0.0, 0.37, 1.0, 2.0, 11.0], size=batch))
    # n-step discounts, terminal transitions (discount 0) and an undiscounted case (atoms land on atoms)
    discounts = torch.from_numpy(rng.choice([0.0, 0.99, 0.99**2, 0.99**3, 1.0, 0.5], size=batch))
    target = m.project_distribution(probs, returns, discounts, support)
    for b in range(batch):
        atoms = returns[b].item() + discounts[b].item() * support.numpy()
        np.testing.assert_allclose(target[b].numpy(), project_reference(atoms, probs[b].numpy(), support.numpy()),
                                   rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target.sum(1), torch.ones(batch, dtype=torch.float64))


def test_projection_edge_cases():
    support = torch.linspace(-2, 2, 5, dtype=torch.float64)  # atoms -2 -1 0 1 2, dz = 1
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.25, 0.15]], dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)

    def project(ret, discount):
        return m.project_distribution(probs, ret * one, discount * one, support)[0]

    # a terminal transition puts all the mass on the (clipped) return, whatever the next distribution
    torch.testing.assert_close(project(1.0, 0.0), torch.tensor([0, 0, 0, 1.0, 0], dtype=torch.float64))
    torch.testing.assert_close(project(0.25, 0.0), torch.tensor([0, 0, 0.75, 0.25, 0], dtype=torch.float64))
    torch.testing.assert_close(project(7.0, 0.0), torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))
    # atoms that land exactly on support atoms keep their whole mass there (lower == upper)
    torch.testing.assert_close(project(0.0, 1.0), probs[0])
    torch.testing.assert_close(project(1.0, 1.0), torch.tensor([0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    # atoms beyond the support are clipped to its ends
    torch.testing.assert_close(project(-5.0, 1.0), torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    # halving the spread moves the mass half-way between atoms
    torch.testing.assert_close(project(0.0, 0.5), torch.tensor([0, 0.2, 0.525, 0.275, 0], dtype=torch.float64))


def brute_force_sums(tree):
    leaves = tree.nodes[tree.size:]
    level, sums = leaves, {}
    for depth in range(tree.depth, 0, -1):
        level = level[0::2] + level[1::2]
        sums[depth - 1] = level
    return leaves, sums


@pytest.mark.parametrize("capacity", [1, 2, 5, 37, 64, 1000])
def test_sum_tree_updates_keep_every_partial_sum(capacity):
    rng = np.random.default_rng(capacity)
    tree = m.SumTree(capacity)
    assert tree.size >= capacity and tree.size < 2 * max(capacity, 2)
    reference = np.zeros(capacity)
    for _ in range(30):
        index = rng.integers(0, capacity, size=int(rng.integers(1, 10)))
        values = rng.choice([0.0, 0.5, 1.0, 3.0, 10.0], size=len(index)) * rng.random(len(index))
        tree.set(index, values)
        for i, v in zip(index, values):  # of a repeated index, the last value counts
            reference[i] = v
        np.testing.assert_array_equal(tree.get(np.arange(capacity)), reference)
        assert tree.total() == pytest.approx(reference.sum(), rel=1e-12, abs=1e-12)
        leaves, sums = brute_force_sums(tree)
        for depth, level in sums.items():  # every internal node is the sum of its leaves
            np.testing.assert_allclose(tree.nodes[1 << depth: 2 << depth], level, rtol=1e-12, atol=1e-12)
    assert tree.max_priority == max(1.0, reference.max(), tree.max_priority)
    with pytest.raises(ValueError):
        tree.set(np.array([0]), np.array([-1.0]))


def test_sum_tree_tracks_the_max_priority_ever_set():
    tree = m.SumTree(8)
    assert tree.max_priority == 1.0  # Dopamine starts at 1
    tree.set(np.array([1, 2]), np.array([0.3, 2.5]))
    assert tree.max_priority == 2.5
    tree.set(np.array([2]), np.array([0.1]))
    assert tree.max_priority == 2.5  # a maximum ever recorded, not the current maximum


@pytest.mark.parametrize("capacity", [37, 1024])
def test_sum_tree_sampling_frequencies_match_priorities(capacity):
    rng = np.random.default_rng(0)
    tree = m.SumTree(capacity)
    priorities = rng.choice([0.0, 0.1, 1.0, 2.0, 5.0], size=capacity) * rng.random(capacity)
    priorities[[0, capacity - 1]] = [3.0, 4.0]  # the edges of the tree count too
    tree.set(np.arange(capacity), priorities)
    draws = 400_000
    index, probabilities = tree.sample(draws, np.random.default_rng(1))
    expected = priorities / priorities.sum()
    np.testing.assert_allclose(probabilities, expected[index], rtol=1e-12)
    counts = np.bincount(index, minlength=capacity)
    assert len(counts) == capacity and counts[priorities == 0].sum() == 0  # zero priority is never drawn
    # each count is binomial(draws, p): within 5 standard deviations (a shifted or mis-summed tree is far outside)
    sd = np.sqrt(draws * expected * (1 - expected))
    assert np.all(np.abs(counts - draws * expected) <= 5 * sd + 1), np.max(np.abs(counts - draws * expected) / (sd + 1))


def test_sum_tree_never_draws_an_empty_leaf_at_a_boundary():
    tree = m.SumTree(8)
    tree.set(np.arange(8), np.array([0.1, 0.2, 0.0, 0.0, 0.7, 0.0, 0.0, 0.0]))

    class EdgeRng:  # targets at the very top of the range, where rounding could step into an empty subtree
        def uniform(self, low, high, size):
            return np.full(size, np.nextafter(high, 0))

    index, _ = tree.sample(4, EdgeRng())
    assert np.all(index == 4)


def random_episodes(rng, num_episodes, num_states=6, max_len=8):
    """(states, rewards, terminated) per episode: len(states) == len(rewards) + 1 (the final state)."""
    episodes = []
    for _ in range(num_episodes):
        length = int(rng.integers(1, max_len + 1))
        episodes.append((rng.integers(0, num_states, length + 1), rng.choice([-1.0, 0.0, 0.5, 1.0], length),
                         bool(rng.random() < 0.5)))
    return episodes


def add_episode(memory, episode, on_add=None):
    states, rewards, terminated = episode
    for k in range(len(rewards)):
        last = k == len(rewards) - 1
        memory.add(np.array([states[k]], np.uint8), int(k % 3), rewards[k], terminated and last,
                   (not terminated) and last, np.array([states[k + 1]], np.uint8))
        if on_add is not None:
            on_add()


def assert_priorities_follow_validity(memory):
    """Non-zero priority exactly for the slots of the transitions the memory may sample."""
    lo, hi = memory.sample_range()
    valid = [t for t in range(max(lo, 0), hi + 1) if memory.is_valid(np.array([t]))[0]]
    has_priority = set(np.flatnonzero(memory.tree.get(np.arange(memory.capacity))).tolist())
    assert has_priority == {t % memory.capacity for t in valid}, (memory.cursor, lo, hi)
    assert memory.num_prioritized() == len(valid)


@pytest.mark.parametrize("n_step,capacity", [(1, 37), (3, 37), (3, 200), (10, 64)])
def test_priorities_exist_exactly_for_valid_transitions(n_step, capacity):
    rng = np.random.default_rng(n_step + capacity)
    memory = m.PrioritizedReplayMemory(capacity, frame_shape=(1,), stack_size=4, n_step=n_step, gamma=0.9)
    updates = np.random.default_rng(1)

    def check():
        assert_priorities_follow_validity(memory)
        if memory.tree.total() > 0 and updates.random() < 0.3:  # priorities set by updates leave with their slot
            index, _ = memory.sample_prioritized(4, updates)
            memory.update_priorities(index, updates.random(4) * 3)
            assert_priorities_follow_validity(memory)

    for episode in random_episodes(rng, 130):
        add_episode(memory, episode, check)
    assert memory.cursor > 3 * capacity  # wrapped around several times


def test_new_transitions_enter_at_the_max_priority():
    memory = m.PrioritizedReplayMemory(100, frame_shape=(1,), stack_size=1, n_step=1, gamma=0.9)
    rng = np.random.default_rng(0)
    for _ in range(5):
        add_episode(memory, random_episodes(rng, 1)[0])
    lo, hi = memory.sample_range()
    assert np.all(memory.tree.get(np.arange(lo, hi + 1) % 100)[memory.is_transition[np.arange(lo, hi + 1) % 100]] == 1)
    index, _ = memory.sample_prioritized(3, rng)
    memory.update_priorities(index, np.array([0.2, 4.0, 0.3]))
    assert memory.tree.max_priority == 4.0
    add_episode(memory, random_episodes(rng, 1)[0])
    _, new_hi = memory.sample_range()
    entered = np.arange(hi + 1, new_hi + 1)
    entered = entered[memory.is_transition[entered % 100]]
    assert len(entered) and np.all(memory.tree.get(entered % 100) == 4.0)


def test_prioritized_sampling_returns_valid_linear_indices():
    memory = m.PrioritizedReplayMemory(50, frame_shape=(1,), stack_size=4, n_step=3, gamma=0.9)
    rng = np.random.default_rng(0)
    for episode in random_episodes(rng, 40):
        add_episode(memory, episode)
    lo, hi = memory.sample_range()
    valid = np.array([t for t in range(lo, hi + 1) if memory.is_valid(np.array([t]))[0]])
    priority = np.zeros(50)
    priority[valid % 50] = rng.random(len(valid)) + 0.01
    memory.update_priorities(valid, priority[valid % 50])
    index, probabilities = memory.sample_prioritized(20_000, np.random.default_rng(1))
    assert memory.is_valid(index).all() and index.min() >= lo and index.max() <= hi
    np.testing.assert_allclose(probabilities, priority[index % 50] / priority.sum(), rtol=1e-12)
    counts = np.bincount(index - lo, minlength=hi - lo + 1)[valid - lo]
    expected = 20_000 * priority[valid % 50] / priority.sum()
    assert np.all(np.abs(counts - expected) <= 5 * np.sqrt(expected) + 1)


def test_replay_state_round_trip_includes_priorities(tmp_path):
    memory = m.PrioritizedReplayMemory(50, frame_shape=(1,), stack_size=4, n_step=3, gamma=0.9)
    rng = np.random.default_rng(0)
    for episode in random_episodes(rng, 30):
        add_episode(memory, episode)
    index, _ = memory.sample_prioritized(5, rng)
    memory.update_priorities(index, np.array([0.5, 2.0, 7.0, 0.1, 0.2]))
    m.Checkpoint(str(tmp_path)).save({}, memory)
    other = m.PrioritizedReplayMemory(50, frame_shape=(1,), stack_size=4, n_step=3, gamma=0.9)
    m.Checkpoint(str(tmp_path)).load_replay(other, torch.load(tmp_path / "state.pt", weights_only=True)["replay"],
                                            str(tmp_path))
    np.testing.assert_array_equal(other.tree.nodes, memory.tree.nodes)  # inner sums rebuilt to the same bits
    assert other.tree.max_priority == 7.0 and other.synced == memory.synced
    for episode in random_episodes(rng, 5):  # both continue identically
        add_episode(memory, episode)
        add_episode(other, episode)
    np.testing.assert_array_equal(other.tree.nodes, memory.tree.nodes)


def test_importance_weights():
    p = np.array([0.5, 0.1, 0.25, 0.15])
    for beta in (0.0, 0.4, 0.5, 1.0):
        n = len(p)
        expected = (n * p) ** -beta / np.max((n * p) ** -beta)  # (N p)^-beta, normalized by the largest weight
        np.testing.assert_allclose(m.importance_weights(p, beta), expected, rtol=1e-12)
    # Dopamine's form for beta = 0.5: 1 / sqrt(p + 1e-10), normalized by the batch max
    dopamine = 1 / np.sqrt(p + 1e-10)
    np.testing.assert_allclose(m.importance_weights(p, 0.5), dopamine / dopamine.max(), rtol=1e-8)


def test_beta_schedule():
    a = m.Args(learning_starts=100, total_timesteps=1100, priority_beta_start=0.4, priority_beta_end=1.0)
    assert m.beta_at(a, 0) == 0.4 and m.beta_at(a, 100) == 0.4
    assert m.beta_at(a, 600) == pytest.approx(0.7) and m.beta_at(a, 1100) == 1.0 and m.beta_at(a, 5000) == 1.0
    assert m.beta_at(m.Args(), 10**7) == 0.5  # Dopamine: fixed


NUM_STATES, NUM_ACTIONS = 6, 3


class TabularDistribution(torch.nn.Module):
    """Return distributions read from a logit table [S, A, K], the state id being the 1-pixel frame."""

    def __init__(self, logits, support):
        super().__init__()
        self.num_actions = logits.shape[1]
        self.logits = torch.nn.Parameter(logits)
        self.register_buffer("support", support)

    def forward(self, frames, record=None):
        log_probs = self.logits[frames[:, -1, 0].long()].log_softmax(-1)
        return log_probs, (log_probs.exp() * self.support).sum(-1)


def brute_force_targets(episodes, online, target, n_step, gamma, support):
    """The double-Q C51 target of every transition, in the order the memory writes them (None: final slots)."""
    q_online = (online.logits.detach().double().softmax(-1) * support.double()).sum(-1).numpy()
    target_probs = target.logits.detach().double().softmax(-1).numpy()
    out = []
    for states, rewards, terminated in episodes:
        length = len(rewards)
        for k in range(length):
            steps = min(n_step, length - k)
            ret = sum(gamma**j * rewards[k + j] for j in range(steps))
            discount = 0.0 if terminated and k + steps == length else gamma**steps
            next_state = states[k + steps]
            best = int(np.argmax(q_online[next_state]))  # the online network picks, the target network evaluates
            atoms = ret + discount * support.double().numpy()
            out.append(dict(state=states[k], action=k % 3, target=project_reference(atoms, target_probs[next_state, best],
                                                                                   support.numpy())))
        out.append(None)
    return out


def tabular_pair(num_atoms, seed):
    g = torch.Generator().manual_seed(seed)
    support = torch.linspace(-1.5, 1.5, num_atoms)  # n-step returns reach beyond it: clipping is exercised
    online = TabularDistribution(2 * torch.randn(NUM_STATES, NUM_ACTIONS, num_atoms, generator=g), support)
    target = TabularDistribution(2 * torch.randn(NUM_STATES, NUM_ACTIONS, num_atoms, generator=g), support)
    return online, target


@pytest.mark.parametrize("n_step", [1, 3])
def test_double_q_n_step_target_matches_brute_force(n_step):
    gamma, capacity = 0.9, 1000
    rng = np.random.default_rng(n_step)
    episodes = random_episodes(rng, 60)
    memory = m.PrioritizedReplayMemory(capacity, frame_shape=(1,), stack_size=1, n_step=n_step, gamma=gamma)
    for episode in episodes:
        add_episode(memory, episode)
    online, target = tabular_pair(7, seed=n_step)
    reference = brute_force_targets(episodes, online, target, n_step, gamma, online.support)
    lo, hi = memory.sample_range()
    valid = np.array([t for t in range(lo, hi + 1) if reference[t] is not None])
    assert memory.is_valid(valid).all()
    batch = memory.get(valid)
    targets = m.categorical_target(online, target, batch, torch.Generator()).double().numpy()
    for row, t in enumerate(valid):
        np.testing.assert_allclose(targets[row], reference[t]["target"], rtol=1e-5, atol=1e-6, err_msg=f"transition {t}")
    # the online and target networks disagree somewhere, so a target-network argmax would differ
    q_target = (target.logits.softmax(-1) * target.support).sum(-1)
    q_online = (online.logits.softmax(-1) * online.support).sum(-1)
    assert (q_target.argmax(-1) != q_online.argmax(-1)).any()


def test_train_step_sets_priorities_from_the_losses_and_weights_the_loss():
    gamma, n_step = 0.9, 3
    rng = np.random.default_rng(5)
    episodes = random_episodes(rng, 40)
    memory = m.PrioritizedReplayMemory(1000, frame_shape=(1,), stack_size=1, n_step=n_step, gamma=gamma)
    for episode in episodes:
        add_episode(memory, episode)
    lo, hi = memory.sample_range()
    valid = np.array([t for t in range(lo, hi + 1) if memory.is_valid(np.array([t]))[0]])
    memory.update_priorities(valid, np.random.default_rng(0).random(len(valid)) + 0.1)  # unequal priorities
    online, target = tabular_pair(7, seed=0)
    reference = brute_force_targets(episodes, online, target, n_step, gamma, online.support)
    before = memory.tree.get(np.arange(1000)).copy()
    log_probs_before = online.logits.detach().double().log_softmax(-1).numpy()
    args = m.Args(learning_starts=10, train_frequency=1, target_network_frequency=10**6, batch_size=16,
                  total_timesteps=1000, priority_beta_start=0.8, priority_beta_end=0.8, priority_exponent=0.7)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.01, adam_eps=1e-8), online)
    sample_rng = np.random.default_rng(9)
    index, probabilities = memory.sample_prioritized(16, copy.deepcopy(sample_rng))  # what train_step will draw
    (out,), _ = m.train_step(11, args, online, target, optimizer, memory, sample_rng, torch.Generator())
    losses = np.array([-(reference[t]["target"] * log_probs_before[reference[t]["state"], reference[t]["action"]]).sum()
                       for t in index])
    weights = (len(index) * probabilities) ** -0.8
    weights /= weights.max()
    assert out["td_loss"].item() == pytest.approx(np.mean(weights * losses), rel=1e-5)
    assert out["is_weight_mean"] == pytest.approx(weights.mean(), rel=1e-6)
    after = memory.tree.get(np.arange(1000))
    np.testing.assert_allclose(after[index % 1000], (losses + 1e-10) ** 0.7, rtol=1e-5)
    untouched = np.setdiff1d(np.arange(1000), index % 1000)
    np.testing.assert_array_equal(after[untouched], before[untouched])
