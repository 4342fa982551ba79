"""AutoController inside RolloutEngine on tiny real models: the default controller, losslessness, convergence,
and the calibrated, cached cost model."""

from __future__ import annotations

import math
import time

import pytest
import torch
from engine_helpers import BigramSpeculator, teacher_forced_logprobs

import atlas_rl.controller.cost as cost_mod
from atlas_rl import SamplingParams
from atlas_rl.bench.synthetic import ReplayOracleSpeculator
from atlas_rl.config import EngineConfig
from atlas_rl.controller import AutoController, AutoControllerConfig, FixedController, VerificationCost
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine

PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]


@pytest.fixture(autouse=True, scope="module")
def _private_cache(tmp_path_factory):
    """Calibrations of these tests go to a cache of their own (shared by the tests of this file); one thread."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATLAS_RL_CACHE", str(tmp_path_factory.mktemp("atlas_cache")))
    # tiny models gain nothing from a second thread, and on a busy 2-core machine two threads stall each other
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    mp.undo()


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(vocab_size=64, dtype=torch.float64, seed=0)


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True)


def _table(fn, tokens: int = 9) -> VerificationCost:
    measured = {(r, t): fn(r, t) for r in (1, 2, 4, 8, 16, 32, 64) for t in range(1, tokens + 1)}
    return VerificationCost(measured, refine_rate=0.0)


def test_auto_controller_greedy_is_token_identical_float64(model64):
    sp = _greedy(24)
    base = RolloutEngine(model64).generate(PROMPTS, sp, num_generations=3)
    oracle = ReplayOracleSpeculator(base.completion_ids, alpha=0.7, vocab_size=64, confidence=0.6, seed=1)
    bigram = BigramSpeculator(64, soft=False)
    gpu_like = _table(lambda r, t: 0.01 * (1 + 0.02 * (t - 1)))  # verification nearly free: speculation pays
    ctl = AutoController(AutoControllerConfig(max_k=6), cost=gpu_like)
    eng = RolloutEngine(model64, speculators=[oracle, bigram], controller=ctl)
    out = eng.generate(PROMPTS, sp, num_generations=3)
    assert out.completion_ids == base.completion_ids
    st = out.stats
    assert st.num_accepted_tokens > 0 and 1.5 < st.mean_acceptance_length
    assert sum(1 for k in st.draft_len_histogram[1:] if k) >= 2  # several draft lengths were verified
    assert st.per_speculator["oracle"].num_drafts > st.per_speculator.get("bigram", st.speculator("x")).num_drafts
    d = st.to_dict()
    assert d["per_speculator"]["oracle"]["row_share"] > 0.5 and math.isfinite(d["plan_ms_per_step"])


def test_auto_controller_sampling_logprobs_equal_teacher_forced_float64(model64):
    sp = SamplingParams(temperature=1.0, max_new_tokens=16, seed=3, ignore_eos=True)
    specs = [BigramSpeculator(64, soft=True, name="soft"), BigramSpeculator(64, soft=False, seed=5, name="hard")]
    ctl = AutoController(AutoControllerConfig(max_k=4), cost=_table(lambda r, t: 0.01 * (1 + 0.01 * (t - 1))))
    out = RolloutEngine(model64, speculators=specs, controller=ctl).generate(PROMPTS, sp, num_generations=2)
    assert out.stats.num_draft_tokens > 0
    for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        ref = teacher_forced_logprobs(model64, p, c, sp)
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), ref, atol=1e-6, rtol=0)


def test_engine_settles_on_the_cost_optimal_k_with_an_exact_alpha_oracle(model64):
    """alpha = 0.6, verification cost 1 + 0.2 per extra token (a CPU at a few rows): the cost model's optimum is
    k* = 2 (2.9% ahead of k = 3, 4.8% ahead of k = 1); the controller starts from its prior and settles near it:
    past the cold start, the expected rate of the lengths it verifies is within 2% of k*'s, and k* is the most
    frequent choice."""
    sp = _greedy(120)
    prompts = PROMPTS[:2]
    base = RolloutEngine(model64).generate(prompts, sp, num_generations=4)
    oracle = ReplayOracleSpeculator(base.completion_ids, alpha=0.6, vocab_size=64, confidence=0.5, seed=2)
    cost = lambda r, t: 1.0 + 0.2 * (t - 1)  # noqa: E731
    ctl = AutoController(AutoControllerConfig(max_k=8), cost=_table(cost))
    out = RolloutEngine(model64, speculators=[oracle], controller=ctl).generate(prompts, sp, num_generations=4)
    assert out.completion_ids == base.completion_ids
    late = [s.query_len - 1 for s in out.stats.steps[20:-3]]  # past the cold start, before the length cap
    rate = [(1 - 0.6 ** (k + 1)) / 0.4 / cost(8, k + 1) for k in range(9)]  # expected tokens per row / cost
    assert max(set(late), key=late.count) == 2, late
    assert sum(rate[k] for k in late) / len(late) >= 0.98 * rate[2], late


def test_default_engine_controller_is_auto_and_its_calibration_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_RL_CACHE", str(tmp_path))  # a fresh cache: the first start must measure
    m = tiny_llama(vocab_size=64, dtype=torch.float32, seed=4)
    spec = BigramSpeculator(64, soft=False)
    measure = cost_mod.calibrate

    def calibrate_and_trust(*args, **kwargs):  # this test is about caching: a busy machine must not decide it
        cost = measure(*args, **kwargs)  # (the disturbance heuristic has its own test in test_controller_cost)
        cost.reliable = True
        return cost

    monkeypatch.setattr(cost_mod, "calibrate", calibrate_and_trust)
    # ... nor may its noise on millisecond forwards fail the cached table's spot check (tested in test_controller_cost)
    monkeypatch.setattr(cost_mod, "STALE_FACTOR", 10.0)
    monkeypatch.setattr(cost_mod, "SHAPE_FACTOR", 10.0)  # its one-row shape check likewise
    t0 = time.perf_counter()
    e1 = RolloutEngine(m, speculators=[spec])
    first_start = time.perf_counter() - t0
    assert isinstance(e1.controller, AutoController) and e1.controller.max_k == EngineConfig().num_speculative_tokens
    c1 = e1.verification_cost()
    budget = AutoControllerConfig().calibration_budget_s
    assert not c1.from_cache and c1.calibration_s <= budget + 1.0 and first_start <= budget + 3.0
    assert list((tmp_path / "controller").glob("verification_cost_*.json"))

    def no_measuring(*args, **kwargs):
        raise AssertionError("the second engine start measured the cost again")

    monkeypatch.setattr(cost_mod, "calibrate", no_measuring)
    e2 = RolloutEngine(m, speculators=[spec])
    c2 = e2.verification_cost()
    assert c2.from_cache and c2.measured == c1.measured
    out = e2.generate(PROMPTS, _greedy(8), num_generations=2)
    assert len(out.completion_ids) == 8 and out.stats.num_steps > 0
    assert e2.controller.cost is c2 and c2.num_observations == out.stats.num_steps  # refined online


def test_engine_config_picks_the_controller():
    m = tiny_llama(vocab_size=64, dtype=torch.float32, seed=4)
    spec = BigramSpeculator(64, soft=False)
    assert isinstance(RolloutEngine(m).controller, FixedController)  # no speculators: plain decoding
    fixed = RolloutEngine(m, speculators=[spec], config=EngineConfig(num_speculative_tokens=3)).controller
    assert isinstance(fixed, FixedController) and fixed.k == 3  # an explicit k means fixed-k drafting
    auto = RolloutEngine(m, speculators=[spec], config=EngineConfig(controller="auto", num_speculative_tokens=3))
    assert isinstance(auto.controller, AutoController) and auto.controller.max_k == 3
    with pytest.raises(ValueError, match="controller must be"):
        EngineConfig(controller="smart")


def test_per_call_auto_controller_gets_the_engine_cost_model():
    m = tiny_llama(vocab_size=64, dtype=torch.float32, seed=4)
    eng = RolloutEngine(
        m, speculators=[BigramSpeculator(64, soft=False)], config=EngineConfig(num_speculative_tokens=2)
    )
    ctl = AutoController(AutoControllerConfig(max_k=3))
    out = eng.generate(PROMPTS, _greedy(6), controller=ctl)
    assert ctl.cost is eng.verification_cost() and out.stats.num_steps > 0


def test_engine_hands_a_speculators_expected_acceptance_to_the_controller(model64):
    spec = BigramSpeculator(64, soft=False)
    spec.expected_acceptance = 0.2
    ctl = AutoController(AutoControllerConfig(max_k=4), cost=_table(lambda r, t: 0.01 * (1 + 0.3 * (t - 1))))
    RolloutEngine(model64, speculators=[spec], controller=ctl).generate(PROMPTS[:1], _greedy(2))
    est = ctl.acceptance.estimates(spec.name, True)  # nothing observed yet beyond a step or two: near the prior
    assert abs(float(est.marginal[0]) - 0.2) < 0.15
