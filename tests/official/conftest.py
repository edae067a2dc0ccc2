"""Comparisons with the official Flax modules of google/dopamine (`labs/moes`, `labs/redo`), which need the `official`
extra and dopamine-rl installed without its dependencies (see README, Tests):

    pip install ".[test,official]" && pip install --no-deps dopamine-rl==4.1.2

Without them this whole directory is skipped with one line saying what is missing.

dopamine's modules import packages that the networks never use: `dopamine/jax/networks.py` imports
tensorflow_probability (for a PPO head) and `dopamine/discrete_domains/atari_lib.py` imports tensorflow, gym and
baselines (for its TF networks and environment wrappers). Only for the duration of those imports, stand-ins take
their place in sys.modules; they are removed again afterwards, so that nothing else in the test session (e.g.
tensorboard, which looks for tensorflow) sees them. Every module whose math is compared is dopamine's own: the
Flax networks (labs/moes/architectures, labs/redo/networks.py, the encoders and NoisyNetwork of
dopamine/jax/networks.py) and labs/redo/weight_recyclers.py."""
import contextlib
import importlib
import importlib.util
import os
import pathlib
import sys
import types

import pytest

DOPAMINE_VERSION = "4.1.2"  # the newest release on PyPI (4.1.0 is the first to ship both labs/moes and labs/redo)


def _missing():
    for name in ("jax", "flax", "optax", "chex", "gin", "absl"):
        try:
            importlib.import_module(name)
        except ImportError:
            return f'{name} is not installed: pip install ".[official]"'
    if importlib.util.find_spec("dopamine") is None or importlib.util.find_spec("dopamine.labs.moes") is None:
        return f"dopamine is not installed: pip install --no-deps dopamine-rl=={DOPAMINE_VERSION}"
    return None


_reason = _missing()
if _reason is not None:
    # One skipped module stands for the whole directory (a module-level skip here would be an error when this
    # directory is named on the command line, which makes this an initial conftest).
    _modules = sorted(p.name for p in pathlib.Path(__file__).parent.glob("test_*.py"))
    collect_ignore = _modules[1:]

    class _Unavailable(pytest.Module):
        def collect(self):
            pytest.skip(f"official Flax comparisons (all of tests/official): {_reason}")

    def pytest_pycollect_makemodule(module_path, parent):
        return _Unavailable.from_parent(parent, path=module_path)


class _AnyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls


class _Any(metaclass=_AnyMeta):
    """Whatever attribute of it is read, called or subclassed (e.g. `tf.keras.Model`, `tf.uint8`)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any


class _StandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any


# imported by dopamine/jax/networks.py and dopamine/discrete_domains/atari_lib.py, never used by the networks compared
STAND_INS = ("tensorflow", "tensorflow_probability", "tensorflow_probability.substrates",
             "tensorflow_probability.substrates.jax", "gym", "baselines", "baselines.common",
             "baselines.common.atari_wrappers")


@contextlib.contextmanager
def _stand_ins():
    saved = {name: sys.modules.get(name) for name in STAND_INS}
    for name in STAND_INS:
        sys.modules[name] = _StandIn(name)
    for name in STAND_INS:
        if "." in name:
            parent, child = name.rsplit(".", 1)
            setattr(sys.modules[parent], child, sys.modules[name])
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


if _reason is None:
    # XLA's CPU backend at its lowest optimization level halves the compile time of the official modules, which is most
    # of this suite's time (each configuration compiles once per dtype); the numbers compared are unaffected. Set only
    # for the initialization of JAX's backend here, not for the subprocesses of the other tests.
    _xla_flags = os.environ.get("XLA_FLAGS")
    if "xla_backend_optimization_level" not in (_xla_flags or ""):
        os.environ["XLA_FLAGS"] = f"{_xla_flags or ''} --xla_backend_optimization_level=0".strip()

    # the real packages first, so that none of them can pick up a stand-in
    import absl.logging  # noqa: E402
    import chex  # noqa: E402,F401
    import cv2  # noqa: E402,F401
    import flax.linen  # noqa: E402,F401
    import gin  # noqa: E402,F401
    import gymnasium  # noqa: E402,F401
    import jax  # noqa: E402
    import optax  # noqa: E402,F401

    with _stand_ins():
        import dopamine.discrete_domains.atari_lib  # noqa: E402,F401
        import dopamine.jax.networks  # noqa: E402,F401
        import dopamine.labs.moes.architectures.networks  # noqa: E402,F401
        import dopamine.labs.redo.networks  # noqa: E402,F401
        import dopamine.labs.redo.weight_recyclers  # noqa: E402,F401

    absl.logging.set_verbosity(absl.logging.WARNING)  # the official modules log every hyperparameter at INFO
    jax.devices()  # initializes the backend with the flags above
    if _xla_flags is None:
        os.environ.pop("XLA_FLAGS")
    else:
        os.environ["XLA_FLAGS"] = _xla_flags


def pytest_terminal_summary(terminalreporter):
    from importlib.metadata import version

    official_mapping = sys.modules.get("official_mapping")
    if official_mapping is not None and official_mapping.DIFFERENCES:
        terminalreporter.section("largest differences from the official Flax modules")
        terminalreporter.write_line(f"dopamine-rl {version('dopamine-rl')}, jax {jax.__version__}, flax {version('flax')}")
        for name, value in sorted(official_mapping.DIFFERENCES.items()):
            terminalreporter.write_line(f"{value:10.3g}  {name}")
