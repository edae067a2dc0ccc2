"""Copy the weights of the scripts' PyTorch networks into dopamine's official Flax modules, run both on the same
inputs, and read the official noise draws. Only layouts are translated here; every computation compared is done by
the scripts' own forward passes and by dopamine's own modules (imported in conftest.py).

Layouts (PyTorch -> Flax):
- Conv2d weight [out, in, kh, kw] -> Conv kernel [kh, kw, in, out] (NHWC convolutions);
- Linear weight [out, in] -> Dense kernel [in, out];
- a Linear after an NCHW flatten (input c*H*W + h*W + w) -> a Dense after Flax's NHWC flatten (input (h*W + w)*C + c);
- stacked experts [n, ...] -> nn.vmap's stacked params [n, ...] (same layout);
- SoftMoE phi (d, n, p) -> phi_weights (d, n, p);
- NoisyLinear mu/sigma [out, in] -> NoisyNetwork kernel_mu/kernel_sigma [in, out]; eps_in = f(p), eps_out = f(q) for
  the official draws p [in, 1] and q [1, out]."""
import contextlib
import math

import dopamine.jax.networks as base_networks
import dopamine.labs.moes.architectures.networks as moe_networks
import dopamine.labs.redo.networks as redo_networks
import dopamine.labs.redo.weight_recyclers as weight_recyclers
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

__all__ = ["base_networks", "moe_networks", "redo_networks", "weight_recyclers"]

DIFFERENCES = {}  # "configuration [measure]" -> max difference, printed at the end of the session (conftest)


