"""Suites: a TOML file of games x seeds x variants (a script and its flags) becomes runs, each a command line and a
directory; every variant's flags are checked by its script's own parser before anything starts."""
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from .common import BENCHMARK, SCRIPTS, Run, fail

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SUITES = BENCHMARK / "suites"
# host memory of one run besides its replay memory: 0.5 GiB peak RSS measured for dqn_softmoe on a CPU
# (`benchmark.sh perf`), plus room for the CUDA libraries on a GPU machine
RUN_OVERHEAD_BYTES = 2 * 2**30


def load_suite(name):
    """A suite by name (benchmark/suites/<name>.toml) or by path (a copy a user edited)."""
    path = Path(name) if name.endswith(".toml") else SUITES / f"{name}.toml"
    if not path.is_file():
        fail(f"no suite {name!r}; the suites are: {', '.join(sorted(p.stem for p in SUITES.glob('*.toml')))}")
    with open(path, "rb") as f:
        suite = tomllib.load(f)
    suite.setdefault("name", path.stem)
    suite.setdefault("references", suite["name"])
    suite.setdefault("flags", "")
    suite.setdefault("checkpoint_every", 0)
    for key, kind in (("games", str), ("seeds", int), ("variants", dict)):
        if not suite.get(key) or not all(isinstance(x, kind) for x in suite[key]):
            fail(f"suite {path}: `{key}` must be a non-empty list of {kind.__name__}")
    for variant in suite["variants"]:
        if set(variant) - {"name", "script", "flags"} or not {"name", "script"} <= set(variant):
            fail(f"suite {path}: a variant has keys name, script and flags, got {variant}")
    names = [v["name"] for v in suite["variants"]]
    if len(set(names)) < len(names):
        fail(f"suite {path}: variant names repeat: {names}")
    return suite


def list_suites():
    for path in sorted(SUITES.glob("*.toml")):
        suite = load_suite(str(path))
        scripts = sorted({v["script"] for v in suite["variants"]})
        missing = [s for s in scripts if not (SCRIPTS / f"{s}.py").is_file()]
        count = len(suite["variants"]) * len(suite["games"]) * len(suite["seeds"])
        print(f"{suite['name']:<18} {count:>4} runs  {suite.get('description', '')}" +
              (f"  [not yet present: {', '.join(missing)}]" if missing else ""))
    return 0


def plan(suite, out, variants=None, games=None, seeds=None, extra_flags="", results=None):
    """Every run of the suite, optionally restricted to some variants, games and seeds. Flags in order: the suite's,
    the variant's, --checkpoint-every, the command line's extra flags, then --env-id and --seed (later flags win).
    With `results` (docs/results), each run's committed copy is <results>/<suite>_<variant>/<game>/seed<N>."""
    known = {"variants": [v["name"] for v in suite["variants"]], "games": suite["games"], "seeds": suite["seeds"]}
    for key, chosen in (("variants", variants), ("games", games), ("seeds", seeds)):
        unknown = [x for x in chosen or [] if x not in known[key]]
        if unknown:
            fail(f"--{key} {' '.join(map(str, unknown))}: not in suite {suite['name']} ({' '.join(map(str, known[key]))})")
    checkpoint = ["--checkpoint-every", str(suite["checkpoint_every"])] if suite["checkpoint_every"] else []
    runs = []
    for variant in suite["variants"]:
        if variants and variant["name"] not in variants:
            continue
        for game in suite["games"]:
            if games and game not in games:
                continue
            for seed in suite["seeds"]:
                if seeds and seed not in seeds:
                    continue
                flags = [*shlex.split(suite["flags"]), *shlex.split(variant.get("flags", "")), *checkpoint,
                         *shlex.split(extra_flags), "--env-id", f"ALE/{game}-v5", "--seed", str(seed)]
                committed = Path(results) / f"{suite['name']}_{variant['name']}" / game / f"seed{seed}" if results else ""
                runs.append(Run(variant["name"], variant["script"], game, seed, tuple(flags),
                                str(Path(out) / variant["name"] / game / f"seed{seed}"), str(committed)))
    return runs


def load_script(name):
    """Import cleanrl_moe/<name>.py without running it (the scripts have no import side effects)."""
    import importlib.util

    path = SCRIPTS / f"{name}.py"
    if not path.is_file():
        fail(f"{path} does not exist (yet); leave its variants out with --variants")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # tyro reads the flags' docstrings through the module
    spec.loader.exec_module(module)
    return module


def replay_bytes(module, args):
    """Bytes of the replay memory a script allocates: --buffer-size slots of its own replay class, the prioritized one
    (whose sum tree's share of a slot depends on the capacity) when the script has one."""
    if hasattr(module, "PrioritizedReplayMemory"):
        return args.buffer_size * module.PrioritizedReplayMemory.bytes_per_slot(capacity=args.buffer_size)
    if hasattr(module, "ReplayMemory"):
        return args.buffer_size * module.ReplayMemory.bytes_per_slot()
    fail(f"{module.__file__}: no class ReplayMemory (or PrioritizedReplayMemory) with a static bytes_per_slot(), "
         "which benchmark.sh asks for the bytes of a replay slot to size the runs; add one")


def resolve(runs):
    """Check every variant's flags with its script's own parser and start-up checks before anything starts, and fill
    in each run's step count and host memory estimate (its replay memory plus RUN_OVERHEAD_BYTES). Returns the runs
    and {variant: parsed Args}."""
    import ale_py
    import gymnasium as gym

    gym.register_envs(ale_py)  # the games are checked whether or not a script imports ale_py
    modules, parsed, resolved = {}, {}, []
    for run in runs:
        if run.variant not in parsed:
            module = modules.get(run.script) or modules.setdefault(run.script, load_script(run.script))
            import tyro

            try:
                args = tyro.cli(module.Args, args=list(run.flags))
                if hasattr(module, "check_args"):
                    module.check_args(args)
            except SystemExit:
                fail(f"variant {run.variant}: {run.script}.py rejects its flags {shlex.join(run.flags)} (above)")
            parsed[run.variant] = (args, replay_bytes(module, args))
        args, memory = parsed[run.variant]
        try:
            gym.spec(f"ALE/{run.game}-v5")
        except gym.error.Error:
            fail(f"game {run.game}: ALE/{run.game}-v5 is not an environment of ale-py")
        resolved.append(Run(**{**asdict(run), "flags": run.flags, "total_steps": args.total_timesteps,
                               "memory_bytes": memory + RUN_OVERHEAD_BYTES}))
    return resolved, {variant: args for variant, (args, _) in parsed.items()}
