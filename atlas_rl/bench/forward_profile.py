"""Where one verification forward's time goes: ``torch.profiler`` per op, grouped, for the engine's forward paths.

For every (rows, tokens per row, context) cell and every forward path (the lean forward and the Hugging Face
decoder), the wall time of one forward + LM head (median of ``repeats``, unprofiled) and the profiler's self time
per op, grouped into matmul, attention, elementwise (norms, RoPE, activation), KV writes / copies and
view/stride bookkeeping; what the profiler does not see (wall minus profiled op time) is Python and dispatch
overhead. Shares, not absolute times, are what survives a busy machine.

The profiler does not see the compiled decode glue's calls (RoPE + KV write + attention in one call per layer);
``--attention_split true`` measures them in place instead (:func:`attention_split_cell`): the lean forward with and
without that call (interleaved), so the difference is what attention over the KV cache costs inside a real forward,
next to the KV bytes it reads and the rate that implies.

Run: ``python -m atlas_rl.bench.forward_profile --cells 1x1x128,1x5x128,4x1x128,16x1x128,16x1x512``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)

GROUPS: dict[str, tuple[str, ...]] = {
    "matmul": ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "aten::mv", "mkldnn::_linear_pointwise"),
    "attention": ("scaled_dot_product", "aten::bmm", "aten::_softmax", "aten::where", "aten::all", "aten::baddbmm"),
    "elementwise": (
        "aten::mul",
        "aten::add",
        "aten::pow",
        "aten::rsqrt",
        "aten::mean",
        "aten::silu",
        "aten::neg",
        "aten::sum",
        "aten::div",
        "aten::addcmul",
        "aten::roll",
    ),
    "kv write / copy": ("aten::copy_", "index_put", "aten::index_copy", "aten::index", "aten::cat", "aten::clone"),
}


def _group(name: str) -> str:
    for g, keys in GROUPS.items():
        if any(k in name for k in keys):
            return g
    return "views / other ops"


@torch.inference_mode()
def profile_cell(engine, rows: int, tokens: int, context: int, repeats: int = 3) -> dict:
    """``{"wall_ms", "groups": {group: ms}, "python_ms", "top": [(op, ms)]}`` of one forward + LM head; the groups
    and the Python share come from the profiled run (shares), ``wall_ms`` from unprofiled runs."""
    from atlas_rl.rollout.kv_cache import SlotKVCache

    cache = SlotKVCache(
        engine.num_layers, rows, context + tokens, engine.num_kv_heads, engine.head_dim, engine.dtype, engine.device
    )
    ids = torch.randint(0, engine.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(0))
    starts = torch.full((rows,), context, dtype=torch.long)

    def once() -> None:
        engine._logits(engine._target_forward(ids, starts, cache, False)[0])

    once()
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        once()
        walls.append((time.perf_counter() - t0) * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(repeats):
            once()
        profiled_ms = (time.perf_counter() - t0) * 1e3 / repeats
    groups: dict[str, float] = {}
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3 / repeats
        groups[_group(e.key)] = groups.get(_group(e.key), 0.0) + ms
        ops.append((e.key, ms))
    wall = statistics.median(walls)
    return {
        "wall_ms": wall,
        "groups": groups,
        "python_ms": max(0.0, profiled_ms - sum(groups.values())),  # same run: what no op accounts for
        "top": sorted(ops, key=lambda x: -x[1])[:6],
    }


def _no_attention(
    glue, x: torch.Tensor, hq: int, hk: int, cos, sin, cache, layer: int, mask, n: int, q: int, scale: float
) -> torch.Tensor:  # x: [n * q, hq + 2 * hk, d] -> [n * q, hq * d]
    """``cpu_glue.rope_kv_attend``'s output shape without its work: the queries as they came (no RoPE, KV write,
    attention)."""
    return x[:, :hq].reshape(n * q, -1)


def kv_bytes(engine, rows: int, tokens: int, context: int) -> int:
    """Bytes of keys and values one forward of ``rows`` x ``tokens`` over ``context`` cached positions attends over."""
    per_position = 2 * engine.num_kv_heads * engine.head_dim * engine.dtype.itemsize * engine.num_layers
    return rows * (context + tokens) * per_position


@torch.inference_mode()
def attention_split_cell(engine, rows: int, tokens: int, context: int, repeats: int = 5) -> dict:
    """``{"wall_ms", "no_attention_ms", "attention_ms", "kv_mb", "kv_gb_s"}``: medians over ``repeats`` interleaved
    rounds of the lean forward + LM head with and without the glue's RoPE + KV write + attention call (each round
    the median of three forwards after a warm-up one: single forwards scatter by more than the attention costs)."""
    from atlas_rl.rollout import cpu_glue
    from atlas_rl.rollout.cost_probe import forward_cost_ms

    lean = getattr(engine, "_lean", None)
    if lean is None or lean.glue is None or not cpu_glue.attends_by_row(tokens, engine.head_dim):
        raise ValueError(
            "attention split: needs the lean forward with the compiled decode glue, a head size of 64 or 128 and at "
            f"most {cpu_glue.ROW_ATTENTION_MAX_Q} tokens per row (float32 CPU)"
        )
    real = cpu_glue.rope_kv_attend
    walls: list[float] = []
    stubbed: list[float] = []
    try:
        for _ in range(repeats):
            cpu_glue.rope_kv_attend = real
            walls.append(forward_cost_ms(engine.model, rows, tokens, context, repeats=3, engine=engine))
            cpu_glue.rope_kv_attend = _no_attention
            stubbed.append(forward_cost_ms(engine.model, rows, tokens, context, repeats=3, engine=engine))
    finally:
        cpu_glue.rope_kv_attend = real
    wall, bare = statistics.median(walls), statistics.median(stubbed)
    mb = kv_bytes(engine, rows, tokens, context) / 1e6
    att = wall - bare  # <= 0 when the attention is cheaper than the two medians' noise: no rate to report
    return {
        "wall_ms": wall,
        "no_attention_ms": bare,
        "attention_ms": att,
        "kv_mb": mb,
        "kv_gb_s": mb / att if att > 0 else None,
    }


def render_attention_split_markdown(results: dict[str, dict]) -> str:
    """One row per cell: forward ms with and without the attention call, its cost, the KV bytes and their rate
    ("within noise" where the forward without the call was not faster)."""
    lines = ["| cell (rows x tokens, context) | forward ms | without attention ms | attention ms | KV MB | KV GB/s |"]
    lines.append("|---|---|---|---|---|---|")
    for cell, r in results.items():
        rate = "within noise" if r["kv_gb_s"] is None else f"{r['kv_gb_s']:.1f}"
        lines.append(
            f"| {cell} | {r['wall_ms']:.1f} | {r['no_attention_ms']:.1f} | {r['attention_ms']:.1f} | "
            f"{r['kv_mb']:.0f} | {rate} |"
        )
    return "\n".join(lines)


def render_profile_markdown(results: dict[str, dict[str, dict]]) -> str:
    """One table: per path and cell, wall ms and the share of each op group (+ Python/dispatch overhead)."""
    cols = [*GROUPS, "views / other ops", "Python / dispatch"]
    lines = ["| path | cell (rows x tokens, context) | wall ms | " + " | ".join(cols) + " |"]
    lines.append("|---" * (len(cols) + 3) + "|")
    for path, cells in results.items():
        for cell, r in cells.items():
            shares = [r["groups"].get(c, 0.0) for c in cols[:-1]] + [r["python_ms"]]
            tot = sum(shares)
            pct = " | ".join(f"{100 * s / tot:.0f}%" for s in shares)
            lines.append(f"| {path} | {cell} | {r['wall_ms']:.1f} | {pct} |")
    return "\n".join(lines)


@dataclass
class ProfileOptions:
    """Options of ``python -m atlas_rl.bench.forward_profile``."""

    cells: str = field(
        default="1x1x128,1x2x128,1x3x128,1x5x128,1x9x128,4x1x128,4x5x128,16x1x128,16x3x128,1x1x512,1x5x512,16x1x512",
        metadata={"help": "Comma-separated rows x tokens per row x context cells."},
    )
    repeats: int = field(default=3, metadata={"help": "Forwards timed (and profiled) per cell."})
    model: str | None = field(default=None, metadata={"help": "Model path or hub id; default the embedded one."})
    attention_split: bool = field(
        default=False,
        metadata={"help": "Instead of the profile: the lean forward with and without its attention call, per cell."},
    )

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {self.repeats}")


def main(argv: list[str] | None = None) -> int:
    from atlas_rl.argparsing import ConfigParser
    from atlas_rl.config import EngineConfig
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine

    opts = ConfigParser([ProfileOptions], prog="python -m atlas_rl.bench.forward_profile").parse(argv)
    model, _ = load_target(opts.model)
    lean = RolloutEngine(model)
    cells = [tuple(int(x) for x in c.split("x")) for c in opts.cells.split(",")]
    if opts.attention_split:  # the lean forward only: no HF-decoder engine to build
        split = {f"{r}x{t}, {ctx}": attention_split_cell(lean, r, t, ctx, opts.repeats) for r, t, ctx in cells}
        sys.stdout.write(render_attention_split_markdown(split) + "\n")
        return 0
    paths = {"lean": lean, "HF decoder": RolloutEngine(model, config=EngineConfig(lean_forward=False))}
    results: dict[str, dict[str, dict]] = {p: {} for p in paths}
    for r, t, ctx in cells:
        for p, eng in paths.items():  # interleaved: both paths per cell
            results[p][f"{r}x{t}, {ctx}"] = res = profile_cell(eng, r, t, ctx, opts.repeats)
            logger.info("%s %dx%d ctx %d: %.1f ms, top %s", p, r, t, ctx, res["wall_ms"], res["top"][:3])
    sys.stdout.write(render_profile_markdown(results) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
