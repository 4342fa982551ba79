"""The workload-shift scenario: windows of traffic in a format the static head never saw, the adaptive head
retrained between windows, every configuration benched on the same held-out requests at every window.

At every window w = 0 .. ``windows`` (w = 0: before any adaptation):

1. **bench** — for each temperature and number of active rows: the held-out requests in batches of ``rows``,
   the configurations of :data:`~.options.CONFIGS` interleaved and repeated: ``none`` (k=0, the ratio baseline),
   ``static`` / ``suffix`` / ``adaptive`` each alone at fixed ``k``, and ``default`` — the production engine (the
   auto controller over all three: it moves to a speculator as its calibrated acceptance earns it, and away when
   it degrades). Reported: τ, tokens/s, the share of drafts per speculator.
2. **traffic** (w < ``windows``) — the window's fresh requests (T=1) through the production engine with the
   capture hook feeding the adaptive head's buffer (tagged with the window as its version: the newest preferred).
   The production engine persists across windows, as a trainer's does: its controller keeps what it learned about
   each speculator, its suffix index the earlier traffic. The bench's ``default`` runs a fresh engine that starts
   from copies of that state (the held-out requests never enter the production engine's suffix history).
3. **retraining** — the production trainer (:class:`~atlas_rl.training.online.OnlineSpeculatorTrainer`, the head
   as production builds it: warm-started from the static head) for ``adaptive_share`` of the traffic rollout's
   wall time (at least ``adaptive_min_s``, as production), then published: the head serves the next window.
   ``inject_bad_head`` corrupts it after that window.

``model="tiny"``: a tiny random Llama with a random static head — a smoke test of the pipeline in seconds.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from atlas_rl.config import EngineConfig
from atlas_rl.rollout.build import build_engine, build_speculators
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
from atlas_rl.training.online import OnlineSpeculatorTrainer
from atlas_rl.types import SamplingParams

from ..common import BenchRun, start_run
from ..grid import auto_controller, calibrate
from ..harness import ConfigSummary, engine_runner, run_interleaved
from ..workloads import Workload
from .options import AdaptOptions
from .report import render_adapt_markdown, speed_svg
from .tau_check import capture_rollouts, estimated_tau, measured_tau, paired_ratio
from .traffic import ticket_prompts

logger = logging.getLogger(__name__)

__all__ = ["run_adapt"]


@dataclass
class _State:
    opts: AdaptOptions
    run: BenchRun
    static: DraftHead
    adaptive: DraftHead
    buffer: CaptureBuffer
    trainer: OnlineSpeculatorTrainer
    cost: Any  # the calibrated verification cost (a fresh copy per default engine)
    bench: list[list[int]]
    check: list[list[int]]  # held-out requests of the T=1 τ check (tau_check.py)
    estimate: list[Any]  # captured T=1 target rollouts the closed-form estimate replays
    prod: Any = None  # the production engine: serves the traffic, persists across windows


def _load_tiny(opts: AdaptOptions, command: str) -> tuple[BenchRun, DraftHead]:
    from pathlib import Path

    from atlas_rl.bench.common import header
    from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
    from atlas_rl.speculators.draft_head import DraftHeadConfig

    tok = tiny_tokenizer()
    model = tiny_llama(
        vocab_size=len(tok), hidden_size=64, num_layers=2, max_position_embeddings=2048, seed=opts.seed,
        **tiny_token_ids(tok),
    )  # fmt: skip
    cfg = DraftHeadConfig.from_target(model, fuse_layers=(1, 2), intermediate_size=128, draft_vocab_size=len(tok))
    static = DraftHead(cfg)
    static.bind_target(model, init_lm_head=True)
    Path(opts.out_dir).mkdir(parents=True, exist_ok=True)
    report = header(opts, model, command) | {"scenario": "adapt", "model": "tiny random Llama", "windows": []}
    return BenchRun(Path(opts.out_dir), model, tok, [tok.eos_token_id], report), static


def _setup(opts: AdaptOptions, command: str) -> _State:
    if opts.model == "tiny":
        run, static = _load_tiny(opts, command)
    else:
        run = start_run(opts, command, scenario="adapt", windows=[])
        static = build_speculators(run.model, ["static"]).static_head
    # the adaptive head and its trainer exactly as production builds them (warm start from the static head)
    adaptive = build_speculators(run.model, ["adaptive"], static_head=static, seed=opts.seed).adaptive_head
    buffer = CaptureBuffer(CaptureBufferConfig(fuse_layers=tuple(adaptive.config.fuse_layers)))
    trainer = OnlineSpeculatorTrainer(adaptive, buffer)
    cost, run.report["verification_cost"] = calibrate(run.model, run.eos, opts.k)
    bench = ticket_prompts(run.tokenizer, opts.bench_prompts, seed=f"bench:{opts.seed}")
    check = ticket_prompts(run.tokenizer, opts.check_prompts, seed=f"check:{opts.seed}")
    estimate = _capture_estimate_set(run, opts, tuple(adaptive.config.fuse_layers))
    heads = {"static": static, "adaptive": adaptive}
    run.report["head_parameters"] = {n: sum(p.numel() for p in h.parameters()) for n, h in heads.items()}
    st = _State(opts, run, static, adaptive, buffer, trainer, cost, bench, check, estimate)
    st.prod = _engine(st, "default")
    return st


def _capture_estimate_set(run: BenchRun, opts: AdaptOptions, fuse_layers: tuple[int, ...]) -> list[Any]:
    """The target's own T=1 rollouts of held-out requests, captured once for the closed-form τ estimate (the
    workload shift never changes the target); none without the shift part."""
    if not opts.estimate_prompts or "shift" not in opts.parts:
        return []
    sp = SamplingParams(temperature=1.0, max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    prompts = ticket_prompts(run.tokenizer, opts.estimate_prompts, seed=f"estimate:{opts.seed}")
    return capture_rollouts(run.model, run.eos, prompts, fuse_layers, sp)


def _engine(st: _State, config: str) -> Any:
    """A fresh engine of one configuration (fresh speculator state; the heads are shared)."""
    m, k = st.run.model, st.opts.k
    if config == "none":
        return build_engine(m, eos_token_ids=st.run.eos)
    names = ["static", "adaptive", "suffix"] if config == "default" else [config]
    # alone, the adaptive head draws from the static head's random stream (build_speculators gives it seed + 1):
    # an exact copy then drafts exactly as the static head, so the ratio measures the training, not the dice
    seed = st.opts.seed - 1 if config == "adaptive" else st.opts.seed
    specs = build_speculators(m, names, static_head=st.static, adaptive_head=st.adaptive, seed=seed)
    if config != "default":
        return build_engine(m, specs.speculators, k=k, controller="fixed", eos_token_ids=st.run.eos)
    ctl = auto_controller(st.cost, k)
    if st.prod is not None:  # the production engine's learned state, copied (module docstring)
        ctl = copy.deepcopy(st.prod.controller)
        i = next(i for i, sp in enumerate(specs.speculators) if sp.name == "suffix")
        specs.speculators[i] = copy.deepcopy(st.prod.speculators["suffix"])
    return RolloutEngine(m, speculators=specs.speculators, eos_token_ids=st.run.eos, controller=ctl,
                         config=EngineConfig(num_speculative_tokens=k))  # fmt: skip


def _bench_cell(st: _State, rows: int, temperature: float) -> dict[str, Any]:
    """Every configuration on the held-out requests in batches of ``rows`` (interleaved, repeated)."""
    from .options import CONFIGS

    runners = {c: engine_runner(lambda c=c: _engine(st, c)) for c in CONFIGS}
    merged: dict[str, list[ConfigSummary]] = {c: [] for c in CONFIGS}
    for i in range(0, len(st.bench) - rows + 1, rows):
        sp = SamplingParams(temperature=temperature, max_new_tokens=st.opts.max_new_tokens, seed=st.opts.seed + i)
        w = Workload(name=f"b{i}", description="", prompt_ids=st.bench[i : i + rows], num_generations=1, sampling=sp)
        for c, s in run_interleaved(w, runners, repeats=st.opts.repeats).items():
            merged[c].append(s)
    return {c: _summary(ss) for c, ss in merged.items()}


def _tau_check(st: _State) -> dict[str, Any]:
    """Static alone vs adaptive alone at T=1 on the check requests (measured, paired bootstrap) and the
    closed-form estimate of both on the captured target rollouts (:mod:`.tau_check`)."""
    o = st.opts
    out: dict[str, Any] = {}
    if st.check:
        sp = SamplingParams(temperature=1.0, max_new_tokens=o.max_new_tokens, seed=o.seed + 10_000)
        m = measured_tau(lambda h: _engine(st, h), ("static", "adaptive"), st.check, o.check_rows, sp)
        out["measured"] = paired_ratio(m["adaptive"], m["static"], seed=o.seed)
    if st.estimate:
        (ts, n), (ta, _) = (estimated_tau(h, st.estimate, o.k) for h in (st.static, st.adaptive))
        out["estimated"] = {"tau_static": ts, "tau_adaptive": ta, "ratio": ta / ts if ts else math.nan,
                            "positions": n}  # fmt: skip
    return out


def _summary(parts: list[ConfigSummary]) -> dict[str, Any]:
    """Tokens/s (total tokens over total seconds), τ and draft shares over all batches and repeats."""
    merged = ConfigSummary(parts[0].config, "all", runs=[r for s in parts for r in s.runs])
    runs = merged.runs
    stats = [r.stats for r in runs if r.stats is not None]
    drafts: dict[str, int] = {}
    for s in stats:
        for name, ss in s.per_speculator.items():
            drafts[name] = drafts.get(name, 0) + ss.num_drafts
    total = sum(drafts.values())
    return {
        "tokens_per_s": sum(r.completion_tokens for r in runs) / max(sum(r.seconds for r in runs), 1e-9),
        "tau": merged.mean_acceptance_length,
        "draft_share": {n: d / total for n, d in drafts.items()} if total else {},
    }


def _traffic_and_retrain(st: _State, w: int) -> dict[str, Any]:
    """Window ``w``'s traffic through the default engine, captured; then retraining within the budget."""
    o = st.opts
    prompts = ticket_prompts(st.run.tokenizer, o.traffic_prompts, seed=f"traffic:{o.seed}:{w}")
    eng = st.prod
    if w > 0:
        eng.update_weights(None, version=w)  # the buffer tags the window's samples as its version
    handle = st.buffer.attach(eng)
    rb = eng.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=o.max_new_tokens, seed=o.seed + w))
    handle.remove()
    st.buffer.flush()
    rollout_s = rb.stats.total_s
    t0 = time.perf_counter()
    m = st.trainer.step(time_budget_s=max(o.adaptive_min_s, o.adaptive_share * rollout_s))  # as production
    st.trainer.publish()
    train_s = time.perf_counter() - t0
    out = {"rollout_s": rollout_s, "tau": rb.stats.mean_acceptance_length, "tokens": rb.num_completion_tokens,
           "train_s": train_s, "train_share": train_s / rollout_s, "steps": m["call_steps"],
           "loss": m["call_loss"], "staleness": m["staleness"], "capture_hook_s": st.buffer.hook_s,
           "published": st.trainer.last_guard.get("published", 1.0)}  # fmt: skip
    if o.inject_bad_head == w:
        _corrupt(st.adaptive)
        out["injected_bad_head"] = True
    return out


