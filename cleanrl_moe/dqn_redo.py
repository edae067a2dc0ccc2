# docs and experiment results: docs/dqn_redo.md
"""DQN with ReDo: recycling dormant neurons.

Sokar, Agarwal, Castro and Evci (2023), "The Dormant Neuron Phenomenon in Deep Reinforcement Learning",
as implemented in google/dopamine `labs/redo` (defaults = the paper's DQN, Dopamine's `dqn.gin`):

    frames [B,4,84,84] -> Nature CNN (Flax SAME padding) [B,64,11,11] -> flatten [B,7744]
    -> dense 512 -> ReLU -> linear Q head.

Every `--redo-period` gradient updates, a fresh replay sample scores each hidden neuron (a conv channel or
a dense unit) by its mean |activation| divided by its layer's mean; neurons with score <= tau are dormant.
Their incoming weights are redrawn from the initializer (biases zeroed), their outgoing weights zeroed,
and Adam's moments of exactly those weights zeroed.

Replay ratio: every `--train-frequency` (4) agent steps, `--replay-ratio` x 4 gradient updates (0.25: one,
the default DQN; 1: four), as the official agent's `num_updates_per_train_step`. The target network is
copied every 8000 agent steps whatever the replay ratio. The file reads in four parts: the method; the research
knobs (one ablation); the run plumbing; the main loop. Deviations from the official code: docs/dqn_redo.md.
"""
import contextlib
import ctypes
import dataclasses
import functools
import glob
import io
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import zipfile
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter

gym.register_envs(ale_py)


# =====================================================================================================================
# The method: DQN with ReDo, as the paper states it (environment, encoder, network, replay, loss, update, ReDo,
# training step). No research knob is read in this part.
# =====================================================================================================================
@dataclass
class Args:
    # Environment (Dopamine's Atari defaults)
    env_id: str = "ALE/Breakout-v5"
    """the id of the ALE environment"""
    repeat_action_probability: float = 0.25
    """sticky-action probability of the ALE"""
    max_episode_steps: int = 27_000
    """episodes are truncated after this many agent steps (4 frames each)"""

    # Algorithm (dqn.gin)
    total_timesteps: int = 2_500_000
    """total agent steps of the experiment (4 frames each: 2.5M steps = 10M frames, the paper's runs)"""
    learning_rate: float = 6.25e-5
    """the learning rate of the Adam optimizer"""
    adam_eps: float = 1.5e-4
    """the epsilon of the Adam optimizer"""
    buffer_size: int = 1_000_000
    """the replay memory capacity, in transitions"""
    gamma: float = 0.99
    """the discount factor gamma"""
    target_network_frequency: int = 8000
    """the agent steps between copies of the online network into the target network, whatever the replay ratio"""
    batch_size: int = 32
    """the batch size of samples from the replay memory"""
    start_e: float = 1.0
    """the starting epsilon for exploration"""
    end_e: float = 0.01
    """the ending epsilon for exploration"""
    exploration_steps: int = 250_000
    """the agent steps, after `learning_starts`, over which epsilon decays linearly from start-e to end-e"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy"""
    learning_starts: int = 20_000
    """agent steps of warm-up (random actions, no learning)"""
    train_frequency: int = 4
    """agent steps between training steps (Dopamine's update_period)"""
    replay_ratio: float = 0.25
    """gradient updates per agent step: each training step makes replay-ratio x train-frequency updates"""

    # ReDo
    redo: bool = True
    """recycle dormant neurons (--no-redo: plain DQN; dormancy is logged either way)"""
    redo_tau: float = 0.025
    """dormancy threshold: a neuron is recycled when its score <= tau (paper: 0.025 at replay ratio 0.25, else 0.1)"""
    redo_period: int = 1000
    """recycle dormant neurons every this many gradient updates"""
    redo_batch_size: int = 64
    """size of the fresh uniform replay sample that scores the neurons at each ReDo event"""

    # Research knob, off by default (the "Research knobs" part below)
    redo_reset_adam_step: bool = False
    """ablation, the PyTorch port's behaviour (timoklein/redo): also restart Adam's step count of every parameter
    at each ReDo event (the official code never does)"""

    # The run: seeding, device, tracking, checkpoints, logging, evaluation
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available"""
    cuda_graphs: bool = False
    """on CUDA, record the acting forward and each whole update (batch gather, loss, backward, Adam step) as CUDA
    graphs (same math, far fewer kernel launches); opt-in until tests/test_cuda.py has passed on a GPU"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanrl-moe"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the agent performances (check out `videos` folder)"""
    save_model: bool = False
    """whether to save the final model into `runs/{run_name}` and evaluate it"""
    eval_episodes: int = 10
    """number of evaluation episodes run after training when `--save-model` is set"""
    checkpoint_every: int = 0
    """save a resumable checkpoint every this many agent steps (0: only on SIGTERM and non-finite loss)"""
    resume: Optional[str] = None
    """path of a checkpoint to resume; the run keeps the checkpoint's flags unless given again"""
    log_frequency: int = 1000
    """log losses and SPS every this many agent steps"""
    stats_frequency: int = 50_000
    """log dormant-neuron statistics (at tau 0 and at --redo-tau) every this many agent steps, ReDo on or off"""
    stats_batch_size: int = 256
    """size of the replay sample used for the logged dormant-neuron statistics"""


# >>> shared block: env
def make_env(env_id, seed, repeat_action_probability=0.25, max_episode_steps=27_000, noop_max=0,
             capture_video=False, video_dir="videos", video_prefix="rl-video"):
    """One Atari environment preprocessed as Dopamine does (frame skip 4 with max-pool over the last two
    frames, 84x84 grey, minimal action set, sticky actions, episodes cut at max_episode_steps agent steps).
    Observations are single frames [84, 84]; the training loop stacks them. Rewards are raw game scores."""
    env = gym.make(
        env_id,
        frameskip=1,  # AtariPreprocessing skips frames and max-pools
        repeat_action_probability=repeat_action_probability,
        full_action_space=False,
        max_num_frames_per_episode=4 * max_episode_steps,  # the ALE truncates, so its state holds the count
        render_mode="rgb_array" if capture_video else None,
    )
    if capture_video:
        env = gym.wrappers.RecordVideo(env, video_dir, name_prefix=video_prefix)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=noop_max, frame_skip=4, screen_size=84)
    env.action_space.seed(seed)
    return env


def clip_reward(reward):
    """The reward the agent learns from: Dopamine's Runner clips the game's reward to [-1, 1]; the logged episodic
    return sums the raw game score."""
    return np.clip(reward, -1.0, 1.0)
# <<< shared block: env


def make_training_env(args, run_name):
    """The training environment of dqn.gin: sticky actions (--repeat-action-probability; `sticky_actions = True`),
    frame skip 4, no no-op starts, episodes cut at --max-episode-steps agent steps; a lost life is not terminal."""
    return make_env(args.env_id, args.seed, args.repeat_action_probability, args.max_episode_steps,
                    capture_video=args.capture_video, video_dir=f"videos/{run_name}")


# >>> shared block: nature
def xavier_(layer):
    """Flax's xavier_uniform kernel and zero bias (Dopamine's init for convs and dense layers)."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def same_padding(size, kernel, stride):
    """TF/Flax 'SAME' padding (before, after): output = ceil(size / stride), the extra pixel goes after."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with Flax 'SAME' padding, which `nn.Conv2d(padding='same')` supports only for stride 1."""

    def forward(self, x):
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if (top, left) == (bottom, right):  # symmetric: the conv pads by itself, without a padded copy of x
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        return super().forward(F.pad(x, (left, right, top, bottom)))


class NatureEncoder(nn.Module):
    """Nature DQN torso with SAME padding: [B, 4, 84, 84] in [0, 1] -> [B, 64, 11, 11]."""

    output_shape = (64, 11, 11)

    def __init__(self):
        super().__init__()
        self.conv1 = xavier_(SameConv2d(4, 32, 8, stride=4))
        self.conv2 = xavier_(SameConv2d(32, 64, 4, stride=2))
        self.conv3 = xavier_(SameConv2d(64, 64, 3, stride=1))

    def forward(self, x, record=None):
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: oneDNN's faster layout for these convs (same values)
        for name in ("conv1", "conv2", "conv3"):
            x = F.relu(getattr(self, name)(x), inplace=True)  # in place: a conv's backward needs its input only
            if record is not None:
                record[name] = x
        return x
# <<< shared block: nature


class QNetwork(nn.Module):
    """Dopamine's Nature DQN (the ReDo lab's `ScalableNatureDQNNetwork`): uint8 frame stacks [B, 4, 84, 84]
    -> Nature CNN with SAME padding [B, 64, 11, 11] -> flatten (NCHW: 7744) -> dense 512 -> ReLU -> Q-values."""

    def __init__(self, num_actions):
        super().__init__()
        self.encoder = NatureEncoder()
        self.hidden = xavier_(nn.Linear(math.prod(self.encoder.output_shape), 512))
        self.head = xavier_(nn.Linear(512, num_actions))

    def forward(self, x, record=None):
        """`record`, when a dict, receives the post-ReLU activations [B, neurons, ...] of the hidden layers."""
        x = self.encoder(x.float() / 255.0, record)
        x = F.relu(self.hidden(x.flatten(1)))
        if record is not None:
            record["hidden"] = x
        return self.head(x)

    def redo_layers(self):
        """(name, incoming parameters, outgoing weights) of every hidden layer, in forward order (`recycle_dormant`);
        `name` is its `record` key. The Q head has no entry: it is never scored nor recycled."""
        e = self.encoder
        return [("conv1", incoming(e.conv1), outgoing(e.conv2)), ("conv2", incoming(e.conv2), outgoing(e.conv3)),
                ("conv3", incoming(e.conv3), outgoing(self.hidden)), ("hidden", incoming(self.hidden), outgoing(self.head))]


