"""Training data of draft heads: whole sequences with the target's features and soft labels per position.

One :class:`SequenceSample` per sequence (prompt + completion), for positions ``p = 0 .. T-1``:

* ``tokens[p]`` = ``x_p``;
* ``feats[p]`` = the target's features at position p (the hidden states, of the head's ``fuse_layers``
  concatenated, that produced ``x_{p+1}``); ``has_feats[p]`` False where the target never ran (the last token);
* ``label_ids[p] / label_probs[p]`` = the target's distribution of ``x_{p+1}`` (T = 1), kept as its top-K
  tokens (target-vocabulary ids, -1 padding) — the soft labels; ``label_mask[p]`` says which positions train
  the head (completion positions whose distribution was captured);
* ``policy_version``: the policy that produced the features and labels.

Both the offline pipeline (static head) and the engine's capture hook (adaptive head) produce this format.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SequenceSample:
    tokens: torch.Tensor  # [T] long
    feats: torch.Tensor  # [T, F] (float16 to save memory)
    has_feats: torch.Tensor  # [T] bool
    label_ids: torch.Tensor  # [T, K] long, target-vocabulary ids, -1 = padding
    label_probs: torch.Tensor  # [T, K] float
    label_mask: torch.Tensor  # [T] bool
    policy_version: int = 0

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_labels(self) -> int:
        return int(self.label_mask.sum())

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.tokens, self.feats, self.has_feats, self.label_ids, self.label_probs, self.label_mask)
        )


def topk_labels(
    logits: torch.Tensor,  # [..., vocab] raw target logits
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [..., k] long, probs [..., k] float32
    """The target's T=1 distribution kept as its ``k`` most likely tokens (probabilities not renormalised)."""
    lp = torch.log_softmax(logits.float(), -1)
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
    return ids, vals.exp()


@dataclass
class DraftBatch:
    """A padded batch for :func:`atlas_rl.training.losses.ttt_loss` (labels mapped to draft-vocabulary indices)."""

    tokens: torch.Tensor  # [B, T] long
    feats: torch.Tensor  # [B, T, F] float
    valid: torch.Tensor  # [B, T] bool: features exist at this position
    label_idx: torch.Tensor  # [B, T, K] long draft-vocabulary indices, -1 = outside the draft vocab / padding
    label_probs: torch.Tensor  # [B, T, K] float
    label_mask: torch.Tensor  # [B, T] bool

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> DraftBatch:
        return DraftBatch(
            self.tokens.to(device),
            self.feats.to(device=device, dtype=dtype),
            self.valid.to(device),
            self.label_idx.to(device),
            self.label_probs.to(device=device, dtype=dtype),
            self.label_mask.to(device),
        )


def collate(
    samples: list[SequenceSample],
    target_to_draft: torch.Tensor,  # [vocab] long, -1 for tokens outside the draft vocabulary
    max_len: int | None = None,
) -> DraftBatch:
    """Right-pad ``samples`` (cut to their last ``max_len`` positions when longer) into a :class:`DraftBatch`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    cut = [s if max_len is None or len(s) <= max_len else _tail(s, max_len) for s in samples]
    T = max(len(s) for s in cut)
    B = len(cut)
    F = cut[0].feats.shape[-1]
    K = cut[0].label_ids.shape[-1]
    tokens = torch.zeros((B, T), dtype=torch.long)
    feats = torch.zeros((B, T, F), dtype=cut[0].feats.dtype)
    valid = torch.zeros((B, T), dtype=torch.bool)
    lids = torch.full((B, T, K), -1, dtype=torch.long)
    lprobs = torch.zeros((B, T, K), dtype=torch.float32)
    lmask = torch.zeros((B, T), dtype=torch.bool)
    for b, s in enumerate(cut):
        n = len(s)
        tokens[b, :n] = s.tokens
        feats[b, :n] = s.feats
        valid[b, :n] = s.has_feats
        lids[b, :n] = s.label_ids
        lprobs[b, :n] = s.label_probs.float()
        lmask[b, :n] = s.label_mask
    t2d = target_to_draft.to(lids.device)
    idx = torch.where(lids >= 0, t2d[lids.clamp(min=0)], torch.full_like(lids, -1))
    return DraftBatch(tokens, feats, valid, idx, lprobs, lmask)


def _tail(s: SequenceSample, n: int) -> SequenceSample:
    return SequenceSample(
        s.tokens[-n:],
        s.feats[-n:],
        s.has_feats[-n:],
        s.label_ids[-n:],
        s.label_probs[-n:],
        s.label_mask[-n:],
        s.policy_version,
    )
