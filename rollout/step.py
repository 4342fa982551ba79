"""The pieces of one engine decode step, as small typed functions over the rows of a wave.

A decode step (``RolloutEngine._decode_step``) runs: plan → propose → choose → pack → target forward → verify →
record → observe/capture → shrink. This module holds the parts that need no model: the per-row bookkeeping
(:class:`Row`), what stays fixed over a ``generate`` call (:class:`WaveContext`), the drafting requests and
their batched ``propose`` calls, the packing of ``[pending token, draft...]`` into one forward's input, the dense
draft distributions for the verifier, and emitting verified tokens into a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from atlas_rl.controller import Controller, Plan, PlanState
from atlas_rl.speculators.base import Speculator
from atlas_rl.types import Draft, ProposeInput, ProposeRecord, SamplingParams, SpecStats

from .kv_cache import SlotKVCache


@dataclass
class Row:
    """Bookkeeping of one sequence (Python side)."""

    row_id: int
    group_id: int
    tokens: list[int]  # prompt + emitted tokens; the last one is pending (not yet in the KV cache)
    prompt_len: int
    max_new: int
    cache_len: int  # tokens of ``tokens`` already in the KV cache
    generator: torch.Generator | None
    completion: list[int]
    logprobs: list[float]
    finish: str | None = None

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.completion)


@dataclass
class WaveContext:
    """What stays fixed over the decode steps of one ``generate`` call (and the groups still generating)."""

    sampling: SamplingParams
    stops: set[int]
    controller: Controller
    cache: SlotKVCache
    stats: SpecStats
    pbar: tqdm
    hidden_layers: list[int]  # target layers the speculators need (union)
    k_cap: int  # longest draft any row may verify
    n_gen: int  # samples per prompt
    device: torch.device  # the model's (read once per call)
    group_left: dict[int, int] = field(default_factory=dict)  # group id -> rows still generating
    # (observe_hidden, its layers) of each speculator that reads the target's hidden states
    hidden_observers: list[tuple[Callable[..., None], tuple[int, ...]]] = field(default_factory=list)


@dataclass
class PackedStep:
    """One step's verification input: the drafts chosen per row and the forward's token ids."""

    drafts: list[Draft | None]  # per active row, None = no draft
    draft_lens: list[int]  # [n] tokens of each draft
    input_ids: torch.Tensor  # [n, q] long: pending token, draft, right-padded with the pending token
    starts: torch.Tensor  # [n] long: tokens of each row already in the KV cache

    @property
    def num_draft(self) -> int:
        """K: the longest draft of the step."""
        return self.input_ids.shape[1] - 1


@dataclass
class Verified:
    """What verification made of one step, as Python lists (row order of the step)."""

    accepted: list[int]  # [n] draft tokens accepted
    output_ids: list[list[int]]  # [n][K+1] accepted drafts then the recovered/bonus token (padding after)
    logprobs: list[list[float]]  # [n][K+1]


def plan_state(active: list[Row], speculators: list[str], step: int, sampling: SamplingParams) -> PlanState:
    return PlanState(
        row_ids=[r.row_id for r in active],
        group_ids=[r.group_id for r in active],
        remaining=[r.remaining for r in active],
        speculators=speculators,
        step=step,
        greedy=sampling.greedy,
        reproducible=sampling.seed is not None,
    )


def draft_requests(plan: Plan, active: list[Row], k_cap: int) -> dict[str, list[tuple[int, int]]]:
    """Per speculator, the ``(row index, max tokens)`` pairs the plan asks for (lengths capped, zeros dropped)."""
    by_spec: dict[str, list[tuple[int, int]]] = {}
    for i, cands in enumerate(plan):
        for name, k in cands:
            k = min(int(k), k_cap, active[i].remaining - 1)
            if name is not None and k > 0:
                by_spec.setdefault(name, []).append((i, k))
    return by_spec


def propose_all(
    speculators: Mapping[str, Speculator],
    requests: dict[str, list[tuple[int, int]]],
    active: list[Row],
    sampling: SamplingParams,
    stats: SpecStats,
) -> tuple[list[dict[str, Draft]], dict[str, ProposeRecord]]:
    """Each requested speculator once, batched over its rows: the candidate drafts per row and the propose calls."""
    candidates: list[dict[str, Draft]] = [{} for _ in active]
    proposals: dict[str, ProposeRecord] = {}
    for name, pairs in requests.items():
        t0 = time.perf_counter()
        inp = ProposeInput(
            row_ids=[active[i].row_id for i, _ in pairs],
            group_ids=[active[i].group_id for i, _ in pairs],
            token_ids=[active[i].tokens for i, _ in pairs],
            sampling=sampling,
        )
        out = speculators[name].propose(inp, [k for _, k in pairs])
        dt = time.perf_counter() - t0
        stats.propose_s += dt
        stats.speculator(name).propose_s += dt
        proposals[name] = ProposeRecord(len(pairs), sum(k for _, k in pairs), dt)
        for (i, k), d in zip(pairs, out):
            if d is not None and len(d) > 0:
                d = d.truncate(k)
                d.speculator = d.speculator or name
                candidates[i][name] = d
    return candidates, proposals


def cap_drafts(chosen: list[Draft | None], active: list[Row], k_cap: int) -> list[Draft | None]:
    """The controller's choice cut to what each row may still verify (None for empty drafts)."""
    out: list[Draft | None] = []
    for r, d in zip(active, chosen):
        cap = min(k_cap, r.remaining - 1)
        out.append(d.truncate(cap) if d is not None and len(d) > 0 and cap > 0 else None)
    return out


