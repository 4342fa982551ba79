"""Which matmul kernel streams a model's weights fastest for a given number of activation rows, on *this* machine.

A decode or verification forward multiplies a few activation rows by every weight matrix: it is bound by reading
the weights once, and which BLAS call reaches that speed depends on the CPU, the BLAS build and the number of rows.
The choice cannot be written down once: on the AMD EPYC where :mod:`.cpu_linear` was first tuned, ``mm(W, x.T)``
streamed 2-6 rows 1.5-2x faster than ``F.linear``; on an Intel Xeon (AVX-512) the same call is 2x *slower* at
2-3 rows, ``F.linear`` is the fastest up to 3 rows and oneDNN over a weight reordered into its blocked layout from
4 rows on (``docs/decisions/cpu_kernels.md``, section 5). So the engine measures:

* :func:`time_kernels` times every candidate kernel over the model's own weight chain (every ``nn.Linear``, the
  LM head included), interleaved repeat after repeat, and keeps each kernel's fastest pass (interference only
  adds time);
* :meth:`KernelPlan.from_timings` picks, per number of rows (1 .. :data:`MAX_PLAN_ROWS`), the fastest kernel of
  the nearest measured row count at or below it; ``F.linear`` (the reference) unless another kernel beats it by
  more than ``margin``;
* :func:`load_or_tune` caches the plan as JSON under ``cache_dir()/kernels``, keyed by this module's source, the
  CPU (model name and flags), the PyTorch version, the thread count and the model's weight shapes, so it runs once
  per machine
  (about 10 s for SmolLM2-135M); models whose weights fit in a CPU cache (< :data:`MIN_TUNE_BYTES`) are not
  tuned: every kernel is as fast there, and ``F.linear`` is used.

Every kernel computes the same matrix product (summation order may differ in the last bits, inside the 1e-4 fp32
logprob contract).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "GRID",
    "KERNELS",
    "MAX_PLAN_ROWS",
    "MIN_TUNE_BYTES",
    "KernelPlan",
    "load_or_tune",
    "run_kernel",
    "time_kernels",
    "tune",
]

KERNELS = ("linear", "mm", "mm_pad", "onednn")
MAX_PLAN_ROWS = 64  # above it F.linear (a GEMM of that size is compute-bound: no kernel streams better)
GRID = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)  # row counts timed; the others take the nearest below
MIN_TUNE_BYTES = 16 << 20  # smaller models are not tuned (their weights stay in cache)
PLAN_FORMAT = 1
_ONEDNN = torch.backends.mkldnn.is_available()
_PACKED = "_atlas_onednn_weight"


def onednn_weight(
    weight: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor | None:  # [out, in] -> oneDNN blocked copy, or None
    """``weight`` (cast to ``dtype`` first when given) reordered into oneDNN's blocked layout for its linear kernel,
    once per version of ``weight`` and dtype; None when it cannot be (no oneDNN, an inference tensor)."""
    if not _ONEDNN:
        return None
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor tracks no version: never cache a copy of it
        return None
    attr = _PACKED if dtype is None else f"{_PACKED}_{str(dtype).removeprefix('torch.')}"
    cached = getattr(weight, attr, None)
    if cached is None or cached[0] != version:
        try:
            src = weight.detach() if dtype is None else weight.detach().to(dtype)
            packed = torch.ops.mkldnn._reorder_linear_weight(src)
        except (RuntimeError, AttributeError):  # a build without the op
            return None
        cached = (version, packed)
        setattr(weight, attr, cached)
    return cached[1]


def run_kernel(
    name: str,
    x2: torch.Tensor,  # [rows, in] row-major
    weight: torch.Tensor,  # [out, in]
) -> torch.Tensor | None:  # [rows, out]; None: the kernel cannot run here (use F.linear)
    """One product ``x2 @ weight.T`` by the named kernel."""
    if name == "mm":
        return torch.mm(weight, x2.t()).t()
    if name == "mm_pad":  # one row computed as two (MKL's matrix-vector path is slower on some CPUs)
        if x2.shape[0] != 1:
            return torch.mm(weight, x2.t()).t()
        return torch.mm(weight, x2.expand(2, -1).contiguous().t())[:, :1].t()
    if name == "onednn":
        packed = onednn_weight(weight)
        return None if packed is None else torch.ops.mkldnn._linear_pointwise(x2, packed, None, "none", [], "")
    if name == "onednn_bf16":  # draft heads only (cpu_linear.draft_linear), never tuned for the target
        packed = onednn_weight(weight, torch.bfloat16)
        if packed is None:
            return None
        return torch.ops.mkldnn._linear_pointwise(x2.to(torch.bfloat16), packed, None, "none", [], "").float()
    return F.linear(x2, weight)


@dataclass(frozen=True)
class KernelPlan:
    """The kernel for each number of activation rows 1 .. :data:`MAX_PLAN_ROWS` (``by_rows[r - 1]``)."""

    by_rows: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.by_rows) != MAX_PLAN_ROWS or set(self.by_rows) - set(KERNELS):
            raise ValueError(f"a KernelPlan names one of {KERNELS} for each of 1..{MAX_PLAN_ROWS} rows")

    @classmethod
    def reference(cls) -> KernelPlan:
        """``F.linear`` everywhere (the untuned default)."""
        return cls(("linear",) * MAX_PLAN_ROWS)

    @classmethod
    def from_timings(cls, timings: dict[int, dict[str, float]], margin: float = 0.10) -> KernelPlan:
        """Per measured row count the fastest kernel, ``linear`` unless beaten by more than ``margin``; row counts
        between measured ones take the choice of the nearest measured count below (above for none below)."""
        measured = sorted(timings)
        if not measured:
            return cls.reference()
        best = {}
        for r in measured:
            t = timings[r]
            name = min(t, key=t.get)
            best[r] = name if t[name] < (1.0 - margin) * t.get("linear", float("inf")) else "linear"
        plan = []
        for r in range(1, MAX_PLAN_ROWS + 1):
            below = [m for m in measured if m <= r]
            plan.append(best[below[-1] if below else measured[0]])
        return cls(tuple(plan))

    def kernel(self, rows: int) -> str:
        return self.by_rows[rows - 1] if 0 < rows <= MAX_PLAN_ROWS else "linear"

    def digest(self) -> str:
        return hashlib.sha256(",".join(self.by_rows).encode()).hexdigest()[:12]

    def summary(self) -> str:
        """Runs of equal kernels: ``"1: linear, 4-8: mm, 12-64: onednn"``."""
        runs: list[tuple[int, int, str]] = []
        for r, name in enumerate(self.by_rows, 1):
            if runs and runs[-1][2] == name:
                runs[-1] = (runs[-1][0], r, name)
            else:
                runs.append((r, r, name))
        return ", ".join(f"{a}: {n}" if a == b else f"{a}-{b}: {n}" for a, b, n in runs)


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``model``'s ``nn.Linear`` layers in module order (each tensor once)."""
    seen: set[int] = set()
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


