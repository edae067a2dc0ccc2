"""Known bugs in der_single_expert.py, each with the tests that must catch it: (script, description, snippet, replacement, tests).
The Rainbow machinery is a shared block of rainbow_tokenized.py: its mutants live there, and the shared-block test
catches any drift of this copy."""

UNIT = "tests/test_der_single_expert.py"
E2E = "tests/test_der_single_expert_e2e.py"
CONFIG = "tests/test_der_single_expert_config.py"

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
     "if rng.random() < args.eval_epsilon:", "if rng.random() < 0.0:", [UNIT]),
    ("der_single_expert", "evaluation without no-op starts",
     "noop_max=args.eval_noop_max,", "noop_max=0,", [UNIT]),
    ("der_single_expert", "evaluation: the frame stack crosses a lost life",
     'elif args.terminal_on_life_loss and info["lives"] < lives[i]:', "elif False:", [UNIT]),
    ("der_single_expert", "HNS divides by the human score instead of human - random",
     "return (score - random_score) / (human_score - random_score)", "return (score - random_score) / human_score",
     [UNIT]),
    ("der_single_expert", "training: a lost life is not terminal for learning",
     'life_lost = args.terminal_on_life_loss and info["lives"] < lives', "life_lost = False", [E2E]),
    ("der_single_expert", "training: a lost life ends the episode's return too",
     "if terminated or truncated:\n            writer.add_scalar(\"charts/episodic_return\"",
     "if terminated or truncated or life_lost:\n            writer.add_scalar(\"charts/episodic_return\"", [E2E]),
    ("der_single_expert", "training: the agent's frame stack crosses a lost life",
     "elif life_lost:  # the replay memory starts a new stack here", "elif False:  # the replay memory starts a new stack here",
     [E2E]),
    ("der_single_expert", "score = best evaluation episode instead of the mean",
     "score = float(np.mean(eval_returns))", "score = float(np.max(eval_returns))", [E2E]),
]
