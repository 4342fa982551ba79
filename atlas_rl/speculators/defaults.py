"""The speculators a model gets by default, including the static draft head shipped inside the package.

Shipped heads live in ``atlas_rl/data/speculators/<name>/`` (the EAGLE-3 directory vLLM loads: ``config.json``,
``model.safetensors``, and the card ``atlas_card.json``). A head applies to a target when the target's
:func:`~atlas_rl.speculators.draft_head.target_fingerprint` (architecture, layers, hidden size, vocabulary) equals
the one the head was trained for: the embedded default SmolLM2-135M-Instruct — and the policies an RL run derives
from it by fine-tuning, which keep its shapes — load ``smollm2-135m-instruct-eagle3/`` automatically. Other models
get no static head (logged at debug level) and fall back to the model-free suffix speculator.

Reproduce the shipped head with ``recipes/train_static_speculator.py`` (the exact command is in its card).
"""

from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import torch
from torch import nn

from atlas_rl.speculators.base import Speculator
from atlas_rl.speculators.draft_head import DraftHead, target_fingerprint
from atlas_rl.speculators.draft_head_io import CONFIG_FILE
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.speculators.suffix import SuffixSpeculator

logger = logging.getLogger(__name__)

__all__ = ["default_speculators", "load_static_speculator", "shipped_static_heads", "static_head_path"]


def shipped_static_heads() -> list[Path]:
    """The draft-head directories shipped in the package (``atlas_rl/data/speculators/*/config.json``), sorted."""
    folder = Path(str(files("atlas_rl.data"))) / "speculators"
    return sorted(p.parent for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []


def _trained_for(path: Path) -> str | None:
    """The target fingerprint a head directory was trained for (from its config), or None for an unreadable one."""
    import json

    try:
        return str(json.loads((path / CONFIG_FILE).read_text()).get("atlas", {}).get("target_name") or "") or None
    except (OSError, ValueError, AttributeError) as e:  # a damaged shipped head must not break model loading
        logger.warning("skipping unreadable shipped draft head %s: %s", path, e)
        return None


def static_head_path(model: nn.Module) -> Path | None:
    """The shipped static head trained for ``model``'s fingerprint, or None when there is none."""
    fp = target_fingerprint(model)
    for path in shipped_static_heads():
        if _trained_for(path) == fp:
            return path
    return None


def load_static_speculator(
    model: nn.Module, name: str = "static", dtype: torch.dtype | None = None
) -> DraftHeadSpeculator | None:
    """The shipped static draft head for ``model`` as a speculator, or None when none was trained for it.

    Args:
        model: the target (its fingerprint selects the checkpoint).
        name: the speculator's name in stats and plans.
        dtype: the head's dtype (default: the target's parameter dtype).
    """
    path = static_head_path(model)
    if path is None:
        logger.debug(
            "no shipped static draft head for target %s (shipped: %s)",
            target_fingerprint(model),
            [p.name for p in shipped_static_heads()],
        )
        return None
    p = next(model.parameters())
    head = DraftHead.from_pretrained(path, target=model, dtype=dtype or p.dtype).to(p.device)
    head.eval()
    logger.info("loaded the shipped static draft head %s for %s", path.name, target_fingerprint(model))
    return DraftHeadSpeculator(head, name=name, expected_acceptance=card_acceptance(DraftHead.read_card(path)))


def card_acceptance(card: dict, temperature: str = "T=1") -> float | None:
    """Per-token acceptance of a draft head measured on held-out prompts, from its card: accepted draft tokens
    over *observed* ones (a token is observed when every token before it was accepted), or None if the card
    has no such figure. ``accepted_per_pos[j]`` is the share of drafts whose token j was accepted."""
    try:
        per_pos = [float(x) for x in card["held_out"][temperature]["static"]["accepted_per_pos"]]
    except (KeyError, TypeError, ValueError):
        return None
    if not per_pos:
        return None
    return min(0.95, max(0.01, sum(per_pos) / (1.0 + sum(per_pos[:-1]))))


def default_speculators(model: nn.Module) -> list[Speculator]:
    """The default speculators for ``model``: the shipped static head when one fits it, then the suffix index."""
    static = load_static_speculator(model)
    return ([static] if static is not None else []) + [SuffixSpeculator()]
