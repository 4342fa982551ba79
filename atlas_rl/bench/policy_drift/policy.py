"""The moving policy: fine-tuning stages (next-token loss, AdamW), the held-out loss, the tiny model's warm-up."""

from __future__ import annotations

import math
import random
import time

import torch
from tqdm.auto import tqdm

from .corpora import Corpora, finetune_batch


def _lm_loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


def finetune(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]
) -> dict[str, float]:
    """AdamW steps on ``batches`` (fp32, next-token loss); returns mean loss and seconds."""
    t0 = time.perf_counter()
    model.train()
    losses = []
    for x in tqdm(batches, desc="fine-tune", leave=False, disable=len(batches) < 4):
        loss = _lm_loss(model, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return {"loss": sum(losses) / len(losses) if losses else math.nan, "seconds": time.perf_counter() - t0}


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model.eval()
    return float(_lm_loss(model, batch))


def pretrain_tiny(model: torch.nn.Module, corpora: Corpora, steps: int, seed: int) -> float:
    """Make the tiny model a "Python model" (v0) before the drift starts; returns its final loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    out = finetune(model, opt, [finetune_batch(corpora, 0.0, 8, 128, rng) for _ in range(steps)])
    return out["loss"]
