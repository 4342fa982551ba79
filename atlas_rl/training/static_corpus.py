"""The teacher-forced stage of the static speculator's data: corpus items -> features + soft labels, cached in shards.

The plan (every item of :func:`~atlas_rl.training.corpora.build_corpus`, mixed) is cut into shards of about
``shard_tokens`` positions; each shard runs through the target in length-sorted batches (one forward per batch,
:func:`~atlas_rl.training.offline.samples_from_sequences`) and is written atomically as one safetensors file
(:func:`~atlas_rl.training.static_data.save_samples`). A token budget takes the shards of a prefix of the plan, so
a larger budget extends the same cache and a stopped run resumes where it stopped (losing at most the shard in
progress). The cache directory is ``<corpus_dir>/corpus_<key>``, the key a hash of every setting the samples
depend on: the target (fingerprint + a checksum of its weights), ``fuse_layers``, ``label_top_k``, the corpus
settings, the shard size and the manifest of the source files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from atlas_rl.speculators.draft_head import target_fingerprint
from atlas_rl.training.corpora import CorpusItem, CorpusSettings, build_corpus, labelled_tokens
from atlas_rl.training.offline import samples_from_sequences
from atlas_rl.training.samples import SequenceSample
from atlas_rl.training.static_config import StaticSpeculatorConfig
from atlas_rl.training.static_data import load_samples, save_samples

logger = logging.getLogger(__name__)

__all__ = [
    "CORPUS_CACHE_FORMAT",
    "build_corpus_cache",
    "cached_corpus_samples",
    "corpus_cache_stats",
    "load_corpus_samples",
    "load_training_samples",
]

CORPUS_CACHE_FORMAT = "atlas-rl/corpus-cache/v1"


def _weights_checksum(model: torch.nn.Module) -> str:
    """A cheap checksum of the target's weights (input embedding and the first and last layers' parameters)."""
    params = list(model.parameters())
    h = hashlib.sha256()
    for p in (params[0], params[1], params[-1]):
        h.update(p.detach().flatten()[:1_000_000].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def plan_hash(items: Sequence[CorpusItem]) -> str:
    """A hash of the whole plan (every item's tokens and prompt length, in order)."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.prompt_len}:{len(it.token_ids)}|".encode())
        h.update(torch.tensor(it.token_ids, dtype=torch.int32).numpy().tobytes())
    return h.hexdigest()[:16]


def corpus_key(
    model: torch.nn.Module,
    settings: CorpusSettings,
    manifest: str,
    fuse_layers: Sequence[int],
    label_top_k: int,
    shard_tokens: int,
) -> tuple[str, dict[str, Any]]:
    """``(key, keyed settings)``: the cache key and everything it hashes (``manifest``: the source files' and the
    plan's hashes)."""
    keyed = {
        "format": CORPUS_CACHE_FORMAT,
        "target": target_fingerprint(model),
        "target_weights": _weights_checksum(model),
        "fuse_layers": [int(x) for x in fuse_layers],
        "label_top_k": int(label_top_k),
        "feat_dtype": "float16",
        "shard_tokens": int(shard_tokens),
        "manifest": manifest,
        "corpus": {**settings.__dict__, "mix": dict(sorted(settings.mix.items()))},
    }
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16], keyed


def plan_shards(items: Sequence[CorpusItem], shard_tokens: int) -> list[list[int]]:
    """Consecutive item indices grouped into shards of about ``shard_tokens`` positions (the last may be short)."""
    shards: list[list[int]] = []
    cur: list[int] = []
    n = 0
    for i, it in enumerate(items):
        cur.append(i)
        n += len(it.token_ids)
        if n >= shard_tokens:
            shards.append(cur)
            cur, n = [], 0
    if cur:
        shards.append(cur)
    return shards


def teacher_forced_samples(
    model: torch.nn.Module,
    items: Sequence[CorpusItem],
    fuse_layers: tuple[int, ...],
    label_top_k: int,
    batch_tokens: int = 2048,
) -> list[SequenceSample]:
    """Features and top-K soft labels of ``items`` (in their order), batches of similar length up to
    ``batch_tokens`` padded positions, one target forward each."""
    order = sorted(range(len(items)), key=lambda i: (len(items[i].token_ids), i))
    got: dict[int, SequenceSample] = {}
    batch: list[int] = []
    for i in [*order, None]:
        longest = len(items[i].token_ids) if i is not None else 0
        if batch and (i is None or (len(batch) + 1) * longest > batch_tokens):
            seqs = [list(items[j].token_ids) for j in batch]
            lens = [items[j].prompt_len for j in batch]
            out = samples_from_sequences(model, seqs, lens, fuse_layers, label_top_k, batch_size=len(batch))
            got.update(zip(batch, out))
            batch = []
        if i is not None:
            batch.append(i)
    return [got[i] for i in range(len(items))]


