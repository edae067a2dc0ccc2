"""Host syncs on CUDA, counted on a CPU: `OnDevice` tensors stand for tensors on the GPU and count every read to the
host (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `float()`, `int()`) and every write into them from the
host by a copy (`t[i] = value`, `copy_`), each of which waits for the GPU on CUDA (docs/<script>.md, "Host syncs on
CUDA"). A training step reads the metrics of its updates in one transfer, the Rainbow scripts' update its metrics and
priorities in one, and storing a transition copies its frame only (its scalars are written by kernels)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import load_script

SCRIPTS = ["dqn_softmoe", "dqn_redo", "rainbow_tokenized", "der_single_expert"]
RAINBOW = ["rainbow_tokenized", "der_single_expert"]
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}
WRITES = {"__setitem__", "copy_"}


class OnDevice(torch.Tensor):
    """A CPU tensor that stands for one on the GPU; what it computes stays on the "GPU", what it reads comes back as a
    plain host tensor or number."""

    reads = writes = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READS:
            OnDevice.reads += 1
            return func(*[a.as_subclass(torch.Tensor) if isinstance(a, OnDevice) else a for a in args], **(kwargs or {}))
        if name in WRITES and isinstance(args[0], OnDevice) and not isinstance(args[-1], OnDevice):
            OnDevice.writes += 1
        return super().__torch_function__(func, types, args, kwargs)


def on_device(value):
    return torch.as_tensor(value, dtype=torch.float32).as_subclass(OnDevice)


@pytest.fixture(autouse=True)
def counts():
    OnDevice.reads = OnDevice.writes = 0


def bare_run(m):
    """The script's run object without a run directory: what `log_training` reads and writes."""
    run = object.__new__(m.RainbowRun if hasattr(m, "RainbowRun") else m.Run)
    run.updates, run.sums, run.num_logged, run.weight_sum, run.writer = 0, {}, 0, 0.0, None
    run.args, run.checkpoint = SimpleNamespace(learning_rate=1e-4), SimpleNamespace(folder="ckpt")
    return run


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_training_steps_metrics_are_read_in_one_transfer(name):
    m = load_script(name)
    updates = [{"td_loss": on_device(1.5 * k), "q_values": on_device(-k), "importance_loss": on_device(0.25)}
               for k in range(4)]  # four updates in a step (dqn_redo's high replay ratios)
    if name in RAINBOW:
        updates = [{**metrics, "is_weight_mean": 0.5} for metrics in updates]
    run = bare_run(m)
    run.log_training(7, updates, {}, None)
    assert OnDevice.reads == 1, "one transfer a step, not one per metric"
    assert run.updates == 4 and run.num_logged == 4
    assert run.sums == {"td_loss": 9.0, "q_values": -6.0, "importance_loss": 1.0}
    run.log_training(8, [], {}, None)  # a step without an update reads nothing
    assert OnDevice.reads == 1


@pytest.mark.parametrize("name", RAINBOW)
def test_an_updates_metrics_and_priorities_come_in_one_transfer(name):
    m = load_script(name)
    args = m.Args(learning_starts=10, train_frequency=1, target_network_frequency=10**6, batch_size=8,
                  total_timesteps=1000)
    memory = m.PrioritizedReplayMemory(100, n_step=args.n_step, gamma=args.gamma)
    frame = np.zeros((84, 84), np.uint8)
    for t in range(60):
        memory.add(frame, 0, 0.0, False, t % 30 == 29, frame)
    losses = torch.arange(1.0, 9.0)

    def update_fn(*_):  # stands in for the (graphed) update: its outputs stay on the GPU
        return {"td_loss": on_device(2.0), "q_values": on_device(3.0), "naive_entropy": on_device(0.5),
                "sample_losses": losses.as_subclass(OnDevice)}

    before = memory.tree.get(np.arange(100)).copy()
    updates, _ = m.train_step(11, args, None, None, None, memory, np.random.default_rng(0), None, update_fn)
    run = bare_run(m)
    run.log_training(11, updates, {}, None)
    assert OnDevice.reads == 1, "the metrics and the per-sample losses in one transfer"
    assert run.sums == {"td_loss": 2.0, "q_values": 3.0, "naive_entropy": 0.5} and run.weight_sum > 0
    changed = np.flatnonzero(memory.tree.get(np.arange(100)) != before)
    expected = np.sort(np.unique((losses.double().numpy() + 1e-10) ** args.priority_exponent))
    assert len(changed) and set(memory.tree.get(changed)) <= set(expected)


@pytest.mark.parametrize("name", SCRIPTS)
def test_storing_a_transition_copies_its_frame_and_writes_its_scalars_by_kernels(name):
    m = load_script(name)
    memory = m.ReplayMemory(10)
    for field in m.ReplayMemory.slot_fields:  # the memory "on the GPU"
        setattr(memory, field, getattr(memory, field).as_subclass(OnDevice))
    frame = np.full((84, 84), 7, np.uint8)
    memory.add(frame, 3, np.clip(0.4, -1.0, 1.0), False, False, frame)
    assert (OnDevice.writes, OnDevice.reads) == (1, 0), "one copy (the frame) a transition; its scalars are filled"
    memory.add(frame, 5, np.float64(-1.0), np.bool_(True), False, frame + 1)  # and the episode's final frame
    assert (OnDevice.writes, OnDevice.reads) == (3, 0)
    slots = memory.slots(0, 3)
    assert slots["action"].tolist() == [3, 5, 0] and slots["reward"].tolist() == [np.float32(0.4), -1.0, 0.0]
    assert slots["terminated"].tolist() == [False, True, False] and slots["episode_end"].tolist() == [False, True, False]
    assert slots["history"].tolist() == [0, 1, 2] and (slots["frames"][2] == 8).all()
