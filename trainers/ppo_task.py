"""The PPO branch of :func:`atlas_rl.trainers.runner.run_task` (``atlas-rl demo --algo ppo``, ``recipes/ppo.py``):
turns the GRPO-shaped keyword arguments the runner builds into an :class:`AtlasPPOConfig`.

PPO rolls out one completion per prompt: a step takes ``prompts`` dataset rows (``generations`` is unused), and
``max_new_tokens`` becomes ``response_length``. Fields under ``extra`` (e.g. ``num_ppo_epochs``, ``kl_coef``)
reach the config as they are.
"""

from __future__ import annotations

from typing import Any

from .ppo import AtlasPPOTrainer
from .ppo_config import AtlasPPOConfig

# keyword arguments of the runner that only GRPO/RLOO configs know
_GROUP_ONLY = ("num_generations", "shuffle_dataset", "max_completion_length", "beta")


def ppo_args(cfg: Any, common: dict[str, Any]) -> tuple[AtlasPPOConfig, type[AtlasPPOTrainer]]:
    """``(config, trainer class)`` for a :class:`TaskRunConfig` with ``algo="ppo"`` and the runner's kwargs."""
    kw = {k: v for k, v in common.items() if k not in _GROUP_ONLY}
    kw.setdefault("response_length", common.get("max_completion_length", cfg.max_new_tokens))
    kw["per_device_train_batch_size"] = cfg.extra.get("per_device_train_batch_size", cfg.prompts)
    return AtlasPPOConfig(**kw), AtlasPPOTrainer
