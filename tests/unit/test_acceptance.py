"""Estimated acceptance of a draft head from captured rollouts (closed form, no target forward)."""

from __future__ import annotations

import math

import pytest
import torch

from atlas_rl.training.acceptance import chain_acceptance
from atlas_rl.training.samples import DraftBatch


def _batch(B=2, T=7, V=5, K=5, seed=0) -> DraftBatch:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(B, T, V, generator=g) * 2, -1)
    vals, ids = probs.sort(-1, descending=True)
    return DraftBatch(
        tokens=torch.randint(0, V, (B, T), generator=g),
        feats=torch.zeros(B, T, 3),
        valid=torch.ones(B, T, dtype=torch.bool),
        label_idx=ids[..., :K],
        label_probs=vals[..., :K],
        label_mask=torch.ones(B, T, dtype=torch.bool),
    )


def _reference(step_logits, batch) -> tuple[float, list[float], int]:
    """Loops over base positions: a_j = sum_v min(p_{t+j}(v), q_j(v)); tau = 1 + sum_j prod_{i<=j} a_i."""
    k = len(step_logits)
    B, T = batch.valid.shape
    taus, rates = [], [[] for _ in range(k)]
    for b in range(B):
        for t in range(T):
            if not batch.valid[b, t] or t + k >= T or not all(batch.label_mask[b, t + j] for j in range(1, k + 1)):
                continue
            reach, tau = 1.0, 1.0
            for j in range(1, k + 1):
                q = torch.softmax(step_logits[j - 1][b, t].double(), -1)
                a = 0.0
                for idx, p in zip(batch.label_idx[b, t + j].tolist(), batch.label_probs[b, t + j].tolist()):
                    if idx >= 0:
                        a += min(p, float(q[idx]))
                rates[j - 1].append(a)
                reach *= a
                tau += reach
            taus.append(tau)
    return sum(taus) / len(taus), [sum(r) / len(r) for r in rates], len(taus)


def test_matches_the_reference_loop():
    batch = _batch(K=3)  # truncated labels: the estimate only credits the kept top-K mass
    batch.label_mask[0, 4] = False
    batch.valid[1, 0] = False
    batch.label_idx[1, 3, 1] = -1  # a label outside the draft vocabulary
    g = torch.Generator().manual_seed(1)
    logits = [torch.randn(2, 7, 5, generator=g) for _ in range(3)]
    tau, per_step, n = chain_acceptance(logits, batch)
    rtau, rper, rn = _reference(logits, batch)
    assert n == rn
    assert tau == pytest.approx(rtau, abs=1e-5)
    assert per_step == pytest.approx(rper, abs=1e-5)


def test_a_head_that_equals_the_target_accepts_every_draft():
    batch = _batch()
    k = 3
    full = torch.zeros(2, 7, 5).scatter(-1, batch.label_idx, batch.label_probs).log()  # the target's own logits
    logits = [torch.cat([full[:, j:], full[:, -j:]], 1) for j in range(1, k + 1)]  # step j predicts x_{t+j+1}
    tau, per_step, n = chain_acceptance(logits, batch)
    assert n == 2 * (7 - k)
    assert tau == pytest.approx(1 + k, abs=1e-5)
    assert per_step == pytest.approx([1.0] * k, abs=1e-5)


def test_a_head_that_proposes_only_impossible_tokens_accepts_nothing():
    batch = _batch(K=2)  # the target gives mass only to its top-2 tokens
    nxt = torch.cat([batch.label_idx[:, 1:], batch.label_idx[:, -1:]], 1)  # labels of x_{t+2}
    logits = torch.full((2, 7, 5), -1e9)
    for b in range(2):
        for t in range(7):
            v = next(v for v in range(5) if v not in nxt[b, t].tolist())  # outside the target's top-2
            logits[b, t, v] = 0.0
    tau, per_step, n = chain_acceptance([logits], batch)
    assert n > 0 and tau == pytest.approx(1.0) and per_step == pytest.approx([0.0])


def test_no_countable_position_gives_nan():
    batch = _batch(T=2)
    tau, per_step, n = chain_acceptance([torch.zeros(2, 2, 5)] * 3, batch)  # chains longer than the sequences
    assert n == 0 and math.isnan(tau) and all(math.isnan(x) for x in per_step)
    with pytest.raises(ValueError, match="at least one"):
        chain_acceptance([], batch)
