"""Policy specialisation: a GRPO run (:class:`~atlas_rl.trainers.AtlasGRPOTrainer`, the atlas backend with its
production defaults) whose reward reshapes the policy's outputs into one rigid ticket format, and after every
optimizer step the static and the adaptive head measured on the current policy's own rollouts.

Prompts: ticket requests with one few-shot turn (:mod:`.traffic`): the format is known but loosely followed at
T=1. Reward (:func:`ticket_reward`): a share for each rule of the format (opening line, the component and
severity from their lists, a quoted title, exactly two repro steps, the closing line) minus a penalty for text
around the ticket. After each step (a :class:`~transformers.TrainerCallback`): ``probe_prompts`` held-out
requests rolled out by the current policy with the static head alone and the adaptive head alone (fixed k, the
run's temperature; the heads the backend serves), τ of each; the backend's retraining seconds against the step's
wall time (its budget: ``atlas_adaptive_train_fraction`` of the RL step; the probe runs outside the step:
``AtlasRolloutBackend.outside_step``).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import torch

from atlas_rl.rollout.build import build_engine, build_speculators
from atlas_rl.types import SamplingParams

from .tau_check import measured_tau, paired_ratio, summed_tau
from .traffic import ticket_messages, ticket_prompts

logger = logging.getLogger(__name__)

__all__ = ["run_specialise", "ticket_reward"]

_RULES = (
    re.compile(r"^@ticket\n"),
    re.compile(r"^  component: (parser|scheduler|storage|ui)$", re.M),
    re.compile(r"^  severity: (low|medium|high)$", re.M),
    re.compile(r'^  title: "[^"\n]{3,60}"$', re.M),
    re.compile(r"^  repro:\n    - [^\n]+\n    - [^\n]+\n@end", re.M),
    re.compile(r"\n@end\s*$"),
)


def ticket_reward(completions: list, **_: Any) -> list[float]:
    """TRL reward function: the share of format rules a completion satisfies, minus 0.5 per 100 characters
    around the ticket (text before ``@ticket`` or after ``@end``)."""
    out = []
    for c in completions:
        text = c[0]["content"] if isinstance(c, list) else str(c)
        score = sum(bool(r.search(text)) for r in _RULES) / len(_RULES)
        start, end = text.find("@ticket"), text.rfind("@end")
        extra = len(text) if start < 0 else start + (len(text) - end - 4 if end >= 0 else 0)
        out.append(score - 0.005 * max(0, extra))
    return out


def _dataset(tokenizer: Any, count: int, seed: int) -> Any:
    import random

    from datasets import Dataset

    rng = random.Random(f"specialise:{seed}")
    rows = []
    for _ in range(count):
        msgs = ticket_messages(rng)
        rows.append({"prompt": msgs[:1] + msgs[3:]})  # the system prompt, one few-shot turn, the new report
    return Dataset.from_list(rows)


def _probe(model: torch.nn.Module, backend: Any, prompts: list[list[int]], sp: SamplingParams, opts: Any) -> dict:
    """τ of the static head alone and the adaptive head alone on the current policy's own rollouts, in batches of
    ``probe_rows`` (the same seeds for both heads), and the paired bootstrap interval of their ratio."""
    heads = {"static": {"static_head": backend.static_head}, "adaptive": {"adaptive_head": backend.adaptive_head}}
    names = tuple(n for n, kw in heads.items() if next(iter(kw.values())) is not None)  # a head may be missing

    def make(name: str) -> Any:
        # the same random stream for both heads (build_speculators gives the adaptive one seed + 1)
        specs = build_speculators(model, [name], seed=-1 if name == "adaptive" else 0, **heads[name]).speculators
        return build_engine(model, specs, k=opts.k, controller="fixed", eos_token_ids=backend.eos_token_ids)

    m = measured_tau(make, names, prompts, opts.probe_rows, sp)
    out: dict[str, Any] = {n: summed_tau(m[n]) for n in names}
    if len(names) == 2:
        out["check"] = paired_ratio(m["adaptive"], m["static"], seed=opts.seed)
    return out


def run_specialise(model: torch.nn.Module, tokenizer: Any, opts: Any, out_dir: str) -> list[dict[str, Any]]:
    """The GRPO run (module docstring); one record per optimizer step."""
    from transformers import TrainerCallback

    from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer

    probes = ticket_prompts(tokenizer, opts.probe_prompts, seed=f"probe:{opts.seed}")
    sp = SamplingParams(temperature=1.0, max_new_tokens=opts.max_new_tokens, seed=opts.seed)
    records: list[dict[str, Any]] = []

    class Probe(TrainerCallback):
        t_step = 0.0

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
            Probe.t_step = time.perf_counter()
            return control

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001 - TrainerCallback signature
            step_s = time.perf_counter() - Probe.t_step
            b = trainer.atlas_backend
            m = b.metrics()
            with b.outside_step():  # the probe is not part of the RL step the retraining budget is a share of
                tau = _probe(model, b, probes, sp, opts)
            rec = {"step": int(state.global_step), "step_s": step_s, "tau": tau,
                   "train_s": m.get("atlas/speculator_train_s", 0.0), "rollout_s": m.get("atlas/rollout_s", 0.0),
                   "default_tau": m.get("atlas/mean_acceptance_length"),
                   "reward": None}  # fmt: skip
            records.append(rec)
            logger.info("specialise step %d: %s", rec["step"], rec)
            Probe.t_step = time.perf_counter()
            return control

    cfg = AtlasGRPOConfig(
        output_dir=f"{out_dir}/specialise_run", use_cpu=True, bf16=False, report_to="none",
        max_steps=opts.policy_steps, learning_rate=opts.policy_lr, per_device_train_batch_size=16,
        num_generations=4, max_completion_length=opts.max_new_tokens, logging_steps=1, save_strategy="no",
        seed=opts.seed, generation_backend="atlas",
    )  # fmt: skip
    trainer = AtlasGRPOTrainer(model=model, reward_funcs=ticket_reward, args=cfg,
                               train_dataset=_dataset(tokenizer, 64, opts.seed), processing_class=tokenizer,
                               callbacks=[Probe()])  # fmt: skip
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    for rec, r in zip(records, rewards):
        rec["reward"] = r
    return records