# >>> shared block: replay
class ReplayMemory:
    """Circular replay memory that stores every frame once and rebuilds frame stacks at sample time.

    Slot t holds the newest frame of observation t with the action, clipped reward and flags of the
    transition taken from it. When an episode ends (termination or truncation) its final frame is written
    to an extra slot that is never sampled, so the next state of every transition lives k slots later.
    Stacks never reach into an earlier episode: they are padded with the episode's first frame, as
    `FrameStackObservation(padding_type="reset")` and the training loop do. n-step returns stop at the
    episode's end; a termination zeroes the bootstrap, a truncation keeps it.
    Frames and per-slot data live on `device` (the training GPU when they fit), so that a batch is gathered
    there by tensor indexing alone (inside the CUDA graph of an update); indices are drawn on the host."""

    def __init__(self, capacity, frame_shape=(84, 84), stack_size=4, n_step=1, gamma=0.99, device="cpu"):
        self.capacity, self.stack_size, self.n_step, self.gamma = capacity, stack_size, n_step, gamma
        self.device = device = torch.device(device)
        self.frames = torch.zeros((capacity, *frame_shape), dtype=torch.uint8, device=device)
        self.action = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.reward = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.terminated = torch.zeros(capacity, dtype=torch.bool, device=device)  # the transition ended in a termination
        self.episode_end = torch.zeros(capacity, dtype=torch.bool, device=device)  # ... was the last of its episode
        self.history = torch.zeros(capacity, dtype=torch.uint8, device=device)  # earlier frames of the episode in the stack
        self.is_transition = np.zeros(capacity, bool)  # False for an episode's final frame; on the host, for sampling
        self.discount_powers = gamma ** torch.arange(n_step, dtype=torch.float64, device=device)
        self.cursor = 0  # number of slots ever written
        self.episode_step = 0

    @staticmethod
    def bytes_per_slot(frame_shape=(84, 84)):
        return int(np.prod(frame_shape)) + 4 + 4 + 1 + 1 + 1 + 1

    def __len__(self):
        return min(self.cursor, self.capacity)

    def _write(self, frame, action, reward, terminated, episode_end, is_transition):
        slot = self.cursor % self.capacity
        self.frames[slot] = torch.as_tensor(frame)  # on a GPU: a copy from host memory, which waits for the GPU
        # fill_ launches a kernel; `self.action[slot] = action` would copy a CPU scalar and wait for the GPU each time
        self.action[slot].fill_(action)
        self.reward[slot].fill_(reward)
        self.terminated[slot].fill_(terminated)
        self.episode_end[slot].fill_(episode_end)
        self.history[slot].fill_(min(self.episode_step, self.stack_size - 1))
        self.is_transition[slot] = is_transition
        self.episode_step += 1
        self.cursor += 1

    def add(self, frame, action, reward, terminated, truncated, next_frame):
        """Store the transition (frame, action, reward) taken from the current observation, whose newest
        frame is `frame`. At an episode's end `next_frame` (the final observation) is stored too."""
        done = bool(terminated or truncated)
        self._write(frame, action, reward, bool(terminated), done, True)
        if done:
            self._write(next_frame, 0, 0.0, False, False, False)
            self.episode_step = 0

    def sample_range(self):
        """Linear indices [lo, hi] that may be sampled: the oldest stack_size - 1 slots may have lost their
        history to overwriting, and the newest n_step slots lack their n-step future."""
        return max(0, self.cursor - self.capacity) + self.stack_size - 1, self.cursor - 1 - self.n_step

    def is_valid(self, index):
        lo, hi = self.sample_range()
        return (index >= lo) & (index <= hi) & self.is_transition[index % self.capacity]

    def sample_indices(self, batch_size, rng):
        """Uniform over the valid transitions (rejection sampling; final-frame slots are rare). The cost does not grow
        with the memory: only a sampler that keeps drawing invalid slots checks whether any valid one exists."""
        lo, hi = self.sample_range()
        chosen = np.empty(0, np.int64)
        for attempt in itertools.count():
            if hi < lo or attempt == 64 and not self.is_valid(np.arange(lo, hi + 1)).any():
                raise RuntimeError("the replay memory holds no complete transition yet")
            if len(chosen) >= batch_size:
                return chosen[:batch_size]
            candidates = rng.integers(lo, hi + 1, size=2 * batch_size)
            chosen = np.concatenate([chosen, candidates[self.is_valid(candidates)]])

    def stacks(self, index):
        """Frame stacks [B, stack_size, *frame_shape] of the observations at linear indices `index` [B]."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        back = torch.arange(self.stack_size - 1, -1, -1, device=self.device)  # oldest frame first
        back = torch.minimum(back[None, :], self.history[index % self.capacity][:, None])
        slots = (index[:, None] - back) % self.capacity
        # index_select copies whole frames; indexing with a 2-D tensor copies element by element (16x slower on a CPU)
        return self.frames.index_select(0, slots.flatten()).view(*slots.shape, *self.frames.shape[1:])

    def get(self, index):
        """The transitions at linear indices `index` [B] (numpy or a tensor), with n-step returns and bootstrap
        discounts: target = returns + discounts * V(next_obs). Tensor operations only, on the memory's device."""
        index = torch.as_tensor(index, dtype=torch.int64, device=self.device)
        window = (index[:, None] + torch.arange(self.n_step, device=self.device)) % self.capacity  # [B, n]
        ended = self.episode_end[window].int()
        in_episode = (ended.cumsum(1) - ended) == 0  # reward k belongs to the same episode as step 0
        returns = (self.reward[window].double() * self.discount_powers * in_episode).sum(1)
        length = in_episode.sum(1)
        terminated = (self.terminated[window] & in_episode).any(1)
        discounts = torch.where(terminated, 0.0, self.gamma**length.double())
        return {
            "obs": self.stacks(index),
            "actions": self.action[index % self.capacity].long(),
            "returns": returns.float(),
            "discounts": discounts.float(),
            "next_obs": self.stacks(index + length),
        }

    def slots(self, first, end):
        """The per-slot data of the linear indices [first, end), which must lie in one pass over the slots, as numpy
        arrays (views, for a memory in RAM): what a checkpoint's replay segment holds."""
        start = first % self.capacity
        data = {k: getattr(self, k)[start:start + end - first].cpu().numpy() for k in self.slot_fields}
        return {**data, "is_transition": self.is_transition[start:start + end - first]}

    def load_slots(self, first, data):
        start, count = first % self.capacity, len(data["is_transition"])
        for k in self.slot_fields:
            getattr(self, k)[start:start + count].copy_(torch.from_numpy(data[k]))  # into the storage, no temporary
        self.is_transition[start:start + count] = data["is_transition"]

    def state_dict(self):
        return {"cursor": self.cursor, "episode_step": self.episode_step}

    def load_state_dict(self, state):
        self.cursor, self.episode_step = state["cursor"], state["episode_step"]

    slot_fields = ("frames", "action", "reward", "terminated", "episode_end", "history")
# <<< shared block: replay


def make_replay(args, device):
    """dqn.gin's uniform replay memory: --buffer-size transitions, 1-step returns (`update_horizon = 1`)
    discounted by --gamma."""
    return ReplayMemory(args.buffer_size, n_step=1, gamma=args.gamma, device=device)


# >>> shared block: epsilon_greedy
def linear_schedule(start_e, end_e, duration, t):
    """start_e at t = 0, linear to end_e at t = duration, end_e after."""
    slope = (end_e - start_e) / duration
    return max(slope * t + start_e, end_e)


def epsilon_at(args, step):
    """Dopamine's linearly_decaying_epsilon: start-e through the warm-up, then linear to end-e."""
    return linear_schedule(args.start_e, args.end_e, args.exploration_steps, max(0, step - args.learning_starts))


def greedy_action(q_network, obs):
    """argmax_a Q(obs, a) [B] (recorded as a CUDA graph on GPUs)."""
    with torch.no_grad():
        return q_network(obs).argmax(dim=1)
# <<< shared block: epsilon_greedy


# >>> shared block: optimizer
def make_optimizer(args, q_network):
    """Adam with Dopamine's learning rate and epsilon, fused into one kernel over all parameters (CPU and CUDA).
    `found_inf`, set by `update`, makes that kernel skip a step whose loss is not finite (as AMP's GradScaler does),
    so the weights stay finite without a host sync before the step; `capturable` lets a CUDA graph record the step."""
    device = next(q_network.parameters()).device
    optimizer = torch.optim.Adam(q_network.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True,
                                 capturable=device.type == "cuda")
    optimizer.found_inf = torch.zeros((), device=device)
    return optimizer
