"""Offline replay: measure a speculator's acceptance on logged rollouts, without any model.

The idea comes from ArcticInference's suffix-decoding simulator. Given logged groups of responses (for
example the completions of earlier rollouts), :func:`replay` drives a speculator through the same calls the
engine makes and simulates a *greedy-acceptance* verifier: a draft token is accepted while it equals the
logged continuation; at the first mismatch (or after the last draft token) the logged next token is emitted
as the recovered (or bonus) token. For greedy decoding this is exactly what speculation would have given on
those sequences, so the mean acceptance length measured here is the hardware-independent speed-up bound;
for sampled logs it is the acceptance of one-hot drafts against the sampled tokens.

Call order (as in ``RolloutEngine.generate``), for each call of ``groups_per_call`` groups:

1. ``start(group_id, prompt_ids, row_ids)`` for every group of the call;
2. prefill: each row emits its first logged token (``observe(row_id, [c[0]])``), which is not a decode step;
3. decode steps until every row is done: one ``propose`` over all unfinished rows of the call (groups
   interleaved), with ``max_tokens = min(k, tokens left - 1)`` so that no draft runs past the logged end,
   then ``observe(row_id, emitted)`` for each row;
4. ``stop(group_id)`` as soon as every row of the group has finished.

Statistics follow the project's vocabulary (``atlas_rl.types``): mean acceptance length = tokens emitted per
verification step of a row, the recovered/bonus token included (1.0 means speculation gained nothing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from atlas_rl.speculators.base import Speculator
from atlas_rl.types import AcceptanceCounters, ProposeInput, SpeculatorStats

__all__ = ["ReplayLog", "ReplayStats", "replay"]

ReplayLog = Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
"""Logged groups: ``[(prompt_ids, [completion_ids, ...]), ...]`` (one entry per prompt group)."""


@dataclass(kw_only=True)
class ReplayStats(AcceptanceCounters):
    """Counters of one :func:`replay` (decode steps only; the prefill token of each row is counted apart).

    The acceptance counters are :class:`~atlas_rl.types.AcceptanceCounters` (the engine's type): every simulated
    row forward counts in ``num_row_forwards`` (also readable as ``num_steps``) and ``num_emitted_tokens``.
    """

    max_draft_tokens: int
    num_groups: int = 0
    num_sequences: int = 0
    num_prefill_tokens: int = 0
    num_propose_calls: int = 0
    propose_s: float = 0.0
    observe_s: float = 0.0

    @property
    def num_steps(self) -> int:
        """Simulated verification forwards of one row (= ``num_row_forwards``)."""
        return self.num_row_forwards

    @property
    def target_forwards_per_token(self) -> float:
        return 1.0 / self.mean_acceptance_length if self.num_row_forwards else float("nan")

    def to_speculator_stats(self) -> SpeculatorStats:
        """The same counters as a :class:`~atlas_rl.types.SpeculatorStats` (to merge with engine stats)."""
        out = SpeculatorStats(propose_s=self.propose_s)
        out.merge(self.counters())
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["num_steps"] = self.num_steps
        d["mean_acceptance_length"] = self.mean_acceptance_length
        d["acceptance_rate"] = self.acceptance_rate
        d["acceptance_rate_per_pos"] = self.acceptance_rate_per_pos
        return d


def replay(
    speculator: Speculator,
    log: ReplayLog,
    max_draft_tokens: int,
    *,
    groups_per_call: int = 1,
    group_id_offset: int = 0,
    row_id_offset: int = 0,
) -> ReplayStats:
    """Replay ``log`` through ``speculator`` under a simulated greedy-acceptance verifier (module docstring).

    Args:
        speculator: any :class:`~atlas_rl.speculators.base.Speculator`; its state carries over between
            calls (and after this function returns), as it would across ``generate`` calls.
        log: ``[(prompt_ids, [completion_ids, ...]), ...]``, one entry per prompt group, in order.
        max_draft_tokens: the fixed draft length k asked for at each step (>= 0; 0 measures plain decoding).
        groups_per_call: groups simulated concurrently, as one ``generate`` call with that many prompts.
        group_id_offset, row_id_offset: first group / row id used (ids are consecutive across the log).

    Returns:
        The :class:`ReplayStats` of the whole log.

    Raises:
        ValueError: bad arguments, or a speculator that returns the wrong number of drafts or a draft
            longer than asked for.
    """
    if isinstance(max_draft_tokens, bool) or not isinstance(max_draft_tokens, int) or max_draft_tokens < 0:
        raise ValueError(f"max_draft_tokens must be an int >= 0, got {max_draft_tokens!r}")
    if isinstance(groups_per_call, bool) or not isinstance(groups_per_call, int) or groups_per_call < 1:
        raise ValueError(f"groups_per_call must be an int >= 1, got {groups_per_call!r}")
    stats = ReplayStats(max_draft_tokens=max_draft_tokens)
    entries = list(log)
    next_row_id = row_id_offset
    for call_start in range(0, len(entries), groups_per_call):
        call = entries[call_start : call_start + groups_per_call]
        rows, left = _start_call(speculator, call, group_id_offset + call_start, next_row_id, stats)
        next_row_id += len(rows)
        _stop_finished(speculator, left)
        while left:
            _decode_step(speculator, [r for r in rows if r.remaining > 0], max_draft_tokens, left, stats)
            _stop_finished(speculator, left)
    return stats


def _start_call(
    speculator: Speculator, call: ReplayLog, first_group: int, first_row: int, stats: ReplayStats
) -> tuple[list[_Row], dict[int, int]]:
    """``start`` every group of one simulated ``generate`` call and emit each row's prefill token; returns the rows
    and the rows still generating per group."""
    rows: list[_Row] = []
    left: dict[int, int] = {}  # group id -> rows still generating
    for g, (prompt, completions) in enumerate(call):
        group_id = first_group + g
        prompt_ids = [int(t) for t in prompt]
        row_ids = list(range(first_row + len(rows), first_row + len(rows) + len(completions)))
        speculator.start(group_id, list(prompt_ids), list(row_ids))
        stats.num_groups += 1
        left[group_id] = 0
        for rid, comp in zip(row_ids, completions):
            rows.append(_Row(rid, group_id, [int(t) for t in comp], list(prompt_ids), len(prompt_ids)))
    for row in rows:  # the prefill forward emits each row's first token
        stats.num_sequences += 1
        if row.completion:
            row.seq.append(row.completion[0])
            stats.num_prefill_tokens += 1
            _observe(speculator, row.row_id, [row.completion[0]], stats)
        if row.remaining > 0:
            left[row.group_id] += 1
    return rows, left


def _decode_step(
    speculator: Speculator, active: list[_Row], max_draft_tokens: int, left: dict[int, int], stats: ReplayStats
) -> None:
    """One simulated verification step of every unfinished row."""
    budget = [min(max_draft_tokens, r.remaining - 1) for r in active]
    inp = ProposeInput(
        row_ids=[r.row_id for r in active],
        group_ids=[r.group_id for r in active],
        token_ids=[r.seq for r in active],
    )
    t0 = time.perf_counter()
    drafts = speculator.propose(inp, budget)
    stats.propose_s += time.perf_counter() - t0
    stats.num_propose_calls += 1
    if len(drafts) != len(active):
        raise ValueError(f"speculator returned {len(drafts)} drafts for {len(active)} rows")
    for row, draft, cap in zip(active, drafts, budget):
        draft_ids = list(draft.token_ids)
        if len(draft_ids) > cap:
            raise ValueError(f"speculator proposed {len(draft_ids)} tokens for row {row.row_id} with max_tokens={cap}")
        pos = len(row.seq) - row.prompt_len  # index of the next logged token
        accepted = 0
        while accepted < len(draft_ids) and draft_ids[accepted] == row.completion[pos + accepted]:
            accepted += 1
        emitted = row.completion[pos : pos + accepted + 1]  # accepted drafts + recovered/bonus token
        stats.record(len(draft_ids), accepted, len(emitted))
        row.seq.extend(emitted)
        _observe(speculator, row.row_id, emitted, stats)
        if row.remaining == 0:
            left[row.group_id] -= 1


def _observe(speculator: Speculator, row_id: int, emitted: list[int], stats: ReplayStats) -> None:
    t0 = time.perf_counter()
    speculator.observe(row_id, emitted)
    stats.observe_s += time.perf_counter() - t0


@dataclass
class _Row:
    row_id: int
    group_id: int
    completion: list[int]
    seq: list[int]  # prompt + emitted so far (what the engine passes to propose)
    prompt_len: int

    @property
    def remaining(self) -> int:
        return len(self.completion) - (len(self.seq) - self.prompt_len)


def _stop_finished(speculator: Speculator, left: dict[int, int]) -> None:
    for group_id in [gid for gid, n in left.items() if n == 0]:
        speculator.stop(group_id)
        del left[group_id]
