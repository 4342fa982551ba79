"""The engine's costs on an accelerator, for models of real shapes with random weights (no checkpoint needed).

For each shape (SmolLM2-135M, a ~1B Llama, a ~7B Qwen2; built from their configs with random weights, bf16 on a
GPU): the verification cost table (one engine forward, rows x tokens per row, context 128) next to the weight-
streaming chain of the same column count, the engine's k=0 decoding speed against HF ``generate`` (same random
prompts, EOS ignored), the engine's per-step time outside the target forward, and whole speculating steps (a draft
head of the target's shape at fixed k, T=0 and T=1) with their parts. A random head's drafts are rejected, so those
steps give what a step costs, not what it yields; :mod:`atlas_rl.bench.gpu_projection` combines them with the mean
acceptance length measured on the CPU per regime into the projected speed-up on that device.

Run (the image needs PyTorch and transformers only)::

    python -m atlas_rl.bench.gpu_costs --out runs/gpu           # on a GPU machine
    python -m atlas_rl.bench.gpu_costs --out runs/gpu_tiny --tiny   # a small CPU smoke run (seconds)

Every section's result is written as soon as it is measured, and a section that fails is logged with its
traceback and recorded as an error, so one failure (or ``--deadline-s``) costs only what it did not measure. From a
source checkout that is not pip-installed, run it from the repository root: it maps ``atlas_rl.rollout`` onto
``rollout/`` itself (see :func:`_source_layout`).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import time
import traceback
from collections.abc import Callable
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
DECODE_ROWS = (1, 16, 64, 256)
SPEC_ROWS = (1, 4, 16, 64, 256)
SPEC_KS = (0, 2, 4)  # draft lengths of the speculating-step cells; k=0 is plain decoding
# (k, CUDA graphs) of the speculating-step cells: every k with graphs, and k=0 and k=2 eager beside them
SPEC_CONFIGS = tuple((k, True) for k in SPEC_KS) + ((0, False), (2, False))
TEMPERATURES = (0.0, 1.0)
SECTIONS = ("first", "costs", "decode", "spec", "profile", "outputs", "default")
FIRST_ROWS = (1, 16)  # row counts of the first-call section


@dataclass
class GpuCostOptions:
    out: str
    tiny: bool = False
    device: str | None = None
    shapes: tuple[str, ...] = tuple(SHAPES)
    repeats: int = 5
    new_tokens: int = 64
    spec_tokens: int = 32
    deadline_s: float = float("inf")
    sections: tuple[str, ...] = SECTIONS
    spec_rows_override: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.new_tokens < 2 or self.spec_tokens < 2:
            raise ValueError("repeats must be >= 1, new_tokens and spec_tokens >= 2")
        if not self.deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {self.deadline_s}")
        if any(r < 1 for r in self.spec_rows_override):
            raise ValueError(f"spec rows must be >= 1, got {self.spec_rows_override}")
        if not self.sections or set(self.sections) - set(SECTIONS):
            raise ValueError(f"sections must be among {SECTIONS}, got {self.sections}")

    @property
    def rows(self) -> tuple[int, ...]:
        return (1, 4) if self.tiny else ROWS

    @property
    def tokens(self) -> tuple[int, ...]:
        return (1, 2, 3) if self.tiny else TOKENS

    @property
    def decode_rows(self) -> tuple[int, ...]:
        return (1, 4) if self.tiny else DECODE_ROWS

    @property
    def spec_rows(self) -> tuple[int, ...]:
        return self.spec_rows_override or ((1, 4) if self.tiny else SPEC_ROWS)


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
    """A randomly initialised causal LM of ``shape`` (see :data:`SHAPES`) in ``dtype`` on ``device`` (built in
    ``dtype``: a 7B model is never materialised in float32)."""
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
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the dtype keyword of from_config differs across transformers releases
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg)
    finally:
        torch.set_default_dtype(before)
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


def _prompts(rows: int, vocab: int) -> torch.Tensor:  # [rows, 32] random token ids
    return torch.randint(0, vocab, (rows, 32), generator=torch.Generator().manual_seed(rows))


def _step_parts(stats, rows: int) -> dict:
    """Per decode step (ms) of one call's stats: the whole step and its timed parts, and tau."""
    steps = max(1, stats.num_steps)
    decode_s = stats.total_s - stats.prefill_s
    parts = {p: getattr(stats, f"{p}_s") * 1e3 / steps for p in ("forward", "propose", "verify", "plan")}
    return {
        "rows": rows,
        "step_ms": decode_s * 1e3 / steps,
        **{f"{p}_ms": v for p, v in parts.items()},
        "other_ms": decode_s * 1e3 / steps - sum(parts.values()),
        "tau": stats.mean_acceptance_length,
    }


