"""Timing a costly speculator's drafting on synthetic rows, before its first real step.

The auto controller prices a draft head's proposals by a drafting-cost model it learns from the engine's own
``propose`` timings; a seeded call applies them only when it ends (no decision within a call depends on its
clock), so a fresh engine's first call used to price a head by its multiply-accumulates (a share of a target
forward). On the AMD host that share was 0.11 and the head's real drafting cost 0.17-0.19 of a 4-row step
(``docs/results/tail.md``, 2026-12-03 night): its layers and output rows read bfloat16 weights a target forward has
just evicted, plus per-call work no MAC count sees. Here the engine drives the speculator through its real protocol
(``start``, ``observe``, ``observe_hidden``, ``propose``, ``stop``) on a few synthetic rows of random tokens and
features, once per engine, and hands the controller those timings in place of the prior.

Each timed ``propose`` follows one emitted token and its features per row (what a decode step that accepted
nothing hands the speculator: it catches up one position, then drafts), after the CPU's caches were overwritten
with as many bytes as :data:`EVICT_BYTES` (a target forward streams hundreds of MB between two proposals).

A ``reference`` (the engine's: a rows x 1 target forward) is timed beside the proposals of each row count, one per
repeat, and its median rides on the records (``ProposeRecord.reference_s``): the controller rescales the timings
to the moment its verification cost table was measured (a host that runs 30% slower while the engine is built
must not price drafting 30% dearer against a table timed at full speed; seen on the AMD host, 2026-12-04).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from atlas_rl.speculators.base import ResolvedExtras, Speculator
from atlas_rl.types import ProposeInput, ProposeRecord, SamplingParams

EVICT_BYTES = 64 << 20  # more than the last-level cache of the CPUs measured (32 MiB)
_GROUP_ID = -(1 << 40)  # synthetic group and row ids: negative, never an engine's


@dataclass
class DraftProbeConfig:
    """Which synthetic batches :func:`probe_drafting` times."""

    rows: tuple[int, ...] = field(default=(1, 4, 16), metadata={"help": "Batch sizes timed."})
    depths: tuple[int, ...] = field(default=(1, 3), metadata={"help": "Draft tokens per row timed."})
    prompt_len: int = field(default=32, metadata={"help": "Tokens of the synthetic prompt (>= 1)."})
    repeats: int = field(default=3, metadata={"help": "Timed proposals per (rows, depth); the median is kept."})
    warmup: int = field(
        default=0,
        metadata={
            "help": "Untimed rounds first (2 where drafting replays CUDA graphs: a draft head captures a shape the "
            "second time it meets it, so the timed rounds are replays)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the synthetic tokens and features."})

    def __post_init__(self) -> None:
        if not self.rows or not self.depths or min(self.rows) < 1 or min(self.depths) < 1:
            raise ValueError(f"rows and depths must be non-empty and >= 1, got {self.rows} and {self.depths}")
        if self.prompt_len < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"prompt_len and repeats must be >= 1 and warmup >= 0, got {self.prompt_len}, {self.repeats} and "
                f"{self.warmup}"
            )


@dataclass
class _Batch:
    """The synthetic rows of one probed batch size."""

    spec: Speculator
    observe_hidden: Callable[[list[int], dict[int, torch.Tensor], list[int]], None]
    group: int
    row_ids: list[int]
    seqs: list[list[int]]  # [n] prompt + emitted (the pending token last)
    hidden: int
    vocab: int
    gen: torch.Generator

    def features(self, m: int) -> dict[int, torch.Tensor]:  # layer -> [n, m, hidden]
        n = len(self.row_ids)
        return {la: torch.randn(n, m, self.hidden, generator=self.gen) for la in self.spec.hidden_layers}

    def emit(self, positions: int = 1) -> None:
        """Every row emits one random token; the speculator sees it and the features of the ``positions`` positions
        that now lie on the sequence (the whole prompt after the first token, else the one before it)."""
        toks = torch.randint(0, self.vocab, (len(self.row_ids),), generator=self.gen).tolist()
        for r, s, t in zip(self.row_ids, self.seqs, toks):
            s.append(t)
            self.spec.observe(r, [t])
        self.observe_hidden(self.row_ids, self.features(positions), [positions] * len(self.row_ids))

    def propose(self, depth: int) -> float:
        rows = ProposeInput(self.row_ids, [self.group] * len(self.row_ids), self.seqs, SamplingParams(temperature=0.0))
        t0 = time.perf_counter()
        self.spec.propose(rows, [depth] * len(self.row_ids))
        return time.perf_counter() - t0


def _start(
    spec: Speculator, extras: ResolvedExtras, group: int, n: int, hidden: int, vocab: int, cfg: DraftProbeConfig
) -> _Batch:
    gen = torch.Generator().manual_seed(cfg.seed + n)
    rows = [group * 1024 - i for i in range(n)]
    prompt = torch.randint(0, vocab, (cfg.prompt_len,), generator=gen).tolist()
    spec.start(group, list(prompt), rows)
    b = _Batch(spec, extras.observe_hidden, group, rows, [list(prompt) for _ in rows], hidden, vocab, gen)
    b.emit(cfg.prompt_len)  # the first token, and the prompt's features
    b.propose(max(cfg.depths))  # untimed: the prompt's pass through the draft layers, first-call allocations
    return b


def _evict(scratch: torch.Tensor | None) -> None:
    if scratch is not None:
        scratch.add_(1)


@torch.inference_mode()
def probe_drafting(
    spec: Speculator,
    extras: ResolvedExtras,
    hidden_size: int,
    vocab_size: int,
    device: torch.device,
    config: DraftProbeConfig | None = None,
    reference: Callable[[int], float] | None = None,
) -> list[ProposeRecord]:
    """Time ``spec``'s ``propose`` on synthetic rows: one record per (rows, depth) of ``config``, the median of its
    repeats; with ``reference`` (seconds of a reference for ``rows`` rows), each record also carries the median of
    that reference timed once per repeat between the proposals. Leaves no synthetic row or group behind in
    ``spec`` (also when it raises)."""
    cfg = config or DraftProbeConfig()
    scratch = torch.zeros(EVICT_BYTES // 4, dtype=torch.float32) if device.type == "cpu" else None
    out: list[ProposeRecord] = []
    for n in cfg.rows:
        group = _GROUP_ID - n
        try:
            b = _start(spec, extras, group, n, hidden_size, vocab_size, cfg)
            for _ in range(cfg.warmup):  # untimed: shapes met (and captured where graphs are) before timing
                for depth in cfg.depths:
                    b.emit()
                    b.propose(depth)
            out += _time_depths(b, cfg.depths, cfg.repeats, scratch, reference)
        finally:
            spec.stop(group)
    return out


def _time_depths(
    b: _Batch,
    depths: Sequence[int],
    repeats: int,
    scratch: torch.Tensor | None,
    reference: Callable[[int], float] | None = None,
) -> list[ProposeRecord]:
    n = len(b.row_ids)
    times: dict[int, list[float]] = {d: [] for d in depths}
    refs: list[float] = []
    for _ in range(repeats):  # depths and the reference interleaved: one moment of the host for all of them
        for depth in depths:
            b.emit()
            _evict(scratch)
            times[depth].append(b.propose(depth))
        if reference is not None:
            refs.append(reference(n))
    ref = statistics.median(refs) if refs else None
    return [ProposeRecord(n, n * d, statistics.median(times[d]), ref) for d in depths]
