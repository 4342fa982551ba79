"""A faster CPU kernel choice for the small matrix products of decoding, installed per ``nn.Linear``.

``F.linear(x, W)`` computes ``x @ W.T``; for a few rows of ``x`` (decode steps: rows x tokens per row is small)
MKL's kernel for that layout re-packs the weight on every call, so a forward over 2-9 tokens costs far more than
one token although both are bound by reading the weights once. Computing ``(W @ x.T).T`` instead streams the
weight once, provided the activation is row-major (a transposed-view activation, as the previous such product
returns, is copied first: a column-major right operand is 3-5x slower); a single row is computed as two (the
matrix-vector kernel is slower than the 2-column product). The results are the same matrix product (summation
order may differ in the last bits, well inside the 1e-4 fp32 logprob contract). Measurements:
``docs/decisions/cpu_kernels.md``.

From ``MAX_ROWS + 1`` to ``ONEDNN_MAX_ROWS`` rows, oneDNN's linear over a weight converted once
(``weight.to_mkldnn()``, cached on the weight and rebuilt when its ``_version`` changes, i.e. after any in-place
update) streams the weights 1.3-1.7x faster than MKL's ``F.linear`` (section 4 of the decision record); the copies
cost the model's linear weights once more in memory and are dropped by :func:`drop_packed_weights`, which
``RolloutEngine.update_weights`` calls on every policy update (an update through ``param.data``, as some trainers
do, leaves ``_version`` unchanged).

Installed only for float32 CPU models, and only used under ``torch.no_grad``/``inference_mode`` with at most
``ONEDNN_MAX_ROWS`` rows: training forwards (grad enabled) and prefills keep ``F.linear``.
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
# rows up to which oneDNN over a pre-converted weight is used above MAX_ROWS (measured to 32: 1.7x F.linear)
ONEDNN_MAX_ROWS = 64
_MARK = "_atlas_cpu_linear"
_PACKED = "_atlas_onednn_weight"
_ONEDNN = torch.backends.mkldnn.is_available()


def _onednn_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` as a oneDNN tensor, converted once per version of ``weight``; None when it cannot be."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor tracks no version: never cache a copy of it
        return None
    cached = getattr(weight, _PACKED, None)
    if cached is None or cached[0] != version:
        cached = (version, weight.detach().to_mkldnn())
        setattr(weight, _PACKED, cached)
    return cached[1]


def drop_packed_weights(model: nn.Module) -> None:
    """Free the oneDNN weight copies cached on ``model``'s parameters."""
    for p in model.parameters():
        if hasattr(p, _PACKED):
            delattr(p, _PACKED)


def _onednn_linear(x2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:  # x2: [rows, in] -> [rows, out]
    packed = _onednn_weight(weight) if _ONEDNN else None
    if packed is None:
        return None
    return torch._C._nn.mkldnn_linear(x2.to_mkldnn(), packed, None).to_dense()


def small_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None,  # [out_features] or None
) -> torch.Tensor:  # [..., out_features]
    """``F.linear(x, weight, bias)``, as ``(W @ x.T).T`` for few rows of a float32 CPU input without autograd."""
    if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu":
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        out = _few_rows_product(x, weight, rows) if 0 < rows <= ONEDNN_MAX_ROWS else None
        if out is not None:
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _few_rows_product(
    x: torch.Tensor,  # [..., in_features], rows = x.numel() // in_features
    weight: torch.Tensor,  # [out_features, in_features]
    rows: int,
) -> torch.Tensor | None:  # [rows, out_features]; None: use F.linear
    # the activation must be row-major ([rows, in] contiguous, so that x.T is column-major): MKL's kernel for a
    # row-major right operand of 2-8 columns is 3-5x slower (docs/decisions/cpu_kernels.md)
    x2 = x.reshape(rows, x.shape[-1]).contiguous()  # [rows, in_features]
    if rows > MAX_ROWS:
        return _onednn_linear(x2, weight)
    if rows == 1:  # MKL's matrix-vector kernel is ~1.4x slower than its 2-column product: pad to 2
        return torch.mm(weight, x2.expand(2, -1).contiguous().t())[:, :1].t()  # [1, out_features]
    return torch.mm(weight, x2.t()).t()  # [rows, out_features]


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