def _timed_generate(engine, prompts: list[list[int]], sp) -> tuple[float, object]:
    """(seconds, stats) of one ``generate`` call, synchronised on both ends."""
    _sync(engine.device)
    t0 = time.perf_counter()
    batch = engine.generate(prompts, sp)
    _sync(engine.device)
    return time.perf_counter() - t0, batch.stats


def decode_speed(model, engine, rows: int, opts: GpuCostOptions, eager=None) -> dict:
    """Engine k=0 vs HF ``generate`` (greedy, ``new_tokens`` each, EOS ignored) on ``rows`` random prompts; with
    ``eager`` (the same engine without CUDA graphs) beside it."""
    from atlas_rl.types import SamplingParams

    dev = engine.device
    prompts = _prompts(rows, engine.vocab_size)
    sp = SamplingParams(temperature=0.0, max_new_tokens=opts.new_tokens, ignore_eos=True)
    warm = SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True)
    engines = {"engine": engine} if eager is None else {"engine": engine, "eager": eager}
    timed = {}
    for name, eng in engines.items():
        eng.generate(prompts[:, :8].tolist(), warm)
        eng.generate(prompts.tolist(), warm)  # every decode shape of the timed call seen (graphs captured) once
        timed[name] = _timed_generate(eng, prompts.tolist(), sp)
    kwargs = dict(max_new_tokens=opts.new_tokens, min_new_tokens=opts.new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(input_ids=prompts[:, :8].to(dev), max_new_tokens=2, do_sample=False, pad_token_id=0)
        _sync(dev)
        t0 = time.perf_counter()
        model.generate(input_ids=prompts.to(dev), **kwargs)
        _sync(dev)
    hf_s = time.perf_counter() - t0
    parts = _step_parts(timed["engine"][1], rows)
    step, fwd = parts["step_ms"], parts["forward_ms"]
    out = {
        "rows": rows,
        "engine_tok_s": rows * opts.new_tokens / timed["engine"][0],
        "hf_generate_tok_s": rows * opts.new_tokens / hf_s,
        "step_ms": step,
        "forward_ms_per_step": fwd,
        "outside_forward_share": (step - fwd) / step if step > 0 else float("nan"),
        "graphs": engine.captures_graphs,
    }
    if eager is not None:
        out["eager_tok_s"] = rows * opts.new_tokens / timed["eager"][0]
        out["eager_step_ms"] = _step_parts(timed["eager"][1], rows)["step_ms"]
    return out


def first_calls(model, opts: GpuCostOptions) -> list[dict]:
    """A fresh k=0 engine's first and second greedy call on prompts of a length no other section uses (every
    decode shape new in the first call), for each row count of :data:`FIRST_ROWS` (``(1,)`` with ``--tiny``),
    with decode attention as this engine dispatches it (cuDNN left out) and as it did before (cuDNN allowed, run
    second): the per-shape plan cost of ``docs/decisions/cuda_attention_backends.md``, ms a decode step."""
    from atlas_rl import attention_backends as ab
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.types import SamplingParams

    sp = SamplingParams(temperature=0.0, max_new_tokens=opts.spec_tokens, ignore_eos=True)
    out = []
    for cudnn in (False, True):
        for rows in (1,) if opts.tiny else FIRST_ROWS:
            before = ab.DECODE_BACKENDS
            if cudnn:
                ab.DECODE_BACKENDS = (*before, ab.SDPBackend.CUDNN_ATTENTION)
            try:
                engine = RolloutEngine(model, eos_token_ids=[])
                g = torch.Generator().manual_seed(rows)
                prompts = torch.randint(0, engine.vocab_size, (rows, 48 + 8 * cudnn), generator=g).tolist()
                steps = [_step_parts(engine.generate(prompts, sp).stats, rows)["step_ms"] for _ in range(2)]
            finally:
                ab.DECODE_BACKENDS = before
            out.append({"rows": rows, "cudnn": cudnn, "first_step_ms": steps[0], "second_step_ms": steps[1]})
    return out


def _spec_engine(model, k: int, graphs: bool = True):
    """An engine that drafts ``k`` tokens per row at every step with a (random) draft head of the target's shape
    (``k=0``: plain decoding), its forwards replayed from CUDA graphs or not."""
    from atlas_rl.config import EngineConfig
    from atlas_rl.controller import FixedController
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.rollout.build import build_speculators

    specs = build_speculators(model, ["adaptive"]).speculators if k else []
    config = EngineConfig(cuda_graphs=graphs)
    return RolloutEngine(model, speculators=specs, controller=FixedController(k), eos_token_ids=[], config=config)


def graph_counts(engine) -> dict[str, int]:
    """Captures and replays so far of the engine's forward graphs and of its draft heads' graphs together (0 where
    none), and the forward's captures alone: :func:`~atlas_rl.bench.gpu_checks.graph_stats` summed."""
    from atlas_rl.bench.gpu_checks import graph_stats

    stats = graph_stats(engine)
    owners = [o for o in (stats["forward"], *stats["heads"].values()) if o is not None]
    return {
        "captures": sum(o["captures"] for o in owners),
        "replays": sum(o["replays"] for o in owners),
        "target_captures": stats["forward"]["captures"] if stats["forward"] is not None else 0,
    }


def spec_cell(model, rows: int, temperature: float, opts: GpuCostOptions) -> list[dict]:
    """Plain and speculating engines (``SPEC_CONFIGS``) side by side on the same ``rows`` prompts, ``spec_tokens``
    new tokens each, ``repeats`` interleaved rounds: per configuration, the parts of the call with the median step
    time, and whether its forwards replayed graphs."""
    from atlas_rl.types import SamplingParams

    engines = {c: _spec_engine(model, *c) for c in SPEC_CONFIGS}
    prompts = _prompts(rows, model.get_output_embeddings().weight.shape[0]).tolist()
    warm = SamplingParams(temperature=temperature, max_new_tokens=4, ignore_eos=True)
    sp = SamplingParams(temperature=temperature, max_new_tokens=opts.spec_tokens, ignore_eos=True)
    runs: dict[tuple[int, bool], list[dict]] = {c: [] for c in SPEC_CONFIGS}
    for eng in engines.values():
        eng.generate([p[:8] for p in prompts], warm)
        eng.generate(prompts, sp)  # the timed calls' shapes seen once (their graphs captured)
    before = {c: graph_counts(eng) for c, eng in engines.items()}
    for _ in range(opts.repeats):
        for c, eng in engines.items():
            _sync(eng.device)
            runs[c].append(_step_parts(eng.generate(prompts, sp).stats, rows))
    out = []
    for (k, graphs), calls in runs.items():
        mid = sorted(calls, key=lambda d: d["step_ms"])[(len(calls) - 1) // 2]
        replayed = engines[(k, graphs)].captures_graphs
        row = {"k": k, "graphs_requested": graphs, "graphs": replayed, "temperature": temperature, **mid}
        after = graph_counts(engines[(k, graphs)])
        row["timed_graph_counts"] = {n: after[n] - before[(k, graphs)][n] for n in after}  # captures in timed calls
        out.append({**row, "step_ms_all": [d["step_ms"] for d in calls]})
    return out


PROFILE_ROWS, PROFILE_K = 4, 2  # the profiled speculating cell (T=1): where its eager verification time goes


def _top_ops(prof, key: str, count: int = 25) -> list[dict]:
    """The ``count`` ops of a finished profiler with the most ``key`` time: name, calls, self CPU ms, device ms."""
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:count]
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3,
        }
        for e in events
    ]


