"""``AtlasRLOOTrainer``: TRL's RLOOTrainer with ``generation_backend="atlas"`` (see :mod:`.mixin`)."""

from __future__ import annotations

from trl import RLOOTrainer

from .config import AtlasRLOOConfig
from .mixin import AtlasTrainerMixin


class AtlasRLOOTrainer(AtlasTrainerMixin, RLOOTrainer):
    """Drop-in for ``trl.RLOOTrainer``: swap the two class names (``RLOOConfig`` -> ``AtlasRLOOConfig``)."""

    _atlas_returns_logprobs = False

    def __init__(self, *args, **kwargs) -> None:
        targs = kwargs.get("args", args[2] if len(args) > 2 else None)
        if targs is not None and not isinstance(targs, AtlasRLOOConfig):
            raise ValueError(
                f"AtlasRLOOTrainer needs an AtlasRLOOConfig, got {type(targs).__name__}: replace RLOOConfig with "
                "AtlasRLOOConfig (same fields plus the atlas options)"
            )
        super().__init__(*args, **kwargs)
        self._atlas_init()