# <<< shared block: optimizer


def dqn_loss(q_network, target_network, batch, record=None):
    """Huber loss (delta 1, Dopamine's huber_loss) between Q(s, a) and the target R + discount * max_a'
    Q_target(s', a'), where the discount is gamma, or 0 after a termination (from the replay memory). Returns (loss,
    Q(s, a) [B])."""
    with torch.no_grad():
        target_max = target_network(batch["next_obs"]).max(dim=1).values
        td_target = batch["returns"] + batch["discounts"] * target_max
    q_taken = q_network(batch["obs"], record).gather(1, batch["actions"].unsqueeze(1)).squeeze(1)
    return F.smooth_l1_loss(q_taken, td_target, beta=1.0), q_taken


# >>> shared block: dqn_update
def update(q_network, target_network, optimizer, rb, index, extra_losses=None):
    """One gradient step on the replay transitions at linear indices `index` [B] (on the memory's device): gather the
    batch, TD loss (plus any `extra_losses(record)`, {name: loss} from the same forward pass), backward, Adam step.
    Recorded as one CUDA graph on GPUs. Returns {"td_loss", "q_values" (mean Q(s, a)), and each extra loss's name} as
    tensors; a non-finite loss leaves the weights and Adam's state unchanged (`make_optimizer`)."""
    device = next(q_network.parameters()).device
    batch = {k: v.to(device) for k, v in rb.get(index).items()}  # a no-op when the memory is on that device
    record = {} if extra_losses else None
    loss, q_taken = dqn_loss(q_network, target_network, batch, record)
    extra = extra_losses(record) if extra_losses else {}
    total = loss + sum(extra.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.found_inf.copy_(~torch.isfinite(total))
    optimizer.step()
    return {"td_loss": loss.detach(), "q_values": q_taken.detach().mean(), **{k: v.detach() for k, v in extra.items()}}
# <<< shared block: dqn_update


# ReDo. These functions work for any network whose forward(x, record) records the post-ReLU activations
# [B, neurons, ...] of the layers that its redo_layers() lists as (name, incoming parameters, outgoing weights).
# >>> shared block: dormant
def neuron_scores(activation):
    """ReDo's score: mean |activation| over everything but the neuron axis (dim 1: channels, units or
    (expert, unit) pairs), divided by the layer's mean score (Sokar et al. 2023, mean normalization)."""
    score = activation.abs().mean(dim=[d for d in range(activation.dim()) if d != 1])
    return score / (score.mean() + 1e-9)


def dormant_statistics(activations, taus):
    """Percentage of tau-dormant neurons (score <= tau) per layer and pooled over all layers of `activations`
    ({layer name: post-ReLU activations [B, neurons, ...]})."""
    stats = {}
    for tau in taus:
        dormant, total = 0, 0
        for name, activation in activations.items():
            mask = neuron_scores(activation) <= tau
            stats[f"dormant/{name}_tau{tau:g}_pct"] = 100.0 * mask.float().mean().item()
            dormant, total = dormant + mask.sum().item(), total + mask.numel()
        stats[f"dormant/tau{tau:g}_pct"] = 100.0 * dormant / total
    return stats
# <<< shared block: dormant


# >>> shared block: redo
def incoming(layer, init_=nn.init.xavier_uniform_):
    """The incoming parameters of a layer's neurons (a Linear's output units, a Conv2d's channels), as ReDo renews
    them: [(parameter, neuron axes, fresh values)] (see `neuron_entries`, `recycle_dormant`). The weight is redrawn
    from `init_`, the layer's construction-time initializer, applied to a whole new weight tensor (so with its fans);
    the bias is zeroed, as the official recycler does. A layer with a `redo_incoming()` (noisy layers, experts) says
    itself."""
    if hasattr(layer, "redo_incoming"):
        return layer.redo_incoming()
    return [(layer.weight, (0,), lambda w: init_(torch.empty_like(w))), (layer.bias, (0,), torch.zeros_like)]


def outgoing(*layers):
    """The outgoing weights of the neurons that `layers` read, as [(parameter, neuron axes)]: dim 1 of a Linear or
    Conv2d weight (its inputs); a layer with a `redo_input_weights()` (noisy layers, experts) says itself."""
    return [entry for layer in layers
            for entry in (layer.redo_input_weights() if hasattr(layer, "redo_input_weights") else [(layer.weight, (1,))])]


def neuron_entries(dormant, param, axes):
    """The entries of `param` that belong to the neurons marked in `dormant` [N], as a boolean mask shaped like
    `param`. The neuron index runs over the dims `axes` of `param` (ascending) in row-major order: (0,) for a
    Linear's output units, (0, 2) for the units (expert e, unit j) -> e*h + j of experts' [n, d, h] kernel. Where
    those dims hold k x N entries, neuron i owns the k consecutive ones i*k ... i*k + k - 1: a conv channel c feeds the
    inputs c*H*W ... (c+1)*H*W - 1 of an NCHW flatten."""
    sizes = [param.shape[d] for d in axes]
    owned = dormant.repeat_interleave(math.prod(sizes) // dormant.numel()).view(sizes)
    return owned.view([param.shape[d] if d in axes else 1 for d in range(param.dim())]).expand_as(param)


def dormant_neurons(network, obs, tau):
    """Masks and scores {layer name: [neurons]} of the hidden neurons of `network` on the batch `obs`.

    Score = mean |post-ReLU activation| over the batch (and positions, for a conv channel) divided by the
    layer's mean score; a neuron is tau-dormant when its score <= tau (tau = 0: silent on the whole batch). The network
    runs in eval mode, i.e. noisy layers on their mean weights."""
    record, training = {}, network.training
    network.eval()
    with torch.no_grad():
        network(obs, record)
    network.train(training)
    scores = {name: neuron_scores(record[name]) for name, _, _ in network.redo_layers()}
    return {name: score <= tau for name, score in scores.items()}, scores


@torch.no_grad()
def recycle_dormant(network, optimizer, masks):
    """Recycle the neurons marked in `masks` (from `dormant_neurons`) in place; returns their count per layer.

    `network.redo_layers()` lists every hidden layer as (name, incoming parameters of its neurons, their outgoing
    weights) (see `incoming`, `outgoing`). As the official code, with every mask computed before any change: (1) renew
    the incoming parameters of every dormant neuron (weights redrawn from their initializer, biases zeroed); (2) then
    zero its outgoing weights, so that a weight between two recycled neurons ends at 0; (3) zero the optimizer's
    per-entry state (Adam's exp_avg and exp_avg_sq) at exactly the weight entries touched. Adam's step count and the
    moments of biases (parameters with one entry per neuron) are left alone."""
    touched = {}  # weight -> entries that were redrawn or zeroed
    layers = network.redo_layers()
    for name, renewed, _ in layers:  # (1) incoming weights and biases
        for param, axes, fresh in renewed:
            dead = neuron_entries(masks[name], param, axes)
            param[dead] = fresh(param)[dead]
            if len(axes) < param.dim():  # a weight; a bias holds one entry per neuron and keeps its moments
                touched[param] = touched.get(param, False) | dead
    for name, _, zeroed in layers:  # (2) outgoing weights, after every redraw
        for param, axes in zeroed:
            dead = neuron_entries(masks[name], param, axes)
            param[dead] = 0.0
            touched[param] = touched.get(param, False) | dead
    for param, reset in touched.items():  # (3) optimizer state of the touched entries only
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value[reset] = 0.0
    return {name: int(masks[name].sum()) for name, _, _ in layers}
# <<< shared block: redo


def updates_at(args, step):
    """Numbers (counted from 1 after the warm-up) of the gradient updates made at agent step `step`:
    replay-ratio x train-frequency updates every train-frequency agent steps after the warm-up."""
    if step <= args.learning_starts or step % args.train_frequency != 0:
        return range(0)
    per_step = round(args.replay_ratio * args.train_frequency)
    first = (step // args.train_frequency - args.learning_starts // args.train_frequency - 1) * per_step + 1
    return range(first, first + per_step)


def train_step(step, args, q_network, target_network, optimizer, rb, rng, update_fn=update, after_recycle=None):
    """Dopamine's _train_step at agent step `step`, as the ReDo agent runs it: the updates of `updates_at` on uniform
    replay samples, each followed by a ReDo event when its number is a multiple of redo-period (then
    `after_recycle(optimizer)`), and a hard target copy every target-network-frequency agent steps. `update_fn` is
    `update` or its CUDA graph. Returns the metrics of each update and the events to log: the neurons recycled per
    layer (redo/<layer>_recycled_count) and in all (redo/recycled_count), summed over the step's ReDo events."""
    updates, recycled = [], {}
    for number in updates_at(args, step):
        index = torch.as_tensor(rb.sample_indices(args.batch_size, rng), device=rb.device)
        # a CUDA graph returns the same output tensors at every replay: keep this update's own values
        updates.append({name: value.clone() for name, value in update_fn(q_network, target_network, optimizer, rb,
                                                                          index).items()})
        if args.redo and number % args.redo_period == 0:
            # the neurons are scored on a fresh uniform sample, with the parameters of this update
            probe = rb.stacks(rb.sample_indices(args.redo_batch_size, rng)).to(next(q_network.parameters()).device)
            masks, _ = dormant_neurons(q_network, probe, args.redo_tau)
            for name, count in recycle_dormant(q_network, optimizer, masks).items():
                recycled[name] = recycled.get(name, 0) + count
            if after_recycle:
                after_recycle(optimizer)
    if step > args.learning_starts and step % args.target_network_frequency == 0:
        target_network.load_state_dict(q_network.state_dict())  # in place: a CUDA graph sees the new weights
    events = {f"redo/{name}_recycled_count": count for name, count in recycled.items()}
    return updates, {**events, "redo/recycled_count": sum(recycled.values())} if recycled else {}


def evaluation_settings(args):
    """How `evaluate` plays the trained agent after --save-model: epsilon-greedy with --eval-epsilon
    (dqn.gin's `epsilon_eval`), on environments seeded apart from training's (no no-op starts, as training)."""
    return {"epsilon": args.eval_epsilon, "seed": args.seed + 1000}


# =====================================================================================================================
# Research knobs: the ablation of the PyTorch port (--redo-reset-adam-step), off by default. It enters the method in
# one place, `research_knobs`; cut this part and that call, and the script runs its defaults.
# =====================================================================================================================
def reset_adam_steps(optimizer):
    """--redo-reset-adam-step, the PyTorch port's behaviour (timoklein/redo): after each ReDo event, Adam's step count
    of every parameter restarts (and with it the bias correction of the whole network); the official code never does."""
    for state in optimizer.state.values():
        state["step"].zero_()


def research_knobs(args):
    """The hooks that plug the knob in; with it off, the paper's network and no hook."""
    return Hooks(QNetwork, after_recycle=reset_adam_steps if args.redo_reset_adam_step else None)


# =====================================================================================================================
# Run plumbing: what a training run needs besides the method (environment state, statistics, failure and resource
# checks, checkpoints, flags, progress, CUDA graphs, evaluation). Nothing below changes what the agent learns.
# =====================================================================================================================
# >>> shared block: envstate
def get_env_state(env):
    """Everything needed to continue the current episode bit-exactly after a restart."""
    pre = env
    while not isinstance(pre, gym.wrappers.AtariPreprocessing):
        pre = pre.env
    ale_state = env.unwrapped.ale.cloneState(include_rng=True).serialize()
    return {
        "ale": torch.frombuffer(bytearray(ale_state), dtype=torch.uint8),
        "obs_buffer": torch.from_numpy(np.stack(pre.obs_buffer)),
        "lives": pre.lives,
        "game_over": pre.game_over,
        "np_random": env.unwrapped.np_random.bit_generator.state,
    }


def set_env_state(env, state):
    pre = env
    while not isinstance(pre, gym.wrappers.AtariPreprocessing):
        pre = pre.env
    env.unwrapped.ale.restoreState(ale_py.ALEState(state["ale"].numpy().tobytes()))
    for buffer, saved in zip(pre.obs_buffer, state["obs_buffer"].numpy()):
        buffer[...] = saved
    pre.lives, pre.game_over = state["lives"], state["game_over"]
    env.unwrapped.np_random.bit_generator.state = state["np_random"]
# <<< shared block: envstate


# >>> shared block: runtime
def fail(message):
    """Stop at start-up with one line that names the flag and the fix."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_numbers(args):
    """Every float flag is finite and the seed is one that numpy, torch and the ALE all accept."""
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    if not 0 <= args.seed < 2**31:
        fail(f"--seed must be in [0, 2**31), got {args.seed}")


def check_env_id(env_id):
    """The ALE id, or a one-line error naming --env-id."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        spec = None
    if spec is None or "ale_py" not in str(spec.entry_point):
        fail(f"--env-id {env_id!r} is not an Atari environment of ale-py; use an id such as ALE/Breakout-v5")


def available_ram_bytes(proc_cgroup="/proc/self/cgroup", cgroup_root="/sys/fs/cgroup"):
    """Memory this process may still take: the machine's MemAvailable, or less when a cgroup (Slurm's --mem, a
    container) limits it: (limit - usage) of its cgroup and every ancestor, cgroup v2 (memory.max, memory.current) or
    v1 (memory.limit_in_bytes, memory.usage_in_bytes). Unlimited or unreadable files count as no limit."""
    try:
        with open("/proc/meminfo") as f:
            free = [next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))]
    except (OSError, StopIteration):
        free = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")]
    try:
        with open(proc_cgroup) as f:
            entries = [line.strip().split(":", 2) for line in f if line.count(":") >= 2]
    except OSError:
        entries = []
    for hierarchy, controllers, path in entries:
        if hierarchy == "0":  # cgroup v2
            base, files = cgroup_root, ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            base, files = os.path.join(cgroup_root, "memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):  # the cgroup itself and its ancestors
            folder = os.path.join(base, *parts[:depth])
            try:
                with open(os.path.join(folder, files[0])) as f_limit, open(os.path.join(folder, files[1])) as f_usage:
                    free.append(int(f_limit.read()) - int(f_usage.read()))  # "max" (no limit) is no int
            except (OSError, ValueError):
                pass
    return max(0, min(free))


def update_gpu_bytes(make_network, batch_size, num_actions=18, activation_factor=3, margin=1 << 30):
    """An estimate of the GPU memory that training takes beside the replay memory (`place_replay`'s reserve): 5 x the
    parameter bytes (the weights, their gradients, Adam's two moments, the target network), plus activation_factor x
    the activations that one forward pass of a training batch saves for backward, plus `margin`.

    The network `make_network(num_actions)` is built and run on PyTorch's meta device: shapes only, no memory, no
    arithmetic, no random draw (training's generators are untouched), the same bytes on any machine. 18 actions, the
    Atari maximum, bound the head. The factor 3 covers what the backward pass and the update's other forward passes
    (the target's, without gradients) hold beside the saved activations: on a CPU, one update's peak RSS grew 2.5x
    the saved bytes with big experts (0.91 GiB a state, 0.36 GiB saved), 1.1-2.8x with the four scripts' default
    networks. The 1 GiB margin is for what no network accounts for: the CUDA libraries' handles, workspaces and
    lazily loaded kernels, the caching allocator's rounding, the statistics probe's activations (under 0.3 GiB at
    --stats-batch-size 256 with the default networks). Not measured on a GPU."""
    with torch.device("meta"):
        network = make_network(num_actions)
    own = {t.untyped_storage()._cdata for t in [*network.parameters(), *network.buffers()]}
    saved = {}  # storage -> (bytes, a tensor that keeps it, so that no other storage takes its place)

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in own:
            saved[storage._cdata] = (storage.nbytes(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network(torch.zeros(batch_size, 4, 84, 84, dtype=torch.uint8, device="meta"))
    parameter_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    return 5 * parameter_bytes + activation_factor * sum(nbytes for nbytes, _ in saved.values()) + margin


def place_replay(capacity, device, bytes_per_slot, resuming=False, gpu_reserve=2 << 30, ram_reserve=1 << 30):
    """The device for the replay memory: the training GPU when it fits there beside `gpu_reserve` bytes (what
    training takes: the main block passes `update_gpu_bytes`), else host RAM, else an error."""
    needed = capacity * bytes_per_slot
    if device.type == "cuda":
        free_gpu = torch.cuda.mem_get_info(device)[0]
        if needed + gpu_reserve <= free_gpu:
            return device
        print(f"replay memory: {needed / 2**30:.1f} GiB does not fit on {device} beside the {gpu_reserve / 2**30:.1f} "
              f"GiB that training takes ({free_gpu / 2**30:.1f} GiB free); it goes to RAM", flush=True)
    free_ram = available_ram_bytes()
    if needed + ram_reserve <= free_ram:
        return torch.device("cpu")
    where = f"{free_ram / 2**30:.1f} GiB of RAM" + (" (and too little GPU memory)" if device.type == "cuda" else "")
    fix = (f"free memory or resume on a machine with {(needed + ram_reserve) / 2**30:.1f} GiB available" if resuming
           else f"lower --buffer-size to at most {max(0, free_ram - ram_reserve) // bytes_per_slot}")
    fail(f"--buffer-size {capacity}: the replay memory needs {needed / 2**30:.1f} GiB but only {where} is free; {fix}")


def make_run_dir(args):
    """runs/<env>__<exp-name>__<seed>__<time>, created here; a run started in the same second gets -2, -3, ...
    (mkdir is atomic, so two runs never share a directory)."""
    base = f"runs/{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    for attempt in itertools.count(1):
        run_dir = base if attempt == 1 else f"{base}-{attempt}"
        try:
            os.makedirs(run_dir)
            return run_dir
        except FileExistsError:
            continue
        except OSError as error:
            fail(f"cannot create the run directory {run_dir}: {error.strerror}; start the run from a writable directory")


class StopSignal:
    """SIGTERM (Slurm, preemption) and SIGINT (Ctrl-C) ask the run to stop at the next safe point, in training and in
    evaluation alike: it then saves a checkpoint, prints how to resume and exits with 128 + the signal's number."""

    def __init__(self):
        self.signum = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.request)

    def request(self, signum, frame):
        self.signum = signum

    def __bool__(self):
        return self.signum is not None


def write_json(path, data):
    """result.json and the like: written whole or not at all; a storage error ends the run with one line."""
    try:
        with open(f"{path}.tmp", "w") as f:
            json.dump(data, f, indent=1)
        os.replace(f"{path}.tmp", path)
    except OSError as error:
        exit_run(f"error: cannot write {path}: {error.strerror or error}; the checkpoint, if any, is intact", 1)


def exit_run(message, code):
    """End a started run with one line (no traceback); the checkpoint, if any, has been written."""
    print(("\n" if sys.stdout.isatty() else "") + message, file=sys.stderr if code not in (0, 130, 143) else sys.stdout,
          flush=True)
    raise SystemExit(code)


def keep_freed_memory():
    """Keep freed blocks of up to 32 MiB in the heap for reuse (glibc; elsewhere a no-op). glibc otherwise returns
    them to the OS, and each update on a CPU page-faults its activations back in: thousands of page faults per
    SoftMoE-8 update of dqn_softmoe, whose experts' hidden layer alone takes 8 MiB. Larger blocks, such as the replay
    memory, are still mapped and unmapped on their own."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # another C library, such as musl
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest allowed value
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
# <<< shared block: runtime


# >>> shared block: checkpoint
CHECKPOINT_FORMAT = 3  # version of the layout below; a checkpoint of another version is refused with one line
SEGMENT_SLOTS = 50_000  # replay slots per segment file (about 350 MB of Atari frames)


def segment_name(first, end):
    return f"replay-{first:012d}-{end:012d}.npz"


class Checkpoint:
    """A run's checkpoint folder: `state.pt` (networks, optimizer, environment, random generators, counters, and the
    replay segments it names) and the replay memory as segment files `replay-<first>-<end>.npz`, linear indices
    [first, end). Full segments (SEGMENT_SLOTS slots, or up to the end of a pass over the memory's slots) are written
    while training runs, as the memory fills (`stream`): append-only, fsynced, never rewritten. A save writes the
    partial segment since the last full one, then `state.pt` (a temporary file, flushed and renamed over the previous
    one), and last deletes the files that the new state.pt no longer names (the partial it replaced, segments the memory
    has overwritten). So a save - periodic, on a signal, on a non-finite loss - writes at most one segment whatever the
    memory's size; a stop at any moment leaves the last complete checkpoint loadable; the disk holds the stored
    transitions, not the capacity. Every path inside is relative to the folder, so a folder copied elsewhere resumes.
    Loading unpickles no code: `torch.load(weights_only=True)` and `np.load(allow_pickle=False)`."""

    def __init__(self, folder):
        self.folder, self.full = folder, []  # full: the (first, end) of the full segments written here, oldest first
        self.committed = set()  # the segment files that the state.pt on disk names

    def segment_end(self, first, rb):
        return min((first // SEGMENT_SLOTS + 1) * SEGMENT_SLOTS, (first // rb.capacity + 1) * rb.capacity)

    def stream(self, rb):
        """Write the full segments that the memory has completed since the last one (a no-op on most steps)."""
        first = self.full[-1][1] if self.full else rb.cursor - len(rb)
        while (end := self.segment_end(first, rb)) <= rb.cursor:
            self._guarded(lambda: self._write_segment(rb, first, end), "cannot write a replay segment in")
            self.full.append((first, end))
            first = end
        oldest = rb.cursor - len(rb)
        for segment in [segment for segment in self.full if segment[1] <= oldest]:  # overwritten by the memory
            self.full.remove(segment)
            if segment_name(*segment) not in self.committed:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.folder, segment_name(*segment)))

    def save(self, state, rb=None):
        """Write `state` with the memory `rb` (None: an evaluation after training may leave it out, and then the run
        cannot train further); on a storage error the run ends with one line and the previous checkpoint intact."""
        replay, names = None, set()
        if rb is not None:
            self.stream(rb)
            oldest = rb.cursor - len(rb)
            segments = [(first, end) for first, end in self.full if end > oldest]
            first = segments[-1][1] if segments else oldest
            if first < rb.cursor:  # the partial segment since the last full one
                self._guarded(lambda: self._write_segment(rb, first, rb.cursor), "cannot write a replay segment in")
                segments.append((first, rb.cursor))
            replay = {**rb.state_dict(), "segments": segments}
            names = {segment_name(*segment) for segment in segments}
        buffer = io.BytesIO()  # torch.save reports a failed write as a RuntimeError: write its bytes ourselves
        torch.save({**state, "replay": replay, "format": CHECKPOINT_FORMAT}, buffer)
        self._guarded(lambda: self._write("state.pt", lambda f: f.write(buffer.getbuffer())),
                      "cannot write the checkpoint in")
        self.committed = names
        keep = names | {segment_name(*segment) for segment in self.full}
        for path in glob.glob(os.path.join(self.folder, "replay-*.npz")):  # named by no committed state any more
            if os.path.basename(path) not in keep:
                with contextlib.suppress(OSError):  # a read-only folder: nothing more can be done there
                    os.remove(path)

    def load_replay(self, rb, replay, source):
        """Refill `rb` from the checkpoint's `replay` state and its segments in the folder `source`, straight into the
        memory's storage; the full segments are then this folder's too (copied, or linked, from another folder)."""
        rb.load_state_dict(replay)
        for first, end in replay["segments"]:
            start = max(first, rb.cursor - rb.capacity)  # slots that later segments overwrote are skipped
            if start < end:
                with np.load(os.path.join(source, segment_name(first, end)), allow_pickle=False) as f:
                    rb.load_slots(start, {k: f[k][start - first:] for k in f.files})
        self.full = [(first, end) for first, end in replay["segments"] if end == self.segment_end(first, rb)]
        self.committed = {segment_name(*segment) for segment in replay["segments"]}
        if os.path.abspath(source) != os.path.abspath(self.folder):
            self._guarded(lambda: self._adopt(source), "cannot copy the replay segments into")

    def _adopt(self, source):
        os.makedirs(self.folder, exist_ok=True)
        for segment in self.full:
            name = segment_name(*segment)
            try:
                os.link(os.path.join(source, name), os.path.join(self.folder, name))
            except OSError:  # another file system: copy
                shutil.copyfile(os.path.join(source, name), os.path.join(self.folder, name))

    def _write_segment(self, rb, first, end):
        self._write(segment_name(first, end), lambda f: np.savez(f, **rb.slots(first, end)))

    def _guarded(self, write, what):
        try:
            write()
        except OSError as error:
            with contextlib.suppress(OSError):
                for path in glob.glob(os.path.join(self.folder, "*.tmp")):
                    os.remove(path)
            exit_run(f"error: {what} {self.folder}: {error.strerror or error}; the previous checkpoint there is "
                     f"intact: free space or fix the storage, then --resume {self.folder}", 1)

    def _write(self, name, write):
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, name)
        with open(f"{path}.tmp", "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)


def check_segment(path, folder, first, end, fields):
    """A replay segment whole and of the expected kind (every member's CRC read back, each field's dtype and shape),
    else one line naming the file."""
    name = os.path.join(folder, segment_name(first, end))
    try:
        with zipfile.ZipFile(name) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise ValueError(f"{bad} is corrupt")
        with np.load(name, allow_pickle=False) as f:
            for key, (dtype, shape) in fields.items():
                if key not in f.files or f[key].dtype != dtype or f[key].shape != (end - first, *shape):
                    got = (f[key].dtype, f[key].shape) if key in f.files else "missing"
                    raise ValueError(f"{key} is {got}, expected {dtype} {(end - first, *shape)}")
    except FileNotFoundError:
        fail(f"--resume {path}: replay segment {segment_name(first, end)} is missing from {folder}; restore the whole "
             "checkpoint folder or start a new run")
    except PermissionError:
        fail(f"--resume {path}: replay segment {name} cannot be read (permission denied); make the folder readable "
             f"(chmod -R u+rX {folder}) or resume from a readable copy")
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        fail(f"--resume {path}: replay segment {name} is damaged or of another kind ({error}); restore it from an "
             "intact copy of the checkpoint folder or start a new run")


def read_checkpoint(path, script, replay_fields):
    """The state of the checkpoint at `path` (a run directory, its checkpoint folder or its state.pt, wherever it was
    moved or copied), with "folder" added; any damaged, missing or foreign file stops the run here, before anything is
    created, with one line that names the file and what to do. `replay_fields`: {field: (dtype, per-slot shape)}."""
    if os.path.isfile(path):
        folder = os.path.dirname(path) or "."
    elif os.path.isfile(os.path.join(path, "state.pt")):
        folder = path
    else:
        folder = os.path.join(path, "checkpoint")
    state_path = os.path.join(folder, "state.pt")
    if not os.path.isfile(state_path):
        reason = "cannot be read" if os.path.exists(path) and not os.access(path, os.R_OK | os.X_OK) else "no checkpoint"
        fail(f"--resume {path}: {reason} there (expected {state_path}); give a readable run directory, its checkpoint "
             "folder or its state.pt")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except PermissionError:
        fail(f"--resume {path}: {state_path} cannot be read (permission denied); make the folder readable "
             f"(chmod -R u+rX {folder}) or resume from a readable copy")
    except Exception as error:  # empty, truncated, or not a checkpoint at all
        fail(f"--resume {path}: {state_path} is damaged or incomplete ({type(error).__name__}); resume from an intact "
             "copy or start a new run without --resume")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        version = state.get("format", 1) if isinstance(state, dict) else "unknown"
        fail(f"--resume {path}: {state_path} has checkpoint format {version}, this script reads format "
             f"{CHECKPOINT_FORMAT}; resume it with the version of the script that wrote it, or start a new run")
    if state.get("script") != script:
        fail(f"--resume {path}: that is a checkpoint of {state.get('script')}, not of {script}; resume it with "
             f"{state.get('script')}")
    for first, end in state["replay"]["segments"] if state["replay"] is not None else []:
        check_segment(path, folder, first, end, replay_fields)
    return {**state, "folder": folder}


def parse_args(args_class, resumable_fields, replay_fields, argv=None):
    """tyro flags, and the checkpoint to resume (or None). With --resume, the checkpoint's flags are the defaults and
    only `resumable_fields` may change: a resumed run keeps its network, memory and environment."""
    args = tyro.cli(args_class, args=argv)
    if args.resume is None:
        return args, None
    checkpoint = read_checkpoint(args.resume, os.path.basename(__file__), replay_fields)
    unknown = sorted(set(checkpoint["args"]) - {field.name for field in dataclasses.fields(args_class)})
    if unknown:  # a flag renamed or removed since: its meaning may have changed too
        fail(f"--resume {args.resume}: the checkpoint has flags this script does not know ({', '.join(unknown)}); it "
             f"was written by another version of the script: resume it with that version, or start a new run")
    args = tyro.cli(args_class, args=argv, default=args_class(**{**checkpoint["args"], "resume": args.resume}))
    for field, value in checkpoint["args"].items():
        if field not in resumable_fields and field != "resume" and getattr(args, field) != value:
            flag = "--" + field.replace("_", "-")
            fail(f"{flag} {getattr(args, field)} differs from the checkpoint's {value}; drop {flag} to resume")
    if args.total_timesteps < checkpoint["global_step"]:
        fail(f"--total-timesteps {args.total_timesteps} is below the checkpoint's step {checkpoint['global_step']:,}; "
             f"give at least {checkpoint['global_step']} or drop --total-timesteps")
    if checkpoint["replay"] is None and args.total_timesteps > checkpoint["global_step"]:
        fail(f"--total-timesteps {args.total_timesteps}: this checkpoint was saved in the evaluation after training and "
             f"holds no replay memory, so training cannot go on; drop --total-timesteps to finish the evaluation")
    return args, checkpoint


def segment_fields(memory):
    """{field: (dtype, per-slot shape)} of the segments that `memory` (a tiny one of the run's kind) writes."""
    return {key: (value.dtype, value.shape[1:]) for key, value in memory.slots(0, 1).items()}
# <<< shared block: checkpoint


# >>> shared block: tracking
def init_wandb(args, run_name, run_id=None):
    """Start the run's wandb run, or continue it (`run_id` from the checkpoint): the TensorBoard scalars reach it as
    CleanRL's do (sync_tensorboard) and the flags are its config. Returns the run id that wandb chose."""
    import wandb

    run = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                     config=vars(args), name=run_name, id=run_id, resume="allow", save_code=True)
    return run.id


def upload_videos(folder, key, uploaded):
    """Log the videos in `folder` that wandb has not received yet (gymnasium 1.x's RecordVideo has no wandb hook)."""
    import wandb

    for path in sorted(glob.glob(os.path.join(folder, "*.mp4"))):
        if path not in uploaded:
            wandb.log({key: wandb.Video(path, format="mp4")})
            uploaded.add(path)


def finish_wandb(exit_code=0):
    import wandb

    wandb.finish(exit_code=exit_code)
# <<< shared block: tracking


# >>> shared block: progress
def format_seconds(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One status line (step, SPS, updates, replay fill, recent return, ETA): redrawn in place on a terminal, printed
    as a new line every `interval` seconds when the output goes to a file. SPS and ETA use the last ~30 seconds, so
    that a fast warm-up does not hide the speed of learning."""

    def __init__(self, total_steps, start_step, interval=30.0):
        self.total, self.interval = total_steps, interval
        self.tty = sys.stdout.isatty()
        self.last_time = time.time()
        self.samples = deque([(self.last_time, start_step)], maxlen=64)

    def update(self, step, recent_return, updates, replay_fill, force=False, warm_up=False):
        now = time.time()
        if not force and now - self.last_time < (0.5 if self.tty else self.interval):
            return
        self.last_time = now
        self.samples.append((now, step))
        while len(self.samples) > 2 and now - self.samples[1][0] > 30.0:
            self.samples.popleft()
        (t0, s0), (t1, s1) = self.samples[0], self.samples[-1]
        sps = (s1 - s0) / max(t1 - t0, 1e-9)
        eta = format_seconds((self.total - step) / sps) if sps > 0 else "?"
        if warm_up:  # random actions without updates: the learning phase runs far slower
            eta = f"over {eta} (warm-up speed; learning is slower)"
        ret = "n/a" if recent_return is None else f"{recent_return:.1f}"
        line = (f"step {step:,}/{self.total:,} ({100 * step / self.total:.1f}%) | {sps:,.0f} SPS | {updates:,} updates | "
                f"replay {100 * replay_fill:.0f}% | return {ret} | ETA {eta}")
        if self.tty:
            print("\r" + line.ljust(120), end="" if not force else "\n", flush=True)
        else:
            print(line, flush=True)


class PhaseClock:
    """Wall seconds spent in each phase of the run (warm-up, learning, evaluation), kept across resumes."""

    def __init__(self, seconds=None):
        self.seconds, self.phase, self.since = dict(seconds or {}), None, time.time()

    def enter(self, phase):
        now = time.time()
        if self.phase is not None:
            self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + now - self.since
        self.phase, self.since = phase, now

    def state_dict(self):
        self.enter(self.phase)
        return dict(self.seconds)


def print_summary(title, rows):
    """The end-of-run screen: a title and aligned (label, value) rows."""
    width = max(len(label) for label, _ in rows)
    print("\n".join([title, *(f"  {label:<{width}}  {value}" for label, value in rows)]), flush=True)
# <<< shared block: progress


# >>> shared block: run
class Run:
    """What a training run keeps besides the agent: its directory (runs/<run>, or the checkpoint's on --resume), the
    TensorBoard writer and wandb run, the checkpoint folder, the stop signals, progress and phase times, the episode
    returns and the metrics of the log interval. A checkpoint holds its `state_dict` under "run"."""

    def __init__(self, args, checkpoint):
        self.args, saved = args, checkpoint["run"] if checkpoint else {}
        folder = os.path.normpath(checkpoint["folder"]) if checkpoint else None
        parent = folder and (os.path.dirname(folder) or ".")
        in_place = folder and os.path.basename(folder) == "checkpoint" and glob.glob(f"{parent}/events.out.tfevents.*")
        self.dir = parent if in_place else make_run_dir(args)  # a copied checkpoint continues in a new run directory
        self.name = os.path.basename(self.dir)
        self.checkpoint = Checkpoint(os.path.join(self.dir, "checkpoint"))
        if checkpoint:
            print(f"resuming {checkpoint['folder']} in {self.dir}", flush=True)
        self.wandb_id = init_wandb(args, self.name, saved.get("wandb_id")) if args.track else None
        self.start_step = checkpoint["global_step"] if checkpoint else 0
        try:
            self.writer = SummaryWriter(self.dir, purge_step=self.start_step if checkpoint else None)
        except OSError as error:
            fail(f"cannot write TensorBoard events in {self.dir}: {error.strerror}; resume from a writable directory")
        self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n%s" % "\n".join(
            f"|{key}|{value}|" for key, value in vars(args).items()))
        self.episode_return, self.episode_length, self.episodes, self.updates = saved.get("episode", (0.0, 0, 0, 0))
        self.recent_returns = deque(saved.get("recent_returns", ()), maxlen=100)
        self.sums, self.num_logged = saved.get("metric_sums", {}), saved.get("num_logged", 0)  # of the log interval
        self.eval_returns = saved.get("eval_returns", [])
        self.clock, self.progress = PhaseClock(saved.get("phase_seconds")), Progress(args.total_timesteps, self.start_step)
        self.stop, self.videos, self.last_log = StopSignal(), set(), (time.time(), self.start_step)

    def state_dict(self):
        return {"wandb_id": self.wandb_id, "recent_returns": list(self.recent_returns), "eval_returns": self.eval_returns,
                "episode": (self.episode_return, self.episode_length, self.episodes, self.updates),
                "metric_sums": self.sums, "num_logged": self.num_logged, "phase_seconds": self.clock.state_dict()}

    def start_step_of_loop(self, step, save, rb):
        """Phase time; the replay segments the memory has completed; a signal saves and leaves (--resume continues
        exactly here); the periodic checkpoint."""
        self.clock.enter("warm-up" if step <= self.args.learning_starts else "learning")
        self.checkpoint.stream(rb)
        if self.stop:
            self.stop_here(step, save)
        if self.args.checkpoint_every and step > self.start_step and step % self.args.checkpoint_every == 0:
            save(step)

    def add_reward(self, reward):
        self.episode_return += reward
        self.episode_length += 1

    def end_episode(self, step):
        self.writer.add_scalar("charts/episodic_return", self.episode_return, step)
        self.writer.add_scalar("charts/episodic_length", self.episode_length, step)
        self.recent_returns.append(self.episode_return)
        self.episode_return, self.episode_length, self.episodes = 0.0, 0, self.episodes + 1
        if self.args.track and self.args.capture_video:
            upload_videos(f"videos/{self.name}", "videos/train", self.videos)

    def log_training(self, step, updates, events, save):
        """The metrics of a training step's updates, summed for the log interval's means (losses/<name>), and its
        `events` {tag: value}, logged at once. A non-finite loss (whose step Adam skipped) saves the last finite
        weights and ends the run. The metrics (0-dim tensors) of all the step's updates are read in one transfer: on a
        GPU one host sync a step, not one per metric (`.item()`)."""
        rows = torch.stack([torch.stack(list(metrics.values())) for metrics in updates]).tolist() if updates else []
        for metrics, row in zip(updates, rows):
            self.updates += 1
            values = dict(zip(metrics, row))
            if not all(math.isfinite(value) for value in values.values()):
                save(step + 1)
                exit_run(f"error: non-finite loss {values} at step {step:,}; checkpoint saved; resume with a lower "
                         f"learning rate: --resume {self.checkpoint.folder} --learning-rate {self.args.learning_rate / 4:g}",
                         1)
            for name, value in values.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.num_logged += 1
        for tag, value in events.items():
            self.writer.add_scalar(tag, value, step)

    def log_interval(self, step, charts):
        """Every --log-frequency steps: the interval's mean losses, SPS, and `charts` {name: value} as charts/<name>."""
        if (step + 1) % self.args.log_frequency:
            return
        if self.num_logged:
            for name, value in self.sums.items():
                self.writer.add_scalar(f"losses/{name}", value / self.num_logged, step)
            self.sums, self.num_logged = dict.fromkeys(self.sums, 0.0), 0
        now = time.time()  # SPS over the last log interval
        self.writer.add_scalar("charts/SPS", int((step + 1 - self.last_log[1]) / (now - self.last_log[0])), step)
        self.last_log = (now, step + 1)
        for name, value in charts.items():
            self.writer.add_scalar(f"charts/{name}", value, step)

    def show_progress(self, step, rb, force=False):
        recent = np.mean(self.recent_returns) if self.recent_returns else None
        self.progress.update(step, recent, self.updates, len(rb) / rb.capacity, force=force,
                             warm_up=step <= self.args.learning_starts)

    def stop_here(self, step, save, with_replay=True):
        """A signal arrived: save, say how to resume, leave."""
        save(step, with_replay)
        self.writer.close()
        if self.args.track:
            finish_wandb(128 + self.stop.signum)
        exit_run(f"{signal.Signals(self.stop.signum).name} at step {step:,}: checkpoint saved; resume with\n"
                 f"  python {sys.argv[0]} --resume {self.checkpoint.folder}", 128 + self.stop.signum)

    def save_model(self, q_network):
        path = f"{self.dir}/{self.args.exp_name}.cleanrl_model"
        torch.save({"model": {k: v.cpu() for k, v in q_network.state_dict().items()}, "args": vars(self.args)}, path)
        return path

    def log_evaluation(self):
        for idx, episodic_return in enumerate(self.eval_returns):
            self.writer.add_scalar("eval/episodic_return", episodic_return, idx)
        if self.args.track and self.args.capture_video:
            upload_videos(f"videos/{self.name}-eval", "videos/eval", self.videos)

    def finish(self, model_path):
        """result.json, the writers closed, and the end-of-run summary."""
        args, seconds, returns = self.args, self.clock.state_dict(), self.recent_returns
        write_json(f"{self.dir}/result.json", {
            "script": args.exp_name, "env_id": args.env_id, "seed": args.seed, "steps": args.total_timesteps,
            "episodes": self.episodes, "train_return_last100": float(np.mean(returns)) if returns else None,
            "eval_returns": self.eval_returns or None,
            "eval_return_mean": float(np.mean(self.eval_returns)) if self.eval_returns else None,
            "wall_time_s": sum(seconds.values()), "phase_seconds": seconds, "args": vars(args),
        })
        self.writer.close()
        if args.track:
            finish_wandb()
        warmup_steps = min(args.learning_starts + 1, args.total_timesteps)
        print_summary(f"{args.exp_name} on {args.env_id}, seed {args.seed}: done", [
            ("steps", f"{args.total_timesteps:,} in {format_seconds(sum(seconds.values()))}, {self.updates:,} updates"),
            ("speed", f"warm-up {warmup_steps / max(seconds.get('warm-up', 0.0), 1e-9):,.0f} SPS, learning "
                      f"{(args.total_timesteps - warmup_steps) / max(seconds.get('learning', 0.0), 1e-9):,.0f} SPS"),
            ("final return", f"{np.mean(returns):.1f} (mean of the last {len(returns)} episodes)" if returns
             else "no finished episode"),
            ("evaluation", f"{np.mean(self.eval_returns):.1f} (mean of {len(self.eval_returns)} episodes)"
             if self.eval_returns else "none (--eval-episodes 0)" if not args.eval_episodes
             else "none (--save-model evaluates)"),
            ("run directory", self.dir),
            ("model", model_path or "not saved (--save-model)"),
            ("checkpoint", self.checkpoint.folder if os.path.isdir(self.checkpoint.folder) else "none (--checkpoint-every)"),
        ])
# <<< shared block: run


# >>> shared block: cudagraph
class CudaGraph:
    """Calls `fn(*args)`; on CUDA (`enabled`), replays it as one recorded CUDA graph.

    Small networks at batch 32 are bound by kernel launches, not by arithmetic: a graph launches a whole forward,
    backward and optimizer step at once. The first `warmup` calls run eagerly on a side stream (CUDA needs them
    before recording; they are real calls), the next one is recorded, and from then on every call copies its tensor
    arguments into the recorded ones and replays. The other arguments (modules, optimizer, replay memory, noise
    generator) must be the same objects at every call; a generator is registered with the graph, so that each
    replay draws fresh numbers from it. `fn` must keep its shapes and never synchronize with the host. The returned
    tensors are overwritten by the next call."""

    def __init__(self, fn, enabled, warmup=3):
        self.fn, self.enabled, self.warmup, self.graph = fn, enabled, warmup, None

    def __call__(self, *args):
        if not self.enabled:
            return self.fn(*args)
        if self.warmup > 0:
            self.warmup -= 1
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                outputs = self.fn(*args)
            torch.cuda.current_stream().wait_stream(stream)
            return outputs
        if self.graph is None:
            self.args = [arg.clone() if torch.is_tensor(arg) else arg for arg in args]
            self.graph = torch.cuda.CUDAGraph()
            for arg in args:
                if isinstance(arg, torch.Generator):
                    self.graph.register_generator_state(arg)
            with torch.cuda.graph(self.graph):
                self.outputs = self.fn(*self.args)
        for recorded, arg in zip(self.args, args):
            if torch.is_tensor(recorded):
                recorded.copy_(arg)
        self.graph.replay()
        return self.outputs


def use_cuda_graphs(args, device, replay_device):
    """--cuda-graphs on CUDA: the graphed update gathers its batch inside the graph, so the replay memory must be on the
    GPU too; a memory that fell back to RAM turns the graphs off, with one line that says so."""
    if not (args.cuda_graphs and device.type == "cuda"):
        return False
    if replay_device.type != "cuda":
        print("--cuda-graphs: off, the replay memory did not fit on the GPU and lives in RAM; a smaller --buffer-size "
              "keeps it (and the graphs) on the GPU", flush=True)
    return replay_device.type == "cuda"
# <<< shared block: cudagraph


@dataclass
class Hooks:
    """How the research knobs plug into the method: the network (`make_network(num_actions)`) and a step after each
    ReDo event (`after_recycle(optimizer)`)."""

    make_network: Callable
    after_recycle: Optional[Callable] = None


def check_args(args):
    """Every bad flag stops here, before anything is created or allocated."""
    check_numbers(args)
    for name in ("total_timesteps", "buffer_size", "batch_size", "train_frequency", "target_network_frequency",
                 "max_episode_steps", "log_frequency", "stats_frequency", "stats_batch_size", "exploration_steps",
                 "eval_episodes", "redo_period", "redo_batch_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_starts", "checkpoint_every"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "adam_eps"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("gamma", "start_e", "end_e", "eval_epsilon", "repeat_action_probability"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    per_step = args.replay_ratio * args.train_frequency
    if not (per_step >= 1 - 1e-9 and abs(per_step - round(per_step)) < 1e-9):
        fail(f"--replay-ratio {args.replay_ratio} x --train-frequency {args.train_frequency} must be a whole number "
             f"of updates per training step, got {per_step:g}; with --train-frequency 4 use 0.25, 0.5, 0.75, 1, ...")
    if not args.redo_tau >= 0:
        fail(f"--redo-tau must be >= 0, got {args.redo_tau}")
    if args.buffer_size < args.batch_size + 8:
        fail(f"--buffer-size {args.buffer_size} is too small for --batch-size {args.batch_size}; "
             f"use at least {args.batch_size + 8}")
    if args.learning_starts < 8:
        fail(f"--learning-starts must be at least 8 so that the first update has complete transitions, "
             f"got {args.learning_starts}")
    check_env_id(args.env_id)
    if args.track:
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("--track needs wandb: pip install wandb (or drop --track)")
    if args.capture_video:
        try:
            import moviepy  # noqa: F401
        except ImportError:
            fail("--capture-video needs moviepy: pip install moviepy (or drop --capture-video)")


# >>> shared block: dqn_evaluate
def evaluate(model_path, make_network, num_episodes, device, epsilon, seed, returns=(), stop=None, video_dir=None):
    """Returns of `num_episodes` episodes of the saved model (built by `make_network(num_actions)`), epsilon-greedy
    with `epsilon`. Episode i starts from env.reset(seed=seed + i) and draws its random actions from its own generator,
    so an evaluation stopped by a signal (`stop`) resumes after its last finished episode (`returns`) and ends as an
    uninterrupted one would."""
    saved = torch.load(model_path, map_location=device, weights_only=True)
    args = Args(**saved["args"])
    env = make_env(args.env_id, seed, args.repeat_action_probability, args.max_episode_steps,
                   capture_video=video_dir is not None, video_dir=video_dir, video_prefix="eval")
    model = make_network(env.action_space.n).to(device)
    model.load_state_dict(saved["model"])
    model.eval()
    returns, start, done_before = list(returns), time.time(), len(returns)
    while len(returns) < num_episodes and not stop:
        rng = np.random.default_rng([seed, len(returns)])
        frame, _ = env.reset(seed=seed + len(returns))
        stack, episode_return, done = np.repeat(frame[None], 4, axis=0), 0.0, False
        while not (done or stop):
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                action = greedy_action(model, torch.as_tensor(stack, device=device).unsqueeze(0)).item()
            frame, reward, terminated, truncated, _ = env.step(action)
            episode_return += reward
            stack = np.concatenate([stack[1:], frame[None]])
            done = terminated or truncated
        if done:
            returns.append(episode_return)
            per_episode = (time.time() - start) / (len(returns) - done_before)
            print(f"evaluation: {len(returns)}/{num_episodes} episodes | mean return {np.mean(returns):.1f} | "
                  f"ETA {format_seconds(per_episode * (num_episodes - len(returns)))}", flush=True)
    env.close()
    return returns
# <<< shared block: dqn_evaluate


# >>> shared block: dqn_run
def rng_state(rng, device):
    return {"numpy": rng.bit_generator.state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def load_optimizer(optimizer, state, learning_rate):
    """Adam's saved state, with this run's --learning-rate (it may change on resume: a non-finite loss suggests it)
    and this device's `capturable` (a checkpoint written on a CPU restores capturable=False, which a CUDA graph of the
    update cannot record)."""
    capturable = [group["capturable"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, capturable):
        group["capturable"], group["lr"] = keep, learning_rate


def resume(checkpoint, run, q_network, target_network, optimizer, rb, env, rng, device, stack):
    """Load a checkpoint (None: a fresh run) into the networks, the optimizer, the replay memory, the environment and
    the generators. Returns the frame stack to act on and whether the replay memory was loaded (a checkpoint saved in
    the evaluation after training may hold none: then only the evaluation can go on)."""
    if not checkpoint:
        return stack, True
    q_network.load_state_dict(checkpoint["q_network"])
    target_network.load_state_dict(checkpoint["target_network"])
    load_optimizer(optimizer, checkpoint["optimizer"], run.args.learning_rate)
    if checkpoint["replay"] is not None:
        run.checkpoint.load_replay(rb, checkpoint["replay"], checkpoint["folder"])
    set_env_state(env, checkpoint["env"])
    rng.bit_generator.state = checkpoint["rng"]["numpy"]
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    print(f"resumed {run.name} at step {run.start_step:,} from {run.checkpoint.folder}", flush=True)
    return checkpoint["stack"].numpy().copy(), checkpoint["replay"] is not None


def statistics_sample(args, rb, step, device):
    """A fresh uniform sample of --stats-batch-size states for the statistics, drawn from its own generator so that
    analysis never changes training."""
    return rb.stacks(rb.sample_indices(args.stats_batch_size, np.random.default_rng([args.seed, step]))).to(device)
# <<< shared block: dqn_run


def dormant_probe(q_network, probe, taus):
    """The dormant/ statistics of `q_network` on the states `probe` (`dormant_statistics`)."""
    record = {}
    with torch.no_grad():
        q_network(probe, record)
    return dormant_statistics(record, taus)


# flags that may change when resuming; everything else must match the checkpoint
RESUMABLE_FIELDS = ("total_timesteps", "checkpoint_every", "cuda", "cuda_graphs", "track", "wandb_project_name",
                    "wandb_entity", "save_model", "eval_episodes", "log_frequency", "stats_frequency", "capture_video",
                    "learning_rate")


# =====================================================================================================================
# Main: set-up, then CleanRL's loop (act, step, store, train, log)
# =====================================================================================================================
if __name__ == "__main__":
    args, checkpoint = parse_args(Args, RESUMABLE_FIELDS, segment_fields(ReplayMemory(1)))
    check_args(args)
    hooks = research_knobs(args)  # without the knobs: hooks = Hooks(QNetwork)
    keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    gpu_reserve = update_gpu_bytes(hooks.make_network, args.batch_size) if device.type == "cuda" else 0
    replay_device = place_replay(args.buffer_size, device, ReplayMemory.bytes_per_slot(), bool(checkpoint), gpu_reserve)
    run = Run(args, checkpoint)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)  # epsilon-greedy actions and replay sampling

    env = make_training_env(args, run.name)
    q_network = hooks.make_network(env.action_space.n).to(device)
    optimizer = make_optimizer(args, q_network)
    target_network = hooks.make_network(env.action_space.n).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = make_replay(args, replay_device)
    print(f"{run.name}: {sum(p.numel() for p in q_network.parameters()):,} parameters on {device}, "
          f"replay memory on {replay_device} ({ReplayMemory.bytes_per_slot()} bytes per transition)", flush=True)
    frame, _ = env.reset(seed=args.seed)
    stack = np.repeat(frame[None], 4, axis=0)
    stack, replay_loaded = resume(checkpoint, run, q_network, target_network, optimizer, rb, env, rng, device, stack)
    checkpoint = None  # its tensors are loaded: free them

    def save(next_step, with_replay=True):
        run.checkpoint.save({
            "script": os.path.basename(__file__), "args": vars(args), "global_step": next_step, "run": run.state_dict(),
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict(), "env": get_env_state(env), "stack": torch.from_numpy(stack.copy()),
            "rng": rng_state(rng, device)}, rb if with_replay else None)

    use_graphs = use_cuda_graphs(args, device, replay_device)
    act, update_fn = CudaGraph(greedy_action, use_graphs), CudaGraph(update, use_graphs)
    for global_step in range(run.start_step, args.total_timesteps):
        run.start_step_of_loop(global_step, save, rb)

        # ALGO LOGIC: put action logic here
        epsilon = epsilon_at(args, global_step)
        if rng.random() < epsilon:
            action = int(rng.integers(env.action_space.n))
        else:
            action = act(q_network, torch.as_tensor(stack, device=device).unsqueeze(0)).item()

        # TRY NOT TO MODIFY: execute the game, save data to replay memory (the final frame of an episode is kept)
        next_frame, reward, terminated, truncated, _ = env.step(action)
        run.add_reward(reward)
        rb.add(stack[-1], action, clip_reward(reward), terminated, truncated, next_frame)
        if terminated or truncated:
            run.end_episode(global_step)
            next_frame, _ = env.reset()
            stack = np.repeat(next_frame[None], 4, axis=0)
        else:  # TRY NOT TO MODIFY: CRUCIAL step easy to overlook
            stack = np.concatenate([stack[1:], next_frame[None]])

        # ALGO LOGIC: training.
        updates, events = train_step(global_step, args, q_network, target_network, optimizer, rb, rng, update_fn,
                                     hooks.after_recycle)
        run.log_training(global_step, updates, events, save)
        run.log_interval(global_step, {"epsilon": epsilon})
        if (global_step + 1) % args.stats_frequency == 0 and global_step > args.learning_starts:
            for key, value in dormant_probe(q_network, statistics_sample(args, rb, global_step, device),
                                            (0.0, args.redo_tau)).items():
                run.writer.add_scalar(key, value, global_step)
        run.show_progress(global_step + 1, rb)

    run.show_progress(args.total_timesteps, rb, force=True)
    if args.checkpoint_every and run.start_step < args.total_timesteps:
        save(args.total_timesteps)
    model_path = run.save_model(q_network) if args.save_model else None
    if model_path:
        run.clock.enter("evaluation")
        run.eval_returns = evaluate(model_path, hooks.make_network, args.eval_episodes, device,
                                    **evaluation_settings(args), returns=run.eval_returns, stop=run.stop,
                                    video_dir=f"videos/{run.name}-eval" if args.capture_video else None)
        if run.stop:  # only the unfinished episodes run again on resume
            run.stop_here(args.total_timesteps, save, with_replay=replay_loaded and args.checkpoint_every > 0)
        run.log_evaluation()
    env.close()
    run.finish(model_path)
