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
from dataclasses import asdict, dataclass, field
from typing import Any

from atlas_rl.speculators.base import Speculator
from atlas_rl.types import ProposeInput, SpeculatorStats

__all__ = ["ReplayLog", "ReplayStats", "replay"]

ReplayLog = Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
"""Logged groups: ``[(prompt_ids, [completion_ids, ...]), ...]`` (one entry per prompt group)."""


@dataclass
class ReplayStats:
    """Counters of one :func:`replay` (decode steps only; the prefill token of each row is counted apart)."""

    max_draft_tokens: int
    num_groups: int = 0
    num_sequences: int = 0
    num_prefill_tokens: int = 0
    num_steps: int = 0  # simulated verification forwards of one row
    num_emitted_tokens: int = 0  # tokens emitted by those steps (accepted + recovered/bonus)
    num_drafts: int = 0  # non-empty drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_draft_tokens_per_pos: list[int] = field(default_factory=list)
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_propose_calls: int = 0
    propose_s: float = 0.0
    observe_s: float = 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification step of a row (bonus/recovered token included)."""
        return self.num_emitted_tokens / self.num_steps if self.num_steps else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """For each draft position j: accepted / proposed at j (conditional on a draft reaching j)."""
        return [
            a / d if d else float("nan")
            for a, d in zip(self.num_accepted_tokens_per_pos, self.num_draft_tokens_per_pos)
        ]

    @property
    def target_forwards_per_token(self) -> float:
        return 1.0 / self.mean_acceptance_length if self.num_steps else float("nan")

    def to_speculator_stats(self) -> SpeculatorStats:
        """The same counters as a :class:`~atlas_rl.types.SpeculatorStats` (to merge with engine stats)."""
        return SpeculatorStats(
            num_drafts=self.num_drafts,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            num_emitted_tokens=self.num_emitted_tokens,
            num_row_forwards=self.num_steps,
            num_accepted_tokens_per_pos=list(self.num_accepted_tokens_per_pos),
            num_draft_tokens_per_pos=list(self.num_draft_tokens_per_pos),
            propose_s=self.propose_s,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_acceptance_length"] = self.mean_acceptance_length
        d["acceptance_rate"] = self.acceptance_rate
        d["acceptance_rate_per_pos"] = self.acceptance_rate_per_pos
        return d

    def _count(self, draft_len: int, accepted: int) -> None:
        while len(self.num_draft_tokens_per_pos) < draft_len:
            self.num_draft_tokens_per_pos.append(0)
            self.num_accepted_tokens_per_pos.append(0)
        for j in range(draft_len):
            self.num_draft_tokens_per_pos[j] += 1
            if j < accepted:
                self.num_accepted_tokens_per_pos[j] += 1


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
        rows: list[_Row] = []
        left: dict[int, int] = {}  # group id -> rows still generating
        for g, (prompt, completions) in enumerate(entries[call_start : call_start + groups_per_call]):
            group_id = group_id_offset + call_start + g
            prompt_ids = [int(t) for t in prompt]
            row_ids = list(range(next_row_id, next_row_id + len(completions)))
            next_row_id += len(completions)
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
                t0 = time.perf_counter()
                speculator.observe(row.row_id, [row.completion[0]])
                stats.observe_s += time.perf_counter() - t0
            if row.remaining > 0:
                left[row.group_id] += 1
        _stop_finished(speculator, left)
        while left:
            active = [r for r in rows if r.remaining > 0]
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
                    raise ValueError(
                        f"speculator proposed {len(draft_ids)} tokens for row {row.row_id} with max_tokens={cap}"
                    )
                pos = len(row.seq) - row.prompt_len  # index of the next logged token
                accepted = 0
                while accepted < len(draft_ids) and draft_ids[accepted] == row.completion[pos + accepted]:
                    accepted += 1
                emitted = row.completion[pos : pos + accepted + 1]  # accepted drafts + recovered/bonus token
                stats.num_steps += 1
                stats.num_emitted_tokens += len(emitted)
                if draft_ids:
                    stats.num_drafts += 1
                    stats.num_draft_tokens += len(draft_ids)
                    stats.num_accepted_tokens += accepted
                    stats._count(len(draft_ids), accepted)
                row.seq.extend(emitted)
                t0 = time.perf_counter()
                speculator.observe(row.row_id, emitted)
                stats.observe_s += time.perf_counter() - t0
                if row.remaining == 0:
                    left[row.group_id] -= 1
            _stop_finished(speculator, left)
    return stats


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
