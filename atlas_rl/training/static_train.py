"""Stage 3 of the static speculator: training the head (training-time test, AdamW, length-bucketed batches).

AdamW on :func:`~atlas_rl.training.losses.ttt_loss` (the head unrolled ``ttt_steps`` times on its own predictions,
soft cross-entropy against the target, step j weighted ``ttt_decay ** (j-1)``), length-bucketed batches of about
``batch_tokens`` positions, linear warmup then cosine decay, gradient clipping; ``epochs`` over the data or until
``max_train_minutes``; optionally a teacher-forced warm start and preconditioned fuse-layer inputs.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from atlas_rl.rollout.cpu_linear import bf16_matmul_available
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.losses import ttt_loss
from atlas_rl.training.samples import DraftBatch, SequenceSample, collate
from atlas_rl.training.static_config import StaticSpeculatorConfig

logger = logging.getLogger(__name__)

__all__ = ["feature_scale", "train_head"]


def _batches(lengths: Sequence[int], batch_tokens: int, max_len: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of sample indices (sequences x longest <= batch_tokens), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = min(max(lengths[j] for j in [*cur, i]), max_len)
        if cur and (len(cur) + 1) * longest > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class _PreconditionedLinear(nn.Module):
    """``y = W' (x / scale)``: a reparametrised ``nn.Linear`` (no bias) for training; :meth:`fold` gives back a plain
    ``nn.Linear`` with ``W = W' / scale``, the same function. With ``scale`` the inputs' per-dimension RMS, every
    input dimension reaches the output at a comparable size and AdamW's (scale-free) steps move them alike."""

    def __init__(
        self, linear: nn.Linear, scale: torch.Tensor, init_std: float = 0.02, keep_weights: bool = False
    ) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("_PreconditionedLinear expects a linear layer without bias")
        self.register_buffer("scale", scale.to(linear.weight), persistent=False)
        if keep_weights:  # a warm start: the same function as ``linear`` (W' = W * scale)
            w = linear.weight.detach() * self.scale
        else:  # balanced start: every (rescaled) input dimension alike
            w = torch.randn_like(linear.weight) * init_std
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return F.linear(x / self.scale, self.weight)

    def fold(self) -> nn.Linear:
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=False)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight / self.scale)
        return out


def feature_scale(samples: Sequence[SequenceSample], max_positions: int = 50_000, seed: int = 0) -> torch.Tensor:
    """Per-dimension RMS of the features at labelled (completion) positions: ``[F]`` float32, floored at 1e-3 of
    the mean (prompt starts, where attention-sink activations reach 1e4, are left out by the labels)."""
    rng = random.Random(seed)
    rows = [s.feats[s.label_mask & s.has_feats] for s in samples]
    x = torch.cat(rows).float()
    if x.shape[0] > max_positions:
        x = x[torch.tensor(sorted(rng.sample(range(x.shape[0]), max_positions)))]
    rms = x.pow(2).mean(0).sqrt()
    return rms.clamp(min=1e-3 * float(rms.mean()))


