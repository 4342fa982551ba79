"""Tests of the offline replay simulator (atlas_rl/speculators/replay.py)."""

from __future__ import annotations

import math
import random

import pytest

from atlas_rl.speculators.replay import ReplayStats, replay
from atlas_rl.speculators.suffix import SuffixSpeculator
from atlas_rl.types import Draft, ProposeInput


class FixedDraft:
    """Always proposes the same chain (truncated to max_tokens) and records every call."""

    name = "fixed"
    hidden_layers: tuple[int, ...] = ()

    def __init__(self, chain: list[int]) -> None:
        self.chain = chain
        self.calls: list[tuple] = []

    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        self.calls.append(("start", group_id, list(prompt_ids), list(row_ids)))

    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        self.calls.append(
            ("propose", list(rows.row_ids), list(rows.group_ids), [list(t) for t in rows.token_ids], list(max_tokens))
        )
        return [Draft(self.chain[: max(k, 0)], None, [], self.name) for k in max_tokens]

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        self.calls.append(("observe", row_id, list(emitted_ids)))

    def stop(self, group_id: int) -> None:
        self.calls.append(("stop", group_id))


def test_replay_partial_acceptance_hand_computed() -> None:
    completion = [1, 7, 8, 5, 7, 8, 9, 2, 3]
    stats = replay(FixedDraft([7, 8, 9]), [([100, 101], [completion])], max_draft_tokens=3)
    # prefill emits 1; step 1: draft 7 8 9 vs 7 8 5 -> 2 accepted + recovered 5;
    # step 2: 7 8 9 vs 7 8 9 -> 3 accepted + bonus 2; step 3: one token left -> no draft, emits 3
    assert stats.num_prefill_tokens == 1
    assert stats.num_steps == 3
    assert stats.num_emitted_tokens == 8
    assert stats.mean_acceptance_length == pytest.approx(8 / 3)
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (2, 6, 5)
    assert stats.acceptance_rate == pytest.approx(5 / 6)
    assert stats.num_draft_tokens_per_pos == [2, 2, 2]
    assert stats.num_accepted_tokens_per_pos == [2, 2, 1]
    assert stats.acceptance_rate_per_pos == pytest.approx([1.0, 1.0, 0.5])


def test_replay_suffix_on_prompt_copy_hand_computed() -> None:
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    stats = replay(SuffixSpeculator(), [(prompt, [prompt])], max_draft_tokens=4)
    # prefill 5; step 1: draft 6 7 8 9 all accepted + bonus 10; step 2: 1 draft token (11) + bonus 12
    assert stats.num_steps == 2
    assert stats.num_emitted_tokens == 7
    assert stats.mean_acceptance_length == pytest.approx(3.5)
    assert (stats.num_draft_tokens, stats.num_accepted_tokens) == (5, 5)
    assert stats.num_draft_tokens_per_pos == [2, 1, 1, 1]
    assert stats.acceptance_rate == 1.0


def test_replay_random_tokens_gain_nothing() -> None:
    rng = random.Random(0)
    log = [
        ([rng.randrange(50_000) for _ in range(20)], [[rng.randrange(50_000) for _ in range(80)] for _ in range(4)])
        for _ in range(10)
    ]
    stats = replay(SuffixSpeculator(), log, max_draft_tokens=8, groups_per_call=2)
    assert stats.num_sequences == 40
    assert stats.num_emitted_tokens + stats.num_prefill_tokens == 40 * 80
    assert 1.0 <= stats.mean_acceptance_length < 1.02
    assert stats.acceptance_rate < 0.02 or math.isnan(stats.acceptance_rate)


def test_replay_exact_repeats_across_calls() -> None:
    # distinct tokens per group: in the second pass, the history holds each completion exactly once
    log = [([g * 1000 + i for i in range(10)], [[g * 1000 + 100 + i for i in range(21)]]) for g in range(5)]
    spec = SuffixSpeculator()
    first = replay(spec, log, max_draft_tokens=4)
    second = replay(spec, log, max_draft_tokens=4, group_id_offset=100, row_id_offset=100)
    assert first.mean_acceptance_length == pytest.approx(1.0)
    # 20 decode tokens per completion, 4 drafts + 1 bonus per step -> 4 steps, tau = 5 exactly
    assert second.num_steps == 5 * 4
    assert second.mean_acceptance_length == pytest.approx(5.0)
    assert second.acceptance_rate == 1.0


