"""The engine's costs on an accelerator, for models of real shapes with random weights (no checkpoint needed).

For each shape (SmolLM2-135M, a ~1B Llama, a ~7B Qwen2; built from their configs with random weights, bf16 on a
GPU): the verification cost table (one engine forward, rows x tokens per row, context 128) next to the weight-
streaming chain of the same column count, the engine's k=0 decoding speed against HF ``generate`` (same random
prompts, EOS ignored), and the engine's per-step time outside the target forward. Combined with the mean
acceptance length measured on the CPU per regime, the table projects the speed-up of speculation on that device.

Run (the image needs PyTorch and transformers only)::

    python -m atlas_rl.bench.gpu_costs --out runs/gpu           # on a GPU machine
    python -m atlas_rl.bench.gpu_costs --out runs/gpu_tiny --tiny   # a small CPU smoke run (seconds)

From a source checkout that is not pip-installed, run it from the repository root: it maps ``atlas_rl.rollout``
onto ``rollout/`` itself (see :func:`_source_layout`).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# name -> (model_type, layers, hidden, heads, kv heads, intermediate, vocab); real configs of public models
SHAPES: dict[str, tuple[str, int, int, int, int, int, int]] = {
    "smollm2-135m": ("llama", 30, 576, 9, 3, 1536, 49152),
    "llama-1b": ("llama", 16, 2048, 32, 8, 8192, 128256),  # Llama-3.2-1B
    "qwen2-7b": ("qwen2", 28, 3584, 28, 4, 18944, 152064),  # Qwen2.5-7B
}
TINY_SHAPES = {"tiny": ("llama", 2, 64, 4, 2, 128, 256)}
ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKENS = tuple(range(1, 10))


@dataclass
class GpuCostOptions:
    out: str
    tiny: bool = False
    device: str | None = None
    shapes: tuple[str, ...] = tuple(SHAPES)
    repeats: int = 5
    new_tokens: int = 64

    @property
    def rows(self) -> tuple[int, ...]:
        return (1, 4) if self.tiny else ROWS

    @property
    def tokens(self) -> tuple[int, ...]:
        return (1, 2, 3) if self.tiny else TOKENS


def _source_layout() -> None:
    """Make ``atlas_rl.rollout`` importable from an uninstalled checkout (it lives in ``rollout/``)."""
    import atlas_rl

    root = Path(atlas_rl.__file__).resolve().parent.parent
    if (root / "rollout" / "engine.py").is_file() and str(root) not in atlas_rl.__path__:
        try:
            import atlas_rl.rollout  # noqa: F401
        except ImportError:
            atlas_rl.__path__.append(str(root))


def build_model(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A randomly initialised causal LM of ``shape`` (see :data:`SHAPES`) in ``dtype`` on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mtype, layers, hidden, heads, kv, inter, vocab = shape
    cfg = AutoConfig.for_model(
        mtype,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)  # the dtype keyword differs across transformers releases
    return model.to(dtype).eval()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def cost_table(engine, opts: GpuCostOptions) -> dict:
    """Forward ms per rows x tokens (context 128) and the weight chain per column count, interleaved, medians."""
    from atlas_rl.bench.roofline import weight_chain_ms
    from atlas_rl.rollout.cost_probe import forward_cost_ms

    cells = [(r, t) for r in opts.rows for t in opts.tokens]
    raw: dict[tuple[int, int], list[float]] = {c: [] for c in cells}
    chain: dict[int, list[float]] = {}
    forward_cost_ms(engine.model, 1, 1, repeats=1, engine=engine)  # warm-up
    for _ in range(opts.repeats):
        for r, t in cells:
            raw[(r, t)].append(forward_cost_ms(engine.model, r, t, repeats=1, warmup=0, engine=engine))
        for c in sorted({r * t for r, t in cells}):
            chain.setdefault(c, []).append(weight_chain_ms(engine.model, c)["best"])
    ms = {f"{r}x{t}": statistics.median(v) for (r, t), v in raw.items()}
    return {"forward_ms": ms, "chain_ms": {str(c): statistics.median(v) for c, v in chain.items()}}


def decode_speed(model, engine, rows: int, opts: GpuCostOptions) -> dict:
    """Engine k=0 vs HF ``generate`` (greedy, ``new_tokens`` each, EOS ignored) on ``rows`` random prompts."""
    from atlas_rl.types import SamplingParams

    dev = engine.device
    vocab = engine.vocab_size
    g = torch.Generator().manual_seed(rows)
    prompts = torch.randint(0, vocab, (rows, 32), generator=g)
    sp = SamplingParams(temperature=0.0, max_new_tokens=opts.new_tokens, ignore_eos=True)
    engine.generate(prompts[:, :8].tolist(), SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True))
    _sync(dev)
    t0 = time.perf_counter()
    batch = engine.generate(prompts.tolist(), sp)
    _sync(dev)
    eng_s = time.perf_counter() - t0
    st = batch.stats
    kwargs = dict(max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=prompts[:, :8].to(dev), max_new_tokens=2, do_sample=False, pad_token_id=0)
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(input_ids=prompts.to(dev), **kwargs)
        _sync(dev)
    hf_s = time.perf_counter() - t0
    decode_s = st.total_s - st.prefill_s
    return {
        "rows": rows,
        "engine_tok_s": rows * opts.new_tokens / eng_s,
        "hf_generate_tok_s": rows * opts.new_tokens / hf_s,
        "step_ms": decode_s * 1e3 / max(1, st.num_steps),
        "forward_ms_per_step": st.forward_s * 1e3 / max(1, st.num_steps),
        "outside_forward_share": (decode_s - st.forward_s) / decode_s if decode_s > 0 else float("nan"),
    }


def run(opts: GpuCostOptions) -> dict:
    _source_layout()
    from atlas_rl.rollout import RolloutEngine

    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = TINY_SHAPES if opts.tiny else {k: SHAPES[k] for k in opts.shapes}
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype)}
    report["torch"], report["shapes"] = torch.__version__, {}
    for name, shape in shapes.items():
        logger.info("shape %s %s", name, shape)
        model = build_model(shape, dtype, dev)
        engine = RolloutEngine(model, eos_token_ids=[])
        entry = {"shape": shape, **cost_table(engine, opts)}
        entry["decode"] = [decode_speed(model, engine, r, opts) for r in ((1, 4) if opts.tiny else (1, 16, 64, 256))]
        report["shapes"][name] = entry
        del engine, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_costs.json").write_text(json.dumps(report, indent=1))
    (out / "gpu_costs.md").write_text(render_markdown(report, opts))
    return report


def render_markdown(report: dict, opts: GpuCostOptions) -> str:
    lines = [f"# engine costs on {report['device']} ({report['dtype']}, torch {report['torch']})", ""]
    for name, e in report["shapes"].items():
        fm, ch = e["forward_ms"], e["chain_ms"]
        lines += [f"## {name} {e['shape']}", "", "forward ms (x chain of rows x tokens columns), context 128", ""]
        lines += [
            "| rows \\ tokens | " + " | ".join(map(str, opts.tokens)) + " |",
            "|---" * (len(opts.tokens) + 1) + "|",
        ]
        for r in opts.rows:
            cells = [f"{fm[f'{r}x{t}']:.2f} ({fm[f'{r}x{t}'] / ch[str(r * t)]:.2f}x)" for t in opts.tokens]
            lines.append(f"| {r} | " + " | ".join(cells) + " |")
        lines += ["", "| rows | engine k=0 tok/s | HF generate tok/s | step ms | forward ms | outside forward |"]
        lines.append("|---|---|---|---|---|---|")
        for d in e["decode"]:
            lines.append(
                f"| {d['rows']} | {d['engine_tok_s']:.1f} | {d['hf_generate_tok_s']:.1f} | {d['step_ms']:.2f} | "
                f"{d['forward_ms_per_step']:.2f} | {d['outside_forward_share']:.0%} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="Output folder (gpu_costs.json, gpu_costs.md).")
    p.add_argument("--tiny", action="store_true", help="A tiny model, few cells: a CPU smoke run in seconds.")
    p.add_argument("--device", default=None, help="Device (default cuda when available, else cpu).")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"Comma-separated shapes of {list(SHAPES)}.")
    p.add_argument("--repeats", type=int, default=5, help="Interleaved repeats of the cost table (medians).")
    p.add_argument("--new-tokens", type=int, default=64, help="New tokens per row in the decode-speed runs.")
    a = p.parse_args(argv)
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; choose from {list(SHAPES)}")
    opts = GpuCostOptions(a.out, a.tiny, a.device, tuple(a.shapes.split(",")), a.repeats, a.new_tokens)
    report = run(opts)
    sys.stdout.write(render_markdown(report, opts) + "\n")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main(sys.argv[1:]))
