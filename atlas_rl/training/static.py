"""The static speculator: a draft head trained once, offline, on the target's own answers to broad prompts.

Pipeline (:func:`train_static_speculator`; the recipe ``recipes/train_static_speculator.py`` adds model loading,
the prompt set and chat templating around it):

1. **Self-distillation data.** The target answers every training prompt through the real engine without
   speculation (``RolloutEngine(model, speculators=[])``), once per temperature of ``gen_temperatures`` (e.g. a
   greedy answer and a T=1 sample). A :class:`~atlas_rl.training.buffer.CaptureBuffer` on the engine turns the
   forwards it runs anyway into :class:`~atlas_rl.training.samples.SequenceSample` s (features of the head's
   ``fuse_layers`` and top-K soft labels of the target's T=1 distribution): no extra target forward. Samples are
   cached in ``<output_dir>/data/`` (safetensors, keyed by every setting they depend on), so retraining does
   not regenerate.
2. **Draft vocabulary.** The ``draft_vocab_size`` target tokens with the largest expected frequency in the
   generated data (emitted completion tokens plus the target's probability mass at every labelled position).
3. **Training-time test.** AdamW on :func:`~atlas_rl.training.losses.ttt_loss` (the head unrolled
   ``ttt_steps`` times on its own predictions, soft cross-entropy against the target, step j weighted
   ``ttt_decay ** (j-1)``), length-bucketed batches of about ``batch_tokens`` positions, linear warmup then
   cosine decay, gradient clipping; ``epochs`` over the data or until ``max_train_minutes``.
4. **Held-out evaluation through the real engine.** Mean acceptance length (emitted tokens per verification
   forward of a sequence) with ``FixedController(eval_k)`` on held-out prompts at every ``eval_temperatures``,
   for the static head and the baselines (``"suffix"``: :class:`~atlas_rl.speculators.SuffixSpeculator`;
   ``"none"``: plain decoding, τ = 1 by definition), plus whether greedy output with the head is token-identical
   to plain decoding and how much of the held-out completions the draft vocabulary covers.
5. **Checkpoint.** fp16 safetensors (frozen output rows are not stored) with a JSON card in its metadata and
   next to it: data, steps, training curve, held-out figures, the command.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig, target_fingerprint
from atlas_rl.training.losses import ttt_loss
from atlas_rl.training.samples import SequenceSample, collate

logger = logging.getLogger(__name__)

__all__ = [
    "StaticSpeculatorConfig",
    "StaticSpeculatorResult",
    "build_draft_vocab",
    "cached_samples",
    "chat_prompt_ids",
    "evaluate_acceptance",
    "feature_scale",
    "generate_samples",
    "load_samples",
    "save_samples",
    "save_static_checkpoint",
    "train_head",
    "train_static_speculator",
    "vocab_coverage",
]

SAMPLES_FORMAT = "atlas-rl/sequence-samples/v1"
BASELINES = ("none", "suffix")


@dataclass
class StaticSpeculatorConfig:
    """Settings of the static-speculator pipeline (see the module docstring for the steps).

    Groups: run (``output_dir``, ``seed``, ``num_threads``), data (``gen_*``, ``label_top_k``), head
    (``fuse_layers``, ``draft_vocab_size``, ``intermediate_size``, ``train_lm_head``), training (``ttt_*``,
    ``epochs``, ``batch_tokens``, ``max_len``, ``lr``..., ``max_train_minutes``), evaluation (``eval_*``).
    """

    # ---- run
    output_dir: str = field(
        default="runs/static_speculator",
        metadata={"help": "Where cached data, logs and the checkpoint go (gitignored runs/ by default)."},
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of generated training data (None: <output_dir>/data), keyed by its settings."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds generation sampling, initialisation and batch order."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch intra-op threads (None: torch's default). On a CPU shared with other jobs, 1 thread "
            "avoids OpenMP spin-wait stalls (measured 5x faster decoding than 2 threads under load)."
        },
    )
    # ---- data
    gen_temperatures: tuple[float, ...] = field(
        default=(0.0, 1.0),
        metadata={"help": "One target answer per training prompt and temperature (0 = greedy) is generated."},
    )
    gen_max_new_tokens: int = field(default=160, metadata={"help": "Longest generated answer (tokens)."})
    gen_max_rows: int = field(default=128, metadata={"help": "Rows the engine decodes at once while generating."})
    label_top_k: int = field(default=32, metadata={"help": "Soft labels kept per position (target top-K tokens)."})
    # ---- head
    fuse_layers: tuple[int, ...] = field(
        default=(3, 15, 28),
        metadata={"help": "Target hidden_states indices fused as features (low, mid, high; -1 = final norm)."},
    )
    draft_vocab_size: int = field(default=8192, metadata={"help": "Tokens the head can propose (most frequent)."})
    intermediate_size: int = field(default=1536, metadata={"help": "MLP width of the draft layer."})
    train_lm_head: bool = field(
        default=False,
        metadata={"help": "Train (and store) the output rows; else frozen copies of the target's, not stored."},
    )
    # ---- training
    ttt_steps: int = field(default=4, metadata={"help": "Training-time-test unroll length (draft steps trained)."})
    ttt_decay: float = field(default=0.7, metadata={"help": "Loss weight of unroll step j is ttt_decay ** (j-1)."})
    teacher_forced_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Fraction of the planned optimizer steps trained with the first step only (teacher forcing, "
            "~3x cheaper per position) before the full training-time test: a cheap warm start."
        },
    )
    teacher_forced_batch_factor: int = field(
        default=2, metadata={"help": "Teacher-forced steps take batches this many times larger (cheaper steps)."}
    )
    precondition_features: bool = field(
        default=True,
        metadata={
            "help": "Train the fuse layer on features divided by their per-dimension RMS (folded back into the "
            "weights at the end): the target's few massive-activation dimensions then do not dominate AdamW's steps."
        },
    )
    init_norm_from_target: bool = field(
        default=False,
        metadata={
            "help": "Start the head's final norm from the target's (the output rows then see the target's scale; "
            "measured slower early on, as a random start gives sharper wrong logits)."
        },
    )
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training data (fractions allowed)."})
    batch_tokens: int = field(
        default=4096, metadata={"help": "Positions per batch (sequences x padded length), length-bucketed."}
    )
    max_len: int = field(default=384, metadata={"help": "Sequences are cut to their last max_len positions."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Cosine decay ends at lr * min_lr_ratio."})
    warmup_steps: int = field(default=30, metadata={"help": "Linear learning-rate warmup steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm (0 = off)."})
    max_train_minutes: float | None = field(
        default=None,
        metadata={"help": "Stop training after this many minutes even if epochs are left (None: no cap)."},
    )
    log_every: int = field(default=20, metadata={"help": "Record the training curve every this many steps."})
    # ---- evaluation
    eval_k: int = field(default=4, metadata={"help": "Draft length of the held-out evaluation (FixedController)."})
    eval_temperatures: tuple[float, ...] = field(
        default=(0.0, 1.0), metadata={"help": "Held-out evaluation temperatures (0 = greedy)."}
    )
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Completion tokens per held-out prompt."})
    eval_baselines: tuple[str, ...] = field(
        default=BASELINES, metadata={"help": "Baselines evaluated next to the head: 'none', 'suffix'."}
    )
    eval_none_temperatures: tuple[float, ...] = field(
        default=(0.0,),
        metadata={
            "help": "Temperatures at which the 'none' baseline runs (its mean acceptance length is 1 by definition; "
            "at T=0 it also checks that the head's greedy output is token-identical)."
        },
    )
    eval_seed: int = field(default=1234, metadata={"help": "Sampling seed of the held-out runs (T > 0)."})
    checkpoint_name: str = field(
        default="static_head.safetensors", metadata={"help": "File name of the checkpoint in output_dir."}
    )

    def __post_init__(self) -> None:
        self.gen_temperatures = tuple(float(t) for t in self.gen_temperatures)
        self.eval_temperatures = tuple(float(t) for t in self.eval_temperatures)
        self.fuse_layers = tuple(int(x) for x in self.fuse_layers)
        self.eval_baselines = tuple(str(b) for b in self.eval_baselines)
        self.eval_none_temperatures = tuple(float(t) for t in self.eval_none_temperatures)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if not self.gen_temperatures or any(t < 0 for t in self.gen_temperatures):
            raise ValueError(f"gen_temperatures needs temperatures >= 0 (0 = greedy), got {self.gen_temperatures}")
        if any(t < 0 for t in self.eval_temperatures):
            raise ValueError(f"eval_temperatures must be >= 0 (0 = greedy), got {self.eval_temperatures}")
        for name in ("gen_max_new_tokens", "gen_max_rows", "label_top_k", "draft_vocab_size", "intermediate_size"):
            _positive_int(self, name)
        for name in ("ttt_steps", "batch_tokens", "max_len", "log_every", "eval_max_new_tokens"):
            _positive_int(self, name)
        if self.num_threads is not None:
            _positive_int(self, "num_threads")
        if isinstance(self.eval_k, bool) or not isinstance(self.eval_k, int) or self.eval_k < 1:
            raise ValueError(f"eval_k must be an int >= 1 (the evaluated draft length), got {self.eval_k!r}")
        if not self.fuse_layers:
            raise ValueError("fuse_layers needs at least one target layer, e.g. (3, 15, 28) or (-1,)")
        if not 0.0 <= self.teacher_forced_fraction < 1.0:
            raise ValueError(f"teacher_forced_fraction must be in [0, 1), got {self.teacher_forced_fraction}")
        _positive_int(self, "teacher_forced_batch_factor")
        if not 0.0 < self.ttt_decay <= 1.0:
            raise ValueError(f"ttt_decay must be in (0, 1], got {self.ttt_decay}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_steps, weight_decay and grad_clip must be >= 0")
        if self.max_train_minutes is not None and not self.max_train_minutes > 0:
            raise ValueError(f"max_train_minutes must be > 0 or None (no cap), got {self.max_train_minutes}")
        unknown = [b for b in self.eval_baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown eval_baselines {unknown}; choose from {list(BASELINES)}")
        if not self.checkpoint_name.endswith(".safetensors"):
            raise ValueError(f"checkpoint_name must end with .safetensors, got {self.checkpoint_name!r}")

    @property
    def data_cache_dir(self) -> Path:
        """Where generated training data is cached."""
        return Path(self.data_dir) if self.data_dir else Path(self.output_dir) / "data"


def _positive_int(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {v!r}")


@dataclass
class StaticSpeculatorResult:
    """What :func:`train_static_speculator` produced."""

    head: DraftHead  # fp32, bound to the target
    card: dict[str, Any]
    checkpoint: Path  # the fp16 safetensors file (card in its metadata and in ``checkpoint.with_suffix('.json')``)


# ---------------------------------------------------------------------------------------------------------------
# 1. data
# ---------------------------------------------------------------------------------------------------------------


def chat_prompt_ids(tokenizer: Any, prompt: dict[str, Any]) -> list[int]:
    """Token ids of a broad prompt (``{"prompt", "system"?}``) in the target's chat format, ending with the
    assistant header (``apply_chat_template(..., add_generation_prompt=True)``)."""
    messages = [{"role": "system", "content": prompt["system"]}] if prompt.get("system") else []
    messages.append({"role": "user", "content": prompt["prompt"]})
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def save_samples(path: str | Path, samples: Sequence[SequenceSample], meta: dict[str, Any] | None = None) -> None:
    """Store samples as flat safetensors tensors (no pickle): positions concatenated, ``offsets`` per sample."""
    from safetensors.torch import save_file

    if not samples:
        raise ValueError("save_samples needs at least one sample")
    lens = torch.tensor([len(s) for s in samples], dtype=torch.long)
    tensors = {
        "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
        "policy_version": torch.tensor([s.policy_version for s in samples], dtype=torch.long),
        "tokens": torch.cat([s.tokens for s in samples]).long(),
        "feats": torch.cat([s.feats for s in samples]).contiguous(),
        "has_feats": torch.cat([s.has_feats for s in samples]),
        "label_ids": torch.cat([s.label_ids for s in samples]).to(torch.int32),
        "label_probs": torch.cat([s.label_probs for s in samples]).float(),
        "label_mask": torch.cat([s.label_mask for s in samples]),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": SAMPLES_FORMAT, "meta": json.dumps(meta or {})})
    tmp.replace(path)  # atomic: an interrupted run never leaves a half-written cache


def load_samples(path: str | Path) -> tuple[list[SequenceSample], dict[str, Any]]:
    """Inverse of :func:`save_samples`; returns ``(samples, meta)``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SAMPLES_FORMAT:
            raise ValueError(f"{path} is not an atlas-rl sample file (format {meta.get('format')!r})")
        t = {k: f.get_tensor(k) for k in f.keys()}
    off = t["offsets"].tolist()
    out = []
    for i in range(len(off) - 1):
        a, b = off[i], off[i + 1]
        out.append(
            SequenceSample(
                tokens=t["tokens"][a:b],
                feats=t["feats"][a:b],
                has_feats=t["has_feats"][a:b],
                label_ids=t["label_ids"][a:b].long(),
                label_probs=t["label_probs"][a:b],
                label_mask=t["label_mask"][a:b],
                policy_version=int(t["policy_version"][i]),
            )
        )
    return out, json.loads(meta.get("meta", "{}"))


