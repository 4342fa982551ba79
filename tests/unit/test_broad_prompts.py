"""Tests for the broad offline prompt set used to train the static speculator (atlas_rl.data.broad_prompts)."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter

import pytest

from atlas_rl.data.broad_prompts import BROAD_CATEGORIES, broad_prompts, normalize_prompt, split_prompts

REQUIRED = {
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
}


@pytest.fixture(scope="module")
def prompts() -> list[dict]:
    return broad_prompts()


def test_categories_cover_the_brief() -> None:
    assert REQUIRED <= set(BROAD_CATEGORIES)
    assert len(set(BROAD_CATEGORIES)) == len(BROAD_CATEGORIES)
    assert sum(c.startswith("code_") for c in BROAD_CATEGORIES) >= 4


def test_counts(prompts: list[dict]) -> None:
    assert len(prompts) >= 600
    counts = Counter(p["category"] for p in prompts)
    assert set(counts) == set(BROAD_CATEGORIES)
    for category in BROAD_CATEGORIES:
        assert counts[category] >= 40, (category, counts[category])


def test_schema(prompts: list[dict]) -> None:
    for p in prompts:
        assert set(p) <= {"id", "category", "group", "prompt", "system"}
        assert {"id", "category", "group", "prompt"} <= set(p)
        assert isinstance(p["prompt"], str) and p["prompt"].strip() == p["prompt"] and p["prompt"]
        assert p["group"].startswith(p["category"] + "/")
        assert p["id"].startswith(p["category"] + "-")
        if "system" in p:
            assert isinstance(p["system"], str) and p["system"]
    assert any("system" in p for p in prompts)
    assert any("```" in p["prompt"] for p in prompts)  # some prompts carry a snippet to work on


def test_ids_and_prompts_unique(prompts: list[dict]) -> None:
    assert len({p["id"] for p in prompts}) == len(prompts)
    assert len({p["prompt"] for p in prompts}) == len(prompts)
    assert len({normalize_prompt(p["prompt"]) for p in prompts}) == len(prompts)


def test_no_near_duplicates_across_groups(prompts: list[dict]) -> None:
    """Prompts in different groups never share (almost) all their words: the split by group stays meaningful."""
    words = [frozenset(re.findall(r"[a-z0-9]+", p["prompt"].lower())) for p in prompts]
    worst = 0.0
    for i, j in itertools.combinations(range(len(prompts)), 2):
        if prompts[i]["group"] != prompts[j]["group"]:
            a, b = words[i], words[j]
            worst = max(worst, len(a & b) / len(a | b))
    assert worst < 0.8


def test_varied_lengths(prompts: list[dict]) -> None:
    lengths = [len(p["prompt"]) for p in prompts]
    assert min(lengths) < 40
    assert max(lengths) > 300
    assert sum(n > 150 for n in lengths) >= 60


def test_deterministic() -> None:
    assert broad_prompts() == broad_prompts()
    assert broad_prompts(3) == broad_prompts(3)
    other = broad_prompts(1)
    assert len(other) == len(broad_prompts())
    assert {p["prompt"] for p in other} != {p["prompt"] for p in broad_prompts()}  # the seed changes fillers
    assert len({normalize_prompt(p["prompt"]) for p in other}) == len(other)


def test_returns_fresh_objects() -> None:
    first = broad_prompts()
    first[0]["prompt"] = "changed"
    assert broad_prompts()[0]["prompt"] != "changed"


def test_mix_of_hand_written_and_templated(prompts: list[dict]) -> None:
    for category in BROAD_CATEGORIES:
        groups = Counter(p["group"] for p in prompts if p["category"] == category)
        assert sum(n == 1 for n in groups.values()) >= 15, category  # hand-written: one prompt per group
        assert any(n > 1 for n in groups.values()), category  # at least one template


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split(prompts: list[dict], seed: int) -> None:
    train, held = split_prompts(prompts, held_out_fraction=0.1, seed=seed)
    assert len(train) + len(held) == len(prompts)
    assert not {p["id"] for p in train} & {p["id"] for p in held}
    assert not {p["group"] for p in train} & {p["group"] for p in held}
    total = Counter(p["category"] for p in prompts)
    held_counts = Counter(p["category"] for p in held)
    train_counts = Counter(p["category"] for p in train)
    for category in BROAD_CATEGORIES:
        assert train_counts[category] > 0 and held_counts[category] > 0, category
        assert held_counts[category] <= round(0.1 * total[category]) + 1, category
        assert held_counts[category] >= 0.5 * 0.1 * total[category], category
    assert 0.07 * len(prompts) <= len(held) <= 0.13 * len(prompts)
    # order is preserved
    index = {p["id"]: i for i, p in enumerate(prompts)}
    assert [index[p["id"]] for p in train] == sorted(index[p["id"]] for p in train)
    assert [index[p["id"]] for p in held] == sorted(index[p["id"]] for p in held)


def test_split_deterministic_and_seeded(prompts: list[dict]) -> None:
    a = split_prompts(prompts, seed=0)
    assert a == split_prompts(prompts, seed=0)
    assert {p["id"] for p in a[1]} != {p["id"] for p in split_prompts(prompts, seed=1)[1]}


def test_split_larger_fraction(prompts: list[dict]) -> None:
    train, held = split_prompts(prompts, held_out_fraction=0.3)
    assert not {p["group"] for p in train} & {p["group"] for p in held}
    assert 0.25 * len(prompts) <= len(held) <= 0.35 * len(prompts)


def test_split_without_groups_uses_ids() -> None:
    items = [{"id": f"x{i}", "category": "a" if i % 2 else "b", "prompt": f"p{i}"} for i in range(40)]
    train, held = split_prompts(items, held_out_fraction=0.25)
    assert Counter(p["category"] for p in held) == {"a": 5, "b": 5}
    assert len(train) == 30


def test_split_rejects_bad_fraction(prompts: list[dict]) -> None:
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            split_prompts(prompts, held_out_fraction=bad)


# Pinned before the prompt tables moved from Python to JSONL package data (issue 12): the prompt set and the
# held-out split must stay byte-for-byte the same, or earlier static-head figures stop being comparable.
PINNED = {
    0: (
        "3bc76c699ca6b17b88c978586ff1eb50bb03a3f2ac72c7154b54283433b6facf",
        "84b335b08ea13e4569d479ce88670392a636d2bb0d518aab9f23c51df6b64853",
    ),
    1: (
        "bea2f626714d250ed866fbf1b4c812f658e414e81634497a493ebfdcdd79baae",
        "0d86a1dac24ae214a566f2cb19b3735bdf912097bb1ccd451c75d9b98b3213fd",
    ),
    3: (
        "7b6b3e0a2cd9cc42474ab4db9a8d224333f2bfed4a05c00a98c774d27a3363bc",
        "73dbd70b3a0dac37ac37d0e370ddd9ac9bebda4cc1b0a2869866c57d33a70355",
    ),
}


def _sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("seed", sorted(PINNED))
def test_prompt_set_and_held_out_split_pinned_for_seed(seed: int) -> None:
    prompts = broad_prompts(seed)
    train, held = split_prompts(prompts, held_out_fraction=0.1, seed=0)
    assert (len(prompts), len(train), len(held)) == (734, 658, 76)
    all_hash, held_hash = PINNED[seed]
    assert _sha256([(p["id"], p["prompt"], p.get("system")) for p in held]) == held_hash
    assert _sha256(prompts) == all_hash


def test_prompt_text_lives_in_package_data_files() -> None:
    """The hand-written prompts and word lists are JSONL/JSON package data, each record well-formed."""
    from importlib.resources import files

    data = files("atlas_rl.data")
    records = [json.loads(line) for line in data.joinpath("broad_prompts.jsonl").read_text().splitlines()]
    assert len(records) >= 15 * len(BROAD_CATEGORIES)
    for rec in records:
        assert set(rec) <= {"category", "prompt", "system"} and rec["category"] in BROAD_CATEGORIES
        assert isinstance(rec["prompt"], str) and rec["prompt"]
    order = [rec["category"] for rec in records]
    assert order == sorted(order, key=BROAD_CATEGORIES.index)  # grouped in category order
    words = json.loads(data.joinpath("broad_words.json").read_text())
    assert set(words) - {"_comment"} <= set(BROAD_CATEGORIES)
    hand = {rec["prompt"] for rec in records}
    built = broad_prompts()
    assert hand <= {p["prompt"] for p in built}
    assert sum(p["group"].split("/")[1].startswith("h") for p in built) == len(records)


def test_general_prompts_load_from_package_data() -> None:
    from atlas_rl.data.prompts import GENERAL_PROMPTS, load_general_prompts

    assert len(GENERAL_PROMPTS) == 24 and GENERAL_PROMPTS == load_general_prompts()
    assert load_general_prompts() is not load_general_prompts()
    assert all(isinstance(p, str) and p.strip() == p and p for p in GENERAL_PROMPTS)
