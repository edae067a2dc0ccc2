"""GPU-only checks (skipped on CPU machines, run on a lent GPU): the CUDA-graphed paths compute exactly what
the eager ones do."""
import functools

import numpy as np
import pytest
import torch
from harness import load_script

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
m = load_script("dqn_softmoe")


def test_graphed_dqn_updates_match_eager_updates():
    torch.manual_seed(0)
    args = m.Args(num_experts=4)
    nets = {}
    for mode in ("eager", "graphed"):
        torch.manual_seed(0)
        q, target = m.QNetwork(args, 6).cuda(), m.QNetwork(args, 6).cuda()
        target.load_state_dict(q.state_dict())
        opt = torch.optim.Adam(q.parameters(), lr=1e-3, eps=1.5e-4, fused=True)
        fn = m.CudaGraphed(functools.partial(m.dqn_gradients, q, target, opt), enabled=mode == "graphed")
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(8):  # 3 warm-up calls, the recording, then replays
            batch = {"obs": torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8, generator=gen).cuda(),
                     "actions": torch.randint(0, 6, (32,), generator=gen).cuda(),
                     "returns": torch.randn(32, generator=gen).cuda(),
                     "discounts": torch.full((32,), 0.99).cuda(),
                     "next_obs": torch.randint(0, 256, (32, 4, 84, 84), dtype=torch.uint8, generator=gen).cuda()}
            loss, _ = fn(**batch)
            losses.append(loss.item())
            opt.step()
        nets[mode] = (q, losses)
    np.testing.assert_allclose(nets["eager"][1], nets["graphed"][1], rtol=1e-5)
    for a, b in zip(nets["eager"][0].parameters(), nets["graphed"][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_graphed_acting_matches_eager_acting():
    q = m.QNetwork(m.Args(), 18).cuda()

    def greedy(obs):
        with torch.no_grad():
            return (q(obs).argmax(dim=1),)

    act = m.CudaGraphed(greedy, enabled=True)
    for seed in range(8):
        obs = torch.randint(0, 256, (1, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        assert act(obs=obs.cuda())[0].item() == greedy(obs.cuda())[0].item()