def generate_samples(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    temperature: float,
    max_new_tokens: int,
    fuse_layers: tuple[int, ...],
    label_top_k: int = 32,
    max_rows: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[SequenceSample], dict[str, Any]]:
    """The target answers ``prompts`` (engine, no speculation); the capture hook turns its forwards into samples.

    Prompts are decoded in order of length (less padding in prefill); the samples come back in prompt order,
    one per prompt: prompt + completion tokens, features of ``fuse_layers`` at every position but the last,
    soft labels on the completion positions (and the last prompt position). Returns ``(samples, stats)``.
    """
    from atlas_rl.config import EngineConfig
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.training.buffer import CaptureBuffer, CaptureBufferConfig
    from atlas_rl.types import SamplingParams

    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    engine = RolloutEngine(model, speculators=[], config=EngineConfig(max_rows=max_rows, progress=progress))
    buf = CaptureBuffer(CaptureBufferConfig(fuse_layers=fuse_layers, top_k=label_top_k, max_positions=None))
    handle = buf.attach(engine)
    t0 = time.perf_counter()
    try:
        batch = engine.generate(
            [list(prompts[i]) for i in order],
            SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed),
        )
        buf.flush()
    finally:
        handle.remove()
        engine.release()
    wall = time.perf_counter() - t0
    got = buf.samples()
    if len(got) != len(order):
        raise RuntimeError(f"the capture buffer assembled {len(got)} samples for {len(order)} rows")
    samples: list[SequenceSample | None] = [None] * len(prompts)
    for k, (i, s) in enumerate(zip(order, got)):
        expect = list(prompts[i]) + batch.completion_ids[k]
        if s.tokens.tolist() != expect:
            raise RuntimeError(f"captured sample {k} does not match the generated sequence (prompt {i})")
        samples[i] = s
    n_tok = sum(len(c) for c in batch.completion_ids)
    stats = {
        "temperature": temperature,
        "responses": len(prompts),
        "completion_tokens": n_tok,
        "stopped": sum(r == "stop" for r in batch.finish_reasons),
        "wall_s": round(wall, 1),
        "tokens_per_s": round(n_tok / wall, 1) if wall > 0 else None,
    }
    logger.info(
        "generated %d answers at T=%g: %d tokens in %.0f s (%.1f tok/s)",
        len(prompts),
        temperature,
        n_tok,
        wall,
        n_tok / max(wall, 1e-9),
    )
    return [s for s in samples if s is not None], stats


