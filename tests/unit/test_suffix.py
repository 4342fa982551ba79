"""Tests of the model-free suffix speculator (atlas_rl/speculators/suffix.py)."""

from __future__ import annotations

import json
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_rl.speculators import SuffixSpeculator, build_speculator, registered_speculators
from atlas_rl.speculators.base import Speculator
from atlas_rl.speculators.suffix import _MIN_COMPACT, SuffixConfig
from atlas_rl.speculators.suffix_index import GroupIndex, rolling_keys
from atlas_rl.types import Draft, ProposeInput


def _propose(spec: SuffixSpeculator, row_id: int, group_id: int, tokens: list[int], k: int) -> Draft:
    (draft,) = spec.propose(ProposeInput([row_id], [group_id], [tokens]), [k])
    return draft


def _run_group(spec: SuffixSpeculator, group_id: int, prompt: list[int], outputs: list[list[int]], row0: int) -> None:
    rows = list(range(row0, row0 + len(outputs)))
    spec.start(group_id, prompt, rows)
    for r, out in zip(rows, outputs):
        spec.observe(r, out)
    spec.stop(group_id)


# ---------------------------------------------------------------- protocol, registry


def test_protocol_and_registry_suffix_is_a_speculator() -> None:
    spec = build_speculator("suffix", max_match_len=8)
    assert isinstance(spec, SuffixSpeculator)
    assert isinstance(spec, Speculator)
    assert "suffix" in registered_speculators()
    assert spec.name == "suffix" and spec.hidden_layers == ()
    assert spec.config.max_match_len == 8


# ---------------------------------------------------------------- the three corpora


def test_propose_repeated_pattern_in_prompt() -> None:
    spec = SuffixSpeculator()
    prompt = [50, 10, 11, 12, 13, 14, 15, 51, 52]
    spec.start(0, prompt, [0])
    spec.observe(0, [10, 11])
    draft = _propose(spec, 0, 0, prompt + [10, 11], 4)
    assert draft.token_ids == [12, 13, 14, 15]
    assert draft.draft_probs is None and draft.speculator == "suffix"
    assert len(draft.confidence) == 4


def test_propose_own_output_repetition() -> None:
    spec = SuffixSpeculator()
    prompt = [1, 2, 3]
    spec.start(0, prompt, [0])
    out = [20, 21, 22, 23, 24, 30, 20, 21]
    spec.observe(0, out)
    assert _propose(spec, 0, 0, prompt + out, 3).token_ids == [22, 23, 24]


def test_propose_sibling_continuation() -> None:
    spec = SuffixSpeculator()
    prompt = [1, 2, 3, 4]
    spec.start(7, prompt, [0, 1])
    a = [100, 101, 102, 103, 104, 105, 106, 107]
    spec.observe(0, a)
    spec.observe(1, a[:3])
    draft = _propose(spec, 1, 7, prompt + a[:3], 5)
    assert draft.token_ids == a[3:8]


def test_propose_prefers_longest_match() -> None:
    spec = SuffixSpeculator()
    # "5 6" continues with 7 in the prompt, but "4 5 6" (longer) continues with 9 in the sibling
    prompt = [5, 6, 7, 0]
    spec.start(0, prompt, [0, 1])
    spec.observe(0, [4, 5, 6, 9, 9])
    spec.observe(1, [4, 5, 6])
    assert _propose(spec, 1, 0, prompt + [4, 5, 6], 1).token_ids == [9]


def test_history_used_after_stop_and_not_without_history() -> None:
    completion = [300, 301, 302, 303, 304, 305, 306]
    for bound, expected in ((200_000, completion[2:6]), (0, [])):
        spec = SuffixSpeculator(max_history_tokens=bound)
        _run_group(spec, 0, [1, 2, 3], [completion], row0=0)
        assert spec.index_stats()["active_groups"] == 0
        # a new call: another group, another prompt; the row starts like the old completion
        spec.start(0, [9, 8], [5])
        spec.observe(5, completion[:2])
        assert _propose(spec, 5, 0, [9, 8] + completion[:2], 4).token_ids == expected


def test_history_include_prompt() -> None:
    prompt = [40, 41, 42, 43, 44, 45]
    for include, expected in ((True, [43, 44, 45]), (False, [])):
        spec = SuffixSpeculator(history_include_prompt=include)
        _run_group(spec, 0, prompt, [[1, 2]], row0=0)
        spec.start(1, [9], [3])
        spec.observe(3, [41, 42])
        assert _propose(spec, 3, 1, [9, 41, 42], 3).token_ids == expected