def profile_cell(model, opts: GpuCostOptions) -> dict:
    """``torch.profiler`` over one warm T=1 call of plain decoding and of k=2 drafting at 4 rows (graphs on): the
    ops with the most host time and the most device time, and the number of ops each call launched."""
    from torch.profiler import ProfilerActivity, profile

    from atlas_rl.types import SamplingParams

    prompts = _prompts(PROFILE_ROWS, model.get_output_embeddings().weight.shape[0]).tolist()
    sp = SamplingParams(temperature=1.0, max_new_tokens=opts.spec_tokens, ignore_eos=True, seed=0)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    out = {}
    for k in (0, PROFILE_K):
        eng = _spec_engine(model, k)
        for _ in range(2):  # the target samples the same tokens each call (seeded); the draft head's own sampler
            eng.generate(prompts, sp)  # is not reseeded, so a drafting call may still meet (and capture) new shapes
        _sync(eng.device)
        before = graph_counts(eng)
        with profile(activities=acts) as prof:
            stats = eng.generate(prompts, sp).stats
            _sync(eng.device)
        steps = max(1, stats.num_steps)
        out[f"k{k}"] = {
            "steps": stats.num_steps,
            "ops_per_step": sum(e.count for e in prof.key_averages()) / steps,
            "by_host": _top_ops(prof, "self_cpu_time_total"),
            "by_device": _top_ops(prof, "self_device_time_total"),
            "graph_counts": {n: v - before[n] for n, v in graph_counts(eng).items()},  # in the profiled call
        }
    return out


