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
    "candidate_kernels",
    "load_or_tune",
    "run_kernel",
    "time_kernels",
    "tune",
]

KERNELS = ("linear", "mm", "mm_pad", "onednn", "glue")
GLUE_MAX_ROWS = 16  # the decode glue's few-row loops (linear_f32w) are timed up to this many rows; GEMMs beyond
MAX_PLAN_ROWS = 64  # above it F.linear (a GEMM of that size is compute-bound: no kernel streams better)
GRID = (1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64)  # row counts timed; the others take the nearest below
MIN_TUNE_BYTES = 16 << 20  # smaller models are not tuned (their weights stay in cache)
PLAN_FORMAT = 2
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


_GLUE: dict[str, object] = {}


def _glue_module():  # the compiled decode glue (built once; None without a compiler), imported on first use
    if "module" not in _GLUE:
        from .cpu_glue import glue_kernels  # cpu_glue imports this module: not at import time

        _GLUE["module"] = glue_kernels()
    return _GLUE["module"]


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
    if name == "glue":  # the decode glue's few-row loops: one pass over the weight, prefetched (cpu_glue)
        glue = _glue_module()
        if glue is None or weight.dtype != torch.float32 or not weight.is_contiguous() or x2.dtype != torch.float32:
            return None
        return glue.linear_f32w(x2, weight)
    if name == "onednn_bf16":  # draft heads only (cpu_linear.draft_linear), never tuned for the target
        packed = onednn_weight(weight, torch.bfloat16)
        if packed is None:
            return None
        return torch.ops.mkldnn._linear_pointwise(x2.to(torch.bfloat16), packed, None, "none", [], "").float()
    return F.linear(x2, weight)


Shape = tuple[int, int]  # a weight's (out_features, in_features)


@dataclass(frozen=True)
class KernelPlan:
    """The kernel for each number of activation rows 1 .. :data:`MAX_PLAN_ROWS` (``by_rows[r - 1]``), and the same
    per weight shape where a shape was tuned on its own (``by_shape``: ``((out, in), by_rows)`` pairs): a 49152-row
    LM head streams best with another kernel than a 576 x 1536 projection at the same row count."""

    by_rows: tuple[str, ...]
    by_shape: tuple[tuple[Shape, tuple[str, ...]], ...] = ()

    def __post_init__(self) -> None:
        for rows in [self.by_rows] + [r for _, r in self.by_shape]:
            if len(rows) != MAX_PLAN_ROWS or set(rows) - set(KERNELS):
                raise ValueError(f"a KernelPlan names one of {KERNELS} for each of 1..{MAX_PLAN_ROWS} rows")
        object.__setattr__(self, "_shapes", {tuple(shape): rows for shape, rows in self.by_shape})

    @classmethod
    def reference(cls) -> KernelPlan:
        """``F.linear`` everywhere (the untuned default)."""
        return cls(("linear",) * MAX_PLAN_ROWS)

    @staticmethod
    def choose(
        timings: dict[int, dict[str, float]], margin: float = 0.03, reference: Sequence[str] | None = None
    ) -> tuple[str, ...]:
        """Per measured row count the fastest kernel unless it beats the reference kernel (``linear``, or
        ``reference[r - 1]``) by at most ``margin``; row counts between measured ones take the choice of the
        nearest measured count below (above for none below)."""
        measured = sorted(timings)
        if not measured:
            return ("linear",) * MAX_PLAN_ROWS if reference is None else tuple(reference)
        best = {}
        for r in measured:
            t = timings[r]
            ref = "linear" if reference is None else reference[r - 1]
            name = min(t, key=t.get)
            best[r] = name if t[name] < (1.0 - margin) * t.get(ref, float("inf")) else ref
        plan = []
        for r in range(1, MAX_PLAN_ROWS + 1):
            below = [m for m in measured if m <= r]
            plan.append(best[below[-1] if below else measured[0]])
        return tuple(plan)

    @classmethod
    def from_timings(cls, timings: dict[int, dict[str, float]], margin: float = 0.03) -> KernelPlan:
        """One choice for every weight (:meth:`choose` over whole-chain timings ``{rows: {kernel: ms}}``)."""
        return cls(cls.choose(timings, margin))

    @classmethod
    def from_shape_timings(
        cls, timings: dict[int, dict[Shape, dict[str, float]]], margin: float = 0.03, shape_margin: float = 0.15
    ) -> KernelPlan:
        """From ``{rows: {shape: {kernel: ms}}}``: the choice over the whole chain (the sum of all shapes), and a
        shape's own choice only where it beats that by more than ``shape_margin`` (one shape's time is a small
        sum, noisier than the chain's; a kernel that returns a transposed product costs a copy later)."""
        shapes = sorted({shape for per in timings.values() for shape in per})
        totals = {}
        for r, per in timings.items():
            names = set.intersection(*(set(t) for t in per.values())) if per else set()
            totals[r] = {k: sum(t[k] for t in per.values()) for k in names}
        default = cls.choose(totals, margin)
        by_shape = []
        for shape in shapes:
            own = cls.choose({r: per[shape] for r, per in timings.items() if shape in per}, shape_margin, default)
            if own != default:
                by_shape.append((shape, own))
        return cls(default, tuple(by_shape))

    def kernel(self, rows: int, shape: Sequence[int] | None = None) -> str:
        if not 0 < rows <= MAX_PLAN_ROWS:
            return "linear"
        by_rows = self._shapes.get(shape, self.by_rows) if shape is not None else self.by_rows  # type: ignore[attr-defined]
        return by_rows[rows - 1]

    def uses(self, name: str) -> bool:
        """Whether any row count of any shape runs kernel ``name``."""
        return name in self.by_rows or any(name in rows for _, rows in self.by_shape)

    def digest(self) -> str:
        text = ",".join(self.by_rows) + "|" + ";".join(f"{s}:{','.join(r)}" for s, r in self.by_shape)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @staticmethod
    def _runs(by_rows: tuple[str, ...]) -> str:
        runs: list[tuple[int, int, str]] = []
        for r, name in enumerate(by_rows, 1):
            if runs and runs[-1][2] == name:
                runs[-1] = (runs[-1][0], r, name)
            else:
                runs.append((r, r, name))
        return ", ".join(f"{a}: {n}" if a == b else f"{a}-{b}: {n}" for a, b, n in runs)

    def summary(self) -> str:
        """Runs of equal kernels, ``"1: linear, 4-8: mm, 12-64: onednn"``, then each tuned shape's."""
        parts = [self._runs(self.by_rows)] + [f"{o}x{i}: {self._runs(r)}" for (o, i), r in self.by_shape]
        return "; ".join(parts)


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weights of ``model``'s ``nn.Linear`` layers in module order (each tensor once)."""
    seen: set[int] = set()
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            out.append(m.weight)
    return out


