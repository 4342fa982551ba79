"""The rollout engine: batched, lossless speculative decoding with exact logprobs.

One ``generate`` call:

1. **Prefill** each *unique* prompt once (a GRPO group of ``num_generations`` samples shares it), in chunks,
   into a preallocated :class:`SlotKVCache`; copy the prompt's keys/values into the slots of its samples
   and sample each sample's first token from the shared last-position distribution.
2. **Decode steps** until every row stops (``_decode_step``; its model-free pieces live in ``step.py``). Each
   step the controller plans, per row, a speculator and a draft length; speculators propose drafts; ONE
   target forward runs over ``[pending token, draft...]`` of every active row (ragged drafts padded to the
   longest); the rejection sampler accepts a prefix of each draft and emits one recovered or bonus token (so
   every row emits >= 1 token per forward, and the output distribution is exactly the target's). Rows roll
   their cache length back past rejected tokens.
3. Rows that stop (stop/EOS token, ``max_new_tokens``, context end) leave the batch: the cache is compacted
   so finished rows stop costing compute.

``k = 0`` (no speculators, or ``FixedController(0)``) is plain autoregressive decoding through the very same
code path: the fair baseline.

Logprobs are those of the distribution each token was sampled from (``processed_logprobs``: temperature,
then top-k/top-p; see :class:`atlas_rl.SamplingParams`), computed from the verification forward itself —
the same numbers a teacher-forced forward over the final sequences gives.

Reproducible: with ``SamplingParams.seed``, a call's output depends on the weights, the inputs and the
speculators' and controller's state at its start, never on wall-clock time (``docs/decisions/reproducibility.md``).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from atlas_rl.config import EngineConfig
from atlas_rl.controller import (
    AutoController,
    AutoControllerConfig,
    Controller,
    FixedController,
    RowOutcome,
    VerificationCost,
)
from atlas_rl.controller.cost import cost_cache_key, load_or_calibrate
from atlas_rl.graph_capture import row_bucket
from atlas_rl.speculators.base import ResolvedExtras, Speculator, speculator_extras
from atlas_rl.types import (
    CaptureRecord,
    Draft,
    PromptIds,
    ProposeRecord,
    RolloutBatch,
    SamplingParams,
    SpecStats,
    StepRecord,
    as_token_lists,
)
from atlas_rl.verification import RejectionSampler, draw_uniforms
from atlas_rl.verification.base import Verifier

from .cost_probe import engine_code_version
from .cpu_glue import glue_kernels
from .cpu_linear import drop_packed_weights, install_cpu_linear, kernel_plan
from .cuda_graphs import GraphedForward
from .draft_probe import DraftProbeConfig, probe_drafting
from .forward import LeanForward, lean_forward_unsupported
from .kv_cache import SlotKVCache
from .step import (
    PackedStep,
    Row,
    Verified,
    WaveContext,
    cap_drafts,
    dense_draft_probs,
    draft_requests,
    emit,
    pack,
    plan_state,
    propose_all,
    stop_finished_groups,
)

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# what one more prefill forward costs, in padded prompt tokens (SmolLM2-135M, one core: ~45 ms a forward beside
# ~2.1 ms a token; docs/results/verification_cost.md §10): the chunking trades padding against forwards
PREFILL_CHUNK_OVERHEAD_TOKENS = 24

CaptureHook = Callable[[CaptureRecord], None]


_Row = Row  # the name the prefill uses
_T = TypeVar("_T")


@dataclass(frozen=True)
class _PromptFeatures:
    """The prompt hidden states of one prefill chunk: groups ``start .. end - 1`` of the wave, per layer
    ``[end - start, P_chunk, hidden]`` (the forward's tensors; a shorter prompt's tail is padding)."""

    start: int
    end: int
    layers: dict[int, torch.Tensor]


class _HookHandle:
    def __init__(self, hooks: list[CaptureHook], fn: CaptureHook) -> None:
        self._hooks, self._fn = hooks, fn

    def remove(self) -> None:
        if self._fn in self._hooks:
            self._hooks.remove(self._fn)


def check_model_supported(model: torch.nn.Module) -> None:
    """Raise a ValueError naming the model type when the engine cannot run it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise ValueError(
            f"RolloutEngine needs a Hugging Face causal LM (e.g. AutoModelForCausalLM); got {type(model).__name__}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"RolloutEngine supports the model types {SUPPORTED_MODEL_TYPES}; this model is {model_type!r}. "
            "Use generation_backend='transformers' (or 'vllm') for other architectures."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("RolloutEngine supports decoder-only causal LMs, not encoder-decoder models")


class RolloutEngine:
    """Lossless speculative rollouts for RL.

    Args:
        model: a Hugging Face causal LM of the Llama/Qwen/Mistral family (any device, fp32/fp64/bf16).
        speculators: speculators the controller may use; ``[]`` or None gives plain decoding.
        config: :class:`EngineConfig`.
        controller: decides per row and step which speculator and how many draft tokens; default (with
            speculators and ``config.controller == "auto"``) an :class:`AutoController` with
            ``num_speculative_tokens = config.num_speculative_tokens`` over this engine's calibrated cost model
            (:meth:`verification_cost`), else ``FixedController(config.num_speculative_tokens)``.
        verifier: defaults to the batched :class:`RejectionSampler`.
        eos_token_ids: stop tokens besides ``SamplingParams.stop_token_ids``; default: the model's
            ``generation_config.eos_token_id``.

    Example::

        engine = RolloutEngine(model, speculators=[SuffixSpeculator()])
        batch = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=128), num_generations=8)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        speculators: Sequence[Speculator] | None = None,
        config: EngineConfig | None = None,
        controller: Controller | None = None,
        verifier: Verifier | None = None,
        eos_token_ids: Iterable[int] | int | None = None,
    ) -> None:
        check_model_supported(model)
        self.model = model
        self.config = config or EngineConfig()
        self.speculators: dict[str, Speculator] = {}
        for s in speculators or []:
            if not isinstance(s, Speculator):
                raise ValueError(f"{type(s).__name__} does not implement the Speculator protocol")
            if s.name in self.speculators:
                raise ValueError(f"two speculators are named {s.name!r}; names must be unique")
            speculator_extras(s)  # checks its optional members
            if hasattr(s, "cuda_graphs"):  # draft heads replay their drafting from graphs as the target does
                s.cuda_graphs = self.config.cuda_graphs
            self.speculators[s.name] = s
        self.verifier: Verifier = verifier or RejectionSampler()
        self.policy_version = 0
        self._macs_of: tuple[int, int] | None = None  # (id of the model, its MACs per token): _target_macs
        self._draft_timings: dict[str, list[ProposeRecord]] = {}  # speculator -> its probe (_time_drafting)
        self._capture_hooks: list[CaptureHook] = []
        self._cache: SlotKVCache | None = None
        self._verification_cost: VerificationCost | None = None
        self._lean: LeanForward | None = None
        self._graphs: GraphedForward | None = None
        self._uninstall_linear = self._install_forward_path(model)
        self._hand_cpu_glue()

        mc = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(mc, "max_position_embeddings", 1 << 30))
        windows = [getattr(mc, "sliding_window", None)] if getattr(mc, "use_sliding_window", True) else []
        layer_types = getattr(mc, "layer_types", None)
        if layer_types is not None and not any(t == "sliding_attention" for t in layer_types):
            windows = []
        self.sliding_window: int | None = min([w for w in windows if w], default=None)
        self.num_layers = int(mc.num_hidden_layers)
        self.num_kv_heads = int(getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads)
        self.head_dim = int(getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads)
        if eos_token_ids is None:
            gc = getattr(model, "generation_config", None)
            eos_token_ids = getattr(gc, "eos_token_id", None)
            if eos_token_ids is None:
                eos_token_ids = getattr(mc, "eos_token_id", None)
        if isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(int(t) for t in (eos_token_ids or []))
        # transformers >= 5.2x names the decoder's cache argument `cache`; older releases `past_key_values`
        params = inspect.signature(model.get_decoder().forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.controller: Controller = controller or self._default_controller()
        # drafting timed now, not inside the first generate call (a one-off cost of building the engine)
        self._hand_draft_timings(self.controller, {name: speculator_extras(s) for name, s in self.speculators.items()})

    def _install_forward_path(self, model: torch.nn.Module) -> Callable[[], None]:
        """The CPU kernel plan on the target's and the draft heads' linears, and the lean forward where the model
        supports it; returns the target's ``uninstall``."""
        if self.config.lean_forward:
            why = lean_forward_unsupported(model)
            if why is None:
                fuse = None if self.config.fuse_projections else False  # None: LeanForward's default (on a CPU)
                self._lean = LeanForward(model, cpu_linear=self.config.cpu_linear_kernel, fuse=fuse)
                if self.config.cuda_graphs and next(model.parameters()).device.type == "cuda":
                    self._graphs = GraphedForward(self._lean, model)
            else:
                logger.info("lean forward off for this model (%s): using the Hugging Face decoder", why)
        if not self.config.cpu_linear_kernel:
            return lambda: None
        head = model.get_output_embeddings()
        chain = None  # the kernels are tuned over the weights the forward multiplies by (fused ones included)
        if self._lean is not None and isinstance(head, torch.nn.Linear):
            chain = self._lean.weight_chain(head.weight)
        uninstall = install_cpu_linear(model, weights=chain)
        for s in self.speculators.values():  # draft heads too (oneDNN: their LM head streams 2x faster at 4 rows)
            if isinstance(getattr(s, "head", None), torch.nn.Module):
                install_cpu_linear(s.head, tune=False, low_precision=self.config.draft_bf16)
        return uninstall

    def _hand_cpu_glue(self) -> None:
        """The decode glue kernels to the draft heads that take them (``cpu_glue``) when the lean forward runs on a
        CPU: their draft layers then run through the loops the target's forward uses (``speculators/head_cpu.py``)."""
        glue = glue_kernels() if self._lean is not None and self.device.type == "cpu" else None
        for s in self.speculators.values():
            if hasattr(s, "cpu_glue"):
                s.cpu_glue = glue

    # ------------------------------------------------------------------------------------------ public
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def captures_graphs(self) -> bool:
        """Whether decode/verification forwards replay CUDA graphs (:mod:`.cuda_graphs`; a CUDA model, the lean
        forward, ``EngineConfig.cuda_graphs``, and no capture has failed)."""
        return self._graphs is not None and self._graphs.failed is None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def verification_cost(self, budget_s: float | None = None) -> VerificationCost:
        """This engine's verification cost model: cached per model/device/dtype/threads, else measured now within
        ``budget_s`` seconds (default ``AutoControllerConfig.calibration_budget_s``); refined online by the auto
        controller."""
        if self._verification_cost is None:
            from .cost_probe import forward_cost_ms

            key = self._cost_key()

            def timer(rows: int, tokens: int, repeats: int) -> float:
                return forward_cost_ms(self.model, rows, tokens, repeats=repeats, warmup=0, engine=self) / 1000.0

            was_training = self.model.training
            self.model.eval()
            try:
                self._verification_cost = load_or_calibrate(
                    key,
                    timer,
                    max_tokens=max(9, self.config.num_speculative_tokens + 1),
                    budget_s=budget_s or AutoControllerConfig().calibration_budget_s,
                )
            finally:
                if was_training:
                    self.model.train()
        return self._verification_cost

    def _cost_key(self) -> str:
        """The cache key of this engine's verification cost table: the model, device, dtype, threads and everything
        of the forward path that changes what a forward costs (CUDA graphs replayed or not included)."""
        mc = self.model.config
        return cost_cache_key(
            mc.to_dict(),
            str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            str(self.dtype),
            torch.get_num_threads(),
            extra=f"cpu_linear={self.config.cpu_linear_kernel},lean={self._lean is not None},"
            f"fused={self._lean is not None and self._lean.fused is not None},graphs={self.captures_graphs},"
            f"code={engine_code_version()},kernels={kernel_plan().digest()}",
        )

    def _default_controller(self) -> Controller:
        k = self.config.num_speculative_tokens
        if self.config.controller == "fixed" or not self.speculators or k == 0:
            return FixedController(k)
        cfg = AutoControllerConfig(num_speculative_tokens=k)
        return AutoController(cfg, cost=self.verification_cost(cfg.calibration_budget_s))

    def add_capture_hook(self, fn: CaptureHook) -> _HookHandle:
        """Call ``fn(CaptureRecord)`` after every target forward (prefill and verification); off by default.

        Returns a handle with ``remove()``. While no hook is registered, nothing extra is computed.
        """
        self._capture_hooks.append(fn)
        return _HookHandle(self._capture_hooks, fn)

    def update_weights(
        self,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
        version: int | None = None,
    ) -> int:
        """Load new policy weights and set ``policy_version``; all or nothing.

        ``weights``: a full ``model.state_dict()`` (tied weights such as ``lm_head.weight`` of a tied-embedding
        model and buffers are resolved by name; ``module.`` / ``_orig_mod.`` prefixes of wrapped models are
        stripped), a partial one, or ``named_parameters()``. Every entry is checked (name, shape) before anything
        is copied, so an update that fails leaves the model untouched. ``weights=None`` means the model was
        updated in place (e.g. the trainer's own module). ``version`` must be greater than the current one
        (default: current + 1). Returns the new version.
        """
        new_version = self._next_version(version)
        if weights is not None:
            pairs = self._resolve_weights(weights)
            with torch.no_grad():
                for dst, src in pairs:
                    dst.copy_(src)
        self.policy_version = new_version
        drop_packed_weights(self.model)  # an update through `.data` keeps `_version`: never serve a stale copy
        if self._lean is not None and self._lean.fused is not None:
            self._lean.fused.clear()
        if self._graphs is not None:
            self._graphs.validate()
        for s in self.speculators.values():
            speculator_extras(s).on_policy_update(new_version)
        return new_version

    def _next_version(self, version: int | None) -> int:
        new_version = self.policy_version + 1 if version is None else version
        if isinstance(new_version, bool) or not isinstance(new_version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        if new_version <= self.policy_version:
            raise ValueError(
                f"version must increase: the engine is at policy_version {self.policy_version}, got {new_version}"
            )
        return new_version

    def _resolve_weights(
        self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(model tensor, new value)`` for every entry, checked before anything is copied (tied entries resolve
        to the one shared tensor; entries that already are the model's own tensor are skipped)."""
        items = weights.items() if isinstance(weights, Mapping) else weights
        own = dict(self.model.named_parameters(remove_duplicate=False))
        own.update(dict(self.model.named_buffers(remove_duplicate=False)))
        pairs = []
        for name, tensor in items:
            key = name
            for prefix in ("module.", "_orig_mod."):
                if key not in own and key.startswith(prefix):
                    key = key[len(prefix) :]
            if key not in own:
                raise ValueError(
                    f"update_weights: the model has no parameter named {name!r} (nor a buffer; nothing loaded)"
                )
            dst = own[key]
            if not isinstance(tensor, torch.Tensor) or tuple(dst.shape) != tuple(tensor.shape):
                got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(
                    f"update_weights: {name!r} has shape {got}, the model's is {tuple(dst.shape)} (nothing loaded)"
                )
            if dst.data_ptr() != tensor.data_ptr():  # else the engine already reads this very tensor
                pairs.append((dst, tensor))
        return pairs

    def generate(
        self,
        prompt_ids: PromptIds,
        sampling: SamplingParams | None = None,
        num_generations: int = 1,
        controller: Controller | None = None,
    ) -> RolloutBatch:
        """Sample ``num_generations`` completions for every prompt.

        Args:
            prompt_ids: token ids of each prompt (no padding): ``list[list[int]]``, a 2-D tensor, one prompt as a
                list of ints, or a tokenizer's output such as ``tokenizer.apply_chat_template(messages,
                add_generation_prompt=True)`` (a ``BatchEncoding``; see :func:`atlas_rl.types.as_token_lists`).
            sampling: :class:`SamplingParams` (default: T=1, 128 new tokens).
            num_generations: samples per prompt (a GRPO group); their prompt is prefilled once.
            controller: overrides the engine's controller for this call (e.g. fixed-k benchmarks).

        Returns:
            :class:`RolloutBatch` with rows grouped by prompt (``len = len(prompt_ids) * num_generations``).

        Reproducibility: with ``sampling.seed`` set, a call's completions and logprobs are a function of the
        weights, the inputs, the speculators' and the controller's state at the start of the call (no decision
        within a call depends on wall-clock time); see ``docs/decisions/reproducibility.md``.
        """
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise ValueError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
            raise ValueError(f"num_generations must be an int >= 1, got {num_generations!r}")
        prompts = as_token_lists(prompt_ids)
        if not prompts:
            return RolloutBatch.empty(num_generations, self.policy_version)
        self._validate_prompts(prompts, sampling)
        controller = controller or self.controller
        self._prepare_controller(controller)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._generate(prompts, sampling, num_generations, controller)
        finally:
            if was_training:
                self.model.train()

    def _prepare_controller(self, controller: Controller) -> None:
        """Hand the controller the cost model (when it needs one), the speculators' stated acceptance priors, their
        drafting-cost priors (MACs per drafted token over the target's) and, where it wants them, the costly ones'
        drafting timed on synthetic rows (once per engine: usually when it was built)."""
        if not self.speculators:
            return
        if controller.needs_cost_model:
            controller.set_cost_model(self.verification_cost())
        extras = {name: speculator_extras(s) for name, s in self.speculators.items()}
        priors = {name: e.expected_acceptance for name, e in extras.items() if e.expected_acceptance is not None}
        if priors:
            controller.set_speculator_priors(priors)
        macs = {name: e.draft_macs_per_token for name, e in extras.items() if e.draft_macs_per_token is not None}
        if macs:
            target = self._target_macs()
            controller.set_draft_cost_priors({name: m / max(1, target) for name, m in macs.items()})
            self._hand_draft_timings(controller, extras)

    def _hand_draft_timings(self, controller: Controller, extras: Mapping[str, ResolvedExtras]) -> None:
        """Time the costly speculators (those that state ``draft_macs_per_token``) whose drafting ``controller``
        wants timed, and hand it the timings (members looked up by name: see :class:`Controller`)."""
        costly = sorted(name for name, e in extras.items() if e.draft_macs_per_token is not None)
        wants = getattr(controller, "wants_draft_timings", None)
        names = wants(costly) if wants is not None and costly else []
        if names:
            controller.set_draft_timings({name: self._time_drafting(name, extras[name]) for name in names})

    def _time_drafting(self, name: str, extras: ResolvedExtras) -> list[ProposeRecord]:
        """The costly speculator ``name``'s ``propose`` timed on synthetic rows (:mod:`.draft_probe`), once per
        engine (its cost does not change with its weights)."""
        if name not in self._draft_timings:
            t0 = time.perf_counter()
            hidden = int(self.model.get_input_embeddings().weight.shape[1])
            graphs = self.device.type == "cuda" and self.config.cuda_graphs  # heads capture on a second meeting
            cfg = DraftProbeConfig(warmup=2) if graphs else None
            recs = probe_drafting(
                self.speculators[name], extras, hidden, self.vocab_size, self.device, cfg, self._reference_forward
            )
            self._draft_timings[name] = recs
            logger.info(
                "timed %s's drafting in %.2f s: %s",
                name,
                time.perf_counter() - t0,
                ", ".join(f"{r.rows}x{r.tokens // r.rows} {r.seconds * 1e3:.1f} ms" for r in recs),
            )
        return self._draft_timings[name]

    def _reference_forward(self, rows: int) -> float:
        """Seconds of one ``rows`` x 1 target forward, as the cost table times its cells (the drafting probe's
        reference)."""
        from .cost_probe import forward_cost_ms

        return forward_cost_ms(self.model, rows, 1, repeats=1, warmup=0, engine=self) / 1000.0

    def _target_macs(self) -> int:
        """Multiply-accumulates of one target token (its ``nn.Linear`` weights), counted once per model object:
        every ``generate`` call hands it to the controller, the model rarely changes."""
        key = id(self.model)
        if self._macs_of is None or self._macs_of[0] != key:
            n = sum(m.weight.numel() for m in self.model.modules() if isinstance(m, torch.nn.Linear))
            self._macs_of = (key, n)
        return self._macs_of[1]

    def release(self) -> None:
        """Give back what the engine holds: the KV cache buffers, the CPU linear-kernel routing and its weight
        copies."""
        self._cache = None
        self._uninstall_linear()
        self._uninstall_linear = lambda: None
        drop_packed_weights(self.model)

    # ------------------------------------------------------------------------------------------ checks
    def _validate_prompts(self, prompts: list[list[int]], sampling: SamplingParams) -> None:
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
            if len(p) >= self.max_context:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens, which does not fit the model's context of "
                    f"{self.max_context} tokens (leave room for at least one new token)"
                )
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"prompt {i} holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
        for t in sampling.stop_token_ids:
            if t >= self.vocab_size:
                raise ValueError(f"stop token id {t} is outside the vocabulary [0, {self.vocab_size})")
        if self.sliding_window is not None:
            longest = max(len(p) for p in prompts) + sampling.max_new_tokens
            if longest > self.sliding_window:
                raise ValueError(
                    f"sequences of up to {longest} tokens exceed the model's sliding window ({self.sliding_window}); "
                    "sliding-window attention is not supported by RolloutEngine yet"
                )

    # ------------------------------------------------------------------------------------------ core
    def _ensure_cache(self, rows: int, length: int) -> SlotKVCache:
        args = (rows, length, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        if self.config.reuse_cache and self._cache is not None and self._cache.fits(*args):
            return self._cache
        self._cache = None  # free the old buffers before allocating new ones
        self._cache = SlotKVCache(
            self.num_layers, rows, length, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )
        return self._cache

    def _mask(self, starts: torch.Tensor, q_len: int, kv_len: int) -> torch.Tensor:
        """Boolean attention mask ``[n, 1, q, kv]``: query j of row i (position starts[i]+j) sees keys <= it."""
        dev = starts.device
        qpos = starts[:, None] + torch.arange(q_len, device=dev)[None, :]  # [n, q]
        kpos = torch.arange(kv_len, device=dev)  # [kv]
        mask = kpos[None, None, :] <= qpos[:, :, None]
        if self.sliding_window is not None:
            mask &= kpos[None, None, :] > qpos[:, :, None] - self.sliding_window
        return mask[:, None]

    def _forward(
        self,
        input_ids: torch.Tensor,  # [n, q]
        position_ids: torch.Tensor,  # [n, q]
        mask: torch.Tensor,  # [n, 1, q, kv]
        cache: SlotKVCache,
        want_hidden: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        out = self.model.get_decoder()(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=True,
            output_hidden_states=want_hidden,
            **{self._cache_kwarg: cache},
        )
        return out.last_hidden_state, (out.hidden_states if want_hidden else None)

    def _forward_tapped(
        self,
        input_ids: torch.Tensor,  # [n, q]
        position_ids: torch.Tensor,  # [n, q]
        mask: torch.Tensor,  # [n, 1, q, kv]
        cache: SlotKVCache,
        layers: Sequence[int],
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """:meth:`_forward` that keeps only the hidden states of ``layers`` (indices into HF's ``hidden_states``:
        0 the embeddings, i the output of layer i - 1, the last / -1 the final normed output), read by hooks on the
        decoder layers: ``output_hidden_states`` keeps every layer's (31 tensors of [n, P, hidden] for a 30-layer
        model), ~3% of a 16-prompt prefill on one core."""
        blocks = self.model.get_decoder().layers
        total = len(blocks) + 1
        taps: dict[int, torch.Tensor] = {}
        handles = []
        for layer in layers:
            idx = layer % total
            if idx == 0:
                handles.append(blocks[0].register_forward_pre_hook(_tap_input(taps, layer), with_kwargs=True))
            elif idx < total - 1:
                handles.append(blocks[idx - 1].register_forward_hook(_tap_output(taps, layer)))
        try:
            last, _ = self._forward(input_ids, position_ids, mask, cache, False)
        finally:
            for h in handles:
                h.remove()
        taps.update({layer: last for layer in layers if layer % total == total - 1})
        return last, taps

    def _target_forward(
        self,
        input_ids: torch.Tensor,  # [n, q] the pending token and the drafts of every active row (right-padded)
        starts: torch.Tensor,  # [n] tokens of each row already in the KV cache (= position of input_ids[:, 0])
        cache: SlotKVCache,
        want_hidden: bool,
        kv_len: int | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """One decode/verification forward of slots 0..n-1: writes the q new keys/values of every row at its own
        offset and returns ``(last_hidden [n, q, hidden], hidden_states or None)``. ``kv_len``: ``max(starts) +
        q`` where the caller knows it (else read from ``starts``: a device sync on a GPU). The step loop, the cost
        probe and the benches call only this."""
        q = input_ids.shape[1]
        if self._graphs is not None:
            kv = int(starts.max()) + q if kv_len is None else kv_len
            return self._graphs(input_ids, starts, cache, want_hidden, kv)
        if self._lean is not None:
            return self._lean(input_ids, starts, cache, want_hidden, kv_len)
        kv_len = int(starts.max()) + q
        position_ids = starts[:, None] + torch.arange(q, device=starts.device)[None, :]
        mask = self._mask(starts, q, kv_len)
        cache.set_step(0, starts, q, kv_len)
        return self._forward(input_ids, position_ids, mask, cache, want_hidden)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., hidden] -> [..., vocab] raw logits, upcast to float32 at least."""
        logits = self.model.get_output_embeddings()(hidden)
        return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()

    def _generate(
        self, prompts: list[list[int]], sampling: SamplingParams, n_gen: int, controller: Controller
    ) -> RolloutBatch:
        t_start = time.perf_counter()
        if self._graphs is not None:
            self._graphs.validate()  # a parameter replaced since the last call: its graphs read a stale tensor
        stats = SpecStats(policy_version=self.policy_version)
        R = len(prompts) * n_gen
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops.update(self.eos_token_ids)
        k_cap = self._max_draft_len(controller)
        max_rows = min(R, self.config.max_rows or R)
        slots = max(max_rows, 1) if self._graphs is None else row_bucket(max(max_rows, 1))  # graphs pad rows
        cache = self._ensure_cache(slots, max(len(p) for p in prompts) + sampling.max_new_tokens + k_cap + 1)
        rows_all = self._make_rows(prompts, sampling, n_gen)
        hidden_layers = sorted({layer for s in self.speculators.values() for layer in s.hidden_layers})
        pbar = tqdm(
            total=R * sampling.max_new_tokens,
            disable=not self.config.progress,
            desc="rollout",
            unit="tok",
            leave=False,
        )
        ctx = WaveContext(sampling, stops, controller, cache, stats, pbar, hidden_layers, k_cap, n_gen, self.device)
        # resolved once per call (a runtime-checkable Protocol's isinstance was ~50 us a decode step)
        ctx.hidden_observers = [
            (speculator_extras(s).observe_hidden, tuple(s.hidden_layers))
            for s in self.speculators.values()
            if s.hidden_layers
        ]
        # Groups are processed in waves of whole groups that fit max_rows rows.
        groups_per_wave = max(1, max_rows // n_gen)
        for g0 in range(0, len(prompts), groups_per_wave):
            g1 = min(len(prompts), g0 + groups_per_wave)
            self._run_wave(ctx, rows_all[g0 * n_gen : g1 * n_gen], prompts[g0:g1], g0)
        pbar.close()

        stats.num_sequences = R
        stats.num_completion_tokens = sum(len(r.completion) for r in rows_all)
        stats.total_s = time.perf_counter() - t_start
        controller.finish(stats)
        return RolloutBatch(
            prompt_ids=[list(prompts[r.group_id]) for r in rows_all],
            completion_ids=[r.completion for r in rows_all],
            logprobs=[r.logprobs for r in rows_all],
            finish_reasons=[r.finish or "length" for r in rows_all],  # type: ignore[misc]
            num_generations=n_gen,
            stats=stats,
            policy_version=self.policy_version,
        )

    def _make_rows(self, prompts: list[list[int]], sampling: SamplingParams, n_gen: int) -> list[Row]:
        """One :class:`Row` per sample, grouped by prompt; sampling rows get a generator derived from the seed and
        their index (fresh randomness without a seed)."""
        base_seed = sampling.seed
        if base_seed is None and not sampling.greedy:
            base_seed = int(torch.randint(0, 2**62, (1,)).item())
        rows: list[Row] = []
        for g, p in enumerate(prompts):
            for s in range(n_gen):
                r = g * n_gen + s
                gen = None
                if base_seed is not None and not sampling.greedy:
                    gen = torch.Generator().manual_seed((base_seed * 1_000_003 + r) % (2**63 - 1))
                max_new = min(sampling.max_new_tokens, self.max_context - len(p))
                rows.append(Row(r, g, list(p), len(p), max_new, 0, gen, [], []))
        return rows

    def _max_draft_len(self, controller: Controller) -> int:
        return int(controller.num_speculative_tokens) if self.speculators else 0

    # ------------------------------------------------------------------------------------------ one wave
    def _prefill(
        self,
        wave: list[_Row],
        prompts: list[list[int]],
        n_gen: int,
        sampling: SamplingParams,
        cache: SlotKVCache,
        stats: SpecStats,
        hidden_layers: list[int],
    ) -> tuple[torch.Tensor, list[_PromptFeatures]]:
        """Prefill unique prompts into slots 0..G-1, then copy them to the group's slots. Returns the last-position
        logits per group ``[G, vocab]`` and, when asked, the prompt hidden states of each prefill chunk (the
        forward's own tensors: no padding to the longest prompt, no concatenation; at 64 prompts those copies cost
        ~0.3 s of an 11 s prefill)."""
        t0 = time.perf_counter()
        dev = self.device
        G = len(prompts)
        want_hidden = bool(hidden_layers) or bool(self._capture_hooks)
        last_logits = []
        hidden_chunks: list[_PromptFeatures] = []
        for g, g_end in _prefill_chunks(prompts, self.config.prefill_chunk_tokens):
            chunk = prompts[g:g_end]
            plen = max(len(p) for p in chunk)
            n = len(chunk)
            ids = torch.zeros((n, plen), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            ids = ids.to(dev)
            pos = torch.arange(plen, device=dev)[None, :].expand(n, plen)
            mask = self._mask(torch.zeros(n, dtype=torch.long, device=dev), plen, plen)
            cache.set_uniform_step(g, n, 0, plen)
            stats.num_prefill_positions += n * plen
            if self._capture_hooks or not hidden_layers:  # capture reads every layer's features
                last_hidden, all_hidden = self._forward(ids, pos, mask, cache, want_hidden)
            else:
                last_hidden, all_hidden = self._forward_tapped(ids, pos, mask, cache, hidden_layers)
            lens = torch.tensor([len(p) for p in chunk], device=dev)
            last = last_hidden[torch.arange(n, device=dev), lens - 1]  # [n, hidden]
            last_logits.append(self._logits(last))
            if all_hidden is not None:
                if hidden_layers:
                    layers = {layer: all_hidden[layer] for layer in hidden_layers}
                    hidden_chunks.append(_PromptFeatures(g, g_end, layers))
                if self._capture_hooks:
                    rows_of = [[r.row_id for r in wave[gg * n_gen : (gg + 1) * n_gen]] for gg in range(g, g_end)]
                    self._capture_prefill(chunk, rows_of, ids, pos, all_hidden, last_hidden, last_logits[-1], sampling)
        # each group's prompt KV -> the slots of its samples (slot g*n_gen + s); src <= dst, gathered first
        if n_gen > 1:
            dst = torch.arange(G * n_gen, device=dev)
            cache.copy_rows(dst, dst // n_gen, max(len(p) for p in prompts))
        for r in wave:
            r.cache_len = r.prompt_len
        stats.prefill_s += time.perf_counter() - t0
        return torch.cat(last_logits, 0), hidden_chunks

    def _capture_prefill(self, chunk, rows_of, ids, pos, all_hidden, last_hidden, last_logits, sampling) -> None:
        n, plen = ids.shape
        next_ids = torch.full_like(ids, -1)
        next_ids[:, :-1] = ids[:, 1:]
        rec = CaptureRecord(
            policy_version=self.policy_version,
            row_ids=[],
            input_ids=ids,
            next_ids=next_ids,
            num_valid=torch.tensor([len(p) - 1 for p in chunk], device=ids.device),
            positions=pos,
            hidden_states={i: h for i, h in enumerate(all_hidden)} | {-1: last_hidden},
            target_logits=torch.empty(0),
            sampling=sampling,
            is_prefill=True,
            last_logits=last_logits,
            prompt_rows=rows_of,
        )
        for hook in self._capture_hooks:
            hook(rec)

    def _run_wave(self, ctx: WaveContext, wave: list[Row], prompts: list[list[int]], g_offset: int) -> None:
        """Prefill a wave of whole groups, sample their first tokens, then decode until every row stops. The groups
        go into the cache by prompt length (rows keep their ids: the batch's order is unchanged), so prompts of
        similar length share a prefill forward and little of it is padding."""
        n = ctx.n_gen
        order = sorted(range(len(prompts)), key=lambda g: len(prompts[g]))
        wave = [r for g in order for r in wave[g * n : (g + 1) * n]]
        active = self._start_wave(ctx, wave, [prompts[g] for g in order], [g_offset + g for g in order])
        step = 0
        while active:
            active = self._decode_step(ctx, active, step)
            step += 1

    def _start_wave(self, ctx: WaveContext, wave: list[Row], prompts: list[list[int]], groups: list[int]) -> list[Row]:
        """Prefill, first token of every row (a K=0 verification of its group's last prompt position), speculators
        started and shown the first tokens (and the prompt features); returns the rows still generating."""
        n_gen = ctx.n_gen
        logits, prompt_hidden = self._prefill(
            wave, prompts, n_gen, ctx.sampling, ctx.cache, ctx.stats, ctx.hidden_layers
        )
        n = len(wave)
        no_drafts = torch.zeros((n, 0), dtype=torch.long, device=ctx.device)  # [n, 0]
        first = self._verify(ctx, wave, no_drafts, [0] * n, None, logits.repeat_interleave(n_gen, dim=0)[:, None, :])
        for g in range(len(prompts)):
            rows = [r.row_id for r in wave[g * n_gen : (g + 1) * n_gen]]
            for s in self.speculators.values():
                s.start(groups[g], list(prompts[g]), rows)
        for i, r in enumerate(wave):
            emit(r, first.output_ids[i][:1], first.logprobs[i][:1], ctx.stops)
        ctx.stats.num_prefill_tokens += n
        ctx.pbar.update(n)
        for s in self.speculators.values():
            for r in wave:
                s.observe(r.row_id, r.completion[:1])
        # hidden-state speculators see the prompt features of every row (its group's, shared by the group's samples:
        # one call per prefill chunk and sample index, over the chunk's tensors as they are, never copied per row)
        for chunk in prompt_hidden:
            for s in range(n_gen):
                rows = [wave[g * n_gen + s] for g in range(chunk.start, chunk.end)]
                self._observe_hidden(ctx, [r.row_id for r in rows], chunk.layers, [r.prompt_len for r in rows])
        ctx.group_left.update({g: n_gen for g in groups})
        return self._shrink(ctx, wave)

    def _decode_step(self, ctx: WaveContext, active: list[Row], step: int) -> list[Row]:
        """One decode step of the active rows; returns the rows still generating after it."""
        t_step = time.perf_counter()
        drafts, proposals = self._draft(ctx, active, step)
        packed = pack(active, drafts, ctx.device)
        t0 = time.perf_counter()
        want_hidden = bool(ctx.hidden_layers) or bool(self._capture_hooks)
        kv_len = max(r.cache_len for r in active) + packed.input_ids.shape[1]
        last_hidden, all_hidden = self._target_forward(packed.input_ids, packed.starts, ctx.cache, want_hidden, kv_len)
        logits = self._logits(last_hidden)  # [n, q, vocab]
        t_fwd = time.perf_counter() - t0
        ctx.stats.forward_s += t_fwd
        res = self._verify(ctx, active, packed.input_ids[:, 1:], packed.draft_lens, drafts, logits)
        per_row, emitted = self._record(ctx, active, packed, res)
        raw = self._take_raw_logprobs(logits)
        if self._capture_hooks:
            self._capture_step(
                active, packed, res.accepted, res.output_ids, all_hidden, last_hidden, logits, raw, ctx.sampling
            )
        if ctx.hidden_observers:
            # features of the positions that now lie on the sequences (pending token + accepted drafts)
            m = max(res.accepted) + 1
            feats = {layer: all_hidden[layer][:, :m] for layer in ctx.hidden_layers}  # type: ignore[index]
            self._observe_hidden(ctx, [r.row_id for r in active], feats, [a + 1 for a in res.accepted])
        survivors = self._shrink(ctx, active)
        rec = StepRecord(
            num_rows=len(active),
            query_len=packed.num_draft + 1,
            num_emitted=emitted,
            num_draft_tokens=sum(packed.draft_lens),
            num_accepted=sum(res.accepted),
            forward_s=t_fwd,
            step_s=time.perf_counter() - t_step,
            proposals=proposals,
        )
        ctx.stats.steps.append(rec)
        self._timed_plan(ctx, ctx.controller.update, rec, per_row)
        return survivors

    def _timed_plan(self, ctx: WaveContext, fn: Callable[..., _T], *args: Any) -> _T:
        """Call a controller method, its time counted as the controller's (``SpecStats.plan_s``)."""
        t0 = time.perf_counter()
        out = fn(*args)
        ctx.stats.plan_s += time.perf_counter() - t0
        return out

    def _draft(
        self, ctx: WaveContext, active: list[Row], step: int
    ) -> tuple[list[Draft | None], dict[str, ProposeRecord]]:
        """Plan, propose (each speculator once, batched), choose: one draft (or None) per active row."""
        state = plan_state(active, list(self.speculators), step, ctx.sampling)
        plan = self._timed_plan(ctx, ctx.controller.plan, state)
        requests = draft_requests(plan, active, ctx.k_cap)
        candidates, proposals = propose_all(self.speculators, requests, active, ctx.sampling, ctx.stats)
        chosen = self._timed_plan(ctx, ctx.controller.choose, state, candidates)
        return cap_drafts(chosen, active, ctx.k_cap), proposals

    def _verify(
        self,
        ctx: WaveContext,
        rows: list[Row],
        draft_ids: torch.Tensor,  # [n, K]
        draft_lens: list[int],  # [n]
        drafts: list[Draft | None] | None,  # None: the first tokens after the prefill (K = 0)
        logits: torch.Tensor,  # [n, K+1, vocab]
    ) -> Verified:
        """Rejection sampling of the rows' drafts against the target logits, as Python lists."""
        t0 = time.perf_counter()
        K = draft_ids.shape[1]
        draft_probs = dense_draft_probs(drafts, K, self.vocab_size, logits.dtype, ctx.device) if drafts else None
        uniforms = None
        if not ctx.sampling.greedy:
            uniforms = draw_uniforms([r.generator for r in rows], draft_lens, K, ctx.device)
        lens = torch.tensor(draft_lens, dtype=torch.long, device=ctx.device)
        res = self.verifier.verify(draft_ids, lens, draft_probs, logits, ctx.sampling, uniforms)
        out = Verified(res.num_accepted.tolist(), res.output_ids.tolist(), res.logprobs.tolist())
        if drafts is not None:  # a decode step (the first tokens count as prefill)
            ctx.stats.verify_s += time.perf_counter() - t0
        return out

    def _record(
        self, ctx: WaveContext, active: list[Row], packed: PackedStep, res: Verified
    ) -> tuple[list[RowOutcome], int]:
        """Emit each row's verified tokens, count them, and show them to every speculator."""
        stats = ctx.stats
        emitted_total = 0
        per_row: list[RowOutcome] = []
        for i, r in enumerate(active):
            a = res.accepted[i]
            toks = res.output_ids[i][: a + 1]
            r.cache_len += a + 1  # the pending token and the accepted drafts are now in the cache
            emitted = emit(r, toks, res.logprobs[i][: a + 1], ctx.stops)
            emitted_total += emitted
            d = packed.drafts[i]
            stats.record_row(d.speculator if d is not None else None, packed.draft_lens[i], a, emitted)
            per_row.append(RowOutcome(d, a, toks))
            for s in self.speculators.values():
                s.observe(r.row_id, r.completion[-emitted:] if emitted else [])
        stats.num_steps += 1
        ctx.pbar.update(emitted_total)
        return per_row, emitted_total

    @staticmethod
    def _observe_hidden(
        ctx: WaveContext, row_ids: list[int], feats: dict[int, torch.Tensor], num_new: list[int]
    ) -> None:
        """Hand each hidden-state speculator the features of its layers (``feats``: layer -> [n, m, hidden])."""
        for observe, layers in ctx.hidden_observers:
            observe(row_ids, {la: feats[la] for la in layers}, num_new)

    def _shrink(self, ctx: WaveContext, rows: list[Row]) -> list[Row]:
        """Drop the rows that finished: stop their finished groups and compact the cache to the survivors."""
        keep = [i for i, r in enumerate(rows) if r.finish is None]
        if len(keep) == len(rows):
            return rows
        for r in rows:
            if r.finish is not None:
                ctx.group_left[r.group_id] -= 1
        stop_finished_groups(self.speculators, ctx.group_left)
        if not keep:
            return []
        order = ctx.cache.compact(keep, max(rows[i].cache_len for i in keep))
        return [rows[i] for i in order]

    def _capture_step(
        self,
        active: list[Row],
        packed: PackedStep,
        acc: list[int],
        out_ids: list[list[int]],
        all_hidden: tuple[torch.Tensor, ...] | None,
        last_hidden: torch.Tensor,  # [n, q, hidden]
        logits: torch.Tensor,  # [n, q, vocab]
        raw_logprobs: torch.Tensor | None,  # [n, q, vocab] log_softmax(logits) when the verifier made it
        sampling: SamplingParams,
    ) -> None:
        input_ids = packed.input_ids  # [n, q]
        dev = input_ids.device
        q = input_ids.shape[1]
        # positions 0..a-1 predicted the accepted drafts (= input_ids[:, 1..a]); position a predicted out[a]
        rec = CaptureRecord(
            policy_version=self.policy_version,
            row_ids=[r.row_id for r in active],
            input_ids=input_ids,
            next_ids=torch.tensor(out_ids, dtype=torch.long, device=dev),  # [n, q]
            num_valid=torch.tensor([a + 1 for a in acc], dtype=torch.long, device=dev),
            positions=packed.starts[:, None] + torch.arange(q, device=dev)[None, :],
            hidden_states={i: h for i, h in enumerate(all_hidden or ())} | {-1: last_hidden},
            target_logits=logits,
            sampling=sampling,
            target_logprobs=raw_logprobs,
        )
        for hook in self._capture_hooks:
            hook(rec)

    def _take_raw_logprobs(self, logits: torch.Tensor) -> torch.Tensor | None:  # logits [n, q, vocab]
        """The verifier's ``log_softmax`` of this step's ``logits`` when it made one (no second pass for a capture
        hook's labels), else None; the verifier's reference is dropped (no [n, q, vocab] held between steps)."""
        lp = getattr(self.verifier, "last_raw_logprobs", None)
        if lp is None:
            return None
        self.verifier.last_raw_logprobs = None  # type: ignore[attr-defined]
        return lp if lp.shape == logits.shape else None


def _prefill_chunks(
    prompts: list[list[int]], budget: int, overhead_tokens: int = PREFILL_CHUNK_OVERHEAD_TOKENS
) -> list[tuple[int, int]]:
    """``[(g, g_end), ...]``: consecutive prompt groups cut into chunks (rows x padded length <= ``budget``, or one
    row) that minimise the prefill's cost, padded tokens plus ``overhead_tokens`` per forward (dynamic
    programming over the cut points; prompts sorted by length make the padding small)."""
    G = len(prompts)
    best = [0.0] + [math.inf] * G  # best[j]: cost of prefilling prompts[:j]
    cut = [0] * (G + 1)
    for j in range(1, G + 1):
        plen = 0
        for i in range(j - 1, -1, -1):  # chunk prompts[i:j]
            plen = max(plen, len(prompts[i]))
            if (j - i) * plen > budget and i < j - 1:
                break
            cost = best[i] + (j - i) * plen + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[tuple[int, int]] = []
    j = G
    while j > 0:
        chunks.append((cut[j], j))
        j = cut[j]
    return chunks[::-1]


def _tap_input(taps: dict[int, torch.Tensor], key: int) -> Callable[..., None]:
    """A forward pre-hook that keeps a decoder layer's input hidden states under ``key``."""

    def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        taps[key] = args[0] if args else kwargs["hidden_states"]

    return hook


def _tap_output(taps: dict[int, torch.Tensor], key: int) -> Callable[..., None]:
    """A forward hook that keeps a decoder layer's output hidden states under ``key``."""

    def hook(_: torch.nn.Module, __: Any, out: Any) -> None:
        taps[key] = out[0] if isinstance(out, tuple) else out

    return hook