def _corrupt(head: DraftHead) -> None:
    """A collapsed retraining: every trained weight of the serving head buried under noise 4x its mean size."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype), alpha=float(p.abs().mean()) * 4)


def _fresh_target(opts: AdaptOptions, command: str) -> tuple[torch.nn.Module, Any]:
    if opts.model == "tiny":
        run = _load_tiny(opts, command)[0]
        return run.model, run.tokenizer
    from ..common import load_model

    return load_model(opts.model)


def run_adapt(opts: AdaptOptions, command: str = "atlas-rl bench --scenario adapt") -> dict:
    """Run the scenario's parts (module docstring; the policy part: :mod:`.specialise`); writes ``adapt.json``
    after every window and step, then ``adapt.md`` and ``adapt.svg`` (speed over windows)."""
    st = _setup(opts, command)
    if "shift" in opts.parts:
        for w in range(opts.windows + 1):
            row: dict[str, Any] = {"window": w, "cells": {}}
            for t in opts.temperatures:
                for rows in opts.rows:
                    cell = {"rows": rows, "temperature": t, **_bench_cell(st, rows, t)}
                    row["cells"][f"rows{rows}_T{t:g}"] = cell
            row["tau_check"] = _tau_check(st)
            if w < opts.windows:
                row["traffic"] = _traffic_and_retrain(st, w)
            st.run.report["windows"].append(row)
            logger.info("adapt window %d done", w)
            st.run.write("adapt")
        (st.run.out_dir / "adapt.svg").write_text(speed_svg(st.run.report))
    if "policy" in opts.parts:
        from .specialise import run_specialise

        model, tok = _fresh_target(opts, command)  # the GRPO run trains it
        st.run.report["policy"] = run_specialise(model, tok, opts, opts.out_dir)
    st.run.write("adapt", render_adapt_markdown)
    return st.run.report
