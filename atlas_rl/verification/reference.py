"""The reference verifier: one sequence, plain Python loops, small enough to check by eye.

It is the test oracle of the batched ``RejectionSampler`` (same uniforms in, same tokens out).

Speculative sampling (Leviathan et al. 2023, Chen et al. 2023): draft token ``x_j`` was drawn from
``draft_probs[j]``. It is *accepted* with probability ``min(1, target_probs[j, x_j] / draft_probs[j, x_j])``.
At the first rejection the *recovered* token is drawn from the residual
``norm(max(target_probs[j] - draft_probs[j], 0))`` and the step ends; if all d drafts are accepted a *bonus*
token is drawn from ``target_probs[d]``. Each emitted token is then distributed exactly as ``target_probs``:
``P(x) = draft_probs(x) min(1, target_probs(x) / draft_probs(x)) + P(reject) residual(x) = target_probs(x)``.
One-hot drafts (model-free speculators) have ``draft_probs[j] = onehot(x_j)``: accept with probability
``target_probs[j, x_j]``, recover from ``target_probs[j]`` with ``x_j`` removed.
Greedy (T = 0): accept while the draft equals the target's argmax; the recovered/bonus token is the argmax.
"""

from __future__ import annotations

import torch

from atlas_rl.types import SamplingParams
from atlas_rl.verification.processing import processed_probs, sample_inverse_cdf

__all__ = ["reference_verify"]


def reference_verify(
    draft_ids: list[int],
    draft_probs: torch.Tensor | None,  # [d, vocab] processed draft distributions, or None = one-hot drafts
    target_logits: torch.Tensor,  # [d+1, vocab] raw target logits
    sampling: SamplingParams,
    uniforms: torch.Tensor,  # [d+1]: [:d] for the accept tests, [d] for the recovered/bonus sample
) -> tuple[list[int], int]:
    """Verify one draft; returns (emitted tokens = accepted drafts + recovered/bonus token, num_accepted)."""
    d = len(draft_ids)
    if sampling.greedy:
        target_argmax = target_logits.argmax(dim=-1).tolist()  # [d+1]
        for j, x in enumerate(draft_ids):
            if x != target_argmax[j]:
                return draft_ids[:j] + [target_argmax[j]], j  # recovered = the target's own choice
        return draft_ids + [target_argmax[d]], d  # bonus

    target_probs = processed_probs(target_logits, sampling)  # [d+1, vocab]
    for j, x in enumerate(draft_ids):
        draft_prob_x = 1.0 if draft_probs is None else draft_probs[j, x]
        # accept with probability min(1, target_probs / draft_probs): u < target / draft <=> u * draft < target
        if uniforms[j] * draft_prob_x < target_probs[j, x]:
            continue
        # rejected: recovered token ~ norm(max(target_probs - draft_probs, 0))
        if draft_probs is None:
            residual = target_probs[j].clone()
            residual[x] = 0.0  # target_probs - onehot(x), clamped at 0
        else:
            residual = torch.clamp(target_probs[j] - draft_probs[j], min=0.0)
        if residual.sum() <= 0:
            residual = target_probs[j]  # target == draft up to rounding: rejection was a rounding artefact
        return draft_ids[:j] + [int(sample_inverse_cdf(residual, uniforms[d]))], j
    # every draft accepted: bonus token ~ target_probs[d]
    return draft_ids + [int(sample_inverse_cdf(target_probs[d], uniforms[d]))], d
