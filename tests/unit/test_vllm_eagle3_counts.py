"""Counting vLLM's acceptance like our engine: replaying vLLM's per-step accepted counts under the engine's rule
(drafts shortened to what a row may still emit) gives exactly the engine's counters; the runner's counters are
net of its warm-up."""

from __future__ import annotations

import torch
from engine_helpers import StatelessSpeculator

from atlas_rl import SamplingParams
from atlas_rl.bench.vllm_eagle3 import engine_rule_counts
from atlas_rl.bench.vllm_runner import counters_delta, mean_acceptance_length
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.types import Draft, ProposeInput

K = 4


def _wrong(n: int, j: int) -> bool:
    """Whether the scripted draft at completion length ``n``, draft position ``j`` is corrupted (fixed pattern)."""
    return (3 * n + 5 * j) % 7 in (0, 4)


class ScriptedSpeculator(StatelessSpeculator):
    """Drafts the known greedy completion, corrupted by a fixed pattern: the draft at a prefix depends on the
    prefix only (as a deterministic head's does), whatever length is asked for."""

    name = "scripted"

    def __init__(self, prompt: list[int], completion: list[int]) -> None:
        self.prompt, self.completion = prompt, completion

    def draft_at(self, n: int, k: int) -> list[int]:
        y = self.completion + [0] * (k + 1)
        return [(y[n + j] + 1) % 50 if _wrong(n, j) else y[n + j] for j in range(k)]

    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        return [
            Draft(self.draft_at(len(t) - len(self.prompt), k), None, speculator=self.name)
            for t, k in zip(rows.token_ids, max_tokens)
        ]


def _vllm_like_steps(spec: ScriptedSpeculator, max_new: int) -> list[int]:
    """What vLLM reports per verification step: it always drafts K and counts leading matches even past the end
    (the completion is extended with the draft's own tokens there, i.e. counted as accepted)."""
    steps, n = [], 1
    while n < max_new:
        d = spec.draft_at(n, K)
        a = 0
        while a < K and (n + a >= max_new or d[a] == spec.completion[n + a]):
            a += 1
        steps.append(a)
        n += a + 1
    return steps


def test_engine_rule_replay_equals_engine_counters_when_drafts_agree():
    model = tiny_llama(vocab_size=50, dtype=torch.float64, seed=0)
    prompt = [1, 5, 7, 9]
    for max_new in (17, 18, 19, 20, 23):  # different endings: capped last drafts, a draft-less last step
        sp = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
        plain = RolloutEngine(model, eos_token_ids=[]).generate([prompt], sp).completion_ids[0]
        spec = ScriptedSpeculator(prompt, plain)
        engine = RolloutEngine(model, speculators=[spec], controller=FixedController(K), eos_token_ids=[])
        batch = engine.generate([prompt], sp)
        assert batch.completion_ids[0] == plain
        s = batch.stats
        c = engine_rule_counts([_vllm_like_steps(spec, max_new)], max_new, K)
        assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens) == (
            s.num_drafts,
            s.num_draft_tokens,
            s.num_accepted_tokens,
        ), max_new
        assert c.accepted_per_pos[: len(s.num_accepted_tokens_per_pos)] == s.num_accepted_tokens_per_pos
        assert c.mean_acceptance_length == 1 + s.num_accepted_tokens / s.num_drafts


def test_engine_rule_caps_the_last_steps():
    # 10 tokens: prefill gives 1; drafts 4 (all accepted) -> 6; cap 3, 1 accepted -> 8; cap 1 (vLLM accepted 4) -> 10
    c = engine_rule_counts([[4, 1, 4, 3]], max_new_tokens=10, k=4)
    assert (c.num_drafts, c.num_draft_tokens, c.num_accepted_tokens, c.accepted_per_pos) == (3, 8, 6, [3, 1, 1, 1])
    assert c.mean_acceptance_length == 3.0


def test_runner_counters_are_net_of_the_warm_up():
    before = {"num_drafts": 2, "num_accepted_tokens": 3, "num_accepted_tokens_per_pos": [2, 1]}
    after = {"num_drafts": 12, "num_accepted_tokens": 18, "num_accepted_tokens_per_pos": [9, 5, 4]}
    d = counters_delta(before, after)
    assert d == {"num_drafts": 10, "num_accepted_tokens": 15, "num_accepted_tokens_per_pos": [7, 4, 4]}
    assert mean_acceptance_length(d) == 2.5
    assert mean_acceptance_length(counters_delta(None, after)) is None