def test_propose_catches_up_unobserved_tokens() -> None:
    """The engine's sequence is the truth: tokens never passed to observe are indexed at propose time."""
    spec = SuffixSpeculator()
    prompt = [1, 2]
    spec.start(0, prompt, [0, 1])
    a = [60, 61, 62, 63, 64]
    _propose(spec, 0, 0, prompt + a, 1)  # row 0 never observed: caught up here
    spec.observe(1, [60, 61])
    assert _propose(spec, 1, 0, prompt + [60, 61], 3).token_ids == [62, 63, 64]


def test_unknown_rows_and_groups_are_harmless(caplog: pytest.LogCaptureFixture) -> None:
    spec = SuffixSpeculator()
    spec.observe(123, [1, 2, 3])  # ignored
    spec.stop(99)  # ignored
    assert _propose(spec, 5, 5, [1, 2, 3], 4).token_ids == []
    spec.start(0, [1, 2, 3, 1, 2], [0])
    # an unknown row of a known group still sees the group's prompt
    assert _propose(spec, 42, 0, [7, 1, 2], 1).token_ids == [3]
    with caplog.at_level(logging.WARNING, logger="atlas_rl.speculators.suffix"):
        spec.start(0, [5], [0])  # restart of an active group: the old one is stopped first
    assert "still active" in caplog.text
    assert spec.index_stats()["active_groups"] == 1


# ---------------------------------------------------------------- max_tokens, confidence


def test_max_tokens_respected_in_mixed_batch() -> None:
    spec = SuffixSpeculator()
    prompt = list(range(10, 40))
    spec.start(0, prompt, [0, 1, 2, 3])
    for r in range(4):
        spec.observe(r, [10, 11])
    seqs = [prompt + [10, 11]] * 4
    drafts = spec.propose(ProposeInput([0, 1, 2, 3], [0, 0, 0, 0], seqs), [0, 2, 5, 100])
    assert [len(d) for d in drafts] == [0, 2, 5, 28]  # the last one runs to the end of the prompt
    assert drafts[0].token_ids == [] and drafts[0].confidence == []
    assert drafts[2].token_ids == list(range(12, 17))
    with pytest.raises(ValueError, match="one entry per row"):
        spec.propose(ProposeInput([0, 1], [0, 0], seqs[:2]), [3])


def test_confidence_majority_wins_and_formula() -> None:
    spec = SuffixSpeculator()
    # history: after "7 8" comes 1 three times and 2 once
    outputs = [[7, 8, 1, 50], [7, 8, 1, 51], [7, 8, 2, 52], [7, 8, 1, 53]]
    _run_group(spec, 0, [99], outputs, row0=0)
    spec.start(1, [98], [10])
    spec.observe(10, [7, 8])
    draft = _propose(spec, 10, 1, [98, 7, 8], 2)
    assert draft.token_ids[0] == 1
    # 3 of 4 occurrences, match length 2: 3 / (4 + 1) * 2 / (2 + 1)
    assert draft.confidence[0] == pytest.approx(3 / 5 * 2 / 3)
    # then 3 occurrences left, each continuing differently: the most recent one wins the tie
    assert draft.token_ids[1] == 53
    assert draft.confidence[1] == pytest.approx(1 / 4 * 3 / 4)
    assert all(0.0 <= c <= 1.0 for c in draft.confidence)


def test_min_token_prob_stops_the_draft() -> None:
    outputs = [[7, 8, t] for t in range(1, 6)]  # five different continuations: frequency 0.2 each
    for threshold, expected_len in ((0.1, 1), (0.25, 0)):
        spec = SuffixSpeculator(min_token_prob=threshold)
        _run_group(spec, 0, [99], outputs, row0=0)
        spec.start(1, [98], [10])
        spec.observe(10, [7, 8])
        assert len(_propose(spec, 10, 1, [98, 7, 8], 3)) == expected_len