def candidate_kernels(
    x2: torch.Tensor,  # [rows, in] a sample activation
    weight: torch.Tensor,  # [out, in] a sample weight
    kernels: Sequence[str] = KERNELS,
) -> list[str]:
    """The ``kernels`` worth timing for ``x2``'s row count: ``mm_pad`` only at one row (it is ``mm`` above),
    ``glue`` up to :data:`GLUE_MAX_ROWS`, and neither ``onednn`` nor ``glue`` where they cannot run (no oneDNN in
    the build, no compiler for the glue)."""
    rows = int(x2.shape[0])
    names = [k for k in kernels if (k != "mm_pad" or rows == 1) and (k != "glue" or rows <= GLUE_MAX_ROWS)]
    return [k for k in names if k not in ("onednn", "glue") or run_kernel(k, x2, weight) is not None]


@torch.inference_mode()
def time_kernels(
    weights: Sequence[torch.Tensor], rows: int, repeats: int = 3, kernels: Sequence[str] = KERNELS
) -> dict[Shape, dict[str, float]]:
    """``{(out, in): {kernel: ms}}``: per weight shape and kernel, the least time its weights took in any of
    ``repeats`` interleaved passes over the whole chain ``weights`` with ``rows`` rows (each kernel streams the
    chain in order, so every weight is read with the caches it meets in a forward)."""
    xs = {int(w.shape[1]): torch.randn(rows, int(w.shape[1]), dtype=w.dtype) for w in weights}  # [rows, in]
    names = candidate_kernels(xs[int(weights[0].shape[1])], weights[0], kernels)
    shapes = [(int(w.shape[0]), int(w.shape[1])) for w in weights]
    best = {s: {k: float("inf") for k in names} for s in shapes}
    for _ in range(repeats):
        for k in names:
            spent = dict.fromkeys(shapes, 0.0)
            for w, shape in zip(weights, shapes):
                t0 = time.perf_counter()
                run_kernel(k, xs[shape[1]], w)
                spent[shape] += (time.perf_counter() - t0) * 1000
            for shape, ms in spent.items():
                best[shape][k] = min(best[shape][k], ms)
    return best


