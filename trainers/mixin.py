"""What :class:`AtlasGRPOTrainer` and :class:`AtlasRLOOTrainer` add to TRL's trainers.

Only the generation step changes: TRL still templates and tokenizes the prompts (``_tokenize_prompts``),
computes rewards, advantages and the loss. ``_generate_single_turn`` hands the token ids to the atlas engine
and returns completions (EOS included, as TRL's own paths do) and the logprobs of the sampled tokens
(``log_softmax(logits / temperature)``, TRL's convention). With ``generation_backend`` "transformers" or
"vllm" TRL's own code runs untouched; rollout time and throughput are logged for every backend, so A/B runs
compare like with like.

Lifecycle: ``train()`` closes the backend on every exit path (normal end, exception, KeyboardInterrupt), so no
background retraining outlives it and the process exits with the real exit code. ``log()`` reports counters
(``LAST_VALUE_METRICS``, e.g. ``atlas/policy_version``) at their last value where TRL averages a log window.
Checkpoints: the atlas state goes into ``checkpoint-N/atlas/`` before TRL writes ``trainer_state.json`` there,
so a checkpoint TRL considers complete holds a complete atlas state.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import torch
from transformers import TrainerCallback

from atlas_rl.types import SamplingParams

from .backend import LAST_VALUE_METRICS, AtlasRolloutBackend, backend_class
from .capture import TrainerCapture

logger = logging.getLogger(__name__)

# transformers 5 renamed gradient -> activation checkpointing; TRL's trainers still call the old methods on every
# step (not our calls), which warns 4 times a run. Silenced during train() only, by exact message.
_TRL_CHECKPOINTING_WARNING = r"`(is_)?gradient_checkpointing(_enable|_disable)?` is deprecated"

CHECKPOINT_SUBDIR = "atlas"


class _PolicyVersionCallback(TrainerCallback):
    """Tells the backend after every optimizer step that the policy moved."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
        backend = self.trainer.atlas_backend
        if backend is not None:
            backend.on_policy_update(int(state.global_step))
        return control


