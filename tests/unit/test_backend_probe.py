"""The acceptance probe stays cheap: it replays a bounded window of a few completions, and its time is taken out
of the retraining budget so probe + retraining stay within ``atlas_adaptive_train_fraction`` of the RL step."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.trainers import AtlasGRPOConfig
from atlas_rl.trainers.backend import BUDGET_HEADROOM, AtlasRolloutBackend
from atlas_rl.training.acceptance import first_labeled_window
from atlas_rl.training.samples import SequenceSample


def _sample(n: int, first_label: int) -> SequenceSample:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[first_label:] = True
    return SequenceSample(
        torch.arange(n), torch.randn(n, 4), torch.ones(n, dtype=torch.bool), torch.zeros(n, 2, dtype=torch.long),
        torch.full((n, 2), 0.5), mask,
    )  # fmt: skip


def test_probe_window_is_bounded_and_starts_before_the_completion():
    s = _sample(300, first_label=100)
    w = first_labeled_window(s, 48)
    assert len(w) == 48 and int(w.tokens[0]) == 100 - 12 and w.num_labels == 36
    short = _sample(30, first_label=10)
    assert first_labeled_window(short, 48) is short
    late = first_labeled_window(_sample(100, first_label=99), 48)
    assert len(late) == 48 and int(late.tokens[-1]) == 99  # never runs past the end


def test_probe_time_comes_out_of_the_retraining_budget(tmp_path):
    """The budget is the fraction of the last RL step (rollout start to rollout start; the rollout itself before a
    whole step was seen) at BUDGET_HEADROOM, less the probe's time, never under the floor."""
    opts = AtlasGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           atlas_adaptive_train_fraction=0.1, atlas_adaptive_train_min_s=0.0)  # fmt: skip
    backend = AtlasRolloutBackend(opts, eos_token_ids=[0])
    backend.last_rollout_s = 100.0
    assert backend._train_budget() == pytest.approx(10.0 * BUDGET_HEADROOM)
    backend._record_step(400.0)  # a whole GRPO step: rollout + policy update
    assert backend._train_budget() == pytest.approx(40.0 * BUDGET_HEADROOM)
    backend.last_probe = {"atlas/acceptance_probe_s": 3.0}
    assert backend._train_budget() == pytest.approx(40.0 * BUDGET_HEADROOM - 3.0)
    backend.last_probe = {"atlas/acceptance_probe_s": 300.0}
    assert backend._train_budget() == 0.0
    backend.options.atlas_adaptive_train_min_s = 1.0  # the floor holds for the retraining itself
    assert backend._train_budget() == 1.0


def test_one_slow_step_does_not_grow_the_next_budget(tmp_path):
    """One step slowed by something else on the machine buys no more retraining (the lower median of the recent
    steps caps it); a persistently slower run does after the median moves; a faster step shrinks it at once."""
    opts = AtlasGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                           atlas_adaptive_train_fraction=0.1, atlas_adaptive_train_min_s=0.0)  # fmt: skip
    backend = AtlasRolloutBackend(opts, eos_token_ids=[0])
    backend.last_rollout_s = 30.0
    for step_s, base in [(40.0, 40.0), (42.0, 40.0), (120.0, 42.0), (41.0, 41.0), (20.0, 20.0), (110.0, 42.0),
                         (115.0, 110.0), (118.0, 110.0)]:  # fmt: skip
        backend._record_step(step_s)
        assert backend._step_base() == base, step_s
    assert backend._train_budget() == pytest.approx(0.1 * 110.0 * BUDGET_HEADROOM)


def test_time_outside_the_step_is_not_part_of_the_next_step(tmp_path):
    """An evaluation or probe between two steps (``outside_step``) does not grow the RL step the retraining
    budget is a fraction of: the step clock moves past it."""
    import time

    opts = AtlasGRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    backend = AtlasRolloutBackend(opts, eos_token_ids=[0])
    with backend.outside_step():  # before any rollout: nothing to move
        pass
    assert backend._rollout_started_at is None
    backend._rollout_started_at = start = time.perf_counter()
    with backend.outside_step():
        time.sleep(0.2)
    assert backend._rollout_started_at - start >= 0.2
    with pytest.raises(RuntimeError), backend.outside_step():  # the clock moves even when the probe fails
        time.sleep(0.05)
        raise RuntimeError("probe failed")
    assert backend._rollout_started_at - start >= 0.25
