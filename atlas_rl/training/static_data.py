"""Stage 1 of the static speculator: self-distillation data.

The target answers every training prompt through the real engine without speculation; a
:class:`~atlas_rl.training.buffer.CaptureBuffer` on the engine turns the forwards it runs anyway into
:class:`~atlas_rl.training.samples.SequenceSample` s (features of the head's ``fuse_layers`` and top-K soft labels of
the target's T=1 distribution), so no extra target forward runs. Samples are cached as safetensors (no pickle),
keyed by every setting they depend on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from atlas_rl.speculators.draft_head import target_fingerprint
from atlas_rl.training.samples import SequenceSample
from atlas_rl.training.static_config import StaticSpeculatorConfig
from atlas_rl.types import RolloutBatch

logger = logging.getLogger(__name__)

__all__ = ["SAMPLES_FORMAT", "cached_samples", "chat_prompt_ids", "generate_samples", "load_samples", "save_samples"]

SAMPLES_FORMAT = "atlas-rl/sequence-samples/v1"

# ``generate_samples``' signature, for callers that substitute the generator (the pipeline resolves it late).
SampleGenerator = Callable[..., tuple[list[SequenceSample], dict[str, Any]]]


def chat_prompt_ids(tokenizer: Any, prompt: dict[str, Any]) -> list[int]:
    """Token ids of a broad prompt (``{"prompt", "system"?}``) in the target's chat format, ending with the
    assistant header (``apply_chat_template(..., add_generation_prompt=True)``)."""
    messages = [{"role": "system", "content": prompt["system"]}] if prompt.get("system") else []
    messages.append({"role": "user", "content": prompt["prompt"]})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def save_samples(path: str | Path, samples: Sequence[SequenceSample], meta: dict[str, Any] | None = None) -> None:
    """Store samples as flat safetensors tensors (no pickle): positions concatenated, ``offsets`` per sample."""
    from safetensors.torch import save_file

    if not samples:
        raise ValueError("save_samples needs at least one sample")
    lens = torch.tensor([len(s) for s in samples], dtype=torch.long)
    tensors = {
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
        "policy_version": torch.tensor([s.policy_version for s in samples], dtype=torch.long),
        "tokens": torch.cat([s.tokens for s in samples]).long(),
        "feats": torch.cat([s.feats for s in samples]).contiguous(),
        "has_feats": torch.cat([s.has_feats for s in samples]),
        "label_ids": torch.cat([s.label_ids for s in samples]).to(torch.int32),
        "label_probs": torch.cat([s.label_probs for s in samples]).float(),
        "label_mask": torch.cat([s.label_mask for s in samples]),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": SAMPLES_FORMAT, "meta": json.dumps(meta or {})})
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache


def load_samples(path: str | Path) -> tuple[list[SequenceSample], dict[str, Any]]:
    """Inverse of :func:`save_samples`; returns ``(samples, meta)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SAMPLES_FORMAT:
            raise ValueError(f"{path} is not an atlas-rl sample file (format {meta.get('format')!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    off = t["offsets"].tolist()
    out = []
    for i in range(len(off) - 1):
        a, b = off[i], off[i + 1]
        out.append(
            SequenceSample(
                tokens=t["tokens"][a:b],
                feats=t["feats"][a:b],
                has_feats=t["has_feats"][a:b],
                label_ids=t["label_ids"][a:b].long(),
                label_probs=t["label_probs"][a:b],
                label_mask=t["label_mask"][a:b],
                policy_version=int(t["policy_version"][i]),
            )
        )
    return out, json.loads(meta.get("meta", "{}"))


def generate_samples(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    temperature: float,
    max_new_tokens: int,
    fuse_layers: tuple[int, ...],
    label_top_k: int = 32,
    max_rows: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[SequenceSample], dict[str, Any]]:
    """The target answers ``prompts`` (engine, no speculation); the capture hook turns its forwards into samples.

    Prompts are decoded in order of length (less padding in prefill); the samples come back in prompt order,
    one per prompt: prompt + completion tokens, features of ``fuse_layers`` at every position but the last,
    soft labels on the completion positions (and the last prompt position). Returns ``(samples, stats)``.
    """
    from atlas_rl.config import EngineConfig
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
    from atlas_rl.types import SamplingParams

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    engine = RolloutEngine(model, speculators=[], config=EngineConfig(max_rows=max_rows, progress=progress))
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=fuse_layers, top_k=label_top_k, max_positions=None))
    handle = buf.attach(engine)
    t0 = time.perf_counter()
    try:
        batch = engine.generate(
            [list(prompts[i]) for i in order],
            SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
        )
        buf.flush()
    finally:
        handle.remove()
        engine.release()
    wall = time.perf_counter() - t0
    samples = _in_prompt_order(prompts, order, batch.completion_ids, buf.samples())
    return samples, _generation_stats(temperature, len(prompts), batch, wall)


