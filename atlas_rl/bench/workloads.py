"""Benchmark workloads: prompts from the offline task sets, tokenised through the chat template."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from atlas_rl.data.prompts import GENERAL_PROMPTS
from atlas_rl.data.tasks import arithmetic_tasks
from atlas_rl.types import SamplingParams


@dataclass
class Workload:
    """A named rollout workload: prompts (token ids), samples per prompt and sampling parameters."""

    name: str
    description: str
    prompt_ids: list[list[int]]
    num_generations: int
    sampling: SamplingParams

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids) * self.num_generations


def chat_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the generation prompt appended (as TRL templates prompts)."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def grpo_workload(
    tokenizer, num_prompts: int = 8, num_generations: int = 8, max_new_tokens: int = 128, seed: int = 0
) -> Workload:
    """GRPO-like: arithmetic word problems, ``num_generations`` samples each at T=1."""
    tasks = arithmetic_tasks(num_prompts, seed=seed)
    return Workload(
        name="grpo",
        description=f"{num_prompts} prompts x {num_generations} samples, T=1.0, {max_new_tokens} new tokens",
        prompt_ids=[chat_ids(tokenizer, t.messages()) for t in tasks],
        num_generations=num_generations,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, seed=seed),
    )


def greedy_workload(tokenizer, num_prompts: int = 16, max_new_tokens: int = 128) -> Workload:
    """Greedy decoding of general chat prompts, one sample each."""
    prompts = (GENERAL_PROMPTS * (1 + num_prompts // len(GENERAL_PROMPTS)))[:num_prompts]
    return Workload(
        name="greedy",
        description=f"{num_prompts} prompts x 1, greedy, {max_new_tokens} new tokens",
        prompt_ids=[chat_ids(tokenizer, [{"role": "user", "content": p}]) for p in prompts],
        num_generations=1,
        sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
    )


def tail_workload(tokenizer, num_generations: int = 8, max_new_tokens: int = 128, seed: int = 1) -> Workload:
    """The long tail of a GRPO batch: one prompt group of ``num_generations`` rows (<= 8 active rows)."""
    w = grpo_workload(tokenizer, 1, num_generations, max_new_tokens, seed=seed)
    w.name = "tail"
    w.description = f"1 prompt x {num_generations} samples (<= {num_generations} active rows), T=1.0"
    return w


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, W], attention_mask [B, W])`` of ``rows`` left-padded to the longest, as HF ``generate`` and
    TRL's logprob recompute take them."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask
