"""The drafting probe: a costly speculator timed on synthetic rows through its real protocol, leaving nothing behind;
the auto controller prices it by those timings from the first step (not by its MACs prior), and only while it
learns from timings at all; the engine times it once, when it is built."""

from __future__ import annotations

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.controller import AutoController, AutoControllerConfig, FixedController
from atlas_rl.controller.cost import VerificationCost
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.rollout.draft_probe import DraftProbeConfig, probe_drafting
from atlas_rl.speculators import SuffixSpeculator
from atlas_rl.speculators.base import speculator_extras
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.types import ProposeRecord

V = 64
PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, dtype=torch.float32, seed=0)


def _spec(model, name: str = "static") -> DraftHeadSpeculator:
    torch.manual_seed(0)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=48, fuse_layers=(1, 2), intermediate_size=64)
    head = DraftHead(cfg, draft_to_target=torch.arange(48)).bind_target(model, init_lm_head=True)
    return DraftHeadSpeculator(head, name=name, seed=3)


def _cost() -> VerificationCost:
    return VerificationCost({(r, t): 0.01 * (1 + 0.2 * t) * (1 + 0.1 * r) for r in (1, 4, 16) for t in range(1, 10)})


def test_probe_times_every_batch_through_the_real_protocol_and_leaves_nothing_behind(model):
    spec = _spec(model)
    cfg = DraftProbeConfig(rows=(1, 3), depths=(1, 2), prompt_len=5, repeats=2)
    recs = probe_drafting(spec, speculator_extras(spec), model.config.hidden_size, V, torch.device("cpu"), cfg)
    assert [(r.rows, r.tokens) for r in recs] == [(1, 1), (1, 2), (3, 3), (3, 6)]
    assert all(r.seconds > 0 for r in recs)
    assert not spec._rows and not spec._groups and not spec._prompts  # synthetic rows and groups stopped
    # the speculator drafts for real rows afterwards as it would have without the probe
    fresh = _spec(model)
    outs = []
    for s in (spec, fresh):
        eng = RolloutEngine(model, speculators=[s], controller=FixedController(2, s.name))
        outs.append(eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=8)))
    assert outs[0].completion_ids == outs[1].completion_ids
    assert outs[0].stats.mean_acceptance_length == outs[1].stats.mean_acceptance_length


def test_probe_stops_its_synthetic_group_when_the_speculator_fails(model):
    spec = _spec(model)

    def broken(rows, max_tokens):
        raise RuntimeError("boom")

    spec.propose = broken
    with pytest.raises(RuntimeError, match="boom"):
        probe_drafting(spec, speculator_extras(spec), model.config.hidden_size, V, torch.device("cpu"))
    assert not spec._rows and not spec._groups


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rows=()), "rows and depths"),
        (dict(depths=(0,)), "rows and depths"),
        (dict(prompt_len=0), "prompt_len and repeats"),
        (dict(repeats=0), "prompt_len and repeats"),
    ],
)
def test_probe_config_refuses_empty_or_non_positive_shapes(kw, match):
    with pytest.raises(ValueError, match=match):
        DraftProbeConfig(**kw)


def test_controller_prices_a_timed_speculator_by_its_timings_not_its_prior():
    ctl = AutoController(AutoControllerConfig(), cost=_cost())
    ctl.set_draft_cost_priors({"head": 0.05})
    step_s = ctl._step_cost(4)
    prior = ctl._draft_s("head", 4, 1, step_s)
    assert prior == pytest.approx(0.05 * step_s[0])
    assert ctl.wants_draft_timings(["head", "other"]) == ["head", "other"]
    recs = [
        ProposeRecord(rows=r, tokens=r * d, seconds=0.004 * d * (1 + 0.05 * r)) for r in (1, 4, 16) for d in (1, 3)
    ]
    ctl.set_draft_timings({"head": recs})
    assert ctl.wants_draft_timings(["head", "other"]) == ["other"]
    assert ctl._draft_s("head", 4, 1, step_s) == pytest.approx(0.0048, rel=0.15)  # the timings, not the prior
    # once timed, a second probe does not overwrite what the model learned
    ctl.set_draft_timings({"head": [ProposeRecord(rows=4, tokens=4, seconds=1.0)]})
    assert ctl.draft_cost.observations("head") == len(recs)


def test_controller_without_learned_timings_keeps_the_prior():
    ctl = AutoController(AutoControllerConfig(learn_timings=False), cost=_cost())
    assert ctl.wants_draft_timings(["head"]) == []


