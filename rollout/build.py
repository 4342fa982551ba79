"""Building an engine with speculators chosen by name: the one helper behind the trainer backend and the benches.

Names: ``"static"`` (a draft head trained once: a given checkpoint, else the one shipped for the target, see
:mod:`atlas_rl.speculators.defaults`), ``"adaptive"`` (the light head an RL run retrains, warm-started from the
static head when there is one), ``"suffix"`` (the model-free suffix index). ``"auto"`` is all three (static only
when a head is given or ships), ``"none"`` plain decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atlas_rl.config import EngineConfig
from atlas_rl.controller import BestOfController
from atlas_rl.controller.base import Controller
from atlas_rl.speculators.base import Speculator
from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.speculators.suffix import SuffixSpeculator

from .engine import RolloutEngine

logger = logging.getLogger(__name__)

__all__ = ["SPECULATOR_NAMES", "SpeculatorSet", "build_engine", "build_speculators", "speculator_names"]

SPECULATOR_NAMES = ("static", "adaptive", "suffix")


@dataclass
class SpeculatorSet:
    """The speculators built for a target, in the order given, with the draft heads behind them."""

    speculators: list[Speculator] = field(default_factory=list)
    static_head: DraftHead | None = None
    adaptive_head: DraftHead | None = None

    def get(self, name: str) -> Speculator | None:
        return next((s for s in self.speculators if s.name == name), None)


def _split(spec: str | Iterable[str]) -> list[str]:
    names = spec.split(",") if isinstance(spec, str) else [str(s) for s in spec]
    return [n.strip() for n in names if n.strip()]


def speculator_names(spec: str | Iterable[str]) -> list[str]:
    """``"static,suffix"`` / ``["static", "suffix"]`` / ``"auto"`` / ``"none"`` -> checked, ordered names."""
    names = _split(spec)
    if names in (["none"], []):
        return []
    if names == ["auto"]:
        return list(SPECULATOR_NAMES)
    unknown = [n for n in names if n not in SPECULATOR_NAMES]
    if unknown:
        raise ValueError(f"unknown speculator names {unknown}; choose from {list(SPECULATOR_NAMES)}, 'auto' or 'none'")
    return [n for n in SPECULATOR_NAMES if n in names]  # one canonical order: BestOfController breaks ties by it


def load_static_head(
    model: torch.nn.Module, static_head: str | Path | DraftHead | None, required: bool
) -> tuple[DraftHead | None, float | None]:
    """The given head (a checkpoint path or a loaded head), else the one shipped for ``model``, else None; with
    the shipped head's held-out per-token acceptance from its card (None for a given head).

    ``required``: no head is an error that says how to get one (the user named ``static`` explicitly)."""
    p = next(model.parameters())
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32  # heads draft and train in fp32 (or fp64)
    if isinstance(static_head, DraftHead):
        return static_head, None
    if static_head:
        return DraftHead.from_pretrained(static_head, target=model).to(device=p.device, dtype=dtype), None
    from atlas_rl.speculators.defaults import load_static_speculator

    spec = load_static_speculator(model, dtype=dtype)  # loaded in the head's dtype: a bf16 target's would round it
    if spec is not None:
        return spec.head.to(device=p.device, dtype=dtype), spec.expected_acceptance
    if required:
        raise ValueError(
            "speculators name 'static' but no static draft head ships for this model: train one with "
            "recipes/train_static_speculator.py and pass its path (atlas_static_head=PATH, --static-head PATH)"
        )
    logger.info("no static draft head for this model; the adaptive head starts from scratch")
    return None, None


def _adaptive_head(model: torch.nn.Module, static: DraftHead | None, seed: int) -> DraftHead:
    from atlas_rl.speculators.adaptive import AdaptiveHeadConfig, build_adaptive_head

    p = next(model.parameters())
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    # the static head's exact copy when there is one, else a light head (AdaptiveHeadConfig's defaults)
    return build_adaptive_head(model, static=static, config=AdaptiveHeadConfig(), dtype=dtype, seed=seed).to(p.device)


def build_speculators(
    model: torch.nn.Module,
    names: str | Iterable[str] = "auto",
    static_head: str | Path | DraftHead | None = None,
    seed: int = 0,
    static_prior: bool = True,
    adaptive_head: DraftHead | None = None,
) -> SpeculatorSet:
    """Fresh speculators for ``model`` by name (module docstring).

    Args:
        names: ``"auto"``, ``"none"`` or names among ``static``, ``adaptive``, ``suffix`` (comma string or list).
        static_head: a static head checkpoint (or head) instead of the shipped one.
        seed: the static head drafts with ``seed``, the adaptive head with ``seed + 1``.
        static_prior: give the shipped static head its card's held-out acceptance as the controller's prior.
        adaptive_head: an adaptive head to draft with (e.g. one an RL run keeps training) instead of a new one.
    """
    wanted = speculator_names(names)
    explicit = [] if _split(names) == ["auto"] else wanted  # names the user gave (static then must exist)
    out = SpeculatorSet()
    prior = None
    if "static" in wanted or ("adaptive" in wanted and adaptive_head is None):
        out.static_head, prior = load_static_head(model, static_head, required="static" in explicit)
    for name in wanted:
        if name == "static" and out.static_head is not None:
            out.speculators.append(
                DraftHeadSpeculator(
                    out.static_head, name="static", seed=seed, expected_acceptance=prior if static_prior else None
                )
            )
        elif name == "adaptive":
            out.adaptive_head = adaptive_head or _adaptive_head(model, out.static_head, seed)
            out.speculators.append(DraftHeadSpeculator(out.adaptive_head, name="adaptive", seed=seed + 1))
        elif name == "suffix":
            out.speculators.append(SuffixSpeculator())
    return out


def build_engine(
    model: torch.nn.Module,
    speculators: Sequence[Speculator] = (),
    k: int | None = None,
    controller: str | Controller | None = None,
    eos_token_ids: Iterable[int] | None = None,
) -> RolloutEngine:
    """An engine over ``speculators`` with the controller the callers of this package use.

    Args:
        k: the longest draft (None: the auto controller's default).
        controller: a :class:`Controller`, or ``"auto"`` / ``"fixed"`` / None (None: ``"fixed"`` when ``k`` is
            given, else ``"auto"``). Fixed mode drafts exactly ``k`` tokens per row: one speculator drafts, or
            with several the draft with the largest expected accepted length is verified (``BestOfController``).
        eos_token_ids: stop tokens (default: the model's generation config).
    """
    specs = list(speculators)
    if controller is not None and not isinstance(controller, str):
        return RolloutEngine(model, speculators=specs, controller=controller, eos_token_ids=eos_token_ids)
    if controller is None and k is None:
        return RolloutEngine(model, speculators=specs, eos_token_ids=eos_token_ids)
    mode = controller or "fixed"
    k_eff = 0 if (mode == "fixed" and not specs) else k
    ctrl = BestOfController(k) if mode == "fixed" and len(specs) > 1 and k is not None else None
    cfg = EngineConfig(num_speculative_tokens=k_eff, controller=mode)
    return RolloutEngine(model, speculators=specs, config=cfg, controller=ctrl, eos_token_ids=eos_token_ids)
