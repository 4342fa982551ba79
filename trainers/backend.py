"""The atlas rollout backend behind the TRL trainers: engine, speculators, adaptive-head retraining, metrics.

Lifecycle inside an RL run (one instance per process):

* ``generate(model, prompt_ids, sampling)`` — called by the trainer with the prompts TRL hands over (each
  prompt repeated ``num_generations`` times in a row). Before rolling out, the last background retraining of
  the adaptive head is joined and its weights published (and broadcast from rank 0 under several processes),
  so the engine never drafts from a half-updated head. Runs of identical prompts become one prompt group,
  prefilled once. The capture hook feeds the adaptive head's buffer (rank 0) at no extra target forward.
  Afterwards the retraining starts again in a background thread (overlapping the trainer's loss/backward),
  bounded by a fraction of the rollout's wall time.
* ``on_policy_update(step)`` — after every optimizer step: the engine reads the trainer's parameters in
  place, so only ``policy_version`` moves.
* ``metrics()``, ``save()`` / ``load()`` (checkpoints).
* ``close()`` — at the end of ``train()`` on every exit path (normal end, exception, KeyboardInterrupt): stops
  the background retraining after its current optimizer step and joins it, reports a failure it had, and gives
  back what the engine holds (KV cache, the CPU kernel routing of the model's ``nn.Linear`` layers).

A failed retraining never ends the RL run: it is logged once (with its traceback), counted in
``atlas/speculator_train_failures``, its partial weights are discarded and the adaptive head keeps drafting with
the last published (good) weights; after ``MAX_TRAIN_FAILURES`` failures in a row retraining stops for the run.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from atlas_rl.rollout import RolloutEngine
from atlas_rl.rollout.build import build_engine, build_speculators
from atlas_rl.speculators import SuffixSpeculator
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.types import RolloutBatch, SamplingParams, SpecStats

logger = logging.getLogger(__name__)

# the retraining loop starts a step when its *estimated* time fits the budget; a step slowed by the policy update it
# overlaps (background mode) overruns it by up to one step, so the loop aims at this share of the fraction
BUDGET_HEADROOM = 0.8

RECENT_STEPS = 5  # RL steps whose lower median caps the step the retraining budget is a fraction of
MAX_TRAIN_FAILURES = 3  # failed retrainings in a row after which the adaptive head stops retraining for the run
PROBE_MAX_POSITIONS = 48  # positions per probed completion (the probe's cost scales with them)
# metrics that are counters or states: a summary over several steps takes their last value, never the mean
LAST_VALUE_METRICS = frozenset(
    {
        "atlas/policy_version",
        "atlas/speculator_train_failures",
        "atlas/speculator_train_skipped_steps",
        "atlas/speculator_train_steps",
        "atlas/speculator_train_s_total",
        "atlas/speculator_staleness",
    }
)


DISTURBED_CPU_SHARE = 0.8  # a segment whose CPU/wall share is below this fraction of the best segment's
DISTURBED_SPREAD = 1.3  # the two halves' speed-up ratios differ by more than this factor


def paired_speedup(segments: list[tuple[str, int, float, float]]) -> dict[str, float]:
    """The paired measurement of one rollout from its segments ``(who, tokens, wall_s, cpu_s)``, ``who`` in
    {"atlas", "baseline"}, listed per half: tokens/s of both, speed-up, the halves' spread, disturbed (0/1)."""
    tot = {who: [0, 0.0] for who in ("atlas", "baseline")}
    for who, tokens, wall, _ in segments:
        tot[who][0] += tokens
        tot[who][1] += wall
    tps = {who: (n / w if w > 0 else 0.0) for who, (n, w) in tot.items()}
    half_ratios = []
    for a, b in zip(segments[0::2], segments[1::2]):
        pair = {a[0]: a, b[0]: b}
        ta, tb = pair["atlas"], pair["baseline"]
        if ta[2] > 0 and tb[2] > 0 and tb[1] > 0:
            half_ratios.append((ta[1] / ta[2]) / (tb[1] / tb[2]))
    shares = [cpu / wall for _, _, wall, cpu in segments if wall > 0]
    spread = max(half_ratios) / min(half_ratios) if len(half_ratios) == 2 and min(half_ratios) > 0 else 1.0
    starved = bool(shares) and min(shares) < DISTURBED_CPU_SHARE * max(shares)
    return {
        "tokens_per_s": tps["baseline"],
        "rollout_s": tot["baseline"][1],
        "speedup": tps["atlas"] / tps["baseline"] if tps["baseline"] > 0 else math.nan,
        "half_spread": spread,
        "min_cpu_share": min(shares) / max(shares) if shares and max(shares) > 0 else 1.0,
        "disturbed": float(starved or spread > DISTURBED_SPREAD),
    }


