"""The verification cost table next to its physics: the time to stream the model's weights once.

``weight_chain_ms(model, columns)`` multiplies a ``[columns, hidden]`` activation through every layer's own weight
matrices (q, k, v, o, gate, up, down: distinct tensors, so nothing stays in cache) and the LM head, with every
kernel the engine can choose (``F.linear``, ``torch.mm(W, x.T)``, on a float32 CPU also one column as two,
oneDNN and the decode glue's few-row loops) and keeps the fastest: the floor a forward over ``columns`` tokens
(rows x tokens per row) cannot beat on this machine. ``roofline_table`` interleaves engine forwards
(``rollout.cost_probe.forward_cost_ms``) with chains of the same column counts, repeat after repeat, so a busy
machine slows both alike and the ratio stays meaningful.

Run: ``python -m atlas_rl.bench.roofline --rows 1,4,16 --tokens 1,2,3,5,9 --repeats 5``.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from atlas_rl.rollout import RolloutEngine

logger = logging.getLogger(__name__)


def _chain_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The model's weight matrices in forward order: per layer q, k, v, o, gate, up, down; then the LM head."""
    ws = []
    for layer in model.get_decoder().layers:
        att, mlp = layer.self_attn, layer.mlp
        ws += [att.q_proj.weight, att.k_proj.weight, att.v_proj.weight, att.o_proj.weight]
        ws += [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
    return ws + [model.get_output_embeddings().weight]


@torch.inference_mode()
def weight_chain_ms(model: torch.nn.Module, columns: int, repeats: int = 1) -> dict[str, float]:
    """``{kernel: ms, ..., "best": ms}``: median time of one pass over all weights for ``columns`` columns, per
    kernel (``linear``, ``mm``; on a float32 CPU also the engine's others: one column as two, oneDNN), interleaved;
    ``best`` is the fastest kernel, so the roofline is the fastest weight stream this machine offers."""
    from atlas_rl.rollout.kernel_tune import candidate_kernels, run_kernel

    ws = _chain_weights(model)
    dev, dtype = ws[0].device, ws[0].dtype
    xs = {w.shape[1]: torch.randn(columns, w.shape[1], device=dev, dtype=dtype) for w in ws}  # [columns, in]
    cpu32 = dev.type == "cpu" and dtype == torch.float32
    names = candidate_kernels(xs[ws[0].shape[1]], ws[0]) if cpu32 else ["linear", "mm"]
    times: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(repeats):
        for name in names:
            _sync(dev)
            t0 = time.perf_counter()
            for w in ws:
                run_kernel(name, xs[w.shape[1]], w)
            _sync(dev)
            times[name].append((time.perf_counter() - t0) * 1000)
    out = {name: statistics.median(t) for name, t in times.items()}
    out["best"] = min(out.values())
    return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def roofline_table(
    engines: Mapping[str, RolloutEngine],
    rows: tuple[int, ...] = (1, 4, 16),
    tokens: tuple[int, ...] = (1, 2, 3, 5, 9),
    context: int = 128,
    repeats: int = 5,
    max_columns: int = 64,
) -> dict:
    """Forward ms per engine and (rows, tokens) cell, and weight-chain ms per column count, from ``repeats``
    interleaved rounds (each round: every engine's every cell, then every chain); medians. Cells over
    ``max_columns`` columns are skipped. All engines must share one model.

    Returns ``{"rows", "tokens", "context", "repeats", "chain": {cols: ms}, "ms": {name: {(r, t): ms}},
    "ratio": {name: {(r, t): ms / chain}}}``.
    """
    from atlas_rl.rollout.cost_probe import forward_cost_ms

    model = next(iter(engines.values())).model
    cells = [(r, t) for r in rows for t in tokens if r * t <= max_columns]
    cols = sorted({r * t for r, t in cells})
    raw = {name: {c: [] for c in cells} for name in engines}
    chain: dict[int, list[float]] = {c: [] for c in cols}
    weight_chain_ms(model, 1)  # warm-up
    for i in range(repeats):
        for r, t in cells:
            for name, eng in engines.items():
                raw[name][(r, t)].append(forward_cost_ms(model, r, t, context=context, repeats=1, engine=eng))
        for c in cols:
            chain[c].append(weight_chain_ms(model, c)["best"])
        logger.info("roofline round %d/%d done", i + 1, repeats)
    ch = {c: statistics.median(v) for c, v in chain.items()}
    ms = {name: {c: statistics.median(v) for c, v in cells_ms.items()} for name, cells_ms in raw.items()}
    ratio = {name: {(r, t): m[(r, t)] / ch[r * t] for r, t in cells} for name, m in ms.items()}
    return {
        "rows": list(rows),
        "tokens": list(tokens),
        "context": context,
        "repeats": repeats,
        "chain": ch,
        "ms": ms,
        "ratio": ratio,
    }


def decode_step_table(
    engines: Mapping[str, RolloutEngine],
    prompts: list[list[int]],
    rows: tuple[int, ...] = (1, 8, 16),
    new_tokens: int = 48,
    repeats: int = 3,
) -> dict:
    """A whole k=0 decode step of ``generate`` (greedy, ``new_tokens`` each, EOS ignored) per engine, against the
    weight chain of as many columns as rows, interleaved over ``repeats`` rounds; medians.

    Returns ``{name: {rows: {"step_ms", "forward_ms", "chain_ms", "step_vs_chain", "outside_forward_share"}}}``."""
    from atlas_rl.types import SamplingParams

    sp = SamplingParams(temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)
    model = next(iter(engines.values())).model
    raw = {(n, r): {"step": [], "forward": []} for n in engines for r in rows}
    chain: dict[int, list[float]] = {r: [] for r in rows}
    for _ in range(repeats):
        for r in rows:
            for name, eng in engines.items():
                st = eng.generate(prompts[:r], sp).stats
                raw[(name, r)]["step"].append((st.total_s - st.prefill_s) * 1e3 / st.num_steps)
                raw[(name, r)]["forward"].append(st.forward_s * 1e3 / st.num_steps)
            chain[r].append(weight_chain_ms(model, r)["best"])
    out: dict = {n: {} for n in engines}
    for (name, r), v in raw.items():
        step, fwd, ch = statistics.median(v["step"]), statistics.median(v["forward"]), statistics.median(chain[r])
        out[name][r] = {
            "step_ms": step,
            "forward_ms": fwd,
            "chain_ms": ch,
            "step_vs_chain": step / ch,
            "outside_forward_share": (step - fwd) / step,
        }
    return out


def render_roofline_markdown(table: dict) -> str:
    """Markdown: per engine, forward ms (x the chain of the same rows x tokens columns); then the chain."""
    toks = table["tokens"]
    lines = []
    for name, ms in table["ms"].items():
        lines += [
            f"**{name}**, context {table['context']}, medians of {table['repeats']} interleaved repeats: "
            "ms (x the weight-streaming chain of rows x tokens columns)",
            "",
            "| rows \\ tokens per row | " + " | ".join(map(str, toks)) + " |",
            "|---" * (len(toks) + 1) + "|",
        ]
        for r in table["rows"]:
            cells = [
                "" if (r, t) not in ms else f"{ms[(r, t)]:.1f} ({table['ratio'][name][(r, t)]:.2f}x)" for t in toks
            ]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines.append("")
    ch = table["chain"]
    lines += ["| columns | " + " | ".join(map(str, ch)) + " |", "|---" * (len(ch) + 1) + "|"]
    lines.append("| chain ms | " + " | ".join(f"{v:.1f}" for v in ch.values()) + " |")
    steps = table.get("decode_steps") or {}
    if steps:
        lines += ["", "| path | rows | k=0 decode step ms | forward ms | chain ms | step / chain | outside forward |"]
        lines.append("|---|---|---|---|---|---|---|")
    for name, by_rows in steps.items():
        for r, d in by_rows.items():
            lines.append(
                f"| {name} | {r} | {d['step_ms']:.1f} | {d['forward_ms']:.1f} | {d['chain_ms']:.1f} | "
                f"{d['step_vs_chain']:.2f}x | {d['outside_forward_share']:.0%} |"
            )
    return "\n".join(lines)


@dataclass
class RooflineOptions:
    """Options of ``python -m atlas_rl.bench.roofline``."""

    rows: str = field(default="1,4,16", metadata={"help": "Comma-separated active row counts."})
    tokens: str = field(default="1,2,3,5,9", metadata={"help": "Comma-separated tokens per row."})
    context: int = field(default=128, metadata={"help": "Tokens already in every row's KV cache."})
    repeats: int = field(default=5, metadata={"help": "Interleaved repeats (medians are reported)."})
    compare_hf: bool = field(
        default=True, metadata={"help": "Also time the Hugging Face decoder (the engine before the lean forward)."}
    )
    model: str | None = field(default=None, metadata={"help": "Model path or hub id; default the embedded one."})
    decode_rows: str = field(
        default="1,8,16", metadata={"help": "Rows of the whole-decode-step measurement ('' to skip it)."}
    )

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.context < 1:
            raise ValueError("repeats and context must be >= 1")


def main(argv: list[str] | None = None) -> int:
    from atlas_rl.argparsing import ConfigParser
    from atlas_rl.config import EngineConfig
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine

    opts = ConfigParser([RooflineOptions], prog="python -m atlas_rl.bench.roofline").parse(argv)
    model, tokenizer = load_target(opts.model)
    engines = {"lean forward": RolloutEngine(model)}
    if opts.compare_hf:
        engines["HF decoder forward"] = RolloutEngine(model, config=EngineConfig(lean_forward=False))
    rows = tuple(int(x) for x in opts.rows.split(","))
    toks = tuple(int(x) for x in opts.tokens.split(","))
    table = roofline_table(engines, rows, toks, opts.context, opts.repeats)
    if opts.decode_rows:
        from atlas_rl.bench.tail import held_out_prompt_ids

        drows = tuple(int(x) for x in opts.decode_rows.split(","))
        prompts = held_out_prompt_ids(tokenizer, max(drows))
        table["decode_steps"] = decode_step_table(engines, prompts, drows, repeats=opts.repeats)
    sys.stdout.write(render_roofline_markdown(table) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