def _data_key(model: torch.nn.Module, prompts: Sequence[Sequence[int]], settings: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(target_fingerprint(model).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p in prompts:
        h.update(b"|" + ",".join(map(str, p)).encode())
    return h.hexdigest()[:16]


def cached_samples(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    config: StaticSpeculatorConfig,
    temperature: float,
    cache_dir: Path,
    progress: bool = True,
) -> tuple[list[SequenceSample], dict[str, Any]]:
    """:func:`generate_samples`, cached under ``cache_dir`` by a key of every setting the samples depend on."""
    settings = {
        "temperature": temperature,
        "max_new_tokens": config.gen_max_new_tokens,
        "fuse_layers": list(config.fuse_layers),
        "label_top_k": config.label_top_k,
        "seed": config.seed,
    }
    path = cache_dir / f"samples_T{temperature:g}_{_data_key(model, prompts, settings)}.safetensors"
    if path.is_file():
        samples, meta = load_samples(path)
        logger.info("loaded %d cached samples from %s", len(samples), path)
        return samples, {**meta.get("stats", {}), "cached": True}
    samples, stats = generate_samples(
        model,
        prompts,
        temperature,
        config.gen_max_new_tokens,
        config.fuse_layers,
        config.label_top_k,
        config.gen_max_rows,
        seed=config.seed,
        progress=progress,
    )
    save_samples(path, samples, meta={"settings": settings, "stats": stats})
    return samples, {**stats, "cached": False}


# ---------------------------------------------------------------------------------------------------------------
# 2. draft vocabulary
# ---------------------------------------------------------------------------------------------------------------


def build_draft_vocab(samples: Sequence[SequenceSample], target_vocab_size: int, size: int) -> torch.Tensor:
    """The ``size`` target tokens with the largest expected frequency, most frequent first: ``[size]`` long.

    Score of a token = its count among emitted completion tokens + the target's probability mass on it summed
    over every labelled position (top-K labels), so likely-but-unsampled tokens rank too. Ties (and the tail,
    when fewer tokens were seen) fall back to prompt-token counts, then to token id order.
    """
    if size > target_vocab_size:
        raise ValueError(f"draft vocabulary size {size} exceeds the target vocabulary ({target_vocab_size})")
    score = torch.zeros(target_vocab_size, dtype=torch.float64)
    prompt_count = torch.zeros(target_vocab_size, dtype=torch.float64)
    for s in samples:
        idx = torch.nonzero(s.label_mask).flatten()
        first = int(idx[0]) + 1 if idx.numel() else len(s)  # first completion token (after the last prompt token)
        score.index_add_(0, s.tokens[first:], torch.ones(len(s) - first, dtype=torch.float64))
        prompt_count.index_add_(0, s.tokens[:first], torch.ones(first, dtype=torch.float64))
        ids = s.label_ids[s.label_mask]  # [m, K]
        probs = s.label_probs[s.label_mask].double()
        ok = ids >= 0
        score.index_add_(0, ids[ok], probs[ok])
    # lexicographic: score, then prompt counts (scaled below the smallest score step), then low ids first
    tie = prompt_count / (prompt_count.max() + 1.0) * 1e-6
    key = score + tie - torch.arange(target_vocab_size, dtype=torch.float64) * 1e-15
    return torch.argsort(key, descending=True, stable=True)[:size].clone()


def vocab_coverage(draft_to_target: torch.Tensor, token_lists: Sequence[Sequence[int]]) -> float:
    """Fraction of the tokens of ``token_lists`` that lie in the draft vocabulary."""
    inside = set(draft_to_target.tolist())
    total = sum(len(t) for t in token_lists)
    if total == 0:
        return float("nan")
    return sum(1 for t in token_lists for x in t if x in inside) / total


# ---------------------------------------------------------------------------------------------------------------
# 3. training
# ---------------------------------------------------------------------------------------------------------------


def _batches(lengths: Sequence[int], batch_tokens: int, max_len: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches of sample indices (sequences x longest <= batch_tokens), in random order."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], rng.random()))
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = min(max(lengths[j] for j in [*cur, i]), max_len)
        if cur and (len(cur) + 1) * longest > batch_tokens:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


class _PreconditionedLinear(nn.Module):
    """``y = W' (x / scale)``: a reparametrised ``nn.Linear`` (no bias) for training; :meth:`fold` gives back a plain
    ``nn.Linear`` with ``W = W' / scale``, the same function. With ``scale`` the inputs' per-dimension RMS, every
    input dimension reaches the output at a comparable size and AdamW's (scale-free) steps move them alike."""

    def __init__(self, linear: nn.Linear, scale: torch.Tensor, init_std: float = 0.02) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("_PreconditionedLinear expects a linear layer without bias")
        self.register_buffer("scale", scale.to(linear.weight), persistent=False)
        w = torch.randn_like(linear.weight) * init_std  # balanced start: every (rescaled) input dimension alike
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        return F.linear(x / self.scale, self.weight)

    def fold(self) -> nn.Linear:
        out = nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=False)
        out = out.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.weight / self.scale)
        return out


def feature_scale(samples: Sequence[SequenceSample], max_positions: int = 50_000, seed: int = 0) -> torch.Tensor:
    """Per-dimension RMS of the features at labelled (completion) positions: ``[F]`` float32, floored at 1e-3 of
    the mean (prompt starts, where attention-sink activations reach 1e4, are left out by the labels)."""
    rng = random.Random(seed)
    rows = [s.feats[s.label_mask & s.has_feats] for s in samples]
    x = torch.cat(rows).float()
    if x.shape[0] > max_positions:
        x = x[torch.tensor(sorted(rng.sample(range(x.shape[0]), max_positions)))]
    rms = x.pow(2).mean(0).sqrt()
    return rms.clamp(min=1e-3 * float(rms.mean()))


def train_head(
    head: DraftHead,
    samples: Sequence[SequenceSample],
    config: StaticSpeculatorConfig,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``head`` (bound to its target) on ``samples`` with the training-time-test loss.

    With ``config.precondition_features`` (and a fuse layer) the fuse layer is trained in the reparametrised form
    of :class:`_PreconditionedLinear` and folded back afterwards: the returned head is a plain :class:`DraftHead`.

    Returns ``{"steps", "epochs_done", "wall_s", "stopped_by", "curve": [{"step", "lr", "loss", "top1_step1",
    ...}, ...]}``; curve points average the metrics over the ``log_every`` steps before them.
    """
    rng = random.Random(config.seed)
    pre: _PreconditionedLinear | None = None
    if config.precondition_features and isinstance(head.fuse, nn.Linear):
        pre = _PreconditionedLinear(head.fuse, feature_scale(samples, seed=config.seed).to(head.fuse.weight.device))
        head.fuse = pre
    lengths = [min(len(s), config.max_len) for s in samples]
    per_epoch = len(_batches(lengths, config.batch_tokens, config.max_len, random.Random(0)))
    total = max(1, math.ceil(per_epoch * config.epochs))
    n_tf = round(config.teacher_forced_fraction * total)  # warm-start steps with teacher forcing only
    params = [p for p in head.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=config.betas,
    )
    t2d = head.target_to_draft.cpu()
    dev = head.fc.weight.device
    dtype = head.fc.weight.dtype
    curve: list[dict[str, float]] = []
    acc: dict[str, float] = {}
    n_acc = 0
    step = 0
    positions = 0  # sequence positions trained on (for epochs_done)
    stopped_by = "epochs"
    deadline = None if config.max_train_minutes is None else time.perf_counter() + 60.0 * config.max_train_minutes
    t0 = time.perf_counter()
    head.train()
    bar = tqdm(total=total, desc="train static head", unit="step", disable=not progress)
    queues: dict[bool, list[list[int]]] = {True: [], False: []}
    while step < total:
        tf = step < n_tf
        if not queues[tf]:
            budget = config.batch_tokens * (config.teacher_forced_batch_factor if tf else 1)
            queues[tf] = _batches(lengths, budget, config.max_len, rng)
        idx = queues[tf].pop()
        positions += sum(lengths[i] for i in idx)
        batch = collate([samples[i] for i in idx], t2d, max_len=config.max_len).to(dev, dtype)
        for g in opt.param_groups:
            g["lr"] = config.lr * _lr_factor(step, total, config.warmup_steps, config.min_lr_ratio)
        loss, m = ttt_loss(head, batch, steps=1 if tf else config.ttt_steps, decay=config.ttt_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"training loss is not finite at step {step}: lower lr (now {config.lr})")
        opt.step()
        step += 1
        for k, v in m.items():
            acc[k] = acc.get(k, 0.0) + v
        n_acc += 1
        if step % config.log_every == 0 or step in (1, n_tf, total):
            point = {"step": step, "lr": opt.param_groups[0]["lr"], "teacher_forced": tf}
            point |= {k: v / n_acc for k, v in acc.items()}
            curve.append(point)
            if on_log is not None:
                on_log(point)
            logger.info(
                "step %d/%d%s loss %.3f top1 %s",
                step,
                total,
                " (teacher forcing)" if tf else "",
                point.get("loss", float("nan")),
                " ".join(
                    f"{point[f'top1_step{j}']:.3f}" for j in range(1, config.ttt_steps + 1) if f"top1_step{j}" in point
                ),
            )
            bar.set_postfix(loss=f"{point.get('loss', float('nan')):.3f}", top1=f"{point.get('top1_step1', 0):.3f}")
            acc, n_acc = {}, 0
        bar.update(1)
        if deadline is not None and time.perf_counter() > deadline and step < total:
            stopped_by = "max_train_minutes"
            logger.warning("training stopped by max_train_minutes after %d of %d steps", step, total)
            break
    bar.close()
    if pre is not None:
        head.fuse = pre.fold()
    head.eval()
    return {
        "steps": step,
        "planned_steps": total,
        "teacher_forced_steps": min(n_tf, step),
        "batches_per_epoch": per_epoch,
        "epochs_done": round(positions / max(1, sum(lengths)), 3),
        "wall_s": round(time.perf_counter() - t0, 1),
        "stopped_by": stopped_by,
        "curve": curve,
    }


# ---------------------------------------------------------------------------------------------------------------
# 4. evaluation
# ---------------------------------------------------------------------------------------------------------------


def evaluate_acceptance(
    model: torch.nn.Module,
    head: DraftHead | None,
    prompts: Sequence[Sequence[int]],
    k: int = 4,
    temperatures: Sequence[float] = (0.0, 1.0),
    max_new_tokens: int = 128,
    baselines: Sequence[str] = BASELINES,
    seed: int = 1234,
    none_temperatures: Sequence[float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Mean acceptance length through the real engine with ``FixedController(k)``, per temperature and speculator.

    Returns ``{"T=<t>": {"<name>": {"mean_acceptance_length", "acceptance_rate", "accepted_per_pos",
    "completion_tokens", "tokens_per_s", "wall_s"}, ...}, ..., "greedy_identical_rows": "a/b" (head vs none at
    T=0, when both ran), "completions": {"T=<t>": {name: [[ids], ...]}}}``. ``head`` None evaluates only the
    baselines; ``none_temperatures`` (None: all) restricts the plain-decoding baseline to those temperatures.
    """
    from atlas_rl.config import EngineConfig
    from atlas_rl.controller import FixedController
    from atlas_rl.rollout import RolloutEngine
    from atlas_rl.speculators import SuffixSpeculator
    from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
    from atlas_rl.types import SamplingParams

    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
    names = (["static"] if head is not None else []) + [b for b in BASELINES if b in baselines]
    out: dict[str, Any] = {"k": k, "prompts": len(prompts), "max_new_tokens": max_new_tokens, "completions": {}}
    plist = [list(p) for p in prompts]
    for t in temperatures:
        key = f"T={t:g}"
        out[key] = {}
        out["completions"][key] = {}
        sp = SamplingParams(temperature=t, max_new_tokens=max_new_tokens, seed=None if t == 0 else seed)
        for name in names:
            if name == "none" and none_temperatures is not None and t not in none_temperatures:
                continue
            if name == "static":
                specs: list[Any] = [DraftHeadSpeculator(head, name="static", seed=seed)]
            elif name == "suffix":
                specs = [SuffixSpeculator()]
            else:
                specs = []
            engine = RolloutEngine(
                model,
                speculators=specs,
                config=EngineConfig(progress=progress),
                controller=FixedController(k if specs else 0),
            )
            try:
                batch = engine.generate(plist, sp)
            finally:
                engine.release()
            st = batch.stats
            per_pos = st.speculator(name).num_accepted_tokens_per_pos if specs else []
            drafts_per_pos = st.speculator(name).num_draft_tokens_per_pos if specs else []
            out[key][name] = {
                "mean_acceptance_length": round(st.mean_acceptance_length, 4),
                "acceptance_rate": None if not specs else round(st.acceptance_rate, 4),
                "accepted_per_pos": [round(a / d, 4) if d else None for a, d in zip(per_pos, drafts_per_pos)],
                "completion_tokens": st.num_completion_tokens,
                "tokens_per_s": round(st.tokens_per_s, 2),
                "wall_s": round(st.total_s, 1),
            }
            out["completions"][key][name] = batch.completion_ids
            logger.info(
                "held-out %s %-6s tau %.3f (%d tokens, %.1f tok/s)",
                key,
                name,
                st.mean_acceptance_length,
                st.num_completion_tokens,
                st.tokens_per_s,
            )
    greedy = out["completions"].get("T=0", {})
    if "static" in greedy and "none" in greedy:
        same = sum(a == b for a, b in zip(greedy["static"], greedy["none"]))
        out["greedy_identical_rows"] = f"{same}/{len(plist)}"
    return out


# ---------------------------------------------------------------------------------------------------------------
# 5. the whole pipeline
# ---------------------------------------------------------------------------------------------------------------


def save_static_checkpoint(head: DraftHead, card: dict[str, Any], path: str | Path) -> Path:
    """fp16 safetensors (card in its metadata) plus the card as ``<path>.json``; returns the checkpoint path."""
    path = Path(path)
    head.save(path, dtype=torch.float16, card=card)
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return path


def train_static_speculator(
    model: torch.nn.Module,
    train_prompts: Sequence[Sequence[int]],
    held_out_prompts: Sequence[Sequence[int]],
    config: StaticSpeculatorConfig | None = None,
    data_info: dict[str, Any] | None = None,
    command: str = "",
    progress: bool = True,
) -> StaticSpeculatorResult:
    """Run the whole pipeline (module docstring) and write ``<output_dir>/<checkpoint_name>`` + its JSON card.

    Args:
        model: the target (fp32 HF causal LM of a family the engine supports).
        train_prompts / held_out_prompts: token ids of the (chat-templated) prompts.
        config: :class:`StaticSpeculatorConfig`.
        data_info: free-form description of the prompts for the card (prompt set, split, ...).
        command: the command that reproduces this run, for the card.
    """
    cfg = config or StaticSpeculatorConfig()
    if not train_prompts:
        raise ValueError("train_static_speculator needs training prompts")
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. data
    t0 = time.perf_counter()
    samples: list[SequenceSample] = []
    gen_stats = []
    for temp in cfg.gen_temperatures:
        s, st = cached_samples(model, train_prompts, cfg, temp, cfg.data_cache_dir, progress=progress)
        samples.extend(s)
        gen_stats.append(st)
    timings["data_s"] = round(time.perf_counter() - t0, 1)
    positions = sum(len(s) for s in samples)
    labels = sum(s.num_labels for s in samples)
    completions = [s.tokens[int(torch.nonzero(s.label_mask).flatten()[0]) + 1 :].tolist() for s in samples]
    logger.info("training data: %d sequences, %d positions, %d labelled", len(samples), positions, labels)

    # 2. vocabulary + head
    t0 = time.perf_counter()
    V = int(model.get_output_embeddings().weight.shape[0])
    size = min(cfg.draft_vocab_size, V)
    d2t = build_draft_vocab(samples, V, size)
    torch.manual_seed(cfg.seed)
    hcfg = DraftHeadConfig.from_target(
        model,
        draft_vocab_size=size,
        fuse_layers=cfg.fuse_layers,
        intermediate_size=cfg.intermediate_size,
        train_lm_head=cfg.train_lm_head,
    )
    dev = next(model.parameters()).device
    head = DraftHead(hcfg, draft_to_target=d2t).to(dev).bind_target(model, init_lm_head=True)
    if cfg.init_norm_from_target:
        _init_norm_from_target(head, model)
    timings["vocab_s"] = round(time.perf_counter() - t0, 1)

    # 3. training
    hist_path = out_dir / "train_log.jsonl"
    with open(hist_path, "w") as log_file:

        def on_log(point: dict[str, float]) -> None:
            log_file.write(json.dumps(point) + "\n")
            log_file.flush()

        train = train_head(head, samples, cfg, progress=progress, on_log=on_log)
    timings["train_s"] = train["wall_s"]

    # 4. evaluation
    t0 = time.perf_counter()
    ev = evaluate_acceptance(
        model,
        head,
        held_out_prompts,
        k=cfg.eval_k,
        temperatures=cfg.eval_temperatures,
        max_new_tokens=cfg.eval_max_new_tokens,
        baselines=cfg.eval_baselines,
        none_temperatures=cfg.eval_none_temperatures,
        seed=cfg.eval_seed,
        progress=progress,
    )
    timings["eval_s"] = round(time.perf_counter() - t0, 1)
    # held-out completions of the target (plain decoding when it ran, else the lossless head runs)
    held_completions = []
    for runs in ev.pop("completions").values():
        held_completions.extend(runs.get("none") or runs.get("static") or [])
    timings["total_s"] = round(time.perf_counter() - t_all, 1)

    # 5. card + checkpoint
    stored = sum(v.numel() for k, v in head.state_dict().items() if k != "lm_head.weight" or cfg.train_lm_head)
    curve = train["curve"]
    card: dict[str, Any] = {
        "name": "atlas-rl static speculator",
        "format": "atlas-rl/static-speculator-card/v1",
        "target_fingerprint": target_fingerprint(model),
        "target_name_or_path": str(getattr(model.config, "_name_or_path", "")),
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {
            **(data_info or {}),
            "train_prompts": len(train_prompts),
            "held_out_prompts": len(held_out_prompts),
            "generation": gen_stats,
            "sequences": len(samples),
            "positions": positions,
            "labelled_positions": labels,
            "completion_tokens": sum(len(c) for c in completions),
            "label_top_k": cfg.label_top_k,
            "max_new_tokens": cfg.gen_max_new_tokens,
        },
        "head": {
            "fuse_layers": list(cfg.fuse_layers),
            "draft_vocab_size": size,
            "intermediate_size": cfg.intermediate_size,
            "train_lm_head": cfg.train_lm_head,
            "stored_parameters": stored,
            "dtype": "float16",
        },
        "draft_vocab": {
            "size": size,
            "train_completion_coverage": round(vocab_coverage(d2t, completions), 4),
            "held_out_completion_coverage": round(vocab_coverage(d2t, held_completions), 4)
            if held_completions
            else None,
        },
        "training": {
            "objective": f"training-time test, {cfg.ttt_steps} steps, weights {cfg.ttt_decay}^(j-1), soft CE",
            "optimizer": f"AdamW lr {cfg.lr} betas {list(cfg.betas)} wd {cfg.weight_decay}, warmup "
            f"{cfg.warmup_steps} then cosine to {cfg.min_lr_ratio}x, clip {cfg.grad_clip}",
            "batch_tokens": cfg.batch_tokens,
            "max_len": cfg.max_len,
            **{k: v for k, v in train.items() if k != "curve"},
            "first": curve[0] if curve else None,
            "last": curve[-1] if curve else None,
            "curve": curve,
        },
        "held_out": ev,
        "timings_s": timings,
        "versions": _versions(),
        "config": _jsonable(asdict(cfg)),
    }
    path = save_static_checkpoint(head, card, out_dir / cfg.checkpoint_name)
    logger.info("wrote %s (%.2f MB) and its card", path, path.stat().st_size / 1e6)
    return StaticSpeculatorResult(head=head, card=card, checkpoint=path)


def _init_norm_from_target(head: DraftHead, model: torch.nn.Module) -> None:
    """Copy the target's final RMSNorm weight into the head's final norm (both feed the same output rows)."""
    norm = getattr(model.get_decoder(), "norm", None)
    w = getattr(norm, "weight", None)
    if w is None or tuple(w.shape) != tuple(head.norm.weight.shape):
        logger.debug("target has no final norm of the head's width; keeping the head's norm at ones")
        return
    with torch.no_grad():
        head.norm.weight.copy_(w.to(head.norm.weight.dtype))


def _versions() -> dict[str, str]:
    import platform

    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
