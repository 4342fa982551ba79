"""Stage 4 of the static speculator: held-out evaluation through the real engine.

Mean acceptance length (emitted tokens per verification forward of a sequence) with ``FixedController(k)`` on
held-out prompts at each temperature, for the static head and the baselines (``"suffix"``:
:class:`~atlas_rl.speculators.SuffixSpeculator`; ``"none"``: plain decoding, τ = 1 by definition), plus whether
greedy output with the head is token-identical to plain decoding.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.static_config import BASELINES
from atlas_rl.types import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["evaluate_acceptance"]


def evaluate_acceptance(
    model: torch.nn.Module,
    head: DraftHead | None,
    prompts: Sequence[Sequence[int]],
    k: int = 4,
    temperatures: Sequence[float] = (0.0, 1.0),
    max_new_tokens: int = 128,
    baselines: Sequence[str] = BASELINES,
    seed: int = 1234,
    none_temperatures: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean acceptance length through the real engine with ``FixedController(k)``, per temperature and speculator.

    Returns ``{"T=<t>": {"<name>": {"mean_acceptance_length", "acceptance_rate", "accepted_per_pos",
    "completion_tokens", "tokens_per_s", "wall_s"}, ...}, ..., "greedy_identical_rows": "a/b" (head vs none at
    T=0, when both ran), "completions": {"T=<t>": {name: [[ids], ...]}}}``. ``head`` None evaluates only the
    baselines; ``none_temperatures`` (None: all) restricts the plain-decoding baseline to those temperatures.
    """
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    names = (["static"] if head is not None else []) + [b for b in BASELINES if b in baselines]
    out: dict[str, Any] = {"k": k, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "completions": {}}
    plist = [list(p) for p in prompts]
    for t in temperatures:
        key = f"T={t:g}"
        out[key] = {}
        out["completions"][key] = {}
        sp = SamplingParams(temperature=t, max_new_tokens=max_new_tokens, seed=None if t == 0 else seed)
        for name in names:
            if name == "none" and none_temperatures is not None and t not in none_temperatures:
                continue
            out[key][name], out["completions"][key][name] = _run_one(model, name, head, plist, sp, k, seed, progress)
    greedy = out["completions"].get("T=0", {})
    if "static" in greedy and "none" in greedy:
        same = sum(a == b for a, b in zip(greedy["static"], greedy["none"]))
        out["greedy_identical_rows"] = f"{same}/{len(plist)}"
    return out


def _speculators(name: str, head: DraftHead | None, seed: int) -> list[Any]:
    """The speculators of one evaluated configuration (``"none"``: plain decoding, no speculator)."""
    from atlas_rl.speculators import SuffixSpeculator
    from atlas_rl.speculators.head_speculator import DraftHeadSpeculator

    if name == "static":
        return [DraftHeadSpeculator(head, name="static", seed=seed)]
    if name == "suffix":
        return [SuffixSpeculator()]
    return []


def _run_one(
    model: torch.nn.Module,
    name: str,
    head: DraftHead | None,
    prompts: list[list[int]],
    sampling: SamplingParams,
    k: int,
    seed: int,
    progress: bool,
) -> tuple[dict[str, Any], list[list[int]]]:
    """One engine run of configuration ``name``: ``(figures, completion ids)``."""
    from atlas_rl.config import EngineConfig
    from atlas_rl.controller import FixedController
    from atlas_rl.rollout import RolloutEngine

    specs = _speculators(name, head, seed)
    engine = RolloutEngine(
        model, speculators=specs, config=EngineConfig(progress=progress), controller=FixedController(k if specs else 0)
    )
    try:
        batch = engine.generate(prompts, sampling)
    finally:
        engine.release()
    st = batch.stats
    logger.info(
        "held-out T=%g %-6s tau %.3f (%d tokens, %.1f tok/s)",
        sampling.temperature,
        name,
        st.mean_acceptance_length,
        st.num_completion_tokens,
        st.tokens_per_s,
    )
    per_pos = st.speculator(name).num_accepted_tokens_per_pos if specs else []
    drafts_per_pos = st.speculator(name).num_draft_tokens_per_pos if specs else []
    figures = {
        "mean_acceptance_length": round(st.mean_acceptance_length, 4),
        "acceptance_rate": None if not specs else round(st.acceptance_rate, 4),
        "accepted_per_pos": [round(a / d, 4) if d else None for a, d in zip(per_pos, drafts_per_pos)],
        "completion_tokens": st.num_completion_tokens,
        "tokens_per_s": round(st.tokens_per_s, 2),
        "wall_s": round(st.total_s, 1),
    }
    return figures, batch.completion_ids
