"""The n-gram hash-chain indices behind :class:`~atlas_rl.speculators.suffix.SuffixSpeculator`.

Each corpus (an active prompt group; the bounded history of finished completions) is an n-gram *hash-chain*
index, the structure of LZ77 compressors: for a few key lengths ``n`` (the ladder ``min_match_len * 2**i <=
max_match_len``) a head table maps the key of an n-gram (a polynomial hash, computed by doubling from the shorter
one) to the most recent position where it ended, and a ``prev`` array links each position to the previous one
with the same key. Appending a token costs a few arithmetic and table operations per key length, and a chain
yields the occurrences of an n-gram most recent first.
"""

from __future__ import annotations

import logging
from array import array
from collections import deque
from collections.abc import Sequence
from typing import Union

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["MIN_COMPACT", "SEP", "GroupIndex", "HistoryIndex", "Occurrence", "longest_matches", "rolling_keys"]

SEP = -1  # separates sequences in the history buffer; token ids are non-negative
_OFF_BITS = 32
_OFF_MASK = (1 << _OFF_BITS) - 1
MIN_COMPACT = 4096  # do not compact the history buffer for fewer dead tokens than this

# n-gram keys: key_n(p) = sum_{j<n} (tok[p-j] + 1) * B^j mod 2^64 (polynomial; computed by doubling)
_M64 = (1 << 64) - 1
_B = 0x5851F42D4C957F2D
_GOLDEN = 0x9E3779B97F4A7C15  # multiplicative hashing of a key into a history bucket
_POW = [pow(_B, j, 1 << 64) for j in range(1025)]

TokenSeq = Union[list[int], array]  # noqa: UP007 - a runtime alias; `X | Y` of a generic alias needs 3.10+
Occurrence = tuple[TokenSeq, int]  # (sequence, index of the last matched token)


def rolling_keys(q: Sequence[int], lens: tuple[int, ...]) -> list[int]:
    """The key of the last ``n`` tokens of ``q`` for each ``n`` in ``lens`` (ascending, all <= len(q))."""
    out: list[int] = []
    acc = 0
    bj = 1
    want = 0
    last = len(q) - 1
    for j in range(lens[-1]):
        acc = (acc + (q[last - j] + 1) * bj) & _M64
        bj = (bj * _B) & _M64
        if j + 1 == lens[want]:
            out.append(acc)
            want += 1
    return out


def longest_matches(cands: list[Occurrence], q: tuple[int, ...], n: int) -> tuple[int, list[Occurrence]]:
    """Extend each occurrence's match of ``q`` (known to be >= ``n``) backwards to its exact length (up to
    ``len(q)``) and keep the longest: ``(match length, occurrences with it)``."""
    L = len(q)
    best = n
    lengths = []
    for seq, idx in cands:
        m = n
        while m < L and idx >= m and seq[idx - m] == q[L - 1 - m]:
            m += 1
        lengths.append(m)
        if m > best:
            best = m
    return best, [c for c, m in zip(cands, lengths) if m == best]


