"""Model-free adaptive speculator: a suffix index over the prompt, the sibling samples and recent rollouts.

RL rollouts repeat themselves: the samples of one prompt group share long stretches (the same reasoning
scaffold, the same code), completions of earlier epochs recur, and outputs quote their prompt. Suffix
decoding (ArcticInference) exploits this without any model: match the most recent tokens of a sequence
against everything seen so far and propose what followed them there.

How it works
------------
Three corpora are visible to a row of prompt group ``g``:

(a) the row's own prompt and output, (b) the outputs of its siblings (the other samples of ``g``) and their
shared prompt, both held in the group's index until ``stop(g)``, and (c) a bounded FIFO history of the
completions of groups already stopped (across ``generate`` calls; see ``max_history_tokens``).

Each corpus is an n-gram *hash-chain* index (:mod:`~atlas_rl.speculators.suffix_index`), the structure of
LZ77 compressors: for a few key lengths ``n`` (the ladder ``min_match_len * 2**i <= max_match_len``) a head
table maps the key of an n-gram (a polynomial hash, computed by doubling from the shorter one) to the most
recent position where it ended, and a ``prev`` array links each position to the previous one with the same
key. Appending a token costs a few arithmetic and table operations per key length (``O(log max_match_len)``
work, no rebuilding), and a chain yields the occurrences of an n-gram most recent first, so a lookup walks at
most ``max_chain_steps`` links and keeps at most ``max_occurrences`` occurrences.

``propose`` takes the last ``max_match_len`` tokens of the row, finds the longest ladder length with
occurrences (group first, then history), extends each occurrence's match backwards to its exact length (up
to ``max_match_len``) and keeps the occurrences with the longest match: the suffix-tree node of the longest
matching suffix, restricted to its most recent occurrences (when a short n-gram has more than
``max_occurrences`` recent occurrences, a longer match further back may be missed). From there it walks
greedily, like the frequency-weighted walk of a suffix tree: at each depth the most frequent next token
among the occurrences still consistent with the path is chosen (ties go to the most recent occurrence),
the others are dropped, and the walk stops at ``max_tokens[i]`` tokens, when the conditional frequency
drops below ``min_token_prob`` or when no occurrence continues. Occurrences without a next token (the
row's own latest position, a sibling that has not yet got further, the end of a stored completion) are
not counted.

Confidence
----------
``Draft.confidence[j]`` estimates the probability that token ``j`` is accepted given that tokens ``< j``
were (one-hot draft, so this is the target's probability of that token under greedy verification)::

    confidence_j = c_j / (n_j + count_prior) * m_j / (m_j + match_prior)

where ``n_j`` is the number of consistent occurrences that continue at depth ``j``, ``c_j`` how many of
them continue with the chosen token, and ``m_j = match_len + j`` the length of context the path has
matched. The first factor is the conditional frequency shrunk towards 0 when few occurrences support it
(a single occurrence gives 1/2); the second lowers short matches (a 1-token match halves the estimate).
Both priors are configurable; the controller calibrates these numbers online against measured acceptance.

Token ids must lie in ``[0, 2**31)``. The engine's sequence is the truth: tokens a row emitted but never
passed to ``observe`` (for example the prefill token) are indexed when ``propose`` sees them.

Costs and the evaluation of Snowflake's ``arctic-inference`` package (measured; why we keep this index):
``docs/decisions/suffix_vs_arctic_inference.md``.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from atlas_rl.speculators.base import register_speculator
from atlas_rl.speculators.suffix_index import (
    MIN_COMPACT,
    SEP,
    GroupIndex,
    HistoryIndex,
    Occurrence,
    longest_matches,
    rolling_keys,
)
from atlas_rl.types import Draft, ProposeInput

logger = logging.getLogger(__name__)

__all__ = ["SuffixConfig", "SuffixSpeculator"]

_STATE_FORMAT = "atlas-rl/suffix-history"
_STATE_VERSION = 1
_MIN_COMPACT = MIN_COMPACT  # the history's compaction threshold (tests read it here)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_prob(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= float(x) <= 1.0


@dataclass
class SuffixConfig:
    """Configuration of :class:`SuffixSpeculator`.

    Matching: ``min_match_len``, ``max_match_len``, ``max_occurrences``, ``max_chain_steps``.
    Drafting: ``min_token_prob``, ``min_path_prob``, ``confidence_count_prior``, ``confidence_match_prior``.
    History: ``max_history_tokens``, ``history_include_prompt``.
    """

    min_match_len: int = field(
        default=1,
        metadata={"help": "Shortest suffix of the sequence that may be matched to propose a draft (>= 1)."},
    )
    max_match_len: int = field(
        default=16,
        metadata={
            "help": "Longest suffix matched (>= min_match_len). Longer matches predict better; each stored "
            "token costs about log2(max_match_len / min_match_len) + 1 index updates."
        },
    )
    max_occurrences: int = field(
        default=32,
        metadata={"help": "Most recent occurrences of the matched suffix used to build a draft (>= 1)."},
    )
    max_chain_steps: int = field(
        default=256,
        metadata={
            "help": "Hash-chain links walked per lookup and match length (>= max_occurrences): bounds the "
            "work of one lookup whatever the history holds."
        },
    )
    min_token_prob: float = field(
        default=0.1,
        metadata={
            "help": "Stop the draft when the chosen token's frequency among the occurrences consistent "
            "with the path falls below this, in [0, 1]."
        },
    )
    min_path_prob: float = field(
        default=0.0,
        metadata={
            "help": "Stop the draft when the product of the per-token confidences falls below this, in "
            "[0, 1] (0 disables it; the controller usually truncates drafts itself)."
        },
    )
    max_history_tokens: int = field(
        default=200_000,
        metadata={
            "help": "Tokens of finished completions kept across generate calls (FIFO eviction of whole "
            "completions; 0 disables the history). Memory is O(this)."
        },
    )
    history_include_prompt: bool = field(
        default=False,
        metadata={"help": "Also store each finished group's prompt (once) in the history."},
    )
    confidence_count_prior: float = field(
        default=1.0,
        metadata={"help": "Shrinks confidence when few occurrences support a token: c / (n + prior); >= 0."},
    )
    confidence_match_prior: float = field(
        default=1.0,
        metadata={"help": "Lowers confidence of short matches: factor m / (m + prior); >= 0."},
    )

    def __post_init__(self) -> None:
        for name in ("min_match_len", "max_match_len", "max_occurrences", "max_chain_steps", "max_history_tokens"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"SuffixConfig.{name} must be an int, got {getattr(self, name)!r}")
        self._check_matching()
        self._check_drafting_and_history()

    def _check_matching(self) -> None:
        if self.min_match_len < 1:
            raise ValueError(
                f"SuffixConfig.min_match_len must be >= 1 (a draft needs at least one matched token), "
                f"got {self.min_match_len}"
            )
        if self.max_match_len < self.min_match_len:
            raise ValueError(
                f"SuffixConfig.max_match_len ({self.max_match_len}) must be >= min_match_len "
                f"({self.min_match_len}): raise max_match_len or lower min_match_len"
            )
        if self.max_match_len > 1024:
            raise ValueError(f"SuffixConfig.max_match_len must be <= 1024, got {self.max_match_len}")
        if self.max_occurrences < 1:
            raise ValueError(f"SuffixConfig.max_occurrences must be >= 1, got {self.max_occurrences}")
        if self.max_chain_steps < self.max_occurrences:
            raise ValueError(
                f"SuffixConfig.max_chain_steps ({self.max_chain_steps}) must be >= max_occurrences "
                f"({self.max_occurrences}), or lookups could never collect max_occurrences occurrences"
            )

    def _check_drafting_and_history(self) -> None:
        if not 0 <= self.max_history_tokens < 2**30:
            raise ValueError(
                f"SuffixConfig.max_history_tokens must be in [0, 2**30) (0 disables the history), "
                f"got {self.max_history_tokens}"
            )
        for name in ("min_token_prob", "min_path_prob"):
            if not _is_prob(getattr(self, name)):
                raise ValueError(f"SuffixConfig.{name} must be a number in [0, 1], got {getattr(self, name)!r}")
        for name in ("confidence_count_prior", "confidence_match_prior"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"SuffixConfig.{name} must be a finite number >= 0, got {v!r}")
        if not isinstance(self.history_include_prompt, bool):
            raise ValueError(
                f"SuffixConfig.history_include_prompt must be a bool, got {self.history_include_prompt!r}"
            )

    @property
    def match_lens(self) -> tuple[int, ...]:
        """The indexed key lengths: min, 2*min, 4*min, ... up to max_match_len.

        Matches longer than the largest of them (up to ``max_match_len``) are measured exactly when the
        occurrences found at the largest indexed length are extended backwards.
        """
        out: list[int] = []
        n = self.min_match_len
        while n <= self.max_match_len:
            out.append(n)
            n *= 2
        return tuple(out)


@register_speculator("suffix")
class SuffixSpeculator:
    """Model-free, adaptive speculator over the prompt, sibling samples and recent rollouts (module docstring).

    Implements the :class:`~atlas_rl.speculators.base.Speculator` protocol; drafts are one-hot
    (``draft_probs=None``) chains with per-token confidences.

    Args:
        config: a :class:`SuffixConfig`; ``None`` uses the defaults.
        **overrides: fields of :class:`SuffixConfig` to override, e.g. ``SuffixSpeculator(max_match_len=32)``.
    """

    name: str = "suffix"
    hidden_layers: tuple[int, ...] = ()
    # The controller's starting belief (per-token acceptance): what the index achieved on held-out broad prompts
    # (0.49 per observed token at T=0, ~0.2 at T=1, k=4; static head v1 card). Its one-hot drafts are evaluated
    # from the emitted tokens whether verified or not, so a workload where it does better (code edits, repeated
    # expressions) is learned within a few steps, without verifying drafts on thin evidence at a loss.
    expected_acceptance: float | None = 0.3

    def __init__(self, config: SuffixConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = SuffixConfig()
        elif not isinstance(config, SuffixConfig):
            raise TypeError(f"config must be a SuffixConfig or None, got {type(config).__name__}")
        if overrides:
            known = {f.name for f in fields(SuffixConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise TypeError(f"unknown SuffixConfig field(s) {unknown}; known: {sorted(known)}")
            config = SuffixConfig(**{**asdict(config), **overrides})
        self.config = config
        self._lens = config.match_lens
        self._groups: dict[int, GroupIndex] = {}
        self._rows: dict[int, tuple[GroupIndex, int]] = {}
        self._history: HistoryIndex | None = (
            HistoryIndex(self._lens, config.max_history_tokens) if config.max_history_tokens > 0 else None
        )

    # ------------------------------------------------------------------ lifecycle

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        """A prompt group begins: each row of ``row_ids`` starts as ``prompt_ids`` with no output."""
        if group_id in self._groups:
            logger.warning("suffix: group %s started while still active; stopping the old one first", group_id)
            self.stop(group_id)
        group = GroupIndex(prompt_ids, self._lens, self.config.max_match_len - 1)
        self._groups[group_id] = group
        for row_id in row_ids:
            if row_id in self._rows:
                logger.warning("suffix: row %s restarted in group %s while still active elsewhere", row_id, group_id)
            self._rows[row_id] = (group, group.add_row(row_id))

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        """Append the tokens ``row_id`` emitted this step to its sequence and index them (unknown rows: ignored)."""
        loc = self._rows.get(row_id)
        if loc is None:
            logger.debug("suffix: observe for unknown row %s ignored", row_id)
            return
        if emitted_ids:
            loc[0].extend(loc[1], emitted_ids)

    def stop(self, group_id: int) -> None:
        """The group ends: its completions (and, if configured, its prompt) move into the history."""
        group = self._groups.pop(group_id, None)
        if group is None:
            logger.debug("suffix: stop for unknown group %s ignored", group_id)
            return
        for row_id in group.row_slots:
            loc = self._rows.get(row_id)
            if loc is not None and loc[0] is group:
                del self._rows[row_id]
        hist = self._history
        if hist is None:
            return
        items: list[tuple[Sequence[int], int]] = []
        if self.config.history_include_prompt and group.prompt:
            items.append((group.prompt, 0))
        items += [(group.seqs[slot], group.ctx_len) for slot in group.row_slots.values()]
        hist.add(items)

    def reset(self) -> None:
        """Drop every active group and the whole history."""
        self._groups.clear()
        self._rows.clear()
        if self._history is not None:
            self._history = HistoryIndex(self._lens, self.config.max_history_tokens)

    # ------------------------------------------------------------------ drafting

    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        """One draft per row of ``rows``, each at most ``max_tokens[i]`` tokens (possibly empty)."""
        if len(max_tokens) != len(rows.token_ids) or len(rows.row_ids) != len(rows.token_ids):
            raise ValueError(
                f"propose got {len(rows.row_ids)} row_ids, {len(rows.token_ids)} token_ids and "
                f"{len(max_tokens)} max_tokens: they must have one entry per row"
            )
        drafts: list[Draft] = []
        for i, tokens in enumerate(rows.token_ids):
            k = max_tokens[i]
            if k <= 0:
                drafts.append(Draft([], None, [], self.name))
                continue
            loc = self._rows.get(rows.row_ids[i])
            keys: list[int] | None = None
            if loc is not None:
                group: GroupIndex | None = loc[0]
                keys = self._sync(loc[0], loc[1], tokens)
            else:
                group = self._groups.get(rows.group_ids[i]) if i < len(rows.group_ids) else None
            match_len, occ = self._match(group, tokens, keys)
            ids, conf = self._walk(occ, match_len, k) if occ else ([], [])
            drafts.append(Draft(ids, None, conf, self.name))
        return drafts

    @staticmethod
    def _sync(group: GroupIndex, slot: int, tokens: Sequence[int]) -> list[int] | None:
        """Catch up with tokens the engine emitted but never passed to ``observe`` (e.g. the prefill token).

        Returns the row's stored keys at its last position (the query keys) when the row is in step with
        ``tokens``, else None.
        """
        have = group.output_len(slot)
        missing = (len(tokens) - len(group.prompt)) - have
        if missing > 0:
            group.extend(slot, tokens[len(tokens) - missing :])
        elif missing < 0 or have == 0:
            return None
        return [k[-1] for k in group.keys[slot]]

    def _match(
        self, group: GroupIndex | None, tokens: Sequence[int], keys: list[int] | None = None
    ) -> tuple[int, list[Occurrence]]:
        """The longest suffix of ``tokens`` (<= max_match_len) that occurred before with a continuation, and
        its most recent occurrences (group first, then history): ``(match_len, [(sequence, end index)])``.

        ``keys``, when given, are the keys of the last ``n`` tokens for every indexed length ``n`` (a wrong
        key only costs a missed match: occurrences are verified against the tokens).
        """
        lens = self._lens
        L = min(len(tokens), self.config.max_match_len)
        if L < lens[0]:
            return 0, []
        q = tuple(map(int, tokens[len(tokens) - L :]))
        usable = tuple(n for n in lens if n <= L)
        if keys is None:
            keys = rolling_keys(q, usable)
        n, cands = self._occurrences(group, q, usable, keys)
        if not cands:
            return 0, []
        return longest_matches(cands, q, n)

    def _occurrences(
        self, group: GroupIndex | None, q: tuple[int, ...], usable: tuple[int, ...], keys: list[int]
    ) -> tuple[int, list[Occurrence]]:
        """Occurrences of the longest indexed suffix of ``q`` found (group first, then history):
        ``(its length, occurrences)``, no occurrences when no indexed length matches."""
        hist = self._history
        limit = self.config.max_occurrences
        steps = self.config.max_chain_steps
        cands: list[Occurrence] = []
        n = 0
        for ri in range(len(usable) - 1, -1, -1):
            n = usable[ri]
            if group is not None:
                group.find(q, ri, keys[ri], limit, steps, cands)
            if hist is not None and len(cands) < limit:
                hist.find(q, ri, keys[ri], limit - len(cands), steps, cands)
            if cands:
                break
        return n, cands

    def _walk(self, occ: list[Occurrence], match_len: int, k: int) -> tuple[list[int], list[float]]:
        """Frequency-weighted greedy walk over the continuations of ``occ`` (at most ``k`` tokens)."""
        ids: list[int] = []
        conf: list[float] = []
        path = 1.0
        while len(ids) < k and len(occ) > 1:
            step = self._walk_step(occ, match_len + len(ids))
            if step is None:
                return ids, conf
            tok, p = step
            path *= p
            if path < self.config.min_path_prob:
                return ids, conf
            ids.append(tok)
            conf.append(p)
            occ = [(seq, idx + 1) for seq, idx in occ if idx + 1 < len(seq) and seq[idx + 1] == tok]
        if len(ids) < k and occ:  # one occurrence left: copy its continuation
            self._copy_tail(occ[0], match_len, k, path, ids, conf)
        return ids, conf

    def _walk_step(self, occ: list[Occurrence], m: int) -> tuple[int, float] | None:
        """The most frequent next token among ``occ`` and its confidence (``m``: context matched so far), or None
        when no occurrence continues or the token's conditional frequency is below ``min_token_prob``."""
        counts: dict[int, int] = {}
        total = 0
        for seq, idx in occ:
            j = idx + 1
            if j < len(seq) and seq[j] >= 0:
                counts[seq[j]] = counts.get(seq[j], 0) + 1
                total += 1
        if not total:
            return None
        tok = max(counts, key=counts.__getitem__)  # first maximum = most recent occurrence among ties
        c = counts[tok]
        if c < self.config.min_token_prob * total:
            return None
        return tok, c / (total + self.config.confidence_count_prior) * self._match_factor(m)

    def _copy_tail(
        self, occurrence: Occurrence, match_len: int, k: int, path: float, ids: list[int], conf: list[float]
    ) -> None:
        """Extend ``ids``/``conf`` in place with the continuation of a single occurrence (up to ``k`` tokens in all),
        each token at a one-occurrence confidence, until the path confidence drops below ``min_path_prob``."""
        seq, idx = occurrence
        tail = seq[idx + 1 : idx + 1 + k - len(ids)]
        if isinstance(tail, array):
            tail = tail.tolist()
            if SEP in tail:
                tail = tail[: tail.index(SEP)]
        base = 1.0 / (1.0 + self.config.confidence_count_prior)
        for t in tail:
            p = base * self._match_factor(match_len + len(ids))
            path *= p
            if path < self.config.min_path_prob:
                break
            ids.append(t)
            conf.append(p)

    def _match_factor(self, m: int) -> float:
        """Confidence factor of a path that matched ``m`` tokens of context: ``m / (m + match_prior)``."""
        match_prior = self.config.confidence_match_prior
        return m / (m + match_prior) if match_prior > 0 else 1.0

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The cross-call history as plain JSON-serialisable data (active groups are not included)."""
        seqs = self._history.sequences() if self._history is not None else []
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "sequences": [s for s, _ in seqs],
            "context_lens": [c for _, c in seqs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the history with the one saved by :meth:`state_dict` (this config's bound applies)."""
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a SuffixSpeculator state dict (expected format {_STATE_FORMAT!r})")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported suffix state version {state.get('version')!r}; expected {_STATE_VERSION}")
        seqs, ctxs = state.get("sequences"), state.get("context_lens")
        if not isinstance(seqs, list) or not isinstance(ctxs, list) or len(seqs) != len(ctxs):
            raise ValueError("suffix state dict needs lists 'sequences' and 'context_lens' of equal length")
        for s, c in zip(seqs, ctxs):
            if not isinstance(s, list) or not _is_int(c) or not 0 <= c <= len(s):
                raise ValueError(
                    "suffix state dict: each sequence must be a list of ints with 0 <= context_len <= len"
                )
            if any(not _is_int(t) or t < 0 for t in s):
                raise ValueError("suffix state dict: token ids must be non-negative ints")
        if self._history is None:
            if seqs:
                logger.warning(
                    "suffix: history disabled (max_history_tokens=0); %d saved sequences dropped", len(seqs)
                )
            return
        self._history = HistoryIndex(self._lens, self.config.max_history_tokens)
        self._history.add(list(zip(seqs, ctxs)))

    # ------------------------------------------------------------------ introspection

    @property
    def num_history_tokens(self) -> int:
        """Tokens currently stored in the cross-call history (context tokens included)."""
        return self._history.num_tokens if self._history is not None else 0

    def index_stats(self) -> dict[str, int]:
        """Sizes of the internal structures (for memory checks and debugging)."""
        h = self._history
        return {
            "history_tokens": h.num_tokens if h is not None else 0,
            "history_sequences": len(h.entries) if h is not None else 0,
            "history_buffer_len": len(h.buf) if h is not None else 0,
            "history_chain_entries": sum(len(p) for p in h.prevs) if h is not None else 0,
            "history_table_slots": sum(len(t) for t in h.heads) if h is not None else 0,
            "active_groups": len(self._groups),
            "active_rows": len(self._rows),
            "active_tokens": sum(g.num_tokens() for g in self._groups.values()),
            "active_index_keys": sum(g.num_keys() for g in self._groups.values()),
        }
