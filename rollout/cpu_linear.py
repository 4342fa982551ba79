"""The CPU kernel choice for the small matrix products of decoding, installed per ``nn.Linear``.

A decode or verification forward multiplies a few activation rows (rows x tokens per row) by every weight: it is
bound by reading the weights once, and which BLAS call gets there depends on the machine and the number of rows
(``F.linear``, ``(W @ x.T).T``, one row computed as two, oneDNN over a weight converted once). The engine measures
them on the model's own weights once per machine (:mod:`.kernel_tune`: a :class:`~.kernel_tune.KernelPlan`, cached)
and :func:`small_linear` follows the active plan. The activation is made row-major first (a transposed-view
activation, as ``(W @ x.T).T`` returns, is 3-5x slower as MKL's right operand). Measurements:
``docs/decisions/cpu_kernels.md``.

oneDNN's weight copies (reordered into its blocked layout) are cached on the weight and rebuilt when its
``_version`` changes (any in-place update); they cost the model's linear weights once more in memory and are made
only where the plan uses oneDNN; :func:`drop_packed_weights` frees them (``RolloutEngine.update_weights`` calls it
on every policy update: an update through ``param.data``, as some trainers do, leaves ``_version`` unchanged).

Installed only for float32 CPU models, and only used under ``torch.no_grad``/``inference_mode`` with at most
:data:`~.kernel_tune.MAX_PLAN_ROWS` rows: training forwards (grad enabled) and prefills keep ``F.linear``.

Draft heads may take ``low_precision=True`` (:func:`draft_linear`): their matmuls in bfloat16 through oneDNN over a
bfloat16 copy of the weight where the CPU has native bfloat16 (AMX / AVX512-BF16), about twice as fast at 1-4 rows;
elsewhere, up to :data:`BF16_WEIGHT_MAX_ROWS` rows, float32 arithmetic over a bfloat16 copy of the weight widened in
registers (``linear_bf16w`` of the decode glue: half the bytes to stream, 0.3-0.7x ``F.linear``'s time on the AMD
host; ``docs/results/verification_cost.md`` section 13). Never for the target: its logprobs are the policy's own,
in the policy's precision. A draft head's distribution is whatever it computes; the verifier is handed exactly
that, so the output stays lossless.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_glue import glue_kernels
from .kernel_tune import (
    MAX_PLAN_ROWS,
    KernelPlan,
    drop_onednn_copies,
    linear_weights,
    load_or_tune,
    onednn_weight,
    run_kernel,
)

_MARK = "_atlas_cpu_linear"
_BF16_COPY = "_atlas_bf16_weight"  # (weight._version, bfloat16 copy) for linear_bf16w
BF16_WEIGHT_MAX_ROWS = 16  # linear_bf16w beat F.linear at 1-16 rows on every draft-head shape (AMD host, cold caches)
_bf16 = {"ok": None}
_active = {"plan": KernelPlan.reference()}  # the process's plan: one machine, one best kernel per row count


def kernel_plan() -> KernelPlan:
    """The plan :func:`small_linear` follows (``F.linear`` everywhere until an engine installs a tuned one)."""
    return _active["plan"]


def set_kernel_plan(plan: KernelPlan) -> None:
    """Make ``plan`` the one :func:`small_linear` follows."""
    if not isinstance(plan, KernelPlan):
        raise TypeError(f"set_kernel_plan takes a KernelPlan, got {type(plan).__name__}")
    _active["plan"] = plan


def drop_packed_weights(model: nn.Module) -> None:
    """Free the oneDNN and bfloat16 weight copies cached on ``model``'s parameters."""
    params = list(model.parameters())
    drop_onednn_copies(params)
    for p in params:
        p.__dict__.pop(_BF16_COPY, None)


def bf16_weight(weight: torch.Tensor) -> torch.Tensor | None:  # [out, in] -> contiguous bfloat16 copy, or None
    """A bfloat16 copy of ``weight``, made once per version of it (None for an inference tensor: no version)."""
    try:
        version = weight._version
    except RuntimeError:
        return None
    cached = weight.__dict__.get(_BF16_COPY)
    if cached is None or cached[0] != version:
        cached = (version, weight.detach().to(torch.bfloat16).contiguous())
        weight.__dict__[_BF16_COPY] = cached
    return cached[1]


def prepack_weights(weights: Sequence[torch.Tensor]) -> None:
    """Make now the oneDNN copies of the ``weights`` (``[out, in]`` each) that the active plan runs through oneDNN
    at some row count, instead of inside the first forward that needs them: a reorder of the LM head alone costs
    about a forward, and in the first forward it would distort the verification cost calibration."""
    plan = kernel_plan()
    for w in weights:
        if w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        if any(plan.kernel(r, w.shape) == "onednn" for r in range(1, MAX_PLAN_ROWS + 1)):
            onednn_weight(w)


