"""Plain data types shared by every part of atlas-rl.

Vocabulary (fixed for the whole project, see DESIGN.md):

* a *draft* is a chain of tokens proposed by a speculator;
* *accepted* tokens are draft tokens the verifier kept;
* after the first rejection the verifier emits one *recovered* token (sampled from the residual
  distribution); when every draft token was accepted it emits one *bonus* token;
* ``target_probs`` / ``draft_probs`` are the processed (temperature, top-k, top-p) distributions of
  the target model and of the speculator — never "p" and "q";
* **mean acceptance length** = tokens emitted per target verification forward of a sequence, the
  bonus/recovered token included (1.0 means speculation gained nothing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are sampled; applied identically to the target and to every draft distribution.

    Args:
        temperature: 0 means greedy (argmax) decoding; otherwise logits are divided by it.
        top_k: keep the ``top_k`` most likely tokens; 0 (or -1) disables it.
        top_p: nucleus sampling; keep the smallest set of tokens whose mass reaches ``top_p``; 1.0 disables it.
        max_new_tokens: hard upper bound of completion tokens per sequence.
        stop_token_ids: extra token ids that end a sequence (the stop token is kept in the completion).
        ignore_eos: if False (default) the model's EOS token ids also end a sequence.
        seed: makes sampling reproducible (one generator per sequence, derived from the seed and the
            sequence's index in the batch); None draws fresh randomness.

    Logprobs returned by the engine are ``log_softmax`` of the *processed* logits (``logits / temperature``
    with top-k/top-p filtered tokens at -inf), i.e. the log-probability of the distribution the token was
    sampled from. With ``top_k=0, top_p=1`` this is exactly TRL's recompute ``log_softmax(logits / T)``
    (and vLLM's ``logprobs_mode="processed_logprobs"``). For greedy decoding (T=0) it is
    ``log_softmax(logits)``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_temperature(self.temperature)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an int >= 0 (0 or -1 disables it), got {self.top_k!r}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 < p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1.0 disables it), got {p!r}")
        m = self.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {m!r}")
        object.__setattr__(self, "stop_token_ids", _stop_tuple(self.stop_token_ids))
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check_temperature(t: object) -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")


def _stop_tuple(stops: object) -> tuple[int, ...]:
    """``stop_token_ids`` as a tuple of non-negative ints (None -> (), an int -> (int,))."""
    if stops is None:
        return ()
    if isinstance(stops, int):
        stops = (stops,)
    try:
        out = tuple(stops)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"stop_token_ids must be a sequence of ints, got {stops!r}") from None
    for t in out:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"stop_token_ids must hold non-negative ints, got {t!r} in {out!r}")
    return out


@dataclass
class Draft:
    """A chain of proposed tokens for one sequence.

    ``draft_probs`` is ``[len(token_ids), vocab_size]`` — the processed draft distribution each token was
    drawn from — or None for model-free speculators whose drafts are one-hot (deterministic).
    ``confidence`` holds one number in [0, 1] per token: the speculator's own estimate that the token will
    be accepted given that the previous ones were.
    """

    token_ids: list[int]
    draft_probs: torch.Tensor | None = None  # [len(token_ids), vocab_size] or None (one-hot)
    confidence: list[float] = field(default_factory=list)
    speculator: str = ""

    def __post_init__(self) -> None:
        if not self.confidence:
            self.confidence = [1.0] * len(self.token_ids)
        if len(self.confidence) != len(self.token_ids):
            raise ValueError(f"Draft has {len(self.token_ids)} tokens but {len(self.confidence)} confidence values")
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.token_ids):
            raise ValueError(
                f"draft_probs has {self.draft_probs.shape[0]} rows for {len(self.token_ids)} draft tokens"
            )

    def truncate(self, n: int) -> Draft:
        """The first ``n`` tokens of this draft."""
        if n >= len(self.token_ids):
            return self
        return Draft(
            token_ids=self.token_ids[:n],
            draft_probs=None if self.draft_probs is None else self.draft_probs[:n],
            confidence=self.confidence[:n],
            speculator=self.speculator,
        )

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class ProposeInput:
    """What a speculator sees of the rows it drafts for, in one engine step.

    ``token_ids[i]`` is the full sequence of row i so far (prompt + emitted tokens, the last one being the
    *pending* token that is not yet in the target's KV cache). It is the engine's own list: read it, never
    modify it.

    """

    row_ids: list[int]
    group_ids: list[int]
    token_ids: list[list[int]]
    sampling: SamplingParams | None = None

    def __len__(self) -> int:
        return len(self.row_ids)


@dataclass
class VerifyResult:
    """Output of a verifier for a batch of n rows with drafts padded to K tokens.

    ``num_accepted[i]`` draft tokens of row i were accepted; row i emits ``num_accepted[i] + 1`` tokens:
    ``output_ids[i, :num_accepted[i] + 1]`` (accepted drafts, then the recovered or bonus token), with
    ``logprobs`` the target's processed log-probabilities of those tokens.
    """

    num_accepted: torch.Tensor  # [n] long
    output_ids: torch.Tensor  # [n, K+1] long, valid up to num_accepted + 1
    logprobs: torch.Tensor  # [n, K+1] float, valid up to num_accepted + 1


@dataclass
class CaptureRecord:
    """One verification forward as seen by the opt-in capture hook (training data for learned speculators).

    For row i, positions ``0 .. num_valid[i]-1`` of the forward lie on the final sequence: position j's
    input token is ``input_ids[i, j]`` and the target's output there predicted ``next_ids[i, j]`` (the token
    actually emitted after it). Positions past ``num_valid[i]`` held rejected drafts or padding.
    Tensors are the engine's own (not copied): copy what you keep.

    A prefill record (``is_prefill``) covers the unique prompts of a group chunk (``row_ids`` empty; row g of
    the record is prompt g of the chunk, padded to the longest, sampled by the rows ``prompt_rows[g]``):
    ``num_valid`` counts the prompt positions whose next token is a prompt token, ``target_logits`` is empty
    and ``last_logits`` ``[n, vocab]`` holds the logits at each prompt's last position (the distribution of
    the first completion token).
    """

    policy_version: int
    row_ids: list[int]
    input_ids: torch.Tensor  # [n, q] long
    next_ids: torch.Tensor  # [n, q] long (valid up to num_valid)
    num_valid: torch.Tensor  # [n] long
    positions: torch.Tensor  # [n, q] long, absolute positions in each sequence
    hidden_states: dict[int, torch.Tensor]  # layer index -> [n, q, hidden]; -1 is the final-norm output
    target_logits: torch.Tensor  # [n, q, vocab] raw (unprocessed) logits
    sampling: SamplingParams
    is_prefill: bool = False
    last_logits: torch.Tensor | None = None  # [n, vocab] prefill only
    prompt_rows: list[list[int]] | None = None  # prefill only: the rows sampling each prompt
    # [n, q, vocab] log_softmax(target_logits), the T = 1 distribution, when the verifier computed it anyway (greedy
    # or T = 1 unfiltered sampling); None otherwise. Like every tensor here, valid during the hook only
    target_logprobs: torch.Tensor | None = None


def _add_into(dst: list[int], src: list[int]) -> None:
    """``dst += src`` element-wise, growing ``dst`` with zeros to the length of ``src``."""
    dst.extend([0] * (len(src) - len(dst)))
    for j, v in enumerate(src):
        dst[j] += v


@dataclass
class AcceptanceCounters:
    """The acceptance counters (vLLM's names) of verification forwards of rows: the one counters type of the engine's
    totals (:class:`SpecStats`), each speculator's share (:class:`SpeculatorStats`) and the offline replay
    (``atlas_rl.speculators.replay.ReplayStats``).

    Every row forward counts in ``num_row_forwards`` and ``num_emitted_tokens``; one with a non-empty draft also
    counts as a draft (``num_drafts``, ``num_draft_tokens``, ``num_accepted_tokens`` and the per-position counts).
    """

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens emitted by the counted row forwards (bonus/recovered included)
    num_row_forwards: int = 0  # verification forwards of one row
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    num_draft_tokens_per_pos: list[int] = field(default_factory=list)

    def record(self, draft_len: int, accepted: int, emitted: int) -> None:
        """Count one row forward that verified ``draft_len`` draft tokens (0: none), accepted the first
        ``accepted`` of them and emitted ``emitted`` tokens."""
        self.num_row_forwards += 1
        self.num_emitted_tokens += emitted
        if draft_len <= 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += draft_len
        self.num_accepted_tokens += accepted
        grow = draft_len - len(self.num_draft_tokens_per_pos)
        if grow > 0:
            self.num_draft_tokens_per_pos.extend([0] * grow)
        grow = draft_len - len(self.num_accepted_tokens_per_pos)
        if grow > 0:
            self.num_accepted_tokens_per_pos.extend([0] * grow)
        for j in range(draft_len):
            self.num_draft_tokens_per_pos[j] += 1
        for j in range(accepted):
            self.num_accepted_tokens_per_pos[j] += 1

    def merge(self, other: AcceptanceCounters) -> None:
        """Accumulate ``other``'s counters into this object."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        self.num_emitted_tokens += other.num_emitted_tokens
        self.num_row_forwards += other.num_row_forwards
        _add_into(self.num_draft_tokens_per_pos, other.num_draft_tokens_per_pos)
        _add_into(self.num_accepted_tokens_per_pos, other.num_accepted_tokens_per_pos)

    def counters(self) -> AcceptanceCounters:
        """A copy of just the counters."""
        return AcceptanceCounters(
            self.num_drafts,
            self.num_draft_tokens,
            self.num_accepted_tokens,
            self.num_emitted_tokens,
            self.num_row_forwards,
            list(self.num_accepted_tokens_per_pos),
            list(self.num_draft_tokens_per_pos),
        )

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification forward of a row (bonus/recovered token included)."""
        return self.num_emitted_tokens / self.num_row_forwards if self.num_row_forwards else float("nan")

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / proposed draft tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """For each draft position j: accepted / proposed at j (conditional on a draft reaching j)."""
        return [
            a / d if d else float("nan")
            for a, d in zip(self.num_accepted_tokens_per_pos, self.num_draft_tokens_per_pos)
        ]


@dataclass
class SpeculatorStats(AcceptanceCounters):
    """The counters of the rows that verified one speculator's drafts, its drafting time and its calibration."""

    propose_s: float = 0.0
    # predicted vs realised acceptance of draft tokens whose outcome was observed (the controller fills it):
    # CALIBRATION_BINS rows of [tokens, sum of predicted acceptance, sum of realised acceptance (0/1)],
    # binned by the predicted value
    calibration: list[list[float]] = field(default_factory=list)

    def add_calibration(self, predicted: float, accepted: bool) -> None:
        """Count one draft token whose acceptance was predicted as ``predicted`` and then observed."""
        if not self.calibration:
            self.calibration = [[0.0, 0.0, 0.0] for _ in range(CALIBRATION_BINS)]
        b = self.calibration[min(CALIBRATION_BINS - 1, max(0, int(predicted * CALIBRATION_BINS)))]
        b[0] += 1.0
        b[1] += predicted
        b[2] += float(accepted)

    @property
    def calibration_error(self) -> float:
        """Expected calibration error: sum over bins of |predicted - realised| accepted tokens / tokens."""
        return _calibration_error(self.calibration)

    @property
    def mean_predicted_acceptance(self) -> float:
        n = sum(b[0] for b in self.calibration)
        return sum(b[1] for b in self.calibration) / n if n else float("nan")

    @property
    def mean_realised_acceptance(self) -> float:
        n = sum(b[0] for b in self.calibration)
        return sum(b[2] for b in self.calibration) / n if n else float("nan")

    def merge(self, other: AcceptanceCounters) -> None:
        AcceptanceCounters.merge(self, other)
        if isinstance(other, SpeculatorStats):
            self.propose_s += other.propose_s
            self.calibration = _merge_calibration(self.calibration, other.calibration)


CALIBRATION_BINS = 10


def _calibration_error(bins: list[list[float]]) -> float:
    n = sum(b[0] for b in bins)
    return sum(abs(b[1] - b[2]) for b in bins) / n if n else float("nan")


def _merge_calibration(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    if not b:
        return a
    if not a:
        return [list(x) for x in b]
    return [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


@dataclass
class ProposeRecord:
    """One speculator's ``propose`` call in one engine step."""

    rows: int  # rows it drafted for
    tokens: int  # sum over those rows of the draft tokens asked for (max_tokens)
    seconds: float
    # a probe's: the median seconds of a reference timed beside it (a rows x 1 target forward), else None
    reference_s: float | None = None


@dataclass
class StepRecord:
    """One engine decode step: how many rows were active, how wide the forward was, what it emitted."""

    num_rows: int
    query_len: int  # tokens per row in the forward (longest draft + 1)
    num_emitted: int
    num_draft_tokens: int
    num_accepted: int
    forward_s: float
    step_s: float
    proposals: dict[str, ProposeRecord] = field(default_factory=dict)  # per speculator called this step


@dataclass
class SpecStats(AcceptanceCounters):
    """Statistics of one or more ``generate`` calls, kept apart from any logger or exporter.

    The acceptance counters (:class:`AcceptanceCounters`) count every decode-step row forward:
    ``mean_acceptance_length`` counts decode-step verification forwards only; the first token of each sequence
    comes out of the prefill forward and is counted in ``num_prefill_tokens``.
    """

    num_sequences: int = 0
    num_steps: int = 0  # decode forwards of the whole batch
    num_prefill_tokens: int = 0  # first tokens, sampled from the prefill forward
    num_prefill_positions: int = 0  # (padded) prompt positions run through the target in prefill forwards
    num_completion_tokens: int = 0  # all completion tokens returned
    num_spec_off_row_steps: int = 0  # row-steps verified without any draft
    per_speculator: dict[str, SpeculatorStats] = field(default_factory=dict)
    prefill_s: float = 0.0
    propose_s: float = 0.0
    forward_s: float = 0.0
    verify_s: float = 0.0
    plan_s: float = 0.0
    total_s: float = 0.0
    steps: list[StepRecord] = field(default_factory=list)
    policy_version: int = 0

    def record_row(self, speculator: str | None, draft_len: int, accepted: int, emitted: int) -> None:
        """Count one decode-step row forward in the totals and, when it verified a draft, in ``speculator``'s."""
        self.record(draft_len, accepted, emitted)
        if speculator is None or draft_len <= 0:
            self.num_spec_off_row_steps += 1
        else:
            self.speculator(speculator).record(draft_len, accepted, emitted)

    @property
    def tokens_per_s(self) -> float:
        return self.num_completion_tokens / self.total_s if self.total_s > 0 else float("nan")

    @property
    def target_forwards_per_token(self) -> float:
        return 1.0 / self.mean_acceptance_length if self.num_row_forwards else float("nan")

    @property
    def draft_len_histogram(self) -> list[int]:
        """Decode steps by the longest draft verified in the step (index k = k draft tokens; 0 = no speculation)."""
        hist: list[int] = []
        for s in self.steps:
            k = s.query_len - 1
            hist.extend([0] * (k + 1 - len(hist)))
            hist[k] += 1
        return hist

    @property
    def num_spec_off_steps(self) -> int:
        """Decode steps verified without any draft (speculation off for the whole batch)."""
        return sum(1 for s in self.steps if s.query_len == 1)

    @property
    def plan_ms_per_step(self) -> float:
        """The controller's overhead (plan + choose + update) per decode step, in milliseconds."""
        return 1000.0 * self.plan_s / self.num_steps if self.num_steps else float("nan")

    @property
    def calibration(self) -> list[list[float]]:
        """Predicted vs realised acceptance over every speculator (see :attr:`SpeculatorStats.calibration`)."""
        out: list[list[float]] = []
        for s in self.per_speculator.values():
            out = _merge_calibration(out, s.calibration)
        return out

    @property
    def calibration_error(self) -> float:
        return _calibration_error(self.calibration)

    def speculator(self, name: str) -> SpeculatorStats:
        if name not in self.per_speculator:
            self.per_speculator[name] = SpeculatorStats()
        return self.per_speculator[name]

    def merge(self, other: AcceptanceCounters) -> None:
        """Accumulate ``other`` into this object (e.g. over the steps of an RL run)."""
        AcceptanceCounters.merge(self, other)
        if not isinstance(other, SpecStats):
            return
        for name in _SPEC_STATS_SUMS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name, s in other.per_speculator.items():
            self.speculator(name).merge(s)
        self.steps.extend(other.steps)
        self.policy_version = max(self.policy_version, other.policy_version)

    def regime(self, max_rows: int | None = None, min_rows: int | None = None) -> dict[str, float]:
        """Emitted tokens, wall time and mean acceptance length over the decode steps whose number of
        active rows lies in ``[min_rows, max_rows]`` (e.g. the long tail of a batch: ``max_rows=8``)."""
        sel = [
            s
            for s in self.steps
            if (max_rows is None or s.num_rows <= max_rows) and (min_rows is None or s.num_rows >= min_rows)
        ]
        tokens = sum(s.num_emitted for s in sel)
        secs = sum(s.step_s for s in sel)
        row_fwd = sum(s.num_rows for s in sel)
        return {
            "steps": len(sel),
            "tokens": tokens,
            "seconds": secs,
            "tokens_per_s": tokens / secs if secs > 0 else float("nan"),
            "mean_acceptance_length": tokens / row_fwd if row_fwd else float("nan"),
        }

    def to_dict(self, with_steps: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not with_steps:
            d.pop("steps")
        d["mean_acceptance_length"] = self.mean_acceptance_length
        d["acceptance_rate"] = self.acceptance_rate
        d["tokens_per_s"] = self.tokens_per_s
        d["draft_len_histogram"] = self.draft_len_histogram
        d["num_spec_off_steps"] = self.num_spec_off_steps
        d["plan_ms_per_step"] = self.plan_ms_per_step
        d["calibration_error"] = self.calibration_error
        for name, s in self.per_speculator.items():
            sd = d["per_speculator"][name]
            sd["mean_acceptance_length"] = s.mean_acceptance_length
            sd["acceptance_rate"] = s.acceptance_rate
            sd["row_share"] = s.num_drafts / self.num_row_forwards if self.num_row_forwards else float("nan")
            sd["token_share"] = s.num_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else float("nan")
            sd["calibration_error"] = s.calibration_error
            sd["mean_predicted_acceptance"] = s.mean_predicted_acceptance
            sd["mean_realised_acceptance"] = s.mean_realised_acceptance
        return d


_SPEC_STATS_SUMS = (
    "num_sequences",
    "num_steps",
    "num_prefill_tokens",
    "num_prefill_positions",
    "num_completion_tokens",
    "num_spec_off_row_steps",
    "prefill_s",
    "propose_s",
    "forward_s",
    "verify_s",
    "plan_s",
    "total_s",
)


@dataclass
class RolloutBatch:
    """The result of ``RolloutEngine.generate``.

    Rows are grouped by prompt: rows ``g*num_generations .. (g+1)*num_generations-1`` are the samples of
    prompt ``g``. ``logprobs[i][t]`` is the processed log-probability of ``completion_ids[i][t]`` (see
    ``SamplingParams``).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[FinishReason]
    num_generations: int
    stats: SpecStats
    policy_version: int

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def group_ids(self) -> list[int]:
        return [i // self.num_generations for i in range(len(self.completion_ids))]

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @classmethod
    def empty(cls, num_generations: int, policy_version: int) -> RolloutBatch:
        return cls([], [], [], [], num_generations, SpecStats(policy_version=policy_version), policy_version)


PromptIds = Sequence[Sequence[int]] | Sequence[int] | torch.Tensor | Mapping[str, Any]
"""Prompts as ``RolloutEngine.generate`` takes them (see :func:`as_token_lists`)."""


def as_token_lists(prompt_ids: PromptIds) -> list[list[int]]:
    """Normalise prompts to ``list[list[int]]`` (no padding).

    Accepted: a list of token-id lists; a 2-D tensor ``[num_prompts, length]`` (no padding); one prompt as a
    list of ints or a 1-D tensor; or what a tokenizer returns — a ``BatchEncoding`` / dict with ``input_ids``
    (any of the above; e.g. ``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``), whose
    ``attention_mask``, when present, drops the padding positions.
    """
    if isinstance(prompt_ids, Mapping):
        return _from_encoding(prompt_ids)
    if isinstance(prompt_ids, torch.Tensor):
        return _from_tensor(prompt_ids, "prompt_ids")
    if isinstance(prompt_ids, (str, bytes)):
        raise ValueError("prompt_ids must be token ids (list[list[int]]), not a string: tokenize the prompt first")
    items = list(prompt_ids)
    if items and all(_is_token(t) for t in items):
        return [_token_row(items, 0)]  # one prompt given as a flat list of ids
    return [_token_row(p, i) for i, p in enumerate(items)]


def _is_token(t: object) -> bool:
    if isinstance(t, torch.Tensor):
        return t.dim() == 0 and not t.is_floating_point()
    return not isinstance(t, bool) and hasattr(t, "__index__")


def _from_tensor(t: torch.Tensor, what: str) -> list[list[int]]:
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise ValueError(f"{what} as a tensor must be 2-D [num_prompts, length] or 1-D, got {tuple(t.shape)}")
    if t.is_floating_point():
        raise ValueError(f"{what} must hold integer token ids, got a {t.dtype} tensor")
    return [list(map(int, row)) for row in t.tolist()]


def _from_encoding(enc: Mapping[str, Any]) -> list[list[int]]:
    """``input_ids`` of a tokenizer's output, without the positions its ``attention_mask`` marks as padding."""
    if "input_ids" not in enc:
        raise ValueError(f"prompt_ids as a mapping must hold 'input_ids' (a tokenizer's output), got keys {list(enc)}")
    rows = as_token_lists(enc["input_ids"])
    mask = enc.get("attention_mask")
    if mask is None:
        return rows
    masks = as_token_lists(mask)
    if [len(m) for m in masks] != [len(r) for r in rows]:
        raise ValueError("prompt_ids: attention_mask and input_ids have different shapes")
    return [[t for t, keep in zip(r, m) if keep] for r, m in zip(rows, masks)]


def _token_row(p: object, i: int) -> list[int]:
    """One prompt's ids as ints, with an error naming the prompt when it is not a sequence of integers."""
    if isinstance(p, torch.Tensor):
        p = p.tolist()
    if isinstance(p, (str, bytes, int)) or not isinstance(p, Iterable):
        raise ValueError(
            f"prompt_ids[{i}] must be a list of token ids, got {type(p).__name__}: pass a list of prompts"
        )
    row = []
    for t in p:
        if not isinstance(t, int) or isinstance(t, bool):
            try:
                t = int(t)
            except (TypeError, ValueError):
                raise ValueError(f"prompt_ids[{i}] holds a non-integer token {t!r}") from None
        row.append(t)
    return row