class GroupIndex:
    """Hash-chain index over one active prompt group (pure Python: tokens arrive a few at a time).

    Slot 0 holds the prompt; slot ``s >= 1`` holds a row as ``context + output``, where ``context`` is the
    last ``max_match_len - 1`` prompt tokens (keys spanning the prompt/output boundary need it; the context
    itself is indexed once, in slot 0). A position is packed as ``slot << 32 | offset``. Per slot and key
    length, ``keys`` holds the key of the n-gram ending at each offset (for the doubling recurrence) and
    ``prevs`` the chain link; ``heads`` maps a key to the most recent position where it ended.
    """

    __slots__ = ("lens", "prompt", "ctx_len", "seqs", "keys", "prevs", "heads", "row_slots")

    def __init__(self, prompt_ids: Sequence[int], lens: tuple[int, ...], ctx_max: int) -> None:
        self.lens = lens
        self.prompt: list[int] = [int(t) for t in prompt_ids]
        self.ctx_len = min(len(self.prompt), ctx_max)
        self.seqs: list[list[int]] = []
        self.keys: list[list[array]] = []
        self.prevs: list[list[array]] = []
        self.heads: list[dict[int, int]] = [{} for _ in lens]
        self.row_slots: dict[int, int] = {}
        self._new_slot(self.prompt, 0)

    def _new_slot(self, tokens: list[int], index_from: int) -> int:
        slot = len(self.seqs)
        self.seqs.append(tokens)
        self.keys.append([array("Q") for _ in self.lens])
        self.prevs.append([array("q") for _ in self.lens])
        self._index(slot, 0, index_from)
        return slot

    def add_row(self, row_id: int) -> int:
        slot = self._new_slot(self.prompt[len(self.prompt) - self.ctx_len :], self.ctx_len)
        self.row_slots[row_id] = slot
        return slot

    def output_len(self, slot: int) -> int:
        return len(self.seqs[slot]) - self.ctx_len

    def extend(self, slot: int, tokens: Sequence[int]) -> None:
        seq = self.seqs[slot]
        start = len(seq)
        seq.extend([int(t) for t in tokens])
        if len(seq) == start + 1:
            self._index_one(slot, start)  # a decode step's usual token (a third of the general path's time)
        else:
            self._index(slot, start, 0)

    def _index_one(self, slot: int, p: int) -> None:
        """:meth:`_index` of the single new offset ``p`` of ``slot`` (chained from offset 0 on): the same keys
        and links, without the general path's per-key-length lists."""
        seq = self.seqs[slot]
        keys = self.keys[slot]
        prevs = self.prevs[slot]
        pos = (slot << _OFF_BITS) | p
        lens = self.lens
        n0 = lens[0]
        if n0 == 1:
            key = seq[p] + 1
        else:
            key = (sum((seq[p - j] + 1) * _POW[j] for j in range(n0)) & _M64) if p + 1 >= n0 else 0
        for ri, n in enumerate(lens):
            if ri:
                h = lens[ri - 1]
                kh = keys[ri - 1]
                key = (kh[p] + kh[p - h] * _POW[h]) & _M64 if p >= n - 1 else 0
            keys[ri].append(key)
            if p >= n - 1:
                head = self.heads[ri]
                prevs[ri].append(head.get(key, -1))
                head[key] = pos
            else:
                prevs[ri].append(-1)

    def _index(self, slot: int, start: int, index_from: int) -> None:
        """Compute keys for offsets ``start..`` of ``slot`` and chain those ``>= index_from``."""
        seq = self.seqs[slot]
        end = len(seq)
        if start >= end:
            return
        lens = self.lens
        keys = self.keys[slot]
        prevs = self.prevs[slot]
        base = slot << _OFF_BITS
        n0 = lens[0]
        # shortest key directly, longer ones by doubling: key_2h(p) = key_h(p) + B^h * key_h(p - h)
        if n0 == 1:
            new = [t + 1 for t in seq[start:end]]
        else:
            pw = _POW[:n0]
            new = [
                (sum((seq[p - j] + 1) * pw[j] for j in range(n0)) & _M64) if p + 1 >= n0 else 0
                for p in range(start, end)
            ]
        for ri, n in enumerate(lens):
            if ri:
                h = lens[ri - 1]
                kh = keys[ri - 1]
                ph = _POW[h]
                lo = min(max(start, n - 1), end)  # a slot shorter than n - 1 has no n-gram keys yet
                new = [0] * (lo - start) + [(kh[p] + kh[p - h] * ph) & _M64 for p in range(lo, end)]
            keys[ri].extend(new)
            head = self.heads[ri]
            prev = prevs[ri]
            first = max(index_from, n - 1)
            off = start
            for k in new:
                if off >= first:
                    prev.append(head.get(k, -1))
                    head[k] = base | off
                else:
                    prev.append(-1)
                off += 1

    def find(self, q: tuple[int, ...], ri: int, key: int, limit: int, steps: int, out: list[Occurrence]) -> None:
        """Append to ``out`` up to ``limit`` occurrences (most recent first) of ``q[-n:]`` that have a next token."""
        p = self.heads[ri].get(key, -1)
        if p < 0:
            return
        n = self.lens[ri]
        qn = list(q[len(q) - n :])
        seqs = self.seqs
        prevs = self.prevs
        found = 0
        while p >= 0 and steps > 0:
            slot = p >> _OFF_BITS
            off = p & _OFF_MASK
            seq = seqs[slot]
            if off + 1 < len(seq) and seq[off + 1 - n : off + 1] == qn:
                out.append((seq, off))
                found += 1
                if found >= limit:
                    return
            p = prevs[slot][ri][off]
            steps -= 1

    def num_keys(self) -> int:
        return sum(len(h) for h in self.heads)

    def num_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)