def test_engine_times_costly_speculators_once_when_built_for_a_controller_that_wants_it(model):
    head, suffix = _spec(model), SuffixSpeculator()
    ctl = AutoController(AutoControllerConfig(num_speculative_tokens=3), cost=_cost())
    eng = RolloutEngine(model, speculators=[head, suffix], controller=ctl)
    n = ctl.draft_cost.observations("static")
    assert n == len(DraftProbeConfig().rows) * len(DraftProbeConfig().depths)
    assert all(r.reference_s > 0 for r in eng._draft_timings["static"])  # a rows x 1 forward timed beside them
    assert ctl.draft_cost.observations(suffix.name) == 0  # model-free: learned from its first real call
    eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, seed=0))
    assert list(eng._draft_timings) == ["static"]
    # a fresh controller handed to a call gets the engine's timings without a second probe
    other = AutoController(AutoControllerConfig(num_speculative_tokens=3), cost=_cost())
    timings = eng._draft_timings["static"]
    eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=6, seed=0), controller=other)
    assert eng._draft_timings["static"] is timings
    assert other.draft_cost.observations("static") >= len(timings)


def test_probe_times_its_reference_once_per_repeat_beside_each_row_count(model):
    spec = _spec(model)
    calls: list[int] = []

    def reference(n: int) -> float:
        calls.append(n)
        return {1: 0.02, 3: 0.05}[n] + 0.001 * len(calls)  # a drifting host: the median is kept

    cfg = DraftProbeConfig(rows=(1, 3), depths=(1, 2), prompt_len=5, repeats=3)
    recs = probe_drafting(
        spec, speculator_extras(spec), model.config.hidden_size, V, torch.device("cpu"), cfg, reference
    )
    assert calls == [1, 1, 1, 3, 3, 3]  # one reference per repeat, after that repeat's proposals
    assert [(r.rows, r.tokens, r.reference_s) for r in recs] == [
        (1, 1, pytest.approx(0.022)),
        (1, 2, pytest.approx(0.022)),
        (3, 3, pytest.approx(0.055)),
        (3, 6, pytest.approx(0.055)),
    ]
    no_ref = probe_drafting(spec, speculator_extras(spec), model.config.hidden_size, V, torch.device("cpu"), cfg)
    assert all(r.reference_s is None for r in no_ref)


def test_controller_prices_probe_timings_at_the_speed_its_cost_table_was_measured():
    """A probe run while the host is twice as slow as when the table was timed (its reference forward takes twice
    the table's) prices drafting as the same probe at full speed would; the factor is bounded."""
    cost = _cost()
    table = {n: cost.forward_s(n, 1) for n in (1, 4, 16)}
    shapes = [(n, d) for n in (1, 4, 16) for d in (1, 3)]
    slow = {"head": [ProposeRecord(n, n * d, 0.004 * d * (1 + 0.1 * n), 2 * table[n]) for n, d in shapes]}
    fast = {"head": [ProposeRecord(n, n * d, 0.002 * d * (1 + 0.1 * n)) for n, d in shapes]}
    ctls = [AutoController(AutoControllerConfig(num_speculative_tokens=3), cost=_cost()) for _ in range(2)]
    for ctl, timings in zip(ctls, (slow, fast)):
        ctl.set_draft_timings(timings)
    for n, L in [(1, 1), (4, 2), (16, 3)]:
        assert ctls[0].draft_cost.predict("head", n, L) == pytest.approx(ctls[1].draft_cost.predict("head", n, L))
    far = ctls[0]._at_table_speed(ProposeRecord(1, 1, 0.009, 100 * table[1]))
    assert far.seconds == pytest.approx(0.009 / 3) and far.reference_s is None


def test_warm_up_rounds_propose_untimed_before_the_timed_repeats(model):
    """Where a head replays CUDA graphs it captures a shape the second time it meets it: the probe's warm-up rounds
    meet every (rows, depth) first, so that its timed repeats are replays."""
    spec = _spec(model)
    depths_asked: list[int] = []
    propose = spec.propose

    def counting(rows, max_tokens):
        depths_asked.append(max(max_tokens))
        return propose(rows, max_tokens)

    spec.propose = counting
    cfg = DraftProbeConfig(rows=(1, 3), depths=(1, 2), prompt_len=5, repeats=3, warmup=2)
    recs = probe_drafting(spec, speculator_extras(spec), model.config.hidden_size, V, torch.device("cpu"), cfg)
    # per row count: the prompt's untimed pass at the deepest depth, then 2 warm-up and 3 timed rounds
    assert depths_asked == ([2] + [1, 2] * 5) * 2
    assert [(r.rows, r.tokens) for r in recs] == [(1, 1), (1, 2), (3, 3), (3, 6)]
    assert not spec._rows and not spec._groups
    with pytest.raises(ValueError, match="warmup >= 0"):
        DraftProbeConfig(warmup=-1)
