"""A small offline set of general chat prompts (benchmarks and demos; no downloads).

The prompts are package data, ``general_prompts.jsonl`` (one ``{"prompt": ...}`` a line); ``GENERAL_PROMPTS`` is
that list, in file order.
"""

from __future__ import annotations

import json
from importlib.resources import files

__all__ = ["GENERAL_PROMPTS", "load_general_prompts"]


def load_general_prompts() -> list[str]:
    """The general prompts of ``general_prompts.jsonl``, in file order (a fresh list each call)."""
    text = files("atlas_rl.data").joinpath("general_prompts.jsonl").read_text(encoding="utf-8")
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


GENERAL_PROMPTS: list[str] = load_general_prompts()
