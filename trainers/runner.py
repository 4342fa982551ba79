"""One GRPO/RLOO run on the offline arithmetic task, writing a run directory and its report.

Shared by ``atlas-rl demo`` and ``recipes/grpo.py`` / ``recipes/rloo.py``.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class TaskRunConfig:
    """A run of the arithmetic GRPO/RLOO task (fields with help, checked in ``__post_init__``)."""

    algo: str = field(default="grpo", metadata={"help": "'grpo' or 'rloo'."})
    model: str | None = field(default=None, metadata={"help": "Model dir/hub id; None = the embedded default."})
    tiny: bool = field(default=False, metadata={"help": "A tiny random model + byte tokenizer (tests, smoke runs)."})
    steps: int = field(default=8, metadata={"help": "Optimizer steps (one rollout batch each)."})
    prompts: int = field(default=4, metadata={"help": "Prompts per step (each a GRPO group)."})
    generations: int = field(default=4, metadata={"help": "Samples per prompt (num_generations)."})
    max_new_tokens: int = field(default=96, metadata={"help": "max_completion_length."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Policy learning rate."})
    backend: str = field(default="atlas", metadata={"help": "'atlas', 'transformers' or 'vllm'."})
    speculators: str = field(default="auto", metadata={"help": "atlas_speculators ('auto', 'none', or a list)."})
    baseline_every: int = field(default=1, metadata={"help": "Paired no-speculation rollout every N steps (0 off)."})
    seed: int = field(default=0, metadata={"help": "Seed (data order, sampling, initialisation)."})
    level: str = field(
        default="easy",
        metadata={"help": "Arithmetic problems: 'easy' (one-step sums/differences of small numbers) or 'mixed'."},
    )
    format_weight: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the format reward (answer on its own line as '#### N') beside the correctness "
            "reward (weight 1); 0 = correctness only."
        },
    )
    run_dir: str = field(default="runs/demo", metadata={"help": "Where run.json, metrics.jsonl and reports go."})
    extra: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "More AtlasGRPOConfig/AtlasRLOOConfig fields."}
    )

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "rloo"):
            raise ValueError(f"algo must be 'grpo' or 'rloo', got {self.algo!r}")
        for name in ("steps", "prompts", "generations", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.generations < 2:
            raise ValueError("generations must be >= 2 (GRPO/RLOO compare samples within a group)")
        for name in ("temperature", "learning_rate"):
            v = getattr(self, name)
            if isinstance(v, str):  # YAML 1.1 reads "5e-5" (no dot) as a string
                try:
                    v = float(v)
                except ValueError:
                    raise ValueError(f"{name} must be a number, got {v!r}") from None
                setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.model is not None and self.tiny:
            raise ValueError("give either a model path or --tiny, not both")
        self._check_task()

    def _check_task(self) -> None:
        if self.level not in ("easy", "mixed"):
            raise ValueError(f"level must be 'easy' or 'mixed', got {self.level!r}")
        w = self.format_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"format_weight must be a finite number >= 0, got {w!r}")


def _load(cfg: TaskRunConfig):
    from atlas_rl.models import load_target, tiny_llama, tiny_token_ids, tiny_tokenizer

    if cfg.tiny:
        tok = tiny_tokenizer()
        return tiny_llama(vocab_size=len(tok), hidden_size=64, seed=cfg.seed, **tiny_token_ids(tok)), tok, "tiny-llama"
    model, tok = load_target(cfg.model)
    return model, tok, cfg.model or "SmolLM2-135M-Instruct (embedded default)"


# Seconds per completion token of one row (rollout, paired baseline, loss and backward) on the 2-core CPU with the
# embedded model, measured by `atlas-rl demo` (docs/results/demo.md): how the demo predicts its duration.
SECONDS_PER_ROW_TOKEN = 0.065


def _rewards(cfg: TaskRunConfig) -> list:
    """The task's reward functions (TRL signature): correctness, and the format reward when it has a weight."""
    from atlas_rl.data.tasks import arithmetic_reward, format_reward

    def _texts(completions):
        return [c if isinstance(c, str) else c[0]["content"] for c in completions]

    def correct(completions, answer, **kwargs):
        return [arithmetic_reward(t, a) for t, a in zip(_texts(completions), answer)]

    def formatted(completions, **kwargs):
        return [format_reward(t) for t in _texts(completions)]

    return [correct, formatted] if cfg.format_weight > 0 else [correct]