class Recorder:
    """Runs named sections, keeps their results (or their errors) and writes the report after each one."""

    def __init__(self, opts: GpuCostOptions, report: dict) -> None:
        self.opts, self.report, self.t0 = opts, report, time.perf_counter()
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def section(self, entry: dict, key: str, fn: Callable[[], object]) -> None:
        if time.perf_counter() - self.t0 > self.opts.deadline_s:
            entry.setdefault("skipped", []).append(key)
            logger.warning("deadline passed: %s skipped", key)
            return
        t = time.perf_counter()
        try:
            entry[key] = fn()
        except Exception as exc:  # noqa: BLE001 - recorded, and the other sections still run
            logger.error("%s failed:\n%s", key, traceback.format_exc())
            entry.setdefault("errors", {})[key] = f"{type(exc).__name__}: {exc}"
        logger.info("%s: %.1f s", key, time.perf_counter() - t)
        self.write()

    def write(self) -> None:
        (self.out / "gpu_costs.json").write_text(json.dumps(self.report, indent=1))
        (self.out / "gpu_costs.md").write_text(render_markdown(self.report, self.opts))


def _measure_shape(rec: Recorder, name: str, shape: tuple, dev: torch.device, dtype: torch.dtype) -> None:
    from atlas_rl.config import EngineConfig
    from atlas_rl.rollout import RolloutEngine

    opts = rec.opts
    logger.info("shape %s %s", name, shape)
    entry: dict = {"shape": shape}
    rec.report["shapes"][name] = entry
    model = build_model(shape, dtype, dev)
    engine = RolloutEngine(model, eos_token_ids=[])
    eager = RolloutEngine(model, eos_token_ids=[], config=EngineConfig(cuda_graphs=False))
    if "first" in opts.sections:  # before every other section: its decode shapes must be new
        rec.section(entry, "first", lambda: first_calls(model, opts))
    if "costs" in opts.sections:
        rec.section(entry, "costs", lambda: cost_table(engine, opts))
    if "decode" in opts.sections:
        rec.section(entry, "decode", lambda: [decode_speed(model, engine, r, opts, eager) for r in opts.decode_rows])
    if engine._graphs is not None and engine._graphs.failed:
        entry["graph_failure"] = engine._graphs.failed
    for temp in TEMPERATURES if "spec" in opts.sections else ():
        for r in opts.spec_rows:
            rec.section(entry, f"spec_T{temp:g}_r{r}", lambda r=r, temp=temp: spec_cell(model, r, temp, opts))
    if "profile" in opts.sections:
        rec.section(entry, "profile", lambda: profile_cell(model, opts))
    _measure_checks(rec, entry, model)