def train_head(
    head: DraftHead,
    samples: Sequence[SequenceSample],
    config: StaticSpeculatorConfig,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``head`` (bound to its target) on ``samples`` with the training-time-test loss.

    With ``config.precondition_features`` (and a fuse layer) the fuse layer is trained in the reparametrised form
    of :class:`_PreconditionedLinear` and folded back afterwards: the returned head is a plain :class:`DraftHead`.

    Returns ``{"steps", "epochs_done", "wall_s", "stopped_by", "curve": [{"step", "lr", "loss", "top1_step1",
    ...}, ...]}``; curve points average the metrics over the ``log_every`` steps before them.
    """
    rng = random.Random(config.seed)
    pre = _precondition_fuse(head, samples, config)
    lengths = [min(len(s), config.max_len) for s in samples]
    per_epoch = len(_batches(lengths, config.batch_tokens, config.max_len, random.Random(0)))
    total = max(1, math.ceil(per_epoch * config.epochs))
    n_tf = round(config.teacher_forced_fraction * total)  # warm-start steps with teacher forcing only
    params = [p for p in head.parameters() if p.requires_grad]
    opt = _adamw(params, config)
    source = _BatchSource(samples, lengths, config, rng, head)
    deadline = None if config.max_train_minutes is None else time.perf_counter() + 60.0 * config.max_train_minutes
    t0 = time.perf_counter()
    head.train()
    bar = tqdm(total=total, desc="train static head", unit="step", disable=not progress)
    log = _CurveLog(config, total, n_tf, bar, on_log)
    bf16 = _use_bf16(config, head.fc.weight.device)
    autocast = torch.autocast(head.fc.weight.device.type, dtype=torch.bfloat16, enabled=bf16)
    step, stopped_by = 0, "epochs"
    while step < total:
        tf = step < n_tf
        batch = source.next(tf)
        for g in opt.param_groups:
            g["lr"] = config.lr * _lr_factor(step, total, config.warmup_steps, config.min_lr_ratio)
        metrics = _train_step(head, opt, params, batch, config, step, tf, autocast)
        step += 1
        log.add(step, metrics, opt.param_groups[0]["lr"], tf)
        bar.update(1)
        if deadline is not None and time.perf_counter() > deadline and step < total:
            stopped_by = "max_train_minutes"
            logger.warning("training stopped by max_train_minutes after %d of %d steps", step, total)
            break
    bar.close()
    if pre is not None:
        head.fc = pre.fold()
    head.eval()
    return {
        "steps": step,
        "planned_steps": total,
        "teacher_forced_steps": min(n_tf, step),
        "batches_per_epoch": per_epoch,
        "epochs_done": round(source.positions / max(1, sum(lengths)), 3),
        "wall_s": round(time.perf_counter() - t0, 1),
        "stopped_by": stopped_by,
        "bf16_autocast": bf16,
        "curve": log.curve,
    }


def _use_bf16(config: StaticSpeculatorConfig, device: torch.device) -> bool:
    """Whether the training steps run under bfloat16 autocast (``config.bf16_autocast``; None: where bfloat16 matmuls
    are native). On this project's Xeon host (AMX) a training-time-test step of the SmolLM2 head runs 1.55x faster."""
    if config.bf16_autocast is not None:
        return bool(config.bf16_autocast)
    return device.type == "cuda" or (device.type == "cpu" and bf16_matmul_available())


def _precondition_fuse(
    head: DraftHead, samples: Sequence[SequenceSample], config: StaticSpeculatorConfig
) -> _PreconditionedLinear | None:
    """Swap the head's fuse layer for its preconditioned form (``config.precondition_features``); None if not."""
    if not config.precondition_features:
        return None
    scale = feature_scale(samples, seed=config.seed).to(head.fc.weight.device)
    pre = _PreconditionedLinear(head.fc, scale, keep_weights=config.init_from is not None)
    head.fc = pre
    return pre


def _adamw(params: list[nn.Parameter], config: StaticSpeculatorConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )


class _BatchSource:
    """Collated batches on the head's device; separate queues (and batch budgets) for teacher-forced steps."""

    def __init__(
        self,
        samples: Sequence[SequenceSample],
        lengths: list[int],
        config: StaticSpeculatorConfig,
        rng: random.Random,
        head: DraftHead,
    ) -> None:
        self.samples, self.lengths, self.config, self.rng = samples, lengths, config, rng
        self.t2d = head.target_to_draft.cpu()
        self.device, self.dtype = head.fc.weight.device, head.fc.weight.dtype
        self.queues: dict[bool, list[list[int]]] = {True: [], False: []}
        self.positions = 0  # sequence positions handed out (for epochs_done)

    def next(self, teacher_forced: bool) -> DraftBatch:
        cfg = self.config
        if not self.queues[teacher_forced]:
            budget = cfg.batch_tokens * (cfg.teacher_forced_batch_factor if teacher_forced else 1)
            self.queues[teacher_forced] = _batches(self.lengths, budget, cfg.max_len, self.rng)
        idx = self.queues[teacher_forced].pop()
        self.positions += sum(self.lengths[i] for i in idx)
        batch = collate([self.samples[i] for i in idx], self.t2d, max_len=cfg.max_len)
        return batch.to(self.device, self.dtype)


def _train_step(
    head: DraftHead,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    batch: DraftBatch,
    config: StaticSpeculatorConfig,
    step: int,
    teacher_forced: bool,
    autocast: torch.autocast,
) -> dict[str, float]:
    """One optimizer step on ``batch`` (the loss computed under ``autocast``); returns the loss metrics (plus
    ``grad_norm`` when clipping)."""
    with autocast:
        loss, m = ttt_loss(head, batch, steps=1 if teacher_forced else config.ttt_steps, decay=config.ttt_decay)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip > 0:
        m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
    if not math.isfinite(float(loss.detach())):
        raise FloatingPointError(f"training loss is not finite at step {step}: lower lr (now {config.lr})")
    opt.step()
    return m


@dataclass
class _CurveLog:
    """The training curve: metrics averaged over the steps between log points, logged and passed to ``on_log``."""

    config: StaticSpeculatorConfig
    total: int
    n_tf: int
    bar: Any
    on_log: Callable[[dict[str, float]], None] | None
    curve: list[dict[str, float]] = field(default_factory=list)
    acc: dict[str, float] = field(default_factory=dict)
    n_acc: int = 0

    def add(self, step: int, metrics: dict[str, float], lr: float, teacher_forced: bool) -> None:
        for k, v in metrics.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.n_acc += 1
        if step % self.config.log_every == 0 or step in (1, self.n_tf, self.total):
            point = {"step": step, "lr": lr, "teacher_forced": teacher_forced}
            point |= {k: v / self.n_acc for k, v in self.acc.items()}
            self.curve.append(point)
            if self.on_log is not None:
                self.on_log(point)
            self._report(point, step, teacher_forced)
            self.acc, self.n_acc = {}, 0

    def _report(self, point: dict[str, float], step: int, teacher_forced: bool) -> None:
        steps = range(1, self.config.ttt_steps + 1)
        logger.info(
            "step %d/%d%s loss %.3f top1 %s",
            step,
            self.total,
            " (teacher forcing)" if teacher_forced else "",
            point.get("loss", float("nan")),
            " ".join(f"{point[f'top1_step{j}']:.3f}" for j in steps if f"top1_step{j}" in point),
        )
        self.bar.set_postfix(loss=f"{point.get('loss', float('nan')):.3f}", top1=f"{point.get('top1_step1', 0):.3f}")
