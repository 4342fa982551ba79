"""Rollout engines (installed as ``atlas_rl.rollout``)."""

from atlas_rl.types import RolloutBatch

from .engine import SUPPORTED_MODEL_TYPES, RolloutEngine, check_model_supported
from .kv_cache import SlotKVCache

__all__ = ["SUPPORTED_MODEL_TYPES", "RolloutBatch", "RolloutEngine", "SlotKVCache", "check_model_supported"]
