"""The suite runs on 2 pytest-xdist workers (pyproject's addopts) and its end-to-end runs use one thread each: torch in a
worker uses one thread too, so that two workers never compete for the cores with spinning OpenMP threads.

The CPU kernels are held to AVX2, here and in every process the tests start, so that the bit-exact fingerprints of
tests/fixtures/equivalence.json (recorded on an AVX2 machine) hold on an AVX-512 one too: PyTorch, MKL and oneDNN
pick other kernels there, whose float32 sums round differently."""
import os

# read when torch first dispatches a CPU kernel (ATen), and when MKL and oneDNN start: before `import torch`
os.environ.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")

import torch  # noqa: E402

torch.set_num_threads(1)
