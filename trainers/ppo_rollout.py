"""Rollouts for PPO: the atlas engine (through :class:`AtlasRolloutBackend`, as for GRPO) or Hugging Face
``generate``. Both sample from ``softmax(logits / temperature)`` (no top-k/top-p: PPO's ratio is taken against
that distribution) and end a completion at the first stop token (kept as its last token)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import GenerationConfig

from atlas_rl.types import SamplingParams

from .backend import AtlasRolloutBackend, backend_class

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    completions: list[list[int]]
    logprobs: list[list[float]] | None  # the behaviour policy's, when the backend returns them (atlas)
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def stop_token_ids(args: Any, tokenizer: Any, policy: nn.Module) -> list[int]:
    """The ids that end a completion: ``stop_token_id``, else the tokenizer's and the model's EOS ids when
    ``stop_token == "eos"``, else none (fixed-length completions)."""
    if args.stop_token_id is not None:
        return [int(args.stop_token_id)]
    if args.stop_token != "eos":
        return []
    ids: list[int] = []
    gen_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    for t in [getattr(tokenizer, "eos_token_id", None)] + (gen_eos if isinstance(gen_eos, list) else [gen_eos]):
        if t is not None and int(t) not in ids:
            ids.append(int(t))
    if not ids:
        raise ValueError(
            "stop_token='eos' but neither the tokenizer nor the model defines an EOS id: set stop_token_id"
        )
    return ids


def truncate_at_stop(tokens: list[int], stops: list[int]) -> list[int]:
    """Cut after the first stop token (kept)."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1]
    return tokens


class PPORolloutGenerator:
    """One per training process. ``backend`` is the atlas backend (None for ``"transformers"``)."""

    def __init__(self, args: Any, stops: list[int], pad_id: int, process_index: int, num_processes: int) -> None:
        self.args = args
        self.stops = stops
        self.pad_id = pad_id
        self.process_index = process_index
        self.num_calls = 0
        self.backend: AtlasRolloutBackend | None = None
        if args.generation_backend == "atlas":
            self.backend = backend_class(args)(
                args, eos_token_ids=stops, process_index=process_index, num_processes=num_processes, seed=args.seed
            )

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=float(self.args.temperature),
            max_new_tokens=int(self.args.response_length),
            stop_token_ids=tuple(self.stops),
            ignore_eos=True,  # exactly the stop set above
        )

    @torch.no_grad()
    def generate(self, policy: nn.Module, prompts: list[list[int]]) -> Rollout:
        t0 = time.perf_counter()
        if self.backend is not None:
            completions, logprobs = self.backend.generate(policy, prompts, self.sampling())
            secs = time.perf_counter() - t0
            metrics = dict(self.backend.metrics())
        else:
            completions, logprobs = self._hf_generate(policy, prompts), None
            secs = time.perf_counter() - t0
            metrics = {}
        self.num_calls += 1
        completions = [c if c else [self.pad_id] for c in completions]  # never empty (response_length >= 1)
        n_tok = sum(len(c) for c in completions)
        metrics["atlas/rollout_s"] = secs
        metrics["atlas/rollout_tokens_per_s"] = n_tok / secs if secs > 0 else 0.0
        return Rollout(completions, logprobs, secs, metrics)

    def _hf_generate(self, policy: nn.Module, prompts: list[list[int]]) -> list[list[int]]:
        """``policy.generate`` on left-padded prompts, seeded per call and process."""
        device = next(policy.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        gen_cfg = GenerationConfig(
            do_sample=True,
            temperature=float(self.args.temperature),
            top_k=0,
            top_p=1.0,
            max_new_tokens=int(self.args.response_length),
            eos_token_id=self.stops or None,
            pad_token_id=self.pad_id,
        )
        seed = (int(self.args.seed) * 1_000_003 + self.num_calls * 7919 + self.process_index * 104_729) % (2**62)
        torch.manual_seed(seed)
        out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg)
        new = out[:, width:].tolist()
        return [truncate_at_stop(row, self.stops) for row in new]