@torch.inference_mode()
def time_kernels(
    weights: Sequence[torch.Tensor], rows: int, repeats: int = 3, kernels: Sequence[str] = KERNELS
) -> dict[str, float]:
    """``{kernel: ms}``: the fastest of ``repeats`` interleaved passes over ``weights`` with ``rows`` rows."""
    xs = {int(w.shape[1]): torch.randn(rows, int(w.shape[1]), dtype=w.dtype) for w in weights}  # [rows, in]
    names = [k for k in kernels if k != "mm_pad" or rows == 1]  # mm_pad is mm above one row
    if "onednn" in names and run_kernel("onednn", xs[int(weights[0].shape[1])], weights[0]) is None:
        names.remove("onednn")
    best = {k: float("inf") for k in names}
    for _ in range(repeats):
        for k in names:
            t0 = time.perf_counter()
            for w in weights:
                run_kernel(k, xs[int(w.shape[1])], w)
            best[k] = min(best[k], (time.perf_counter() - t0) * 1000)
    return best


def tune(
    model: nn.Module,
    grid: Sequence[int] | None = None,
    repeats: int = 3,
    progress: Callable[[int], None] | None = None,
) -> tuple[KernelPlan, dict[int, dict[str, float]]]:
    """Time every kernel at every row count of ``grid`` (default :data:`GRID`) over ``model``'s weights; the plan
    and the timings."""
    weights = linear_weights(model)
    timings = {}
    for r in GRID if grid is None else grid:
        timings[int(r)] = time_kernels(weights, int(r), repeats)
        if progress is not None:
            progress(int(r))
    plan = KernelPlan.from_timings(timings)
    if "onednn" not in plan.by_rows:
        drop_onednn_copies(weights)
    return plan, timings


def drop_onednn_copies(weights: Sequence[torch.Tensor]) -> None:
    """Free the oneDNN copies cached on ``weights``."""
    for w in weights:
        for attr in [a for a in vars(w) if a.startswith(_PACKED)]:  # the float32 copy and any other dtype's
            delattr(w, attr)


def _cpu_identity() -> str:
    """CPU model name and flags (Linux ``/proc/cpuinfo``; the platform string elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def plan_cache_key(model: nn.Module) -> str:
    """What the best kernel depends on: the kernels' code, CPU, PyTorch build, threads, the weight shapes."""
    shapes = sorted(tuple(w.shape) for w in linear_weights(model))
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]  # the kernels themselves
    raw = json.dumps([PLAN_FORMAT, code, _cpu_identity(), torch.__version__, torch.get_num_threads(), shapes, GRID])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cache_path(key: str) -> Path:
    from atlas_rl.models import cache_dir

    return cache_dir() / "kernels" / f"kernel_plan_{key}.json"


def load_or_tune(model: nn.Module, use_cache: bool = True) -> KernelPlan:
    """The cached plan for this machine and model shapes, else :func:`tune` (and cache it); the reference plan for
    small models, non-CPU or non-float32 models."""
    weights = linear_weights(model)
    if not weights or weights[0].device.type != "cpu" or weights[0].dtype != torch.float32:
        return KernelPlan.reference()
    if sum(w.numel() * w.element_size() for w in weights) < MIN_TUNE_BYTES:
        return KernelPlan.reference()
    path = _cache_path(plan_cache_key(model))
    if use_cache and path.is_file():
        try:
            plan = KernelPlan(tuple(json.loads(path.read_text())["plan"]))
            logger.debug("matmul kernels: reusing %s (%s)", path, plan.summary())
            return plan
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("matmul kernels: ignoring unreadable plan %s (%s); re-tuning", path, e)
    t0 = time.perf_counter()
    plan, timings = tune(model)
    logger.info("matmul kernels tuned in %.1f s: %s", time.perf_counter() - t0, plan.summary())
    if use_cache:
        _write_plan(path, plan, timings)
    return plan


def _write_plan(path: Path, plan: KernelPlan, timings: dict[int, dict[str, float]]) -> None:
    doc = {"format": PLAN_FORMAT, "plan": list(plan.by_rows), "timings_ms": {str(k): v for k, v in timings.items()}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    except OSError as e:
        logger.warning("matmul kernels: could not cache the plan at %s (%s)", path, e)
