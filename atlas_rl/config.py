"""Configuration dataclasses (TRL style: every field documented in ``metadata["help"]``, checked in
``__post_init__`` with a message that says what to change)."""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_K = 8  # the auto controller's longest draft when num_speculative_tokens is not set


@dataclass
class EngineConfig:
    """Settings of :class:`atlas_rl.rollout.RolloutEngine`.

    Parameters:
        num_speculative_tokens: the longest draft. None (default) lets the controller choose up to
            ``DEFAULT_MAX_K``; an int k fixes it (the "auto" controller's longest draft, k of the "fixed" one; 0 =
            plain decoding).
        controller: "auto" (the confidence-aware controller with a measured cost model decides per step and row)
            or "fixed" (every row drafts k tokens with the first speculator). None (default): "auto" unless
            ``num_speculative_tokens`` is given, which asks for fixed-k drafting.
        max_rows: rows decoded at once; None decodes every row of a ``generate`` call together.
        prefill_chunk_tokens: upper bound of (rows x padded prompt length) per prefill forward.
        progress: show a progress bar over completion tokens.
        cuda_graphs: on CUDA, replay the lean forward from CUDA graphs (default True).
        reuse_cache: keep the preallocated KV cache between ``generate`` calls when it is large enough.
        lean_forward: decode/verification forwards through :mod:`atlas_rl.rollout.forward` (default True).
        fuse_projections: on a CPU, q/k/v and gate/up as one matmul each (default True; a weight copy).
        draft_bf16: draft heads multiply by bfloat16 copies of their weights (default True).
    """

    num_speculative_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Longest draft: None lets the auto controller choose up to DEFAULT_MAX_K tokens; an int is the "
            "auto controller's num_speculative_tokens, or k of the fixed mode (0 disables speculation)."
        },
    )
    controller: str | None = field(
        default=None,
        metadata={
            "help": "'auto': the controller picks speculator and draft length per step and row from measured "
            "costs and calibrated confidence (never slower than plain decoding by design); 'fixed': every row "
            "drafts num_speculative_tokens tokens with the first speculator (benchmarks, baselines). None: "
            "'auto' unless num_speculative_tokens is set."
        },
    )
    max_rows: int | None = field(
        default=None,
        metadata={"help": "Rows decoded concurrently; None = all rows of the call. Lower it to bound memory."},
    )
    prefill_chunk_tokens: int = field(
        default=8192,
        metadata={"help": "Max rows x padded prompt tokens in one prefill forward (bounds activation memory)."},
    )
    progress: bool = field(default=False, metadata={"help": "Show a tqdm progress bar over completion tokens."})
    cpu_linear_kernel: bool = field(
        default=True,
        metadata={
            "help": "On float32 CPU models, compute small decode-step matmuls with the kernel measured fastest on "
            "this machine for that many rows (tuned once, cached; see atlas_rl.rollout.kernel_tune); training "
            "forwards are untouched."
        },
    )
    lean_forward: bool = field(
        default=True,
        metadata={
            "help": "Run decode/verification forwards through atlas_rl.rollout.forward (the same math as the Hugging "
            "Face decoder over the same parameters, without its module stack, with RoPE tables and attention on "
            "SDPA's fused kernel); False uses the Hugging Face decoder. Ignored for models it does not support."
        },
    )
    fuse_projections: bool = field(
        default=True,
        metadata={
            "help": "CPU models on the lean forward: run each layer's q/k/v and gate/up projections as one matmul "
            "each over concatenated copies of their weights (fewer ops per layer; costs those weights once more "
            "in memory, ~0.3 GB for SmolLM2-135M in float32). Ignored on other devices."
        },
    )
    draft_bf16: bool = field(
        default=True,
        metadata={
            "help": "Float32 draft heads multiply by bfloat16 copies of their weights: on a CPU with native "
            "bfloat16 (oneDNN; AMX or AVX512-BF16) in bfloat16, ~30% less drafting time (docs/results/"
            "verification_cost.md, section 7); elsewhere in float32 over the bfloat16 weights widened in registers "
            "(up to 16 rows; half the bytes to stream, section 13). Held-out acceptance unchanged; lossless either "
            "way: the verifier is handed the distribution the head computed. Never applied to the target."
        },
    )
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "On a CUDA device, replay the lean decode/verification forward and the draft heads' drafting "
            "from CUDA graphs captured per shape bucket (one launch a step instead of ~40 a layer; "
            "docs/decisions/cuda_graphs.md). Sets the draft heads' own cuda_graphs. Ignored on other devices and "
            "without the lean forward."
        },
    )
    reuse_cache: bool = field(
        default=True,
        metadata={"help": "Keep the preallocated KV cache between generate() calls when it is large enough."},
    )

    def __post_init__(self) -> None:
        if self.controller is None:
            self.controller = "auto" if self.num_speculative_tokens is None else "fixed"
        if self.controller not in ("auto", "fixed"):
            raise ValueError(f"controller must be 'auto', 'fixed' or None, got {self.controller!r}")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_MAX_K
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k <= 64):
            raise ValueError(f"num_speculative_tokens must be None or an int in [0, 64], got {k!r}")
        if self.max_rows is not None and (not isinstance(self.max_rows, int) or self.max_rows < 1):
            raise ValueError(f"max_rows must be None or an int >= 1, got {self.max_rows!r}")
        if not isinstance(self.prefill_chunk_tokens, int) or self.prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be an int >= 1, got {self.prefill_chunk_tokens!r}")
