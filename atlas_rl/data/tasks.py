"""Offline tasks with verifiable rewards, generated in code (nothing is downloaded).

``arithmetic_tasks`` makes short arithmetic word problems whose answer is an integer (``level="easy"``: one-step
additions and subtractions of small numbers, the demo's curriculum; ``"mixed"``: six kinds incl. products,
shares, two-step sums and change); ``arithmetic_reward`` scores a completion 1.0 when its final answer is right
(the answer may be given as ``#### 42``, ``<answer>42</answer>``, "the answer is 42", or as the last number of
the completion); ``format_reward`` scores 1.0 when the completion gives its answer on a line of its own as the
system prompt asks (``#### 42``) — a signal the embedded 135M model meets in about a fifth of its samples at
first, so GRPO groups hold both outcomes and the policy learns from the first steps.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

SYSTEM_PROMPT = (
    "You are a careful math tutor. Solve the problem step by step in a few short sentences, "
    "then give the final answer on its own line as: #### <number>"
)

_NAMES = ["Tom", "Anna", "Lee", "Maria", "Sam", "Priya", "Omar", "Julia", "Ken", "Zoe", "Ivan", "Lucy"]
_ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "coins", "cookies", "cards", "shells", "stamps"]


@dataclass(frozen=True)
class Task:
    """One problem: the user prompt text and its integer answer (as a string)."""

    prompt: str
    answer: str

    def messages(self, system: bool = True) -> list[dict[str, str]]:
        """The conversation TRL and chat templates expect (``[{"role": ..., "content": ...}]``)."""
        msgs = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
        return msgs + [{"role": "user", "content": self.prompt}]


def _problem(rng: random.Random) -> Task:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    kind = rng.randrange(6)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    if kind == 0:
        return Task(
            f"{name} has {a} {item}. {other} gives {name} {b} more {item}. How many {item} does {name} have now?",
            str(a + b),
        )
    if kind == 1:
        a = a + b
        return Task(
            f"{name} had {a} {item} and gave {b} of them to {other}. How many {item} does {name} have left?",
            str(a - b),
        )
    if kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return Task(
            f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How many {item} does {name} buy in total?",
            str(a * b),
        )
    if kind == 3:
        b = rng.randint(2, 9)
        q = rng.randint(2, 12)
        return Task(
            f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?", str(q)
        )
    if kind == 4:
        c = rng.randint(2, 20)
        return Task(
            f"{name} has {a} {item}, buys {b} more, then loses {min(c, a + b - 1)}. How many {item} does "
            f"{name} have now?",
            str(a + b - min(c, a + b - 1)),
        )
    price = rng.randint(2, 9)
    return Task(
        f"One of {name}'s {item} costs {price} dollars. {name} buys {b} of them and pays with a "
        f"{price * b + a} dollar bill. How much change does {name} get, in dollars?",
        str(a),
    )


def _easy_problem(rng: random.Random) -> Task:
    name, other = rng.sample(_NAMES, 2)
    item = rng.choice(_ITEMS)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if rng.random() < 0.5:
        return Task(
            f"{name} has {a} {item}. {other} gives {name} {b} more. How many {item} does {name} have?", str(a + b)
        )
    return Task(f"{name} has {a + b} {item} and gives {b} to {other}. How many {item} does {name} have left?", str(a))


LEVELS = ("easy", "mixed")


def arithmetic_tasks(n: int, seed: int = 0, level: str = "mixed") -> list[Task]:
    """``n`` reproducible arithmetic word problems of the given ``level`` (``"easy"`` or ``"mixed"``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    rng = random.Random(seed)
    make = _easy_problem if level == "easy" else _problem
    return [make(rng) for _ in range(n)]


_ANSWER_PATTERNS = [
    re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)"),
    re.compile(r"<answer>\s*(-?\d[\d,]*(?:\.\d+)?)\s*</answer>"),
    re.compile(r"answer is[:\s]*\$?(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE),
]
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_LINE = re.compile(r"^\s*####\s*-?\d[\d,]*(?:\.\d+)?\s*$", re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The final numeric answer of a completion, or None."""
    for pat in _ANSWER_PATTERNS:
        found = pat.findall(text)
        if found:
            return found[-1].replace(",", "")
    nums = _NUMBER.findall(text)
    return nums[-1].replace(",", "") if nums else None


def arithmetic_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals ``answer`` (numerically), else 0.0."""
    got = extract_answer(completion)
    if got is None:
        return 0.0
    try:
        return 1.0 if abs(float(got) - float(answer)) < 1e-9 else 0.0
    except ValueError:
        return 0.0


def format_reward(completion: str) -> float:
    """1.0 when the completion states its answer on a line of its own as ``#### <number>``, else 0.0."""
    return 1.0 if _ANSWER_LINE.search(completion) else 0.0
