"""A broad, offline prompt set for training a static draft model (speculator) by self-distillation.

The target model answers these prompts; an EAGLE-style draft head is trained on its responses and evaluated on a
held-out split. The prompts therefore imitate what people send a small chat model: everyday questions, writing
tasks, explanations, puzzles, arithmetic, code in six languages, JSON and tool calls. Nothing is downloaded.

The text is package data: hand-written prompts in ``broad_prompts.jsonl`` (one ``{"category", "prompt",
"system"?}`` a line, in category order) and the word lists the templates below fill in, in ``broad_words.json``.
This module holds the templates (how fillers and numbers are drawn) and the split.

API
---
``BROAD_CATEGORIES``
    The category names, in a fixed order.
``broad_prompts(seed=0)``
    A list of dicts ``{"id", "category", "group", "prompt"}`` (plus ``"system"`` for some tool-call prompts).
    Hand-written prompts come first in each category; templated ones follow. ``seed`` only changes which filler
    combinations and numbers the templates draw (hand-written prompts and template structure stay the same); the
    same seed always gives the same list. ``id`` is ``"<category>-<group>-<crc32 of the text>"``.
``split_prompts(prompts, held_out_fraction=0.1, seed=0)``
    A deterministic train / held-out split, stratified by category and made **by group**.

Groups
------
Every hand-written prompt is its own group (``"<category>/h<nnn>"``). All prompts made from one template share a
group (``"<category>/<template name>"``), whatever fillers they received, so a held-out prompt is never a
training prompt with a different filler word. For tool calls a group is one tool: every request that uses the same
tool description (in whichever of the three prompt layouts) is in the same group, so held-out tools are unseen.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from collections.abc import Callable, Sequence
from importlib.resources import files
from typing import Any

__all__ = ["BROAD_CATEGORIES", "broad_prompts", "split_prompts", "normalize_prompt"]

BROAD_CATEGORIES: tuple[str, ...] = (
    "chat",
    "writing",
    "knowledge",
    "reasoning",
    "arithmetic",
    "code_python",
    "code_javascript",
    "code_c",
    "code_rust",
    "code_sql",
    "code_bash",
    "json",
    "tool_calls",
)

# One entry before ids are assigned: (group name inside the category, user prompt, optional system prompt).
_Entry = tuple[str, str, str | None]
_Words = dict[str, Any]  # one category's word lists from broad_words.json


def normalize_prompt(text: str) -> str:
    """Lower-case ``text`` and collapse runs of whitespace (used to check that prompts are unique)."""
    return " ".join(text.lower().split())


@functools.lru_cache(maxsize=1)
def _package_data() -> tuple[dict[str, list[_Entry]], dict[str, _Words]]:
    """``(hand-written entries per category, word lists per category)`` read from the package data files."""
    data = files("atlas_rl.data")
    hand: dict[str, list[_Entry]] = {c: [] for c in BROAD_CATEGORIES}
    for line in data.joinpath("broad_prompts.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            entries = hand[rec["category"]]
            entries.append((f"h{len(entries):03d}", rec["prompt"], rec.get("system")))
    words = json.loads(data.joinpath("broad_words.json").read_text(encoding="utf-8"))
    return hand, words


# ---------------------------------------------------------------------------------------------------------------
# templates: one function per category, (rng, the category's word lists) -> entries, drawing fillers in order
# ---------------------------------------------------------------------------------------------------------------


def _chat(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = [("t-beginner", f"What are some tips for {a} as a beginner?", None) for a in w["activities"]]
    for city in w["cities"]:
        days = rng.choice(["two", "three", "four", "five"])
        who = rng.choice(["", " with my partner", " on my own", " with two kids"])
        out.append(("t-visit", f"I'm visiting {city} for {days} days{who}. What should I see and eat?", None))
    for topic, rel in w["talks"]:
        out.append(("t-talk", f"How can I bring up {topic} with my {rel} without starting an argument?", None))
    return out


def _writing(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    combos = [(f, s) for f in w["forms"] for s in w["subjects"]]
    for form, subject in rng.sample(combos, 10):
        out.append(("t-form", f"Write a {form} about {subject}.", None))
    for recipient, purpose in w["emails"]:
        tone = rng.choice(["polite", "friendly", "firm but respectful", "brief and professional"])
        out.append(("t-email", f"Write a {tone} email to {recipient} {purpose}.", None))
    for premise in w["premises"]:
        audience = rng.choice(["young children", "teenagers", "adults"])
        out.append(("t-story", f"Write a short story for {audience} about {premise}.", None))
    instructions = rng.sample(w["instructions"], len(w["instructions"]))
    for i, passage in enumerate(w["passages"]):
        out.append(("t-passage", f"{instructions[i % len(instructions)]}\n\n{passage}", None))
    return out


def _knowledge(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    for concept in w["concepts"]:
        style = rng.choice(["in simple terms", "to a curious teenager", "as if I were new to the topic"])
        out.append(("t-explain", f"Explain {concept} {style}.", None))
    out += [("t-causes", f"What were the main causes and consequences of {e}?", None) for e in w["events"]]
    out += [("t-difference", f"What is the difference between {p}?", None) for p in w["pairs"]]
    return out


def _reasoning(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    for seq in w["sequences"]:
        out.append(("t-sequence", f"What comes next in the sequence {seq}, ...? Explain the pattern.", None))
    for arg in w["arguments"]:
        out.append(("t-valid", f"Is the following argument logically valid? Explain why or why not.\n\n{arg}", None))
    for items in w["odd_one_out"]:
        out.append(("t-odd", f"Which one does not belong: {items}? Explain your choice.", None))
    return out


def _change(rng: random.Random) -> str:
    item = rng.choice(["muffins", "croissants", "bus tickets", "postcards", "bagels"])
    price, n = rng.choice([0.75, 1.25, 1.8, 2.4, 3.15]), rng.randint(3, 12)
    bill = 20 if price * n <= 20 else 50
    return f"{item.capitalize()} cost ${price:.2f} each. If I buy {n} and pay with a ${bill} bill, what is my change?"


def _percent(rng: random.Random) -> str:
    return f"What is {rng.choice([5, 12, 15, 20, 35, 45, 60, 75])}% of {rng.randrange(40, 2000, 20)}?"


def _speed(rng: random.Random) -> str:
    h = rng.choice([1.5, 2, 2.5, 3, 4])
    vehicle = rng.choice(["train", "bus", "ferry", "truck"])
    return f"A {vehicle} travels {int(h * rng.randrange(40, 130, 5))} km in {h:g} hours. What is its average speed?"


def _multiply(rng: random.Random) -> str:
    return f"Calculate {rng.randint(12, 99)} times {rng.randint(12, 99)}. Show your working."


def _fraction(rng: random.Random) -> str:
    b, d = rng.choice([3, 4, 5, 6, 8]), rng.choice([3, 4, 5, 6, 10, 12])
    return f"Add {rng.randint(1, b - 1)}/{b} and {rng.randint(1, d - 1)}/{d}, and simplify the result."


def _discount(rng: random.Random) -> str:
    item = rng.choice(["jacket", "pair of boots", "lamp", "backpack", "coffee machine"])
    price, pct = rng.randrange(30, 300, 5), rng.choice([10, 15, 20, 25, 30, 40])
    return f"A {item} costs ${price} and is on sale for {pct}% off. What is the sale price?"


def _interest(rng: random.Random) -> str:
    p, r, t = rng.randrange(500, 10000, 250), rng.choice([2, 3, 3.5, 4, 5]), rng.randint(2, 10)
    return f"If I invest ${p} at {r:g}% simple interest per year, how much interest do I earn after {t} years?"


def _age(rng: random.Random) -> str:
    age, mult, years = rng.randint(4, 12), rng.choice([3, 4, 5]), rng.randint(2, 15)
    name = rng.choice(["Sam", "Lea", "Omar", "Yuki", "Ines"])
    return f"{name} is {age} and {name}'s mother is {mult} times as old. How old will she be in {years} years?"


_ARITHMETIC_TEMPLATES: dict[str, Callable[[random.Random], str]] = {
    "t-change": _change,
    "t-percent": _percent,
    "t-speed": _speed,
    "t-multiply": _multiply,
    "t-fraction": _fraction,
    "t-discount": _discount,
    "t-interest": _interest,
    "t-age": _age,
}


def _arithmetic(rng: random.Random, w: _Words, per_template: int = 5) -> list[_Entry]:
    out: list[_Entry] = []
    for group, make in _ARITHMETIC_TEMPLATES.items():
        texts: list[str] = []
        while len(texts) < per_template:  # redraw numbers until the instances differ
            text = make(rng)
            if text not in texts:
                texts.append(text)
        out += [(group, t, None) for t in texts]
    return out


def _code(func: str, extras: Sequence[str], howto: str) -> Callable[[random.Random, _Words], list[_Entry]]:
    """A code category's templates: ``func`` filled with each task (``{task}``) and a filler drawn from ``extras``
    (``{extra}``), then ``howto`` filled with each how-to question (``{h}``)."""

    def build(rng: random.Random, w: _Words) -> list[_Entry]:
        out: list[_Entry] = []
        for task in w["tasks"]:
            extra = rng.choice(list(extras))
            out.append(("t-func", func.format(task=task, extra=extra), None))
        out += [("t-howto", howto.format(h=h), None) for h in w["howtos"]]
        return out

    return build


def _sql(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    for schema, task in w["tasks"]:
        dialect = rng.choice(["", " Use PostgreSQL.", " Use SQLite.", " Use MySQL."])
        out.append(("t-query", f"Using a table {schema}, write a SQL query that {task}.{dialect}", None))
    out += [("t-howto", f"How do I {h} in SQL?", None) for h in w["howtos"]]
    return out


def _bash(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    for task in w["commands"]:
        shell = rng.choice(["shell", "Linux", "bash"])
        out.append(("t-command", f"Give me a {shell} command to {task}.", None))
    out += [("t-script", f"Write a bash script that {t}.", None) for t in w["scripts"]]
    return out


def _json(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    for keys, text in w["extract"]:
        out.append(("t-extract", f"Convert the following into a JSON object with the keys {keys}:\n\n{text}", None))
    for things, fields in w["arrays"]:
        n = rng.randint(3, 6)
        text = f"Generate a JSON array of {n} {things}. Each item must have the fields {fields}. Output only the JSON."
        out.append(("t-array", text, None))
    return out


_TOOL_TYPES = {"string": "str", "integer": "int", "number": "float", "string or null": "str | None"}
_CALL_FORMAT = '{"name": <function name>, "arguments": {<argument>: <value>, ...}}'


def _tool_signature(name: str, params: list[list[str]]) -> str:
    return f"{name}(" + ", ".join(f"{p}: {_TOOL_TYPES[t]}" for p, t, _ in params) + ")"


def _tool_schema(name: str, params: list[list[str]], desc: str) -> str:
    props = {p: {"type": t if t != "string or null" else ["string", "null"], "description": d} for p, t, d in params}
    return json.dumps({"name": name, "description": desc, "parameters": {"type": "object", "properties": props}})


def _tool_prompt(tool: dict[str, Any], request: str, layout: int) -> tuple[str, str | None]:
    """``(user prompt, system prompt or None)`` of one request to ``tool`` in prompt layout 0, 1 or 2."""
    sig, desc = _tool_signature(tool["name"], tool["params"]), tool["description"]
    if layout == 0:  # everything inline, plain-language description
        prompt = (
            f'You can call the function {sig}. {desc}\nThe user asks: "{request}"\n'
            f"Respond with a JSON tool call of the form {_CALL_FORMAT}."
        )
        return prompt, None
    if layout == 1:  # tool list in the system prompt, the request alone as the user turn
        system = (
            f"You are a helpful assistant with access to tools.\nAvailable tools:\n- {sig}: {desc}\n"
            f"When a tool is needed, reply only with a JSON object {_CALL_FORMAT}."
        )
        return request, system
    schema = _tool_schema(tool["name"], tool["params"], desc)  # JSON function schema in the prompt
    return f"Tools:\n{schema}\n\nUser: {request}\n\nCall the right tool. Output JSON only.", None


def _tool_calls(rng: random.Random, w: _Words) -> list[_Entry]:
    out: list[_Entry] = []
    for tool in w["tools"]:
        layouts = [0, 1, 2, rng.randrange(3), rng.randrange(3)]
        rng.shuffle(layouts)
        for request, layout in zip(tool["requests"], layouts):
            prompt, system = _tool_prompt(tool, request, layout)
            out.append((f"tool-{tool['name']}", prompt, system))
    return out


_BUILDERS: dict[str, Callable[[random.Random, _Words], list[_Entry]]] = {
    "chat": _chat,
    "writing": _writing,
    "knowledge": _knowledge,
    "reasoning": _reasoning,
    "arithmetic": _arithmetic,
    "code_python": _code(
        "Write a Python function that {task}.{extra}",
        ["", " Include a docstring.", " Add a couple of example calls.", " Keep it short."],
        "In Python, how do I {h}?",
    ),
    "code_javascript": _code(
        "Write a {extra} function that {task}.",
        ["JavaScript", "modern JavaScript (ES2020)", "TypeScript"],
        "In JavaScript, what is the best way to {h}?",
    ),
    "code_c": _code(
        "Write a C function that {task}.{extra}",
        ["", " Include a small main() that tests it.", " Comment each step."],
        "In C++, how do I {h}?",
    ),
    "code_rust": _code(
        "Write a Rust function that {task}.{extra}",
        ["", " Add a test.", " Explain any borrowing involved."],
        "In Rust, how do I {h}?",
    ),
    "code_sql": _sql,
    "code_bash": _bash,
    "json": _json,
    "tool_calls": _tool_calls,
}
if tuple(_BUILDERS) != BROAD_CATEGORIES:  # pragma: no cover - guards edits to the tables above
    raise RuntimeError("_BUILDERS and BROAD_CATEGORIES disagree")


# ---------------------------------------------------------------------------------------------------------------
# assembly and split
# ---------------------------------------------------------------------------------------------------------------


def broad_prompts(seed: int = 0) -> list[dict[str, Any]]:
    """Build the prompt set: a list of ``{"id", "category", "group", "prompt"}`` dicts (some add ``"system"``).

    Deterministic for a given ``seed``: the seed only changes which filler combinations and numbers the templates
    draw. Every prompt text is unique, also after :func:`normalize_prompt`; a ``RuntimeError`` says otherwise.
    """
    hand, words = _package_data()
    prompts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for category in BROAD_CATEGORIES:
        rng = random.Random(f"atlas-broad:{seed}:{category}")
        for group, text, system in hand[category] + _BUILDERS[category](rng, words.get(category, {})):
            key = normalize_prompt(text)
            if key in seen:
                raise RuntimeError(f"duplicate prompt in {category}/{group}: {text[:80]!r}")
            seen.add(key)
            prompts.append(_prompt_item(category, group, text, system))
    return prompts


def _prompt_item(category: str, group: str, text: str, system: str | None) -> dict[str, Any]:
    digest = zlib.crc32(((system or "") + "\x00" + text).encode("utf-8"))
    item: dict[str, Any] = {
        "id": f"{category}-{group}-{digest:08x}",
        "category": category,
        "group": f"{category}/{group}",
        "prompt": text,
    }
    if system is not None:
        item["system"] = system
    return item


def _group_of(prompt: dict[str, Any]) -> str:
    """The split unit of a prompt: its ``group``, or its ``id`` when it has none (then it stands alone)."""
    return str(prompt.get("group") or prompt["id"])


def split_prompts(
    prompts: Sequence[dict[str, Any]], held_out_fraction: float = 0.1, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split ``prompts`` into ``(train, held_out)``, stratified by category and never splitting a group.

    For each category the groups are shuffled with a seeded RNG and taken greedily into the held-out part while
    they fit into ``round(held_out_fraction * n_category)`` prompts (at least one); if no group fits, the smallest
    one is taken. A category with a single group stays entirely in train. Because whole groups move, no held-out
    prompt shares a template (or, for tool calls, a tool description) with a training prompt; in practice the
    held-out part is mostly hand-written prompts plus the occasional small template group. Both parts keep the
    input order. Deterministic for a given ``seed``.
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    sizes: dict[str, dict[str, int]] = {}
    for p in prompts:
        groups = sizes.setdefault(str(p["category"]), {})
        g = _group_of(p)
        groups[g] = groups.get(g, 0) + 1
    held: set[str] = set()
    for category, groups in sizes.items():
        if len(groups) < 2:
            continue
        n = sum(groups.values())
        target = max(1, round(held_out_fraction * n))
        order = sorted(groups)
        random.Random(f"atlas-split:{seed}:{category}").shuffle(order)
        taken = 0
        for g in order:
            if taken >= target:
                break
            if taken + groups[g] <= target:
                held.add(g)
                taken += groups[g]
        if taken == 0:
            held.add(min(order, key=lambda g: groups[g]))
    train = [p for p in prompts if _group_of(p) not in held]
    held_out = [p for p in prompts if _group_of(p) in held]
    return train, held_out
