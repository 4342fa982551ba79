"""A faster CPU kernel choice for the small matrix products of decoding, installed per ``nn.Linear``.

``F.linear(x, W)`` computes ``x @ W.T``; for a few rows of ``x`` (decode steps: rows x tokens per row is small)
MKL's kernel for that layout re-packs the weight on every call, so a forward over 2-9 tokens costs far more than
one token although both are bound by reading the weights once. Computing ``(W @ x.T).T`` instead streams the
weight once, provided the activation is row-major (a transposed-view activation, as the previous such product
returns, is copied first: a column-major right operand is 3-5x slower); a single row is computed as two (the
matrix-vector kernel is slower than the 2-column product). The results are the same matrix product (summation
order may differ in the last bits, well inside the 1e-4 fp32 logprob contract). Measurements:
``docs/decisions/cpu_kernels.md``.

Installed only for float32 CPU models, and only used under ``torch.no_grad``/``inference_mode`` with at most
``MAX_ROWS`` rows: training forwards (grad enabled), prefills and wider decode steps keep ``F.linear``.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# rows (= columns of W @ x.T) up to which (W @ x.T).T beats F.linear; above it F.linear's packed kernel wins or ties
# (2026-12-01, 1 thread, SmolLM2-135M weight chain: docs/decisions/cpu_kernels.md)
MAX_ROWS = 6
_MARK = "_atlas_cpu_linear"


def small_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None,  # [out_features] or None
) -> torch.Tensor:  # [..., out_features]
    """``F.linear(x, weight, bias)``, as ``(W @ x.T).T`` for few rows of a float32 CPU input without autograd."""
    if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu":
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= MAX_ROWS:
            # the activation must be row-major ([rows, in] contiguous, so that x.T is column-major): MKL's kernel for a
            # row-major right operand of 2-8 columns is 3-5x slower (docs/decisions/cpu_kernels.md)
            x2 = x.reshape(rows, x.shape[-1]).contiguous()  # [rows, in_features]
            if rows == 1:  # MKL's matrix-vector kernel is ~1.4x slower than its 2-column product: pad to 2
                out = torch.mm(weight, x2.expand(2, -1).contiguous().t())[:, :1].t()  # [1, out_features]
            else:
                out = torch.mm(weight, x2.t()).t()  # [rows, out_features]
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _small_batch_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
    return small_linear(x, self.weight, self.bias)


def install_cpu_linear(model: nn.Module) -> Callable[[], None]:
    """Route the ``nn.Linear`` layers of a float32 CPU model through the small-batch kernel; returns an
    ``uninstall`` function. A no-op (returning a no-op) for other devices and dtypes."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return lambda: None
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return lambda: None
    patched = []
    for mod in model.modules():
        if type(mod) is nn.Linear and not getattr(mod, _MARK, False):
            mod.forward = types.MethodType(_small_batch_forward, mod)
            setattr(mod, _MARK, True)
            patched.append(mod)

    def uninstall() -> None:
        for mod in patched:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop(_MARK, None)

    return uninstall
