"""One GRPO/RLOO/PPO run on the offline arithmetic task, writing a run directory and its report.

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

from atlas_rl.argparsing import ConfigParser, one_line

logger = logging.getLogger(__name__)


@dataclass
class TaskRunConfig:
    """A run of the arithmetic GRPO/RLOO task (fields with help, checked in ``__post_init__``)."""

    algo: str = field(default="grpo", metadata={"help": "'grpo', 'rloo' or 'ppo' (one completion per prompt)."})
    model: str | None = field(default=None, metadata={"help": "Model dir/hub id; None = the embedded default."})
    tiny: bool = field(default=False, metadata={"help": "A tiny random model + byte tokenizer (tests, smoke runs)."})
    steps: int = field(default=8, metadata={"help": "Optimizer steps (one rollout batch each)."})
    prompts: int = field(default=4, metadata={"help": "Prompts per step (each a GRPO group)."})
    generations: int = field(default=4, metadata={"help": "Samples per prompt (num_generations)."})
    max_new_tokens: int = field(default=96, metadata={"help": "max_completion_length."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Policy learning rate.", "aliases": ["--lr"]})
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


def _trainer_args(cfg: TaskRunConfig, run_dir: Path) -> tuple[Any, type]:
    """``(trainer config, trainer class)`` of the run."""
    from .config import AtlasGRPOConfig, AtlasRLOOConfig
    from .grpo import AtlasGRPOTrainer
    from .rloo import AtlasRLOOTrainer

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
        return AtlasGRPOConfig(**common), AtlasGRPOTrainer
    if cfg.algo == "ppo":
        from .ppo_task import ppo_args

        return ppo_args(cfg, common)
    common.setdefault("beta", 0.0)
    return AtlasRLOOConfig(**common), AtlasRLOOTrainer


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

    from .recorder import RunRecorder

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
    args, trainer_cls = _trainer_args(cfg, run_dir)
    trainer = trainer_cls(
        model=model,
        reward_funcs=_rewards(cfg),
        args=args,
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


def recipe_parser(algo: str, description: str) -> ConfigParser:
    """The parser of ``recipes/{algo}.py``: :class:`TaskRunConfig` fields from ``--config YAML``, ``--set
    KEY=VALUE`` (a YAML line, as the docs quote) and typed flags (``--learning_rate 5e-5``)."""
    parser = ConfigParser([TaskRunConfig], prog=f"recipes/{algo}.py", description=description)
    parser.set_defaults(algo=algo)
    return parser


def parse_recipe_args(algo: str, description: str, argv: list[str] | None = None) -> TaskRunConfig:
    """The run a recipe command line asks for. Keys that are not :class:`TaskRunConfig` fields (top-level YAML
    keys, ``--set``, flags) and the YAML ``extra`` mapping must be fields of the trainer config
    (``AtlasGRPOConfig`` / ``AtlasRLOOConfig`` / ``AtlasPPOConfig``); they are typed by its parser and land in
    ``extra``. Every mistake is a one-line error with exit status 2."""
    from .config import AtlasGRPOConfig, AtlasRLOOConfig
    from .ppo_config import AtlasPPOConfig

    cfg, rest = recipe_parser(algo, description).parse(argv, remaining=True)
    trainer_cls = {"grpo": AtlasGRPOConfig, "ppo": AtlasPPOConfig}.get(cfg.algo, AtlasRLOOConfig)
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
