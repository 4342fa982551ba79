"""Which SDPA kernels decoding may use on a GPU.

On CUDA, PyTorch may dispatch ``scaled_dot_product_attention`` to cuDNN, which builds an execution plan for every
new input shape. Decoding changes the key length at every step, so each step of a first rollout meets a new shape;
on an H200 (torch 2.11) the first greedy call ran 55-110 ms a step where its repeat ran 15-30 ms, and HF
``generate`` showed the same (``docs/results/gpu_costs.md``). The decode and draft forwards therefore leave cuDNN
out there (flash, memory-efficient and math kernels build nothing per shape); a CPU is untouched.
See ``docs/decisions/cuda_attention_backends.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

DECODE_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@contextlib.contextmanager
def decode_attention(device: torch.device) -> Iterator[None]:
    """Within the block, SDPA on ``device`` uses :data:`DECODE_BACKENDS` (CUDA only; elsewhere a no-op)."""
    if device.type != "cuda":
        yield
        return
    with sdpa_kernel(list(DECODE_BACKENDS)):  # read at call time (the GPU bench's first-call section swaps it)
        yield
