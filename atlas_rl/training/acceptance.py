"""Estimated acceptance of a draft head on captured rollouts, without a single extra target forward.

Why: in RL rollouts the controller often verifies nothing (many rows are compute-bound on a CPU), so the
measured acceptance says nothing about how well each head still tracks the moving policy. The capture buffer
already holds, for every completion position of the latest rollout, the target's features and its T=1
distribution of the next token (top-K). From those the head's draft chain can be replayed (training-time test
unroll, the exact attention pattern of drafting) and its acceptance computed in closed form:

* a draft token sampled from the head's distribution ``q`` is accepted by the rejection sampler with
  probability ``sum_v min(p(v), q(v))`` (``p`` the target's distribution; T = 1);
* step ``j`` of the chain from base position ``t`` is reached only if steps ``1..j-1`` were accepted, so the
  expected acceptance length with ``k`` drafts is ``1 + sum_j prod_{i<=j} a_i(t)``, averaged over ``t``.

The replay feeds the chain the sampled tokens (a draft continues only after an accepted token), so this is the
expected acceptance along the path the policy actually took: hardware-independent, comparable between heads
and across policy versions. It is an estimate of T=1 acceptance (labels are top-K truncated, so it is a slight
underestimate), not a measurement of the engine's verification.

Cost: the replay is a training-style forward of the head over every position it is given, so the trainer's probe
keeps it cheap by replaying only a window of each completion (:func:`first_labeled_window`, the first
``max_positions`` positions from a little before the first labeled one).
"""

from __future__ import annotations

import torch

from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.losses import _shift
from atlas_rl.training.samples import DraftBatch, SequenceSample, collate


def chain_acceptance(
    step_logits: list[torch.Tensor],  # k x [B, T, draft_vocab]: step j's draft logits from base position t
    batch: DraftBatch,
) -> tuple[float, list[float], int]:
    """``(expected acceptance length, per-step conditional acceptance, base positions counted)``.

    Counts the base positions whose whole chain of ``k`` steps has features and captured labels (the chain
    would not be drafted past the end of a completion anyway). Per-step rates are the mean of ``a_j`` over the
    same positions."""
    k = len(step_logits)
    if k == 0:
        raise ValueError("chain_acceptance needs at least one draft step")
    keep = batch.valid.clone()  # [B, T]
    rates: list[torch.Tensor] = []
    for j, logits in enumerate(step_logits, start=1):
        idx = _shift(batch.label_idx, j, -1)  # [B, T, K] draft ids of x_{t+j+1}'s target distribution
        probs = _shift(batch.label_probs, j, 0.0)  # [B, T, K]
        keep &= _shift(batch.label_mask, j, False)
        q = torch.softmax(logits.float(), -1).gather(-1, idx.clamp(min=0)) * (idx >= 0)  # [B, T, K]
        rates.append(torch.minimum(probs.float(), q).sum(-1).clamp(max=1.0))  # [B, T]
    n = int(keep.sum())
    if n == 0:
        return float("nan"), [float("nan")] * k, 0
    reach = torch.ones_like(rates[0])
    tau = torch.ones_like(rates[0])
    for a in rates:
        reach = reach * a
        tau = tau + reach
    per_step = [float(a[keep].mean()) for a in rates]
    return float(tau[keep].mean()), per_step, n


def first_labeled_window(sample: SequenceSample, max_positions: int) -> SequenceSample:
    """At most ``max_positions`` positions of ``sample``: from a quarter window before its first labeled position
    (some prompt context for the head's attention), the whole sample when it is short enough."""
    if max_positions < 2:
        raise ValueError(f"max_positions must be >= 2, got {max_positions}")
    n = len(sample)
    if n <= max_positions:
        return sample
    lab = torch.nonzero(sample.label_mask).flatten()
    first = int(lab[0]) if lab.numel() else 0
    start = min(max(0, first - max_positions // 4), n - max_positions)
    sl = slice(start, start + max_positions)
    return SequenceSample(
        sample.tokens[sl], sample.feats[sl], sample.has_feats[sl], sample.label_ids[sl], sample.label_probs[sl],
        sample.label_mask[sl], sample.policy_version,
    )  # fmt: skip


@torch.no_grad()
def estimate_acceptance(
    head: DraftHead,
    samples: list[SequenceSample],
    num_draft_tokens: int,
) -> tuple[float, list[float], int]:
    """Replay ``head``'s ``num_draft_tokens``-step draft chain over ``samples`` (captured with their features and
    labels) and return :func:`chain_acceptance` of it. Runs in the head's dtype on its device."""
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if not samples:
        return float("nan"), [float("nan")] * num_draft_tokens, 0
    dev, dtype = head.fc.weight.device, head.fc.weight.dtype
    batch = collate(samples, head.target_to_draft.cpu()).to(dev, dtype)
    outs = head.ttt_logits(batch.tokens, batch.feats, batch.valid, num_draft_tokens)
    return chain_acceptance(outs, batch)
