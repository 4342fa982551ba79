"""``AtlasPPOTrainer``: PPO in the style of TRL 0.x's ``PPOTrainer``, with rollouts from the atlas engine.

One update (= one trainer step):

1. roll out one completion per prompt (``generation_backend`` "atlas": our lossless speculative engine, the
   adaptive speculator retrained in the background after every update exactly as for GRPO; "transformers":
   ``model.generate``);
2. score the completions (reward functions with the GRPO trainer's signature, and/or reward models);
3. no-grad forwards: values, the frozen reference's logprobs (only when ``kl_coef > 0``), and the behaviour
   logprobs when the backend did not return them;
4. per-token rewards ``-kl_coef * KL_t`` plus the score on the last valid token; GAE; whitened advantages;
5. ``num_ppo_epochs`` passes in ``num_mini_batches`` minibatches of clipped policy + ``vf_coef`` x clipped value
   loss, one optimizer step (policy and value model together) per minibatch;
6. the engine's ``policy_version`` advances by one (it reads the updated weights in place; rollouts only happen
   between updates, so one version per update is exact) and the adaptive speculator retrains in the background.

**Which logprobs the ratio uses.** ``ratio = exp(log pi_theta(a_t) - log pi_old(a_t))`` with ``pi_old`` the
*behaviour* policy that sampled the rollout. With ``generation_backend="atlas"`` these are the engine's rollout
logprobs (``log_softmax(logits / temperature)`` of the sampled token, exact: speculative sampling leaves the
target's distribution and logprobs unchanged), so no extra policy forward is spent. With "transformers" they are
recomputed by a no-grad forward of the same policy before the first epoch. Either way the first minibatch of the
first epoch sees the unchanged policy, so its ratio is 1 up to float error (logged as
``policy/first_ratio_max_dev``).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from transformers import PreTrainedModel, Trainer
from transformers.trainer_utils import TrainOutput

from .capture import TrainerCapture
from .mixin import CHECKPOINT_SUBDIR
from .ppo_config import AtlasPPOConfig
from .ppo_core import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    masked_mean,
    masked_whiten,
    penalised_rewards,
    policy_loss,
    value_loss,
)
from .ppo_models import (
    PackedBatch,
    PolicyAndValue,
    ValueHead,
    check_scalar_model,
    pack,
    response_logprobs,
    scalar_per_token,
)
from .ppo_rollout import PPORolloutGenerator, Rollout, stop_token_ids

logger = logging.getLogger(__name__)

PPO_STATE_FILE = "ppo_state.json"
VALUE_SUBDIR = "value_model"
# TRL's PPO metric names, logged beside the atlas/* ones
TRL_METRICS = (
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "objective/rlhf_reward",
    "objective/scores",
    "policy/approxkl_avg",
    "policy/clipfrac_avg",
    "loss/policy_avg",
    "loss/value_avg",
    "val/clipfrac_avg",
    "policy/entropy_avg",
    "val/ratio",
    "val/ratio_var",
    "val/num_eos_tokens",
)

RewardFunc = Callable[..., list[float]] | nn.Module


class AtlasPPOTrainer(Trainer):
    """PPO with rollouts through the atlas engine (or ``model.generate``); see the module docstring.

    Args:
        model: the policy (a causal LM; the atlas backend needs a Llama-family model).
        ref_model: the frozen reference for the KL penalty; None = a frozen copy of ``model`` as passed (built
            only when ``kl_coef > 0``; never checkpointed: a resumed run rebuilds it from the model passed in).
        value_model: an ``AutoModelForSequenceClassification``-style model (backbone under
            ``base_model_prefix``, one-output ``score`` head); None = a zero-initialised scalar head on a copy of
            the policy's backbone.
        reward_funcs: one or a list of reward functions with the GRPO trainer's signature
            ``f(prompts, completions, completion_ids, trainer_state, **dataset_columns) -> list[float]`` and/or
            reward models (same layout as the value model, same tokenizer as the policy; the score is the head's
            output on the last completion token).
        args: :class:`AtlasPPOConfig`.
        train_dataset: rows with a ``prompt`` (text or a conversation); other columns reach the reward functions.
        processing_class: the policy's tokenizer.
    """

    _tag_names = ["trl", "ppo", "atlas"]

    def __init__(
        self,
        model: PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        value_model: nn.Module | None = None,
        reward_funcs: RewardFunc | list[RewardFunc] | None = None,
        args: AtlasPPOConfig | None = None,
        train_dataset: Any = None,
        processing_class: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
    ) -> None:
        self._check_inputs(model, args, train_dataset, processing_class)
        self.reward_funcs = self._reward_list(reward_funcs)
        weights = args.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions"
            )
        self.reward_weights = [float(w) for w in weights]
        if value_model is None:
            value_model = ValueHead(model)
        check_scalar_model(value_model, "value_model")
        self.ref_model = self._reference(model, ref_model, args)
        self.pad_id = self._pad_id(processing_class)
        self.stops = stop_token_ids(args, processing_class, model)
        super().__init__(
            model=PolicyAndValue(model, value_model),
            args=args,
            data_collator=_identity,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._atlas_post_init()

    # ------------------------------------------------------------------------------------------ construction
    @staticmethod
    def _check_inputs(model: Any, args: Any, train_dataset: Any, processing_class: Any) -> None:
        if not isinstance(args, AtlasPPOConfig):
            raise ValueError(f"AtlasPPOTrainer needs an AtlasPPOConfig, got {type(args).__name__}")
        if not isinstance(model, PreTrainedModel):
            raise ValueError(f"model must be a transformers PreTrainedModel (a causal LM), got {type(model).__name__}")
        if train_dataset is None or "prompt" not in getattr(train_dataset, "column_names", []):
            raise ValueError("train_dataset must be a datasets.Dataset with a 'prompt' column (text or conversation)")
        if processing_class is None:
            raise ValueError("processing_class (the policy's tokenizer) is required")
        if args.generation_backend == "atlas":
            from atlas_rl.rollout.engine import check_model_supported

            check_model_supported(model)

    @staticmethod
    def _reward_list(reward_funcs: Any) -> list[RewardFunc]:
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs or any(f is None for f in funcs):
            raise ValueError("reward_funcs is required: a reward function, a reward model, or a list of them")
        for f in funcs:
            if isinstance(f, nn.Module):
                check_scalar_model(f, "reward model")
                f.eval().requires_grad_(False)
            elif not callable(f):
                raise ValueError(f"a reward function must be callable or an nn.Module, got {type(f).__name__}")
        return list(funcs)

    @staticmethod
    def _reference(model: nn.Module, ref_model: nn.Module | None, args: AtlasPPOConfig) -> nn.Module | None:
        if args.kl_coef == 0:
            if ref_model is not None:
                logger.warning("kl_coef == 0: the reference model is not used")
            return None
        ref = ref_model if ref_model is not None else copy.deepcopy(model)
        if ref is model:
            raise ValueError("ref_model must be a separate (frozen) model, not the policy itself")
        return ref.eval().requires_grad_(False)

    @staticmethod
    def _pad_id(tokenizer: Any) -> int:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token")
        return int(pad)

    def _atlas_post_init(self) -> None:
        args = self.args
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and int(getattr(plugin, "zero_stage", 0)) == 3:
            raise ValueError(
                "AtlasPPOTrainer does not support DeepSpeed ZeRO-3 yet (rollouts, the value model and the reference "
                "need whole parameters): use ZeRO-2 (recipes/accelerate/deepspeed_zero2.yaml) or DDP"
            )
        dev = self.accelerator.device
        if self.ref_model is not None:
            self.ref_model.to(dev)
        for f in self.reward_funcs:
            if isinstance(f, nn.Module):
                f.to(dev)
        if args.kl_target is not None:
            self.kl_ctl = AdaptiveKLController(args.kl_coef, args.kl_target, args.kl_horizon)
        else:
            self.kl_ctl = FixedKLController(args.kl_coef)
        self.generator = PPORolloutGenerator(
            args, self.stops, self.pad_id, self.accelerator.process_index, self.accelerator.num_processes
        )
        self.atlas_backend = self.generator.backend
        # the adaptive head's samples from the first PPO epoch when vLLM rolls out (no hidden states from it)
        self._atlas_trainer_capture = TrainerCapture(self.atlas_backend) if self.atlas_backend is not None else None
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._shuffle = torch.Generator().manual_seed(int(args.seed) + 12_345)  # the same on every rank
        self.last_update_stats: dict[str, Any] = {}

    @property
    def policy(self) -> PreTrainedModel:
        return self.accelerator.unwrap_model(self.model).policy

    @property
    def value_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).value_model

    # ------------------------------------------------------------------------------------------ data
    def _ppo_dataloader(self) -> DataLoader:
        args = self.args
        need = args.rollout_batch_size * self.accelerator.num_processes
        if len(self.train_dataset) < need:
            raise ValueError(
                f"train_dataset has {len(self.train_dataset)} rows but one PPO update needs {need} "
                "(per_device_train_batch_size x gradient_accumulation_steps x num_mini_batches x processes)"
            )
        sampler = RandomSampler(self.train_dataset, generator=torch.Generator().manual_seed(int(args.seed)))
        dl = DataLoader(
            self.train_dataset,
            batch_size=args.rollout_batch_size,
            sampler=sampler,
            collate_fn=_identity,
            drop_last=True,
        )
        return self.accelerator.prepare(dl)

    @staticmethod
    def _batches(dl: DataLoader, skip: int) -> Iterator[list[dict[str, Any]]]:
        epoch, seen = 0, 0
        while True:
            if hasattr(dl, "set_epoch"):
                dl.set_epoch(epoch)
            for batch in dl:
                seen += 1
                if seen > skip:
                    yield batch
            epoch += 1

    def _tokenize(self, rows: list[dict[str, Any]]) -> list[list[int]]:
        from trl.data_utils import maybe_apply_chat_template

        out = []
        for row in rows:
            text = maybe_apply_chat_template({"prompt": row["prompt"]}, self.processing_class)["prompt"]
            out.append(list(self.processing_class(text=text, add_special_tokens=False)["input_ids"]))
        return out

    # ------------------------------------------------------------------------------------------ training loop
    def _inner_training_loop(
        self, batch_size=None, args=None, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None
    ) -> TrainOutput:
        args = self.args
        dataloader = self._ppo_dataloader()
        per_epoch = len(dataloader)
        max_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * per_epoch)
        epochs = math.ceil(max_steps / per_epoch)
        self._init_training_state(max_steps, per_epoch, epochs, resume_from_checkpoint, trial)
        optimizer_steps = max_steps * args.num_ppo_epochs * args.num_mini_batches
        model, _ = self._prepare_for_training(optimizer_steps, dataloader, resume_from_checkpoint)
        batches = self._batches(dataloader, skip=self.state.global_step)
        if resume_from_checkpoint is not None:
            self._load_rng_state(resume_from_checkpoint)
        self.control = self.callback_handler.on_train_begin(args, self.state, self.control)
        losses: list[float] = []
        try:
            while self.state.global_step < max_steps and not self.control.should_training_stop:
                losses.append(self._one_step(model, next(batches), per_epoch, trial))
        finally:
            self._join_background()
        self.control = self.callback_handler.on_train_end(args, self.state, self.control)
        self.is_in_train = False
        mean_loss = sum(losses) / len(losses) if losses else float("nan")
        return TrainOutput(self.state.global_step, mean_loss, {"train_loss": mean_loss})

    def _one_step(self, model: nn.Module, rows: list[dict[str, Any]], per_epoch: int, trial: Any) -> float:
        args = self.args
        self.control = self.callback_handler.on_step_begin(args, self.state, self.control)
        t0 = time.perf_counter()
        stats = self.ppo_update(model, rows)
        self.state.global_step += 1
        self.state.epoch = self.state.global_step / per_epoch
        if self.atlas_backend is not None:  # the policy moved: the engine reads the weights in place
            self.atlas_backend.on_policy_update(self.state.global_step)
        stats["step_time"] = time.perf_counter() - t0
        for k, v in stats.items():
            self._metrics[k].append(float(v))
        self.control = self.callback_handler.on_step_end(args, self.state, self.control)
        if self.control.should_log:
            self.log({k: sum(v) / len(v) for k, v in self._metrics.items() if v})
            self._metrics.clear()
        if self.control.should_save:
            self._save_checkpoint(model, trial)
            self.control = self.callback_handler.on_save(args, self.state, self.control)
        return float(stats["loss"])

    def _join_background(self) -> None:
        b = self.atlas_backend
        if b is not None and b.adaptive_trainer is not None and b.adaptive_trainer._thread is not None:
            b.last_train = b.adaptive_trainer.wait() or {}

    # ------------------------------------------------------------------------------------------ one update
    def ppo_update(self, model: nn.Module, rows: list[dict[str, Any]]) -> dict[str, float]:
        """Rollout, rewards, advantages and the PPO epochs on one batch of dataset rows; returns the metrics."""
        prompts = self._tokenize(rows)
        rollout = self.generator.generate(self.policy, prompts)
        if self._atlas_trainer_capture is not None:
            self._atlas_trainer_capture.new_rollout(len(prompts))
        batch = pack(prompts, rollout.completions, self.pad_id, self.accelerator.device)
        scores, reward_metrics = self._scores(rows, rollout, batch)
        exp = self._experience(batch, rollout, scores)
        train = self._train_epochs(model, batch, exp)
        self.kl_ctl.update(float(exp["seq_kl"].mean()), self.args.rollout_batch_size * self.accelerator.num_processes)
        metrics = self._reduce({**exp["metrics"], **train, **reward_metrics})
        metrics["objective/kl_coef"] = self.kl_ctl.value
        metrics["lr"] = self._get_learning_rate()
        metrics["episode"] = float((self.state.global_step + 1) * args_rows(self))
        metrics["loss"] = metrics["loss/policy_avg"] + self.args.vf_coef * metrics["loss/value_avg"]
        metrics["reward"] = metrics["objective/scores"]
        metrics.update(rollout.metrics)
        return metrics

    def _reduce(self, stats: dict[str, float]) -> dict[str, float]:
        """Mean of every scalar across processes (one collective)."""
        if self.accelerator.num_processes <= 1:
            return dict(stats)
        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    @torch.no_grad()
    def _forward_chunks(self, fn: Callable[[PackedBatch], torch.Tensor], batch: PackedBatch) -> torch.Tensor:
        step = self.args.local_rollout_forward_batch_size
        n = batch.input_ids.shape[0]
        return torch.cat([fn(batch.rows(torch.arange(i, min(i + step, n)))) for i in range(0, n, step)])

    def _policy_logprobs(self, model: nn.Module, mb: PackedBatch) -> torch.Tensor:
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids).logits
        return response_logprobs(logits, mb, self.args.temperature)[0]

    def _values(self, mb: PackedBatch) -> torch.Tensor:
        p = mb.context_length
        return scalar_per_token(self.value_model, mb)[:, p - 1 : -1]

    def _experience(self, batch: PackedBatch, rollout: Rollout, scores: torch.Tensor) -> dict[str, Any]:
        """Behaviour/reference logprobs, values, per-token rewards, advantages and returns (no grad)."""
        args, mask = self.args, batch.response_mask
        if rollout.logprobs is not None:
            dtype = torch.float64 if next(self.policy.parameters()).dtype == torch.float64 else torch.float32
            logprobs = _pad_floats(rollout.logprobs, mask.shape[1], batch.input_ids.device, dtype)
        else:
            logprobs = self._forward_chunks(lambda mb: self._policy_logprobs(self.policy, mb), batch)
        logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs))
        ref = None
        if self.ref_model is not None:
            ref = self._forward_chunks(lambda mb: self._policy_logprobs(self.ref_model, mb), batch)
        values = torch.where(mask, self._forward_chunks(self._values, batch), torch.zeros_like(logprobs))
        rewards, kl = penalised_rewards(scores, logprobs, ref, mask, self.kl_ctl.value, args.kl_estimator)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, args.gamma, args.lam)
        if args.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        seq_kl = kl.sum(1)
        non_score = (-self.kl_ctl.value * kl).sum(1)
        has_stop = torch.tensor([bool(c) and c[-1] in self.stops for c in rollout.completions], dtype=torch.float32)
        metrics = {
            "objective/kl": float(seq_kl.mean()),
            "objective/entropy": float((-logprobs * mask).sum(1).mean()),
            "objective/non_score_reward": float(non_score.mean()),
            "objective/rlhf_reward": float((scores + non_score).mean()),
            "objective/scores": float(scores.mean()),
            "val/num_eos_tokens": float(has_stop.sum()),
            "completions/mean_length": float(mask.sum(1).float().mean()),
        }
        return {
            "logprobs": logprobs,
            "values": values,
            "advantages": advantages,
            "returns": returns,
            "seq_kl": seq_kl,
            "metrics": metrics,
        }

    def _train_epochs(self, model: nn.Module, batch: PackedBatch, exp: dict[str, Any]) -> dict[str, float]:
        """``num_ppo_epochs`` shuffled passes; one optimizer step per minibatch."""
        args = self.args
        n = batch.input_ids.shape[0]
        acc: dict[str, list[float]] = defaultdict(list)
        first_dev = float("nan")
        model.train()
        for epoch in range(args.num_ppo_epochs):
            order = torch.randperm(n, generator=self._shuffle)
            for m in range(args.num_mini_batches):
                idx = order[m * args.mini_batch_size : (m + 1) * args.mini_batch_size]
                dev = self._minibatch(model, batch, exp, idx, acc)
                if epoch == 0 and m == 0:
                    first_dev = dev
        out = {k: sum(v) / len(v) for k, v in acc.items()}
        ratios = torch.tensor(acc.pop("_ratio_mean"), dtype=torch.float64)
        out.pop("_ratio_mean", None)
        out["val/ratio"] = float(ratios.mean())
        out["val/ratio_var"] = float(ratios.var()) if len(ratios) > 1 else 0.0
        out["policy/first_ratio_max_dev"] = first_dev
        return out

    def _minibatch(
        self, model: nn.Module, batch: PackedBatch, exp: dict[str, Any], idx: torch.Tensor, acc: dict[str, list]
    ) -> float:
        """Micro-batches with gradient accumulation, then one optimizer step; returns max |ratio - 1| seen."""
        args = self.args
        gas = args.gradient_accumulation_steps
        micro = args.per_device_train_batch_size
        max_dev = 0.0
        for j in range(gas):
            rows = idx[j * micro : (j + 1) * micro]
            last = j == gas - 1
            self.accelerator.gradient_state._set_sync_gradients(last)
            ctx = _sync_context(self.accelerator, model, last)
            with ctx:
                stats, dev = self._micro_step(model, batch.rows(rows), {k: exp[k][rows] for k in _EXP_KEYS}, gas)
            max_dev = max(max_dev, dev)
            for k, v in stats.items():
                acc[k].append(v)
        if args.max_grad_norm and args.max_grad_norm > 0:
            self._clip_grad_norm(model)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:
            self.lr_scheduler.step()
        model.zero_grad()
        return max_dev

    def _policy_forward(self, model: nn.Module, mb: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The policy + value forward of a micro-batch; with ``capture_mode == "trainer"`` (vLLM rolls out) the
        first pass over each rollout row also feeds the adaptive head (:class:`~.capture.TrainerCapture`)."""

        def forward() -> tuple[torch.Tensor, torch.Tensor]:
            return model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids)

        cap = self._atlas_trainer_capture
        if cap is None or not cap.wanted():
            return forward()
        out, secs = cap.run(self.policy, mb.input_ids, mb.attention_mask, mb.response_mask.shape[1], forward)
        self.atlas_backend.last_capture_s += secs
        return out

    def _micro_step(
        self, model: nn.Module, mb: PackedBatch, exp: dict[str, torch.Tensor], gas: int
    ) -> tuple[dict[str, float], float]:
        args, mask = self.args, mb.response_mask
        logits, vpred_all = self._policy_forward(model, mb)
        new_logprobs, entropy = response_logprobs(logits, mb, args.temperature)
        p = mb.context_length
        vpred = vpred_all[:, p - 1 : -1]
        pl = policy_loss(new_logprobs, exp["logprobs"], exp["advantages"], mask, args.cliprange)
        vl, vclip = value_loss(vpred, exp["values"], exp["returns"], mask, args.cliprange_value)
        loss = pl.loss + args.vf_coef * vl
        kwargs = {"scale_wrt_gas": False} if self.is_deepspeed_enabled else {}
        self.accelerator.backward(loss / gas, **kwargs)
        dev = float(torch.where(mask, (pl.ratio - 1).abs(), torch.zeros_like(pl.ratio)).max())
        stats = {
            "policy/approxkl_avg": float(pl.approxkl),
            "policy/clipfrac_avg": float(pl.clipfrac),
            "loss/policy_avg": float(pl.loss.detach()),
            "loss/value_avg": float(vl.detach()),
            "val/clipfrac_avg": float(vclip),
            "policy/entropy_avg": float(masked_mean(entropy.detach(), mask)),
            "_ratio_mean": float(masked_mean(pl.ratio, mask)),
        }
        return stats, dev

    # ------------------------------------------------------------------------------------------ rewards
    def _scores(self, rows: list[dict[str, Any]], rollout: Rollout, batch: PackedBatch) -> tuple[torch.Tensor, dict]:
        """Weighted sum of every reward function/model, minus ``missing_eos_penalty`` where no stop token."""
        texts = self.processing_class.batch_decode(rollout.completions, skip_special_tokens=True)
        conversational = isinstance(rows[0]["prompt"], list)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        total = torch.zeros(len(rows), dtype=torch.float64, device=batch.input_ids.device)
        metrics: dict[str, float] = {}
        for f, w in zip(self.reward_funcs, self.reward_weights):
            if isinstance(f, nn.Module):
                last = batch.context_length + batch.response_mask.long().sum(1) - 1
                with torch.no_grad():
                    r = self._forward_chunks(lambda mb, f=f: scalar_per_token(f, mb), batch)
                r = r[torch.arange(len(rows), device=r.device), last]
            else:
                out = f(
                    prompts=[r["prompt"] for r in rows],
                    completions=completions,
                    completion_ids=rollout.completions,
                    trainer_state=self.state,
                    **columns,
                )
                r = _reward_tensor(out, len(rows), _name(f)).to(total.device)
            metrics[f"rewards/{_name(f)}/mean"] = float(r.mean())
            total = total + w * r
        if self.args.missing_eos_penalty is not None and self.stops:
            missing = torch.tensor([not (c and c[-1] in self.stops) for c in rollout.completions], device=total.device)
            total = total - self.args.missing_eos_penalty * missing.float()
        metrics["reward_std"] = float(total.std()) if len(rows) > 1 else 0.0
        dtype = torch.float64 if next(self.policy.parameters()).dtype == torch.float64 else torch.float32
        return total.to(dtype), metrics

    # ------------------------------------------------------------------------------------------ checkpoints
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The policy at the folder's root (``from_pretrained``-loadable), the value model under ``value_model/``,
        the tokenizer; no pickle."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.policy.save_pretrained(output_dir)
        vdir = os.path.join(output_dir, VALUE_SUBDIR)
        if isinstance(self.value_model, PreTrainedModel):
            self.value_model.save_pretrained(vdir)
        else:
            from safetensors.torch import save_file

            os.makedirs(vdir, exist_ok=True)
            sd = {k: v.detach().contiguous().clone() for k, v in self.value_model.state_dict().items()}
            save_file(sd, os.path.join(vdir, "model.safetensors"), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        with open(os.path.join(output_dir, "training_args.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        _load_weights(self.policy, resume_from_checkpoint)
        _load_weights(self.value_model, os.path.join(resume_from_checkpoint, VALUE_SUBDIR))

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        with open(os.path.join(folder, PPO_STATE_FILE), "w") as f:
            json.dump(self._ppo_state(), f)
        if self.atlas_backend is not None:
            self.atlas_backend.save(os.path.join(folder, CHECKPOINT_SUBDIR))

    def _ppo_state(self) -> dict[str, Any]:
        """What a resumed run needs beyond TRL's checkpoint: the KL coefficient, the rollout counter (seeds) and
        the minibatch shuffler (JSON, no pickle). The reference model is not saved: it is frozen and rebuilt from
        the model passed to the trainer."""
        return {
            "kl_ctl": self.kl_ctl.state_dict(),
            "rollouts": self.generator.num_calls,
            "shuffle_rng": self._shuffle.get_state().tolist(),
        }

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, PPO_STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.generator.num_calls = int(state["rollouts"])
            self._shuffle.set_state(torch.tensor(state["shuffle_rng"], dtype=torch.uint8))
        if self.atlas_backend is not None:
            self.atlas_backend.load(os.path.join(checkpoint, CHECKPOINT_SUBDIR))


_EXP_KEYS = ("logprobs", "values", "advantages", "returns")


def args_rows(trainer: AtlasPPOTrainer) -> int:
    """Samples per update across processes."""
    return trainer.args.rollout_batch_size * trainer.accelerator.num_processes


def _identity(rows: list) -> list:
    return rows


def _name(f: Any) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def _sync_context(accelerator: Any, model: nn.Module, last: bool) -> Any:
    """Gradients are all-reduced on the last micro-batch only (DeepSpeed handles accumulation itself)."""
    import contextlib

    from accelerate.utils import DistributedType

    if last or accelerator.distributed_type == DistributedType.DEEPSPEED:
        return contextlib.nullcontext()
    return accelerator.no_sync(model)


def _pad_floats(
    rows: list[list[float]], width: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:  # [b, width]
    out = torch.zeros((len(rows), width), dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out.to(device)


def _reward_tensor(out: Any, n: int, name: str) -> torch.Tensor:  # [n]
    if out is None or len(out) != n:
        raise ValueError(f"reward function {name} must return one number per completion ({n}), got {out!r}")
    vals = [float("nan") if v is None else float(v) for v in out]
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"reward function {name} returned None/NaN: every completion needs a score for PPO")
    return torch.tensor(vals, dtype=torch.float32)


def _load_weights(module: nn.Module, folder: str) -> None:
    """Load ``model.safetensors`` (or its shards) from ``folder`` into ``module`` (tied weights may be absent)."""
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
        sd = load_file(single)
    elif os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {k: v for s in shards for k, v in load_file(os.path.join(folder, s)).items()}
    else:
        raise ValueError(f"no model.safetensors in checkpoint folder {folder}")
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if unexpected:
        raise ValueError(f"checkpoint {folder} holds weights the model does not have: {unexpected[:5]}")
    tied = set(getattr(module, "_tied_weights_keys", None) or {})
    really_missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if really_missing:
        raise ValueError(f"checkpoint {folder} lacks weights: {really_missing[:5]}")