def _in_prompt_order(
    prompts: Sequence[Sequence[int]], order: list[int], completions: list[list[int]], got: list[SequenceSample]
) -> list[SequenceSample]:
    """Captured samples (in decoding ``order``) back in prompt order, each checked against prompt + completion."""
    if len(got) != len(order):
        raise RuntimeError(f"the capture buffer assembled {len(got)} samples for {len(order)} rows")
    samples: list[SequenceSample | None] = [None] * len(prompts)
    for k, (i, s) in enumerate(zip(order, got)):
        expect = list(prompts[i]) + completions[k]
        if s.tokens.tolist() != expect:
            raise RuntimeError(f"captured sample {k} does not match the generated sequence (prompt {i})")
        samples[i] = s
    return [s for s in samples if s is not None]


def _generation_stats(temperature: float, responses: int, batch: RolloutBatch, wall: float) -> dict[str, Any]:
    """The card's record of one generation run; logs it too."""
    n_tok = sum(len(c) for c in batch.completion_ids)
    stats = {
        "temperature": temperature,
        "responses": responses,
        "completion_tokens": n_tok,
        "stopped": sum(r == "stop" for r in batch.finish_reasons),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(n_tok / wall, 1) if wall > 0 else None,
    }
    logger.info(
        "generated %d answers at T=%g: %d tokens in %.0f s (%.1f tok/s)",
        responses,
        temperature,
        n_tok,
        wall,
        n_tok / max(wall, 1e-9),
    )
    return stats


def _data_key(model: torch.nn.Module, prompts: Sequence[Sequence[int]], settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(target_fingerprint(model).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p in prompts:
        h.update(b"|" + ",".join(map(str, p)).encode())
    return h.hexdigest()[:16]


def cached_samples(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: StaticSpeculatorConfig,
    temperature: float,
    cache_dir: Path,
    progress: bool = True,
    generate: SampleGenerator | None = None,
) -> tuple[list[SequenceSample], dict[str, Any]]:
    """:func:`generate_samples` (or ``generate``, same signature), cached under ``cache_dir`` by a key of every
    setting the samples depend on."""
    settings = {
        "temperature": temperature,
        "max_new_tokens": config.gen_max_new_tokens,
        "fuse_layers": list(config.fuse_layers),
        "label_top_k": config.label_top_k,
        "seed": config.seed,
    }
    path = cache_dir / f"samples_T{temperature:g}_{_data_key(model, prompts, settings)}.safetensors"
    if path.is_file():
        samples, meta = load_samples(path)
        logger.info("loaded %d cached samples from %s", len(samples), path)
        return samples, {**meta.get("stats", {}), "cached": True}
    samples, stats = (generate or generate_samples)(
        model,
        prompts,
        temperature,
        config.gen_max_new_tokens,
        config.fuse_layers,
        config.label_top_k,
        config.gen_max_rows,
        seed=config.seed,
        progress=progress,
    )
    save_samples(path, samples, meta={"settings": settings, "stats": stats})
    return samples, {**stats, "cached": False}