def test_min_path_prob_stops_the_draft() -> None:
    prompt = list(range(100, 120))
    lengths = []
    for min_path in (0.0, 0.1):
        spec = SuffixSpeculator(min_path_prob=min_path)
        spec.start(0, prompt, [0])
        spec.observe(0, [100, 101])
        lengths.append(len(_propose(spec, 0, 0, prompt + [100, 101], 10)))
    # one occurrence, match length 2: confidences 1/2 * 2/3, 1/2 * 3/4, 1/2 * 4/5 -> products .33, .125, .05
    assert lengths == [10, 2]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=st.lists(st.integers(0, 4), min_size=1, max_size=80),
    k=st.integers(0, 12),
    min_match_len=st.integers(1, 3),
)
def test_drafts_bounded_and_confidences_in_unit_interval(stream: list[int], k: int, min_match_len: int) -> None:
    spec = SuffixSpeculator(min_match_len=min_match_len, max_match_len=6)
    _run_group(spec, 0, [0, 1, 2], [stream, stream[::-1]], row0=0)
    spec.start(1, [3, 4], [5])
    seq = [3, 4]
    for t in stream:
        spec.observe(5, [t])
        seq.append(t)
        draft = _propose(spec, 5, 1, seq, k)
        assert len(draft) <= k
        assert len(draft.confidence) == len(draft.token_ids)
        assert all(0.0 <= c <= 1.0 for c in draft.confidence)


# ---------------------------------------------------------------- brute-force reference


def _brute_force(
    corpora: list[tuple[list[int], int]], tokens: list[int], cfg: SuffixConfig, k: int
) -> tuple[int, list[int], list[float], int]:
    """Longest match over every occurrence (no caps), then the frequency walk. Returns
    (match_len, ids, confidences, depth of the first tie or k)."""
    L = min(len(tokens), cfg.max_match_len)
    q = tokens[len(tokens) - L :]
    occ: list[tuple[list[int], int]] = []
    best = 0
    for seq, index_from in corpora:
        for e in range(index_from, len(seq) - 1):
            m = 0
            while m < L and e - m >= 0 and seq[e - m] == q[L - 1 - m]:
                m += 1
            if m < cfg.min_match_len:
                continue
            if m > best:
                best, occ = m, []
            if m == best:
                occ.append((seq, e))
    ids: list[int] = []
    conf: list[float] = []
    tie = k
    for depth in range(k):
        counts: dict[int, int] = {}
        for seq, e in occ:
            if e + 1 < len(seq):
                counts[seq[e + 1]] = counts.get(seq[e + 1], 0) + 1
        if not counts:
            break
        total = sum(counts.values())
        top = max(counts.values())
        if top < cfg.min_token_prob * total:
            break
        if sum(1 for c in counts.values() if c == top) > 1:
            tie = depth
            break
        tok = next(t for t, c in counts.items() if c == top)
        m = best + depth
        ids.append(tok)
        conf.append(top / (total + 1) * m / (m + 1))
        occ = [(seq, e + 1) for seq, e in occ if e + 1 < len(seq) and seq[e + 1] == tok]
    return best, ids, conf, tie


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_matches_brute_force_reference(data: st.DataObject) -> None:
    vocab = data.draw(st.integers(2, 5), label="vocab")
    toks = st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40)
    cfg = SuffixConfig(
        min_match_len=data.draw(st.integers(1, 2), label="min"),
        max_match_len=data.draw(st.integers(2, 9), label="max"),
        max_occurrences=10_000,
        max_chain_steps=100_000,
    )
    spec = SuffixSpeculator(cfg)
    old_prompt, old_outs = data.draw(toks, label="old_prompt"), data.draw(st.lists(toks, max_size=3), label="old")
    _run_group(spec, 0, old_prompt, old_outs, row0=0)
    prompt = data.draw(toks, label="prompt")
    sib, own = data.draw(toks, label="sibling"), data.draw(toks, label="own")
    spec.start(1, prompt, [10, 11])
    spec.observe(10, sib)
    spec.observe(11, own)
    k = data.draw(st.integers(1, 8), label="k")
    draft = _propose(spec, 11, 1, prompt + own, k)

    ctx = cfg.max_match_len - 1
    corpora: list[tuple[list[int], int]] = []
    for out in old_outs:
        if out:
            c = old_prompt[len(old_prompt) - min(ctx, len(old_prompt)) :]
            corpora.append((c + out, len(c)))
    c = prompt[len(prompt) - min(ctx, len(prompt)) :]
    corpora += [(prompt, 0), (c + sib, len(c)), (c + own, len(c))]
    _, ids, conf, tie = _brute_force(corpora, prompt + own, cfg, k)
    n = min(len(ids), tie)
    assert draft.token_ids[:n] == ids[:n]
    assert draft.confidence[:n] == pytest.approx(conf[:n])
    if tie == k or len(ids) < tie:  # no tie decided the draft: it must be exactly the reference
        assert draft.token_ids == ids


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    prompt=st.lists(st.integers(0, 3), min_size=1, max_size=30),
    out=st.lists(st.integers(0, 3), min_size=1, max_size=60),
    min_len=st.integers(1, 3),
    max_len=st.integers(3, 17),
)
def test_token_at_a_time_indexing_equals_indexing_the_whole_output(
    prompt: list[int], out: list[int], min_len: int, max_len: int
) -> None:
    # the one-token fast path of GroupIndex.extend (a decode step) against the general path over the same tokens
    lens = SuffixConfig(min_match_len=min_len, max_match_len=max_len).match_lens
    fast, ref = GroupIndex(prompt, lens, max_len - 1), GroupIndex(prompt, lens, max_len - 1)
    s_fast, s_ref = fast.add_row(0), ref.add_row(0)
    for t in out:
        fast.extend(s_fast, [t])
    ref.extend(s_ref, out)
    assert fast.seqs == ref.seqs
    assert fast.keys == ref.keys and fast.prevs == ref.prevs and fast.heads == ref.heads
    # and both are the n-gram keys of the slot's own tokens, one per offset (a row whose prompt is shorter than
    # the longest key once got surplus zero keys, which shifted every later key of that length)
    seq = ref.seqs[s_ref]
    for ri, n in enumerate(lens):
        want = [rolling_keys(seq[: p + 1], (n,))[0] if p + 1 >= n else 0 for p in range(len(seq))]
        assert list(ref.keys[s_ref][ri]) == want


