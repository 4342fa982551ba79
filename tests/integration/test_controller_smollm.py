"""The auto controller on the embedded default (SmolLM2-135M): calibration of the real model within its bound,
speculation switched off where this CPU cannot profit (many rows), and the controller's decisions at one row.
Decisions are asserted, not speeds: the machines these run on are shared and noisy."""

from __future__ import annotations

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.bench.workloads import grpo_workload
from atlas_rl.config import EngineConfig
from atlas_rl.controller import AutoController, AutoControllerConfig
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators import SuffixSpeculator

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target():
    from atlas_rl.models import load_target

    return load_target()


@pytest.fixture(scope="module")
def calibrated(target, tmp_path_factory):
    """An engine with a cost model calibrated from scratch (private cache) and the time it took."""
    model, _ = target
    mp = pytest.MonkeyPatch()
    mp.setenv("ATLAS_RL_CACHE", str(tmp_path_factory.mktemp("cache")))
    # the model itself loads from the user's cache (fixture above); only the controller cache is private
    eng = RolloutEngine(model, speculators=[SuffixSpeculator()], config=EngineConfig(controller="auto"))
    yield eng
    mp.undo()


def test_real_model_calibration_is_bounded_and_shaped(calibrated):
    cost = calibrated.verification_cost()
    budget = AutoControllerConfig().calibration_budget_s
    assert not cost.from_cache and cost.calibration_s <= budget * 1.5  # one point may overrun its estimate
    # at one row, 9 tokens cost well under 9x one token (memory-bound); the table grows with rows
    assert cost.forward_s(1, 9) < 4 * cost.forward_s(1, 1)
    assert cost.forward_s(64, 1) > cost.forward_s(1, 1)


def test_many_rows_switch_speculation_off(target, calibrated):
    model, tok = target
    w = grpo_workload(tok, num_prompts=8, num_generations=8, max_new_tokens=24)
    sp = SamplingParams(temperature=1.0, max_new_tokens=24, seed=0, ignore_eos=True)
    out = calibrated.generate(w.prompt_ids, sp, num_generations=8)
    st = out.stats
    assert st.num_spec_off_steps >= 0.9 * st.num_steps, st.draft_len_histogram


def test_one_row_greedy_controller_is_lossless_and_cheap(target, calibrated):
    model, tok = target
    w = grpo_workload(tok, num_prompts=1, num_generations=1, max_new_tokens=48)
    sp = SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    base = RolloutEngine(model).generate(w.prompt_ids, sp)
    ctl = AutoController(AutoControllerConfig(max_k=8), cost=calibrated.verification_cost())
    out = RolloutEngine(model, speculators=[SuffixSpeculator()], controller=ctl).generate(w.prompt_ids, sp)
    # fp32: speculation may flip a near-tie late in a sequence; the first 16 tokens must agree exactly
    assert out.completion_ids[0][:16] == base.completion_ids[0][:16]
    assert out.stats.plan_ms_per_step < 0.05 * 1000 * out.stats.forward_s / out.stats.num_steps
    assert torch.isfinite(torch.tensor(out.logprobs[0])).all()