class AtlasTrainerMixin:
    """Mixed into TRL trainer subclasses (before the TRL class in the MRO)."""

    atlas_backend: AtlasRolloutBackend | None = None
    # TRL's GRPO `_generate_single_turn` returns (completion_ids, logprobs); RLOO's returns completion_ids only
    _atlas_returns_logprobs: bool = True

    def _atlas_init(self) -> None:
        args = self.args
        self._atlas_backend_name = getattr(args, "generation_backend", "transformers")
        self._atlas_in_generate = False
        self._atlas_is_active = False
        if self._atlas_backend_name != "atlas":
            return
        from atlas_rl.rollout.engine import check_model_supported

        check_model_supported(self.accelerator.unwrap_model(self.model))
        self.atlas_backend = backend_class(args)(
            args,
            eos_token_ids=list(self.eos_token_ids),
            process_index=self.accelerator.process_index,
            num_processes=self.accelerator.num_processes,
            seed=args.seed,
        )
        if getattr(args, "atlas_importance_sampling_correction", False) and hasattr(
            self, "vllm_importance_sampling_correction"
        ):
            self.vllm_importance_sampling_correction = True
            self._atlas_is_active = True
        self.add_callback(_PolicyVersionCallback(self))

    # TRL gates its (vLLM-path) importance-sampling correction on `use_vllm`; with the atlas backend and
    # atlas_importance_sampling_correction=True it reads True there, but False inside generation, so every
    # other vLLM-specific branch stays off.
    @property
    def use_vllm(self) -> bool:
        raw = self.__dict__.get("_atlas_use_vllm_raw", False)
        active = self.__dict__.get("_atlas_is_active", False) and not self.__dict__.get("_atlas_in_generate", False)
        return bool(raw or active)

    @use_vllm.setter
    def use_vllm(self, value: bool) -> None:
        self.__dict__["_atlas_use_vllm_raw"] = value

    def train(self, *args, **kwargs):
        """TRL's ``train()``; afterwards (however it ends) the backend is closed: background retraining stopped
        and joined, its failures reported, the engine's hold on the model released."""
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TRL_CHECKPOINTING_WARNING, category=FutureWarning)
                return super().train(*args, **kwargs)
        finally:
            if self.atlas_backend is not None:
                self.atlas_backend.close()

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL averages every metric over the log window; counters keep their last value instead."""
        for per_mode in getattr(self, "_metrics", {}).values():
            for key in LAST_VALUE_METRICS & set(per_mode):
                if len(per_mode[key]) > 1:
                    per_mode[key][:] = per_mode[key][-1:]
        super().log(logs, start_time)

    def _generate(self, prompts: list):
        if self.atlas_backend is not None and self.model.training:  # a training rollout: owed to the capture
            self._atlas_trainer_capture().new_rollout(len(prompts))
        self._atlas_in_generate = True
        try:
            return super()._generate(prompts)
        finally:
            self._atlas_in_generate = False

    def _atlas_sampling(self) -> SamplingParams:
        gk = getattr(self.args, "generation_kwargs", None) or {}
        greedy = gk.get("do_sample", True) is False
        return SamplingParams(
            temperature=0.0 if greedy else float(self.temperature),
            top_k=int(self.top_k or 0),
            top_p=float(self.top_p if self.top_p is not None else 1.0),
            max_new_tokens=int(self.max_completion_length),
            stop_token_ids=tuple(int(t) for t in self.eos_token_ids),
            ignore_eos=True,  # TRL's eos_token_ids are the stop set, exactly
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, *args, **kwargs):
        mode = "train" if self.model.training else "eval"
        t0 = time.perf_counter()
        if self.atlas_backend is None:
            out = super()._generate_single_turn(prompt_ids, images, multimodal_fields, *args, **kwargs)
            secs = time.perf_counter() - t0
            completion_ids = out[0] if self._atlas_returns_logprobs else out
            n_tok = sum(len(c) for c in completion_ids)
            self._metrics[mode]["atlas/rollout_s"].append(secs)
            self._metrics[mode]["atlas/rollout_tokens_per_s"].append(n_tok / secs if secs > 0 else 0.0)
            return out
        if images is not None and any(im for im in images):
            raise ValueError(
                "generation_backend='atlas' does not support image inputs: use generation_backend='transformers'"
            )
        from trl.models.utils import unwrap_model_for_generation

        with (
            unwrap_model_for_generation(
                self.model_wrapped,
                self.accelerator,
                gather_deepspeed3_params=getattr(self.args, "ds3_gather_for_generation", True),
            ) as unwrapped,
            torch.no_grad(),
        ):
            completion_ids, logprobs = self.atlas_backend.generate(
                unwrapped, [list(map(int, p)) for p in prompt_ids], self._atlas_sampling()
            )
        for key, value in self.atlas_backend.metrics().items():
            self._metrics[mode][key].append(value)
        return (completion_ids, logprobs) if self._atlas_returns_logprobs else completion_ids

    # --------------------------------------------------------------------------------------- trainer capture
    def _atlas_trainer_capture(self) -> TrainerCapture:
        cap = self.__dict__.get("_atlas_capture")
        if cap is None:
            cap = self.__dict__["_atlas_capture"] = TrainerCapture(self.atlas_backend)
        return cap

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        """TRL's log-probability forward; with ``capture_mode == "trainer"`` its first loss forward over each rollout
        row also feeds the adaptive head's buffer (see :mod:`.capture`). The result is TRL's, unchanged."""

        def forward():  # noqa: ANN202 - TRL's (logps, entropies, aux_loss)
            return super(AtlasTrainerMixin, self)._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )

        cap = self.__dict__.get("_atlas_capture")
        if self.atlas_backend is None or cap is None or not cap.wanted():
            return forward()
        policy = self.accelerator.unwrap_model(model)
        if policy is not self.accelerator.unwrap_model(self.model):
            return forward()
        policy = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # PEFT
        out, secs = cap.run(policy, input_ids, attention_mask, int(logits_to_keep), forward)
        # the rollout's metrics were logged when it was generated: add the capture to this rollout's entry
        self.atlas_backend.last_capture_s += secs
        entries = self._metrics["train"]["atlas/rollout_capture_s"]
        if entries:
            entries[-1] += secs
        else:
            entries.append(secs)
        return out

    # --------------------------------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial):
        if self.atlas_backend is not None and self.args.should_save:  # first: TRL's trainer_state.json marks done
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            step_dir = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            folder = os.path.join(self._get_output_dir(trial=trial), step_dir)
            self.atlas_backend.save(os.path.join(folder, CHECKPOINT_SUBDIR))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.atlas_backend is not None and checkpoint is not None:
            self.atlas_backend.load(os.path.join(checkpoint, CHECKPOINT_SUBDIR))
