"""One GRPO/RLOO run on the offline arithmetic task, writing a run directory and its report.

Shared by ``atlas-rl demo`` and ``recipes/grpo.py`` / ``recipes/rloo.py``.
"""

from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atlas_rl.argparsing import ConfigParser, one_line

logger = logging.getLogger(__name__)


@dataclass
class TaskRunConfig:
    """A run of the arithmetic GRPO/RLOO task (fields with help, checked in ``__post_init__``)."""

    algo: str = field(default="grpo", metadata={"help": "'grpo', 'rloo' or 'ppo' (one completion per prompt)."})
    model: str | None = field(default=None, metadata={"help": "Model dir/hub id; None = the embedded default."})
    tiny: bool = field(default=False, metadata={"help": "A tiny random model + byte tokenizer (tests, smoke runs)."})
    steps: int = field(default=5, metadata={"help": "Optimizer steps (one rollout batch each)."})
    prompts: int = field(default=4, metadata={"help": "Prompts per step (each a GRPO group)."})
    generations: int = field(default=4, metadata={"help": "Samples per prompt (num_generations)."})
    max_new_tokens: int = field(default=64, metadata={"help": "max_completion_length."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Policy learning rate.", "aliases": ["--lr"]})
    backend: str = field(default="atlas", metadata={"help": "'atlas', 'transformers' or 'vllm'."})
    speculators: str = field(default="auto", metadata={"help": "atlas_speculators ('auto', 'none', or a list)."})
    baseline_every: int = field(default=1, metadata={"help": "Paired no-speculation rollout every N steps (0 off)."})
    seed: int = field(default=0, metadata={"help": "Seed (data order, sampling, initialisation)."})
    run_dir: str = field(
        default="runs/demo",
        metadata={"help": "Where run.json, metrics.jsonl and reports go.", "aliases": ["--out"]},
    )
    extra: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "More AtlasGRPOConfig/AtlasRLOOConfig fields (a YAML mapping). The recipes also take them as "
            "flags or top-level YAML keys (e.g. --atlas_controller fixed), typed by the trainer config's parser."
        },
    )

    def __post_init__(self) -> None:
        if self.algo not in ("grpo", "rloo", "ppo"):
            raise ValueError(f"algo must be 'grpo', 'rloo' or 'ppo', got {self.algo!r}")
        for name in ("steps", "prompts", "generations", "max_new_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.generations < 2:
            raise ValueError("generations must be >= 2 (GRPO/RLOO compare samples within a group)")
        for name in ("temperature", "learning_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"{name} must be a number >= 0, got {v!r}")
        if self.model is not None and self.tiny:
            raise ValueError("give either a model path or --tiny, not both")


def _load(cfg: TaskRunConfig):
    from atlas_rl.models import load_target, tiny_llama, tiny_token_ids, tiny_tokenizer

    if cfg.tiny:
        tok = tiny_tokenizer()
        return tiny_llama(vocab_size=len(tok), hidden_size=64, seed=cfg.seed, **tiny_token_ids(tok)), tok, "tiny-llama"
    model, tok = load_target(cfg.model)
    return model, tok, cfg.model or "SmolLM2-135M-Instruct (embedded default)"


def run_task(cfg: TaskRunConfig, command: str | None = None) -> Path:
    """Train, record and report; returns the run directory."""
    from datasets import Dataset

    from atlas_rl.data.tasks import arithmetic_reward, arithmetic_tasks
    from atlas_rl.metrics.report import write_report

    from .config import AtlasGRPOConfig, AtlasRLOOConfig
    from .grpo import AtlasGRPOTrainer
    from .recorder import RunRecorder
    from .rloo import AtlasRLOOTrainer

    torch.manual_seed(cfg.seed)
    model, tok, model_name = _load(cfg)
    tasks = arithmetic_tasks(cfg.prompts * cfg.steps, seed=cfg.seed)
    ds = Dataset.from_list([{"prompt": t.messages(), "answer": t.answer} for t in tasks])

    def correct(completions, answer, **kwargs):
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return [arithmetic_reward(t, a) for t, a in zip(texts, answer)]

    run_dir = Path(cfg.run_dir)
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
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        common["ddp_backend"] = "gloo"  # several CPU processes (DDP or DeepSpeed): accelerate finds no backend alone
    common.update(cfg.extra)
    if cfg.algo == "grpo":
        args = AtlasGRPOConfig(**common)
        trainer_cls = AtlasGRPOTrainer
    elif cfg.algo == "ppo":
        from .ppo_task import ppo_args

        args, trainer_cls = ppo_args(cfg, common)
    else:
        common.setdefault("beta", 0.0)
        args = AtlasRLOOConfig(**common)
        trainer_cls = AtlasRLOOTrainer
    meta = {
        "name": run_dir.name,
        "model": model_name,
        "algo": cfg.algo,
        "task": "arithmetic word problems (atlas_rl.data.tasks), reward 1 for the right final answer",
        "prompts_per_step": cfg.prompts,
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
    }
    trainer = trainer_cls(
        model=model,
        reward_funcs=correct,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[RunRecorder(run_dir, meta)],
    )
    trainer.train()
    if trainer.atlas_backend is not None:
        trainer.atlas_backend.close()
    if trainer.accelerator.is_main_process:
        write_report(run_dir)
    return run_dir


def recipe_parser(algo: str, description: str) -> ConfigParser:
    """The parser of ``recipes/{algo}.py``: :class:`TaskRunConfig` fields from ``--config YAML``, ``--set
    KEY=VALUE`` (a YAML line, as the docs quote) and typed flags (``--learning_rate 5e-5``)."""
    parser = ConfigParser([TaskRunConfig], prog=f"recipes/{algo}.py", description=description)
    parser.set_defaults(algo=algo)
    return parser


def parse_recipe_args(algo: str, description: str, argv: list[str] | None = None) -> TaskRunConfig:
    """The run a recipe command line asks for. Keys that are not :class:`TaskRunConfig` fields (top-level YAML
    keys, ``--set``, flags) and the YAML ``extra`` mapping must be fields of the trainer config
    (``AtlasGRPOConfig`` / ``AtlasRLOOConfig``); they are typed by its parser and land in ``extra``. Every mistake
    is a one-line error with exit status 2."""
    from .config import AtlasGRPOConfig, AtlasRLOOConfig

    cfg, rest = recipe_parser(algo, description).parse(argv, remaining=True)
    trainer_cls = AtlasGRPOConfig if cfg.algo == "grpo" else AtlasRLOOConfig
    trainer_fields = {**cfg.extra, **rest}
    if trainer_fields:
        trainer = ConfigParser([trainer_cls], prog=f"recipes/{algo}.py")
        cfg.extra = trainer.typed(trainer_fields, known_as=f"TaskRunConfig or {trainer_cls.__name__}")
    return cfg


def recipe_main(algo: str, description: str, argv: list[str] | None = None) -> Path:
    """The body of ``recipes/grpo.py`` and ``recipes/rloo.py``: parse (:func:`parse_recipe_args`), train, report."""
    cfg = parse_recipe_args(algo, description, argv)
    try:
        return run_task(cfg, command=" ".join(shlex.quote(a) for a in sys.argv))
    except (FileNotFoundError, ValueError) as e:  # e.g. a model path that does not exist: one line, exit 2
        logger.debug("recipe failed", exc_info=True)
        sys.stderr.write(f"recipes/{algo}.py: error: {one_line(e)}\n")
        raise SystemExit(2) from None
