# docs and experiment results: docs/rainbow_tokenized.md
"""Full Rainbow whose penultimate layer is a Soft Mixture of Experts over tokens ("Don't flatten, tokenize!").

Sokar, Obando-Ceron, Courville, Larochelle and Castro (2025), "Don't flatten, tokenize! Unlocking the key to
SoftMoE's efficacy in deep RL", on the Rainbow agent of Hessel et al. (2018), as implemented in google/dopamine
(defaults = `labs/moes/configs/full_rainbow.gin`: FullRainbowMoENetwork trained by JaxFullRainbowAgent):

    frames [B,4,84,84] -> encoder (Impala ResNet or Nature CNN, Flax SAME padding) -> [B,C,11,11]
    -> tokenize ([B,121,C] per conv position by default) -> SoftMoE (n experts d -> h -> d whose first layer
    is noisy; p = ceil(m/n) slots each) -> flatten [B,121*C] -> noisy dueling heads -> logits [B,A,51]
    -> softmax over 51 atoms on [-10, 10] -> Q = sum of atom * probability.

Learning: cross-entropy to the projected n-step double-Q C51 target, proportional prioritized replay with
importance weights, exploration by noisy nets. `--moe-type baseline` replaces tokenizer + MoE by
flatten -> noisy dense(512 x num_experts) -> ReLU (Dopamine's Rainbow network for --num-experts 1); with
`--baseline-aggregation sum|mean` the dense layer is applied to every token and the tokens are summed or
averaged (the paper's tokenized baseline). `--redo` recycles dormant neurons (ReDo, Sokar et al. 2023) as the
ReDo lab's recycled Rainbow agents do, noisy layers and experts included. The file reads in four parts: the method;
the research knobs of the official code and ReDo (off by default, cut away in one piece); the run plumbing; the main
loop. Deviations from the official code are listed in the docs.
"""
import contextlib
import ctypes
import dataclasses
import functools
import glob
import hashlib
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
from typing import Callable, Literal, Optional

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
# The method: full Rainbow with a Soft MoE penultimate layer, as the paper states it (environment, encoder, tokenizer,
# Soft MoE, noisy experts, network, prioritized replay, C51 loss, update, training step). No research knob is read in
# this part.
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

    # Algorithm (full_rainbow.gin)
    total_timesteps: int = 50_000_000
    """total agent steps of the experiment (4 frames each: 50M steps = 200M frames)"""
    learning_rate: float = 6.25e-5
    """the learning rate of the Adam optimizer"""
    adam_eps: float = 1.5e-4
    """the epsilon of the Adam optimizer"""
    max_grad_norm: float = 0.0
    """clip the gradient to this global L2 norm (0: no clipping, as Dopamine; Kaixhin/Rainbow clips at 10)"""
    buffer_size: int = 1_000_000
    """the replay memory capacity, in transitions"""
    gamma: float = 0.99
    """the discount factor gamma"""
    n_step: int = 3
    """the number of steps of the bootstrapped return"""
    target_network_frequency: int = 8000
    """the timesteps it takes to copy the online network into the target network"""
    batch_size: int = 32
    """the batch size of samples from the replay memory"""
    learning_starts: int = 20_000
    """agent steps of warm-up (no learning; the noisy network acts from the first step)"""
    train_frequency: int = 4
    """one gradient update every this many agent steps"""
    epsilon_train: float = 0.0
    """constant epsilon of the training policy (0: noisy nets explore, as current Dopamine; it used 0.01 before Oct 2024)"""
    eval_epsilon: float = 0.001
    """epsilon of the evaluation policy, which acts with the noise off"""
    n_atoms: int = 51
    """the number of atoms of the return distribution"""
    v_min: float = -10.0
    """the smallest atom of the support"""
    v_max: float = 10.0
    """the largest atom of the support"""
    noisy_sigma0: float = 0.1
    """noisy layers start with sigma = noisy-sigma0 / sqrt(fan_in) (Dopamine 0.1; the NoisyNet paper's factorized 0.5)"""
    priority_exponent: float = 0.5
    """priority = (loss + 1e-10) ** priority-exponent (Dopamine's sqrt; 0 gives uniform replay)"""
    priority_beta_start: float = 0.5
    """importance-sampling exponent beta at the first update (Dopamine: fixed 0.5; Rainbow paper: 0.4)"""
    priority_beta_end: float = 0.5
    """beta at the last step, linear in between (Dopamine: 0.5; Rainbow paper: 1.0)"""

    # Network
    encoder: Literal["impala", "nature"] = "impala"
    """the encoder: Impala ResNet (32 channels) or Nature CNN (64 channels), both with an 11x11 output"""
    moe_type: Literal["softmoe", "top1", "baseline", "simplicial_embedding_v1", "simplicial_embedding_v2"] = "softmoe"
    """the penultimate layer: Soft MoE, token-choice Top-k MoE (k = --num-selected-experts; 1: paper 1's Top1-MoE),
    the (scaled) noisy dense baseline, or a simplicial-embedding baseline (Lavoie et al. 2022; Dopamine's
    SIMPLICIAL_EMBEDDING_V1: softmax(x / sem-tau) over the width of the encoder output, then the scaled noisy dense
    layer; _V2: the scaled noisy dense layer, then softmax(x / sem-tau) within each of num-experts groups of
    expert-hidden-units)"""
    tokenization: Literal["perconv", "perfeat", "perpatch", "persample"] = "perconv"
    """how the encoder output becomes tokens: per position, per channel, per 3x3 patch, one token"""
    num_experts: int = 4
    """number of experts; for the baseline, the dense layer has expert-hidden-units x num-experts units"""
    expert_hidden_units: int = 512
    """hidden units of each expert (d -> h -> d); 1 expert of 2048 units is the paper's scaled single expert"""
    moe_normalization: bool = False
    """l2-normalize tokens and phi in the Soft MoE router, with a learned scale (off in every official config)"""
    capacity_factor: float = 1.0
    """slots per expert = ceil(tokens x capacity-factor / experts), Top-1: each expert's capacity (Dopamine's
    SoftMoE.capacity_factor and MoE.capacity_factor); below 1 the Soft MoE combines tokens into fewer slots, the
    analysis of "Don't flatten, tokenize!" (about 10% of the slots keep the performance, even one loses little)"""

    # Research knobs of the official code and ReDo, all off by default (the "Research knobs" part below)
    use_random_phi: bool = False
    """route with a fixed random phi ~ N(0, 1) that is never trained (Dopamine's SoftMoE.use_random_phi, paper 1's
    question of whether the learned router matters); drawn once from --seed, where the official code redraws it at
    every call for every sample (docs/rainbow_tokenized.md, deviations)"""
    num_selected_experts: int = 1
    """k of the Top-k MoE: each token goes to its k most probable experts (Dopamine's num_selected_experts; 1 in
    every official config, larger k crashes there: docs/rainbow_tokenized.md, deviations)"""
    noisy_routing: bool = False
    """add N(0, (noise-std / num-experts)^2) noise to the Top-k router's logits (Dopamine's TopKRouter.noisy_routing,
    Riquelme et al. 2021)"""
    noise_std: float = 1.0
    """scale of the Top-k router's noise (Dopamine's TopKRouter.noise_std)"""
    aux_loss_fns: tuple[Literal["naive_entropy", "importance_loss", "load_loss"], ...] = ()
    """auxiliary load-balancing losses added to the TD loss and logged under losses/ (Dopamine's aux_loss.loss_fns,
    agents/losses.py; none in every official config); load_loss needs --moe-type top1"""
    entropy_weight: float = 0.5
    """weight of naive_entropy, 1 - the normalized entropy of each sample's expert counts (MoELossParameters)"""
    importance_weight: float = 1.0
    """weight of importance_loss, the squared coefficient of variation of the experts' summed router probabilities"""
    load_weight: float = 1.0
    """weight of load_loss, the squared coefficient of variation of the experts' expected loads under router noise"""
    std_scale: float = 1.0
    """load_loss's noise is N(0, (std-scale / num-experts)^2) (MoELossParameters.std_scale)"""
    use_extra_linear_layer: bool = False
    """a dense 512-unit ReLU layer between the MoE (or baseline) output and the Q head (Dopamine's
    use_extra_linear_layer; off in every official config)"""
    sem_tau: float = 0.1
    """temperature of the simplicial-embedding softmax (the networks' `tau`)"""
    shuffle_tokens: bool = False
    """ablation of "Don't flatten, tokenize!" (shuffled tokens, ranked last): a fixed random permutation of the
    encoder output's C x H x W features, drawn from --seed, before tokenization, so that a token no longer holds one
    position's features (docs/rainbow_tokenized.md: why permuting whole tokens would change nothing)"""
    expert_reset: Literal["none", "reset", "shrink_perturb"] = "none"
    """ablation of "Don't flatten, tokenize!" (Sec. 6: resets and shrink-and-perturb of the experts, no consistent
    gain): every --expert-reset-period updates the experts are re-initialized, or shrunk and perturbed towards a
    fresh initialization (not in the official code; the schedule follows Nikishin et al. 2022 and D'Oro et al. 2023)"""
    expert_reset_period: int = 20_000
    """gradient updates between two resets of the experts (Nikishin et al. 2022 reset SPR every 20,000 updates)"""
    shrink_factor: float = 0.8
    """shrink-and-perturb: experts <- shrink-factor x experts + (1 - shrink-factor) x a fresh initialization (D'Oro
    et al. 2023's interpolation factor)"""
    expert_type: Literal["small", "big"] = "small"
    """small: each expert is an MLP d -> h -> d applied to every slot (the papers' experts); big: each expert holds its
    own --encoder and the shared one is skipped: the tokens are the frames' pixels, each expert reads its slots as one
    square image, encodes it, then dense h, ReLU, dense back to its slots (FullRainbowMoENetwork's and SoftMoE's
    expert_type 'BIG', BigExpertModel; slots per expert floor(sqrt(ceil(m x capacity-factor / n)))^2: 1,764 for 4
    experts). Which figure of Obando-Ceron et al. (2024) it serves is not verified (softmoe.md section 5 guesses their
    analysis of experts that include the encoder); no official config sets it. Soft MoE and perconv tokens only"""
    baseline_aggregation: Literal["flatten", "sum", "mean"] = "flatten"
    """baseline only: flatten the encoder output (official), or apply the dense layer to every token of
    --tokenization and sum or average the tokens (the paper's tokenized baseline)"""
    # ReDo (Sokar et al. 2023, "The Dormant Neuron Phenomenon in Deep RL"; defaults: the official RecycledRainbowAgent,
    # labs/redo/recycled_rainbow_agent.py with configs/rainbow_dense.gin, and its NeuronRecycler)
    redo: bool = False
    """recycle dormant neurons (ReDo, the paper's Algorithm 1): every hidden layer's neurons, the experts' (expert,
    unit) pairs and the noisy layers' units included; the official `reset_mode = 'neurons'` (default None: off). No
    figure of the paper shows Rainbow (its Atari ones: DQN, Fig. 10a-c; DrQ(eps), Fig. 10d), but its lab recycles it"""
    redo_period: int = 200_000
    """recycle every this many gradient updates (official NeuronRecycler.reset_period: 200,000, the SAC value, which no
    Rainbow gin file overrides; the paper's Atari runs: 1000)"""
    redo_tau: float = 0.0
    """a neuron is dormant, and recycled, when its score <= tau (official dead_neurons_threshold: 0; the paper: 0.1)"""
    redo_batch_size: int = 256
    """size of the fresh prioritized replay sample that scores the neurons at each ReDo event (official
    batch_size_statistics: 256; the paper: 64)"""

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
    """log losses, priorities and SPS every this many agent steps"""
    stats_frequency: int = 50_000
    """log router and dormant-neuron statistics every this many agent steps"""
    stats_batch_size: int = 256
    """size of the replay sample used for router and dormant-neuron statistics"""
    dormant_tau: float = 0.1
    """dormancy threshold logged besides tau = 0 (a neuron is dormant when its score <= tau)"""


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
    """The training environment of full_rainbow.gin: sticky actions (--repeat-action-probability;
    `sticky_actions = True`), frame skip 4, no no-op starts, episodes cut at --max-episode-steps agent steps; a lost
    life is not terminal."""
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


