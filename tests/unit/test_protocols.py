"""Optional Protocol members are declared with defaults (Speculator extras, Controller), and the longest draft is
``num_speculative_tokens`` everywhere (``max_k`` kept as a deprecated alias)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import BigramSpeculator

from atlas_rl import SamplingParams
from atlas_rl.controller import AutoController, AutoControllerConfig, Controller, FixedController, PlanState
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators.base import speculator_extras
from atlas_rl.types import Draft


def test_speculator_without_optional_members_gets_the_defaults():
    spec = BigramSpeculator(8, soft=False)
    extras = speculator_extras(spec)
    assert extras.expected_acceptance is None and extras.draft_macs_per_token is None
    assert extras.on_policy_update(3) is None and extras.observe_hidden([0], {}, [1]) is None


def test_speculator_optional_members_are_its_own_when_present():
    seen: list[int] = []
    spec = BigramSpeculator(8, soft=False)
    spec.expected_acceptance = 0.4
    spec.on_policy_update = seen.append
    extras = speculator_extras(spec)
    extras.on_policy_update(7)
    assert extras.expected_acceptance == 0.4 and seen == [7]


@pytest.mark.parametrize(
    "attr, value, match",
    [
        ("expected_acceptance", 1.5, "expected_acceptance"),
        ("hidden_layers", (1,), "observe_hidden"),
        ("draft_macs_per_token", 0, "draft_macs_per_token"),
        ("draft_macs_per_token", 2.5, "draft_macs_per_token"),
    ],
)
def test_engine_rejects_bad_optional_members_at_registration(attr, value, match):
    spec = BigramSpeculator(64, soft=False)
    setattr(spec, attr, value)
    with pytest.raises(ValueError, match=match):
        RolloutEngine(tiny_llama(vocab_size=64), speculators=[spec])


def test_update_weights_calls_on_policy_update_of_each_speculator():
    seen: list[int] = []
    spec = BigramSpeculator(64, soft=False)
    spec.on_policy_update = seen.append
    eng = RolloutEngine(tiny_llama(vocab_size=64), speculators=[spec, BigramSpeculator(64, soft=False, name="b")])
    eng.update_weights(version=4)
    assert seen == [4]


def test_controller_subclass_inherits_the_protocol_defaults():
    class FirstDraft(Controller):
        num_speculative_tokens = 2

        def plan(self, state):
            return [[(name, 2) for name in state.speculators] for _ in state.row_ids]

        def update(self, record, per_row):
            pass

    ctl = FirstDraft()
    assert ctl.needs_cost_model is False and ctl.set_speculator_priors({"x": 0.5}) is None
    state = PlanState([0, 1], [0, 0], [5, 5], ["a"], 0, True)
    assert ctl.choose(state, [{"a": Draft([1])}, {}])[1] is None
    eng = RolloutEngine(tiny_llama(vocab_size=64, dtype=torch.float64), speculators=[BigramSpeculator(64, False)])
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    assert eng.generate([[1, 2, 3]], sp, controller=ctl).stats.num_drafts > 0


def test_num_speculative_tokens_names_the_longest_draft_and_max_k_is_deprecated():
    assert FixedController(3).num_speculative_tokens == 3 == FixedController(3).max_k
    with pytest.warns(DeprecationWarning, match="num_speculative_tokens"):
        cfg = AutoControllerConfig(max_k=5)
    assert cfg.num_speculative_tokens == 5 and cfg.max_k is None
    ctl = AutoController(AutoControllerConfig(num_speculative_tokens=6))
    assert ctl.num_speculative_tokens == 6 == ctl.max_k
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        AutoControllerConfig(num_speculative_tokens=0)
