"""The CUDA-graphed paths compute what the eager ones do, in every script: the acting forward and whole updates
(batch gather, loss, backward, Adam step; priorities for Rainbow and DER; ReDo events between updates).

On a GPU the graphed run is compared with an eager run from the same state; without one the same harness runs with
the graphs disabled on the CPU (so that this file cannot rot between GPU sessions) and the GPU cases skip."""
import functools
import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import build_network, load_script

CUDA = torch.cuda.is_available()
SCRIPTS = {
    # shrink-and-perturb of the experts between graph replays: weights and Adam's moments must change in place
    "dqn_softmoe": dict(num_experts=4, expert_reset="shrink_perturb", expert_reset_period=2),
    "dqn_redo": dict(redo_period=3, redo_tau=0.5, replay_ratio=2.0),  # ReDo events between graph replays
    # ReDo events (experts recycled) between graph replays
    "rainbow_tokenized": dict(num_experts=2, n_step=3, redo=True, redo_period=3, redo_tau=0.1, redo_batch_size=16),
    "der_single_expert": dict(expert_hidden_units=256, n_step=3, redo=True, redo_period=3, redo_tau=0.1, redo_batch_size=16),
}
STEPS = 24  # 3 eager warm-up calls, the recording, then replays


def filled_memory(m, args, device, seed=0):
    memory_class = m.PrioritizedReplayMemory if hasattr(m, "PrioritizedReplayMemory") else m.ReplayMemory
    memory = memory_class(400, n_step=getattr(args, "n_step", 1), gamma=args.gamma, device=device)
    rng = np.random.default_rng(seed)
    for t in range(300):
        frame = rng.integers(0, 256, (84, 84), dtype=np.uint8)
        memory.add(frame, int(rng.integers(4)), float(rng.choice([-1.0, 0.0, 1.0])), t % 41 == 40, t % 67 == 66, frame)
    return memory


def run(name, device, graphs, steps=STEPS, seed=0):
    """Losses of `steps` training steps and the final weights, from a fixed start; graphs on or off."""
    m = load_script(name)
    args = m.Args(learning_starts=8, train_frequency=1, target_network_frequency=10, batch_size=16,
                  learning_rate=1e-3, **SCRIPTS[name])
    torch.manual_seed(seed)
    q_network, target_network = build_network(m, args, 4).to(device), build_network(m, args, 4).to(device)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = m.make_optimizer(args, q_network)
    memory, rng = filled_memory(m, args, device), np.random.default_rng(seed + 1)
    hooks = m.research_knobs(args)  # the knobs' hooks, as the main block plugs them in
    extra_losses = getattr(hooks, "extra_losses", None)
    update = functools.partial(m.update, extra_losses=extra_losses) if extra_losses else m.update
    update_fn = m.CudaGraph(update, graphs)
    parameters = inspect.signature(m.train_step).parameters
    hook_kwargs = {name: getattr(hooks, name) for name in ("after_update", "after_recycle") if name in parameters}
    rainbow = hasattr(m, "PrioritizedReplayMemory")
    extra = (torch.Generator(device=device).manual_seed(seed + 2),) if rainbow else ()
    losses = []
    for step in range(9, 9 + steps):
        updates, _ = m.train_step(step, args, q_network, target_network, optimizer, memory, rng, *extra,
                                  update_fn=update_fn, **hook_kwargs)
        losses += [float(next(iter(metrics.values()))) for metrics in updates]  # every update's loss, not the last
    priorities = memory.tree.get(np.arange(400)).copy() if rainbow else None
    return np.array(losses), [p.detach().cpu() for p in q_network.parameters()], priorities


def compare(name, device, graphs, steps=STEPS):
    eager, graphed = run(name, device, False, steps), run(name, device, graphs, steps)
    assert len(eager[0]) >= steps  # dqn_redo: 2 updates a step
    np.testing.assert_allclose(graphed[0], eager[0], rtol=1e-5, atol=1e-7)
    for a, b in zip(eager[1], graphed[1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    if eager[2] is not None:
        np.testing.assert_allclose(graphed[2], eager[2], rtol=1e-4)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", SCRIPTS)
def test_graphed_updates_match_eager_updates(name):
    compare(name, "cuda", graphs=True)


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_comparison_runs_without_graphs_on_the_cpu(name):
    compare(name, "cpu", graphs=False, steps=3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", SCRIPTS)
def test_graphed_acting_matches_eager_acting(name):
    m = load_script(name)
    args = m.Args(**SCRIPTS[name])
    q_network = build_network(m, args, 6).cuda()
    rainbow = hasattr(m, "PrioritizedReplayMemory")
    act = m.CudaGraph(m.greedy_action, True)
    generators = [torch.Generator(device="cuda").manual_seed(3) for _ in range(2)]
    for seed in range(8):
        obs = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        obs = obs.cuda()
        extra = [(generator,) if rainbow else () for generator in generators]
        assert act(q_network, obs, *extra[0]).item() == m.greedy_action(q_network, obs, *extra[1]).item()


def test_optimizer_skips_a_step_whose_loss_is_not_finite():
    # the guard that lets a whole update run without a host sync: weights and Adam's state stay as they were
    m = load_script("dqn_softmoe")
    layer = torch.nn.Linear(3, 2)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.1, adam_eps=1e-8), layer)
    before = [p.detach().clone() for p in layer.parameters()]
    for bad in (False, True):
        optimizer.zero_grad()
        loss = layer(torch.ones(1, 3)).sum() * (float("nan") if bad else 1.0)
        loss.backward()
        optimizer.found_inf.copy_(~torch.isfinite(loss))
        optimizer.step()
        if not bad:
            after_good = [p.detach().clone() for p in layer.parameters()]
            state = {k: v.clone() for k, v in optimizer.state[layer.weight].items()}
    assert not torch.equal(after_good[0], before[0])
    for a, b in zip(layer.parameters(), after_good):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)
    for key, value in optimizer.state[layer.weight].items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