def test_replay_sibling_lead_gives_tau_above_one() -> None:
    # row B writes 40 unrelated tokens, then what row A wrote from the start: A's lead teaches B
    rng = random.Random(3)
    shared = [rng.randrange(10_000, 20_000) for _ in range(60)]
    detour = [rng.randrange(20_000, 30_000) for _ in range(40)]
    log = [([1, 2, 3], [shared, detour + shared])]
    with_drafts = replay(SuffixSpeculator(), log, max_draft_tokens=8)
    plain = replay(SuffixSpeculator(), log, max_draft_tokens=0)
    assert plain.mean_acceptance_length == 1.0
    assert with_drafts.mean_acceptance_length > 1.25
    assert with_drafts.num_emitted_tokens == plain.num_emitted_tokens == 59 + 99


def test_replay_k0_is_plain_decoding() -> None:
    stats = replay(SuffixSpeculator(), [([1, 2], [[3, 4, 5, 6], [7]])], max_draft_tokens=0)
    assert stats.mean_acceptance_length == 1.0
    assert stats.num_drafts == 0 and stats.num_draft_tokens == 0
    assert stats.num_steps == 3 and stats.num_prefill_tokens == 2


def test_replay_call_order_matches_engine() -> None:
    spec = FixedDraft([0])
    log = [([1], [[10, 11, 12], [20]]), ([2], [[30, 31], []]), ([3], [[40, 41, 42, 43]])]
    replay(spec, log, max_draft_tokens=2, groups_per_call=2)
    calls = spec.calls
    kinds = [c[0] for c in calls]
    # call 1 (groups 0 and 1): both start before any propose
    assert calls[0] == ("start", 0, [1], [0, 1])
    assert calls[1] == ("start", 1, [2], [2, 3])
    # prefill tokens are observed before the first propose
    assert calls[2:5] == [("observe", 0, [10]), ("observe", 1, [20]), ("observe", 2, [30])]
    first_propose = next(c for c in calls if c[0] == "propose")
    # rows of both groups interleaved in one propose; max_tokens = min(k, left - 1)
    assert first_propose[1] == [0, 2] and first_propose[2] == [0, 1]
    assert first_propose[3] == [[1, 10], [2, 30]]
    assert first_propose[4] == [1, 0]
    # a group stops once all its rows are done, before the next call starts
    stop_positions = {c[1]: i for i, c in enumerate(calls) if c[0] == "stop"}
    start_positions = {c[1]: i for i, c in enumerate(calls) if c[0] == "start"}
    assert set(stop_positions) == {0, 1, 2}
    assert stop_positions[0] < start_positions[2] and stop_positions[1] < start_positions[2]
    # every observe after a propose carries the tokens emitted by that row
    emitted: dict[int, list[int]] = {}
    for c in calls:
        if c[0] == "observe":
            emitted.setdefault(c[1], []).extend(c[2])
    assert emitted == {0: [10, 11, 12], 1: [20], 2: [30, 31], 4: [40, 41, 42, 43]}
    assert kinds.count("propose") >= 3


def test_replay_rejects_overlong_drafts_and_bad_args() -> None:
    class Greedy(FixedDraft):
        def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
            return [Draft([1, 2, 3, 4, 5], None, [], "greedy") for _ in max_tokens]

    with pytest.raises(ValueError, match="max_tokens"):
        replay(Greedy([]), [([1], [[1, 2, 3]])], max_draft_tokens=2)
    with pytest.raises(ValueError, match="max_draft_tokens"):
        replay(SuffixSpeculator(), [], max_draft_tokens=-1)
    with pytest.raises(ValueError, match="groups_per_call"):
        replay(SuffixSpeculator(), [], max_draft_tokens=2, groups_per_call=0)


def test_replay_stats_export() -> None:
    stats = replay(FixedDraft([7, 8, 9]), [([100], [[1, 7, 8, 5, 7, 8, 9, 2, 3]])], max_draft_tokens=3)
    spec_stats = stats.to_speculator_stats()
    assert spec_stats.mean_acceptance_length == pytest.approx(stats.mean_acceptance_length)
    assert spec_stats.acceptance_rate == pytest.approx(stats.acceptance_rate)
    assert spec_stats.num_accepted_tokens_per_pos == [2, 2, 1]
    d = stats.to_dict()
    assert d["mean_acceptance_length"] == pytest.approx(8 / 3) and d["max_draft_tokens"] == 3
    empty = ReplayStats(max_draft_tokens=4)
    assert math.isnan(empty.mean_acceptance_length) and math.isnan(empty.acceptance_rate)
