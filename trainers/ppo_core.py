"""The PPO maths, free of models and trainers: masked statistics, whitening, the KL-penalised per-token rewards,
generalised advantage estimation, the clipped policy and value losses, and the KL coefficient controllers.

Every tensor is ``[batch, response_len]`` over the *response* tokens, with a 0/1 (or bool) ``mask`` marking the
valid ones. Positions ``t`` count response tokens: ``values[:, t]`` is the value of the state *before* token ``t``
is emitted, ``logprobs[:, t]`` the log-probability of token ``t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true (all of them, or along ``dim``)."""
    m = mask.to(x.dtype)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1)
    return (x * m).sum(dim) / m.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected when ``unbiased`` and more than one entry)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = m.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (the mean is added back when ``shift_mean`` is False, as in
    TRL's reward whitening); masked-out positions become 0. Fewer than two valid entries: only the mask applies."""
    valid = mask.bool()
    if int(valid.sum()) < 2:
        return torch.where(valid, x, torch.zeros_like(x))
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(valid, out, torch.zeros_like(out))


def kl_per_token(
    logprobs: torch.Tensor,  # [b, t] behaviour policy
    ref_logprobs: torch.Tensor,  # [b, t] frozen reference
    estimator: str = "k1",
) -> torch.Tensor:  # [b, t]
    """Per-token KL estimate of the sampled token: ``k1 = log pi - log ref`` (unbiased, may be negative) or
    ``k3 = (r - 1) - log r`` with ``r = ref / pi`` (non-negative, lower variance; Schulman's approximations)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    logr = ref_logprobs - logprobs
    return -logr if estimator == "k1" else torch.expm1(logr) - logr


def last_valid_index(mask: torch.Tensor) -> torch.Tensor:  # [b]
    """Index of the last valid response token of each row of a prefix mask ``[b, t]`` (rows need >= 1 token)."""
    lengths = mask.long().sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every response needs at least one token (a row of the mask is empty)")
    return lengths - 1


def penalised_rewards(
    scores: torch.Tensor,  # [b] sequence-level reward
    logprobs: torch.Tensor,  # [b, t]
    ref_logprobs: torch.Tensor | None,  # [b, t]; None = no KL penalty
    mask: torch.Tensor,  # [b, t] prefix mask of the valid response tokens
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:  # rewards [b, t], kl [b, t]
    """Per-token rewards: ``-kl_coef * kl_t`` on every valid token, plus the sequence's score on its *last valid*
    token; 0 on padding. Returns ``(rewards, kl)`` (``kl`` is 0 where masked or without a reference)."""
    valid = mask.bool()
    if ref_logprobs is None or kl_coef == 0:
        kl = torch.zeros_like(logprobs)
    else:
        kl = torch.where(valid, kl_per_token(logprobs, ref_logprobs, estimator), torch.zeros_like(logprobs))
    rewards = -kl_coef * kl
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_valid_index(mask)] += scores.to(rewards.dtype)
    return torch.where(valid, rewards, torch.zeros_like(rewards)), kl


def gae(
    rewards: torch.Tensor,  # [b, t]
    values: torch.Tensor,  # [b, t]
    mask: torch.Tensor,  # [b, t]
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # advantages [b, t], returns [b, t]
    """Generalised advantage estimation (Schulman et al. 2016), backwards over time::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}

    An invalid position ends an episode: ``V_{t+1}`` and ``A_{t+1}`` count as 0 after the last valid token (no
    bootstrap at the end of a response), and invalid positions get ``A = returns = 0``. ``returns = A + V``."""
    b, t = rewards.shape
    valid = mask.bool()
    zero = torch.zeros(b, dtype=rewards.dtype, device=rewards.device)
    next_value, next_adv = zero, zero
    out = []
    for i in reversed(range(t)):
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        adv = delta + gamma * lam * next_adv
        adv = torch.where(valid[:, i], adv, zero)
        next_value = torch.where(valid[:, i], values[:, i], zero)
        next_adv = adv
        out.append(adv)
    advantages = torch.stack(out[::-1], dim=1)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


@dataclass
class PolicyLoss:
    loss: torch.Tensor  # scalar, differentiable
    clipfrac: torch.Tensor  # scalar: share of valid tokens where the clipped term was the larger one
    approxkl: torch.Tensor  # scalar: 0.5 * mean (log ratio)^2 over valid tokens
    ratio: torch.Tensor  # [b, t] pi_new / pi_old (detached)


def policy_loss(
    new_logprobs: torch.Tensor,  # [b, t] current policy (with grad)
    old_logprobs: torch.Tensor,  # [b, t] behaviour policy
    advantages: torch.Tensor,  # [b, t]
    mask: torch.Tensor,  # [b, t]
    cliprange: float,
) -> PolicyLoss:
    """PPO's clipped surrogate: ``mean max(-A * r, -A * clip(r, 1 - eps, 1 + eps))`` over valid tokens."""
    log_ratio = torch.where(mask.bool(), new_logprobs - old_logprobs, torch.zeros_like(new_logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approxkl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return PolicyLoss(loss=loss, clipfrac=clipfrac, approxkl=approxkl, ratio=ratio.detach())


def value_loss(
    values: torch.Tensor,  # [b, t] current value model (with grad)
    old_values: torch.Tensor,  # [b, t] at rollout time
    returns: torch.Tensor,  # [b, t]
    mask: torch.Tensor,  # [b, t]
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # loss (scalar), clipfrac (scalar)
    """Clipped value loss: ``0.5 * mean max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)`` over valid
    tokens, and the share of valid tokens where the clipped term was the larger one."""
    clipped_v = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    with torch.no_grad():
        clipfrac = masked_mean((l2 > l1).to(values.dtype), mask)
    return loss, clipfrac


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019)'s proportional controller: moves the coefficient so the observed KL (per sequence,
    summed over tokens) approaches ``target`` with time constant ``horizon`` (in samples)::

        e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
