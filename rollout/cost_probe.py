"""Measured verification cost: one target forward for ``rows`` active rows x ``tokens`` tokens per row.

Production code: the controller's cost model is calibrated with it (``RolloutEngine.verification_cost``).

This is the physics the controller reasons with: on a GPU verifying a few tokens costs about as much as
generating one (memory-bound); on a 2-core CPU with many rows a verified token costs about as much as a
generated one (compute-bound) and speculation cannot pay.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from atlas_rl.rollout.kv_cache import SlotKVCache

if TYPE_CHECKING:
    from atlas_rl.rollout.engine import RolloutEngine

logger = logging.getLogger(__name__)

# the sources whose changes change what a verification forward costs (part of the cost model's cache key)
_COST_SOURCES = (
    "forward.py",
    "kv_cache.py",
    "cpu_linear.py",
    "kernel_tune.py",
    "cost_probe.py",
    "cpu_glue.py",
    "csrc/decode_glue.cpp",
    "cuda_graphs.py",
)


def engine_code_version() -> str:
    """A short hash of the engine's forward-path sources and :data:`~.forward.FORWARD_VERSION`: a cached
    verification cost table measured with other code is not reused."""
    from .forward import FORWARD_VERSION

    h = hashlib.sha256(str(FORWARD_VERSION).encode())
    here = Path(__file__).parent
    for name in _COST_SOURCES:
        try:
            h.update((here / name).read_bytes())
        except OSError:
            h.update(name.encode())
    return h.hexdigest()[:12]


@torch.inference_mode()
def forward_cost_ms(
    model: torch.nn.Module,
    rows: int,
    tokens: int,
    context: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    engine: RolloutEngine | None = None,
) -> float:
    """Median wall time (ms) of one engine-style forward: ``rows`` rows, ``tokens`` new tokens each, on top of a
    KV cache already holding ``context`` tokens per row; includes the LM head over every position.

    ``engine``: time through this engine (its kernel choices); default a plain ``RolloutEngine(model)``."""
    from atlas_rl.rollout import RolloutEngine

    eng = engine if engine is not None else RolloutEngine(model)
    if eng.captures_graphs:
        warmup = max(warmup, 1)  # a new cache: the first call captures the shape's graph, the timed ones replay it
    dev, dtype = eng.device, eng.dtype
    cache = SlotKVCache(eng.num_layers, rows, context + tokens, eng.num_kv_heads, eng.head_dim, dtype, dev)
    vocab = eng.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, tokens), generator=gen).to(dev)
    starts = torch.full((rows,), context, dtype=torch.long, device=dev)
    times = []
    for i in range(warmup + repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hidden, _ = eng._target_forward(ids, starts, cache, False)
        eng._logits(hidden)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def verification_cost_table(
    model: torch.nn.Module,
    rows: tuple[int, ...] = (1, 4, 16, 64),
    tokens: tuple[int, ...] = tuple(range(1, 10)),
    context: int = 128,
    repeats: int = 3,
) -> dict:
    """``{"rows": [...], "tokens": [...], "ms": [[...]], "relative": [[...]]}``: forward ms per (rows, tokens),
    and the same relative to 1 token at that row count (the cost of verifying k = tokens-1 drafts)."""
    ms = []
    for r in rows:
        line = []
        for t in tokens:
            line.append(forward_cost_ms(model, r, t, context=context, repeats=repeats))
            logger.info("forward rows=%d tokens=%d: %.1f ms", r, t, line[-1])
        ms.append(line)
    rel = [[v / line[0] for v in line] for line in ms]
    return {"rows": list(rows), "tokens": list(tokens), "context": context, "ms": ms, "relative": rel}
