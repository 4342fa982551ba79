"""Stage 5 of the static speculator: the card (what was trained, on what, how well) and the checkpoint.

The checkpoint is a head directory in the layout vLLM's EAGLE-3 drafter loads (``config.json`` + fp16
``model.safetensors``) with the JSON card as ``atlas_card.json`` in it: data, head, draft vocabulary, training
curve, held-out figures, timings, versions, the full config and the command that reproduces the run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from atlas_rl.speculators.draft_head import DraftHead, target_fingerprint
from atlas_rl.training.samples import SequenceSample
from atlas_rl.training.static_config import StaticSpeculatorConfig
from atlas_rl.training.static_vocab import vocab_coverage

__all__ = [
    "CARD_FORMAT",
    "build_card",
    "completion_tokens",
    "coverage_section",
    "data_section",
    "save_static_checkpoint",
]

CARD_FORMAT = "atlas-rl/static-speculator-card/v1"


def save_static_checkpoint(head: DraftHead, card: dict[str, Any], path: str | Path) -> Path:
    """The head directory at ``path`` (fp16 weights, the card as ``atlas_card.json``); returns ``path``."""
    return head.save_pretrained(Path(path), dtype=torch.float16, card=card)


def completion_tokens(samples: Sequence[SequenceSample]) -> list[list[int]]:
    """The completion of every sample: the tokens after the first labelled position (the last prompt token)."""
    return [s.tokens[int(torch.nonzero(s.label_mask).flatten()[0]) + 1 :].tolist() for s in samples]


def build_card(
    model: torch.nn.Module,
    head: DraftHead,
    cfg: StaticSpeculatorConfig,
    *,
    data: dict[str, Any],
    training: dict[str, Any],
    held_out: dict[str, Any],
    coverage: dict[str, Any],
    timings: dict[str, float],
    command: str = "",
) -> dict[str, Any]:
    """The card of a trained static head; ``data``, ``training`` (from ``train_head``), ``held_out`` (from
    ``evaluate_acceptance``) and ``coverage`` (from :func:`coverage_section`) are its sections."""
    return {
        "name": "atlas-rl static speculator",
        "format": CARD_FORMAT,
        "target_fingerprint": target_fingerprint(model),
        "target_name_or_path": str(getattr(model.config, "_name_or_path", "")),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": data,
        "head": _head_section(head, cfg),
        "draft_vocab": coverage,
        "training": _training_section(training, cfg),
        "held_out": held_out,
        "timings_s": timings,
        "versions": _versions(),
        "config": _jsonable(asdict(cfg)),
    }


def data_section(
    samples: Sequence[SequenceSample],
    cfg: StaticSpeculatorConfig,
    prompts: tuple[int, int],
    generation: list[dict[str, Any]],
    data_info: dict[str, Any] | None,
) -> dict[str, Any]:
    """The card's ``data``: ``data_info`` (prompt set, split, ...), ``prompts`` = (train, held-out) counts, the
    generation runs, the teacher-forced corpus (sources, licenses, dedup, tokens per domain; None when unused)
    and what the samples hold."""
    corpus = [g for g in generation if g.get("source") == "corpus"]
    return {
        **(data_info or {}),
        "train_prompts": prompts[0],
        "held_out_prompts": prompts[1],
        "generation": [g for g in generation if g.get("source") != "corpus"],
        "corpus": corpus[0] if corpus else None,
        "sequences": len(samples),
        "positions": sum(len(s) for s in samples),
        "labelled_positions": sum(s.num_labels for s in samples),
        "completion_tokens": sum(len(c) for c in completion_tokens(samples)),
        "label_top_k": cfg.label_top_k,
        "max_new_tokens": cfg.gen_max_new_tokens,
    }


def coverage_section(
    draft_to_target: torch.Tensor, train_completions: list[list[int]], held_completions: list[list[int]]
) -> dict[str, Any]:
    """The card's ``draft_vocab``: its size and the share of train / held-out completion tokens it covers."""
    return {
        "size": int(draft_to_target.numel()),
        "train_completion_coverage": round(vocab_coverage(draft_to_target, train_completions), 4),
        "held_out_completion_coverage": round(vocab_coverage(draft_to_target, held_completions), 4)
        if held_completions
        else None,
    }


def _head_section(head: DraftHead, cfg: StaticSpeculatorConfig) -> dict[str, Any]:
    stored = sum(v.numel() for k, v in head.state_dict().items() if k != "draft_to_target")
    return {
        "layout": "EAGLE-3 (vLLM Eagle3LlamaForCausalLM)",
        "num_hidden_layers": head.config.num_hidden_layers,
        "fuse_layers": list(cfg.fuse_layers),
        "draft_vocab_size": head.config.draft_vocab_size,
        "intermediate_size": cfg.intermediate_size,
        "train_lm_head": cfg.train_lm_head,
        "stored_parameters": stored,
        "dtype": "float16",
    }


def _training_section(train: dict[str, Any], cfg: StaticSpeculatorConfig) -> dict[str, Any]:
    curve = train["curve"]
    return {
        "objective": f"training-time test, {cfg.ttt_steps} steps, weights {cfg.ttt_decay}^(j-1), soft CE",
        "optimizer": f"AdamW lr {cfg.lr} betas {list(cfg.betas)} wd {cfg.weight_decay}, warmup "
        f"{cfg.warmup_steps} then cosine to {cfg.min_lr_ratio}x, clip {cfg.grad_clip}",
        "batch_tokens": cfg.batch_tokens,
        "max_len": cfg.max_len,
        **{k: v for k, v in train.items() if k != "curve"},
        "first": curve[0] if curve else None,
        "last": curve[-1] if curve else None,
        "curve": curve,
    }


def _versions() -> dict[str, str]:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
