"""ReplayMemory (shared by every script) against a naive reference that stores full stacks and computes
n-step returns by brute force, across episode starts, terminations, truncations and wrap-around."""
import numpy as np
import pytest
import torch
from harness import load_script

m = load_script("dqn_softmoe")
STACK = 4


def frame(uid):
    """A 2-pixel frame that encodes a unique id, so that any mix-up of frames shows."""
    return np.array([uid % 256, uid // 256], dtype=np.uint8)


def random_episodes(rng, num_episodes):
    """Episodes as (frames, actions, rewards, terminated): len(frames) == len(actions) + 1 (the final frame)."""
    episodes, uid = [], 0
    for _ in range(num_episodes):
        length = int(rng.integers(1, 9))
        frames = [frame(uid + k) for k in range(length + 1)]
        uid += length + 1
        episodes.append((frames, rng.integers(0, 5, length), rng.choice([-1.0, 0.0, 1.0, 0.5], length),
                         bool(rng.random() < 0.5)))
    return episodes


def reference_transitions(episodes, n_step, gamma):
    """Every transition with its full stacks (padded with the episode's first frame, as the training loop's
    stack) and its n-step return, discount and next stack, in the order the memory writes them."""
    out = []
    for frames, actions, rewards, terminated in episodes:
        length = len(actions)

        def stack(k):
            return np.stack([frames[max(j, 0)] for j in range(k - STACK + 1, k + 1)])

        for k in range(length):
            steps = min(n_step, length - k)
            ret = sum(gamma**j * float(np.clip(rewards[k + j], -1, 1)) for j in range(steps))
            ends_in_termination = terminated and k + steps == length
            out.append(dict(obs=stack(k), action=int(actions[k]), ret=ret,
                            discount=0.0 if ends_in_termination else gamma**steps, next_obs=stack(k + steps)))
        out.append(None)  # the final-frame slot
    return out


def fill(memory, episodes):
    for frames, actions, rewards, terminated in episodes:
        for k in range(len(actions)):
            last = k == len(actions) - 1
            memory.add(frames[k], actions[k], np.clip(rewards[k], -1, 1), terminated and last,
                       (not terminated) and last, frames[k + 1])


@pytest.mark.parametrize("n_step", [1, 3, 10])
@pytest.mark.parametrize("capacity", [37, 1000])
def test_replay_matches_naive_stacked_reference(n_step, capacity):
    rng = np.random.default_rng(n_step * 100 + capacity)
    gamma = 0.9
    episodes = random_episodes(rng, 40)
    memory = m.ReplayMemory(capacity, frame_shape=(2,), stack_size=STACK, n_step=n_step, gamma=gamma)
    fill(memory, episodes)
    reference = reference_transitions(episodes, n_step, gamma)
    assert memory.cursor == len(reference)
    lo, hi = memory.sample_range()
    valid = [i for i in range(lo, hi + 1) if reference[i] is not None]
    assert valid and all(memory.is_valid(np.array(valid)))
    # nothing older than the range may be sampled (its stack may be overwritten), nothing newer (no future yet)
    assert not memory.is_valid(np.array([lo - 1, hi + 1])).any()
    assert lo == max(0, len(reference) - capacity) + STACK - 1 and hi == len(reference) - 1 - n_step
    final_slots = [i for i in range(lo, hi + 1) if reference[i] is None]
    assert not memory.is_valid(np.array(final_slots, dtype=np.int64)).any()
    batch = memory.get(np.array(valid))
    for row, i in enumerate(valid):
        ref = reference[i]
        np.testing.assert_array_equal(batch["obs"][row].numpy(), ref["obs"], err_msg=f"obs of {i}")
        np.testing.assert_array_equal(batch["next_obs"][row].numpy(), ref["next_obs"], err_msg=f"next_obs of {i}")
        assert batch["actions"][row].item() == ref["action"]
        assert batch["returns"][row].item() == pytest.approx(ref["ret"], abs=1e-6)
        assert batch["discounts"][row].item() == pytest.approx(ref["discount"], abs=1e-7)


def test_stacks_never_cross_an_episode_start_and_truncation_bootstraps():
    memory = m.ReplayMemory(100, frame_shape=(2,), stack_size=STACK, n_step=1, gamma=0.5)
    # episode A truncated after 2 steps, episode B terminated after 3, then one more step of C
    fill(memory, [([frame(1), frame(2), frame(3)], [0, 1], [1.0, 1.0], False),
                  ([frame(10), frame(11), frame(12), frame(13)], [2, 3, 4], [0.0, 0.0, 1.0], True),
                  ([frame(20), frame(21)], [0], [0.0], False)])
    # linear slots: A0 A1 A-final B0 B1 B2 B-final C0 C-final
    batch = memory.get(np.array([1, 3, 5]))
    ids = batch["obs"][:, :, 0].numpy()
    np.testing.assert_array_equal(ids[0], [1, 1, 1, 2])  # A1 padded with A's first frame
    np.testing.assert_array_equal(ids[1], [10, 10, 10, 10])  # B0: no frame of A
    np.testing.assert_array_equal(batch["next_obs"][0, :, 0].numpy(), [1, 1, 2, 3])  # truncated: final frame
    assert batch["discounts"][0].item() == 0.5  # ... and it bootstraps
    assert batch["discounts"][2].item() == 0.0  # B2 terminated: no bootstrap
    np.testing.assert_array_equal(batch["next_obs"][2, :, 0].numpy(), [10, 11, 12, 13])


def test_sampling_is_uniform_over_valid_transitions():
    rng = np.random.default_rng(0)
    memory = m.ReplayMemory(50, frame_shape=(2,), stack_size=STACK, n_step=2)
    fill(memory, random_episodes(rng, 30))
    lo, hi = memory.sample_range()
    valid = np.array([i for i in range(lo, hi + 1) if memory.is_valid(np.array([i]))[0]])
    draws = memory.sample_indices(40_000, np.random.default_rng(1))
    assert np.isin(draws, valid).all()
    counts = np.array([(draws == i).sum() for i in valid])
    expected = len(draws) / len(valid)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < len(valid) + 5 * np.sqrt(2 * len(valid))  # a 5-sigma bound on a chi-square


def test_checkpoint_round_trip_across_saves_and_wrap_around(tmp_path):
    # full segments are streamed as the memory fills, a save adds the partial one; the memory wraps between saves
    rng = np.random.default_rng(3)
    memory = m.ReplayMemory(30, frame_shape=(2,), stack_size=STACK, n_step=3)
    checkpoint = m.Checkpoint(str(tmp_path))
    for episodes in (3, 9, 1, 12):
        fill(memory, random_episodes(rng, episodes))
        checkpoint.save({}, memory)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    segments = [tuple(segment) for segment in state["replay"]["segments"]]
    assert len(segments) > 1 and all(end > memory.cursor - 30 for _, end in segments)  # overwritten segments dropped ...
    assert [end - first for first, end in segments[:-1]] == [30] * (len(segments) - 1)  # streamed, one per pass
    on_disk = sorted(p.name for p in tmp_path.glob("replay-*.npz"))
    assert on_disk == [m.segment_name(a, b) for a, b in segments]  # ... from disk too
    assert not list(tmp_path.glob("*.tmp"))
    restored = m.ReplayMemory(30, frame_shape=(2,), stack_size=STACK, n_step=3)
    m.Checkpoint(str(tmp_path)).load_replay(restored, state["replay"], str(tmp_path))
    lo, hi = memory.sample_range()
    index = np.arange(lo, hi + 1)
    index = index[memory.is_valid(index)]
    a, b = memory.get(index), restored.get(index)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    np.testing.assert_array_equal(restored.is_transition, memory.is_transition)
    assert restored.cursor == memory.cursor and restored.episode_step == memory.episode_step


def test_frames_are_stored_once():
    assert m.ReplayMemory.bytes_per_slot() == 84 * 84 + 12  # ~7 KB per transition, not 4 x 84 x 84
    memory = m.ReplayMemory(10)
    assert memory.frames.shape == (10, 84, 84) and memory.frames.dtype == torch.uint8


def test_sampling_never_scans_the_whole_memory():
    """The cost of a sample does not grow with what the memory holds: with 1M transitions stored, rejection sampling
    tests only its candidates, never every stored slot (it did on every update, 20x slower at 1M than at 20k)."""
    memory = m.ReplayMemory(1_000_000, frame_shape=(1,), stack_size=4, n_step=1)
    memory.is_transition[:] = True
    memory.cursor = 1_000_000
    sizes, is_valid = [], memory.is_valid
    memory.is_valid = lambda index: sizes.append(len(index)) or is_valid(index)
    index = memory.sample_indices(32, np.random.default_rng(0))
    assert len(index) == 32 and max(sizes) == 64
    memory.is_transition[:] = False  # nothing valid: after a bounded number of rejections, the one full check says so
    with pytest.raises(RuntimeError, match="no complete transition"):
        memory.sample_indices(32, np.random.default_rng(0))
