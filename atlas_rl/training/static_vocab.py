"""Stage 2 of the static speculator: the draft vocabulary (the target tokens the head can propose)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from atlas_rl.training.samples import SequenceSample

__all__ = ["build_draft_vocab", "coverage_curve", "vocab_coverage"]


def build_draft_vocab(samples: Sequence[SequenceSample], target_vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` target tokens with the largest expected frequency, most frequent first: ``[size]`` long.

    Score of a token = its count among emitted completion tokens + the target's probability mass on it summed
    over every labelled position (top-K labels), so likely-but-unsampled tokens rank too. Ties (and the tail,
    when fewer tokens were seen) fall back to prompt-token counts, then to token id order.
    """
    if size > target_vocab_size:
        raise ValueError(f"draft vocabulary size {size} exceeds the target vocabulary ({target_vocab_size})")
    score = torch.zeros(target_vocab_size, dtype=torch.float64)
    prompt_count = torch.zeros(target_vocab_size, dtype=torch.float64)
    for s in samples:
        idx = torch.nonzero(s.label_mask).flatten()
        first = int(idx[0]) + 1 if idx.numel() else len(s)  # first completion token (after the last prompt token)
        score.index_add_(0, s.tokens[first:], torch.ones(len(s) - first, dtype=torch.float64))
        prompt_count.index_add_(0, s.tokens[:first], torch.ones(first, dtype=torch.float64))
        ids = s.label_ids[s.label_mask]  # [m, K]
        probs = s.label_probs[s.label_mask].double()
        ok = ids >= 0
        score.index_add_(0, ids[ok], probs[ok])
    # lexicographic: score, then prompt counts (scaled below the smallest score step), then low ids first
    tie = prompt_count / (prompt_count.max() + 1.0) * 1e-6
    key = score + tie - torch.arange(target_vocab_size, dtype=torch.float64) * 1e-15
    return torch.argsort(key, descending=True, stable=True)[:size].clone()


def vocab_coverage(draft_to_target: torch.Tensor, token_lists: Sequence[Sequence[int]]) -> float:
    """Fraction of the tokens of ``token_lists`` that lie in the draft vocabulary."""
    inside = set(draft_to_target.tolist())
    total = sum(len(t) for t in token_lists)
    if total == 0:
        return float("nan")
    return sum(1 for t in token_lists for x in t if x in inside) / total


def coverage_curve(
    samples: Sequence[SequenceSample],
    target_vocab_size: int,
    sizes: Sequence[int],
    token_lists: Sequence[Sequence[int]],
) -> dict[int, float]:
    """Coverage of ``token_lists`` by the draft vocabulary :func:`build_draft_vocab` builds from ``samples``, for
    every size of ``sizes`` (the vocabularies are prefixes of one ranking, so this ranks once)."""
    if not sizes or min(sizes) < 1:
        raise ValueError(f"sizes must be positive draft vocabulary sizes, got {list(sizes)}")
    ranking = build_draft_vocab(samples, target_vocab_size, min(max(sizes), target_vocab_size))
    rank = torch.full((target_vocab_size,), target_vocab_size, dtype=torch.long)
    rank[ranking] = torch.arange(ranking.numel())
    flat = torch.tensor([t for toks in token_lists for t in toks], dtype=torch.long)
    if flat.numel() == 0:
        return {int(n): float("nan") for n in sizes}
    r = rank[flat]
    return {int(n): float((r < n).double().mean()) for n in sizes}
