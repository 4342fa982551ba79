"""Options of ``atlas-rl bench --scenario policy-drift`` (:class:`DriftOptions`, the ``--quick`` preset)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONFIGS = ("none", "static", "suffix", "adaptive", "static+adaptive+suffix")


@dataclass
class DriftOptions:
    """What ``atlas-rl bench --scenario drift`` runs (groups: policies, workloads, static head, adaptive head)."""

    # ---- run
    model: str | None = field(
        default=None, metadata={"help": "Target path/id; None = embedded SmolLM2-135M; 'tiny' = tiny smoke model."}
    )
    out_dir: str = field(
        default="bench_out", metadata={"help": "Where policy_drift.json / policy_drift.md go.", "aliases": ["--out"]}
    )
    threads: int = field(
        default=1,
        metadata={"help": "torch intra-op threads (1: on a shared 2-core CPU a second thread stalls in spin-waits)."},
    )
    seed: int = field(default=0, metadata={"help": "Seeds the corpora split, fine-tuning batches and sampling."})
    # ---- policies
    num_versions: int = field(
        default=5, metadata={"help": "Policy versions, v0 (the target) included (>= 2).", "aliases": ["--versions"]}
    )
    finetune_steps: int = field(default=24, metadata={"help": "AdamW steps per fine-tuning stage (version)."})
    finetune_batch: int = field(default=2, metadata={"help": "Sequences per fine-tuning step."})
    finetune_seq_len: int = field(default=128, metadata={"help": "Tokens per fine-tuning sequence."})
    finetune_lr: float = field(default=5e-5, metadata={"help": "Fine-tuning learning rate (AdamW, fp32)."})
    corpus_files: int = field(default=300, metadata={"help": "Source files read per language (sampled)."})
    # ---- workloads
    bench_prompts: int = field(
        default=8, metadata={"help": "C snippets of the benchmark workload (same each version)."}
    )
    rollout_prompts: int = field(default=8, metadata={"help": "Fresh C snippets of each version's RL rollout."})
    rollout_generations: int = field(default=4, metadata={"help": "Samples per prompt of the RL rollout."})
    prompt_tokens: int = field(default=48, metadata={"help": "Tokens per C snippet prompt."})
    max_new_tokens: int = field(default=64, metadata={"help": "Completion tokens per sequence."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (RL rollouts: 1.0)."})
    k: int = field(default=4, metadata={"help": "Draft length of every speculating configuration."})
    repeats: int = field(default=1, metadata={"help": "Interleaved repetitions of the benchmark per version."})
    # ---- static head
    static_head: str | None = field(default=None, metadata={"help": "Path of a static head checkpoint."})
    static_fallback: str = field(
        default="quick",
        metadata={"help": "Without a given or shipped static head: 'quick' (train one, cached) or 'skip'."},
    )
    quick_static_prompts: int = field(default=48, metadata={"help": "Broad prompts answered for the quick static."})
    quick_static_steps: int = field(default=150, metadata={"help": "Training steps of the quick static head."})
    # ---- adaptive head
    adaptive_vocab: int = field(default=2048, metadata={"help": "Draft vocabulary of the adaptive head."})
    adaptive_intermediate: int = field(default=512, metadata={"help": "MLP width of the adaptive head."})
    adaptive_vocab_from_data: bool = field(
        default=True,
        metadata={"help": "Re-rank the adaptive head's vocabulary from the captured data at every retraining."},
    )
    adaptive_share: float = field(
        default=0.10, metadata={"help": "Retraining wall-time budget as a share of the version's RL rollout."}
    )
    adaptive_lr: float = field(default=5e-4, metadata={"help": "Adaptive head learning rate (warm-started)."})
    adaptive_batch: int = field(default=4, metadata={"help": "Sequences per adaptive training step."})
    adaptive_seq_len: int = field(default=64, metadata={"help": "Positions per adaptive training sequence."})
    adaptive_ttt_steps: int = field(default=2, metadata={"help": "Training-time-test steps of the adaptive head."})

    def __post_init__(self) -> None:
        if self.num_versions < 2:
            raise ValueError(
                f"num_versions must be >= 2 (v0 and at least one fine-tuned policy), got {self.num_versions}"
            )
        for name in (
            "threads",
            "finetune_batch",
            "finetune_seq_len",
            "corpus_files",
            "bench_prompts",
            "rollout_prompts",
            "rollout_generations",
            "prompt_tokens",
            "max_new_tokens",
            "k",
            "repeats",
            "adaptive_vocab",
            "adaptive_intermediate",
            "adaptive_batch",
            "adaptive_ttt_steps",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.finetune_steps < 0 or self.quick_static_steps < 0 or self.quick_static_prompts < 1:
            raise ValueError("finetune_steps and quick_static_steps must be >= 0, quick_static_prompts >= 1")
        if self.static_fallback not in ("quick", "skip"):
            raise ValueError(f"static_fallback must be 'quick' or 'skip', got {self.static_fallback!r}")
        if not (0.0 < self.adaptive_share <= 1.0):
            raise ValueError(f"adaptive_share must lie in (0, 1], got {self.adaptive_share}")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 = greedy)")

    @classmethod
    def quick(cls, **overrides: Any) -> DriftOptions:
        """Tiny settings (:data:`QUICK`): the pipeline end to end in a few minutes."""
        return cls(**(QUICK | overrides))


QUICK: dict[str, Any] = dict(  # `--quick`: 4 versions, few prompts, short outputs
    num_versions=4,
    finetune_steps=3,
    finetune_batch=1,
    finetune_seq_len=64,
    corpus_files=40,
    bench_prompts=2,
    rollout_prompts=2,
    rollout_generations=2,
    prompt_tokens=32,
    max_new_tokens=24,
    quick_static_prompts=8,
    quick_static_steps=30,
)
