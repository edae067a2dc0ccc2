"""Known bugs in dqn_redo.py, each with the tests that must catch it: (script, description, snippet, replacement, tests)."""

UNIT = "tests/test_dqn_redo.py"
LEARN = "tests/test_dqn_redo_learning.py"
E2E = "tests/test_dqn_redo_e2e.py"

OFFICIAL_ORDER = """\
    for name, renewed, _ in layers:  # (1) incoming weights and biases
        for param, axes, fresh in renewed:
            dead = neuron_entries(masks[name], param, axes)
            param[dead] = fresh(param)[dead]
            if len(axes) < param.dim():  # a weight; a bias holds one entry per neuron and keeps its moments
                touched[param] = touched.get(param, False) | dead
    for name, _, zeroed in layers:  # (2) outgoing weights, after every redraw
        for param, axes in zeroed:
"""
LAYER_BY_LAYER = """\
    for name, renewed, zeroed in layers:  # the PyTorch port's order: redraw, zero, next layer
        for param, axes, fresh in renewed:
            dead = neuron_entries(masks[name], param, axes)
            param[dead] = fresh(param)[dead]
            if len(axes) < param.dim():
                touched[param] = touched.get(param, False) | dead
        for param, axes in zeroed:
"""
ZERO_OUTGOING = """\
            param[dead] = 0.0
            touched[param] = touched.get(param, False) | dead
"""

CONFIG = "tests/test_dqn_redo_config.py"
DEFAULTS = f"{CONFIG}::test_defaults_match_the_papers_dqn_on_dopamines_dqn_gin"
SCHEDULE = f"{CONFIG}::test_updates_recycling_and_target_copies_follow_their_periods"
LOSS = f"{CONFIG}::test_the_loss_is_the_huber_loss_to_the_target_networks_max"
EVAL = f"{CONFIG}::test_evaluation_plays_epsilon_greedy_with_epsilon_eval_on_the_training_environment"
REWARDS = f"{CONFIG}::test_rewards_are_clipped_for_learning_and_raw_in_the_logged_return"

