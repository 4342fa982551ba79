"""``atlas-rl bench --scenario policy-drift``: speculators while the policy drifts, version after version.

A sequence of ``num_versions`` policies (v0 = the unmodified target) is made by fine-tuning the target
progressively on a shifted domain, from corpora already on this machine: Python sources (the interpreter's
site-packages) drifting to C sources (``/usr/include`` headers and ``*.c`` files under ``/usr/share``). Stage v
(v = 1 .. V-1) continues the previous weights for ``finetune_steps`` AdamW steps whose batches hold a share
``v / (V-1)`` of C windows (the rest Python), so the last policy has been trained on C only.

At every version, in this order:

1. **bench** — the same workload (continuations of held-out C snippets, identical prompts and seeds at every
   version), interleaved, for five configurations: ``none`` (no speculation; the ratio baseline), ``static``,
   ``suffix``, ``adaptive`` (each alone at fixed k: ``FixedController(k)``) and ``static+adaptive+suffix``
   (``BestOfController(k)``: every speculator drafts k tokens, the draft with the largest expected accepted
   length is verified). Reported: mean acceptance length τ and tokens/s.
2. **RL rollout** — the version's training rollouts (fresh held-out C prompts every version, ``num_generations``
   samples each) with the production configuration (static+adaptive+suffix), the capture hook feeding the
   adaptive head's :class:`~atlas_rl.training.buffer.CaptureBuffer`: the data the head learns from is what the
   engine captured, no extra target forward.
3. **adaptive retraining** — :class:`~atlas_rl.training.online.OnlineSpeculatorTrainer` trains for a wall-time
   budget of ``adaptive_share`` (10%) of that RL rollout's wall time, then publishes; the head serves the next
   version (it always lags one policy version behind, as in RL). Its wall time as a share of the rollout is
   reported.
4. **policy update** — the next fine-tuning stage; the frozen output rows of both heads are re-copied from the
   updated target (the heads read the target's own rows; their trained weights do not change).

The static head: ``static_head`` (a path), else the head shipped for the target
(:func:`atlas_rl.speculators.defaults.load_static_speculator`), else (``static_fallback="quick"``) a quickly
trained one — self-distilled from the v0 target's answers to the broad prompt set (the static head's domain),
cached in ``$ATLAS_RL_CACHE/drift/`` — or none (``"skip"``: the static column is left out, and noted).

``model="tiny"`` runs the whole pipeline on a tiny random Llama with the byte-level
:func:`atlas_rl.models.tiny_tokenizer` (first pretrained
briefly on the Python corpus, so v0 is a "Python model"): a smoke test of the scenario in seconds.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from atlas_rl.jsonio import write_json
from atlas_rl.rollout.build import build_engine, build_speculators
from atlas_rl.rollout.engine import RolloutEngine
from atlas_rl.speculators.adaptive import rank_vocab_from_samples
from atlas_rl.speculators.adaptive import refresh_frozen_rows as _refresh_rows
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.buffer import CaptureBuffer
from atlas_rl.training.online import OnlineSpeculatorTrainer
from atlas_rl.types import SamplingParams

from ..common import EMBEDDED_NAME, device_label, load_model
from ..harness import ConfigSummary, engine_runner, run_interleaved
from ..workloads import Workload, chat_ids
from .corpora import Corpora, build_corpora, c_prompts, finetune_batch, snippet
from .heads import adaptive_head, coverage, static_head
from .options import CONFIGS, DriftOptions
from .policy import finetune, heldout_loss, pretrain_tiny
from .report import render_policy_drift_markdown, summary

logger = logging.getLogger(__name__)

__all__ = ["run_policy_drift"]


@dataclass
class _Drift:
    """Everything the versions share: the moving target, its data, the heads and the adaptive trainer."""

    opts: DriftOptions
    model: torch.nn.Module
    eos: list[int]
    corpora: Corpora
    static: DraftHead | None
    adaptive: DraftHead
    buffer: CaptureBuffer
    trainer: OnlineSpeculatorTrainer
    optimizer: torch.optim.Optimizer
    workload: Workload
    held_batch: torch.Tensor  # [4, seq] held-out C windows for the held-out loss


def _load(opts: DriftOptions) -> tuple[torch.nn.Module, Callable[[str], list[int]], list[int], list[list[int]]]:
    """The target, an ``encode`` function, the EOS ids, and the base prompts (the static head's domain)."""
    if opts.model == "tiny":
        from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer

        tok = tiny_tokenizer()
        model = tiny_llama(
            vocab_size=len(tok), hidden_size=64, num_layers=2, max_position_embeddings=1024, seed=0,
            **tiny_token_ids(tok),
        )  # fmt: skip
        return model, lambda text: list(tok(text, add_special_tokens=False)["input_ids"]), [tok.eos_token_id], []
    from atlas_rl.data.broad_prompts import broad_prompts

    model, tokenizer = load_model(opts.model)
    items = broad_prompts(seed=opts.seed)
    random.Random(opts.seed).shuffle(items)
    prompts = []
    for it in items[: opts.quick_static_prompts]:
        system = [{"role": "system", "content": it["system"]}] if "system" in it else []
        prompts.append(chat_ids(tokenizer, system + [{"role": "user", "content": it["prompt"]}]))

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return model, encode, list(RolloutEngine(model).eos_token_ids), prompts


def _configs(st: _Drift, version: int) -> dict[str, Callable[[], RolloutEngine]]:
    """Engine factories of the five configurations (fresh speculators per engine, shared heads)."""

    def factory(names: list[str], k: int) -> Callable[[], RolloutEngine]:
        def make() -> RolloutEngine:
            specs = build_speculators(
                st.model, names, static_head=st.static, adaptive_head=st.adaptive, seed=st.opts.seed
            ).speculators
            eng = build_engine(st.model, specs, k=k, controller="fixed", eos_token_ids=st.eos)
            if version > 0:
                eng.update_weights(None, version=version)
            return eng

        return make

    k = st.opts.k
    out = {"none": factory([], 0)}
    if st.static is not None:
        out["static"] = factory(["static"], k)
    out["suffix"] = factory(["suffix"], k)
    out["adaptive"] = factory(["adaptive"], k)
    out["static+adaptive+suffix"] = factory(
        ["static", "adaptive", "suffix"] if st.static else ["adaptive", "suffix"], k
    )
    return out


def _summaries(results: dict[str, ConfigSummary]) -> dict[str, dict[str, Any]]:
    base = results["none"].tokens_per_s
    out = {}
    for name, s in results.items():
        stats = [r.stats for r in s.runs if r.stats is not None]
        shares: dict[str, float] = {}  # which speculator's drafts were verified (share of drafts)
        drafts = sum(st.num_drafts for st in stats)
        for st in stats:
            for sp, ss in st.per_speculator.items():
                shares[sp] = shares.get(sp, 0.0) + (ss.num_drafts / drafts if drafts else math.nan)
        out[name] = {
            "tau": s.mean_acceptance_length,
            "tokens_per_s": s.tokens_per_s,
            "ratio_vs_none": s.tokens_per_s / base if base else math.nan,
            "seconds": sum(r.seconds for r in s.runs),
            "completion_tokens": sum(r.completion_tokens for r in s.runs),
            "draft_share": shares,
        }
    return out


def run_policy_drift(opts: DriftOptions, command: str = "atlas-rl bench --scenario policy-drift") -> dict:
    """Run the policy-drift scenario (module docstring); writes ``policy_drift.json`` and ``policy_drift.md``."""
    t_start = time.perf_counter()
    out_dir = Path(opts.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        st, report = _setup(opts, command)
        for v in range(opts.num_versions):
            report["versions"].append(_version(st, v))
            write_json(out_dir / "policy_drift.json", report)
    finally:
        torch.set_num_threads(threads_before)
    report["summary"] = summary(report)
    report["wall_s"] = time.perf_counter() - t_start
    write_json(out_dir / "policy_drift.json", report)
    (out_dir / "policy_drift.md").write_text(render_policy_drift_markdown(report))
    return report


def _report_header(opts: DriftOptions, command: str, corpora: Corpora) -> dict[str, Any]:
    return {
        "scenario": "policy drift (Python -> C fine-tuning)",
        "model": "tiny random Llama, byte tokenizer" if opts.model == "tiny" else (opts.model or EMBEDDED_NAME),
        "device": device_label(),
        "torch": torch.__version__,
        "command": command,
        "options": asdict(opts),
        "corpora": {
            "python_files": len(corpora.train["python"]),
            "c_train_files": len(corpora.train["c"]),
            "c_heldout_files": len(corpora.heldout_c),
        },
        "versions": [],
    }


def _setup(opts: DriftOptions, command: str) -> tuple[_Drift, dict[str, Any]]:
    """Load the target and corpora, get the heads, warm every configuration up; the shared state and the report."""
    from atlas_rl.speculators.adaptive import head_cost_macs

    tiny = opts.model == "tiny"
    model, encode, eos, base_prompts = _load(opts)
    model.requires_grad_(True)
    corpora = build_corpora(encode, opts, base_prompts)
    report = _report_header(opts, command, corpora)
    if tiny:
        report["tiny_pretrain_loss"] = pretrain_tiny(model, corpora, 30, opts.seed)
        snippets = (
            snippet(ids, opts.prompt_tokens, random.Random(i)) for i, ids in enumerate(corpora.train["python"])
        )
        corpora.base_prompts = [s for s in snippets if s is not None][: opts.quick_static_prompts]
    static, report["static_head"] = static_head(model, corpora.base_prompts, eos, opts, tiny)
    logger.info("%s", report["static_head"])
    adaptive, buffer, trainer = adaptive_head(model, static, opts, tiny)
    report["head_cost_macs"] = {
        "static": head_cost_macs(static.config) if static is not None else None,
        "adaptive": head_cost_macs(adaptive.config),
    }
    bench_prompts = c_prompts(corpora, opts.bench_prompts, opts.prompt_tokens, opts.seed)
    workload = Workload(
        name="drift",
        description=f"{len(bench_prompts)} held-out C snippets x 1, T={opts.temperature}, {opts.max_new_tokens} new",
        prompt_ids=bench_prompts,
        num_generations=1,
        sampling=SamplingParams(temperature=opts.temperature, max_new_tokens=opts.max_new_tokens, seed=opts.seed),
    )
    st = _Drift(
        opts, model, eos, corpora, static, adaptive, buffer, trainer,
        optimizer=torch.optim.AdamW(model.parameters(), lr=opts.finetune_lr, weight_decay=0.0),
        workload=workload,
        held_batch=torch.tensor(c_prompts(corpora, 4, min(128, 2 * opts.prompt_tokens), opts.seed + 7)),
    )  # fmt: skip
    warm = SamplingParams(temperature=opts.temperature, max_new_tokens=4, seed=opts.seed)
    for make in _configs(st, 0).values():
        make().generate(bench_prompts[:1], warm)  # first-call costs (allocations, kernels) stay out of the timings
    return st, report


def _version(st: _Drift, v: int) -> dict[str, Any]:
    """One policy version: update the policy (v > 0), bench every configuration, the RL rollout, retraining."""
    n = st.opts.num_versions
    row: dict[str, Any] = {"version": v, "c_share": 0.0 if v == 0 else v / (n - 1)}
    if v > 0:
        row |= _policy_update(st, v, row["c_share"])
    row["heldout_c_loss"] = heldout_loss(st.model, st.held_batch)
    configs = _configs(st, v)
    runners = {name: engine_runner(make) for name, make in configs.items()}
    row["configs"] = _summaries(run_interleaved(st.workload, runners, repeats=st.opts.repeats))
    rb, rollout_s = _rl_rollout(st, v, configs["static+adaptive+suffix"])
    row["rollout"] = {
        "seconds": rollout_s,
        "tokens": rb.num_completion_tokens,
        "tau": rb.stats.mean_acceptance_length,
        "capture_hook_s": st.buffer.hook_s,
    }
    row |= _retrain(st, v, rb.completion_ids, rollout_s)
    if st.static is not None:
        row["static_vocab_coverage"] = coverage(st.static.draft_to_target, rb.completion_ids)
    c = row["configs"]
    logger.info(
        "version %d: tau none/static/suffix/adaptive/all = %s; adaptive retrain %.1f s (%.0f%% of rollout)",
        v,
        " / ".join(f"{c[n]['tau']:.2f}" if n in c else "-" for n in CONFIGS),
        row["adaptive_train"]["seconds"],
        100 * row["adaptive_train"]["share_of_rollout"],
    )
    return row


def _policy_update(st: _Drift, v: int, c_share: float) -> dict[str, float]:
    """The next fine-tuning stage; both heads re-copy their frozen output rows from the updated target."""
    rng = random.Random(f"{st.opts.seed}:{v}")
    o = st.opts
    batches = [
        finetune_batch(st.corpora, c_share, o.finetune_batch, o.finetune_seq_len, rng) for _ in range(o.finetune_steps)
    ]
    ft = finetune(st.model, st.optimizer, batches)
    with torch.no_grad():
        if st.static is not None:
            _refresh_rows(st.static, st.model)
        st.trainer.refresh_frozen_rows(st.model)
    return {"finetune_loss": ft["loss"], "finetune_s": ft["seconds"]}


def _rl_rollout(st: _Drift, v: int, make: Callable[[], RolloutEngine]) -> tuple[Any, float]:
    """The version's RL rollout (production configuration, fresh C prompts), captured for the adaptive head."""
    o = st.opts
    prompts = c_prompts(st.corpora, o.rollout_prompts, o.prompt_tokens, o.seed + 1000 + v)
    eng = make()
    handle = st.buffer.attach(eng)
    t0 = time.perf_counter()
    sampling = SamplingParams(temperature=o.temperature, max_new_tokens=o.max_new_tokens, seed=o.seed + 1 + v)
    rb = eng.generate(prompts, sampling, num_generations=o.rollout_generations)
    rollout_s = time.perf_counter() - t0
    handle.remove()
    st.buffer.flush()
    return rb, rollout_s


def _retrain(st: _Drift, v: int, completions: list[list[int]], rollout_s: float) -> dict[str, Any]:
    """Adaptive retraining within a wall-time budget of ``adaptive_share`` of the rollout, then publish."""
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    if st.opts.adaptive_vocab_from_data:
        cfg = st.adaptive.config
        prior = st.static.draft_to_target if st.static is not None else None
        d2t = rank_vocab_from_samples(
            st.buffer.samples(min_version=v), cfg.target_vocab_size, cfg.draft_vocab_size, prior
        )
        before = coverage(st.adaptive.draft_to_target, completions)
        st.trainer.set_draft_vocab(st.model, d2t)
        out["adaptive_vocab_coverage"] = {"before": before, "after": coverage(d2t, completions)}
    budget = st.opts.adaptive_share * rollout_s - (time.perf_counter() - t0)
    m = st.trainer.step(time_budget_s=max(0.0, budget))
    st.trainer.publish()
    train_s = time.perf_counter() - t0
    out["adaptive_train"] = {
        "seconds": train_s,
        "share_of_rollout": train_s / rollout_s,
        "steps": m["call_steps"],
        "loss": m["call_loss"],
        "top1": m["call_top1"],
        "skipped": m["call_skipped"],
        "staleness": m["staleness"],
        "buffer_positions": st.buffer.num_positions,
    }
    return out
