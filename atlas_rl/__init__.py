"""atlas-rl: lossless speculative rollouts for RL fine-tuning, with speculators that keep learning."""

from atlas_rl.types import Draft, RolloutBatch, SamplingParams, SpecStats

__version__ = "0.1.0"
__all__ = ["Draft", "RolloutBatch", "SamplingParams", "SpecStats", "__version__"]