def tune(
    model: nn.Module,
    grid: Sequence[int] | None = None,
    repeats: int = 3,
    progress: Callable[[int], None] | None = None,
    weights: Sequence[torch.Tensor] | None = None,
) -> tuple[KernelPlan, dict[int, dict[Shape, dict[str, float]]]]:
    """Time every kernel at every row count of ``grid`` (default :data:`GRID`) over ``weights`` (default: the
    model's ``nn.Linear`` weights; the engine passes the ones its forward multiplies by, in order); the plan (a
    choice per weight shape) and the timings."""
    weights = linear_weights(model) if weights is None else list(weights)
    timings = {}
    for r in GRID if grid is None else grid:
        timings[int(r)] = time_kernels(weights, int(r), repeats)
        if progress is not None:
            progress(int(r))
    plan = KernelPlan.from_shape_timings(timings)
    if not plan.uses("onednn"):
        drop_onednn_copies(weights)
    return plan, timings


def drop_onednn_copies(weights: Sequence[torch.Tensor]) -> None:
    """Free the oneDNN copies cached on ``weights``."""
    for w in weights:
        for attr in [a for a in vars(w) if a.startswith(_PACKED)]:  # the float32 copy and any other dtype's
            delattr(w, attr)


def cpu_identity() -> str:
    """CPU model name and flags (Linux ``/proc/cpuinfo``; the platform string elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def plan_cache_key(model: nn.Module, weights: Sequence[torch.Tensor] | None = None) -> str:
    """What the best kernel depends on: the kernels' code, CPU, PyTorch build, threads, the weight shapes."""
    shapes = [tuple(w.shape) for w in (linear_weights(model) if weights is None else weights)]
    glue_source = Path(__file__).parent / "csrc" / "decode_glue.cpp"  # the "glue" kernel's loops
    blob = Path(__file__).read_bytes() + (glue_source.read_bytes() if glue_source.exists() else b"")
    code = hashlib.sha256(blob).hexdigest()[:12]  # the kernels themselves
    raw = json.dumps([PLAN_FORMAT, code, cpu_identity(), torch.__version__, torch.get_num_threads(), shapes, GRID])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _cache_path(key: str) -> Path:
    from atlas_rl.models import cache_dir

    return cache_dir() / "kernels" / f"kernel_plan_{key}.json"


def load_or_tune(
    model: nn.Module, use_cache: bool = True, weights: Sequence[torch.Tensor] | None = None
) -> KernelPlan:
    """The cached plan for this machine and weight shapes, else :func:`tune` (and cache it); the reference plan
    for small models, non-CPU or non-float32 models. ``weights``: the chain a forward multiplies by (default: the
    model's ``nn.Linear`` weights)."""
    weights = linear_weights(model) if weights is None else list(weights)
    if not weights or weights[0].device.type != "cpu" or weights[0].dtype != torch.float32:
        return KernelPlan.reference()
    if sum(w.numel() * w.element_size() for w in weights) < MIN_TUNE_BYTES:
        return KernelPlan.reference()
    path = _cache_path(plan_cache_key(model, weights))
    if use_cache and path.is_file():
        try:
            plan = _read_plan(path)
            logger.debug("matmul kernels: reusing %s (%s)", path, plan.summary())
            return plan
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("matmul kernels: ignoring unreadable plan %s (%s); re-tuning", path, e)
    t0 = time.perf_counter()
    plan, timings = tune(model, weights=weights)
    logger.info("matmul kernels tuned in %.1f s: %s", time.perf_counter() - t0, plan.summary())
    if use_cache:
        _write_plan(path, plan, timings)
    return plan


def _read_plan(path: Path) -> KernelPlan:
    doc = json.loads(path.read_text())
    by_shape = tuple((tuple(int(v) for v in k.split("x")), tuple(r)) for k, r in doc["by_shape"].items())
    return KernelPlan(tuple(doc["plan"]), by_shape)  # type: ignore[arg-type]


def _write_plan(path: Path, plan: KernelPlan, timings: dict[int, dict[Shape, dict[str, float]]]) -> None:
    doc = {
        "format": PLAN_FORMAT,
        "plan": list(plan.by_rows),
        "by_shape": {f"{o}x{i}": list(r) for (o, i), r in plan.by_shape},
        "timings_ms": {str(k): {f"{o}x{i}": t for (o, i), t in v.items()} for k, v in timings.items()},
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(path)
    except OSError as e:
        logger.warning("matmul kernels: could not cache the plan at %s (%s)", path, e)
