"""The pieces of one decode step (rollout/step.py): requests, capping, packing, dense draft distributions, emitting."""

from __future__ import annotations

import torch

from atlas_rl.rollout.step import Row, cap_drafts, dense_draft_probs, draft_requests, emit, pack
from atlas_rl.types import Draft


def _row(row_id: int, tokens: list[int], max_new: int = 10, emitted: int = 0) -> Row:
    return Row(row_id, 0, list(tokens), len(tokens) - emitted, max_new, len(tokens) - 1, None, [7] * emitted, [])


def test_draft_requests_cap_lengths_and_drop_empty_asks():
    rows = [_row(0, [1, 2]), _row(1, [3], max_new=3, emitted=1), _row(2, [4], max_new=2, emitted=1)]
    plan = [[("a", 5), ("b", 2)], [("a", 5)], [("a", 5)]]  # row 1 may emit 2 more (1 draft), row 2 only 1 (none)
    assert draft_requests(plan, rows, k_cap=4) == {"a": [(0, 4), (1, 1)], "b": [(0, 2)]}


def test_cap_drafts_cuts_to_what_a_row_may_still_verify():
    rows = [_row(0, [1]), _row(1, [1], max_new=3, emitted=1), _row(2, [1], max_new=1)]
    chosen = [Draft([5, 6, 7]), Draft([5, 6, 7]), Draft([5])]
    out = cap_drafts(chosen + [None], rows + [_row(3, [1])], k_cap=2)
    assert [d.token_ids if d else None for d in out] == [[5, 6], [5], None, None]


def test_pack_pads_ragged_drafts_with_the_pending_token():
    rows = [_row(0, [1, 2, 3]), _row(1, [4, 5])]
    step = pack(rows, [Draft([8, 9]), None], torch.device("cpu"))
    assert step.input_ids.tolist() == [[3, 8, 9], [5, 5, 5]] and step.starts.tolist() == [2, 1]
    assert step.draft_lens == [2, 0] and step.num_draft == 2


def test_dense_draft_probs_one_hot_for_model_free_drafts():
    soft = Draft([2, 0], draft_probs=torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.5, 0.0]]))
    out = dense_draft_probs([Draft([1]), soft, None], 2, 3, torch.float64, torch.device("cpu"))
    assert out.shape == (3, 2, 3) and out[0, 0].tolist() == [0.0, 1.0, 0.0] and out[0, 1].sum() == 0
    assert torch.equal(out[1], soft.draft_probs.double()) and out[2].sum() == 0
    assert dense_draft_probs([Draft([1]), None], 1, 3, torch.float64, torch.device("cpu")) is None  # all one-hot


def test_emit_stops_at_a_stop_token_and_at_the_budget():
    r = _row(0, [1], max_new=5)
    assert emit(r, [4, 9, 6], [-0.1, -0.2, -0.3], stops={9}) == 2
    assert r.completion == [4, 9] and r.logprobs == [-0.1, -0.2] and r.finish == "stop" and r.tokens == [1, 4, 9]
    r = _row(1, [1], max_new=2)
    assert emit(r, [4, 5, 6], [-0.1, -0.2, -0.3], stops=set()) == 2 and r.finish == "length"
