"""The Verifier protocol: lossless rejection sampling of drafts against the target."""

from __future__ import annotations

from typing import Protocol

import torch

from atlas_rl.types import SamplingParams, VerifyResult


class Verifier(Protocol):
    def verify(
        self,
        draft_ids: torch.Tensor,  # [n, K] long, row i valid up to draft_lens[i]
        draft_lens: torch.Tensor,  # [n] long
        draft_probs: torch.Tensor | None,  # [n, K, vocab] processed draft distributions, or None = one-hot drafts
        target_logits: torch.Tensor,  # [n, K+1, vocab] raw target logits at the verified positions
        sampling: SamplingParams,
        uniforms: torch.Tensor | None,  # [n, K+1] in [0, 1): row i uses [:d_i] for accept tests, [d_i] to sample
    ) -> VerifyResult: ...