class CheckpointStateError(ValueError):
    """An atlas checkpoint folder that cannot be resumed from (missing or unreadable state)."""


def _replace_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)`` then rename onto ``path``: a reader sees the old file (or folder) or the new one, never a
    half. A folder is swapped in two renames; the old one is removed only after the new one is in place."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    write(tmp)
    if tmp.is_dir() and path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
        return
    os.replace(tmp, path)


def backend_class(options: Any) -> type[AtlasRolloutBackend]:
    """The backend ``options.atlas_engine`` asks for: ours ("torch") or a vLLM engine's ("vllm")."""
    if getattr(options, "atlas_engine", "torch") == "vllm":
        from .vllm_backend import AtlasVllmBackend

        return AtlasVllmBackend
    return AtlasRolloutBackend


def resolve_capture_mode(options: Any) -> str:
    """``atlas_capture`` "auto" -> "trainer" when vLLM rolls out (it hands out no hidden states), else "engine"."""
    mode = getattr(options, "atlas_capture", "auto")
    if mode == "auto":
        return "trainer" if getattr(options, "atlas_engine", "torch") == "vllm" else "engine"
    return mode


def group_runs(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Collapse runs of identical consecutive prompts: ``(unique prompts, run lengths)``."""
    uniq: list[list[int]] = []
    counts: list[int] = []
    for p in prompt_ids:
        p = list(p)
        if uniq and uniq[-1] == p:
            counts[-1] += 1
        else:
            uniq.append(p)
            counts.append(1)
    return uniq, counts


class AtlasRolloutBackend:
    """Owns the engine and the speculators of one training process."""

    def __init__(
        self,
        options: Any,  # an AtlasArgs (AtlasGRPOConfig / AtlasRLOOConfig)
        eos_token_ids: list[int],
        process_index: int = 0,
        num_processes: int = 1,
        seed: int = 0,
    ) -> None:
        self.options = options
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.process_index = process_index
        self.num_processes = num_processes
        self.seed = int(options.atlas_seed if options.atlas_seed is not None else seed)
        self.engine: RolloutEngine | None = None
        self._model: torch.nn.Module | None = None
        self.static_head: DraftHead | None = None
        self.adaptive_head: DraftHead | None = None
        self.adaptive_trainer = None
        self.buffer = None
        self.suffix: SuffixSpeculator | None = None
        self.num_calls = 0
        self.policy_version = 0
        self.last_stats: SpecStats | None = None
        self.last_rollout_s = 0.0
        # wall times between the starts of consecutive rollouts (RL steps), newest last
        self._recent_steps: collections.deque[float] = collections.deque(maxlen=RECENT_STEPS)
        self._rollout_started_at: float | None = None
        self.last_train: dict[str, float] = {}
        self.total = SpecStats()
        self._pending_dir: Path | None = None
        self._baseline_engine: RolloutEngine | None = None
        self.last_baseline: dict[str, float] | None = None
        self._deferred_budget = 0.0
        self.last_probe: dict[str, float] = {}
        self.last_capture_s = 0.0
        # who feeds the adaptive head's buffer: "engine" (the engine's capture hook during the rollout) or
        # "trainer" (hooks on the trainer's own loss forward over prompt + completion: vLLM hands out no features)
        self.capture_mode = resolve_capture_mode(options)
        self.last_segments: list[int] = []  # decode steps of each atlas engine segment of the last rollout
        self.train_failures = 0  # failed retraining runs (whole run)
        self._failures_in_a_row = 0
        self._train_disabled = False
        self._closed = False

    # ------------------------------------------------------------------------------------------ building
    @property
    def is_trainer_rank(self) -> bool:
        return self.process_index == 0

    def _build(self, model: torch.nn.Module) -> None:
        built = build_speculators(
            model,
            self.options.atlas_speculator_names,
            static_head=self.options.atlas_static_head,
            seed=self.seed,
            static_prior=False,
        )
        self.static_head, self.adaptive_head = built.static_head, built.adaptive_head
        if self.adaptive_head is not None:
            from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
            from atlas_rl.training.online import OnlineSpeculatorTrainer

            self.buffer = CaptureBuffer(CaptureBufferConfig(fuse_layers=tuple(self.adaptive_head.config.fuse_layers)))
            self.adaptive_trainer = OnlineSpeculatorTrainer(self.adaptive_head, self.buffer)
        self.suffix = built.get("suffix")
        specs = built.speculators
        self.engine = build_engine(
            model,
            specs,
            k=self.options.atlas_num_speculative_tokens,
            controller=self.options.atlas_controller,
            eos_token_ids=self.eos_token_ids,
        )
        self.engine.policy_version = self.policy_version
        if self.buffer is not None and self.is_trainer_rank and self.capture_mode == "engine":
            self.buffer.attach(self.engine)
        self._model = model
        if self._pending_dir is not None:
            d, self._pending_dir = self._pending_dir, None
            self.load(d)
        logger.info(
            "atlas backend: speculators %s, controller %s",
            [s.name for s in specs],
            type(self.engine.controller).__name__,
        )

    def generate(
        self, model: torch.nn.Module, prompt_ids: list[list[int]], sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]]]:
        self._closed = False  # a generate after close() (e.g. evaluate() after train()) reopens the backend
        if self.engine is None:
            self._build(model)
        elif model is not self._model:  # e.g. ZeRO-3 gathered a fresh module: point the engine at it
            self.engine.model = model
            self._model = model
        now = time.perf_counter()
        if self._rollout_started_at is not None:  # the whole RL step since the last rollout began
            self._record_step(now - self._rollout_started_at)
        self._rollout_started_at = now
        self._before_rollout()
        self._refresh_heads(model)
        uniq, counts = group_runs(prompt_ids)
        call_seed = (self.seed * 1_000_003 + self.num_calls * 7919 + self.process_index * 104_729) % (2**62)
        sampling = dataclasses.replace(sampling, seed=call_seed)
        self.num_calls += 1
        hook0 = self.buffer.hook_s if self.buffer is not None else 0.0
        every = getattr(self.options, "atlas_baseline_every", 0)
        if every and (self.num_calls - 1) % every == 0:  # before retraining starts: nothing else competes for the CPU
            completions, logprobs, stats, self.last_baseline = self._paired_rollout(model, uniq, counts, sampling)
        else:
            completions, logprobs, stats, _ = self._rollout(self.engine, uniq, counts, sampling)
            self.last_baseline = None
            self.last_segments = [len(stats.steps)]
        stats.policy_version = self.policy_version
        self.last_rollout_s = stats.total_s
        self.last_stats = stats
        self.total.merge(stats)
        if self.buffer is not None and self.capture_mode == "engine":
            self.buffer.flush()
            self.last_capture_s = self.buffer.hook_s - hook0
        else:
            self.last_capture_s = 0.0  # the trainer's forward adds its capture time
        self.last_probe = self._probe_acceptance()
        self._after_rollout()
        self._log_progress(stats)
        return completions, logprobs

    def _log_progress(self, stats: SpecStats) -> None:
        tps = stats.num_completion_tokens / stats.total_s if stats.total_s > 0 else 0.0
        paired = ""
        if self.last_baseline is not None:
            paired = f"; no speculation {self.last_baseline['tokens_per_s']:.0f} tok/s, speed-up "
            paired += f"{self.last_baseline['speedup']:.2f}x" + (
                " (disturbed)" if self.last_baseline["disturbed"] else ""
            )
        logger.info(
            "rollout %d (policy v%d): %d completions, %d tokens in %.1f s, %.0f tok/s%s",
            self.num_calls,
            self.policy_version,
            stats.num_sequences,
            stats.num_completion_tokens,
            stats.total_s,
            tps,
            paired,
        )

    @staticmethod
    def _rollout(
        engine: RolloutEngine, uniq: list[list[int]], counts: list[int], sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]], SpecStats, float]:
        """Roll out prompt groups (``uniq[i]`` repeated ``counts[i]`` times) in their order: one engine call per
        distinct group size. Returns completions, logprobs, stats (``total_s`` = wall time) and CPU seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        stats = SpecStats()
        by_size: dict[int, RolloutBatch] = {}
        for n in sorted(set(counts), key=counts.index):
            idx = [i for i, c in enumerate(counts) if c == n]
            by_size[n] = engine.generate([uniq[i] for i in idx], sampling, num_generations=n)
            stats.merge(by_size[n].stats)
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        cursor = dict.fromkeys(by_size, 0)
        for c in counts:
            start = cursor[c] * c
            completions.extend(by_size[c].completion_ids[start : start + c])
            logprobs.extend(by_size[c].logprobs[start : start + c])
            cursor[c] += 1
        stats.total_s = time.perf_counter() - t0
        return completions, logprobs, stats, time.process_time() - c0

    def _paired_rollout(
        self, model: torch.nn.Module, uniq: list[list[int]], counts: list[int], sampling: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]], SpecStats, dict[str, float]]:
        """The rollout plus the same rollout without speculation (same prompts, seeds, policy; output discarded),
        interleaved in halves — atlas(A), baseline(A), baseline(B), atlas(B) — so a slow drift of the machine's
        speed hits both alike. A half whose CPU share of wall time drops (another process took the core) or whose
        two half-ratios disagree by more than ``DISTURBED_SPREAD`` marks the step's measurement disturbed."""
        if self._baseline_engine is None:
            self._baseline_engine = RolloutEngine(model, speculators=[], eos_token_ids=self.eos_token_ids)
        self._baseline_engine.model = model
        cut = len(uniq) // 2 if len(uniq) > 1 else len(uniq)
        halves = [(uniq[:cut], counts[:cut]), (uniq[cut:], counts[cut:])]
        halves = [h for h in halves if h[0]]
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        stats = SpecStats()
        segments: list[tuple[str, int, float, float]] = []  # (who, tokens, wall s, cpu s)
        self.last_segments = []
        for i, (u, c) in enumerate(halves):
            half_sampling = dataclasses.replace(sampling, seed=(sampling.seed + i) % (2**62))
            order = ("atlas", "baseline") if i == 0 else ("baseline", "atlas")
            for who in order:
                engine = self.engine if who == "atlas" else self._baseline_engine
                comp, lps, st, cpu = self._rollout(engine, u, c, half_sampling)
                logger.info("  half %d/%d, %s: %.1f s", i + 1, len(halves), who, st.total_s)
                segments.append((who, st.num_completion_tokens, st.total_s, cpu))
                if who == "atlas":
                    self.last_segments.append(len(st.steps))
                    completions += comp
                    logprobs += lps
                    stats.merge(st)
        stats.total_s = sum(w for who, _, w, _ in segments if who == "atlas")
        return completions, logprobs, stats, paired_speedup(segments)

    def _probe_acceptance(self) -> dict[str, float]:
        """Estimated T=1 acceptance length of each draft head on this rollout's captured completions (before the
        adaptive head trains on them): see :mod:`atlas_rl.training.acceptance`. Rank 0 only (it holds the
        buffer); a few completions, no target forward."""
        n = int(getattr(self.options, "atlas_acceptance_probe", 0))
        if n <= 0 or self.buffer is None or not self.is_trainer_rank:
            return {}
        from atlas_rl.training.acceptance import estimate_acceptance, first_labeled_window

        # with the trainer's capture this rollout's samples arrive in its loss forward: probe the newest ones
        newest = self.policy_version if self.capture_mode == "engine" else self.buffer.newest_version
        fresh = [s for s in self.buffer.samples(min_version=newest) if s.num_labels > 0] if newest is not None else []
        if not fresh:
            return {}
        picked = [fresh[(i * len(fresh)) // min(n, len(fresh))] for i in range(min(n, len(fresh)))]
        picked = [first_labeled_window(s, PROBE_MAX_POSITIONS) for s in picked]
        k = int(self.options.atlas_num_speculative_tokens)
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        fuse = tuple(self.buffer.config.fuse_layers)
        for name, head in (("static", self.static_head), ("adaptive", self.adaptive_head)):
            if head is None or tuple(head.config.fuse_layers) != fuse:
                continue
            tau, _, count = estimate_acceptance(head, picked, k)
            if count:
                out[f"atlas/estimated_acceptance_length/{name}"] = tau
        out["atlas/acceptance_probe_s"] = time.perf_counter() - t0
        return out

    def _refresh_heads(self, model: torch.nn.Module) -> None:
        """The policy moved: re-copy the frozen output rows of the draft heads; under ZeRO-3 (parameters exist only
        inside the gather context) also re-copy the embedding they read."""
        zero3 = any(hasattr(p, "ds_id") for p in model.get_input_embeddings().parameters())
        for head in (self.static_head, self.adaptive_head):
            if head is None:
                continue
            if zero3:
                head.bind_target(model, init_lm_head=False, copy_embedding=True)
            if not head.config.train_lm_head and head.rows_follow_target:  # else: trained rows (e.g. the static's)
                with torch.no_grad():
                    out = model.get_output_embeddings().weight
                    head.lm_head.weight.copy_(out[head.draft_to_target.to(out.device)].to(head.lm_head.weight.dtype))
        if zero3 and self.adaptive_trainer is not None:
            object.__setattr__(self.adaptive_trainer.train_head, "_embed", self.adaptive_head._embed)

    @property
    def last_step_s(self) -> float:
        """Wall time between the starts of the last two rollouts (one RL step); 0 before a whole step was seen."""
        return self._recent_steps[-1] if self._recent_steps else 0.0

    def _record_step(self, seconds: float) -> None:
        self._recent_steps.append(seconds)

    def _step_base(self) -> float:
        """The RL step the retraining budget is a fraction of: this rollout's own time before a whole step was
        seen; then the last step, but never more than the lower median of the last ``RECENT_STEPS`` steps, so one
        slow step (another job on the machine, a checkpoint save) does not buy the next retraining a share of the
        step it will not get, while a step that got faster shrinks the budget at once."""
        if not self._recent_steps:
            return self.last_rollout_s
        return min(self.last_step_s, statistics.median_low(self._recent_steps))

    def _train_budget(self) -> float:
        """Seconds of retraining after this rollout: the fraction of the RL step (``_step_base``) less what the
        acceptance probe already spent (probe + retraining stay within the fraction), but never under
        ``atlas_adaptive_train_min_s`` (a slow probe on a loaded machine must not starve the retraining)."""
        frac = self.options.atlas_adaptive_train_fraction
        if frac <= 0 or self._train_disabled:
            return 0.0
        spent = self.last_probe.get("atlas/acceptance_probe_s", 0.0)
        base = self._step_base()
        return max(self.options.atlas_adaptive_train_min_s, BUDGET_HEADROOM * frac * base - spent, 0.0)

    def _after_rollout(self) -> None:
        if self.adaptive_trainer is None or not self.is_trainer_rank:
            return
        budget = self._train_budget()
        if budget <= 0:
            return
        if self.options.atlas_adaptive_background:
            self.adaptive_trainer.start(time_budget_s=budget)
        else:
            self._deferred_budget = budget

    def _before_rollout(self) -> None:
        if self.adaptive_trainer is None:
            return
        if self.is_trainer_rank:
            budget, self._deferred_budget = self._deferred_budget, 0.0
            if budget > 0:
                self._collect_training(lambda: self.adaptive_trainer.step(time_budget_s=budget))
            else:
                self._collect_training(self.adaptive_trainer.wait)
        self._broadcast_adaptive()

    def _collect_training(self, run: Any) -> None:
        """Run or join the retraining (``run()`` returns its metrics) and publish the result; on a failure keep
        the last published head (see the module docstring)."""
        if self._train_disabled and self.adaptive_trainer._thread is None:
            return
        try:
            result = run()
        except Exception as e:  # noqa: BLE001 - any failure of the speculator must not end the RL run
            self._on_train_failure(e)
            return
        if result is not None:
            self.last_train = result
            self._failures_in_a_row = 0
        self.adaptive_trainer.publish()

    def _on_train_failure(self, error: Exception) -> None:
        self.train_failures += 1
        self._failures_in_a_row += 1
        self.last_train = {}
        self.adaptive_trainer.discard_unpublished()
        if self.train_failures == 1:
            logger.warning(
                "adaptive-head retraining failed; the adaptive head keeps drafting with its last good weights "
                "(further failures are counted in atlas/speculator_train_failures, not logged): %s",
                error,
                exc_info=error,
            )
        if self._failures_in_a_row >= MAX_TRAIN_FAILURES and not self._train_disabled:
            self._train_disabled = True
            logger.warning(
                "adaptive-head retraining failed %d times in a row: retraining stops for this run", MAX_TRAIN_FAILURES
            )

    def _broadcast_adaptive(self) -> None:
        """Make every rank draft with rank 0's adaptive head (gloo/nccl broadcast of its trainable weights)."""
        if self.num_processes <= 1 or self.adaptive_head is None:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        with torch.no_grad():
            for name, p in self.adaptive_head.named_parameters():
                if name == "lm_head.weight" and not self.adaptive_head.config.train_lm_head:
                    continue
                dist.broadcast(p.data, src=0)

    def on_policy_update(self, version: int) -> None:
        """The trainer's optimizer stepped: the (shared, in-place) weights are policy ``version``."""
        if version <= self.policy_version:
            return
        self.policy_version = version
        if self.engine is not None:
            self.engine.update_weights(None, version=version)

    # ------------------------------------------------------------------------------------------ metrics
    @contextlib.contextmanager
    def outside_step(self) -> Iterator[None]:
        """Time spent inside is not part of the RL step whose fraction the retraining budget is (an evaluation or
        a probe run between two steps, e.g. from a ``TrainerCallback``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self._rollout_started_at is not None:
                self._rollout_started_at += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        s = self.last_stats
        if s is None:
            return {}
        out: dict[str, float] = {
            "atlas/rollout_tokens_per_s": s.num_completion_tokens / self.last_rollout_s
            if self.last_rollout_s
            else 0.0,
            "atlas/rollout_s": self.last_rollout_s,
            # where the rollout's time goes: target forwards, and the capture hook feeding the adaptive head
            "atlas/rollout_forward_s": s.forward_s,
            "atlas/rollout_prefill_s": s.prefill_s,
            "atlas/rollout_propose_s": s.propose_s,
            "atlas/rollout_verify_s": s.verify_s,
            "atlas/rollout_plan_s": s.plan_s,
            "atlas/rollout_capture_s": self.last_capture_s,
            "atlas/mean_acceptance_length": s.mean_acceptance_length if s.num_row_forwards else 1.0,
            "atlas/spec_off_fraction": s.num_spec_off_row_steps / s.num_row_forwards if s.num_row_forwards else 1.0,
            "atlas/policy_version": float(self.policy_version),
        }
        hist = getattr(s, "draft_len_histogram", None)
        if hist:
            total = sum(hist)
            for k, c in enumerate(hist):
                out[f"atlas/k_hist/{k}"] = c / total if total else 0.0
        cal = getattr(s, "calibration_error", None)
        if cal is not None and cal == cal:  # not NaN
            out["atlas/calibration_error"] = cal
        if s.num_steps:
            out["atlas/plan_ms_per_step"] = 1000.0 * s.plan_s / s.num_steps
        rows = max(s.num_row_forwards, 1)
        for name in self.engine.speculators if self.engine is not None else []:  # every speculator, 0 when unused
            ss = s.per_speculator.get(name)
            out[f"atlas/speculator_share/{name}"] = ss.num_row_forwards / rows if ss is not None else 0.0
            if ss is not None and ss.num_row_forwards:
                out[f"atlas/mean_acceptance_length/{name}"] = ss.mean_acceptance_length
        if self.last_baseline is not None:
            b = self.last_baseline
            out["atlas/baseline_rollout_tokens_per_s"] = b["tokens_per_s"]
            out["atlas/baseline_rollout_s"] = b["rollout_s"]
            out["atlas/speedup"] = b["speedup"]
            out["atlas/speedup_half_spread"] = b["half_spread"]
            out["atlas/speedup_disturbed"] = b["disturbed"]
        out.update(self.last_probe)
        if self.adaptive_trainer is not None:
            m = self.adaptive_trainer.metrics()
            out["atlas/speculator_train_loss"] = m.get("loss", float("nan"))
            out["atlas/speculator_staleness"] = float(m.get("staleness", -1))
            # the retraining that finished before this rollout (its share of the step), and the run's total
            out["atlas/speculator_train_s"] = float(self.last_train.get("call_s", 0.0)) if self.last_train else 0.0
            out["atlas/speculator_train_s_total"] = float(m.get("train_s", 0.0))
            out["atlas/speculator_train_steps"] = float(m.get("steps", 0))
            out["atlas/speculator_train_skipped_steps"] = float(m.get("skipped", 0))  # NaN/inf guard
            out["atlas/speculator_train_failures"] = float(self.train_failures)
        return out

    # ------------------------------------------------------------------------------------------ checkpoints
    STATE_FILE = "atlas_state.json"
    TRAINER_FILE = "atlas_adaptive_trainer.safetensors"
    SERVING_DIR = (
        "atlas_adaptive_head"  # the serving head in the EAGLE-3 layout vLLM loads (atlas-rl export-speculator)
    )

    def save(self, directory: str | Path) -> None:
        """Write the speculator state into a checkpoint folder (safetensors + JSON, no pickle): the adaptive
        trainer (weights, optimizer, counters, RNG), the serving adaptive head, the suffix history, counters.
        Waits for a running background retraining first. Every file is replaced atomically and
        ``atlas_state.json`` is written last: a folder holding it holds a complete state."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state: dict[str, Any] = {"num_calls": self.num_calls, "policy_version": self.policy_version}
        if self.adaptive_trainer is not None:
            if self.adaptive_trainer._thread is not None:
                self._collect_training(self.adaptive_trainer.wait)
            _replace_atomically(d / self.TRAINER_FILE, self.adaptive_trainer.save)
            _replace_atomically(d / self.SERVING_DIR, lambda p: self.adaptive_head.save_pretrained(p, dtype=None))
        if self.suffix is not None:
            state["suffix"] = self.suffix.state_dict()
        _replace_atomically(d / self.STATE_FILE, lambda p: p.write_text(json.dumps(state)))

    def _read_state(self, d: Path) -> dict[str, Any]:
        path = d / self.STATE_FILE
        if not path.exists():
            raise CheckpointStateError(
                f"{path} is missing: this checkpoint holds no atlas speculator state (written by a plain TRL "
                "trainer, or its save was cut short). Resuming without it would restart policy_version at 0 and "
                "reuse rollout seeds: resume from a checkpoint an Atlas trainer wrote completely, or start a new run"
            )
        try:
            state = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointStateError(
                f"{path} is corrupt or truncated ({e}): resume from an earlier checkpoint or start a new run"
            ) from e
        if not isinstance(state, dict) or not isinstance(state.get("policy_version"), int):
            raise CheckpointStateError(f"{path} is not an atlas state (no integer policy_version)")
        return state

    def load(self, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote (applied when the engine is built if it is not yet). Raises
        :class:`CheckpointStateError` (a ValueError naming the file) when the state is missing or unreadable."""
        d = Path(directory)
        state = self._read_state(d)
        if self.engine is None:
            self._pending_dir = d
            self.num_calls = int(state.get("num_calls", 0))
            self.policy_version = int(state["policy_version"])
            return
        self.num_calls = int(state.get("num_calls", 0))
        self.policy_version = max(self.policy_version, int(state["policy_version"]))
        self.engine.policy_version = self.policy_version
        if self.adaptive_trainer is not None and (d / self.TRAINER_FILE).exists():
            self.adaptive_trainer.load(d / self.TRAINER_FILE)
            serving = DraftHead.from_pretrained(d / self.SERVING_DIR)
            with torch.no_grad():
                own = self.adaptive_head.state_dict()
                for k, v in serving.state_dict().items():
                    own[k].copy_(v)
        if self.suffix is not None and "suffix" in state:
            self.suffix.load_state_dict(state["suffix"])

    def close(self) -> None:
        """Stop and join the background retraining (after its current optimizer step), report a failure it
        had, and release the engines (KV cache, the CPU kernel routing of the model's layers). Idempotent; a
        later :meth:`generate` still works (without the CPU kernel routing)."""
        if self._closed:
            return
        self._closed = True
        tr = self.adaptive_trainer
        if tr is not None and tr._thread is not None:
            self._collect_training(tr.cancel)
        if self.train_failures:
            logger.warning(
                "adaptive-head retraining failed %d time(s) in this run (atlas/speculator_train_failures); the "
                "first failure was logged with its traceback",
                self.train_failures,
            )
        for engine in (self.engine, self._baseline_engine):
            if engine is not None:
                engine.release()
