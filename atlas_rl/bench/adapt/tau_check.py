"""The "adaptive never below static" check at T=1, with enough tokens to see a 5% difference.

The bench cells hold 4 requests: at T=1 their τ moves by more than 5% between random streams alone (the same
static head on the same requests: τ 1.43 at one row, 1.59 at four). This check measures each head alone on many
more held-out requests, in batches, both heads on the same batches with the same seeds, and reports the ratio of
their τ (emitted tokens over row forwards, summed) with a paired bootstrap interval over the batches. Beside it,
the closed-form estimate (:func:`~atlas_rl.training.acceptance.estimate_acceptance`) of both heads' draft chains
on one fixed set of the target's own T=1 rollouts of other held-out requests (captured once: the target does not
change in the workload shift): thousands of positions, identical for both heads, no sampling noise.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

from atlas_rl.rollout.build import build_engine
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.acceptance import estimate_acceptance, first_labeled_window
from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
from atlas_rl.training.samples import SequenceSample
from atlas_rl.types import SamplingParams

__all__ = ["capture_rollouts", "estimated_tau", "measured_tau", "paired_ratio", "summed_tau"]

_WINDOW = 160  # positions replayed per captured rollout (prompt tail + completion)
_CHUNK = 8  # rollouts per replay (bounds the draft-vocabulary logits in memory)


def measured_tau(
    make_engine: Callable[[str], Any], heads: tuple[str, ...], prompts: list[list[int]], rows: int, sp: SamplingParams
) -> dict[str, list[tuple[int, int]]]:
    """Per head, per batch of ``rows`` prompts: (emitted tokens, row forwards) of a fresh fixed-k engine of that
    head alone; the batches interleaved across heads, each batch with its own seed shared by the heads."""
    out: dict[str, list[tuple[int, int]]] = {h: [] for h in heads}
    for i in range(0, len(prompts) - rows + 1, rows):
        spi = SamplingParams(temperature=sp.temperature, max_new_tokens=sp.max_new_tokens, seed=(sp.seed or 0) + i)
        for h in heads:
            s = make_engine(h).generate(prompts[i : i + rows], spi).stats
            out[h].append((s.num_emitted_tokens, s.num_row_forwards))
    return out


def summed_tau(batches: list[tuple[int, int]]) -> float:
    """τ of ``(emitted tokens, row forwards)`` batches taken together (sums, not a mean of ratios)."""
    return sum(a for a, _ in batches) / max(1, sum(b for _, b in batches))


def paired_ratio(
    num: list[tuple[int, int]], den: list[tuple[int, int]], resamples: int = 2000, seed: int = 0
) -> dict[str, float]:
    """τ of each side (sums over batches), their ratio, and the 95% percentile bootstrap interval of the ratio
    (batches resampled with replacement, the same batches for both sides)."""

    def ratio(idx: list[int]) -> float:
        td = summed_tau([den[i] for i in idx])
        return summed_tau([num[i] for i in idx]) / td if td else float("nan")

    n = len(num)
    if n == 0 or len(den) != n:
        raise ValueError(f"paired_ratio needs the same non-zero number of batches on both sides, got {n}, {len(den)}")
    rng = random.Random(seed)
    boots = sorted(ratio([rng.randrange(n) for _ in range(n)]) for _ in range(resamples))
    return {
        "tau_num": summed_tau(num),
        "tau_den": summed_tau(den),
        "ratio": ratio(list(range(n))),
        "ci_low": boots[int(0.025 * resamples)],
        "ci_high": boots[int(0.975 * resamples) - 1],
        "batches": n,
    }


def capture_rollouts(
    model: torch.nn.Module, eos: list[int], prompts: list[list[int]], fuse_layers: tuple[int, ...], sp: SamplingParams
) -> list[SequenceSample]:
    """The target's own rollouts of ``prompts`` (plain decoding), captured with features and T=1 labels, each cut
    to the window the replay uses."""
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=fuse_layers))
    eng = build_engine(model, eos_token_ids=eos)
    handle = buf.attach(eng)
    eng.generate(prompts, sp)
    handle.remove()
    buf.flush()
    return [first_labeled_window(s, _WINDOW) for s in buf.samples()]


def estimated_tau(head: DraftHead, samples: list[SequenceSample], k: int) -> tuple[float, int]:
    """Closed-form expected acceptance length of ``head``'s ``k``-step chain over ``samples`` (position-weighted
    mean over chunks) and the number of base positions counted."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), _CHUNK):
            tau, _, n = estimate_acceptance(head, samples[i : i + _CHUNK], k)
            if n:
                total, count = total + tau * n, count + n
    return (total / count if count else float("nan")), count
