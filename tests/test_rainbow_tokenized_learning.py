"""The distributional update converges to the known return distributions of a small MDP.

It drives the script's own `train_step` (prioritized sampling, importance weights, priority updates, double-Q C51
target, target sync) and `PrioritizedReplayMemory` with a tabular return-distribution network, so it fails if the
projection, the discount, the terminal mask, truncation bootstrapping, the action choice or the loss is wrong."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness import build_network, load_script

m = load_script("rainbow_tokenized")

# start -> choice; choice: action 0 -> middle (reward 0), action 1 -> end with reward 0.1;
# middle -> last; last -> end with reward +1 in 9 of 10 visits and -1 otherwise. Both actions act alike elsewhere.
START, CHOICE, MIDDLE, LAST, END = 0, 1, 2, 3, 4
GAMMA, SUPPORT = 0.5, torch.linspace(-2.0, 2.0, 5)  # atoms -2 -1 0 1 2

# The C51 fixed point, worked out by hand (each shifted atom split between its neighbours on the support):
LAST_Z = [0, 0.1, 0, 0.9, 0]  # rewards -1 / +1
MIDDLE_Z = [0, 0.05, 0.5, 0.45, 0]  # 0.5 * (+-1) = +-0.5, split evenly
CHOICE_Z = {0: [0, 0.025, 0.75, 0.225, 0],  # 0.5 * MIDDLE_Z: Q = 0.2
            1: [0, 0, 0.9, 0.1, 0]}  # the terminal reward 0.1: Q = 0.1, so action 0 is the greedy one
START_Z = [0, 0.0125, 0.875, 0.1125, 0]  # 0.5 * CHOICE_Z[0]


class TabularDistribution(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.num_actions = 2
        g = torch.Generator().manual_seed(seed)
        self.logits = torch.nn.Parameter(torch.randn(5, 2, 5, generator=g))
        self.register_buffer("support", SUPPORT.clone())

    def forward(self, frames, record=None):
        log_probs = self.logits[frames[:, -1, 0].long()].log_softmax(-1)
        return log_probs, (log_probs.exp() * self.support).sum(-1)


def fill_memory(truncate_every=0, seed=1):
    """Random-policy episodes from random starts; every truncate_every-th episode that reaches the middle is cut
    there by a time limit (it must bootstrap)."""
    rng = np.random.default_rng(seed)
    memory = m.PrioritizedReplayMemory(20_000, frame_shape=(1,), stack_size=1, n_step=1, gamma=GAMMA)
    visits_last, reached_middle = 0, 0
    while memory.cursor < 12_000:
        state = int(rng.integers(START, END))
        while True:
            action = int(rng.integers(2))
            terminated = truncated = False
            reward = 0.0
            if state == CHOICE and action == 1:
                nxt, reward, terminated = END, 0.1, True
            elif state == LAST:
                reward = 1.0 if visits_last % 10 else -1.0  # exactly 9 of 10
                visits_last += 1
                nxt, terminated = END, True
            else:
                nxt = state + 1
                if nxt == MIDDLE:
                    reached_middle += 1
                    truncated = truncate_every > 0 and reached_middle % truncate_every == 0
            memory.add(np.array([state], np.uint8), action, reward, terminated, truncated, np.array([nxt], np.uint8))
            if terminated or truncated:
                break
            state = nxt
    return memory


def train(memory, steps=2000):
    """Prioritized replay with full importance correction (beta = 1), which keeps the fixed point unbiased; the
    learning rate drops 10x for the last quarter so that the final iterate sits close to it."""
    torch.manual_seed(0)
    q_network, target_network = TabularDistribution(0), TabularDistribution(1)  # the target starts different
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.05, adam_eps=1e-8), q_network)
    args = SimpleNamespace(learning_starts=0, train_frequency=1, target_network_frequency=50, batch_size=128,
                           total_timesteps=steps, priority_exponent=0.5, priority_beta_start=1.0, priority_beta_end=1.0,
                           max_grad_norm=0.0)
    rng, noise = np.random.default_rng(2), torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        if step == 3 * steps // 4:
            optimizer.param_groups[0]["lr"] = 0.005
        m.train_step(step, args, q_network, target_network, optimizer, memory, rng, noise)
    return q_network.logits.detach().double().softmax(-1).numpy()


def assert_fixed_point(z, atol=0.025):
    for action in (0, 1):
        np.testing.assert_allclose(z[LAST, action], LAST_Z, atol=atol, err_msg="last")
        np.testing.assert_allclose(z[MIDDLE, action], MIDDLE_Z, atol=atol, err_msg="middle")
        np.testing.assert_allclose(z[CHOICE, action], CHOICE_Z[action], atol=atol, err_msg=f"choice, action {action}")
        np.testing.assert_allclose(z[START, action], START_Z, atol=atol, err_msg="start")


def test_distributional_update_converges_to_the_known_return_distributions():
    assert_fixed_point(train(fill_memory()))


def test_truncations_bootstrap_and_do_not_change_the_fixed_point():
    memory = fill_memory(truncate_every=2)
    assert memory.episode_end.sum() > memory.terminated.sum() + 500  # many time limits
    assert_fixed_point(train(memory))


def test_update_schedule_and_target_sync():
    # no update before the warm-up ends; one update every train_frequency; a hard copy every
    # target_network_frequency agent steps after the warm-up
    memory = fill_memory()
    q_network, target_network = TabularDistribution(0), TabularDistribution(1)
    optimizer = m.make_optimizer(SimpleNamespace(learning_rate=0.01, adam_eps=1e-8), q_network)
    args = SimpleNamespace(learning_starts=10, train_frequency=4, target_network_frequency=8, batch_size=8,
                           total_timesteps=100, priority_exponent=0.5, priority_beta_start=0.5, priority_beta_end=0.5,
                           max_grad_norm=0.0)
    rng, noise = np.random.default_rng(0), torch.Generator()
    updates = [s for s in range(1, 41)
               for _ in m.train_step(s, args, q_network, target_network, optimizer, memory, rng, noise)[0]]
    assert updates == [12, 16, 20, 24, 28, 32, 36, 40]
    torch.testing.assert_close(target_network.logits, q_network.logits)  # synced at step 40
    m.train_step(44, args, q_network, target_network, optimizer, memory, rng, noise)  # update, no sync
    assert not torch.equal(target_network.logits, q_network.logits)


@pytest.mark.parametrize("moe_type", ["softmoe", "baseline"])
def test_a_real_network_fits_a_fixed_target(moe_type):
    """The real QNetwork, noise and all, learns to put its mass where a fixed C51 target says."""
    torch.manual_seed(0)
    args = m.Args(encoder="nature", moe_type=moe_type, num_experts=2, expert_hidden_units=16, n_atoms=5, v_min=-2,
                  v_max=2, learning_rate=1e-3)
    net = build_network(m, args, 2)
    optimizer = m.make_optimizer(args, net)
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([[0.0, 0.0, 0.2, 0.8, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0]])
    noise = torch.Generator().manual_seed(0)
    for _ in range(150):
        m.resample_noise(net, noise)
        loss = -(target * net(obs)[0][:, 0]).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    probs, q = net(obs)
    np.testing.assert_allclose(probs[:, 0].exp().detach().numpy(), target.numpy(), atol=0.05)
    np.testing.assert_allclose(q[:, 0].detach().numpy(), [0.8, -1.5], atol=0.15)