def test_history_lookup_matches_brute_force_with_bucket_collisions() -> None:
    # a small bound -> small head tables, a tiny vocabulary -> many distinct keys share buckets; eviction and
    # compaction happen on the way
    cfg = SuffixConfig(max_history_tokens=1_500, max_occurrences=10_000, max_chain_steps=1_000_000)
    spec = SuffixSpeculator(cfg)
    rng = random.Random(7)
    for g in range(120):
        outs = [[rng.randrange(3) for _ in range(rng.randrange(1, 50))] for _ in range(3)]
        _run_group(spec, g, [rng.randrange(3) for _ in range(rng.randrange(1, 20))], outs, row0=3 * g)
    state = spec.state_dict()
    corpora = [(s, c) for s, c in zip(state["sequences"], state["context_lens"])]
    assert sum(len(s) for s, _ in corpora) <= 1_500
    for _ in range(40):
        query = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        match_len, occ = spec._match(None, query)
        ref_len, ids, conf, tie = _brute_force(corpora, query, cfg, 6)
        assert match_len == ref_len
        draft = spec._walk(occ, match_len, 6) if occ else ([], [])
        n = min(len(ids), tie)
        assert draft[0][:n] == ids[:n]
        assert draft[1][:n] == pytest.approx(conf[:n])


# ---------------------------------------------------------------- memory bound, state


def test_memory_bound_under_long_stream() -> None:
    bound = 3_000
    spec = SuffixSpeculator(max_history_tokens=bound)
    rng = random.Random(0)
    slots = None
    last_outputs: list[list[int]] = []
    for g in range(400):
        prompt = [rng.randrange(1000) for _ in range(rng.randrange(1, 30))]
        last_outputs = [[rng.randrange(1000) for _ in range(rng.randrange(0, 60))] for _ in range(4)]
        _run_group(spec, g, prompt, last_outputs, row0=4 * g)
        s = spec.index_stats()
        assert s["history_tokens"] <= bound
        assert s["active_groups"] == 0 and s["active_rows"] == 0 and s["active_tokens"] == 0
        # dead entries are compacted away: the buffer stays within ~2x the bound (+ the compaction floor)
        assert s["history_buffer_len"] <= 2 * bound + _MIN_COMPACT + 2 * s["history_sequences"] + 100
        assert s["history_chain_entries"] == len(spec.config.match_lens) * s["history_buffer_len"]
        slots = slots or s["history_table_slots"]
        assert s["history_table_slots"] == slots  # fixed-size head tables
    assert spec.index_stats()["history_tokens"] >= bound // 2  # and it is actually used
    # the most recent completion is still there and matchable
    recent = max(last_outputs, key=len)
    spec.start(10_000, [5000], [99_999])
    spec.observe(99_999, recent[:6])
    draft = _propose(spec, 99_999, 10_000, [5000] + recent[:6], 3)
    assert draft.token_ids == recent[6:9]