def _measure_checks(rec: Recorder, entry: dict, model: torch.nn.Module) -> None:
    """The ``outputs`` and ``default`` sections (:mod:`atlas_rl.bench.gpu_checks`)."""
    from atlas_rl.bench import gpu_checks as gc_

    opts = rec.opts
    if "outputs" in opts.sections:
        rows = (1, 3) if opts.tiny else gc_.OUTPUT_ROWS
        rec.section(entry, "outputs", lambda: [gc_.output_check(model, r, opts.spec_tokens) for r in rows])
    if "default" in opts.sections:
        rows = (1,) if opts.tiny else gc_.DEFAULT_ROWS
        fn = gc_.default_vs_plain
        rec.section(entry, "default", lambda: [fn(model, r, opts.new_tokens, min(opts.repeats, 2)) for r in rows])


def run(opts: GpuCostOptions) -> dict:
    _source_layout()
    dev = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    shapes = TINY_SHAPES if opts.tiny else {k: SHAPES[k] for k in opts.shapes}
    report: dict = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": str(dtype)}
    report["torch"], report["shapes"] = torch.__version__, {}
    rec = Recorder(opts, report)
    for name, shape in shapes.items():
        _measure_shape(rec, name, shape, dev, dtype)
        gc.collect()  # the shape's model goes before the next one is built
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rec.write()
    return report


def _cost_lines(e: dict, opts: GpuCostOptions) -> list[str]:
    fm, ch = e["costs"]["forward_ms"], e["costs"]["chain_ms"]
    lines = ["forward ms (x chain of rows x tokens columns), context 128", ""]
    lines += ["| rows \\ tokens | " + " | ".join(map(str, opts.tokens)) + " |", "|---" * (len(opts.tokens) + 1) + "|"]
    for r in opts.rows:
        cells = [f"{fm[f'{r}x{t}']:.2f} ({fm[f'{r}x{t}'] / ch[str(r * t)]:.2f}x)" for t in opts.tokens]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    return lines + [""]


def _decode_lines(e: dict) -> list[str]:
    lines = [
        "| rows | engine k=0 tok/s | eager k=0 tok/s | HF generate tok/s | step ms | eager step ms | forward ms "
        "| outside forward |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|")
    for d in e["decode"]:
        eager = f"{d['eager_tok_s']:.1f} | " if "eager_tok_s" in d else "- | "
        eager_step = f"{d['eager_step_ms']:.2f} | " if "eager_step_ms" in d else "- | "
        lines.append(
            f"| {d['rows']} | {d['engine_tok_s']:.1f} | {eager}{d['hf_generate_tok_s']:.1f} | {d['step_ms']:.2f} | "
            f"{eager_step}{d['forward_ms_per_step']:.2f} | {d['outside_forward_share']:.0%} |"
        )
    return lines + [""]


def spec_runs(entry: dict) -> list[dict]:
    """Every speculating-step result of a shape's entry (all cells, all k)."""
    return [d for key, v in entry.items() if key.startswith("spec_") and isinstance(v, list) for d in v]


def _first_lines(e: dict) -> list[str]:
    lines = ["first and second call of a fresh k=0 engine, greedy, ms a decode step", ""]
    lines += ["| rows | decode attention | first call | second call |", "|---|---|---|---|"]
    for d in e["first"]:
        which = "cuDNN allowed (before)" if d["cudnn"] else "cuDNN left out"
        lines.append(f"| {d['rows']} | {which} | {d['first_step_ms']:.2f} | {d['second_step_ms']:.2f} |")
    return lines + [""]