# >>> shared block: impala
def lecun_normal_(tensor, fan_in):
    """Flax's lecun_normal: truncated normal on [-2s, 2s] scaled so that the std is 1/sqrt(fan_in)."""
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
    return nn.init.trunc_normal_(tensor, 0.0, std, -2 * std, 2 * std)


def max_pool_same(x, kernel=3, stride=2):
    """Flax max_pool with 'SAME' padding: pad with -inf, since the input is a raw conv output."""
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), kernel, stride)


class ResidualBlock(nn.Module):
    """Impala's residual block: x + conv(ReLU(conv(ReLU(x)))), 3x3 SAME convs, shapes kept [B, C, H, W]."""

    def __init__(self, channels):
        super().__init__()
        self.conv0 = SameConv2d(channels, channels, 3)
        self.conv1 = SameConv2d(channels, channels, 3)
        for conv in (self.conv0, self.conv1):  # Flax's default conv init
            lecun_normal_(conv.weight, fan_in=channels * 9)
            nn.init.zeros_(conv.bias)

    def forward(self, x, record=None, name=""):
        h = F.relu(x)
        if record is not None:
            record[f"{name}.relu0"] = h
        h = F.relu(self.conv0(h), inplace=True)
        if record is not None:
            record[f"{name}.relu1"] = h
        return x + self.conv1(h)


class ImpalaEncoder(nn.Module):
    """Impala ResNet (Espeholt et al. 2018; Dopamine's ImpalaEncoder): three stacks of conv, 3x3/2 max-pool
    and two residual blocks, then ReLU: [B, 4, 84, 84] -> [B, 32, 11, 11]."""

    output_shape = (32, 11, 11)

    def __init__(self, stack_channels=(16, 32, 32)):
        super().__init__()
        self.convs, self.blocks = nn.ModuleList(), nn.ModuleList()
        in_channels = 4
        for channels in stack_channels:
            self.convs.append(xavier_(SameConv2d(in_channels, channels, 3)))
            self.blocks.append(nn.ModuleList([ResidualBlock(channels), ResidualBlock(channels)]))
            in_channels = channels

    def forward(self, x, record=None):
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC: oneDNN's faster layout for these convs (same values)
        for i, (conv, blocks) in enumerate(zip(self.convs, self.blocks)):
            x = max_pool_same(conv(x))
            for j, block in enumerate(blocks):
                x = block(x, record, f"stack{i}.block{j}")
        x = F.relu(x)
        if record is not None:
            record["encoder"] = x
        return x
# <<< shared block: impala


