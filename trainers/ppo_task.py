"""The PPO branch of :func:`atlas_rl.trainers.runner.run_task` (``atlas-rl demo --algo ppo``, ``recipes/ppo.py``):
turns the GRPO-shaped keyword arguments the runner builds into an :class:`AtlasPPOConfig`.

PPO rolls out one completion per prompt: a step takes ``prompts`` dataset rows in total over all processes
(``generations`` is unused), split into ``num_mini_batches`` minibatches; ``max_new_tokens`` becomes
``response_length``. Fields under ``extra`` (e.g. ``num_ppo_epochs``, ``kl_coef``)
reach the config as they are.
"""

from __future__ import annotations

import os
from typing import Any

from .ppo import AtlasPPOTrainer
from .ppo_config import AtlasPPOConfig

# keyword arguments of the runner that only GRPO/RLOO configs know
_GROUP_ONLY = ("num_generations", "shuffle_dataset", "max_completion_length", "beta")


def ppo_args(cfg: Any, common: dict[str, Any]) -> tuple[AtlasPPOConfig, type[AtlasPPOTrainer]]:
    """``(config, trainer class)`` for a :class:`TaskRunConfig` with ``algo="ppo"`` and the runner's kwargs."""
    kw = {k: v for k, v in common.items() if k not in _GROUP_ONLY}
    kw.setdefault("response_length", common.get("max_completion_length", cfg.max_new_tokens))
    if "per_device_train_batch_size" in cfg.extra:
        kw["per_device_train_batch_size"] = cfg.extra["per_device_train_batch_size"]
    else:
        split = int(os.environ.get("WORLD_SIZE", "1")) * kw.get("gradient_accumulation_steps", 1)
        split *= kw.get("num_mini_batches", 1)
        if cfg.prompts % split:
            raise ValueError(
                f"prompts={cfg.prompts} must be a multiple of processes x gradient_accumulation_steps x "
                f"num_mini_batches = {split} (each update rolls out `prompts` completions in total)"
            )
        kw["per_device_train_batch_size"] = cfg.prompts // split
    return AtlasPPOConfig(**kw), AtlasPPOTrainer
