"""One counters type (AcceptanceCounters) behind the engine's totals, the per-speculator stats and the replay."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import BigramSpeculator

from atlas_rl import SamplingParams
from atlas_rl.config import EngineConfig
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators.replay import ReplayStats, replay
from atlas_rl.types import AcceptanceCounters, SpecStats, SpeculatorStats


def test_record_counts_row_forwards_drafts_and_positions():
    c = AcceptanceCounters()
    c.record(3, 1, 2)  # 3 drafted, first accepted, emitted accepted + recovered
    c.record(0, 0, 1)  # no draft
    c.record(2, 2, 3)  # all accepted + bonus
    assert (c.num_row_forwards, c.num_emitted_tokens) == (3, 6)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (2, 5, 3)
    assert c.num_draft_tokens_per_pos == [2, 2, 1] and c.num_accepted_tokens_per_pos == [2, 1, 0]
    assert c.mean_acceptance_length == 2.0 and c.acceptance_rate == pytest.approx(3 / 5)
    assert c.acceptance_rate_per_pos == [1.0, 0.5, 0.0]


def test_merge_equals_recording_everything_in_one():
    events = [(4, 2, 3), (0, 0, 1), (1, 0, 1), (6, 6, 7), (2, 1, 2)]
    whole, a, b = AcceptanceCounters(), AcceptanceCounters(), AcceptanceCounters()
    for i, e in enumerate(events):
        whole.record(*e)
        (a if i % 2 else b).record(*e)
    a.merge(b)
    assert a == whole


def test_empty_counters_give_nan_rates():
    c = AcceptanceCounters()
    assert math.isnan(c.mean_acceptance_length) and math.isnan(c.acceptance_rate) and c.acceptance_rate_per_pos == []


def test_spec_stats_totals_equal_the_sum_of_speculators_plus_spec_off_rows():
    """The engine's totals and its per-speculator stats come from the same records."""
    model = tiny_llama(vocab_size=64, dtype=torch.float64, seed=0)
    specs = [BigramSpeculator(64, soft=False, name="a"), BigramSpeculator(64, soft=True, seed=5, name="b")]
    eng = RolloutEngine(model, speculators=specs, config=EngineConfig(controller="fixed", num_speculative_tokens=3))
    st = eng.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=1.0, max_new_tokens=12, seed=1), 2).stats
    per = AcceptanceCounters()
    for s in st.per_speculator.values():
        per.merge(s)
    assert st.num_drafts == per.num_drafts > 0 and st.num_draft_tokens == per.num_draft_tokens
    assert st.num_accepted_tokens == per.num_accepted_tokens
    assert st.num_accepted_tokens_per_pos == per.num_accepted_tokens_per_pos
    assert st.num_row_forwards == per.num_row_forwards + st.num_spec_off_row_steps
    assert st.num_emitted_tokens == sum(s.num_emitted for s in st.steps)


def test_spec_stats_merge_keeps_counters_and_timings():
    a, b = SpecStats(num_steps=2, plan_s=0.5), SpecStats(num_steps=1, plan_s=0.25)
    a.record_row("x", 2, 1, 2)
    b.record_row(None, 0, 0, 1)
    b.record_row("x", 3, 3, 4)
    a.merge(b)
    assert (a.num_steps, a.plan_s, a.num_row_forwards, a.num_spec_off_row_steps) == (3, 0.75, 3, 1)
    x = a.per_speculator["x"]
    assert isinstance(x, SpeculatorStats) and x.num_drafts == 2 and x.num_draft_tokens_per_pos == [2, 2, 1]


def test_replay_stats_are_the_same_counters():
    class Echo:
        """Drafts the logged continuation (every draft token accepted)."""

        name, hidden_layers = "echo", ()

        def __init__(self, log):
            self.full = {tuple(p): c for p, cs in log for c in cs}

        def start(self, group_id, prompt_ids, row_ids):
            pass

        def propose(self, rows, max_tokens):
            from atlas_rl.types import Draft

            out = []
            for toks, k in zip(rows.token_ids, max_tokens):
                for p, c in self.full.items():
                    if tuple(toks[: len(p)]) == p:
                        done = len(toks) - len(p)
                        out.append(Draft(list(c[done : done + k])))
            return out

        def observe(self, row_id, emitted_ids):
            pass

        def stop(self, group_id):
            pass

    log = [([1, 2], [[5, 6, 7, 8, 9]])]
    stats = replay(Echo(log), log, max_draft_tokens=2)
    assert isinstance(stats, ReplayStats) and isinstance(stats, AcceptanceCounters)
    assert stats.num_steps == stats.num_row_forwards == 2  # 4 decode tokens: 3 (2 accepted + bonus) + 1
    assert stats.num_accepted_tokens_per_pos == [1, 1] and stats.to_dict()["num_steps"] == 2
    merged = SpeculatorStats()
    merged.merge(stats.to_speculator_stats())
    assert merged.num_row_forwards == 2 and merged.num_drafts == stats.num_drafts
