"""Options of ``atlas-rl bench --scenario adapt`` (and the ``--quick`` preset)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["CONFIGS", "QUICK", "AdaptOptions"]

# benched at every window: no speculation (the ratio baseline), each speculator alone at fixed k, the default stack
CONFIGS = ("none", "static", "suffix", "adaptive", "default")


@dataclass
class AdaptOptions:
    """What ``atlas-rl bench --scenario adapt`` runs."""

    model: str | None = field(default=None, metadata={"help": "Target model path/id; None = embedded default."})
    out_dir: str = field(default="bench_out", metadata={"help": "Where adapt.json, adapt.md and adapt.svg go."})
    windows: int = field(default=4, metadata={"help": "Traffic windows (each followed by adaptive retraining)."})
    traffic_prompts: int = field(default=16, metadata={"help": "Requests per traffic window (captured, T=1)."})
    bench_prompts: int = field(default=4, metadata={"help": "Held-out requests benched at every window."})
    check_prompts: int = field(
        default=32, metadata={"help": "Held-out requests of the T=1 static-vs-adaptive τ check per window (0: off)."}
    )
    check_rows: int = field(default=4, metadata={"help": "Active rows per batch of the τ check (bootstrap unit)."})
    estimate_prompts: int = field(
        default=32, metadata={"help": "Target rollouts (T=1, captured once) the closed-form τ estimate replays."}
    )
    rows: list[int] = field(default_factory=lambda: [1, 4], metadata={"help": "Active rows of the bench cells."})
    temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0], metadata={"help": "Bench temperatures."})
    k: int = field(default=4, metadata={"help": "Draft length of the fixed configurations (and the stack's max)."})
    max_new_tokens: int = field(default=96, metadata={"help": "New tokens per request (a ticket takes ~50)."})
    repeats: int = field(default=2, metadata={"help": "Interleaved repetitions of every configuration."})
    adaptive_share: float = field(
        default=0.10, metadata={"help": "Retraining budget as a share of the window's traffic rollout time."}
    )
    adaptive_min_s: float = field(
        default=1.0, metadata={"help": "Lower bound of the retraining budget in seconds (production's default)."}
    )
    inject_bad_head: int | None = field(
        default=None,
        metadata={"help": "Corrupt the published adaptive head after this window (the controller must fall back)."},
    )
    parts: list[str] = field(
        default_factory=lambda: ["shift", "policy"],
        metadata={"help": "shift: the workload-shift windows; policy: the GRPO specialisation run."},
    )
    policy_steps: int = field(default=10, metadata={"help": "GRPO steps of the policy part."})
    policy_lr: float = field(default=5e-5, metadata={"help": "GRPO learning rate of the policy part."})
    probe_prompts: int = field(default=16, metadata={"help": "Held-out requests probed after every GRPO step."})
    probe_rows: int = field(default=4, metadata={"help": "Active rows per probe batch (bootstrap unit)."})
    seed: int = field(default=0, metadata={"help": "Seed of prompts, sampling and the adaptive trainer."})

    def __post_init__(self) -> None:
        if self.windows < 1 or self.traffic_prompts < 1 or self.bench_prompts < 1:
            raise ValueError("windows, traffic_prompts and bench_prompts must be >= 1")
        if not self.rows or any(r < 1 or r > self.bench_prompts for r in self.rows):
            raise ValueError(f"rows must be between 1 and bench_prompts ({self.bench_prompts}), got {self.rows}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be >= 0, got {self.temperatures}")
        if self.k < 1 or self.repeats < 1 or self.max_new_tokens < 1:
            raise ValueError("k, repeats and max_new_tokens must be >= 1")
        if not 0.0 < self.adaptive_share <= 1.0:
            raise ValueError(f"adaptive_share must be in (0, 1], got {self.adaptive_share}")
        if not self.parts or set(self.parts) - {"shift", "policy"}:
            raise ValueError(f"parts must be among 'shift' and 'policy', got {self.parts}")
        if self.policy_steps < 1 or self.probe_prompts < 1 or self.policy_lr <= 0:
            raise ValueError("policy_steps and probe_prompts must be >= 1 and policy_lr > 0")
        self._check_tau_checks()
        if self.inject_bad_head is not None and not 0 <= self.inject_bad_head < self.windows:
            raise ValueError(f"inject_bad_head must name a window in [0, {self.windows}), got {self.inject_bad_head}")

    def _check_tau_checks(self) -> None:
        if self.check_prompts < 0 or self.estimate_prompts < 0:
            raise ValueError("check_prompts and estimate_prompts must be >= 0 (0 turns the check off)")
        if self.check_prompts and not 1 <= self.check_rows <= self.check_prompts:
            raise ValueError(f"check_rows must be between 1 and check_prompts ({self.check_prompts})")
        if not 1 <= self.probe_rows <= self.probe_prompts:
            raise ValueError(f"probe_rows must be between 1 and probe_prompts ({self.probe_prompts})")


QUICK = dict(windows=2, traffic_prompts=4, bench_prompts=2, rows=[1, 2], temperatures=[0.0], max_new_tokens=24,
             repeats=1, policy_steps=2, probe_prompts=2, probe_rows=1, check_prompts=2, check_rows=1,
             estimate_prompts=2)  # fmt: skip