def pack(active: list[Row], drafts: list[Draft | None], device: torch.device) -> PackedStep:
    """``[pending token, draft...]`` of every row, right-padded with its pending token to the longest draft + 1."""
    dlens = [len(d) if d is not None else 0 for d in drafts]
    q = max(dlens) + 1
    ids_list = []
    for r, d in zip(active, drafts):
        row = [r.tokens[-1]]
        if d is not None:
            row.extend(d.token_ids)
        row.extend([r.tokens[-1]] * (q - len(row)))
        ids_list.append(row)
    input_ids = torch.tensor(ids_list, dtype=torch.long, device=device)  # [n, q]
    starts = torch.tensor([r.cache_len for r in active], dtype=torch.long, device=device)  # [n]
    return PackedStep(drafts, dlens, input_ids, starts)


def dense_draft_probs(
    drafts: list[Draft | None], K: int, vocab_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """``[n, K, vocab]`` draft distributions when any draft is soft (one-hot rows for model-free drafts), else None."""
    if K == 0 or not any(d is not None and d.draft_probs is not None for d in drafts):
        return None
    out = torch.zeros((len(drafts), K, vocab_size), dtype=dtype, device=device)
    for i, d in enumerate(drafts):
        if d is None or len(d) == 0:
            continue
        if d.draft_probs is not None:
            out[i, : len(d)] = d.draft_probs.to(device=device, dtype=dtype)
        else:
            pos = torch.arange(len(d), device=device)
            out[i, pos, torch.tensor(d.token_ids, dtype=torch.long, device=device)] = 1.0
    return out


def emit(r: Row, toks: list[int], lps: list[float], stops: set[int]) -> int:
    """Append emitted tokens to a row, honouring stop tokens and the length budget; returns the count."""
    toks = toks[: r.remaining]
    for j, t in enumerate(toks):
        if t in stops:
            toks = toks[: j + 1]
            r.finish = "stop"
            break
    r.completion.extend(toks)
    r.logprobs.extend(lps[: len(toks)])
    r.tokens.extend(toks)
    if r.finish is None and r.remaining <= 0:
        r.finish = "length"
    return len(toks)


def stop_finished_groups(speculators: Mapping[str, Speculator], group_left: dict[int, int]) -> None:
    """``stop`` every group whose rows have all finished, and forget it."""
    for g in [g for g, left in group_left.items() if left == 0]:
        for s in speculators.values():
            s.stop(g)
        del group_left[g]
