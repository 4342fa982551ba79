"""The reproducibility contract (docs/decisions/reproducibility.md): with ``SamplingParams.seed`` set, the same
engine configuration gives the same completions and logprobs run after run, whatever the wall clock said.

Each test runs the same configuration twice; the second run sees a jittery clock (``time.perf_counter`` advanced by
random amounts of up to 0.2 s per reading, a step then looks 10-100x dearer than the first run measured), so any
decision that depends on measured timings would differ."""

from __future__ import annotations

import random
import time

import pytest
import torch
from engine_helpers import BigramSpeculator, NoisyOracleSpeculator

from atlas_rl import SamplingParams
from atlas_rl.controller import AutoController, AutoControllerConfig, VerificationCost
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.types import RolloutBatch

PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]
VOCAB = 64


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_llama(vocab_size=VOCAB, dtype=torch.float32, seed=0)


def _cost() -> VerificationCost:
    """A CPU-like table (each token per row costs 30% of a step more), near the boundary where speculation pays;
    refined online (the default refine rate)."""
    return VerificationCost(
        {(r, t): 0.01 * (1 + 0.05 * r) * (1 + 0.3 * (t - 1)) for r in (1, 4, 16) for t in (1, 3, 5)}
    )


def _engine(model, config: AutoControllerConfig | None = None) -> RolloutEngine:
    """The default auto controller over a soft (sampled) and a one-hot speculator, each with its own seed."""
    specs = [BigramSpeculator(VOCAB, soft=True, seed=3, name="soft"), NoisyOracleSpeculator(model, noise=0.2, seed=4)]
    return RolloutEngine(
        model, speculators=specs, controller=AutoController(config or AutoControllerConfig(), _cost())
    )


def _jitter_clock(monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    rng = random.Random(seed)
    real = time.perf_counter
    offset = [0.0]

    def fake() -> float:
        offset[0] += rng.random() * 0.2
        return real() + offset[0]

    monkeypatch.setattr(time, "perf_counter", fake)


def _run(model, sampling: SamplingParams, calls: int = 1, config: AutoControllerConfig | None = None):
    eng = _engine(model, config)
    return [eng.generate(PROMPTS, sampling, num_generations=3) for _ in range(calls)]


def _same(a: RolloutBatch, b: RolloutBatch) -> bool:
    return a.completion_ids == b.completion_ids and a.logprobs == b.logprobs


def test_seeded_sampling_reproduces_with_the_auto_controller_under_a_jittery_clock(model, monkeypatch):
    sampling = SamplingParams(temperature=0.6, max_new_tokens=24, seed=7, ignore_eos=True)
    (first,) = _run(model, sampling)
    _jitter_clock(monkeypatch, seed=1)
    (second,) = _run(model, sampling)
    assert _same(first, second)
    assert first.stats.draft_len_histogram == second.stats.draft_len_histogram  # the same decisions


def test_seeded_greedy_reproduces_with_the_auto_controller_under_a_jittery_clock(model, monkeypatch):
    sampling = SamplingParams(temperature=0.0, max_new_tokens=24, seed=0, ignore_eos=True)
    (first,) = _run(model, sampling)
    _jitter_clock(monkeypatch, seed=2)
    (second,) = _run(model, sampling)
    assert _same(first, second)
    assert first.stats.draft_len_histogram == second.stats.draft_len_histogram  # the same decisions


def test_sequence_of_seeded_calls_reproduces_without_timing_feedback(model, monkeypatch):
    """Timings of a seeded call refine the cost models when it ends (the next call's decisions use them);
    ``learn_timings=False`` keeps them out entirely, so a whole sequence of calls reproduces."""
    sampling = SamplingParams(temperature=0.6, max_new_tokens=16, seed=11, ignore_eos=True)
    config = AutoControllerConfig(learn_timings=False)
    first = _run(model, sampling, calls=2, config=config)
    _jitter_clock(monkeypatch, seed=3)
    second = _run(model, sampling, calls=2, config=config)
    assert all(_same(a, b) for a, b in zip(first, second))


def test_seeded_call_applies_its_timings_when_it_ends(model):
    eng = _engine(model)
    cost = eng.controller.cost
    eng.generate(PROMPTS[:2], SamplingParams(temperature=1.0, max_new_tokens=8, seed=5, ignore_eos=True))
    assert cost.num_observations > 0  # refined, between calls
    assert eng.controller.draft_cost.observations("oracle") > 0
