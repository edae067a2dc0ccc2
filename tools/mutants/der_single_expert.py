"""Known bugs in der_single_expert.py, each with the tests that must catch it: (script, description, snippet, replacement, tests).
The Rainbow machinery is a shared block of rainbow_tokenized.py: its mutants live there, and the shared-block test
catches any drift of this copy."""

UNIT = "tests/test_der_single_expert.py"
E2E = "tests/test_der_single_expert_e2e.py"
CONFIG = "tests/test_der_single_expert_config.py"
REDO = "tests/test_rainbow_redo.py"

DEFAULTS = f"{CONFIG}::test_defaults_match_the_official_der_gin_with_one_scaled_expert"
SCHEDULE = f"{CONFIG}::test_an_update_every_step_after_the_warm_up_and_a_target_copy_every_2000"
REWARDS = f"{CONFIG}::test_rewards_are_clipped_for_learning_and_raw_in_the_logged_return_and_a_lost_life_is_terminal"

MUTANTS = [
    ("der_single_expert", "defaults: van Hasselt's n-step 20 instead of DER.gin's 10",
     "    n_step: int = 10\n", "    n_step: int = 20\n", [CONFIG]),
    ("der_single_expert", "DER network: the value stream reads the advantage stream's hidden layer",
     "value = self.value(value_hidden).view(-1, 1, self.num_atoms)",
     "value = self.value(advantage_hidden).view(-1, 1, self.num_atoms)", [UNIT]),
    ("der_single_expert", "DER network: one hidden layer shared by both streams",
     "advantage = self.advantage(advantage_hidden).view(-1, self.num_actions, self.num_atoms)",
     "advantage = self.advantage(value_hidden).view(-1, self.num_actions, self.num_atoms)", [UNIT]),
    ("der_single_expert", "gradient clipping never applied",
     "nn.utils.clip_grad_norm_(q_network.parameters(), max_grad_norm)", "pass", [UNIT]),
    ("der_single_expert", "evaluation with the noise on (training mode)",
     "q_network.eval()  # every noisy layer", "pass  # every noisy layer", [UNIT]),
    ("der_single_expert", "evaluation epsilon ignored",
     "if rngs[i].random() < args.eval_epsilon:", "if rngs[i].random() < 0.0:", [UNIT]),
    ("der_single_expert", "evaluation without no-op starts",
     "frame, info = start_episode(env, args.noop_max, rngs[i], seed=seed + i)", "frame, info = env.reset(seed=seed + i)",
     [UNIT]),
    ("der_single_expert", "training: episodes after the first start without no-op steps",
     "next_frame, info = start_episode(env, args.noop_max, rng)", "next_frame, info = env.reset()", [E2E]),
    ("der_single_expert", "training: the first episode starts without no-op steps",
     "frame, info = start_episode(env, args.noop_max, rng, seed=args.seed)", "frame, info = env.reset(seed=args.seed)",
     [E2E]),
    ("der_single_expert", "no-op starts: 1 to noop_max frames' worth of steps instead of Dopamine's 0 to noop_max - 1",
     "for _ in range(int(rng.integers(noop_max)) if noop_max > 0 else 0):",
     "for _ in range(int(rng.integers(1, noop_max + 1)) if noop_max > 0 else 0):", [UNIT]),
    ("der_single_expert", "no-op starts: a life lost in them does not restart the game",
     'if terminated or truncated or info["lives"] < lives:', "if terminated or truncated:", [UNIT]),
    ("der_single_expert", "evaluation: the frame stack crosses a lost life",
     'elif args.terminal_on_life_loss and info["lives"] < lives[i]:', "elif False:", [UNIT]),
    ("der_single_expert", "HNS divides by the human score instead of human - random",
     "return (score - random_score) / (human_score - random_score)", "return (score - random_score) / human_score",
     [UNIT]),
    ("der_single_expert", "training: a lost life is not terminal for learning",
     'life_lost = args.terminal_on_life_loss and info["lives"] < lives', "life_lost = False", [E2E]),
    ("der_single_expert", "training: a lost life ends the episode's return too",
     "        if terminated or truncated:\n            run.end_episode(global_step)\n",
     "        if terminated or truncated or life_lost:\n            run.end_episode(global_step)\n", [E2E]),
    ("der_single_expert", "training: the agent's frame stack crosses a lost life",
     "elif life_lost:  # the replay memory starts a new stack here", "elif False:  # the replay memory starts a new stack here",
     [E2E]),
    ("der_single_expert", "score = best evaluation episode instead of the mean",
     "score = float(np.mean(self.eval_returns))", "score = float(np.max(self.eval_returns))", [E2E]),
    # configuration: a choice changed rather than a formula (tests/test_der_single_expert_config.py)
    ("der_single_expert", "config: defaults: full_rainbow.gin's learning rate 6.25e-5 instead of DER.gin's 1e-4",
     "    learning_rate: float = 1e-4\n", "    learning_rate: float = 6.25e-5\n", [DEFAULTS]),
    ("der_single_expert", "config: defaults: sticky actions (full_rainbow.gin's) instead of DER.gin's none",
     "    repeat_action_probability: float = 0.0\n", "    repeat_action_probability: float = 0.25\n",
     [DEFAULTS, REWARDS]),
    ("der_single_expert", "config: defaults: Rainbow's update period 4 instead of DER's 1",
     "    train_frequency: int = 1\n", "    train_frequency: int = 4\n", [DEFAULTS, SCHEDULE]),
    ("der_single_expert", "config: defaults: Rainbow's target period 8000 instead of DER's 2000",
     "    target_network_frequency: int = 2000\n", "    target_network_frequency: int = 8000\n", [DEFAULTS, SCHEDULE]),
    ("der_single_expert", "config: defaults: Rainbow's 20k-step warm-up instead of DER's 1600",
     "    learning_starts: int = 1600\n", "    learning_starts: int = 20_000\n", [DEFAULTS, SCHEDULE]),
    ("der_single_expert", "config: defaults: a lost life not terminal for learning",
     "    terminal_on_life_loss: bool = True\n", "    terminal_on_life_loss: bool = False\n", [DEFAULTS, REWARDS]),
    ("der_single_expert", "config: defaults: Kaixhin's 10 evaluation episodes instead of the protocol's 100",
     "    eval_episodes: int = 100\n", "    eval_episodes: int = 10\n", [DEFAULTS]),
    ("der_single_expert", "config: n-step not passed to the replay memory (1-step returns)",
     "return PrioritizedReplayMemory(args.buffer_size, n_step=args.n_step, gamma=args.gamma, device=device)",
     "return PrioritizedReplayMemory(args.buffer_size, gamma=args.gamma, device=device)", [DEFAULTS]),
    ("der_single_expert", "config: training environment ignores --repeat-action-probability (make_env's default 0.25)",
     "return make_env(args.env_id, args.seed, args.repeat_action_probability, args.max_episode_steps,",
     "return make_env(args.env_id, args.seed, max_episode_steps=args.max_episode_steps,", [DEFAULTS, REWARDS]),
    ("der_single_expert", "config: the replay memory stores raw rewards (clipping dropped)",
     "rb.add(stack[-1], action, clip_reward(reward),", "rb.add(stack[-1], action, reward,", [REWARDS]),
    ("der_single_expert", "config: the logged return sums clipped rewards",
     "        run.add_reward(reward)\n", "        run.add_reward(clip_reward(reward))\n", [REWARDS]),
    # ReDo: this QNetwork's redo_layers (the recycling itself is the shared block, mutated in rainbow_tokenized.py)
    ("der_single_expert", "ReDo (DER network): a recycled value-stream unit still feeds the value head",
     '("value_hidden", incoming(h.value_hidden), outgoing(h.value)),',
     '("value_hidden", incoming(h.value_hidden), []),', [REDO]),
    ("der_single_expert", "config: defaults: ReDo on", "    redo: bool = False\n", "    redo: bool = True\n", [DEFAULTS]),
]
