"""Teacher-forced corpora for the static draft head: files -> chunks -> deduplicated, chat-formatted, mixed items.

1. **Files** of the sources in ``atlas_rl/data/corpus_sources.json`` (:mod:`~atlas_rl.training.corpus_files`:
   globs, licenses, exclusions of public evaluation sets).
2. **Chunks** of at most ``max_len`` tokens cut at line boundaries (:func:`chunk_text`); chunks that look like
   data (very long lines, few letters) or are mostly non-ASCII (non-English) are dropped.
3. **Deduplication** (:func:`dedup_chunks`): exact (hash of the whitespace-normalised, lower-cased text), then
   near-duplicates (MinHash over word 5-shingles, LSH bands, estimated Jaccard >= ``dedup_threshold``).
4. **Items** (:func:`format_item`): a ``chat_share`` of the chunks become a chat in the target's template (a user
   turn asking for the code / explanation, or to continue its first lines; the chunk is the assistant turn, which
   alone is labelled); the rest stay raw text (every position labelled).
5. **Mix** (:func:`mix_items`): a deterministic interleaving of the domains by ``mix`` weight (in labelled tokens),
   so every prefix of the plan has the mix; a token budget takes a prefix.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atlas_rl.training.corpus_files import CorpusFile, CorpusSource, find_files, load_source_spec, source_manifest

logger = logging.getLogger(__name__)

__all__ = [
    "Chunk",
    "CorpusItem",
    "CorpusSettings",
    "build_corpus",
    "chunk_text",
    "dedup_chunks",
    "format_item",
    "labelled_tokens",
    "mix_items",
]

DEFAULT_MIX = {
    "code_python": 0.22,
    "code_javascript": 0.1,
    "code_c": 0.1,
    "code_rust": 0.14,
    "code_sql": 0.04,
    "json": 0.05,
    "docs": 0.35,
}


@dataclass(frozen=True)
class CorpusSettings:
    """How the corpus is cut, deduplicated, formatted and mixed (every field changes the plan's hash)."""

    max_len: int = 512
    chat_share: float = 0.6
    continue_share: float = 0.25
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    min_tokens: int = 48
    dedup_threshold: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_len < 128:
            raise ValueError(f"corpus max_len must be >= 128 tokens (room for a chat prompt), got {self.max_len}")
        for name in ("chat_share", "continue_share", "dedup_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"corpus {name} must lie in [0, 1], got {getattr(self, name)}")
        if not self.mix or any(w < 0 for w in self.mix.values()) or sum(self.mix.values()) <= 0:
            raise ValueError(f"corpus mix needs non-negative weights with a positive sum, got {self.mix}")
        if not 1 <= self.min_tokens < self.max_len:
            raise ValueError(f"corpus min_tokens must lie in [1, max_len), got {self.min_tokens}")


@dataclass(frozen=True)
class Chunk:
    """A piece of one corpus file, at most ``max_len`` tokens, cut at line boundaries."""

    text: str
    source: str
    domain: str
    language: str
    style: str  # "code", "json" or "docs": which chat templates fit
    rel: str  # path below the source's root
    index: int  # chunk index within the file


@dataclass(frozen=True)
class CorpusItem:
    """One training sequence: ``token_ids`` with positions ``>= prompt_len - 1`` labelled."""

    token_ids: tuple[int, ...]
    prompt_len: int
    domain: str
    source: str
    rel: str
    chat: bool


def labelled_tokens(item: CorpusItem) -> int:
    """Positions of ``item`` that carry a label (as :func:`~atlas_rl.training.offline.samples_from_sequences`)."""
    return len(item.token_ids) - 1 - max(item.prompt_len - 1, 0)


# ---------------------------------------------------------------------------------------------------------------
# chunking
# ---------------------------------------------------------------------------------------------------------------


def _looks_like_data(text: str) -> bool:
    """Minified code, tables of numbers, base64 (long lines or few letters), or mostly non-English text (over 15%
    non-ASCII characters: the target and its traffic are English)."""
    lines = text.splitlines() or [""]
    long_lines = sum(len(ln) > 300 for ln in lines)
    letters = sum(c.isalpha() for c in text)
    non_ascii = sum(not c.isascii() for c in text)
    n = max(len(text), 1)
    return long_lines > 0.2 * len(lines) or letters < 0.3 * n or non_ascii > 0.15 * n


def chunk_text(text: str, tokenizer: Any, max_tokens: int, min_tokens: int = 48) -> list[str]:
    """``text`` cut at line boundaries into pieces of at most ``max_tokens`` tokens (line token counts summed);
    a line longer than ``max_tokens`` ends the current piece and is dropped; pieces under ``min_tokens`` tokens or
    looking like data are dropped."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return []
    counts = [len(x) for x in tokenizer(lines, add_special_tokens=False)["input_ids"]]
    pieces: list[str] = []
    cur: list[str] = []
    n = 0
    for line, c in zip(lines, counts):
        if n + c > max_tokens and cur:
            pieces.append("".join(cur))
            cur, n = [], 0
        if c > max_tokens:
            continue
        cur.append(line)
        n += c
    if cur:
        pieces.append("".join(cur))
    out = []
    for p in pieces:
        p = p.strip("\n")
        if not p.strip() or _looks_like_data(p):
            continue
        if len(tokenizer(p, add_special_tokens=False)["input_ids"]) >= min_tokens:
            out.append(p)
    return out


def _style(source: CorpusSource) -> str:
    if source.domain == "json":
        return "json"
    return "docs" if source.domain == "docs" or source.kind == "html" else "code"


def file_chunks(files: Sequence[CorpusFile], tokenizer: Any, settings: CorpusSettings) -> list[Chunk]:
    """Chunks of every file, leaving room for a chat prompt (``max_len - 96`` tokens each)."""
    out: list[Chunk] = []
    for f in files:
        for i, piece in enumerate(chunk_text(f.text, tokenizer, settings.max_len - 96, settings.min_tokens)):
            out.append(Chunk(piece, f.source.name, f.source.domain, f.source.language, _style(f.source), f.rel, i))
    return out


# ---------------------------------------------------------------------------------------------------------------
# deduplication
# ---------------------------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Whitespace collapsed, lower-cased: the text exact duplicates share."""
    return re.sub(r"\s+", " ", text).strip().lower()


_NUM_PERM = 64
_BANDS = 16
_rng = np.random.default_rng(20261201)
_PERM_A = _rng.integers(1, 2**32 - 1, size=_NUM_PERM, dtype=np.uint64) | np.uint64(1)
_PERM_B = _rng.integers(0, 2**32 - 1, size=_NUM_PERM, dtype=np.uint64)


def minhash(text: str, shingle: int = 5) -> np.ndarray | None:
    """MinHash signature ``[64]`` of the word ``shingle``-grams of the normalised text (None: too short)."""
    words = re.findall(r"\w+|[^\w\s]", normalise(text))
    if len(words) < shingle:
        return None
    grams = {" ".join(words[i : i + shingle]) for i in range(len(words) - shingle + 1)}
    sh = np.fromiter((zlib.crc32(g.encode()) for g in grams), dtype=np.uint64, count=len(grams))
    hashed = (_PERM_A[:, None] * sh[None, :] + _PERM_B[:, None]) & np.uint64(0xFFFFFFFF)  # [perm, shingles]
    return hashed.min(axis=1)


def dedup_chunks(chunks: Sequence[Chunk], threshold: float = 0.8) -> tuple[list[Chunk], dict[str, int]]:
    """Drop exact duplicates (normalised text) and near-duplicates (estimated Jaccard of word 5-shingles >=
    ``threshold``), keeping the first of each; returns ``(kept, {"exact": n, "near": m})``."""
    seen: set[bytes] = set()
    bands: dict[tuple[int, bytes], int] = {}
    sigs: list[np.ndarray] = []
    kept: list[Chunk] = []
    stats = {"exact": 0, "near": 0}
    rows = _NUM_PERM // _BANDS
    for c in chunks:
        key = hashlib.sha1(normalise(c.text).encode()).digest()
        if key in seen:
            stats["exact"] += 1
            continue
        seen.add(key)
        sig = minhash(c.text)
        if sig is not None:
            keys = [(b, sig[b * rows : (b + 1) * rows].tobytes()) for b in range(_BANDS)]
            hits = {bands[k] for k in keys if k in bands}
            if any(float(np.mean(sigs[j] == sig)) >= threshold for j in hits):
                stats["near"] += 1
                continue
            for k in keys:
                bands.setdefault(k, len(sigs))
            sigs.append(sig)
        kept.append(c)
    return kept, stats


# ---------------------------------------------------------------------------------------------------------------
# formatting and mixing
# ---------------------------------------------------------------------------------------------------------------


def _title(chunk: Chunk) -> str:
    """A heading of the chunk (markdown ``#`` or an underlined reStructuredText title), else a name from its path."""
    lines = [ln.strip() for ln in chunk.text.splitlines()]
    for i, line in enumerate(lines):
        under = lines[i + 1] if i + 1 < len(lines) else ""
        is_rst = len(under) >= 3 and len(set(under)) == 1 and under[0] in "=-~^*"
        t = line.lstrip("#").strip() if line.startswith("#") or is_rst else ""
        if 3 <= len(t) <= 80 and any(ch.isalpha() for ch in t) and ": " not in t:
            return t
    parts = Path(chunk.rel).parts
    stem = parts[0].split("-")[0] if parts[-1] == "METADATA" else Path(chunk.rel).stem
    return stem.replace("_", " ").replace("-", " ")


def _chat_messages(
    chunk: Chunk, templates: dict[str, Any], fence: str, rng: random.Random, cont: bool
) -> tuple[str, str]:
    """``(user turn, assistant turn)`` of a chat built around ``chunk``."""
    t = templates[chunk.style]
    lines = chunk.text.splitlines()
    head, body = "", chunk.text
    if cont and len(lines) >= 6:
        cut = min(8, max(2, len(lines) // 5))
        head, body = "\n".join(lines[:cut]), "\n".join(lines[cut:])
    fields = {"language": chunk.language.capitalize() if chunk.language != "javascript" else "JavaScript"}
    fields |= {"name": Path(chunk.rel).name, "title": _title(chunk), "fence": fence, "head": head, "body": body}
    if chunk.language in ("sql", "json", "c"):
        fields["language"] = chunk.language.upper() if chunk.language != "c" else "C/C++"
    user = rng.choice(t["continue"] if head else t["user"]).format(**fields)
    return user, rng.choice(t["answer"]).format(**fields)


def format_item(
    chunk: Chunk, tokenizer: Any, settings: CorpusSettings, spec: dict[str, Any], eos_id: int
) -> CorpusItem:
    """``chunk`` as a training sequence: a chat (``chat_share`` of the chunks, by a seeded draw per chunk) with
    only the assistant turn labelled, or raw text with every position labelled; at most ``max_len`` tokens."""
    rng = random.Random(f"{settings.seed}:{chunk.source}:{chunk.rel}:{chunk.index}")
    chat = rng.random() < settings.chat_share
    if not chat:
        ids = tokenizer(chunk.text, add_special_tokens=False)["input_ids"][: settings.max_len]
        return CorpusItem(tuple(ids), 1, chunk.domain, chunk.source, chunk.rel, False)
    cont = rng.random() < settings.continue_share
    user, answer = _chat_messages(chunk, spec["chat"], spec.get("fences", {}).get(chunk.language, ""), rng, cont)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)
    if hasattr(prompt, "keys"):  # transformers 5 returns a BatchEncoding
        prompt = prompt["input_ids"]
    prompt = [int(t) for t in prompt][: settings.max_len // 2]
    body = tokenizer(answer, add_special_tokens=False)["input_ids"]
    room = settings.max_len - len(prompt)
    ids = prompt + (body + [eos_id] if len(body) < room else body[:room])
    return CorpusItem(tuple(ids), len(prompt), chunk.domain, chunk.source, chunk.rel, True)


def mix_items(items: Sequence[CorpusItem], mix: dict[str, float], seed: int = 0) -> list[CorpusItem]:
    """Interleave the domains' items (each shuffled by ``seed``) so that labelled tokens follow ``mix`` in every
    prefix: the next item comes from the domain with the smallest ``tokens taken / weight``; a domain that runs
    out drops out. Domains without weight are left out."""
    by: dict[str, list[CorpusItem]] = {}
    for it in items:
        if mix.get(it.domain, 0) > 0:
            by.setdefault(it.domain, []).append(it)
    for d, lst in by.items():
        random.Random(f"{seed}:mix:{d}").shuffle(lst)
    taken = {d: 0 for d in by}
    pos = {d: 0 for d in by}
    out: list[CorpusItem] = []
    live = sorted(by)
    while live:
        d = min(live, key=lambda x: (taken[x] / mix[x], x))
        it = by[d][pos[d]]
        out.append(it)
        taken[d] += labelled_tokens(it)
        pos[d] += 1
        if pos[d] == len(by[d]):
            live.remove(d)
    return out


def build_corpus(
    tokenizer: Any, settings: CorpusSettings, sources: str | Path | None = None
) -> tuple[list[CorpusItem], dict[str, Any]]:
    """The whole plan (every item, mixed) and its record: sources with licenses and file counts, exclusions,
    dedup counts, tokens per domain, and ``manifest`` (a hash of every taken file; with the settings it keys the
    cache)."""
    spec = load_source_spec(sources)
    eos_id = int(tokenizer.eos_token_id)
    files: list[CorpusFile] = []
    record: dict[str, Any] = {"sources": {}, "skipped_files": {}}
    for d in spec["sources"]:
        src = CorpusSource.from_dict(d)
        got = find_files(src, spec, seed=settings.seed, stats=record["skipped_files"])
        files.extend(got)
        record["sources"][src.name] = {"domain": src.domain, "license": src.license, "files": len(got)}
    chunks = file_chunks(files, tokenizer, settings)
    kept, record["dedup"] = dedup_chunks(chunks, settings.dedup_threshold)
    record["dedup"]["chunks_in"] = len(chunks)
    items = mix_items([format_item(c, tokenizer, settings, spec, eos_id) for c in kept], settings.mix, settings.seed)
    record["manifest"] = source_manifest(files)
    record["pool_labelled_tokens"] = _per_domain(items)
    logger.info("corpus: %d files, %d chunks, %d kept (dedup %s)", len(files), len(chunks), len(kept), record["dedup"])
    return items, record


def _per_domain(items: Sequence[CorpusItem]) -> dict[str, int]:
    out: dict[str, int] = {}
    for it in items:
        out[it.domain] = out.get(it.domain, 0) + labelled_tokens(it)
    return dict(sorted(out.items()))