def _shard_meta(key: str, index: int, items: Sequence[CorpusItem], wall: float) -> dict[str, Any]:
    domains: dict[str, int] = {}
    for it in items:
        domains[it.domain] = domains.get(it.domain, 0) + labelled_tokens(it)
    return {
        "key": key,
        "shard": index,
        "sequences": len(items),
        "positions": sum(len(it.token_ids) for it in items),
        "labelled_by_domain": domains,
        "chat_sequences": sum(it.chat for it in items),
        "wall_s": round(wall, 2),
    }


def _shard_labelled(path: Path, key: str) -> int | None:
    """Labelled tokens of an existing shard of this cache, or None when it is not one (other key, unreadable)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except (OSError, ValueError, RuntimeError):
        return None
    if meta.get("key") != key:
        return None
    return int(sum(meta.get("labelled_by_domain", {}).values()))


def build_corpus_cache(
    model: torch.nn.Module,
    tokenizer: Any,
    settings: CorpusSettings,
    corpus_dir: str | Path,
    max_tokens: int,
    fuse_layers: tuple[int, ...],
    label_top_k: int = 32,
    sources: str | Path | None = None,
    batch_tokens: int = 2048,
    shard_tokens: int = 16384,
    progress: bool = True,
) -> Path:
    """Make sure ``<corpus_dir>/corpus_<key>`` holds the shards of the plan's first ``max_tokens`` labelled
    tokens (existing shards are kept, missing ones computed); returns that directory."""
    items, record = build_corpus(tokenizer, settings, sources)
    record["plan"] = plan_hash(items)
    manifest = f"{record['manifest']}/{record['plan']}"
    key, keyed = corpus_key(model, settings, manifest, fuse_layers, label_top_k, shard_tokens)
    out = Path(corpus_dir) / f"corpus_{key}"
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "manifest.json", {"key": key, "settings": keyed, "record": record})
    shards = plan_shards(items, shard_tokens)
    done = 0
    bar = _progress_bar(max_tokens, progress)
    t0 = time.perf_counter()
    computed = 0
    for index, shard in enumerate(shards):
        if done >= max_tokens:
            break
        path = out / f"shard_{index:05d}.safetensors"
        have = _shard_labelled(path, key) if path.is_file() else None
        if have is None:
            ts = time.perf_counter()
            part = [items[i] for i in shard]
            samples = teacher_forced_samples(model, part, tuple(fuse_layers), label_top_k, batch_tokens)
            save_samples(path, samples, meta=_shard_meta(key, index, part, time.perf_counter() - ts))
            have = sum(s.num_labels for s in samples)
            computed += have
        done += have
        bar.update(have)
    bar.close()
    wall = time.perf_counter() - t0
    logger.info(
        "corpus cache %s: %d labelled tokens (%d computed now in %.0f s, %.0f tok/s)",
        out,
        done,
        computed,
        wall,
        computed / max(wall, 1e-9),
    )
    return out


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="tok", desc="corpus", disable=not enabled, smoothing=0.05)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


def _cache_dir(path: str | Path) -> Path:
    """``path`` itself when it is a keyed cache, else its only ``corpus_*`` subdirectory."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    subs = sorted(d for d in p.glob("corpus_*") if (d / "manifest.json").is_file())
    if len(subs) != 1:
        raise ValueError(
            f"{p} holds {len(subs)} corpus caches ({[d.name for d in subs]}); pass the corpus_<key> directory"
        )
    return subs[0]


def _shard_paths(d: Path) -> tuple[str, list[Path]]:
    key = json.loads((d / "manifest.json").read_text(encoding="utf-8"))["key"]
    return key, sorted(d.glob("shard_*.safetensors"))


