"""The training-time-test objective of draft heads (EAGLE-3): soft cross-entropy against the target's
distribution at every step of the unrolled draft chain, later steps weighted less."""

from __future__ import annotations

import torch

from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.samples import DraftBatch


def _shift(x: torch.Tensor, j: int, fill: float | int | bool) -> torch.Tensor:
    """``out[:, t] = x[:, t + j]`` (positions past the end filled with ``fill``)."""
    if j == 0:
        return x
    pad = torch.full_like(x[:, :j], fill)
    return torch.cat([x[:, j:], pad], 1)


def ttt_loss(
    head: DraftHead,
    batch: DraftBatch,
    steps: int = 3,
    decay: float = 0.7,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted mean over steps j = 1..steps of the soft cross-entropy ``-sum_v target(v) log draft(v)``.

    Step j at base position t predicts ``x_{t+j+1}``, whose target distribution is the label at position t+j;
    it counts where the base has features (``valid[t]``) and the label is trained on (``label_mask[t+j]``).
    Weights ``decay**(j-1)``, normalised. Also returns per-step loss and top-1 agreement (the draft's argmax
    equals the target's most likely token: the greedy acceptance of that step given the previous ones).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    outs = head.ttt_logits(batch.tokens, batch.feats, batch.valid, steps)
    total = batch.feats.new_zeros(())
    wsum = 0.0
    metrics: dict[str, float] = {}
    for j, logits in enumerate(outs, start=1):  # logits: [B, T, draft_vocab]
        idx = _shift(batch.label_idx, j, -1)  # [B, T, K]
        probs = _shift(batch.label_probs, j, 0.0)  # [B, T, K]
        mask = batch.valid & _shift(batch.label_mask, j, False)  # [B, T]
        if not bool(mask.any()):
            continue
        logq = torch.log_softmax(logits.float(), -1)
        inside = idx >= 0
        picked = logq.gather(-1, idx.clamp(min=0)) * inside  # [B, T, K]
        ce = -(probs * picked).sum(-1)  # [B, T]
        loss_j = (ce * mask).sum() / mask.sum()
        w = decay ** (j - 1)
        total = total + w * loss_j
        wsum += w
        with torch.no_grad():
            top_label = idx[..., 0]  # labels are sorted: column 0 is the target's most likely token
            agree = (logits.argmax(-1) == top_label) & (top_label >= 0)
            metrics[f"loss_step{j}"] = float(loss_j.detach())
            metrics[f"top1_step{j}"] = float((agree & mask).sum() / mask.sum())
    if wsum == 0:
        return total, metrics
    loss = total / wsum
    metrics["loss"] = float(loss.detach())
    return loss, metrics