def perturb_(net, seed=0, scale=0.5, floor=0.05):
    """Add Gaussian noise to every parameter of `net`, in place: std = scale x the parameter tensor's RMS, or `floor`
    where the tensor is all zeros (biases), so that no zero or constant tensor (biases, noisy sigmas) can hide a
    mis-mapped layout."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            rms = p.double().pow(2).mean().sqrt().item()
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) * (scale * rms if rms > 0 else floor))
    return net


def frames(batch, seed=0):
    """Random uint8 frame stacks [B, 4, 84, 84] (the scripts' layout)."""
    return torch.randint(0, 256, (batch, 4, 84, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def nhwc(obs):
    return np.ascontiguousarray(obs.numpy().transpose(0, 2, 3, 1))


def preprocessed(obs, dtype):
    """obs / 255 as the official `preprocess_atari_inputs` does, but in `dtype`: [B, 84, 84, 4]."""
    return nhwc(obs).astype(dtype) / dtype(255.0)


@contextlib.contextmanager
def encoder_input(net, x):
    """Feed `x` (NCHW, e.g. float64 frames / 255) to `net.encoder` in place of what `net.forward` computes from its
    uint8 input (`x.float() / 255`, float32), so that a float64 network sees float64 inputs through its own forward."""
    handle = net.encoder.register_forward_pre_hook(lambda module, args: (x,) + tuple(args[1:]))
    try:
        yield
    finally:
        handle.remove()


def project_outputs(net, obs, dtype):
    """The script's forward on `obs` (uint8 [B, 4, 84, 84]); float64: on obs / 255 computed in float64."""
    with torch.no_grad():
        if dtype == np.float64:
            with encoder_input(net, obs.double() / 255.0):
                return net(obs)
        return net(obs)


class Mapper:
    """Collects the official params {flax path: array} from the script's named parameters; each script parameter must
    be used exactly once, and the result must fill every official parameter with the same shape."""

    def __init__(self, net, dtype):
        self.params = {name: p.detach().cpu().double().numpy() for name, p in net.named_parameters()}
        self.dtype, self.used, self.out = dtype, set(), {}

    def take(self, name):
        assert name not in self.used, f"{name} mapped twice"
        self.used.add(name)
        return self.params[name]

    def put(self, path, value):
        assert path not in self.out, f"{path} filled twice"
        self.out[path] = np.asarray(value, dtype=self.dtype)

    def conv(self, path, name):
        self.put(f"{path}/kernel", self.take(f"{name}.weight").transpose(2, 3, 1, 0))
        self.put(f"{path}/bias", self.take(f"{name}.bias"))

    def dense(self, path, name, nchw=None):
        """`nchw` = (C, H, W) when the Linear reads an NCHW flatten: its inputs are permuted to the NHWC order."""
        w = self.take(f"{name}.weight")
        if nchw is not None:
            c, h, wd = nchw
            w = w.reshape(-1, c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        self.put(f"{path}/kernel", w.T)
        self.put(f"{path}/bias", self.take(f"{name}.bias"))

    def noisy(self, path, name):
        self.put(f"{path}/kernel_mu", self.take(f"{name}.weight_mu").T)
        self.put(f"{path}/kernel_sigma", self.take(f"{name}.weight_sigma").T)
        self.put(f"{path}/bias_mu", self.take(f"{name}.bias_mu"))
        self.put(f"{path}/bias_sigma", self.take(f"{name}.bias_sigma"))

    def nature(self, prefix, name="encoder"):
        for i in range(3):
            self.conv(f"{prefix}Conv_{i}", f"{name}.conv{i + 1}")

    def impala(self, prefix="encoder/"):
        for i in range(3):
            self.conv(f"{prefix}_stacks_{i}/Conv_0", f"encoder.convs.{i}")
            for j in range(2):
                self.conv(f"{prefix}_stacks_{i}/Conv_{1 + 2 * j}", f"encoder.blocks.{i}.{j}.conv0")
                self.conv(f"{prefix}_stacks_{i}/Conv_{2 + 2 * j}", f"encoder.blocks.{i}.{j}.conv1")

    def experts(self, noisy=False, moe="moe"):
        """`moe`: the script's MoE layer (moe.moe inside an extra linear layer)."""
        if noisy:
            for official, script in (("kernel_mu", "w1_mu"), ("kernel_sigma", "w1_sigma"), ("bias_mu", "b1_mu"),
                                     ("bias_sigma", "b1_sigma")):
                self.put(f"ExpertModel_0/net/{official}", self.take(f"{moe}.experts.{script}"))
        else:
            self.put("ExpertModel_0/net/kernel", self.take(f"{moe}.experts.w1"))
            self.put("ExpertModel_0/net/bias", self.take(f"{moe}.experts.b1"))
        self.put("ExpertModel_0/Dense_0/kernel", self.take(f"{moe}.experts.w2"))
        self.put("ExpertModel_0/Dense_0/bias", self.take(f"{moe}.experts.b2"))

    def big_experts(self, num_experts, encoder, encoding_shape, noisy=False):
        """Dopamine's BigExpertModel under nn.vmap (params stacked [n, ...]) from the script's BigExperts: each grouped
        conv [n * out, in, kh, kw] of its encoder -> the n experts' kernels [n, kh, kw, in, out]; the first dense layer
        reads each expert's NCHW-flattened encoding (C, H, W) = `encoding_shape`, Flax's flattens NHWC: its input rows
        are permuted; the second dense layer's outputs (slot * d + channel) have the same layout on both sides."""
        n = num_experts

        def conv(path, name):
            w = self.take(f"moe.experts.encoder.{name}.weight")
            out = w.shape[0] // n
            self.put(f"BigExpertModel_0/encoder/{path}/kernel", w.reshape(n, out, *w.shape[1:]).transpose(0, 3, 4, 2, 1))
            self.put(f"BigExpertModel_0/encoder/{path}/bias", self.take(f"moe.experts.encoder.{name}.bias").reshape(n, out))

        if encoder == "impala":
            for i in range(3):
                conv(f"_stacks_{i}/Conv_0", f"convs.{i}")
                for j in range(2):
                    conv(f"_stacks_{i}/Conv_{1 + 2 * j}", f"blocks.{i}.{j}.conv0")
                    conv(f"_stacks_{i}/Conv_{2 + 2 * j}", f"blocks.{i}.{j}.conv1")
        else:  # the Nature CNN, dopamine's RainbowCNNet
            for i in range(3):
                conv(f"Conv_{i}", f"conv{i + 1}")
        c, h, w = encoding_shape

        def nhwc_rows(kernel):  # [n, C*H*W, units] -> [n, H*W*C, units]
            return kernel.reshape(n, c, h, w, -1).transpose(0, 2, 3, 1, 4).reshape(n, c * h * w, -1)

        if noisy:
            self.put("BigExpertModel_0/net/kernel_mu", nhwc_rows(self.take("moe.experts.w1_mu")))
            self.put("BigExpertModel_0/net/kernel_sigma", nhwc_rows(self.take("moe.experts.w1_sigma")))
            self.put("BigExpertModel_0/net/bias_mu", self.take("moe.experts.b1_mu"))
            self.put("BigExpertModel_0/net/bias_sigma", self.take("moe.experts.b1_sigma"))
        else:
            self.put("BigExpertModel_0/net/kernel", nhwc_rows(self.take("moe.experts.w1")))
            self.put("BigExpertModel_0/net/bias", self.take("moe.experts.b1"))
        self.put("BigExpertModel_0/Dense_0/kernel", self.take("moe.experts.w2"))
        self.put("BigExpertModel_0/Dense_0/bias", self.take("moe.experts.b2"))

    def finish(self, shapes, extra=None):
        """The official params tree; `shapes` = jax.eval_shape of the module's init, `extra` = {path: value} for
        official parameters that the script does not have (e.g. SoftMoE's unused `scalar`)."""
        assert self.used == set(self.params), f"script parameters not mapped: {sorted(set(self.params) - self.used)}"
        for path, value in (extra or {}).items():
            self.put(path, value)
        official = flax.traverse_util.flatten_dict(shapes["params"], sep="/")
        assert set(self.out) == set(official), (sorted(set(official) - set(self.out)), sorted(set(self.out) - set(official)))
        for path, leaf in official.items():
            assert self.out[path].shape == leaf.shape, (path, self.out[path].shape, leaf.shape)
        return {"params": flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in self.out.items()}, sep="/")}


def num_official_params(shapes):
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))


