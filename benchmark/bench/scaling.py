"""The cost of a training step with a small and with a full replay memory, side by side in one process per script:
sampling, the batch gather, the update (and the Rainbow scripts' priority update) must cost the same per update at
20,000 and at 1,000,000 stored transitions.

    ./benchmark.sh scaling                                   # the four scripts, 20k vs 1M, one thread
    ./benchmark.sh scaling --scripts dqn_redo --sizes 20000 1000000 --rounds 30

Each script's default network (18 actions) is trained by its own `train_step` on memories filled through its own
`add` (random frames, episodes of 1,000 steps); the memories differ only in what they hold. Rounds interleave the
sizes; a round is the CPU time of `--updates` consecutive update steps. A full 1M memory takes about 7 GB of RAM."""
import dataclasses
import importlib.util
import inspect
import statistics
import time

import numpy as np

from .common import SCRIPTS


def load(script):
    spec = importlib.util.spec_from_file_location(f"scaling_{script}", SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def filled(m, args, size, seed=0):
    """The script's replay memory holding `size` transitions (capacity `size`), added one by one as a run adds them."""
    rb = m.make_replay(dataclasses.replace(args, buffer_size=size), "cpu")
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (64, 84, 84), dtype=np.uint8)
    while rb.cursor < size:
        t = rb.cursor
        rb.add(frames[t % 64], int(t % 4), float(t % 3 - 1), t % 1000 == 999, False, frames[(t + 1) % 64])
    return rb


def measure(script, sizes, rounds, updates):
    import torch

    torch.set_num_threads(1)
    m = load(script)
    args = m.Args(learning_starts=0, target_network_frequency=10**9)
    hooks = m.research_knobs(args)
    torch.manual_seed(0)
    q_network, target_network = hooks.make_network(18), hooks.make_network(18)
    target_network.load_state_dict(q_network.state_dict())
    optimizer = m.make_optimizer(args, q_network)
    memories = {size: filled(m, args, size) for size in sizes}
    parameters = inspect.signature(m.train_step).parameters
    extra = (torch.Generator().manual_seed(1),) if "noise" in parameters else ()
    update = m.update
    if getattr(hooks, "extra_losses", None):
        update = lambda *a: m.update(*a, extra_losses=hooks.extra_losses)  # noqa: E731
    rng, times, step = np.random.default_rng(0), {size: [] for size in sizes}, 0
    for _ in range(rounds + 1):  # the first round warms up
        for size in sizes:
            start = time.process_time()
            done = 0
            while done < updates:
                step += 1
                done += len(m.train_step(step, args, q_network, target_network, optimizer, memories[size], rng, *extra,
                                         update_fn=update)[0])
            times[size].append((time.process_time() - start) / updates * 1000)
    return {size: statistics.median(values[1:]) for size, values in times.items()}


def scaling(opts):
    sizes = sorted(opts.sizes)
    header = " | ".join(f"{size:,} stored" for size in sizes)
    print(f"CPU ms per update (median of {opts.rounds} interleaved rounds of {opts.updates} updates), one thread\n")
    print(f"| script | {header} | ratio |\n|---|{'---|' * len(sizes)}---|")
    for script in opts.scripts:
        result = measure(script, sizes, opts.rounds, opts.updates)
        cells = " | ".join(f"{result[size]:.1f}" for size in sizes)
        print(f"| {script} | {cells} | {result[sizes[-1]] / result[sizes[0]]:.3f} |", flush=True)
    return 0
