"""Online training of a draft head on the data the engine captured, between (or during) rollouts.

:class:`OnlineSpeculatorTrainer` owns a *training copy* of the serving head. ``step`` trains the copy on
minibatches drawn from a :class:`~atlas_rl.training.buffer.CaptureBuffer` for a wall-clock budget, with the
training-time-test objective of :func:`~atlas_rl.training.losses.ttt_loss`; ``publish`` copies the trained
weights into the serving head. Call ``publish`` only at safe points — between ``generate`` calls — so the engine
never drafts from a half-updated head; it takes the trainer's weight lock, so what it copies is always the
state after a whole number of optimizer steps, even while a background step runs.

Data choice (newest-version preference): when the newest policy version in the buffer has at least
``newest_min_labels`` labeled positions, minibatches come from that version only; otherwise every version is
used, sample weights ``labels * recency_decay ** (newest - version)``.

NaN/inf guard: a step whose loss or gradient norm is not finite is skipped (no optimizer step, so the weights
stay those of the last good step) and counted in ``num_skipped``; the first skip is logged as a warning, later
ones at debug level (read the count, not the log).

Background mode: ``start(time_budget_s)`` runs ``step`` in a thread while the caller generates (or computes
policy gradients); ``wait()`` joins it and returns its metrics; ``running`` tells whether it is still busy;
``cancel()`` asks it to stop after the optimizer step in progress (the weights then hold a whole number of
steps) and joins it. The thread is not a daemon: an interpreter that exits without ``wait``/``cancel`` still
waits for it (bounded by its budget) instead of killing it inside a torch kernel. After a failed run,
``discard_unpublished()`` puts the training copy back on the serving head's (last published) weights.

``state_dict`` / ``load_state_dict`` restore the trainer bit-exactly: training-copy weights, optimizer state,
counters and the sampling RNG. ``save`` / ``load`` put that state in a safetensors file (no pickle).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.buffer import CaptureBuffer
from atlas_rl.training.losses import ttt_loss
from atlas_rl.training.samples import SequenceSample, collate

logger = logging.getLogger(__name__)

__all__ = ["OnlineSpeculatorTrainer", "OnlineTrainerConfig", "clone_head"]

STATE_FORMAT = "atlas-rl/online-trainer/v1"


@dataclass
class OnlineTrainerConfig:
    """Settings of :class:`OnlineSpeculatorTrainer`.

    Parameters:
        lr, betas, weight_decay, grad_clip: AdamW and gradient clipping.
        batch_size: sequences per minibatch; max_seq_len: positions per sequence (a random window holding labels).
        ttt_steps, ttt_decay: training-time-test unroll length and per-step loss weight decay.
        newest_min_labels, recency_decay: which policy versions minibatches are drawn from (module docstring).
        min_labels: no step runs before the buffer holds this many labeled positions.
        seed: seeds the minibatch sampler (part of the checkpointed state).
    """

    lr: float = field(
        default=3e-4,
        metadata={"help": "AdamW learning rate (fine-tuning a warm-started head; measured in the adapt bench)."},
    )
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0 = off)."})
    batch_size: int = field(default=4, metadata={"help": "Sequences per minibatch."})
    max_seq_len: int = field(default=96, metadata={"help": "Positions per sequence (a window holding labels)."})
    ttt_steps: int = field(default=3, metadata={"help": "Training-time-test unroll steps (draft positions trained)."})
    ttt_decay: float = field(default=0.7, metadata={"help": "Loss weight of step j is ttt_decay ** (j - 1)."})
    newest_min_labels: int = field(
        default=512,
        metadata={"help": "Train on the newest policy version only once it has this many labeled positions."},
    )
    recency_decay: float = field(
        default=0.5,
        metadata={"help": "Otherwise sample version v with weight labels * recency_decay ** (newest - v)."},
    )
    min_labels: int = field(default=16, metadata={"help": "Skip training until the buffer holds this many labels."})
    publish_guard: bool = field(
        default=True,
        metadata={
            "help": "Publish only weights whose estimated acceptance length on held-out samples of the newest "
            "version is not below the serving head's by more than guard_tolerance (else keep serving the old)."
        },
    )
    holdout_every: int = field(
        default=8, metadata={"help": "About one captured sample in this many is held out of training for the guard."}
    )
    guard_tolerance: float = field(
        default=0.005, metadata={"help": "Relative drop of estimated acceptance length the guard lets through."}
    )
    guard_samples: int = field(default=8, metadata={"help": "Held-out samples (newest first) the guard replays."})
    seed: int = field(default=0, metadata={"help": "Seed of the minibatch sampler."})

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas!r}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay and grad_clip must be >= 0 (grad_clip 0 turns clipping off)")
        for name in ("batch_size", "max_seq_len", "ttt_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.max_seq_len < self.ttt_steps + 2:
            raise ValueError(f"max_seq_len ({self.max_seq_len}) must exceed ttt_steps + 1 ({self.ttt_steps + 1})")
        if not (0.0 < self.ttt_decay <= 1.0) or not (0.0 < self.recency_decay <= 1.0):
            raise ValueError("ttt_decay and recency_decay must lie in (0, 1]")
        if self.newest_min_labels < 0 or self.min_labels < 0:
            raise ValueError("newest_min_labels and min_labels must be >= 0")
        if self.holdout_every < 2 or self.guard_samples < 1 or not 0.0 <= self.guard_tolerance < 1.0:
            raise ValueError("holdout_every must be >= 2, guard_samples >= 1 and guard_tolerance in [0, 1)")


def clone_head(head: DraftHead) -> DraftHead:
    """A training copy of ``head``: its own trainable weights, the same frozen target embedding, and the same
    frozen output rows (shared, not copied, when ``train_lm_head`` is False)."""
    c = DraftHead(head.config, draft_to_target=head.draft_to_target.detach().cpu())
    c.load_state_dict(head.state_dict())
    c.to(device=head.fc.weight.device, dtype=head.fc.weight.dtype)
    object.__setattr__(c, "_embed", head._embed)
    if not head.config.train_lm_head:
        c.lm_head.weight = head.lm_head.weight  # frozen target rows: one tensor for both heads
    c.lm_head_ready = head.lm_head_ready
    return c


def _clone_tensors(obj: Any) -> Any:
    """A copy of nested dicts/lists/tuples whose tensors are cloned."""
    if torch.is_tensor(obj):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_tensors(v) for v in obj)
    return obj


def _trainable(head: DraftHead) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in head.named_parameters() if p.requires_grad]


class OnlineSpeculatorTrainer:
    """Trains a copy of a draft head on captured data and publishes it to the serving head at safe points.

    Args:
        head: the serving head (bound to its target); the engine's speculator drafts from it.
        buffer: where the engine's capture hook puts the training samples.
        config: :class:`OnlineTrainerConfig`.

    Example::

        trainer = OnlineSpeculatorTrainer(head, buffer)
        batch = engine.generate(prompts, sampling); buffer.flush()
        trainer.start(time_budget_s=5.0)          # trains while the caller updates the policy
        ...
        trainer.wait(); trainer.publish()          # between generate calls
    """

    def __init__(self, head: DraftHead, buffer: CaptureBuffer, config: OnlineTrainerConfig | None = None) -> None:
        if head._embed is None or not head.lm_head_ready:
            raise ValueError("bind the draft head to its target first: head.bind_target(model, init_lm_head=...)")
        if tuple(buffer.config.fuse_layers) != tuple(head.config.fuse_layers):
            raise ValueError(
                f"the buffer keeps features of layers {buffer.config.fuse_layers} but the head fuses "
                f"{head.config.fuse_layers}: build the buffer with "
                "CaptureBufferConfig(fuse_layers=head.config.fuse_layers)"
            )
        self.config = config or OnlineTrainerConfig()
        self.head = head
        self.buffer = buffer
        self.train_head = clone_head(head)
        self.train_head.train()
        self._params = _trainable(self.train_head)
        c = self.config
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self._params], lr=c.lr, betas=c.betas, weight_decay=c.weight_decay
        )
        self._gen = torch.Generator().manual_seed(c.seed)
        self._weights_lock = threading.Lock()  # held while the training copy's weights change
        self._run_lock = threading.Lock()  # one step() at a time
        self._step_s_est = 0.0  # running estimate of one step's wall time (for time budgets)
        self._thread: threading.Thread | None = None
        self._thread_result: dict[str, float] | None = None
        self._thread_error: BaseException | None = None
        self._stop = threading.Event()  # set by cancel(): the running step() ends after its current step
        self._warned_skip = False
        # counters (checkpointed)
        self.num_steps = 0
        self.num_skipped = 0
        self.num_samples_seen = 0
        self.num_labels_seen = 0
        self.train_s = 0.0
        self.trained_version = -1  # newest policy version in the buffer at the last optimizer step
        self.published_version = -1  # trained_version of the weights last published
        self.published_step = 0
        self.num_rejected = 0  # publishes the guard refused
        self._guard_s = 0.0  # wall time of the last guard (reserved from the next training budget)
        self.last_guard: dict[str, float] = {}  # the guard's last verdict: candidate / serving tau, published
        self.last_loss = float("nan")
        self.last_top1 = float("nan")

    # ------------------------------------------------------------------------------------------ training
    def step(
        self, time_budget_s: float | None = None, max_steps: int | None = None, progress: bool = False
    ) -> dict[str, float]:
        """Train for at most ``time_budget_s`` seconds of wall time and/or ``max_steps`` optimizer steps.

        A step starts only while the time spent so far plus the running estimate of one step fits the budget
        (the trainer's very first step always runs: there is no estimate yet); with the publish guard on, the
        budget also covers the next guard (its last duration is reserved). Returns this call's metrics (see
        :meth:`metrics`) plus ``call_steps``, ``call_skipped``, ``call_s``, ``call_loss`` and ``call_top1``.
        """
        if time_budget_s is None and max_steps is None:
            raise ValueError("give step() a time_budget_s (seconds) or max_steps, or both")
        if time_budget_s is not None and not time_budget_s >= 0:
            raise ValueError(f"time_budget_s must be >= 0, got {time_budget_s!r}")
        with self._run_lock:
            return self._train(time_budget_s, max_steps, progress)

    def _train(self, budget: float | None, max_steps: int | None, progress: bool) -> dict[str, float]:
        t0 = time.perf_counter()
        steps = skipped = 0
        losses: list[float] = []
        top1s: list[float] = []
        est = self._step_s_est  # seconds per step, carried over between calls (0 before the first step)
        last_dt = 0.0
        pbar = tqdm(total=max_steps, disable=not progress, desc="draft head", unit="step", leave=False)
        while (max_steps is None or steps + skipped < max_steps) and not self._stop.is_set():
            spent = time.perf_counter() - t0
            nxt = max(est, last_dt)  # a step slowed by concurrent work overruns an average: the slower of the two
            if budget is not None and (steps + skipped > 0 or est > 0) and spent + nxt + self._reserve(est) > budget:
                break
            if budget is not None and budget == 0:
                break
            picked = self._pick()
            if picked is None:
                break
            t_step = time.perf_counter()
            ok, loss, top1 = self._one_step(*picked)
            dt = last_dt = time.perf_counter() - t_step
            est = dt if est == 0.0 else 0.7 * est + 0.3 * dt
            self._step_s_est = est
            if ok:
                steps += 1
                losses.append(loss)
                top1s.append(top1)
            else:
                skipped += 1
            pbar.update(1)
        pbar.close()
        call_s = time.perf_counter() - t0
        self.train_s += call_s
        out = self.metrics()
        out.update(
            call_steps=steps,
            call_skipped=skipped,
            call_s=call_s,
            call_loss=sum(losses) / len(losses) if losses else float("nan"),
            call_top1=sum(top1s) / len(top1s) if top1s else float("nan"),
        )
        return out

    def _reserve(self, step_s: float) -> float:
        """Seconds of the training budget kept for the next publish's guard: its last duration, about one
        training step before it ever ran (two replays of a few held-out windows, no backward)."""
        if not self.config.publish_guard:
            return 0.0
        return self._guard_s if self._guard_s > 0 else step_s

    def _pick(self) -> tuple[list[SequenceSample], int] | None:
        """A minibatch (with replacement when the pool is small) and the newest policy version in the pool."""
        c = self.config
        pool = [s for s in self.buffer.samples() if not self._held_out(s)]
        if not pool:
            return None
        labels = [s.num_labels for s in pool]
        if sum(labels) < max(1, c.min_labels):
            return None
        newest = max(s.policy_version for s in pool)
        newest_labels = sum(n for s, n in zip(pool, labels) if s.policy_version == newest)
        if newest_labels >= c.newest_min_labels:
            weights = [float(n) if s.policy_version == newest else 0.0 for s, n in zip(pool, labels)]
        else:
            weights = [n * c.recency_decay ** (newest - s.policy_version) for s, n in zip(pool, labels)]
        w = torch.tensor(weights, dtype=torch.float64)
        if not float(w.sum()) > 0:
            return None
        nonzero = int((w > 0).sum())
        idx = torch.multinomial(w, c.batch_size, replacement=nonzero < c.batch_size, generator=self._gen).tolist()
        return [self._window(pool[i]) for i in idx], newest

    def _held_out(self, s: SequenceSample) -> bool:
        """Whether ``s`` is kept out of training for the publish guard (a hash of its tokens: stable, no state)."""
        return self.config.publish_guard and (int(s.tokens.sum()) + len(s)) % self.config.holdout_every == 0

    def _window(self, s: SequenceSample) -> SequenceSample:
        """A random window of at most ``max_seq_len`` positions that holds labels (whole sample when short)."""
        L = self.config.max_seq_len
        n = len(s)
        if n <= L:
            return s
        lab = torch.nonzero(s.label_mask).flatten()
        first = int(lab[0]) if lab.numel() else 0
        lo = min(max(0, first - L // 4), n - L)
        start = lo + int(torch.randint(0, n - L - lo + 1, (1,), generator=self._gen))
        sl = slice(start, start + L)
        return SequenceSample(
            s.tokens[sl], s.feats[sl], s.has_feats[sl], s.label_ids[sl], s.label_probs[sl], s.label_mask[sl],
            s.policy_version,
        )  # fmt: skip

    @torch.enable_grad()  # a deferred step runs inside the trainer's generation (no_grad): it must still train
    def _one_step(self, samples: list[SequenceSample], version: int) -> tuple[bool, float, float]:
        c = self.config
        head = self.train_head
        dev, dtype = head.fc.weight.device, head.fc.weight.dtype
        batch = collate(samples, head.target_to_draft.cpu()).to(dev, dtype)
        loss, m = ttt_loss(head, batch, steps=c.ttt_steps, decay=c.ttt_decay)
        for _, p in self._params:
            p.grad = None
        if not loss.requires_grad:  # no position of this minibatch is trained on (e.g. prompt-only samples)
            return False, float("nan"), float("nan")
        good = bool(torch.isfinite(loss))
        gnorm = float("nan")
        if good:
            loss.backward()
            params = [p for _, p in self._params if p.grad is not None]
            if c.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, c.grad_clip))
            else:
                gnorm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
            good = math.isfinite(gnorm)
        if not good:
            for _, p in self._params:
                p.grad = None
            self.num_skipped += 1
            log = logger.debug if self._warned_skip else logger.warning
            self._warned_skip = True
            log(
                "online trainer: non-finite loss/gradient (loss %s, grad norm %s); step skipped (further skips are "
                "counted in num_skipped, not logged)",
                float(loss.detach()),
                gnorm,
            )
            return False, float("nan"), float("nan")
        with self._weights_lock:
            self.optimizer.step()
            self.num_steps += 1
            self.num_samples_seen += len(samples)
            self.num_labels_seen += int(batch.label_mask.sum())
            self.trained_version = max(self.trained_version, version)
            self.last_loss = m.get("loss", float("nan"))
            self.last_top1 = m.get("top1_step1", float("nan"))
        for _, p in self._params:
            p.grad = None
        return True, self.last_loss, self.last_top1

    # ------------------------------------------------------------------------------------------ background
    def start(self, time_budget_s: float | None = None, max_steps: int | None = None) -> None:
        """Run :meth:`step` in a background thread (one at a time); collect its metrics with :meth:`wait`."""
        if self.running:
            raise RuntimeError("the trainer is already running in the background: call wait() first")
        if time_budget_s is None and max_steps is None:
            raise ValueError("give start() a time_budget_s (seconds) or max_steps, or both")
        self._thread_result = None
        self._thread_error = None
        self._stop.clear()

        def run() -> None:
            try:
                self._thread_result = self.step(time_budget_s=time_budget_s, max_steps=max_steps)
            except BaseException as e:  # surfaced by wait()
                self._thread_error = e

        # not a daemon: interpreter shutdown joins it (bounded by its budget) rather than killing it mid-kernel
        self._thread = threading.Thread(target=run, name="atlas-online-trainer", daemon=False)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> dict[str, float] | None:
        """Join the background run; returns its metrics (None if it is still running after ``timeout``)."""
        if self._thread is None:
            return None
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        self._thread = None
        if self._thread_error is not None:
            err, self._thread_error = self._thread_error, None
            raise RuntimeError(f"the background training run failed: {err}") from err
        return self._thread_result

    def cancel(self, timeout: float | None = None) -> dict[str, float] | None:
        """Stop the background run after its current optimizer step and join it; returns what :meth:`wait`
        returns (raises its error the same way). A no-op returning None when nothing runs."""
        if self._thread is None:
            return None
        self._stop.set()
        try:
            return self.wait(timeout)
        finally:
            if self._thread is None:
                self._stop.clear()

    def discard_unpublished(self) -> None:
        """Put the training copy back on the serving head's weights (the last published state) and reset the
        optimizer's moments: after a failed run the copy may hold a partial update. Counters stay."""
        if self.running:
            raise RuntimeError("wait() for the background run before discarding its weights")
        with self._weights_lock, torch.no_grad():
            src = dict(self.head.named_parameters())
            for name, p in self.train_head.named_parameters():
                if name == "lm_head.weight" and not self.train_head.config.train_lm_head:
                    continue  # frozen target rows (one tensor for both heads)
                p.copy_(src[name])
            self.optimizer.state.clear()
            for _, p in self._params:
                p.grad = None

    # ------------------------------------------------------------------------------------------ publishing
    def publish(self, head: DraftHead | None = None) -> int:
        """Copy the training copy's weights into ``head`` (default: the serving head) — unless the publish guard
        (``OnlineTrainerConfig.publish_guard``) finds them worse on held-out samples; the guard's verdict is in
        ``last_guard``. Returns the optimizer step the serving weights belong to. Call it between ``generate``
        calls; safe while a background step runs."""
        dst = self.head if head is None else head
        if dst is self.train_head:
            raise ValueError("publish() copies into a serving head, not into the training copy itself")
        with self._weights_lock, torch.no_grad():
            if not self._guard_passes(dst):
                self.num_rejected += 1
                return self.published_step
            src = dict(self.train_head.named_parameters())
            for name, p in dst.named_parameters():
                if name == "lm_head.weight" and not dst.config.train_lm_head:
                    continue  # frozen target rows (shared with the training copy)
                p.copy_(src[name])
            self.published_version = self.trained_version
            self.published_step = self.num_steps
            return self.num_steps

    def _guard_passes(self, dst: DraftHead) -> bool:
        """Estimated T=1 acceptance length (3 draft steps) of the training copy vs ``dst`` on the newest version's
        held-out samples; True without any (nothing to judge by) or when the guard is off."""
        from atlas_rl.training.acceptance import estimate_acceptance, first_labeled_window

        c = self.config
        self.last_guard = {}
        if not c.publish_guard or self.num_steps == self.published_step:
            return True
        t0 = time.perf_counter()
        held = [s for s in self.buffer.samples(min_version=self.buffer.newest_version) if self._held_out(s)]
        val = [first_labeled_window(s, c.max_seq_len) for s in held[-c.guard_samples :]]
        if not val:
            return True
        new = estimate_acceptance(self.train_head, val, 3)[0]
        old = estimate_acceptance(dst, val, 3)[0]
        self._guard_s = time.perf_counter() - t0
        ok = not new < (1.0 - c.guard_tolerance) * old  # NaN estimates (no full chain) pass
        self.last_guard = {"candidate": new, "serving": old, "published": float(ok)}
        if not ok:
            logger.info("online trainer: not publishing step %d (estimated tau %.3f < serving %.3f)", self.num_steps,
                        new, old)  # fmt: skip
        return ok

    def set_draft_vocab(self, model: torch.nn.Module, draft_to_target: torch.Tensor) -> None:
        """Swap the draft vocabulary of the training copy and the serving head together (frozen-row heads only;
        the trained weights do not depend on it). A safe point like :meth:`publish`: no ``generate`` running."""
        from atlas_rl.speculators.adaptive import set_draft_vocab

        with self._weights_lock:
            set_draft_vocab(self.head, model, draft_to_target)
            set_draft_vocab(self.train_head, model, draft_to_target)

    def refresh_frozen_rows(self, model: torch.nn.Module) -> None:
        """Re-copy the (updated) target's output rows into both heads; call after a policy update."""
        from atlas_rl.speculators.adaptive import refresh_frozen_rows

        with self._weights_lock:
            refresh_frozen_rows(self.head, model)
            refresh_frozen_rows(self.train_head, model)

    def sync_to(self, head: DraftHead) -> int:
        """Alias of :meth:`publish` for another head (e.g. a second engine's copy)."""
        return self.publish(head)

    # ------------------------------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """``atlas/adaptive/*``-style numbers: loss and top-1 of the last step, counters, staleness, train time.

        ``staleness`` = policy versions between the newest data in the buffer and the newest data trained on
        (0 = trained on the current policy's data; -1 when nothing was captured or trained yet)."""
        newest = self.buffer.newest_version
        stale = -1 if newest is None or self.trained_version < 0 else newest - self.trained_version
        return {
            "loss": self.last_loss,
            "top1": self.last_top1,
            "steps": self.num_steps,
            "skipped": self.num_skipped,
            "samples_seen": self.num_samples_seen,
            "labels_seen": self.num_labels_seen,
            "staleness": stale,
            "trained_version": self.trained_version,
            "published_version": self.published_version,
            "rejected_publishes": self.num_rejected,
            "train_s": self.train_s,
        }

    # ------------------------------------------------------------------------------------------ checkpoints
    _COUNTERS = (
        "num_steps",
        "num_skipped",
        "num_samples_seen",
        "num_labels_seen",
        "train_s",
        "trained_version",
        "published_version",
        "published_step",
        "num_rejected",
        "last_loss",
        "last_top1",
    )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: training-copy weights (frozen rows excluded), optimizer state,
        counters, the sampler RNG state and the config."""
        if self.running:
            raise RuntimeError("wait() for the background run before taking a checkpoint")
        weights = {n: p.detach().clone() for n, p in self._params}
        weights["draft_to_target"] = self.train_head.draft_to_target.clone()
        return {
            "format": STATE_FORMAT,
            "weights": weights,
            "optimizer": _clone_tensors(self.optimizer.state_dict()),  # the optimizer returns live references
            "counters": {k: getattr(self, k) for k in self._COUNTERS},
            "rng": self._gen.get_state().clone(),
            "config": asdict(self.config),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.running:
            raise RuntimeError("wait() for the background run before loading a checkpoint")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an online trainer state (format {state.get('format')!r}, want {STATE_FORMAT!r})")
        own = dict(self._params)
        weights = dict(state["weights"])
        d2t = weights.pop("draft_to_target", None)
        if d2t is not None and not torch.equal(d2t.cpu(), self.train_head.draft_to_target.cpu()):
            raise ValueError("the checkpoint's draft vocabulary differs from this head's; build the same head first")
        if set(weights) != set(own):
            raise ValueError(
                f"checkpoint weights do not match the head: missing {sorted(set(own) - set(weights))}, "
                f"unexpected {sorted(set(weights) - set(own))}"
            )
        with self._weights_lock, torch.no_grad():
            for n, p in own.items():
                if tuple(weights[n].shape) != tuple(p.shape):
                    raise ValueError(
                        f"checkpoint tensor {n!r} has shape {tuple(weights[n].shape)}, head {tuple(p.shape)}"
                    )
                p.copy_(weights[n])
            self.optimizer.load_state_dict(_clone_tensors(state["optimizer"]))  # never share state tensors
            for k, v in state["counters"].items():
                if k in self._COUNTERS:
                    setattr(self, k, v)
            self._gen.set_state(state["rng"].clone())

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to a safetensors file (tensors; counters, optimizer hyper-parameters and config
        as JSON metadata)."""
        from safetensors.torch import save_file

        sd = self.state_dict()
        tensors: dict[str, torch.Tensor] = {f"weights.{k}": v.contiguous().cpu() for k, v in sd["weights"].items()}
        opt = sd["optimizer"]
        for idx, st in opt["state"].items():
            for k, v in st.items():
                tensors[f"optimizer.{idx}.{k}"] = (v if torch.is_tensor(v) else torch.tensor(v)).contiguous().cpu()
        tensors["rng"] = sd["rng"]
        meta = {
            "format": STATE_FORMAT,
            "param_groups": json.dumps(opt["param_groups"]),
            "counters": json.dumps(sd["counters"]),
            "config": json.dumps(sd["config"]),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    def load(self, path: str | Path) -> None:
        """Restore a state written by :meth:`save` (raises ``ValueError`` naming the file when it does not fit)."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{path} is not a readable online-trainer checkpoint: {e}") from e
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not an online-trainer checkpoint (format {meta.get('format')!r})")
        weights = {k[len("weights.") :]: v for k, v in tensors.items() if k.startswith("weights.")}
        opt_state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                _, idx, name = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[name] = v
        state = {
            "format": STATE_FORMAT,
            "weights": weights,
            "optimizer": {"state": opt_state, "param_groups": json.loads(meta["param_groups"])},
            "counters": json.loads(meta["counters"]),
            "rng": tensors["rng"],
        }
        try:
            self.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
