"""The shifted traffic: bug reports answered by a triage bot in a project-specific ticket format (data in
``atlas_rl/data/adapt_tickets.json``): a system prompt with the format, two few-shot turns, then a new report built
from the data file's parts. Seeded; the bench's held-out requests and each window's traffic use disjoint seeds."""

from __future__ import annotations

import json
import random
from functools import lru_cache
from importlib import resources
from typing import Any

from ..workloads import chat_ids

__all__ = ["ticket_messages", "ticket_prompts"]


@lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    return json.loads(resources.files("atlas_rl.data").joinpath("adapt_tickets.json").read_text())


def ticket_messages(rng: random.Random) -> list[dict[str, str]]:
    """One conversation: the format, the few-shot turns, a new bug report."""
    spec = _spec()
    msgs = [{"role": "system", "content": spec["system"]}]
    for user, answer in spec["examples"]:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    report = spec["report"].format(**{k: rng.choice(v) for k, v in spec["parts"].items()})
    return msgs + [{"role": "user", "content": report}]


def ticket_prompts(tokenizer: Any, count: int, seed: int | str) -> list[list[int]]:
    """``count`` prompts (token ids, generation prompt appended) of the ticket traffic."""
    rng = random.Random(f"adapt-tickets:{seed}")
    return [chat_ids(tokenizer, ticket_messages(rng)) for _ in range(count)]
