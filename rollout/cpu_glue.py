"""The small per-layer ops of a CPU decode step (RMSNorm, residual add + RMSNorm, RoPE + KV write + SDPA, SiLU x up)
in C++.

Why: after a matmul has streamed megabytes of weights through the caches, every PyTorch op starts cold; on the
Xeon host an RMSNorm made of seven ATen ops costs ~70 us there against ~16 us for one plain loop, and a lean forward
of SmolLM2-135M spent ~16 ms per step (a third of the weight stream at one row) outside its matmuls
(``docs/results/verification_cost.md``, section 7). The loops (``csrc/decode_glue.cpp``) are compiled once per
machine with the system compiler through :func:`torch.utils.cpp_extension.load` (~30 s, cached under
``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``; the module name carries a hash of the source
and of the PyTorch version, the flags and the CPU; built with ``-march=native`` first, portable flags if that fails;
``-fno-trapping-math`` lets GCC vectorise the loops over ``exp_approx`` (softmax, SiLU): with trapping math it keeps
them scalar, and the attention of 16 rows x 3 tokens cost 26.5 instead of 14.5 ms per forward on the AMD host —
it changes no value, only lets the compiler assume that no floating-point trap is being watched for).
Without a working compiler the forward keeps its PyTorch ops (a warning, once).

float32 CPU tensors only; the loops make their inputs contiguous (no extra op from Python on the hot path).
Same math as the PyTorch ops, summation order aside
(the RMSNorm sum is accumulated in double): the forward stays within the 1e-4 float32 contract of
``tests/unit/test_forward.py``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from types import ModuleType

import torch

from .kernel_tune import cpu_identity
from .kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_glue.cpp"
FLAG_SETS = (("-O3", "-march=native", "-fno-trapping-math"), ("-O3", "-fno-trapping-math"))
ROW_ATTENTION_MAX_Q = 16  # steps of up to this many tokens per row attend row by row (attend_rows), longer by SDPA
ROW_ATTENTION_HEAD_DIMS = (64, 128)  # the head sizes attend_rows is compiled for (csrc/decode_glue.cpp)
_state: dict[str, ModuleType | None | bool] = {"tried": False, "module": None}


def glue_kernels() -> ModuleType | None:
    """The compiled module (built on first call, then cached on disk), or None when it cannot be built."""
    if not _state["tried"]:
        _state["tried"] = True
        _state["module"] = _build()
    module = _state["module"]
    return module if isinstance(module, ModuleType) else None


def _build() -> ModuleType | None:
    try:
        source = SOURCE.read_bytes()
    except OSError as exc:
        logger.warning("decode glue source missing (%s): the lean forward uses PyTorch ops", exc)
        return None
    errors = []
    for flags in FLAG_SETS:  # this CPU's vector instructions first (the build is per machine), then portable
        key = source + torch.__version__.encode() + " ".join(flags).encode() + cpu_identity().encode()
        name = f"atlas_rl_decode_glue_{hashlib.sha256(key).hexdigest()[:12]}"
        t0 = time.perf_counter()
        logger.info("loading the CPU decode glue kernels %s (compiled once per machine, ~30 s the first time)", name)
        try:
            from torch.utils.cpp_extension import load

            module = load(name=name, sources=[str(SOURCE)], extra_cflags=list(flags), verbose=False)
        except Exception as exc:  # no compiler or headers, a failed build: the PyTorch ops compute the same thing
            errors.append(f"{' '.join(flags)}: {exc}")
            continue
        logger.info("CPU decode glue kernels ready in %.1f s", time.perf_counter() - t0)
        return module
    logger.warning("CPU decode glue kernels unavailable (%s): the lean forward uses PyTorch ops", "; ".join(errors))
    return None


def rms_norm(glue: ModuleType, x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:  # x: [..., d] float32
    return glue.rms_norm(x, norm._parameters["weight"], norm.variance_epsilon)  # the dict: no Module.__getattr__


def add_rms_norm(
    glue: ModuleType,
    h: torch.Tensor,  # [c, d] the residual stream
    y: torch.Tensor,  # [c, d] what a block adds to it
    norm: torch.nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:  # (h + y, RMSNorm(h + y)), each [c, d]
    return glue.add_rms_norm(h, y, norm._parameters["weight"], norm.variance_epsilon)


def rope_(
    glue: ModuleType,
    x: torch.Tensor,  # [c, all_heads, d] contiguous, rotated in place on its first `heads` heads
    heads: int,
    cos: torch.Tensor,  # [c, d]
    sin: torch.Tensor,  # [c, d] sign-folded (-sin on the first half)
) -> None:
    glue.rope_(x, heads, cos, sin)


def rope_kv_attend(
    glue: ModuleType,
    x: torch.Tensor,  # [n * q, hq + 2 * hk, d] contiguous q | k | v heads; q and k rotated in place
    hq: int,
    hk: int,
    cos: torch.Tensor,  # [n * q, d]
    sin: torch.Tensor,  # [n * q, d] sign-folded
    cache: SlotKVCache,
    layer: int,
    mask: torch.Tensor | None,  # [n, 1, q * hq / hk, kv_len] additive, or None
    n: int,
    q: int,
    scale: float,
) -> torch.Tensor:  # [n * q, hq * d]
    """RoPE on q and k in place, k and v written into ``cache`` (after its ``set_step``), then attention over it:
    one call into ``csrc/decode_glue.cpp``. Steps of up to :data:`ROW_ATTENTION_MAX_Q` tokens per row (decoding,
    verification) attend over each row's own positions only (``attend_rows``); longer ones through SDPA with
    ``mask`` and folded GQA."""
    row0, kv_len, index = cache.step_layout()
    kv = (cache.keys, cache.values, layer, row0, kv_len, index)
    return glue.rope_kv_attend(x, hq, hk, cos, sin, *kv, mask, n, q, scale, cache.step_starts(), ROW_ATTENTION_MAX_Q)


def attends_by_row(q: int, head_dim: int) -> bool:
    """Whether :func:`rope_kv_attend` attends a step of ``q`` tokens per row row by row (no mask needed)."""
    return q <= ROW_ATTENTION_MAX_Q and head_dim in ROW_ATTENTION_HEAD_DIMS


def silu_mul(glue: ModuleType, gu: torch.Tensor) -> torch.Tensor:  # gu: [c, 2m] gate | up -> [c, m]
    return glue.silu_mul(gu)


def topk_rows(
    x: torch.Tensor,  # [r, v]
    rows: torch.Tensor,  # [m] long row indices
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # values [m, k] descending, indices [m, k] long
    """``x[rows].topk(k)``: for float32 CPU rows one pass of a compiled loop per row without copying them
    (~8x faster than ``topk`` over a 49k vocabulary), else PyTorch's. Ties: the compiled loop keeps lower indices."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.stride(-1) == 1:
        glue = glue_kernels()
        if glue is not None:
            return glue.topk_rows(x, rows.to(torch.long), k)
    return x[rows].topk(k, dim=-1)