def num_params(net):
    return sum(p.numel() for p in net.parameters())


@contextlib.contextmanager
def x64(enabled):
    """JAX's 64-bit mode on or off, globally (jax.enable_x64 is thread-local and would not reach the thread that runs
    jax.debug.callback, which would then hand over float64 draws rounded to float32)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", bool(enabled))
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def record(name, value):
    DIFFERENCES[name] = max(DIFFERENCES.get(name, 0.0), float(value))


def assert_close(name, ours, official, dtype):
    """float64: max |difference| <= 1e-12; float32: max |difference| <= 1e-5 x max |official|."""
    ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
    assert ours.shape == official.shape, (ours.shape, official.shape)
    assert np.ptp(official) > 1e-3 * np.abs(official).max() > 0, f"{name}: degenerate outputs, the comparison is weak"
    diff = np.abs(ours - official).max()
    if dtype == np.float64:
        record(f"{name} [float64, max abs]", diff)
        assert diff <= 1e-12, f"{name}: max |difference| {diff:.3g} > 1e-12"
    else:
        rel = diff / np.abs(official).max()
        record(f"{name} [float32, max abs / max |official|]", rel)
        assert rel <= 1e-5, f"{name}: max |difference| / max |official| = {rel:.3g} > 1e-5"


@contextlib.contextmanager
def official_noise_draws():
    """Record what dopamine's NoisyNetwork draws, as {module path: [p, q]}, each a pair (draw, f(draw)): the standard
    normals p of shape [in, 1] and q of shape [1, out], and dopamine's f(x) = sign(x) sqrt(|x|) of them, from which it
    builds its factorized noise f(p) f(q) (so f(p) is eps_in and f(q) eps_out). f is applied by dopamine's own
    NoisyNetwork.f inside the traced call; the values are read back with jax.debug.callback, so this works under jit
    and vmap (a draw that does not depend on the batch is made once)."""
    draws, current = {}, []
    original = base_networks.NoisyNetwork.sample_noise

    def sample_noise(key, shape):
        value = original(key, shape)
        if current:  # inside a NoisyNetwork's __call__, not at init
            slots = draws.setdefault(current[-1], [])
            slots.append(None)
            index = len(slots) - 1
            jax.debug.callback(lambda v, f: slots.__setitem__(index, (np.array(v), np.array(f))), value,
                               base_networks.NoisyNetwork.f(value))
        return value

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, base_networks.NoisyNetwork) and context.method_name == "__call__":
            current.append("/".join(context.module.path))
            try:
                return next_fun(*args, **kwargs)
            finally:
                current.pop()
        return next_fun(*args, **kwargs)

    base_networks.NoisyNetwork.sample_noise = staticmethod(sample_noise)
    try:
        with nn.intercept_methods(interceptor):
            yield draws
        jax.effects_barrier()
    finally:
        base_networks.NoisyNetwork.sample_noise = staticmethod(original)
    for path, slots in draws.items():
        assert all(d is not None for d in slots), f"{path}: a draw was not read back"


def eps(draw):
    """f(draw) of a recorded draw, flattened, as a torch tensor (of the draw's dtype)."""
    return torch.from_numpy(draw[1].reshape(-1))
