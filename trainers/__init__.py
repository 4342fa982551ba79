"""TRL adapters (installed as ``atlas_rl.trainers``): ``generation_backend="atlas"`` for GRPO, RLOO and PPO."""

from .backend import AtlasRolloutBackend
from .config import AtlasArgs, AtlasGRPOConfig, AtlasRLOOConfig
from .grpo import AtlasGRPOTrainer
from .ppo import AtlasPPOConfig, AtlasPPOTrainer
from .rloo import AtlasRLOOTrainer

__all__ = [
    "AtlasArgs",
    "AtlasGRPOConfig",
    "AtlasGRPOTrainer",
    "AtlasPPOConfig",
    "AtlasPPOTrainer",
    "AtlasRLOOConfig",
    "AtlasRLOOTrainer",
    "AtlasRolloutBackend",
]
