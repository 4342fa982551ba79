"""Per-step overhead of the engine: the share of a decode step spent outside the target forward.

A decode step of ``RolloutEngine.generate`` is the target forward (``StepRecord.forward_s``: the decoder
forward and the LM head) plus everything else (sampling/verification over the vocabulary, planning, drafting,
bookkeeping, capture, compaction). This script runs plain greedy decoding (k=0, ``ignore_eos``) of the embedded
SmolLM2-135M-Instruct at several row counts, interleaving the row counts over repeats, and reports per row
count the median step, the median forward and the overhead share ``1 - sum(forward_s) / sum(step_s)`` over the
decode steps (the first one excluded), and the same share of the whole decode phase's wall time (``total_s -
prefill_s``: the first-token sampling, the controller's ``update`` and the work between steps included).

Run (results in ``docs/results/step_overhead.md``)::

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 python -m atlas_rl.bench.step_overhead --rows 1 8 16 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence

import torch

from atlas_rl.controller import FixedController
from atlas_rl.types import SamplingParams, SpecStats

PROMPTS = (
    "Explain how a bicycle gear works.",
    "Write a short poem about the sea.",
    "List three uses of a paperclip.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle for a child.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Summarise the plot of Hamlet in two sentences.",
)


def _prompt_ids(tokenizer, rows: int) -> list[list[int]]:
    return [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(rows)]


def _summary(stats: SpecStats) -> dict[str, float]:
    steps = stats.steps[1:]  # the first decode step pays one-off allocations
    step_s = sum(s.step_s for s in steps)
    fwd_s = sum(s.forward_s for s in stats.steps)
    decode_s = stats.total_s - stats.prefill_s  # everything after the prefill forward, between steps included
    return {
        "step_ms": 1000 * statistics.median(s.step_s for s in steps),
        "forward_ms": 1000 * statistics.median(s.forward_s for s in steps),
        "overhead_share": 1.0 - sum(s.forward_s for s in steps) / step_s if step_s > 0 else float("nan"),
        "wall_per_step_ms": 1000 * decode_s / stats.num_steps,
        "wall_overhead_share": 1.0 - fwd_s / decode_s if decode_s > 0 else float("nan"),
    }


def measure(rows: Sequence[int], repeats: int, max_new_tokens: int = 48) -> dict[int, dict[str, float]]:
    """Median step/forward milliseconds and the overhead share per row count (repeats interleaved)."""
    from atlas_rl.models import load_target
    from atlas_rl.rollout import RolloutEngine

    model, tokenizer = load_target()
    engine = RolloutEngine(model, speculators=[])
    sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True)
    runs: dict[int, list[dict[str, float]]] = {r: [] for r in rows}
    engine.generate(_prompt_ids(tokenizer, 1), sampling, controller=FixedController(0))  # warm-up
    for _ in range(repeats):
        for r in rows:
            batch = engine.generate(_prompt_ids(tokenizer, r), sampling, controller=FixedController(0))
            runs[r].append(_summary(batch.stats))
    return {r: {k: statistics.median(x[k] for x in runs[r]) for k in runs[r][0]} for r in rows}


def render(results: dict[int, dict[str, float]]) -> str:
    lines = [
        "| rows | step (ms) | forward (ms) | outside the forward (steps) | decode wall per step (ms) "
        "| outside the forward (decode wall) |",
        "|---|---|---|---|---|---|",
    ]
    for r, m in results.items():
        lines.append(
            f"| {r} | {m['step_ms']:.1f} | {m['forward_ms']:.1f} | {100 * m['overhead_share']:.1f}% "
            f"| {m['wall_per_step_ms']:.1f} | {100 * m['wall_overhead_share']:.1f}% |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16], help="active rows per run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats per row count (medians)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens per row")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = measure(args.rows, args.repeats, args.max_new_tokens)
    sys.stdout.write(render(results) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({str(k): v for k, v in results.items()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
