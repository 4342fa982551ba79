"""Settings of the static-speculator pipeline (:mod:`atlas_rl.training.static`) and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas_rl.speculators.draft_head import DraftHead
from atlas_rl.training.corpora import DEFAULT_MIX, CorpusSettings

__all__ = ["BASELINES", "StaticSpeculatorConfig", "StaticSpeculatorResult"]

BASELINES = ("none", "suffix")


@dataclass
class StaticSpeculatorConfig:
    """Settings of the static-speculator pipeline (the steps: :mod:`atlas_rl.training.static`).

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
    # ---- data: teacher-forced corpora (atlas_rl.training.corpora / static_corpus)
    corpus_tokens: int = field(
        default=0,
        metadata={
            "help": "Labelled tokens of teacher-forced corpora (code, docs, chats built from them) added to the "
            "self-distilled data; 0 = none. One target forward per batch, cached in shards (resumable)."
        },
    )
    corpus_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of the teacher-forced corpus samples (None: <data_dir>/corpus); keyed subdirectory."},
    )
    corpus_sources: str | None = field(
        default=None,
        metadata={"help": "JSON list of corpus sources (None: the packaged atlas_rl/data/corpus_sources.json)."},
    )
    corpus_max_len: int = field(
        default=384, metadata={"help": "Longest corpus sequence (tokens, chat prompt included); chunks end at lines."}
    )
    corpus_chat_share: float = field(
        default=0.6,
        metadata={"help": "Share of corpus chunks made into a chat (user asks, the chunk is the labelled answer)."},
    )
    corpus_continue_share: float = field(
        default=0.25,
        metadata={"help": "Share of those chats whose user turn quotes the chunk's first lines ('continue this')."},
    )
    corpus_mix: dict[str, float] = field(
        default_factory=lambda: dict(DEFAULT_MIX),
        metadata={"help": "Weight of each corpus domain in labelled tokens (domains of corpus_sources.json)."},
    )
    corpus_dedup_threshold: float = field(
        default=0.8, metadata={"help": "Chunks whose estimated Jaccard (word 5-shingles) reaches this are dropped."}
    )
    corpus_batch_tokens: int = field(
        default=2048, metadata={"help": "Padded positions per teacher-forced target forward."}
    )
    corpus_shard_tokens: int = field(
        default=16384, metadata={"help": "Positions per cache shard (a stopped run loses at most one shard)."}
    )
    # ---- head
    fuse_layers: tuple[int, ...] = field(
        default=(2, 15, 27),
        metadata={
            "help": "Target hidden_states indices fused as features (low, mid, high; vLLM's default aux layers for "
            "a 30-layer target; -1 = final norm, which vLLM cannot serve)."
        },
    )
    num_hidden_layers: int = field(default=1, metadata={"help": "Decoder layers of the head (EAGLE-3: 1)."})
    draft_vocab_size: int = field(default=8192, metadata={"help": "Tokens the head can propose (most frequent)."})
    vocab_from_answers: bool = field(
        default=True,
        metadata={
            "help": "Rank the draft vocabulary by the target's own answers only (the corpora are not the target's "
            "output distribution; ranking them too lowered held-out coverage by 0.3-0.4 points)."
        },
    )
    intermediate_size: int = field(default=1536, metadata={"help": "MLP width of the draft layer."})
    train_lm_head: bool = field(
        default=True,
        metadata={"help": "Train the output rows (they start as the target's); else keep those copies frozen."},
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
    init_from: str | None = field(
        default=None,
        metadata={
            "help": "Warm start: a trained head directory (e.g. the shipped one) whose weights the new head starts "
            "from; output rows of draft tokens both vocabularies hold are kept, the others start from the target's. "
            "With teacher_forced_fraction=0 the run continues the training-time test."
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
    bf16_autocast: bool | None = field(
        default=None,
        metadata={
            "help": "Run the head's forward and backward under bfloat16 autocast (float32 weights, optimizer and "
            "loss). None: where matmuls in bfloat16 are native (CUDA; CPUs with AMX / AVX512-BF16 per oneDNN)."
        },
    )
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
        default="static_head", metadata={"help": "Directory name of the head (EAGLE-3 layout) in output_dir."}
    )

    def __post_init__(self) -> None:
        self.gen_temperatures = tuple(float(t) for t in self.gen_temperatures)
        self.eval_temperatures = tuple(float(t) for t in self.eval_temperatures)
        self.fuse_layers = tuple(int(x) for x in self.fuse_layers)
        self.eval_baselines = tuple(str(b) for b in self.eval_baselines)
        self.eval_none_temperatures = tuple(float(t) for t in self.eval_none_temperatures)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self._check_data_and_head()
        self._check_training()
        self._check_evaluation()

    def _check_data_and_head(self) -> None:
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
        self._check_corpus()

    def _check_corpus(self) -> None:
        if isinstance(self.corpus_tokens, bool) or not isinstance(self.corpus_tokens, int) or self.corpus_tokens < 0:
            raise ValueError(f"corpus_tokens must be an int >= 0 (0 = no corpus), got {self.corpus_tokens!r}")
        for name in ("corpus_max_len", "corpus_batch_tokens", "corpus_shard_tokens"):
            _positive_int(self, name)
        if self.corpus_batch_tokens < self.corpus_max_len:
            raise ValueError(
                f"corpus_batch_tokens ({self.corpus_batch_tokens}) must be >= corpus_max_len ({self.corpus_max_len})"
            )
        if not isinstance(self.corpus_mix, dict):
            raise ValueError("corpus_mix must map domains to weights, e.g. {code_python: 0.3, docs: 0.7}")
        self.corpus_mix = {str(k): float(v) for k, v in self.corpus_mix.items()}
        self.corpus_settings  # noqa: B018 -- CorpusSettings checks max_len, shares, mix, threshold

    def _check_training(self) -> None:
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
        if self.init_from is not None and not (Path(self.init_from) / "config.json").is_file():
            raise ValueError(
                f"init_from must be a draft head directory (config.json + weights, as save_pretrained writes), "
                f"got {self.init_from!r}: no config.json there"
            )

    def _check_evaluation(self) -> None:
        unknown = [b for b in self.eval_baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown eval_baselines {unknown}; choose from {list(BASELINES)}")
        if self.checkpoint_name.endswith(".safetensors") or "/" in self.checkpoint_name:
            raise ValueError(
                f"checkpoint_name names the head's directory (config.json + model.safetensors) inside output_dir, "
                f"e.g. 'static_head'; got {self.checkpoint_name!r}"
            )

    @property
    def data_cache_dir(self) -> Path:
        """Where generated training data is cached."""
        return Path(self.data_dir) if self.data_dir else Path(self.output_dir) / "data"

    @property
    def corpus_cache_dir(self) -> Path:
        """Where the teacher-forced corpus samples are cached (a ``corpus_<key>`` directory inside)."""
        return Path(self.corpus_dir) if self.corpus_dir else self.data_cache_dir / "corpus"

    @property
    def corpus_settings(self) -> CorpusSettings:
        """How the corpus is cut, deduplicated, formatted and mixed (raises ValueError on bad values)."""
        return CorpusSettings(
            max_len=self.corpus_max_len,
            chat_share=self.corpus_chat_share,
            continue_share=self.corpus_continue_share,
            mix=dict(self.corpus_mix),
            dedup_threshold=self.corpus_dedup_threshold,
            seed=self.seed,
        )


def _positive_int(cfg: Any, name: str) -> None:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{type(cfg).__name__}.{name} must be a positive int, got {v!r}")


@dataclass
class StaticSpeculatorResult:
    """What :func:`~atlas_rl.training.static.train_static_speculator` produced."""

    head: DraftHead  # fp32, bound to the target
    card: dict[str, Any]
    checkpoint: Path  # the head directory (config.json, fp16 model.safetensors, atlas_card.json)
