"""``AtlasPPOConfig``: PPO's options in the style of TRL's (removed) ``PPOConfig``, plus the atlas options."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from .config import AtlasArgs
from .ppo_core import KL_ESTIMATORS

PPO_BACKENDS = ("atlas", "transformers")


@dataclass
class AtlasPPOConfig(TrainingArguments, AtlasArgs):
    """Configuration of :class:`~atlas_rl.trainers.AtlasPPOTrainer`.

    One training *step* is one PPO update: a rollout batch of ``rollout_batch_size`` prompts per process (one
    completion each), then ``num_ppo_epochs`` passes over it in ``num_mini_batches`` minibatches, one optimizer
    step per minibatch (each minibatch is ``gradient_accumulation_steps`` micro-batches of
    ``per_device_train_batch_size``). ``max_steps`` counts updates.

    Groups of fields:

    * Batching: ``per_device_train_batch_size``, ``gradient_accumulation_steps``, ``num_mini_batches``,
      ``local_rollout_forward_batch_size``.
    * Generation: ``response_length``, ``temperature``, ``stop_token`` / ``stop_token_id``,
      ``missing_eos_penalty``, ``generation_backend`` and the ``atlas_*`` options (see :class:`AtlasArgs`).
    * PPO: ``num_ppo_epochs``, ``cliprange``, ``cliprange_value``, ``vf_coef``, ``gamma``, ``lam``,
      ``whiten_rewards``, ``whiten_advantages``.
    * KL to the reference: ``kl_coef``, ``kl_estimator``, ``kl_target`` and ``kl_horizon`` (adaptive controller).
    * Rewards: ``reward_weights``.

    Differences from TRL 0.x's ``PPOConfig``: ``stop_token`` defaults to ``"eos"`` (generation stops at EOS, so
    short answers cost short rollouts); the score lands on the last *valid* response token (TRL put it one past);
    ``kl_target`` switches on the adaptive KL controller.
    """

    # ---- batching
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches (optimizer steps) per PPO epoch."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per no-grad forward (values, reference, reward model) after a rollout."}
    )
    # ---- generation
    response_length: int = field(default=53, metadata={"help": "Maximum number of generated tokens per prompt."})
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature (> 0; PPO's ratio needs the sampled distribution's logprobs)."},
    )
    stop_token: str | None = field(
        default="eos",
        metadata={
            "help": "'eos': a completion ends at the tokenizer's EOS (kept as its last token); None: every "
            "completion is response_length tokens long (unless stop_token_id is set)."
        },
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "A token id that ends a completion (overrides stop_token)."}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of completions that never emitted the stop token (>= 0)."},
    )
    # ---- PPO
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each rollout batch."})
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio (epsilon)."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Clip range of the value prediction."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Whiten the per-token rewards (mean kept) before GAE."}
    )
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten the advantages over the batch's valid tokens (TRL always did)."}
    )
    # ---- KL
    kl_coef: float = field(
        default=0.05,
        metadata={
            "help": "Coefficient of the per-token KL penalty to the frozen reference (the initial coefficient when "
            "kl_target is set). 0 = no penalty and no reference model is built."
        },
    )
    kl_estimator: str = field(
        default="k1", metadata={"help": "'k1' (log pi - log ref) or 'k3' ((r - 1) - log r, non-negative)."}
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Target KL per sequence for the adaptive controller (Ziegler et al.); None = fixed kl_coef."
        },
    )
    kl_horizon: int = field(default=10000, metadata={"help": "Horizon of the adaptive KL controller, in samples."})
    # ---- rewards
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function/model (default: all 1.0)."}
    )

    def __post_init__(self) -> None:
        if self.generation_backend == "vllm":
            raise ValueError(
                "generation_backend='vllm' is not available for PPO yet: use generation_backend='atlas' or "
                "'transformers' (vLLM rollouts for PPO land with the atlas-on-vLLM path)"
            )
        if self.generation_backend not in PPO_BACKENDS:
            raise ValueError(
                f"generation_backend must be one of {PPO_BACKENDS} for PPO, got {self.generation_backend!r}"
            )
        super().__post_init__()
        self._check_atlas()
        self._check_batching()
        self._check_ppo()
        self._check_kl()

    def _check_batching(self) -> None:
        for name in ("num_mini_batches", "local_rollout_forward_batch_size", "response_length", "num_ppo_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    def _check_ppo(self) -> None:
        if not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 for PPO (got {self.temperature}): the ratio needs the logprobs of a "
                "sampled distribution; use a small value such as 0.1 for near-greedy rollouts"
            )
        for name in ("cliprange", "cliprange_value", "vf_coef"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if self.stop_token not in (None, "eos"):
            raise ValueError(f"stop_token must be 'eos' or None, got {self.stop_token!r} (use stop_token_id for ids)")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be >= 0 (it is subtracted), got {self.missing_eos_penalty}")

    def _check_kl(self) -> None:
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_target is not None:
            if not self.kl_target > 0:
                raise ValueError(f"kl_target must be > 0 (or None for a fixed coefficient), got {self.kl_target}")
            if self.kl_coef == 0:
                raise ValueError("the adaptive KL controller (kl_target) needs an initial kl_coef > 0")
            if self.kl_horizon < 1:
                raise ValueError(f"kl_horizon must be >= 1, got {self.kl_horizon}")

    @property
    def rollout_batch_size(self) -> int:
        """Prompts rolled out per process and update."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_mini_batches

    @property
    def mini_batch_size(self) -> int:
        """Rows per process and optimizer step."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps
