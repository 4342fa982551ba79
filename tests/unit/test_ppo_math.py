"""PPO maths (trainers/ppo_core.py) against direct loops and hand-computed values, in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atlas_rl.trainers.ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    kl_per_token,
    masked_mean,
    masked_var,
    masked_whiten,
    penalised_rewards,
    policy_loss,
    value_loss,
)


def _gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion, one row and one token at a time in Python floats; an invalid position ends the
    episode (no bootstrap past it)."""
    b, t = len(rewards), len(rewards[0])
    adv = [[0.0] * t for _ in range(b)]
    for i in range(b):
        next_v, next_a = 0.0, 0.0
        for j in reversed(range(t)):
            if not mask[i][j]:
                next_v, next_a = 0.0, 0.0
                continue
            r, v = float(rewards[i][j]), float(values[i][j])
            delta = r + gamma * next_v - v
            a = delta + gamma * lam * next_a
            adv[i][j] = a
            next_v, next_a = v, a
    return torch.tensor(adv, dtype=torch.float64)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gae_equals_direct_loop_exactly_on_random_masks(gamma, lam, seed):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(5, 11, generator=g, dtype=torch.float64)
    values = torch.randn(5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 11, generator=g) > 0.3  # arbitrary holes, not only prefixes
    mask[:, 0] = True
    adv, ret = gae(rewards, values, mask, gamma, lam)
    want = _gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    assert torch.equal(adv, want)  # bit for bit
    assert torch.equal(ret, torch.where(mask, want + values, torch.zeros_like(values)))


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 0.125, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    assert adv.tolist() == [[6.0 - 0.5, 5.0 - 0.25, 3.0 - 0.125, 0.0]]
    assert ret.tolist() == [[6.0, 5.0, 3.0, 0.0]]


def test_masked_whiten_uses_only_valid_entries():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64) * 3 + 2
    mask = torch.rand(4, 9, generator=g) > 0.4
    x_poisoned = torch.where(mask, x, torch.full_like(x, 1e6))  # masked values must not matter
    w = masked_whiten(x_poisoned, mask)
    valid = x[mask].numpy()
    ref = (valid - valid.mean()) / math.sqrt(valid.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(w[mask].numpy(), ref, rtol=1e-12, atol=1e-12)
    assert torch.all(w[~mask] == 0)
    kept = masked_whiten(x_poisoned, mask, shift_mean=False)
    np.testing.assert_allclose(kept[mask].numpy(), ref + valid.mean(), rtol=1e-12, atol=1e-12)
    assert float(masked_mean(x_poisoned, mask)) == pytest.approx(valid.mean(), rel=1e-12)
    assert float(masked_var(x_poisoned, mask)) == pytest.approx(valid.var(ddof=1), rel=1e-12)


def test_masked_whiten_single_entry_is_left_alone():
    x = torch.tensor([[5.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False]])
    assert masked_whiten(x, mask).tolist() == [[5.0, 0.0]]


def test_policy_loss_matches_hand_computed_values():
    old = torch.zeros(1, 4, dtype=torch.float64)
    ratios = torch.tensor([[1.5, 0.5, 1.1, 3.0]], dtype=torch.float64)
    new = torch.log(ratios).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])  # the last token would dominate if it counted
    out = policy_loss(new, old, adv, mask, cliprange=0.2)
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(0.5, 0.8) = 0.8 (clipped); t2: max(-2.2, -2.2) (not clipped)
    assert float(out.loss.detach()) == pytest.approx((-1.2 + 0.8 - 2.2) / 3, abs=1e-12)
    assert float(out.clipfrac) == pytest.approx(2 / 3, abs=1e-12)
    logs = np.log([1.5, 0.5, 1.1])
    assert float(out.approxkl) == pytest.approx(0.5 * np.mean(logs**2), abs=1e-12)
    out.loss.backward()
    # only the unclipped token passes a gradient: d/dlogr (-A r) / 3 = -2 * 1.1 / 3
    assert new.grad.tolist()[0][:3] == pytest.approx([0.0, 0.0, -2.2 / 3], abs=1e-12)
    assert new.grad.tolist()[0][3] == 0.0


def test_value_loss_matches_hand_computed_values():
    values = torch.tensor([[0.5, 2.0, 50.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    returns = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    loss, clipfrac = value_loss(values, old, returns, mask, cliprange_value=0.2)
    # t0: max((0.5-1)^2, (0.2-1)^2) = 0.64 (clipped); t1: max((2-1)^2, (1.2-1)^2) = 1.0 (unclipped)
    assert float(loss.detach()) == pytest.approx(0.5 * (0.64 + 1.0) / 2, abs=1e-12)
    assert float(clipfrac) == pytest.approx(0.5, abs=1e-12)
    loss.backward()
    assert values.grad.tolist()[0] == pytest.approx([0.0, 0.5 * 2 * (2.0 - 1.0) / 2, 0.0], abs=1e-12)


def test_kl_penalty_on_every_valid_token_and_score_on_the_last_valid_one():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -0.5, -1.0], [-2.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    scores = torch.tensor([10.0, 20.0], dtype=torch.float64)
    rewards, kl = penalised_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]  # k1 = logp - ref, 0 on padding
    want = [[-0.05, 0.1, 10.0, 0.0], [20.0 - 0.1, 0.0, 0.0, 0.0]]
    np.testing.assert_allclose(rewards.numpy(), np.array(want), rtol=0, atol=1e-12)
    no_kl, kl0 = penalised_rewards(scores, logprobs, None, mask, kl_coef=0.1)
    assert no_kl.tolist() == [[0.0, 0.0, 10.0, 0.0], [20.0, 0.0, 0.0, 0.0]] and torch.all(kl0 == 0)
    k3 = kl_per_token(logprobs, ref, "k3")
    assert torch.all(k3 >= 0) and float(k3[0, 2]) == 0.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_per_token(logprobs, ref, "k2")
    with pytest.raises(ValueError, match="at least one token"):
        penalised_rewards(scores, logprobs, ref, torch.zeros_like(mask), kl_coef=0.1)


def test_adaptive_kl_controller_moves_towards_target():
    up = AdaptiveKLController(0.1, target=6.0, horizon=100)
    up.update(current_kl=60.0, n_steps=10)  # error clipped to +0.2
    assert up.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    down = AdaptiveKLController(0.1, target=6.0, horizon=100)
    down.update(current_kl=4.5, n_steps=10)  # error -0.25 -> -0.2
    assert down.value == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))
    near = AdaptiveKLController(0.1, target=6.0, horizon=100)
    near.update(current_kl=6.6, n_steps=10)
    assert near.value == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
    restored = AdaptiveKLController(0.5, 6.0, 100)
    restored.load_state_dict(up.state_dict())
    assert restored.value == up.value