# >>> shared block: tokenizer
class Tokenizer(nn.Module):
    """Turns the encoder output [B, C, H, W] into tokens [B, m, d] ("Don't flatten, tokenize!").

    perconv: one token per position, [B, H*W, C] in row-major (h, w) order (the papers' default);
    perfeat: one token per channel, [B, C, H*W]; persample: a single token [B, 1, C*H*W];
    perpatch: a 3x3/3 VALID conv embedding with C outputs, [B, 9, C] on 11x11 (drops the last 2 rows/cols)."""

    def __init__(self, kind, channels, height, width, patch_size=3):
        super().__init__()
        self.kind = kind
        if kind == "perconv":
            self.num_tokens, self.token_dim = height * width, channels
        elif kind == "perfeat":
            self.num_tokens, self.token_dim = channels, height * width
        elif kind == "persample":
            self.num_tokens, self.token_dim = 1, channels * height * width
        elif kind == "perpatch":
            self.embedding = nn.Conv2d(channels, channels, patch_size, stride=patch_size)
            lecun_normal_(self.embedding.weight, fan_in=channels * patch_size**2)  # Flax's default conv init
            nn.init.zeros_(self.embedding.bias)
            self.num_tokens, self.token_dim = (height // patch_size) * (width // patch_size), channels
        else:
            raise ValueError(f"unknown tokenization {kind!r}")

    def forward(self, fmap):
        if self.kind == "perconv":  # a view of a channels-last map
            return fmap.permute(0, 2, 3, 1).flatten(1, 2)
        if self.kind == "perfeat":
            return fmap.flatten(2)
        if self.kind == "persample":
            return fmap.flatten(1).unsqueeze(1)
        return self.embedding(fmap).flatten(2).transpose(1, 2)
# <<< shared block: tokenizer


# >>> shared block: softmoe
class SoftMoE(nn.Module):
    """Soft MoE (Puigcerver et al. 2024) as in Dopamine: tokens [B, m, d] -> [B, m, d].

    Per sample, logits L = X phi with phi of shape (d, n, p) and p = ceil(m x capacity_factor / n) slots per expert
    (or `slots_per_expert`). Each slot's input is a mix of the sample's tokens (dispatch: softmax over tokens); each
    output token is a mix of all n*p slot outputs (combine: softmax over slots). Samples never mix. `normalize`:
    l2-normalized tokens and phi in the logits, with a learned scale."""

    def __init__(self, num_tokens, dim, num_experts, experts, capacity_factor=1.0, normalize=False,
                 slots_per_expert=None):
        super().__init__()
        self.slots_per_expert = slots_per_expert or math.ceil(num_tokens * capacity_factor / num_experts)
        self.phi = self.make_phi(dim, num_experts, self.slots_per_expert)
        self.scale = nn.Parameter(torch.ones(1)) if normalize else None
        self.experts = experts

    def make_phi(self, dim, num_experts, slots):
        """The learned router: Flax's lecun_normal with the fan-in of a 3-D (d, n, p) kernel, n x d."""
        return nn.Parameter(lecun_normal_(torch.empty(dim, num_experts, slots), fan_in=num_experts * dim))

    def forward(self, x, record=None):
        x_logits, phi = x, self.phi
        if self.scale is not None:  # only the logits see normalized values; the slots mix the raw tokens
            x_logits = x / (x.norm(dim=-1, keepdim=True) + 1e-6)
            phi = self.scale * phi / (phi.norm(dim=0, keepdim=True) + 1e-6)
        logits = torch.einsum("bmd,dnp->bmnp", x_logits, phi)
        dispatch = logits.softmax(dim=1)
        combine = logits.flatten(2).softmax(dim=2).view_as(logits)
        slots = torch.einsum("bmnp,bmd->bnpd", dispatch, x)
        outputs = self.experts(slots, record)
        if record is not None:
            record["dispatch"], record["combine"] = dispatch, combine
        return torch.einsum("bmnp,bnpd->bmd", combine, outputs)
# <<< shared block: softmoe


# >>> shared block: noisy
def factorized_noise(shape, generator):
    """f(e) = sign(e) sqrt(|e|) of standard normal e (Fortunato et al. 2018, eqs. 10-11), on the generator's device."""
    e = torch.randn(shape, generator=generator, device=generator.device)
    return e.sign() * e.abs().sqrt()


class NoisyLinear(nn.Module):
    """Linear layer with factorized Gaussian noise (Fortunato et al. 2018) and Dopamine's init: mu ~ U(+-1/sqrt(fan_in))
    and sigma = sigma0 / sqrt(fan_in), for the weights and for the biases.

    y = (mu_w + sigma_w * f(e_out) f(e_in)^T) x + mu_b + sigma_b * f(e_out). `sample_noise` draws e (one sample for the
    whole batch), which stays until the next draw. The noise is off (y = mu_w x + mu_b) in eval mode and when
    `noise_enabled` is False (`set_noise`)."""

    def __init__(self, in_features, out_features, sigma0=0.1):
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight_mu = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.weight_sigma = nn.Parameter(torch.full((out_features, in_features), sigma0 * bound))
        self.bias_mu = nn.Parameter(torch.empty(out_features).uniform_(-bound, bound))
        self.bias_sigma = nn.Parameter(torch.full((out_features,), sigma0 * bound))
        self.register_buffer("eps_in", torch.zeros(in_features), persistent=False)
        self.register_buffer("eps_out", torch.zeros(out_features), persistent=False)
        self.noise_enabled, self.sigma0 = True, sigma0

    def sample_noise(self, generator):
        self.eps_in.copy_(factorized_noise(self.eps_in.shape, generator))
        self.eps_out.copy_(factorized_noise(self.eps_out.shape, generator))

    def redo_incoming(self):
        """ReDo (`incoming`): an output unit's weight mu redrawn from U(+-1/sqrt(fan_in)), its weight and bias sigma
        back to sigma0/sqrt(fan_in) (their construction-time values), its bias mu zeroed as the official recycler zeroes
        every bias."""
        bound = 1.0 / math.sqrt(self.weight_mu.shape[1])
        sigma = lambda p: torch.full_like(p, self.sigma0 * bound)  # noqa: E731
        return [(self.weight_mu, (0,), lambda p: torch.empty_like(p).uniform_(-bound, bound)),
                (self.weight_sigma, (0,), sigma), (self.bias_mu, (0,), torch.zeros_like), (self.bias_sigma, (0,), sigma)]

    def redo_input_weights(self):
        """ReDo (`outgoing`): the weights that read input i, mu and sigma, so that a zeroed input weight stays zero
        whatever the noise."""
        return [(self.weight_mu, (1,)), (self.weight_sigma, (1,))]

    def forward(self, x):
        if not (self.training and self.noise_enabled):
            return F.linear(x, self.weight_mu, self.bias_mu)
        # (mu_w + sigma_w * e_out e_in^T) x = mu_w x + e_out * (sigma_w (e_in * x)): the noisy weight is never built
        noise = F.linear(x * self.eps_in, self.weight_sigma) * self.eps_out
        return F.linear(x, self.weight_mu, self.bias_mu + self.bias_sigma * self.eps_out) + noise


def resample_noise(module, generator):
    """A fresh noise sample for every noisy layer of `module`, in module order (so that the generator's seed fixes all)."""
    for layer in module.modules():
        if hasattr(layer, "sample_noise"):
            layer.sample_noise(generator)


def set_noise(module, enabled):
    """Switch the noise of every noisy layer of `module` on or off (eval mode switches it off in any case)."""
    for layer in module.modules():
        if hasattr(layer, "noise_enabled"):
            layer.noise_enabled = enabled
# <<< shared block: noisy


# >>> shared block: noisyexperts
class NoisyExperts(nn.Module):
    """n independent expert MLPs d -> h -> d with a ReLU between, applied to every slot: [B, n, p, d] -> [B, n, p, d].

    As Dopamine's Rainbow ExpertModel, the first layer is noisy (NoisyLinear's init and factorized noise, drawn
    independently for each expert) and the second is a plain linear layer (xavier-uniform per expert, zero bias)."""

    def __init__(self, num_experts, dim, hidden, sigma0=0.1):
        super().__init__()
        self.sigma0 = sigma0
        self.w1_mu = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w1_sigma = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1_mu = nn.Parameter(torch.empty(num_experts, hidden))
        self.b1_sigma = nn.Parameter(torch.empty(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_parameters()
        self.register_buffer("eps_in", torch.zeros(num_experts, dim), persistent=False)
        self.register_buffer("eps_out", torch.zeros(num_experts, hidden), persistent=False)
        self.noise_enabled = True

    @torch.no_grad()
    def reset_parameters(self):
        """A fresh initialization (also what `reset_experts` draws)."""
        dim, hidden = self.w1_mu.shape[1:]
        bound = 1.0 / math.sqrt(dim)
        self.w1_mu.uniform_(-bound, bound)
        self.w1_sigma.fill_(self.sigma0 * bound)
        self.b1_mu.uniform_(-bound, bound)
        self.b1_sigma.fill_(self.sigma0 * bound)
        xavier = math.sqrt(6.0 / (hidden + dim))  # of each expert's own [h, d] kernel
        self.w2.uniform_(-xavier, xavier)
        self.b2.zero_()

    def sample_noise(self, generator):
        self.eps_in.copy_(factorized_noise(self.eps_in.shape, generator))
        self.eps_out.copy_(factorized_noise(self.eps_out.shape, generator))

    def redo_incoming(self):
        """ReDo (`incoming`): the neuron (expert e, unit j), recorded as e*h + j, renewed within its expert only, as a
        NoisyLinear unit: w1_mu[e, :, j] redrawn from U(+-1/sqrt(d)), w1_sigma[e, :, j] and b1_sigma[e, j] back to
        sigma0/sqrt(d), b1_mu[e, j] zeroed. Its outgoing weights are w2[e, j, :] (axes (0, 1))."""
        bound = 1.0 / math.sqrt(self.w1_mu.shape[1])
        sigma = lambda p: torch.full_like(p, self.sigma0 * bound)  # noqa: E731
        return [(self.w1_mu, (0, 2), lambda p: torch.empty_like(p).uniform_(-bound, bound)), (self.w1_sigma, (0, 2), sigma),
                (self.b1_mu, (0, 1), torch.zeros_like), (self.b1_sigma, (0, 1), sigma)]

    def redo_input_weights(self):
        """ReDo (`outgoing`): the first layer's weights that read input dimension i of every expert, mu and sigma."""
        return [(self.w1_mu, (1,)), (self.w1_sigma, (1,))]

    def forward(self, slots, record=None):
        w1, b1 = self.w1_mu, self.b1_mu
        if self.training and self.noise_enabled:
            w1 = w1 + self.w1_sigma * self.eps_in[:, :, None] * self.eps_out[:, None, :]
            b1 = b1 + self.b1_sigma * self.eps_out
        batch, num_experts, num_slots, dim = slots.shape
        x = slots.transpose(0, 1).reshape(num_experts, batch * num_slots, dim)  # expert-major: one matmul per expert
        hidden = torch.baddbmm(b1[:, None], x, w1).relu_()  # [n, B*p, h], bias and ReLU without copies
        if record is not None:  # neurons = (expert, unit) pairs on dim 1
            record["experts"] = hidden.view(num_experts, batch, num_slots, -1).permute(1, 0, 3, 2).flatten(1, 2)
        outputs = torch.baddbmm(self.b2[:, None], hidden, self.w2)
        return outputs.view(num_experts, batch, num_slots, dim).transpose(0, 1)
# <<< shared block: noisyexperts


# >>> shared block: rainbow_network
class Flatten(nn.Module):
    """The baseline's 'tokenizer': the encoder output [B, C, H, W] as one feature vector [B, C*H*W]."""

    def forward(self, fmap):
        return fmap.flatten(1)


class NoisyDenseLayer(NoisyLinear):
    """The baseline's penultimate layer (Dopamine's Rainbow network, scaled): flattened features [B, F] -> ReLU(noisy
    dense) [B, units]."""

    def forward(self, x, record=None):
        x = F.relu(super().forward(x))
        if record is not None:
            record["hidden"] = x
        return x


class DuelingHead(nn.Module):
    """Noisy dueling C51 heads (`dueling = True`, `noisy = True`): features [B, F] -> logits [B, num_actions, num_atoms]
    = value + advantage - the mean advantage over the actions, per atom."""

    def __init__(self, features, num_actions, num_atoms, sigma0=0.1):
        super().__init__()
        self.num_actions, self.num_atoms = num_actions, num_atoms
        self.advantage = NoisyLinear(features, num_actions * num_atoms, sigma0)
        self.value = NoisyLinear(features, num_atoms, sigma0)

    def forward(self, x, record=None):
        advantage = self.advantage(x).view(-1, self.num_actions, self.num_atoms)
        value = self.value(x).view(-1, 1, self.num_atoms)
        return value + advantage - advantage.mean(dim=1, keepdim=True)


class QNetwork(nn.Module):
    """Return distributions of uint8 frame stacks [B, 4, 84, 84]: encoder -> tokens -> MoE -> dueling head. `forward`
    returns (log_probs, q_values), where log_probs [B, num_actions, n_atoms] are the log-probabilities of the atoms
    `support` [n_atoms] for each action and q_values [B, num_actions] = sum over atoms of support * probability."""

    def __init__(self, encoder, tokenizer, moe, head, support):
        super().__init__()
        self.encoder, self.tokenizer, self.moe, self.head = encoder, tokenizer, moe, head
        self.num_actions = head.num_actions
        self.register_buffer("support", support, persistent=False)

    def forward(self, x, record=None):
        """`record`, when a dict, receives post-ReLU activations [B, neurons, ...] and routing weights."""
        x = self.encoder(x.float() / 255.0, record)
        x = self.moe(self.tokenizer(x), record).flatten(1)
        log_probs = self.head(x, record).log_softmax(dim=-1)
        return log_probs, (log_probs.exp() * self.support).sum(-1)
# <<< shared block: rainbow_network


ENCODERS = {"impala": ImpalaEncoder, "nature": NatureEncoder}


def make_network(num_actions, encoder="impala", moe_type="softmoe", tokenization="perconv", num_experts=4,
                 expert_hidden_units=512, capacity_factor=1.0, moe_normalization=False, n_atoms=51, v_min=-10.0,
                 v_max=10.0, sigma0=0.1):
    """The paper's network (Dopamine's FullRainbowMoENetwork with SoftMoE), or the noisy dense baseline: flatten,
    noisy dense of expert_hidden_units x num_experts units, ReLU (Dopamine's Rainbow network for one expert). Layers
    are built (and drawn from torch's generator) in forward order."""
    support = torch.linspace(v_min, v_max, n_atoms)
    encoder = ENCODERS[encoder]()
    channels, height, width = encoder.output_shape
    if moe_type == "baseline":
        features = expert_hidden_units * num_experts
        tokenizer, moe = Flatten(), NoisyDenseLayer(channels * height * width, features, sigma0)
    else:
        tokenizer = Tokenizer(tokenization, channels, height, width)
        num_tokens, dim = tokenizer.num_tokens, tokenizer.token_dim
        experts = NoisyExperts(num_experts, dim, expert_hidden_units, sigma0)
        moe = SoftMoE(num_tokens, dim, num_experts, experts, capacity_factor, normalize=moe_normalization)
        features = num_tokens * dim  # the heads read the flattened MoE output directly
    return QNetwork(encoder, tokenizer, moe, DuelingHead(features, num_actions, n_atoms, sigma0), support)


def network_flags(args):
    """The flags of `make_network`."""
    return dict(encoder=args.encoder, moe_type=args.moe_type, tokenization=args.tokenization,
                num_experts=args.num_experts, expert_hidden_units=args.expert_hidden_units,
                capacity_factor=args.capacity_factor, moe_normalization=args.moe_normalization, n_atoms=args.n_atoms,
                v_min=args.v_min, v_max=args.v_max, sigma0=args.noisy_sigma0)


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


# >>> shared block: sumtree
class SumTree:
    """Priorities of `capacity` items in a binary tree of partial sums (float64 numpy): batched updates and
    proportional sampling in O(log N), vectorized over the batch (the only loop runs over the tree's levels).

    Item i is leaf `size + i` (size = capacity rounded up to a power of two), node k holds the sum of its children
    2k and 2k + 1, node 1 the total. `max_priority` is the largest priority ever set, starting at 1 (Dopamine's
    max_recorded_priority, which new transitions receive)."""

    def __init__(self, capacity):
        self.capacity = capacity
        self.depth = max(1, math.ceil(math.log2(capacity)))
        self.size = 1 << self.depth
        self.nodes = np.zeros(2 * self.size)
        self.max_priority = 1.0

    @staticmethod
    def nbytes(capacity):
        return 2 * (1 << max(1, math.ceil(math.log2(capacity)))) * 8

    def total(self):
        return self.nodes[1]

    def get(self, index):
        return self.nodes[self.size + np.asarray(index)]

    def set(self, index, priority):
        """Set the priorities of items `index` (of a repeated item, the last one counts), then recompute their
        ancestors level by level from their children (no accumulated rounding error)."""
        index, priority = np.broadcast_arrays(np.asarray(index, np.int64), np.asarray(priority, np.float64))
        if index.size == 0:
            return
        if not (np.isfinite(priority).all() and (priority >= 0).all()):
            raise ValueError(f"priorities must be finite and >= 0, got {priority}")
        last = len(index) - 1 - np.unique(index[::-1], return_index=True)[1]
        self.nodes[self.size + index[last]] = priority[last]
        self.max_priority = max(self.max_priority, float(priority.max()))
        node = np.unique((self.size + index) // 2)
        for _ in range(self.depth):
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1]
            node = np.unique(node // 2)

    def sample(self, batch_size, rng):
        """Items drawn independently with probability priority / total (as Dopamine), and those probabilities."""
        if not self.total() > 0:
            raise RuntimeError("cannot sample: every priority is zero")
        target = rng.uniform(0.0, self.total(), size=batch_size)
        node = np.ones(batch_size, np.int64)
        for _ in range(self.depth):
            left = 2 * node
            # never step into an empty subtree, even when rounding puts the target at the edge
            go_right = (target >= self.nodes[left]) & (self.nodes[left + 1] > 0)
            target = np.where(go_right, target - self.nodes[left], target)
            node = left + go_right
        return node - self.size, self.nodes[node] / self.total()
# <<< shared block: sumtree


# >>> shared block: prioritized
class PrioritizedReplayMemory(ReplayMemory):
    """ReplayMemory with proportional prioritized sampling (Schaul et al. 2016) as Dopamine's Rainbow does it.

    A transition is drawn with probability priority / (sum of priorities). It enters with the largest priority seen
    so far; after each update of it, priority = (loss + 1e-10) ** priority_exponent. Exactly the transitions that the
    memory can sample (`is_valid`) have a non-zero priority: a transition receives one when its n-step future is
    complete and loses it when its frame stack starts to be overwritten. Leaf i of the tree is slot i."""

    def __init__(self, capacity, frame_shape=(84, 84), stack_size=4, n_step=1, gamma=0.99, device="cpu"):
        super().__init__(capacity, frame_shape, stack_size, n_step, gamma, device)
        self.tree = SumTree(capacity)
        self.synced = self.sample_range()  # the linear indices whose priorities the tree holds

    @staticmethod
    def bytes_per_slot(frame_shape=(84, 84), capacity=1_000_000):
        return ReplayMemory.bytes_per_slot(frame_shape) + math.ceil(SumTree.nbytes(capacity) / capacity)

    def add(self, frame, action, reward, terminated, truncated, next_frame):
        super().add(frame, action, reward, terminated, truncated, next_frame)
        (old_lo, old_hi), (lo, hi) = self.synced, self.sample_range()
        leaving = np.arange(old_lo, min(lo, old_hi + 1))
        entering = np.arange(max(old_hi + 1, lo), hi + 1)
        entering = entering[self.is_transition[entering % self.capacity]]
        self.tree.set(leaving % self.capacity, 0.0)
        self.tree.set(entering % self.capacity, self.tree.max_priority)
        self.synced = (lo, hi)

    def sample_prioritized(self, batch_size, rng):
        """Linear indices drawn with probability priority / total, and those probabilities."""
        if not self.tree.total() > 0:
            raise RuntimeError("the replay memory holds no complete transition yet")
        slot, probability = self.tree.sample(batch_size, rng)
        lo = self.synced[0]
        return lo + (slot - lo) % self.capacity, probability

    def update_priorities(self, index, priority):
        valid = self.is_valid(index)  # always true right after sampling; kept as the invariant's guard
        self.tree.set(index[valid] % self.capacity, np.asarray(priority)[valid])

    def num_prioritized(self):
        return int(np.count_nonzero(self.tree.nodes[self.tree.size:]))

    def state_dict(self):
        """The priorities of the stored slots: the tree's inner sums are rebuilt from them, to the same bits."""
        priorities = self.tree.get(np.arange(len(self)))
        return {**super().state_dict(), "priorities": torch.from_numpy(priorities), "max_priority": self.tree.max_priority}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.tree.set(np.arange(len(self)), state["priorities"].numpy())
        self.tree.max_priority = state["max_priority"]
        self.synced = self.sample_range()
# <<< shared block: prioritized


def make_replay(args, device):
    """full_rainbow.gin's prioritized replay memory: --buffer-size transitions, --n-step returns
    (`update_horizon = 3`) discounted by --gamma."""
    return PrioritizedReplayMemory(args.buffer_size, n_step=args.n_step, gamma=args.gamma, device=device)


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


# >>> shared block: categorical
def project_distribution(next_probs, returns, discounts, support):
    """The C51 projection (Bellemare et al. 2017, Algorithm 1), vectorized over the batch.

    The distribution `next_probs` [B, K] sits on the atoms returns + discounts * support (`returns`, `discounts`: [B];
    the discount is gamma^k after k steps and 0 after a termination). Each shifted atom is clipped to
    [support[0], support[-1]] and its mass split between its two neighbours on the evenly spaced `support` [K], in
    proportion to closeness. Returns the projected distribution [B, K]."""
    batch, num_atoms = next_probs.shape
    v_min, delta = support[0], (support[-1] - support[0]) / (num_atoms - 1)
    atoms = returns[:, None] + discounts[:, None] * support[None, :]
    position = ((atoms - v_min) / delta).clamp(0, num_atoms - 1)  # atoms beyond the support go to its ends
    lower, upper = position.floor(), position.ceil()
    # an atom that lands exactly on a support atom (lower == upper) gives it all its mass
    lower_share = torch.where(upper == lower, 1.0, upper - position)
    upper_share = position - lower
    offset = (torch.arange(batch, device=next_probs.device) * num_atoms)[:, None]
    target = torch.zeros(batch * num_atoms, dtype=next_probs.dtype, device=next_probs.device)
    target.index_add_(0, (offset + lower.long()).flatten(), (next_probs * lower_share).flatten())
    target.index_add_(0, (offset + upper.long()).flatten(), (next_probs * upper_share).flatten())
    return target.view(batch, num_atoms)
# <<< shared block: categorical


# >>> shared block: rainbow_update
def beta_at(args, step):
    """The importance-sampling exponent: linear from priority-beta-start at the warm-up's end to priority-beta-end
    at the last step."""
    fraction = (step - args.learning_starts) / max(1, args.total_timesteps - args.learning_starts)
    return args.priority_beta_start + min(1.0, max(0.0, fraction)) * (args.priority_beta_end - args.priority_beta_start)


def importance_weights(probabilities, beta):
    """(N p)^-beta normalized by the batch's largest weight (Schaul et al. 2016); beta = 0.5 is Dopamine's 1/sqrt(p)."""
    return (probabilities / probabilities.min()) ** -beta


def greedy_action(q_network, obs, noise):
    """argmax_a Q(obs, a) [B] under a fresh noise sample (recorded as a CUDA graph on GPUs)."""
    resample_noise(q_network, noise)
    with torch.no_grad():
        return q_network(obs)[1].argmax(1)


def select_action(q_network, stack, epsilon, rng, noise, device, greedy=greedy_action):
    """Epsilon-greedy on the noisy network's Q-values, with fresh noise at every call: the agent explores by its
    noise from the first step on, warm-up included (Dopamine; epsilon is 0 by default). `greedy` is
    `greedy_action` or its CUDA graph."""
    if rng.random() < epsilon:
        return int(rng.integers(q_network.num_actions))
    return greedy(q_network, torch.as_tensor(stack, device=device).unsqueeze(0), noise).item()


def categorical_target(q_network, target_network, batch, noise):
    """The double-Q C51 target: the next action is the online network's argmax (fresh noise), its return
    distribution comes from the target network (its own fresh noise), shifted by the n-step return and discount
    and projected onto the support."""
    with torch.no_grad():
        resample_noise(q_network, noise)
        next_actions = q_network(batch["next_obs"])[1].argmax(1)
        resample_noise(target_network, noise)
        next_log_probs = target_network(batch["next_obs"])[0]
        next_probs = next_log_probs[torch.arange(len(next_actions), device=next_actions.device), next_actions].exp()
        return project_distribution(next_probs, batch["returns"], batch["discounts"], target_network.support)


def categorical_loss(q_network, target_network, batch, noise, record=None):
    """Per-sample cross-entropy between the projected target and the online distribution of the action taken
    (fresh noise), and Q(s, a): (loss [B], Q(s, a) [B]); `record` receives the online forward pass's activations and
    routing weights."""
    target = categorical_target(q_network, target_network, batch, noise)
    resample_noise(q_network, noise)
    log_probs, q_values = q_network(batch["obs"], record)
    rows = torch.arange(len(batch["actions"]), device=log_probs.device)
    loss = -(target * log_probs[rows, batch["actions"]]).sum(1)
    return loss, q_values[rows, batch["actions"]]


def update(q_network, target_network, optimizer, rb, index, weights, noise, max_grad_norm, extra_losses=None):
    """One gradient step on the replay transitions at linear indices `index` [B] with importance weights `weights` [B]
    (both on the memory's device): gather the batch, the weighted mean of the cross-entropy (plus any
    `extra_losses(record)`, {name: loss} from the same forward pass, as Dopamine adds its auxiliary MoE losses),
    backward, clipping to the global norm max_grad_norm (when > 0), Adam step. Recorded as one CUDA graph on GPUs.
    Returns {"td_loss" (the weighted loss), "q_values" (mean Q(s, a)), each extra loss's name, and "sample_losses" (the
    per-sample cross-entropies [B], for the priorities)} as tensors; a non-finite loss leaves the weights and Adam's
    state unchanged (`make_optimizer`)."""
    device = next(q_network.parameters()).device
    batch = {k: v.to(device) for k, v in rb.get(index).items()}  # a no-op when the memory is on that device
    record = {} if extra_losses else None
    loss, q_taken = categorical_loss(q_network, target_network, batch, noise, record)
    extra = extra_losses(record) if extra_losses else {}
    weighted_loss = (weights.to(device) * loss).mean()
    total = weighted_loss + sum(extra.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if max_grad_norm > 0:
        nn.utils.clip_grad_norm_(q_network.parameters(), max_grad_norm)
    optimizer.found_inf.copy_(~torch.isfinite(total))
    optimizer.step()
    return {"td_loss": weighted_loss.detach(), "q_values": q_taken.detach().mean(),
            **{k: v.detach() for k, v in extra.items()}, "sample_losses": loss.detach()}


def train_step(step, args, q_network, target_network, optimizer, rb, rng, noise, update_fn=update, after_update=None):
    """Dopamine's _train_step at agent step `step`: after the warm-up, one update every train_frequency steps on a
    prioritized batch with importance weights, whose priorities are then set from its per-sample losses (then
    `after_update(step, q_network, optimizer, rb, rng)`, which returns {tag: value} events to log), and a hard target
    copy every target_network_frequency steps. `update_fn` is `update` or its CUDA graph. Returns the metrics of the
    step's updates (`update`'s scalars, read to the host, each with its batch's mean importance weight,
    "is_weight_mean") and its events; a non-finite loss leaves the priorities alone. The scalars and the per-sample
    losses come to the host in one transfer (on a GPU one host sync an update)."""
    updates, events = [], {}
    if step > args.learning_starts and step % args.train_frequency == 0:
        index, probabilities = rb.sample_prioritized(args.batch_size, rng)
        weights = importance_weights(probabilities, beta_at(args, step))
        out = update_fn(q_network, target_network, optimizer, rb, torch.as_tensor(index, device=rb.device),
                        torch.as_tensor(weights, dtype=torch.float32, device=rb.device), noise, args.max_grad_norm)
        names = [name for name in out if name != "sample_losses"]
        host = torch.cat([torch.stack([out[name] for name in names]), out["sample_losses"]]).cpu()
        scalars, sample_losses = host[:len(names)], host[len(names):]
        updates.append({**dict(zip(names, scalars)), "is_weight_mean": float(weights.mean())})
        if scalars.isfinite().all():
            rb.update_priorities(index, (sample_losses.double().numpy() + 1e-10) ** args.priority_exponent)
        if after_update:
            events = after_update(step, q_network, optimizer, rb, rng)
    if step > args.learning_starts and step % args.target_network_frequency == 0:
        target_network.load_state_dict(q_network.state_dict())  # in place: a CUDA graph sees the new weights
    return updates, events
# <<< shared block: rainbow_update


def evaluation_settings(args):
    """How `evaluate` plays the trained agent after --save-model: epsilon-greedy with --eval-epsilon
    (full_rainbow.gin's `epsilon_eval`) and the noise off, on environments seeded apart from training's (no no-op
    starts, as training)."""
    return {"epsilon": args.eval_epsilon, "seed": args.seed + 1000}


# =====================================================================================================================
# Research knobs: the official code's alternatives and ablations, each off by default (Top-k routing and its
# load-balancing losses, a random router, big experts, simplicial embeddings, the tokenized baseline, the extra linear
# layer, shuffled tokens, expert resets), and ReDo. They enter the method in one place, `research_knobs`; cut this part
# and that call, and the script runs its defaults.
# =====================================================================================================================
# >>> shared block: topkmoe
class TopKMoE(nn.Module):
    """Token-choice Top-k MoE as in Dopamine (MoE with its TopKRouter): tokens [B, m, d] -> [B, m, d].

    A bias-free linear router gives each token a softmax over experts (with `noise_std` / n Gaussian noise on the
    logits when `noisy_routing`); the token goes to its k most probable experts and its output is the sum of their
    outputs, each scaled by its probability. Each expert takes at most ceil(k m capacity_factor / n) tokens per
    sample, first come first served: all first choices in token order, then all second choices, ...; the other
    assignments are dropped and contribute zeros (a token dropped by all its experts outputs zeros)."""

    def __init__(self, num_tokens, dim, num_experts, experts, capacity_factor=1.0, k=1, noisy_routing=False,
                 noise_std=1.0):
        super().__init__()
        self.num_experts, self.k = num_experts, k
        self.capacity = math.ceil(k * num_tokens * capacity_factor / num_experts)
        self.noise_std = noise_std / num_experts if noisy_routing else 0.0
        self.router = nn.Linear(dim, num_experts, bias=False)
        lecun_normal_(self.router.weight, fan_in=dim)  # Flax's default Dense init
        self.experts = experts

    def forward(self, x, record=None):
        batch, num_tokens, dim = x.shape
        logits = self.router(x)  # [B, m, n]
        noisy = logits + self.noise_std * torch.randn_like(logits) if self.noise_std else logits
        probs = noisy.softmax(dim=-1)
        gate, expert = probs.topk(self.k, dim=-1)  # [B, m, k], most probable first
        assigned = F.one_hot(expert.transpose(1, 2).flatten(1), self.num_experts)  # [B, k*m, n], choice-major queue
        position = (assigned.cumsum(dim=1) * assigned).sum(-1) - 1  # rank of the assignment in its expert's queue
        position = position.view(batch, self.k, num_tokens).transpose(1, 2)  # [B, m, k]
        kept = position < self.capacity
        num_slots = self.num_experts * self.capacity
        slot = torch.where(kept, expert * self.capacity + position, num_slots).flatten(1)  # dropped -> spare slot
        tokens = x.repeat_interleave(self.k, dim=1) if self.k > 1 else x  # [B, m*k, d], as `slot`
        slots = x.new_zeros(batch, num_slots + 1, dim).scatter(1, slot.unsqueeze(-1).expand(-1, -1, dim), tokens)
        slots = slots[:, :num_slots].view(batch, self.num_experts, self.capacity, dim)
        outputs = self.experts(slots, record).reshape(batch, num_slots, dim)
        outputs = outputs.gather(1, slot.clamp(max=num_slots - 1).unsqueeze(-1).expand(-1, -1, dim))
        if record is not None:
            record.update(router_logits=logits, router_probs=probs, top_experts=expert, kept=kept)
        weights = (gate * kept).view(batch, num_tokens * self.k, 1)
        return (outputs * weights).view(batch, num_tokens, self.k, dim).sum(2)
# <<< shared block: topkmoe


# >>> shared block: bigexperts
class Frames(nn.Module):
    """The shared 'encoder' when the experts hold the encoders (--expert-type big): the frames [B, 4, 84, 84] in
    [0, 1] themselves, so that the tokens are pixels (perconv: 7,056 tokens of dim 4)."""

    output_shape = (4, 84, 84)

    def forward(self, x, record=None):
        return x


def grouped_encoder(encoders):
    """n encoders of one architecture run side by side as one: the first encoder, each of whose convs becomes a grouped
    conv (groups = n) holding the n encoders' kernels and biases, expert-major ([n * out, in, k, k]). It maps the n
    experts' images stacked on the channels, [B, n * C, H, W], to their encodings stacked likewise; every other layer
    (ReLU, max-pool, residual sum) acts channel by channel, so expert j's channels only ever meet encoder j's weights."""
    grouped, n = encoders[0], len(encoders)
    for name, conv in list(grouped.named_modules()):
        if isinstance(conv, nn.Conv2d):
            convs = [encoder.get_submodule(name) for encoder in encoders]
            conv.weight = nn.Parameter(torch.cat([c.weight.detach() for c in convs]))
            conv.bias = nn.Parameter(torch.cat([c.bias.detach() for c in convs]))
            conv.in_channels, conv.out_channels, conv.groups = n * conv.in_channels, n * conv.out_channels, n
    return grouped


def square_slots(num_tokens, num_experts, capacity_factor=1.0):
    """Slots per big expert, which reads its slots as one square image: the largest square number <= the Soft MoE's
    p = ceil(m x capacity factor / n), floor(sqrt(p))^2, as Dopamine's SoftMoE for expert_type BIG."""
    return math.isqrt(math.ceil(num_tokens * capacity_factor / num_experts)) ** 2


class BigExperts(nn.Module):
    """n experts that each hold their own encoder (Dopamine's BigExpertModel, SoftMoE expert_type "BIG"): slots
    [B, n, p, d] -> [B, n, p, d], p a square number.

    Expert j reads its p slots as one sqrt(p) x sqrt(p) image with d channels (slot r * sqrt(p) + c at row r, column c),
    encodes it with its own `make_encoder()`, flattens the encoding (F features) and maps it by dense F -> h, ReLU,
    dense h -> p * d back to its p slots (no activation). The n encoders run as one grouped conv per layer
    (`grouped_encoder`); each expert is initialized on its own, by the encoder's init (xavier-uniform, lecun-normal
    residual convs, zero biases) and xavier-uniform dense kernels of each expert's own [F, h] and [h, p * d] shapes.
    A subclass may make the first dense layer another kind (`init_first_layer`, `first_layer`)."""

    def __init__(self, num_experts, dim, slots, hidden, make_encoder):
        super().__init__()
        self.side = math.isqrt(slots)
        if self.side**2 != slots:
            raise ValueError(f"big experts read their slots as a square image: {slots} slots is no square number")
        encoders = [make_encoder() for _ in range(num_experts)]
        first = next(layer for layer in encoders[0].modules() if isinstance(layer, nn.Conv2d))
        if first.in_channels != dim:
            raise ValueError(f"the experts' encoder reads {first.in_channels} channels, the tokens have {dim}")
        with torch.no_grad():
            self.encoding_shape = tuple(encoders[0](torch.zeros(1, dim, self.side, self.side)).shape[1:])
        self.encoder = grouped_encoder(encoders)
        features, out = math.prod(self.encoding_shape), slots * dim
        self.init_first_layer(num_experts, features, hidden)
        bound = math.sqrt(6.0 / (hidden + out))  # of each expert's own [h, p * d] kernel
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, out).uniform_(-bound, bound))
        self.b2 = nn.Parameter(torch.zeros(num_experts, out))

    def init_first_layer(self, num_experts, features, hidden):
        bound = math.sqrt(6.0 / (features + hidden))  # xavier-uniform of each expert's own [F, h] kernel
        self.w1 = nn.Parameter(torch.empty(num_experts, features, hidden).uniform_(-bound, bound))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))

    def first_layer(self):
        """The first dense layer's kernels [n, F, h] and biases [n, h] for this forward pass."""
        return self.w1, self.b1

    def forward(self, slots, record=None):
        batch, num_experts, num_slots, dim = slots.shape
        images = slots.reshape(batch, num_experts, self.side, self.side, dim).permute(0, 1, 4, 2, 3)
        inner = None if record is None else {}
        encoded = self.encoder(images.reshape(batch, num_experts * dim, self.side, self.side), inner)
        if record is not None:  # the experts' encoder layers, neurons = (expert, channel) pairs on dim 1
            record.update({f"experts.{name}": value for name, value in inner.items()})
        features = encoded.reshape(batch, num_experts, -1)  # expert j's encoding, flattened (C, H, W)
        w1, b1 = self.first_layer()
        hidden = F.relu(torch.einsum("bnf,nfh->bnh", features, w1) + b1)
        if record is not None:  # neurons = (expert, unit) pairs on dim 1
            record["experts"] = hidden.flatten(1)
        return (torch.einsum("bnh,nho->bno", hidden, self.w2) + self.b2).reshape(slots.shape)
# <<< shared block: bigexperts


# >>> shared block: rainbow_knobs
class NoisyBigExperts(BigExperts):
    """--expert-type big in Rainbow: big experts whose first dense layer is noisy, as Rainbow's experts are
    (NoisyLinear's init on fan-in F, factorized noise drawn independently for each expert, off in eval mode and by
    `set_noise`)."""

    def __init__(self, num_experts, dim, slots, hidden, make_encoder, sigma0=0.1):
        self.sigma0 = sigma0  # read by `init_first_layer`, which BigExperts' constructor calls
        super().__init__(num_experts, dim, slots, hidden, make_encoder)
        self.noise_enabled = True

    def init_first_layer(self, num_experts, features, hidden):
        bound = 1.0 / math.sqrt(features)
        self.w1_mu = nn.Parameter(torch.empty(num_experts, features, hidden).uniform_(-bound, bound))
        self.w1_sigma = nn.Parameter(torch.full((num_experts, features, hidden), self.sigma0 * bound))
        self.b1_mu = nn.Parameter(torch.empty(num_experts, hidden).uniform_(-bound, bound))
        self.b1_sigma = nn.Parameter(torch.full((num_experts, hidden), self.sigma0 * bound))
        self.register_buffer("eps_in", torch.zeros(num_experts, features), persistent=False)
        self.register_buffer("eps_out", torch.zeros(num_experts, hidden), persistent=False)

    def first_layer(self):
        if not (self.training and self.noise_enabled):
            return self.w1_mu, self.b1_mu
        return (self.w1_mu + self.w1_sigma * self.eps_in[:, :, None] * self.eps_out[:, None, :],
                self.b1_mu + self.b1_sigma * self.eps_out)

    def sample_noise(self, generator):
        self.eps_in.copy_(factorized_noise(self.eps_in.shape, generator))
        self.eps_out.copy_(factorized_noise(self.eps_out.shape, generator))


class RandomPhiSoftMoE(SoftMoE):
    """--use-random-phi: phi is a fixed N(0, 1) draw, a buffer that is never trained (Dopamine's use_random_phi draws
    the same distribution anew at every call and for every sample)."""

    def make_phi(self, dim, num_experts, slots):
        self.register_buffer("phi", torch.randn(dim, num_experts, slots))  # saved and copied to the target network
        return self.phi


class ShuffledTokenizer(nn.Module):
    """--shuffle-tokens: a fixed permutation of the encoder output's C*H*W features, drawn from --seed and saved with
    the weights, before the tokenizer, so that a token no longer holds one position's features."""

    def __init__(self, tokenizer, num_features, seed):
        super().__init__()
        self.register_buffer("shuffle", torch.randperm(num_features, generator=torch.Generator().manual_seed(seed)))
        self.tokenizer, self.num_tokens, self.token_dim = tokenizer, tokenizer.num_tokens, tokenizer.token_dim

    def forward(self, fmap):
        return self.tokenizer(fmap.flatten(1)[:, self.shuffle].view_as(fmap))


class SimplicialFlatten(nn.Module):
    """--moe-type simplicial_embedding_v1: Dopamine's softmax(x / tau, axis=1) of the [H, W, C] map (over W), then
    flatten."""

    def __init__(self, tau):
        super().__init__()
        self.tau = tau

    def forward(self, fmap):
        return (fmap / self.tau).softmax(dim=3).flatten(1)


class NoisySimplicialDenseLayer(NoisyDenseLayer):
    """--moe-type simplicial_embedding_v2: the noisy dense layer, then softmax(x / tau) within each of `groups` groups
    of units, then the ReLU (a no-op after the softmax, kept as Dopamine has it)."""

    def __init__(self, in_features, units, groups, tau, sigma0=0.1):
        super().__init__(in_features, units, sigma0)
        self.groups, self.tau = groups, tau

    def forward(self, x, record=None):
        x = NoisyLinear.forward(self, x)
        x = F.relu((x.view(len(x), self.groups, -1) / self.tau).softmax(dim=-1).flatten(1))
        if record is not None:
            record["hidden"] = x
        return x


class AggregatedDenseLayer(NoisyLinear):
    """--baseline-aggregation sum|mean, the paper's tokenized baseline: the baseline's noisy dense layer and ReLU on
    every token, [B, m, d] -> [B, m, units], then the tokens summed or averaged: [B, units]."""

    def __init__(self, dim, units, aggregation, sigma0=0.1):
        super().__init__(dim, units, sigma0)
        self.aggregation = aggregation

    def forward(self, tokens, record=None):
        hidden = F.relu(super().forward(tokens))
        if record is not None:  # neurons = units on dim 1, tokens after
            record["hidden"] = hidden.transpose(1, 2)
        return hidden.sum(1) if self.aggregation == "sum" else hidden.mean(1)


class ExtraLinearLayer(nn.Module):
    """--use-extra-linear-layer: a plain dense 512-unit ReLU layer after the MoE (or baseline) layer, before the heads
    (which stay noisy), as Dopamine's."""

    def __init__(self, moe, features, units=512):
        super().__init__()
        self.moe, self.extra, self.out_features = moe, xavier_(nn.Linear(features, units)), units

    def forward(self, x, record=None):
        x = F.relu(self.extra(self.moe(x, record).flatten(1)))
        if record is not None:
            record["extra"] = x
        return x


def make_knob_network(args, num_actions):
    """The network with the research knobs of `args`, built in the same order as `make_network` (so that the same
    seed draws the same weights where a knob leaves a layer alone)."""
    support = torch.linspace(args.v_min, args.v_max, args.n_atoms)
    big = args.expert_type == "big"  # the experts hold the encoders: the tokens are the frames' pixels
    encoder = Frames() if big else ENCODERS[args.encoder]()
    channels, height, width = encoder.output_shape
    units, sigma0 = args.expert_hidden_units * args.num_experts, args.noisy_sigma0
    if args.moe_type == "baseline" and args.baseline_aggregation != "flatten":  # the dense layer on every token
        tokenizer = Tokenizer(args.tokenization, channels, height, width)
        moe, features = AggregatedDenseLayer(tokenizer.token_dim, units, args.baseline_aggregation, sigma0), units
    elif args.moe_type in ("baseline", "simplicial_embedding_v1", "simplicial_embedding_v2"):
        tokenizer = SimplicialFlatten(args.sem_tau) if args.moe_type == "simplicial_embedding_v1" else Flatten()
        if args.moe_type == "simplicial_embedding_v2":
            moe = NoisySimplicialDenseLayer(channels * height * width, units, args.num_experts, args.sem_tau, sigma0)
        else:
            moe = NoisyDenseLayer(channels * height * width, units, sigma0)
        features = units
    else:
        tokenizer = Tokenizer(args.tokenization, channels, height, width)
        if args.shuffle_tokens:
            tokenizer = ShuffledTokenizer(tokenizer, channels * height * width, args.seed)
        num_tokens, dim = tokenizer.num_tokens, tokenizer.token_dim
        slots = None
        if big:
            slots = square_slots(num_tokens, args.num_experts, args.capacity_factor)
            experts = NoisyBigExperts(args.num_experts, dim, slots, args.expert_hidden_units, ENCODERS[args.encoder],
                                      sigma0)
        else:
            experts = NoisyExperts(args.num_experts, dim, args.expert_hidden_units, sigma0)
        if args.moe_type == "softmoe":
            soft_moe = RandomPhiSoftMoE if args.use_random_phi else SoftMoE
            moe = soft_moe(num_tokens, dim, args.num_experts, experts, args.capacity_factor,
                           normalize=args.moe_normalization, slots_per_expert=slots)
        else:
            moe = TopKMoE(num_tokens, dim, args.num_experts, experts, capacity_factor=args.capacity_factor,
                          k=args.num_selected_experts, noisy_routing=args.noisy_routing, noise_std=args.noise_std)
        features = num_tokens * dim
    if args.use_extra_linear_layer:
        moe, features = ExtraLinearLayer(moe, features), 512
    return QNetwork(encoder, tokenizer, moe, DuelingHead(features, num_actions, args.n_atoms, sigma0), support)
# <<< shared block: rainbow_knobs


# >>> shared block: moe_losses
def moe_aux_losses(args, record):
    """Dopamine's auxiliary load-balancing losses (agents/losses.py; off unless named in --aux-loss-fns), from the
    routing weights the MoE layer left in `record`: {name: weighted loss}, each a per-sample term averaged over the
    batch. Top-k: the router's probabilities, logits and choices; Soft MoE: the combine weights averaged over each
    expert's slots as probabilities, their argmax as the choice (Dopamine's router_out).

    naive_entropy: weight x (1 - normalized entropy of the tokens' expert counts) (counts carry no gradient);
    importance_loss: weight x CV^2 over experts of the probability each expert receives, summed over tokens;
    load_loss: weight x CV^2 over experts of the mean probability that a token's clean logit beats its k-th noisy
    logit under fresh N(0, (std_scale / n)^2) noise (Riquelme et al. 2021)."""
    if "combine" in record:  # Soft MoE [B, m, n, p]
        probs = record["combine"].mean(-1)
        choices = probs.argmax(-1, keepdim=True)
    else:
        probs, choices = record["router_probs"], record["top_experts"]
    num_experts = probs.shape[-1]

    def cv_squared(x):  # per sample, over experts (the last axis); population std, as jnp.std
        return (x.std(-1, unbiased=False) / x.mean(-1)) ** 2

    losses = {}
    if "naive_entropy" in args.aux_loss_fns:
        counts = F.one_hot(choices.flatten(1), num_experts).sum(1).to(probs.dtype) + 1e-6  # [B, n]
        share = counts / counts.sum(-1, keepdim=True)
        entropy = -(share * share.log()).sum(-1) / math.log(num_experts)
        losses["naive_entropy"] = args.entropy_weight * (1.0 - entropy.mean())
    if "importance_loss" in args.aux_loss_fns:
        losses["importance_loss"] = args.importance_weight * cv_squared(probs.sum(1)).mean()
    if "load_loss" in args.aux_loss_fns:  # top-k only (check_args)
        logits = record["router_logits"]
        noise_std = args.std_scale / num_experts
        noisy = logits + noise_std * torch.randn_like(logits)
        threshold = noisy.topk(args.num_selected_experts, dim=-1).values[..., -1:]  # the k-th noisy logit [B, m, 1]
        beats = 1.0 - torch.special.ndtr((threshold - logits) / noise_std)  # [B, m, n]
        losses["load_loss"] = args.load_weight * cv_squared(beats.mean(1)).mean()
    return losses
# <<< shared block: moe_losses


# >>> shared block: expert_reset
def update_number(args, step):
    """The number, counted from 1 after the warm-up, of the gradient update made at agent step `step` (0: none)."""
    if step <= args.learning_starts or step % args.train_frequency != 0:
        return 0
    return step // args.train_frequency - args.learning_starts // args.train_frequency


def expert_reset_number(args, step):
    """The number (1, 2, ...) of the reset of the experts (or their shrink-and-perturb) that follows the update of agent
    step `step`, or 0 when none does: one every --expert-reset-period updates, counted from the warm-up's end."""
    number = update_number(args, step)
    if args.expert_reset == "none" or not number:
        return 0
    return number // args.expert_reset_period if number % args.expert_reset_period == 0 else 0


@torch.no_grad()
def reset_experts(experts, optimizer, shrink_factor):
    """Every expert's parameters become shrink_factor x theta + (1 - shrink_factor) x a fresh initialization (the
    constructor's own initializer, drawn from torch's generator): 0 is a full reset, as in Nikishin et al. (2022);
    above 0 shrink-and-perturb in the interpolation form of D'Oro et al. (2023). Adam's moments of those parameters
    are zeroed; its step count (and the other layers) are left alone."""
    current = [p.clone() for p in experts.parameters()]
    experts.reset_parameters()
    for p, old in zip(experts.parameters(), current):
        p.mul_(1.0 - shrink_factor).add_(old, alpha=shrink_factor)
        for value in optimizer.state.get(p, {}).values():
            if torch.is_tensor(value) and value.shape == p.shape:
                value.zero_()


def expert_reset_hook(args):
    """--expert-reset's after-update hook: resets (or shrinks and perturbs) the experts when due and logs the reset's
    number as moe/expert_resets."""
    shrink_factor = args.shrink_factor if args.expert_reset == "shrink_perturb" else 0.0

    def after_update(step, q_network, optimizer):
        number = expert_reset_number(args, step)
        if not number:
            return {}
        moe = getattr(q_network.moe, "moe", q_network.moe)  # inside an ExtraLinearLayer, if any
        reset_experts(moe.experts, optimizer, shrink_factor)
        return {"moe/expert_resets": number}

    return after_update
# <<< shared block: expert_reset


# >>> shared block: moe_args
def check_moe_args(args):
    """The MoE layer's flags: each one applies to some layers only, and a flag given for another layer stops the run
    rather than being silently ignored."""
    moe = args.moe_type in ("softmoe", "top1")
    if args.use_random_phi and args.moe_type != "softmoe":
        fail("--use-random-phi replaces the Soft MoE router's phi; use --moe-type softmoe or drop it")
    if not 1 <= args.num_selected_experts <= args.num_experts:
        fail(f"--num-selected-experts must be in [1, --num-experts {args.num_experts}], got {args.num_selected_experts}")
    if args.num_selected_experts != 1 and args.moe_type != "top1":
        fail("--num-selected-experts is the k of the Top-k MoE; use --moe-type top1 or drop it")
    if args.noisy_routing and args.moe_type != "top1":
        fail("--noisy-routing adds noise to the Top-k router; use --moe-type top1 or drop it")
    if not args.noise_std > 0 or (args.noise_std != 1.0 and not args.noisy_routing):
        fail(f"--noise-std {args.noise_std}: a positive scale of the router noise, with --noisy-routing")
    if len(set(args.aux_loss_fns)) != len(args.aux_loss_fns):
        fail(f"--aux-loss-fns {' '.join(args.aux_loss_fns)} names a loss twice; name each once")
    if args.aux_loss_fns and not moe:
        fail("--aux-loss-fns balances the experts of an MoE layer; use --moe-type softmoe or top1, or drop it")
    if args.aux_loss_fns and args.num_experts < 2:
        fail("--aux-loss-fns balances the load over experts: use --num-experts 2 or more, or drop it")
    if "load_loss" in args.aux_loss_fns and args.moe_type != "top1":
        fail("--aux-loss-fns load_loss needs the Top-k router's logits (Dopamine's Soft MoE gives it none and the loss "
             "is 0 there); use --moe-type top1, or naive_entropy / importance_loss")
    for name, loss, default in (("entropy_weight", "naive_entropy", 0.5), ("importance_weight", "importance_loss", 1.0),
                                ("load_weight", "load_loss", 1.0), ("std_scale", "load_loss", 1.0)):
        value, flag = getattr(args, name), "--" + name.replace("_", "-")
        if not value >= 0 or (name == "std_scale" and not value > 0):
            fail(f"{flag} must be {'positive' if name == 'std_scale' else '>= 0'}, got {value}")
        if value != default and loss not in args.aux_loss_fns:
            fail(f"{flag} applies to the {loss} loss; add --aux-loss-fns {loss} or drop {flag}")
    if not args.sem_tau > 0 or (args.sem_tau != 0.1 and not args.moe_type.startswith("simplicial_embedding")):
        fail(f"--sem-tau {args.sem_tau}: a positive temperature, with --moe-type simplicial_embedding_v1 or _v2")
    if args.shuffle_tokens and not moe:
        fail("--shuffle-tokens shuffles the MoE layer's tokens; use --moe-type softmoe or top1, or drop it")
    if args.expert_reset != "none" and not moe:
        fail("--expert-reset resets the experts of an MoE layer; use --moe-type softmoe or top1, or drop it")
    if args.expert_reset_period < 1 or (args.expert_reset_period != 20_000 and args.expert_reset == "none"):
        fail(f"--expert-reset-period {args.expert_reset_period}: a positive number of updates, with --expert-reset")
    if not 0.0 < args.shrink_factor < 1.0 or (args.shrink_factor != 0.8 and args.expert_reset != "shrink_perturb"):
        fail(f"--shrink-factor {args.shrink_factor}: in (0, 1), with --expert-reset shrink_perturb")
    if args.expert_type == "big" and args.moe_type != "softmoe":  # Dopamine builds BigExpertModel for SOFTMOE only
        fail("--expert-type big needs the Soft MoE router; use --moe-type softmoe or drop --expert-type")
    if args.expert_type == "big" and args.tokenization != "perconv":
        fail(f"--expert-type big: the experts read their slots as images of pixel tokens, which --tokenization "
             f"{args.tokenization} does not give; use --tokenization perconv (the default)")
    for flag, given in (("--shuffle-tokens", args.shuffle_tokens), ("--expert-reset", args.expert_reset != "none")):
        if given and args.expert_type == "big":
            fail(f"{flag} applies to the small experts (an MLP per slot); drop it or --expert-type big")
# <<< shared block: moe_args


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


class RecyclableQNetwork(QNetwork):
    """--redo: the network, which also lists the layers that ReDo recycles for `dormant_neurons` and `recycle_dormant`
    (the redo block: they work for any network whose forward(x, record) records the post-ReLU activations
    [B, neurons, ...] of the layers that its redo_layers() lists as (name, incoming parameters, outgoing weights))."""

    @classmethod
    def of(cls, network):
        """`network` itself (its modules, parameters and buffers) as a RecyclableQNetwork."""
        return cls(network.encoder, network.tokenizer, network.moe, network.head, network.support)

    def redo_layers(self):
        """(name, incoming parameters, outgoing weights) of every layer that ReDo recycles, in forward order
        (`recycle_dormant`); `name` is its `record` key. The Nature CNN's channels, read by the next conv and, for conv3,
        by whatever reads the encoder output (`encoder_readers`); the Impala encoder's first conv of each residual block,
        read by the block's second conv (as the official recycler treats its ResNet; the residual stream and the
        encoder output are sums, not one layer's neurons); the experts' (expert, unit) pairs, read by w2; the baseline's
        noisy hidden units, read by both heads (or the extra linear layer, whose units both heads read). The heads are
        never recycled."""
        e, layers = self.encoder, []
        moe = getattr(self.moe, "moe", self.moe)  # inside an ExtraLinearLayer, if any
        extra = self.moe.extra if isinstance(self.moe, ExtraLinearLayer) else None
        heads = [self.head.advantage, self.head.value]
        if isinstance(e, NatureEncoder):
            layers += [("conv1", incoming(e.conv1), outgoing(e.conv2)), ("conv2", incoming(e.conv2), outgoing(e.conv3))]
            if self.encoder_readers(moe):
                layers.append(("conv3", incoming(e.conv3), self.encoder_readers(moe)))
        else:
            lecun = lambda w: lecun_normal_(w, fan_in=w[0].numel())  # noqa: E731  (the blocks' init: Flax's default)
            for i, blocks in enumerate(e.blocks):
                for j, block in enumerate(blocks):
                    layers.append((f"stack{i}.block{j}.relu1", incoming(block.conv0, lecun), outgoing(block.conv1)))
        if hasattr(moe, "experts"):
            layers.append(("experts", incoming(moe.experts), [(moe.experts.w2, (0, 1))]))
        else:
            layers.append(("hidden", incoming(moe), outgoing(*([extra] if extra is not None else heads))))
        if extra is not None:
            layers.append(("extra", incoming(extra), outgoing(*heads)))
        return layers

    def encoder_readers(self, moe):
        """The weights that read each channel of the encoder output, as `outgoing` lists them: the flattened baseline's
        dense layer, the per-patch embedding, or, for tokens made of channels at a position (perconv) or of the whole
        flattened output (persample), the dense layer of the tokenized baseline or the experts' first layer and the
        router (Soft MoE's phi, Top-1's linear router). Per-channel tokens (perfeat): none, no weight reads one
        channel, so the encoder's last layer is not recycled."""
        if isinstance(self.tokenizer, SimplicialFlatten):  # a silent channel's softmax is 1/W, not 0: not recycled
            return []
        if isinstance(self.tokenizer, Flatten):
            return outgoing(moe)
        if self.tokenizer.kind == "perfeat":
            return []
        if self.tokenizer.kind == "perpatch":
            return outgoing(self.tokenizer.embedding)
        if not hasattr(moe, "experts"):  # the tokenized baseline
            return outgoing(moe)
        router = [(moe.phi, (0,))] if isinstance(moe, SoftMoE) else outgoing(moe.router)
        return outgoing(moe.experts) + router


# >>> shared block: rainbow_knob_hooks
def redo_hook(args):
    """--redo's after-update hook, the recycled Rainbow agents' `_training_step_update`: after every redo-period-th
    update, the hidden neurons are scored on a fresh prioritized sample (the official agents'
    `sample_transition_batch`) with the parameters of this update, and the dormant ones recycled; logs the neurons
    recycled per layer (redo/<layer>_recycled_count) and in all (redo/recycled_count)."""

    def after_update(step, q_network, optimizer, rb, rng):
        if update_number(args, step) % args.redo_period:
            return {}
        probe, _ = rb.sample_prioritized(args.redo_batch_size, rng)
        masks, _ = dormant_neurons(q_network, rb.stacks(probe).to(next(q_network.parameters()).device), args.redo_tau)
        recycled = recycle_dormant(q_network, optimizer, masks)
        events = {f"redo/{name}_recycled_count": count for name, count in recycled.items()}
        return {**events, "redo/recycled_count": sum(recycled.values())}

    return after_update


def recyclable(make_network):
    """--redo: the networks of `make_network(num_actions)` as RecyclableQNetworks, which list their layers for ReDo."""
    return lambda num_actions: RecyclableQNetwork.of(make_network(num_actions))


def knob_after_update(args):
    """The step after each update of --redo and --expert-reset, in this order, or None when both are off."""
    redo = redo_hook(args) if args.redo else None
    reset = expert_reset_hook(args) if args.expert_reset != "none" else None
    if not (redo or reset):
        return None

    def after_update(step, q_network, optimizer, rb, rng):
        events = redo(step, q_network, optimizer, rb, rng) if redo else {}
        return {**events, **(reset(step, q_network, optimizer) if reset else {})}

    return after_update


def check_knob_args(args):
    """The knobs' flags: the MoE layer's (`check_moe_args`), the tokenized baseline's and ReDo's."""
    check_moe_args(args)
    if args.baseline_aggregation != "flatten" and args.moe_type != "baseline":
        fail(f"--baseline-aggregation {args.baseline_aggregation} applies to --moe-type baseline only")
    for name in ("redo_period", "redo_batch_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not args.redo_tau >= 0:
        fail(f"--redo-tau must be >= 0, got {args.redo_tau}")
    for flag, given in (("--expert-type big", args.expert_type == "big"), ("--shuffle-tokens", args.shuffle_tokens),
                        ("--moe-type simplicial_embedding_v2", args.moe_type == "simplicial_embedding_v2")):
        if args.redo and given:  # no layer-to-layer map for the experts' encoders, the shuffled features, a softmax group
            fail(f"--redo does not recycle the network of {flag} (no neuron maps onto the weights that read it); "
                 f"drop --redo or {flag}")
    num_updates = update_number(args, (args.total_timesteps - 1) // args.train_frequency * args.train_frequency)
    if args.redo and args.redo_period > num_updates:
        fail(f"--redo-period {args.redo_period} is more than the run's {num_updates:,} gradient updates, so --redo would "
             "never recycle; use a smaller --redo-period (the paper's Atari runs: 1000)")
# <<< shared block: rainbow_knob_hooks


def research_knobs(args):
    """Check the knobs' flags, and the hooks that plug them in. With every knob off: the paper's network, no hooks."""
    check_knob_args(args)
    network_knobs = (args.moe_type not in ("softmoe", "baseline") or args.use_random_phi or args.use_extra_linear_layer
                     or args.shuffle_tokens or args.expert_type == "big" or args.baseline_aggregation != "flatten")
    build = (functools.partial(make_knob_network, args) if network_knobs
             else functools.partial(make_network, **network_flags(args)))
    return Hooks(
        recyclable(build) if args.redo else build,
        extra_losses=functools.partial(moe_aux_losses, args) if args.aux_loss_fns else None,
        after_update=knob_after_update(args),
    )


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


# >>> shared block: routing
def normalized_entropy(p, dims):
    """Entropy of the distributions over `dims`, divided by its maximum log(size): 1 = uniform."""
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(dims)
    return entropy / math.log(math.prod(p.shape[d] for d in dims))


def routing_summary(record):
    """What the moe/ statistics average over states, per state: [B] or [B, k] tensors, far smaller than the routing
    weights [B, m, n, p] of `record`, so that the summaries of a probe's chunks, concatenated, stand for the whole."""
    summary = {}
    if "combine" in record:  # Soft MoE, weights [B, m, n, p]
        dispatch, combine = record["dispatch"], record["combine"]
        num_tokens = combine.shape[1]
        if num_tokens > 1:
            summary["dispatch_entropy"] = normalized_entropy(dispatch, (1,)).flatten(1).mean(1)
        if combine.shape[2] * combine.shape[3] > 1:
            summary["combine_entropy"] = normalized_entropy(combine, (2, 3)).mean(1)
            summary["slot_share"] = combine.sum(1).flatten(1) / num_tokens  # combine mass each slot delivers
        summary["expert_share"] = combine.sum(dim=(1, 3)) / num_tokens
    elif "router_probs" in record:  # Top-k MoE, probabilities [B, m, n]
        probs, kept = record["router_probs"], record["kept"]
        num_experts = probs.shape[-1]
        if num_experts > 1:
            summary["router_entropy"] = normalized_entropy(probs, (2,)).mean(1)
        summary["expert_share"] = F.one_hot(probs.argmax(-1), num_experts).float().mean(1)
        summary["dropped_token_fraction"] = 1.0 - kept.float().mean(1)
    return summary


def routing_statistics(record, summary=None):
    """How the router spreads tokens over slots and experts (logged under moe/), from the routing weights of `record`
    or from the `routing_summary` of the same states."""
    summary = routing_summary(record) if summary is None else summary
    stats = {f"moe/{name}": summary[name].mean().item() for name in
             ("dispatch_entropy", "combine_entropy", "router_entropy", "dropped_token_fraction") if name in summary}
    if "slot_share" in summary:
        stats["moe/slot_usage_entropy"] = normalized_entropy(summary["slot_share"].mean(0), (0,)).item()
    if "expert_share" in summary and summary["expert_share"].shape[1] > 1:
        expert_share = summary["expert_share"].mean(0)
        stats["moe/expert_usage_entropy"] = normalized_entropy(expert_share, (0,)).item()
        stats["moe/expert_usage_max"] = expert_share.max().item()
    return stats


ROUTING_KEYS = ("dispatch", "combine", "router_logits", "router_probs", "top_experts", "kept")  # no activations


def probe_statistics(q_network, probe, taus, chunk_size):
    """The dormant/ and moe/ statistics of `q_network` on the states `probe`, which go through the network
    `chunk_size` states at a time: the same numbers as one pass over the whole probe, whose routing weights alone
    would take 2 x m x n x p floats a state (380 MB with big experts on 7,056 pixel tokens)."""
    activations, summaries = {}, []
    with torch.no_grad():
        for states in probe.split(chunk_size):
            record = {}
            q_network(states, record)
            summaries.append(routing_summary(record))
            for name, value in record.items():
                if name not in ROUTING_KEYS:
                    activations.setdefault(name, []).append(value)
    activations = {name: torch.cat(values) for name, values in activations.items()}
    summary = {name: torch.cat([chunk[name] for chunk in summaries]) for name in summaries[0]}
    return {**dormant_statistics(activations, taus), **routing_statistics({}, summary)}
# <<< shared block: routing


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
    """How the research knobs plug into the method: the network (`make_network(num_actions)`), extra losses on the
    update's forward pass (`extra_losses(record)` -> {name: loss}), and a step after each update
    (`after_update(step, q_network, optimizer, rb, rng)` -> {tag: value} to log)."""

    make_network: Callable
    extra_losses: Optional[Callable] = None
    after_update: Optional[Callable] = None


def check_args(args):
    """Every bad flag of the method and the run stops here, before anything is created or allocated."""
    check_numbers(args)
    for name in ("total_timesteps", "buffer_size", "batch_size", "train_frequency", "target_network_frequency",
                 "num_experts", "expert_hidden_units", "max_episode_steps", "log_frequency", "stats_frequency",
                 "stats_batch_size", "eval_episodes", "n_step"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("learning_starts", "checkpoint_every", "noisy_sigma0", "priority_exponent", "max_grad_norm"):
        if not getattr(args, name) >= 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("learning_rate", "adam_eps"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("gamma", "epsilon_train", "eval_epsilon", "repeat_action_probability", "priority_beta_start",
                 "priority_beta_end"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if args.dormant_tau < 0:
        fail(f"--dormant-tau must be >= 0, got {args.dormant_tau}")
    if args.n_atoms < 2:
        fail(f"--n-atoms must be at least 2, got {args.n_atoms}")
    if not args.v_min < args.v_max:
        fail(f"--v-min {args.v_min} must be smaller than --v-max {args.v_max}")
    if args.buffer_size < args.batch_size + args.n_step + 8:
        fail(f"--buffer-size {args.buffer_size} is too small for --batch-size {args.batch_size} and --n-step "
             f"{args.n_step}; use at least {args.batch_size + args.n_step + 8}")
    if args.learning_starts < args.n_step + 8:
        fail(f"--learning-starts must be at least {args.n_step + 8} (--n-step + 8) so that the first update has "
             f"complete transitions, got {args.learning_starts}")
    if args.moe_type == "baseline" and args.baseline_aggregation == "flatten" and args.tokenization != "perconv":
        fail(f"--tokenization {args.tokenization} needs tokens: use --baseline-aggregation sum|mean or an MoE")
    if args.moe_type.startswith("simplicial_embedding") and args.tokenization != "perconv":
        fail(f"--tokenization {args.tokenization} needs an MoE layer; drop it or use --moe-type softmoe")
    if not args.capacity_factor > 0:
        fail(f"--capacity-factor must be positive (1.0: as many slots as tokens), got {args.capacity_factor}")
    if args.capacity_factor != 1.0 and args.moe_type not in ("softmoe", "top1"):
        fail("--capacity-factor sets the MoE layer's slots; drop it or use --moe-type softmoe or top1")
    if args.moe_normalization and args.moe_type != "softmoe":
        fail("--moe-normalization applies to the Soft MoE router only; use --moe-type softmoe")
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


def evaluate(model_path, make_network, num_episodes, device, epsilon, seed, returns=(), stop=None, video_dir=None):
    """Returns of `num_episodes` episodes of the saved model (built by `make_network(num_actions)`) with all noise off,
    epsilon-greedy with `epsilon`. Episode i starts from env.reset(seed=seed + i) and draws its random actions from its
    own generator, so an evaluation stopped by a signal (`stop`) resumes after its last finished episode (`returns`)
    and ends as an uninterrupted one would."""
    saved = torch.load(model_path, map_location=device, weights_only=True)
    args = Args(**saved["args"])
    env = make_env(args.env_id, seed, args.repeat_action_probability, args.max_episode_steps,
                   capture_video=video_dir is not None, video_dir=video_dir, video_prefix="eval")
    model = make_network(env.action_space.n).to(device)
    model.load_state_dict(saved["model"])
    model.eval()  # every noisy layer, the experts' included, uses its mean weights
    returns, start, done_before = list(returns), time.time(), len(returns)
    while len(returns) < num_episodes and not stop:
        rng = np.random.default_rng([seed, len(returns)])
        frame, _ = env.reset(seed=seed + len(returns))
        stack, episode_return, done = np.repeat(frame[None], 4, axis=0), 0.0, False
        while not (done or stop):
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                with torch.no_grad():
                    action = model(torch.as_tensor(stack, device=device).unsqueeze(0))[1].argmax(1).item()
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


# >>> shared block: rainbow_run
class RainbowRun(Run):
    """The shared `Run`, with prioritized replay's charts at the end of each log interval: replay/is_weight_mean, the
    mean over the interval's updates of their batch's mean importance weight (the "is_weight_mean" that `train_step`
    adds to their metrics), and the priorities, replay/max_priority and replay/mean_priority."""

    def __init__(self, args, checkpoint):
        super().__init__(args, checkpoint)
        self.weight_sum = checkpoint["run"]["weight_sum"] if checkpoint else 0.0

    def state_dict(self):
        return {**super().state_dict(), "weight_sum": self.weight_sum}

    def log_training(self, step, updates, events, save):
        weights = [metrics.pop("is_weight_mean") for metrics in updates]
        super().log_training(step, updates, events, save)
        for weight in weights:
            self.weight_sum += weight

    def log_interval(self, step, charts, rb):
        if (step + 1) % self.args.log_frequency == 0:
            if self.num_logged:
                self.writer.add_scalar("replay/is_weight_mean", self.weight_sum / self.num_logged, step)
                self.weight_sum = 0.0
            if rb.tree.total() > 0:
                self.writer.add_scalar("replay/max_priority", rb.tree.max_priority, step)
                self.writer.add_scalar("replay/mean_priority", rb.tree.total() / rb.num_prioritized(), step)
        super().log_interval(step, charts)


def rng_state(rng, noise, device):
    return {"numpy": rng.bit_generator.state, "noise": noise.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def load_optimizer(optimizer, state, learning_rate):
    """Adam's saved state, with this run's --learning-rate (it may change on resume: a non-finite loss suggests it)
    and this device's `capturable` (a checkpoint written on a CPU restores capturable=False, which a CUDA graph of the
    update cannot record)."""
    capturable = [group["capturable"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, keep in zip(optimizer.param_groups, capturable):
        group["capturable"], group["lr"] = keep, learning_rate


def load_noise_state(noise, state):
    """The noisy layers' generator as saved, or, for a checkpoint written on the other kind of device (a CPU
    generator's state is 5,056 bytes, a CUDA one's 16, and their streams differ), reseeded from a digest of the saved
    state: the run goes on, deterministically, with a noise sequence that differs from an uninterrupted run's."""
    if state.numel() == noise.get_state().numel():
        noise.set_state(state)
        return
    noise.manual_seed(int.from_bytes(hashlib.sha256(state.numpy().tobytes()).digest()[:8], "little") >> 1)
    print(f"noise generator: the checkpoint's was on the other kind of device than {noise.device.type}; reseeded from "
          "its state (the noise sequence differs from an uninterrupted run's)", flush=True)


def resume(checkpoint, run, q_network, target_network, optimizer, rb, env, rng, noise, device, stack):
    """Load a checkpoint (None: a fresh run) into the networks, the optimizer, the replay memory (priorities
    included), the environment and the generators (the noise's included). Returns the frame stack to act on and
    whether the replay memory was loaded (a checkpoint saved in the evaluation after training may hold none: then only
    the evaluation can go on)."""
    if not checkpoint:
        return stack, True
    q_network.load_state_dict(checkpoint["q_network"])
    target_network.load_state_dict(checkpoint["target_network"])
    load_optimizer(optimizer, checkpoint["optimizer"], run.args.learning_rate)
    if checkpoint["replay"] is not None:
        run.checkpoint.load_replay(rb, checkpoint["replay"], checkpoint["folder"])
    set_env_state(env, checkpoint["env"])
    rng.bit_generator.state = checkpoint["rng"]["numpy"]
    load_noise_state(noise, checkpoint["rng"]["noise"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    print(f"resumed {run.name} at step {run.start_step:,} from {run.checkpoint.folder}", flush=True)
    return checkpoint["stack"].numpy().copy(), checkpoint["replay"] is not None


def statistics(args, q_network, rb, step, device):
    """The dormant/ and moe/ statistics of the noise-free network on a fresh uniform sample of --stats-batch-size
    states, drawn from its own generator: the analysis never changes the training run."""
    probe = rb.stacks(rb.sample_indices(args.stats_batch_size, np.random.default_rng([args.seed, step]))).to(device)
    set_noise(q_network, False)
    stats = probe_statistics(q_network, probe, (0.0, args.dormant_tau), args.batch_size)
    set_noise(q_network, True)
    return stats
# <<< shared block: rainbow_run


# flags that may change when resuming; everything else must match the checkpoint
RESUMABLE_FIELDS = ("total_timesteps", "checkpoint_every", "cuda", "cuda_graphs", "track", "wandb_project_name",
                    "wandb_entity", "save_model", "eval_episodes", "log_frequency", "stats_frequency", "capture_video",
                    "learning_rate")


# =====================================================================================================================
# Main: set-up, then CleanRL's loop (act, step, store, train, log)
# =====================================================================================================================
if __name__ == "__main__":
    args, checkpoint = parse_args(Args, RESUMABLE_FIELDS, segment_fields(PrioritizedReplayMemory(1)))
    check_args(args)
    hooks = research_knobs(args)  # without the knobs: hooks = Hooks(functools.partial(make_network, **network_flags(args)))
    keep_freed_memory()
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    bytes_per_transition = PrioritizedReplayMemory.bytes_per_slot(capacity=args.buffer_size)
    gpu_reserve = update_gpu_bytes(hooks.make_network, args.batch_size) if device.type == "cuda" else 0
    replay_device = place_replay(args.buffer_size, device, bytes_per_transition, bool(checkpoint), gpu_reserve)
    run = RainbowRun(args, checkpoint)

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    rng = np.random.default_rng(args.seed)  # epsilon-greedy actions and replay sampling
    noise = torch.Generator(device=device)  # the noisy layers' noise
    noise.manual_seed(args.seed)

    env = make_training_env(args, run.name)
    q_network = hooks.make_network(env.action_space.n).to(device)
    optimizer = make_optimizer(args, q_network)
    target_network = hooks.make_network(env.action_space.n).to(device)
    target_network.load_state_dict(q_network.state_dict())
    rb = make_replay(args, replay_device)
    print(f"{run.name}: {sum(p.numel() for p in q_network.parameters()):,} parameters on {device}, replay memory on "
          f"{replay_device} ({bytes_per_transition} bytes per transition with priorities)", flush=True)
    frame, _ = env.reset(seed=args.seed)
    stack = np.repeat(frame[None], 4, axis=0)
    stack, replay_loaded = resume(checkpoint, run, q_network, target_network, optimizer, rb, env, rng, noise, device,
                                  stack)
    checkpoint = None  # its tensors are loaded: free them

    def save(next_step, with_replay=True):
        run.checkpoint.save({
            "script": os.path.basename(__file__), "args": vars(args), "global_step": next_step, "run": run.state_dict(),
            "q_network": q_network.state_dict(), "target_network": target_network.state_dict(),
            "optimizer": optimizer.state_dict(), "env": get_env_state(env), "stack": torch.from_numpy(stack.copy()),
            "rng": rng_state(rng, noise, device)}, rb if with_replay else None)

    use_graphs = use_cuda_graphs(args, device, replay_device)
    act = CudaGraph(greedy_action, use_graphs)
    update_fn = CudaGraph(functools.partial(update, extra_losses=hooks.extra_losses), use_graphs)
    for global_step in range(run.start_step, args.total_timesteps):
        run.start_step_of_loop(global_step, save, rb)

        # ALGO LOGIC: put action logic here (the noisy network explores; epsilon is 0 by default)
        action = select_action(q_network, stack, args.epsilon_train, rng, noise, device, act)

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
        updates, events = train_step(global_step, args, q_network, target_network, optimizer, rb, rng, noise,
                                     update_fn, hooks.after_update)
        run.log_training(global_step, updates, events, save)
        run.log_interval(global_step, {"beta": beta_at(args, global_step)}, rb)
        if (global_step + 1) % args.stats_frequency == 0 and global_step > args.learning_starts:
            for key, value in statistics(args, q_network, rb, global_step, device).items():
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
