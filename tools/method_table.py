"""The "method, top to bottom" table of docs/<script>.md, made from the script itself: one row per top-level
definition of the method and of the research knobs (its lines and the first sentence of its docstring), then the plumbing
and the loop.

    python tools/method_table.py dqn_softmoe            # print the table
    python tools/method_table.py --write                # rewrite the tables of every docs/<script>.md

tests/test_docs.py fails when a doc's table differs from what this prints, so the line numbers cannot go stale."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- method table: made by tools/method_table.py -->", "<!-- end of method table -->"
KNOBS, BANNER = "# Research knobs", "# Run plumbing:"
SECTIONS = {  # what each definition is part of, in the words of the papers' method sections
    "Args": "flags", "make_env": "environment", "make_training_env": "environment", "clip_reward": "environment",
    "xavier_": "encoder", "same_padding": "encoder", "SameConv2d": "encoder", "NatureEncoder": "encoder",
    "lecun_normal_": "encoder", "max_pool_same": "encoder", "ResidualBlock": "encoder", "ImpalaEncoder": "encoder",
    "DerEncoder": "encoder", "Tokenizer": "tokenizer", "SoftMoE": "MoE layer", "TopKMoE": "MoE layer",
    "Experts": "experts", "NoisyExperts": "experts", "factorized_noise": "noisy layers",
    "NoisyLinear": "noisy layers", "resample_noise": "noisy layers", "set_noise": "noisy layers",
    "QNetwork": "network", "ReplayMemory": "replay memory", "SumTree": "replay memory",
    "PrioritizedReplayMemory": "replay memory", "make_replay": "replay memory", "linear_schedule": "exploration",
    "epsilon_at": "exploration", "greedy_action": "acting", "select_action": "acting", "beta_at": "replay schedule",
    "importance_weights": "replay schedule", "make_optimizer": "optimizer", "dqn_loss": "loss",
    "moe_aux_losses": "loss",
    "project_distribution": "loss", "categorical_target": "loss", "categorical_loss": "loss", "update": "update",
    "neuron_scores": "ReDo", "dormant_statistics": "ReDo", "dormant_neurons": "ReDo", "recycle_dormant": "ReDo",
    "incoming": "ReDo", "outgoing": "ReDo", "neuron_entries": "ReDo", "updates_at": "training step",
    "update_number": "training step", "train_step": "training step", "evaluation_settings": "evaluation",
    "Frames": "experts", "grouped_encoder": "experts", "BigExperts": "experts",
    "DenseLayer": "network", "Flatten": "network", "make_network": "network", "network_flags": "network",
}


def first_sentence(node):
    doc = ast.get_docstring(node) or ""
    text = " ".join(doc.split())
    match = re.match(r"(.+?(?<! al)(?<!e\.g)(?<!i\.e)\.)(\s|$)", text)  # "et al." and "e.g." end no sentence
    sentence = (match.group(1) if match else text).rstrip(".")
    return sentence.replace("|", "\\|") or {"Args": "every flag, with its docstring (`--help`)"}.get(node.name, "")


def table(name):
    path = ROOT / "cleanrl_moe" / f"{name}.py"
    source = path.read_text()
    lines = source.split("\n")
    knobs = next(i + 1 for i, line in enumerate(lines) if line.startswith(KNOBS))
    banner = next(i + 1 for i, line in enumerate(lines) if line.startswith(BANNER))
    main = next(i + 1 for i, line in enumerate(lines) if line.startswith('if __name__ == "__main__":'))
    rows = ["| section | lines | what it does |", "|---|---|---|"]
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.lineno < banner:
            start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            section = SECTIONS.get(node.name, "method") if node.lineno < knobs else "research knob"
            rows.append(f"| {section} | [{start}-{node.end_lineno}](../cleanrl_moe/{name}.py#L{start}) "
                        f"| `{node.name}`: {first_sentence(node)} |")
    rows.append(f"| plumbing | [{banner}-{main - 1}](../cleanrl_moe/{name}.py#L{banner}) | environment state, statistics, "
                "checks, checkpoints, flags, tracking, progress, CUDA graphs, evaluation: nothing that changes learning |")
    rows.append(f"| loop | [{main}-{len(lines) - 1}](../cleanrl_moe/{name}.py#L{main}) | set-up and resume, the "
                "training loop, evaluation, result and summary |")
    return "\n".join(rows)


def rewrite(doc, name):
    text = doc.read_text()
    if START not in text:
        raise SystemExit(f"{doc}: no '{START}' marker")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    doc.write_text(f"{head}{START}\n{table(name)}\n{END}{tail}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        for script in sorted((ROOT / "cleanrl_moe").glob("*.py")):
            rewrite(ROOT / "docs" / f"{script.stem}.md", script.stem)
    elif len(sys.argv) == 2:
        print(table(sys.argv[1]))
    else:
        sys.exit(__doc__)
