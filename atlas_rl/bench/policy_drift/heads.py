"""The drift's draft heads: the static head (given, shipped or quickly trained) and the adaptive head + trainer."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time

import torch

from atlas_rl.rollout.build import build_engine, load_static_head
from atlas_rl.speculators.adaptive import AdaptiveHeadConfig, build_adaptive_head, rank_vocab_from_samples
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig, target_fingerprint
from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
from atlas_rl.training.online import OnlineSpeculatorTrainer, OnlineTrainerConfig
from atlas_rl.types import SamplingParams

from .options import DriftOptions

logger = logging.getLogger(__name__)


def quick_static(
    model: torch.nn.Module, prompts: list[list[int]], eos: list[int], opts: DriftOptions, tiny: bool
) -> tuple[DraftHead, str]:
    """A static head self-distilled from the v0 target's greedy answers to ``prompts``; cached for real models."""
    from atlas_rl.models import cache_dir

    H = int(model.config.hidden_size)
    L = int(model.config.num_hidden_layers)
    fuse = (1, L) if tiny else (2, L // 2, L - 3)  # EAGLE-3's low/mid/high layers
    V = int(model.get_output_embeddings().weight.shape[0])
    cfg_kw = dict(draft_vocab_size=min(8192, V), fuse_layers=fuse, intermediate_size=4 * H if tiny else 1536)
    settings = dict(
        cfg_kw, prompts=len(prompts), steps=opts.quick_static_steps, seed=opts.seed, fp=target_fingerprint(model)
    )
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = cache_dir() / "drift" / f"quick_static-{key}-eagle3"
    if not tiny and (path / "config.json").is_file():
        logger.info("quick static head from the cache: %s", path)
        return DraftHead.from_pretrained(path, target=model), f"quick-trained static head (cached {path})"
    t0 = time.perf_counter()
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=fuse, top_k=16, max_positions=None))
    eng = build_engine(model, k=0, controller="fixed", eos_token_ids=eos)
    buf.attach(eng)
    eng.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=96 if not tiny else 64))
    buf.flush()
    samples = buf.samples()
    d2t = rank_vocab_from_samples(samples, V, cfg_kw["draft_vocab_size"])
    head = DraftHead(DraftHeadConfig.from_target(model, **cfg_kw), draft_to_target=d2t).bind_target(
        model, init_lm_head=True
    )
    trainer = OnlineSpeculatorTrainer(
        head, buf, OnlineTrainerConfig(lr=1e-3, batch_size=4, max_seq_len=128, ttt_steps=3, seed=opts.seed)
    )
    m = trainer.step(max_steps=opts.quick_static_steps, progress=True)
    trainer.publish()
    note = (
        f"quick-trained static head ({len(samples)} answers of the v0 target, {m['steps']} steps, "
        f"{time.perf_counter() - t0:.0f} s; final loss {m['loss']:.2f}) — a stand-in for the shipped head"
    )
    if not tiny:
        head.save_pretrained(path, dtype=None, card={"note": note, "settings": settings})
    return head, note


def static_head(
    model: torch.nn.Module, prompts: list[list[int]], eos: list[int], opts: DriftOptions, tiny: bool
) -> tuple[DraftHead | None, str]:
    """The static head: ``opts.static_head``, else the shipped one, else per ``opts.static_fallback``; a note."""
    if opts.static_head or not tiny:
        head, _ = load_static_head(model, opts.static_head, required=False)
        if head is not None:
            given = f"static head {opts.static_head}"
            return head, given if opts.static_head else "shipped static head (atlas_rl.speculators.defaults)"
    if opts.static_fallback == "skip":
        return None, "no static head given or shipped: the static column is skipped (static_fallback='skip')"
    return quick_static(model, prompts, eos, opts, tiny)


def adaptive_head(
    model: torch.nn.Module, static: DraftHead | None, opts: DriftOptions, tiny: bool
) -> tuple[DraftHead, CaptureBuffer, OnlineSpeculatorTrainer]:
    """The adaptive head (warm-started from ``static``), the capture buffer it learns from, and its trainer."""
    vocab = min(opts.adaptive_vocab, static.config.draft_vocab_size if static else opts.adaptive_vocab)
    cfg = AdaptiveHeadConfig(draft_vocab_size=vocab, intermediate_size=opts.adaptive_intermediate if not tiny else 64)
    head = build_adaptive_head(model, static, cfg, seed=opts.seed)
    buffer = CaptureBuffer(CaptureBufferConfig(fuse_layers=head.config.fuse_layers, top_k=16, max_positions=200_000))
    trainer = OnlineSpeculatorTrainer(
        head,
        buffer,
        OnlineTrainerConfig(
            lr=opts.adaptive_lr,
            batch_size=opts.adaptive_batch,
            max_seq_len=max(opts.adaptive_seq_len, opts.adaptive_ttt_steps + 2),
            ttt_steps=opts.adaptive_ttt_steps,
            newest_min_labels=opts.rollout_prompts * opts.rollout_generations * opts.max_new_tokens // 2,
            seed=opts.seed,
        ),
    )
    return head, buffer, trainer


def coverage(d2t: torch.Tensor, completions: list[list[int]]) -> float:
    """Share of completion tokens inside a draft vocabulary (a head can never propose the others)."""
    allowed = set(d2t.tolist())
    toks = [t for c in completions for t in c]
    return sum(t in allowed for t in toks) / len(toks) if toks else math.nan