def _trainer_args(cfg: TaskRunConfig, run_dir: Path):
    from .config import AtlasGRPOConfig, AtlasRLOOConfig

    common = dict(
        output_dir=str(run_dir / "trainer"),
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        report_to="none",
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.prompts * cfg.generations,
        num_generations=cfg.generations,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        learning_rate=cfg.learning_rate,
        logging_steps=1,
        save_strategy="no",
        seed=cfg.seed,
        generation_backend=cfg.backend,
        atlas_speculators=cfg.speculators,
        atlas_baseline_every=cfg.baseline_every if cfg.backend == "atlas" else 0,
        shuffle_dataset=False,
    )
    if cfg.format_weight > 0:
        common["reward_weights"] = [1.0, float(cfg.format_weight)]
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        common["ddp_backend"] = "gloo"  # several CPU processes (DDP or DeepSpeed): accelerate finds no backend alone
    common.update(cfg.extra)
    if cfg.algo == "grpo":
        return AtlasGRPOConfig(**common)
    common.setdefault("beta", 0.0)
    return AtlasRLOOConfig(**common)


def expected_seconds(cfg: TaskRunConfig) -> float | None:
    """The run's expected wall time on the 2-core CPU with the embedded model (None for other models)."""
    if cfg.tiny or cfg.model is not None:
        return None
    per_row_token = SECONDS_PER_ROW_TOKEN * (1.0 if cfg.baseline_every else 0.75)  # the baseline: ~1/4 of a step
    return 20.0 + cfg.steps * cfg.prompts * cfg.generations * cfg.max_new_tokens * per_row_token


def run_task(cfg: TaskRunConfig, command: str | None = None) -> Path:
    """Train, record and report; returns the run directory."""
    from datasets import Dataset

    from atlas_rl.data.tasks import arithmetic_tasks
    from atlas_rl.metrics.report import write_report

    from .grpo import AtlasGRPOTrainer
    from .recorder import RunRecorder
    from .rloo import AtlasRLOOTrainer

    torch.manual_seed(cfg.seed)
    eta = expected_seconds(cfg)
    if eta is not None:
        logger.info("expected duration on a 2-core CPU: about %.0f min (%d steps)", eta / 60, cfg.steps)
    model, tok, model_name = _load(cfg)
    tasks = arithmetic_tasks(cfg.prompts * cfg.steps, seed=cfg.seed, level=cfg.level)
    ds = Dataset.from_list([{"prompt": t.messages(), "answer": t.answer} for t in tasks])
    run_dir = Path(cfg.run_dir)
    meta = {
        "name": run_dir.name,
        "model": model_name,
        "algo": cfg.algo,
        "task": f"arithmetic word problems ({cfg.level}, atlas_rl.data.tasks): reward 1 for the right final answer"
        + (f" + {cfg.format_weight:g} for the answer on its own line ('#### N')" if cfg.format_weight > 0 else ""),
        "prompts_per_step": cfg.prompts,
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
    }
    recorder = RunRecorder(run_dir, meta)
    trainer_cls = AtlasGRPOTrainer if cfg.algo == "grpo" else AtlasRLOOTrainer
    trainer = trainer_cls(
        model=model,
        reward_funcs=_rewards(cfg),
        args=_trainer_args(cfg, run_dir),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[recorder],
    )
    recorder.backend = trainer.atlas_backend
    try:
        trainer.train()  # closes the atlas backend however it ends
    finally:
        if trainer.atlas_backend is not None:
            trainer.atlas_backend.close()  # idempotent; also covers a trainer class without that guarantee
    if trainer.accelerator.is_main_process:
        write_report(run_dir)
    return run_dir


def recipe_main(algo: str, description: str, argv: list[str] | None = None) -> Path:
    """The body of ``recipes/grpo.py`` and ``recipes/rloo.py``: ``--config YAML`` plus ``--set key=value``."""
    import argparse

    import yaml

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML with TaskRunConfig fields (+ 'extra': trainer fields)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a YAML field")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        fields = yaml.safe_load(f) or {}
    for item in args.set:
        key, _, value = item.partition("=")
        fields[key] = yaml.safe_load(value)
    fields.setdefault("algo", algo)
    return run_task(TaskRunConfig(**fields), command=" ".join(shlex.quote(a) for a in sys.argv))
