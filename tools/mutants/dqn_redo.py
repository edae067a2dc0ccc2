"""Known bugs in dqn_redo.py, each with the tests that must catch it: (script, description, snippet, replacement, tests)."""

UNIT = "tests/test_dqn_redo.py"
LEARN = "tests/test_dqn_redo_learning.py"
E2E = "tests/test_dqn_redo_e2e.py"

OFFICIAL_ORDER = """\
    for name, layer, _ in network.redo_layers():  # (1) incoming weights and biases
        dead = masks[name]
        layer.weight[dead] = init_(torch.empty_like(layer.weight))[dead]
        layer.bias[dead] = 0.0
        entries(layer.weight)[dead] = True
    for name, _, next_layer in network.redo_layers():  # (2) outgoing weights, after every redraw
        dead = masks[name]
"""
LAYER_BY_LAYER = """\
    for name, layer, next_layer in network.redo_layers():  # the PyTorch port's order: redraw, zero, next layer
        dead = masks[name]
        layer.weight[dead] = init_(torch.empty_like(layer.weight))[dead]
        layer.bias[dead] = 0.0
        entries(layer.weight)[dead] = True
"""

MUTANTS = [
    ("dqn_redo", "conv channel expanded with repeat (tile) instead of repeat_interleave at the flatten",
     "inputs = dead.repeat_interleave(fan_in // dead.numel())", "inputs = dead.repeat(fan_in // dead.numel())",
     [UNIT]),
    ("dqn_redo", "recycled biases not zeroed",
     "layer.bias[dead] = 0.0", "layer.bias[dead] = layer.bias[dead]", [UNIT]),
    ("dqn_redo", "Adam moments of recycled weights not zeroed",
     "value[reset] = 0.0", "value[reset] = value[reset]", [UNIT]),
    ("dqn_redo", "Adam step count restarted at every recycling",
     "                value[reset] = 0.0\n",
     "                value[reset] = 0.0\n        optimizer.state.get(weight, {}).get('step', torch.zeros(())).zero_()\n",
     [UNIT]),
    ("dqn_redo", "incoming redraw overwrites the zeros of the previous layer's outgoing weights (per-layer order)",
     OFFICIAL_ORDER, LAYER_BY_LAYER, [UNIT]),
    ("dqn_redo", "recycling zeroes the next layer's bias (the Q head's included)",
     "next_layer.weight[:, inputs] = 0.0", "next_layer.weight[:, inputs] = 0.0\n        next_layer.bias.zero_()",
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
     "if args.redo_reset_adam_step:", "if False:", [LEARN]),
    ("dqn_redo", "recycled neurons get no new incoming weights",
     "layer.weight[dead] = init_(torch.empty_like(layer.weight))[dead]", "init_(torch.empty_like(layer.weight))",
     [UNIT, LEARN]),
]