MUTANTS = [
    ("dqn_redo", "conv channel expanded with repeat (tile) instead of repeat_interleave at the flatten",
     "owned = dormant.repeat_interleave(math.prod(sizes) // dormant.numel())",
     "owned = dormant.repeat(math.prod(sizes) // dormant.numel())",
     [UNIT]),
    ("dqn_redo", "recycled biases not zeroed",
     "(layer.bias, (0,), torch.zeros_like)", "(layer.bias, (0,), torch.clone)", [UNIT]),
    ("dqn_redo", "Adam moments of recycled weights not zeroed",
     "value[reset] = 0.0", "value[reset] = value[reset]", [UNIT]),
    ("dqn_redo", "Adam step count restarted at every recycling",
     "                value[reset] = 0.0\n",
     "                value[reset] = 0.0\n        optimizer.state.get(param, {}).get('step', torch.zeros(())).zero_()\n",
     [UNIT]),
    ("dqn_redo", "incoming redraw overwrites the zeros of the previous layer's outgoing weights (per-layer order)",
     OFFICIAL_ORDER, LAYER_BY_LAYER, [UNIT]),
    ("dqn_redo", "recycling zeroes the next layer's bias (the Q head's included)",
     ZERO_OUTGOING, ZERO_OUTGOING + "            [lay.bias.zero_() for lay in network.modules() if getattr(lay, 'weight', "
     "None) is param and dead.any()]\n",
     [UNIT]),
    ("dqn_redo", "Q head recorded, hence scored and counted as hidden neurons",
     "return self.head(x)", 'return self.head(x) if record is None else record.setdefault("head", self.head(x))',
     [UNIT]),
    ("dqn_redo", "recycled weights drawn from another initializer (kaiming uniform, fan-in only)",
     "init_=nn.init.xavier_uniform_", "init_=nn.init.kaiming_uniform_", [UNIT]),
    ("dqn_redo", "scores normalized by the layer's sum (the paper's wording) instead of its mean",
     "return score / (score.mean() + 1e-9)", "return score / (score.sum() + 1e-9)", [UNIT]),
    ("dqn_redo", "dormant when score < tau instead of <= tau",
     "return {name: score <= tau for name, score in scores.items()}, scores",
     "return {name: score < tau for name, score in scores.items()}, scores", [UNIT]),
    ("dqn_redo", "MSE instead of Huber loss",
     "F.smooth_l1_loss(q_taken, td_target, beta=1.0)", "F.mse_loss(q_taken, td_target)", [UNIT]),
    ("dqn_redo", "target copied every target-network-frequency gradient updates (depends on the replay ratio)",
     "if step > args.learning_starts and step % args.target_network_frequency == 0:",
     "if updates and len(updates) == len(updates_at(args, step)) and updates_at(args, step)[-1] "
     "% args.target_network_frequency == 0:", [LEARN]),
    ("dqn_redo", "one update per training step whatever the replay ratio",
     "per_step = round(args.replay_ratio * args.train_frequency)", "per_step = 1", [LEARN]),
    ("dqn_redo", "ReDo period counted in agent steps instead of gradient updates",
     "if args.redo and number % args.redo_period == 0:", "if args.redo and step % args.redo_period == 0:", [LEARN]),
    ("dqn_redo", "ReDo never runs",
     "if args.redo and number % args.redo_period == 0:", "if False:", [LEARN, E2E]),
    ("dqn_redo", "--redo-reset-adam-step has no effect",
     "after_recycle=reset_adam_steps if args.redo_reset_adam_step else None", "after_recycle=None", [LEARN]),
    ("dqn_redo", "recycled neurons get no new incoming weights",
     "param[dead] = fresh(param)[dead]", "fresh(param)",
     [UNIT, LEARN]),
    # configuration: a choice changed rather than a formula (tests/test_dqn_redo_config.py)
    ("dqn_redo", "config: defaults: tau 0.1 (the paper's high replay-ratio value) at replay ratio 0.25",
     "    redo_tau: float = 0.025\n", "    redo_tau: float = 0.1\n", [DEFAULTS]),
    ("dqn_redo", "config: defaults: the official code's probe batch of 256 instead of the paper's 64",
     "    redo_batch_size: int = 64\n", "    redo_batch_size: int = 256\n", [DEFAULTS]),
    ("dqn_redo", "config: defaults: replay ratio 1 instead of DQN's 0.25",
     "    replay_ratio: float = 0.25\n", "    replay_ratio: float = 1.0\n", [DEFAULTS, SCHEDULE]),
    ("dqn_redo", "config: defaults: the port's target copy every 2000 steps instead of 8000",
     "    target_network_frequency: int = 8000\n", "    target_network_frequency: int = 2000\n", [DEFAULTS, SCHEDULE]),
    ("dqn_redo", "config: ReDo scores on a probe of the training batch's size",
     "rb.sample_indices(args.redo_batch_size, rng)", "rb.sample_indices(args.batch_size, rng)", [DEFAULTS]),
    ("dqn_redo", "config: ReDo scores at tau 0 whatever --redo-tau",
     "masks, _ = dormant_neurons(q_network, probe, args.redo_tau)", "masks, _ = dormant_neurons(q_network, probe, 0.0)",
     [DEFAULTS]),
    ("dqn_redo", "config: double-Q target (the ReDo agent takes the target network's max)",
     'target_max = target_network(batch["next_obs"]).max(dim=1).values',
     'target_max = target_network(batch["next_obs"]).gather('
     '1, q_network(batch["next_obs"]).argmax(1, keepdim=True)).squeeze(1)',
     [LOSS, DEFAULTS]),
    ("dqn_redo", "config: Huber loss summed over the batch instead of averaged",
     "F.smooth_l1_loss(q_taken, td_target, beta=1.0)", 'F.smooth_l1_loss(q_taken, td_target, beta=1.0, reduction="sum")',
     [LOSS, DEFAULTS]),
    ("dqn_redo", "config: training environment without sticky actions",
     "return make_env(args.env_id, args.seed, args.repeat_action_probability, args.max_episode_steps,",
     "return make_env(args.env_id, args.seed, 0.0, args.max_episode_steps,", [DEFAULTS, REWARDS]),
    ("dqn_redo", "config: evaluation with the training's final epsilon 0.01 instead of epsilon_eval",
     '{"epsilon": args.eval_epsilon,', '{"epsilon": args.end_e,', [DEFAULTS, EVAL]),
    ("dqn_redo", "config: the replay memory stores raw rewards (clipping dropped)",
     "rb.add(stack[-1], action, clip_reward(reward),", "rb.add(stack[-1], action, reward,", [REWARDS]),
]
