"""Speculators: model-free (suffix index) and learned (draft heads)."""

from atlas_rl.speculators.base import Speculator, build_speculator, register_speculator, registered_speculators
from atlas_rl.speculators.suffix import SuffixConfig, SuffixSpeculator

__all__ = [
    "Speculator",
    "SuffixConfig",
    "SuffixSpeculator",
    "build_speculator",
    "register_speculator",
    "registered_speculators",
]