def _spec_lines(e: dict) -> list[str]:
    runs = spec_runs(e)
    if not runs:
        return []
    lines = ["per decode step, ms (random draft head of the target's shape, fixed k)", ""]
    lines += ["| T | k | graphs | rows | step | forward | propose | verify | plan | other |", "|---" * 10 + "|"]
    for d in sorted(runs, key=lambda d: (d["temperature"], d["rows"], not d.get("graphs", False), d["k"])):
        parts = " | ".join(f"{d[p]:.2f}" for p in ("step_ms", "forward_ms", "propose_ms", "verify_ms", "plan_ms"))
        graphs = "yes" if d.get("graphs") else "no"
        lines.append(f"| {d['temperature']:g} | {d['k']} | {graphs} | {d['rows']} | {parts} | {d['other_ms']:.2f} |")
    return lines + [""]


def _profile_lines(e: dict) -> list[str]:
    lines = [f"profiled T=1 call at {PROFILE_ROWS} rows, graphs on: the 10 ops with the most host time", ""]
    for name, p in e["profile"].items():
        lines += [f"{name}: {p['steps']} steps, {p['ops_per_step']:.0f} ops a step", ""]
        lines += ["| op | calls | self host ms | device ms |", "|---|---|---|---|"]
        for d in p["by_host"][:10]:
            lines.append(f"| {d['op']} | {d['calls']} | {d['self_cpu_ms']:.2f} | {d['device_ms']:.2f} |")
        lines.append("")
    return lines


def render_markdown(report: dict, opts: GpuCostOptions) -> str:
    from atlas_rl.bench import gpu_checks as gc_

    lines = [f"# engine costs on {report['device']} ({report['dtype']}, torch {report['torch']})", ""]
    for name, e in report["shapes"].items():
        lines += [f"## {name} {e['shape']}", ""]
        lines += _first_lines(e) if "first" in e else []
        lines += _cost_lines(e, opts) if "costs" in e else []
        lines += _decode_lines(e) if "decode" in e else []
        lines += _spec_lines(e)
        lines += _profile_lines(e) if "profile" in e else []
        lines += gc_.outputs_lines(e) if "outputs" in e else []
        lines += gc_.default_lines(e) if "default" in e else []
        if e.get("graph_failure"):
            lines.append(f"- **CUDA graph capture failed** (eager forwards): {e['graph_failure']}")
        for key, err in e.get("errors", {}).items():
            lines.append(f"- **{key} failed**: {err}")
        if e.get("skipped"):
            lines.append(f"- skipped at the deadline: {', '.join(e['skipped'])}")
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
    p.add_argument("--spec-tokens", type=int, default=32, help="New tokens per row in the speculating-step runs.")
    p.add_argument("--deadline-s", type=float, default=float("inf"), help="Skip the sections left after this.")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"Comma-separated sections of {SECTIONS}.")
    p.add_argument(
        "--spec-rows", default="", help=f"Comma-separated row counts of the spec cells (default {SPEC_ROWS})."
    )
    a = p.parse_args(argv)
    bad = [s for s in a.shapes.split(",") if s not in SHAPES]
    if bad:
        p.error(f"unknown shapes {bad}; choose from {list(SHAPES)}")
    try:
        opts = GpuCostOptions(
            a.out,
            a.tiny,
            a.device,
            tuple(a.shapes.split(",")),
            a.repeats,
            a.new_tokens,
            a.spec_tokens,
            a.deadline_s,
            tuple(a.sections.split(",")),
            tuple(int(r) for r in a.spec_rows.split(",") if r),
        )
    except ValueError as exc:  # a bad number in --spec-rows too
        p.error(str(exc))
    report = run(opts)
    sys.stdout.write(render_markdown(report, opts) + "\n")
    return 1 if any(e.get("errors") for e in report["shapes"].values()) else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
