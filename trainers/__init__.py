"""TRL adapters (installed as ``atlas_rl.trainers``): ``generation_backend="atlas"`` for GRPO and RLOO."""

from .backend import AtlasRolloutBackend
from .config import AtlasArgs, AtlasGRPOConfig, AtlasRLOOConfig
from .grpo import AtlasGRPOTrainer
from .rloo import AtlasRLOOTrainer

__all__ = [
    "AtlasArgs",
    "AtlasGRPOConfig",
    "AtlasGRPOTrainer",
    "AtlasRLOOConfig",
    "AtlasRLOOTrainer",
    "AtlasRolloutBackend",
]