def load_corpus_samples(path: str | Path, max_tokens: int | None = None) -> list[SequenceSample]:
    """The samples of a corpus cache (``path``: a ``corpus_<key>`` directory, or a directory holding exactly one),
    shard by shard in plan order (a prefix of the mixed plan), until ``max_tokens`` labelled tokens when given."""
    d = _cache_dir(path)
    key, paths = _shard_paths(d)
    out: list[SequenceSample] = []
    n = 0
    for p in paths:
        if max_tokens is not None and n >= max_tokens:
            break
        samples, meta = load_samples(p)
        if meta.get("key") != key:
            raise ValueError(f"{p} belongs to another corpus cache (key {meta.get('key')!r}, expected {key!r})")
        out.extend(samples)
        n += sum(s.num_labels for s in samples)
    logger.info("loaded %d corpus sequences (%d labelled tokens) from %s", len(out), n, d)
    return out


def corpus_cache_stats(path: str | Path) -> dict[str, Any]:
    """The card's record of a corpus cache: key, sources and licenses, dedup counts, shards, labelled tokens per
    domain, sequences, chat share and the wall time the shards took."""
    d = _cache_dir(path)
    manifest = json.loads((d / "manifest.json").read_text(encoding="utf-8"))
    key, paths = _shard_paths(d)
    by_domain: dict[str, int] = {}
    seqs = chats = 0
    wall = 0.0
    for p in paths:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        for dom, n in meta.get("labelled_by_domain", {}).items():
            by_domain[dom] = by_domain.get(dom, 0) + int(n)
        seqs += int(meta.get("sequences", 0))
        chats += int(meta.get("chat_sequences", 0))
        wall += float(meta.get("wall_s", 0.0))
    rec = manifest["record"]
    return {
        "cache": str(d),
        "key": key,
        "shards": len(paths),
        "sequences": seqs,
        "chat_sequences": chats,
        "labelled_tokens": sum(by_domain.values()),
        "labelled_by_domain": dict(sorted(by_domain.items())),
        "teacher_forced_wall_s": round(wall, 1),
        "sources": rec["sources"],
        "skipped_files": rec["skipped_files"],
        "dedup": rec["dedup"],
        "settings": manifest["settings"]["corpus"],
    }


def cached_corpus_samples(
    model: torch.nn.Module, tokenizer: Any, cfg: StaticSpeculatorConfig, progress: bool = True
) -> tuple[list[SequenceSample], dict[str, Any]]:
    """The config's corpus samples (``cfg.corpus_tokens`` labelled tokens of the mixed plan), computing the missing
    shards of ``cfg.corpus_cache_dir`` first; returns ``(samples, the card's record)``."""
    d = build_corpus_cache(
        model,
        tokenizer,
        cfg.corpus_settings,
        cfg.corpus_cache_dir,
        cfg.corpus_tokens,
        cfg.fuse_layers,
        cfg.label_top_k,
        sources=cfg.corpus_sources,
        batch_tokens=cfg.corpus_batch_tokens,
        shard_tokens=cfg.corpus_shard_tokens,
        progress=progress,
    )
    samples = load_corpus_samples(d, cfg.corpus_tokens)
    stats = corpus_cache_stats(d)
    stats["used_sequences"] = len(samples)
    stats["used_labelled_tokens"] = sum(s.num_labels for s in samples)
    return samples, stats


def load_training_samples(
    selfdistill_dir: str | Path | None,
    corpus_dir: str | Path | None,
    corpus_tokens: int | None = None,
    temperatures: Sequence[float] | None = None,
) -> list[SequenceSample]:
    """Both stage-1 caches together: every ``samples_T*.safetensors`` of ``selfdistill_dir`` (only those of
    ``temperatures`` when given; sorted by file name), then the corpus cache of ``corpus_dir`` (its first
    ``corpus_tokens`` labelled tokens when given). Either directory may be None."""
    out: list[SequenceSample] = []
    if selfdistill_dir is not None:
        paths = sorted(Path(selfdistill_dir).glob("samples_T*.safetensors"))
        if temperatures is not None:
            paths = [p for p in paths if p.name.split("_")[1] in {f"T{t:g}" for t in temperatures}]
        if not paths:
            raise ValueError(f"{selfdistill_dir} holds no self-distilled samples (samples_T*.safetensors)")
        for p in paths:
            out.extend(load_samples(p)[0])
    if corpus_dir is not None:
        out.extend(load_corpus_samples(corpus_dir, corpus_tokens))
    return out