def test_over_long_completion_keeps_its_tail() -> None:
    spec = SuffixSpeculator(max_history_tokens=50)
    long = list(range(1000, 1200))
    _run_group(spec, 0, [1], [long], row0=0)
    assert spec.num_history_tokens == 50
    assert spec.state_dict()["sequences"] == [long[-50:]]


def test_state_dict_round_trip_gives_identical_proposals() -> None:
    rng = random.Random(1)
    cfg = SuffixConfig(max_history_tokens=5_000)
    spec = SuffixSpeculator(cfg)
    for g in range(150):  # enough to evict and compact
        prompt = [rng.randrange(20) for _ in range(8)]
        _run_group(spec, g, prompt, [[rng.randrange(20) for _ in range(40)] for _ in range(3)], row0=3 * g)
    state = json.loads(json.dumps(spec.state_dict()))
    other = SuffixSpeculator(cfg)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert other.num_history_tokens == spec.num_history_tokens

    queries = [[rng.randrange(20) for _ in range(rng.randrange(1, 20))] for _ in range(50)]
    for i, q in enumerate(queries):
        for s in (spec, other):
            s.start(10_000 + i, [0], [50_000 + i])
            s.observe(50_000 + i, q)
        a = _propose(spec, 50_000 + i, 10_000 + i, [0] + q, 8)
        b = _propose(other, 50_000 + i, 10_000 + i, [0] + q, 8)
        assert (a.token_ids, a.confidence) == (b.token_ids, b.confidence)
    assert any(len(_propose(spec, 50_000 + i, 10_000 + i, [0] + q, 8)) for i, q in enumerate(queries))


def test_load_state_dict_rejects_bad_input() -> None:
    spec = SuffixSpeculator()
    with pytest.raises(ValueError, match="format"):
        spec.load_state_dict({"sequences": []})
    good = spec.state_dict()
    with pytest.raises(ValueError, match="version"):
        spec.load_state_dict({**good, "version": 99})
    with pytest.raises(ValueError, match="equal length"):
        spec.load_state_dict({**good, "sequences": [[1, 2]], "context_lens": []})
    with pytest.raises(ValueError, match="non-negative"):
        spec.load_state_dict({**good, "sequences": [[1, -2]], "context_lens": [0]})


def test_reset_drops_everything() -> None:
    spec = SuffixSpeculator()
    _run_group(spec, 0, [1, 2], [[3, 4, 5, 6]], row0=0)
    spec.start(1, [1, 2], [1])
    spec.reset()
    s = spec.index_stats()
    assert s["history_tokens"] == 0 and s["active_groups"] == 0 and s["active_rows"] == 0
    assert spec.state_dict()["sequences"] == []


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_match_len": 0}, "min_match_len must be >= 1"),
        ({"min_match_len": 4, "max_match_len": 3}, "max_match_len .* must be >= min_match_len"),
        ({"max_match_len": 5000}, "max_match_len must be <= 1024"),
        ({"max_history_tokens": -1}, "max_history_tokens"),
        ({"min_token_prob": 1.5}, "min_token_prob must be a number in"),
        ({"min_path_prob": -0.1}, "min_path_prob must be a number in"),
        ({"max_occurrences": 0}, "max_occurrences must be >= 1"),
        ({"max_occurrences": 64, "max_chain_steps": 10}, "max_chain_steps"),
        ({"confidence_count_prior": -1.0}, "confidence_count_prior"),
        ({"confidence_match_prior": float("nan")}, "confidence_match_prior"),
        ({"min_match_len": 2.5}, "must be an int"),
        ({"history_include_prompt": "yes"}, "must be a bool"),
    ],
)
def test_config_validation_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SuffixConfig(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=match):
        SuffixSpeculator(**kwargs)


def test_config_fields_have_help_and_overrides_apply() -> None:
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(SuffixConfig))
    spec = SuffixSpeculator(SuffixConfig(max_match_len=8), min_token_prob=0.5)
    assert spec.config.max_match_len == 8 and spec.config.min_token_prob == 0.5
    with pytest.raises(TypeError, match="unknown SuffixConfig field"):
        SuffixSpeculator(max_len=3)
    assert SuffixConfig(min_match_len=3, max_match_len=20).match_lens == (3, 6, 12)