class HistoryIndex:
    """Bounded FIFO hash-chain index over finished completions, stored in one flat buffer.

    Layout: ``buf = [SEP, seq0..., SEP, seq1..., SEP, ...]``, each stored sequence being ``context + tokens``
    (keys ending in the context are not chained). Head tables are fixed arrays of ``2**bits`` buckets per
    key length (multiplicative hash of the key; colliding keys share a chain and lookups verify the
    tokens). Whole sequences are inserted at once, vectorised with numpy. Evicting the oldest sequence only
    advances ``start``: positions decrease along a chain, so a walk stops at the first dead position. When
    the dead prefix outgrows the live part, the buffer is compacted and re-indexed (amortised O(1) per
    stored token). Memory: ``buf`` and ``prevs`` hold at most about twice the live tokens.
    """

    __slots__ = ("lens", "max_tokens", "bits", "buf", "prevs", "heads", "start", "entries", "num_tokens")

    def __init__(self, lens: tuple[int, ...], max_tokens: int) -> None:
        self.lens = lens
        self.max_tokens = max_tokens
        self.bits = max(10, min(24, (2 * max_tokens).bit_length()))
        self.heads: list[np.ndarray] = []  # allocated on first use
        self._clear()

    def _clear(self) -> None:
        self.buf = array("i", [SEP])
        self.prevs = [array("i", [-1]) for _ in self.lens]
        if self.heads:
            for h in self.heads:
                h.fill(-1)
        self.start = 1
        # (begin, context length, end): tokens at buf[begin:end], buf[end] is the separator
        self.entries: deque[tuple[int, int, int]] = deque()
        self.num_tokens = 0

    def bucket(self, key: int) -> int:
        return ((key * _GOLDEN) & _M64) >> (64 - self.bits)

    def add(self, items: Sequence[tuple[Sequence[int], int]]) -> None:
        """Store sequences ``(tokens, ctx_len)`` in order (the first ``ctx_len`` tokens of each are context
        only), evicting the oldest ones: afterwards the history holds the longest run of most recent
        sequences that fits in ``max_tokens`` (a sequence longer than that keeps its tail)."""
        kept: list[tuple[Sequence[int], int]] = []
        for tokens, ctx_len in items:
            if len(tokens) > self.max_tokens:
                cut = len(tokens) - self.max_tokens
                tokens, ctx_len = tokens[cut:], max(0, ctx_len - cut)
            if len(tokens) > ctx_len:
                kept.append((tokens, ctx_len))
        total = sum(len(t) for t, _ in kept)
        first = 0
        while total > self.max_tokens:
            total -= len(kept[first][0])
            first += 1
        kept = kept[first:]
        if not kept:
            return
        while self.entries and self.num_tokens + total > self.max_tokens:
            begin, _, end = self.entries.popleft()
            self.num_tokens -= end - begin
            self.start = end + 1
        if not self.entries:
            self.start = len(self.buf)
        dead = self.start - 1
        if dead >= MIN_COMPACT and dead > len(self.buf) - self.start:
            self._compact()
        if not self.heads:
            self.heads = [np.full(1 << self.bits, -1, dtype=np.int32) for _ in self.lens]
        self._append(kept)

    def _append(self, items: list[tuple[Sequence[int], int]]) -> None:
        """Append and chain ``items`` in one vectorised pass (no eviction)."""
        sizes = np.array([len(t) for t, _ in items], dtype=np.int64)
        parts: list[np.ndarray] = []
        for tokens, _ in items:
            parts.append(np.asarray(tokens, dtype=np.int64))
            parts.append(np.array([SEP], dtype=np.int64))
        chunk = np.concatenate(parts)  # seq0, SEP, seq1, SEP, ...
        begin = len(self.buf)
        self.buf.frombytes(chunk.astype(np.int32).tobytes())
        starts = np.concatenate(([0], np.cumsum(sizes + 1)[:-1]))
        rel = np.arange(len(chunk)) - np.repeat(starts, sizes + 1)  # offset inside its sequence
        size_of = np.repeat(sizes, sizes + 1)
        ctx_of = np.repeat(np.array([c for _, c in items], dtype=np.int64), sizes + 1)
        x = (chunk + 1).astype(np.uint64)  # separators -> 0; n-grams across them are never chained
        k = x.copy()
        for j in range(1, self.lens[0]):
            k[j:] += x[:-j] * np.uint64(_POW[j])
        shift = np.uint64(64 - self.bits)
        for ri, n in enumerate(self.lens):
            if ri:
                h = self.lens[ri - 1]
                k2 = k.copy()
                k2[h:] += k[:-h] * np.uint64(_POW[h])
                k = k2
            prev_vals = np.full(len(chunk), -1, dtype=np.int32)
            idx = np.nonzero((rel < size_of) & (rel >= np.maximum(ctx_of, n - 1)))[0]
            if len(idx):
                head = self.heads[ri]
                b = ((k[idx] * np.uint64(_GOLDEN)) >> shift).astype(np.int64)
                pos = (idx + begin).astype(np.int32)
                order = np.argsort(b, kind="stable")  # by bucket, then position
                sb = b[order]
                sp = pos[order]
                run_start = np.ones(len(sb), dtype=bool)
                run_start[1:] = sb[1:] != sb[:-1]
                # chain link: the previous position of the same bucket in this chunk, else the old head
                prev_vals[idx[order]] = np.where(run_start, head[sb], np.roll(sp, 1))
                run_end = np.ones(len(sb), dtype=bool)
                run_end[:-1] = run_start[1:]
                head[sb[run_end]] = sp[run_end]
            self.prevs[ri].frombytes(prev_vals.tobytes())
        for (_, c), st, size in zip(items, starts.tolist(), sizes.tolist()):
            self.entries.append((begin + st, c, begin + st + size))
        self.num_tokens += int(sizes.sum())

    def _compact(self) -> None:
        live = [(self.buf[b:e], c) for b, c, e in self.entries]
        logger.debug("suffix history: compacting %d dead tokens, re-indexing %d", self.start - 1, self.num_tokens)
        self._clear()
        if live:
            self._append(live)

    def find(self, q: tuple[int, ...], ri: int, key: int, limit: int, steps: int, out: list[Occurrence]) -> None:
        """Append to ``out`` up to ``limit`` live occurrences (most recent first) of ``q[-n:]`` with a next token."""
        if not self.entries:
            return
        p = int(self.heads[ri][self.bucket(key)])
        start = self.start
        if p < start:
            return
        n = self.lens[ri]
        qn = array("i", q[len(q) - n :])
        buf = self.buf
        prev = self.prevs[ri]
        found = 0
        while p >= start and steps > 0:
            if buf[p + 1] != SEP and buf[p + 1 - n : p + 1] == qn:
                out.append((buf, p))
                found += 1
                if found >= limit:
                    return
            p = prev[p]
            steps -= 1

    def sequences(self) -> list[tuple[list[int], int]]:
        return [(self.buf[b:e].tolist(), c) for b, c, e in self.entries]
