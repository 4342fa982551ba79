"""``AtlasGRPOTrainer``: TRL's GRPOTrainer with ``generation_backend="atlas"`` (see :mod:`.mixin`)."""

from __future__ import annotations

from trl import GRPOTrainer

from .config import AtlasGRPOConfig
from .mixin import AtlasTrainerMixin


class AtlasGRPOTrainer(AtlasTrainerMixin, GRPOTrainer):
    """Drop-in for ``trl.GRPOTrainer``: swap the two class names (``GRPOConfig`` -> ``AtlasGRPOConfig``) and
    rollouts run through the lossless speculative engine; everything else is TRL's."""

    def __init__(self, *args, **kwargs) -> None:
        targs = kwargs.get("args", args[2] if len(args) > 2 else None)
        if targs is not None and not isinstance(targs, AtlasGRPOConfig):
            raise ValueError(
                f"AtlasGRPOTrainer needs an AtlasGRPOConfig, got {type(targs).__name__}: replace GRPOConfig with "
                "AtlasGRPOConfig (same fields plus the atlas options)"
            )
        super().__init__(*args, **kwargs)
        self._atlas_init()