def prepack_draft_weights(model: nn.Module) -> None:
    """Make now the bfloat16 copies a draft head's matmuls use (:func:`draft_linear`: oneDNN's blocked ones where the
    CPU has native bfloat16, plain ones for ``linear_bf16w`` elsewhere), instead of inside its
    first ``propose``: there they took 40-150 ms (12 ms is a whole 4-token draft at one row), charged to the head's
    drafting cost, so the controller priced a fresh head 3-13x too dear and a test of its drafting share failed."""
    native = bf16_matmul_available()
    for w in linear_weights(model):
        if w.device.type == "cpu" and w.dtype == torch.float32:
            if native:
                onednn_weight(w, torch.bfloat16)
            else:
                bf16_weight(w)


def small_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None,  # [out_features] or None
    kernel: str | None = None,
) -> torch.Tensor:  # [..., out_features]
    """``F.linear(x, weight, bias)`` by the active plan's kernel (or ``kernel``) for few rows of a float32 CPU
    input without autograd; ``F.linear`` otherwise."""
    if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.device.type == "cpu":
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        name = kernel or kernel_plan().kernel(rows, weight.shape)
        if 0 < rows <= MAX_PLAN_ROWS and name != "linear":
            # row-major activation: MKL's kernel for a column-major right operand is 3-5x slower
            out = run_kernel(name, x.reshape(rows, x.shape[-1]).contiguous(), weight)  # [rows, out_features]
            if out is not None:
                if bias is not None:
                    out = out + bias
                return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _small_batch_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
    return small_linear(x, self.weight, self.bias)


def bf16_matmul_available() -> bool:
    """oneDNN with native bfloat16 on this CPU (else a bfloat16 matmul is emulated, slower than float32)."""
    if _bf16["ok"] is None:
        try:
            _bf16["ok"] = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (RuntimeError, AttributeError):
            _bf16["ok"] = False
    return bool(_bf16["ok"])


def draft_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features]
    bias: torch.Tensor | None,  # [out_features] or None
) -> torch.Tensor:  # [..., out_features] float32
    """A draft head's matmul in bfloat16 (float32 result, oneDNN kernel ``onednn_bf16``) where
    :func:`bf16_matmul_available`; else, for up to :data:`BF16_WEIGHT_MAX_ROWS` rows, float32 arithmetic over a
    bfloat16 copy of the weight (the glue's ``linear_bf16w``); :func:`small_linear` by the plan otherwise (autograd,
    more rows, no compiled glue)."""
    if bf16_matmul_available():
        return small_linear(x, weight, bias, "onednn_bf16")
    out = _bf16_weight_linear(x, weight)
    if out is None:
        return small_linear(x, weight, bias)
    return out if bias is None else out + bias


def _bf16_weight_linear(
    x: torch.Tensor,  # [..., in_features]
    weight: torch.Tensor,  # [out_features, in_features]
) -> torch.Tensor | None:  # [..., out_features] float32; None: not for this call
    if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    glue = glue_kernels() if 0 < rows <= BF16_WEIGHT_MAX_ROWS else None
    wb = bf16_weight(weight) if glue is not None else None
    if wb is None:
        return None
    return glue.linear_bf16w(x.reshape(rows, x.shape[-1]), wb).reshape(*x.shape[:-1], weight.shape[0])


def _draft_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:  # x: [..., in_features]
    return draft_linear(x, self.weight, self.bias)


def install_cpu_linear(
    model: nn.Module,
    tune: bool = True,
    low_precision: bool = False,
    weights: Sequence[torch.Tensor] | None = None,
) -> Callable[[], None]:
    """Route the ``nn.Linear`` layers of a float32 CPU model through the small-batch kernel, with this machine's
    kernel plan (:func:`~.kernel_tune.load_or_tune` over ``weights``, by default the model's linear weights, whose
    oneDNN copies it makes at once: :func:`prepack_weights`; ``tune=False`` keeps the active plan); returns an
    ``uninstall`` function. A no-op (returning a no-op) for other
    devices and dtypes. ``low_precision``: draft heads only, :func:`draft_linear`."""
    try:
        p = next(model.parameters())
    except StopIteration:
        return lambda: None
    if p.device.type != "cpu" or p.dtype != torch.float32:
        return lambda: None
    if tune:
        set_kernel_plan(load_or_tune(model, weights=weights))
        if kernel_plan().uses("onednn"):  # made now, not inside the first forward that needs them
            prepack_weights(linear_weights(model) if weights is None else weights)
        else:
            drop_onednn_copies(linear_weights(model))
    if low_precision:  # a draft head's bfloat16 copies, made now (see below)
        prepack_draft_weights(model)
    patched = []
    for mod in model.modules():
        if type(mod) is nn.Linear and not getattr(mod, _MARK, False):
            mod.forward = types.MethodType(_draft_forward if low_precision else _small_batch_forward, mod)
            setattr(mod, _MARK, True)
            patched.append(mod)

    def uninstall() -> None:
        for mod in patched:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop(_MARK, None)

    return uninstall
