"""The rollout engine: batched, lossless speculative decoding with exact logprobs.

One ``generate`` call:

1. **Prefill** each *unique* prompt once (a GRPO group of ``num_generations`` samples shares it), in chunks,
   into a preallocated :class:`SlotKVCache`; copy the prompt's keys/values into the slots of its samples
   and sample each sample's first token from the shared last-position distribution.
2. **Decode steps** until every row stops. Each step the controller plans, per row, a speculator and a
   draft length; speculators propose drafts; ONE target forward runs over ``[pending token, draft...]`` of
   every active row (ragged drafts padded to the longest); the rejection sampler accepts a prefix of each
   draft and emits one recovered or bonus token (so every row emits >= 1 token per forward, and the output
   distribution is exactly the target's). Rows roll their cache length back past rejected tokens.
3. Rows that stop (stop/EOS token, ``max_new_tokens``, context end) leave the batch: the cache is compacted
   so finished rows stop costing compute.

``k = 0`` (no speculators, or ``FixedController(0)``) is plain autoregressive decoding through the very same
code path: the fair baseline.

Logprobs are those of the distribution each token was sampled from (``processed_logprobs``: temperature,
then top-k/top-p; see :class:`atlas_rl.SamplingParams`), computed from the verification forward itself —
the same numbers a teacher-forced forward over the final sequences gives.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from atlas_rl.config import EngineConfig
from atlas_rl.controller import (
    AutoController,
    AutoControllerConfig,
    Controller,
    FixedController,
    PlanState,
    RowOutcome,
    VerificationCost,
)
from atlas_rl.controller.cost import cost_cache_key, load_or_calibrate
from atlas_rl.speculators.base import Speculator
from atlas_rl.types import (
    CaptureRecord,
    Draft,
    ProposeInput,
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
from .cpu_linear import install_cpu_linear
from .forward import LeanForward, lean_forward_unsupported
from .kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

CaptureHook = Callable[[CaptureRecord], None]


@dataclass
class _Row:
    """Bookkeeping of one sequence (Python side)."""

    row_id: int
    group_id: int
    tokens: list[int]  # prompt + emitted tokens; the last one is pending (not yet in the KV cache)
    prompt_len: int
    max_new: int
    cache_len: int  # tokens of ``tokens`` already in the KV cache
    generator: torch.Generator | None
    completion: list[int]
    logprobs: list[float]
    finish: str | None = None

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.completion)


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
            ``max_k = config.num_speculative_tokens`` over this engine's calibrated cost model
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
            self.speculators[s.name] = s
        self.verifier: Verifier = verifier or RejectionSampler()
        self.policy_version = 0
        self._capture_hooks: list[CaptureHook] = []
        self._cache: SlotKVCache | None = None
        self._uninstall_linear = install_cpu_linear(model) if self.config.cpu_linear_kernel else (lambda: None)
        self._verification_cost: VerificationCost | None = None
        self._lean: LeanForward | None = None
        if self.config.lean_forward:
            why = lean_forward_unsupported(model)
            if why is None:
                self._lean = LeanForward(model, cpu_linear=self.config.cpu_linear_kernel)
            else:
                logger.info("lean forward off for this model (%s): using the Hugging Face decoder", why)

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

    # ------------------------------------------------------------------------------------------ public
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def verification_cost(self, budget_s: float | None = None) -> VerificationCost:
        """This engine's verification cost model: cached per model/device/dtype/threads, else measured now within
        ``budget_s`` seconds (default ``AutoControllerConfig.calibration_budget_s``); refined online by the auto
        controller."""
        if self._verification_cost is None:
            from .cost_probe import forward_cost_ms

            mc = self.model.config
            key = cost_cache_key(
                mc.to_dict(),
                str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
                str(self.dtype),
                torch.get_num_threads(),
                extra=f"cpu_linear={self.config.cpu_linear_kernel},lean={self._lean is not None},"
                f"code={engine_code_version()}",
            )

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

    def _default_controller(self) -> Controller:
        k = self.config.num_speculative_tokens
        if self.config.controller == "fixed" or not self.speculators or k == 0:
            return FixedController(k)
        cfg = AutoControllerConfig(max_k=k)
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
        """Load new policy weights (a state_dict or ``named_parameters()``) and set ``policy_version``.

        ``weights=None`` means the model was updated in place (e.g. the trainer's own module). ``version``
        must be greater than the current one (default: current + 1). Returns the new version.
        """
        new_version = self.policy_version + 1 if version is None else version
        if isinstance(new_version, bool) or not isinstance(new_version, int):
            raise ValueError(f"version must be an int, got {version!r}")
        if new_version <= self.policy_version:
            raise ValueError(
                f"version must increase: the engine is at policy_version {self.policy_version}, got {new_version}"
            )
        if weights is not None:
            items = weights.items() if isinstance(weights, Mapping) else weights
            own = dict(self.model.named_parameters())
            own.update(dict(self.model.named_buffers()))
            with torch.no_grad():
                for name, tensor in items:
                    key = name
                    for prefix in ("module.", "_orig_mod."):
                        if key not in own and key.startswith(prefix):
                            key = key[len(prefix) :]
                    if key not in own:
                        raise ValueError(f"update_weights: the model has no parameter named {name!r}")
                    dst = own[key]
                    if tuple(dst.shape) != tuple(tensor.shape):
                        raise ValueError(
                            f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                            f"the model's is {tuple(dst.shape)}"
                        )
                    if dst.data_ptr() == tensor.data_ptr():
                        continue  # the engine already reads this very tensor
                    dst.copy_(tensor)
        self.policy_version = new_version
        for s in self.speculators.values():
            hook = getattr(s, "on_policy_update", None)
            if callable(hook):
                hook(new_version)
        return new_version

    def generate(
        self,
        prompt_ids: Sequence[Sequence[int]] | torch.Tensor,
        sampling: SamplingParams | None = None,
        num_generations: int = 1,
        controller: Controller | None = None,
    ) -> RolloutBatch:
        """Sample ``num_generations`` completions for every prompt.

        Args:
            prompt_ids: token ids of each prompt (no padding), ``list[list[int]]`` or a 2-D tensor.
            sampling: :class:`SamplingParams` (default: T=1, 128 new tokens).
            num_generations: samples per prompt (a GRPO group); their prompt is prefilled once.
            controller: overrides the engine's controller for this call (e.g. fixed-k benchmarks).

        Returns:
            :class:`RolloutBatch` with rows grouped by prompt (``len = len(prompt_ids) * num_generations``).
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
        if getattr(controller, "needs_cost_model", False) and self.speculators:
            controller.set_cost_model(self.verification_cost())  # type: ignore[attr-defined]
        if hasattr(controller, "set_speculator_priors"):
            priors = {
                name: float(p)
                for name, s in self.speculators.items()
                if (p := getattr(s, "expected_acceptance", None)) is not None
            }
            if priors:
                controller.set_speculator_priors(priors)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._generate(prompts, sampling, num_generations, controller)
        finally:
            if was_training:
                self.model.train()

    def release(self) -> None:
        """Give back what the engine holds: the KV cache buffers and the CPU linear-kernel routing."""
        self._cache = None
        self._uninstall_linear()
        self._uninstall_linear = lambda: None

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

    def _target_forward(
        self,
        input_ids: torch.Tensor,  # [n, q] the pending token and the drafts of every active row (right-padded)
        starts: torch.Tensor,  # [n] tokens of each row already in the KV cache (= position of input_ids[:, 0])
        cache: SlotKVCache,
        want_hidden: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """One decode/verification forward of slots 0..n-1: writes the q new keys/values of every row at its own
        offset and returns ``(last_hidden [n, q, hidden], hidden_states or None)``. The step loop, the cost probe
        and the benches call only this."""
        if self._lean is not None:
            return self._lean(input_ids, starts, cache, want_hidden)
        q = input_ids.shape[1]
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
        stats = SpecStats(policy_version=self.policy_version)
        G = len(prompts)
        R = G * n_gen
        stops = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stops.update(self.eos_token_ids)
        k_cap = self._max_draft_len(controller)
        max_rows = min(R, self.config.max_rows or R)
        max_prompt = max(len(p) for p in prompts)
        cache = self._ensure_cache(max(max_rows, 1), max_prompt + sampling.max_new_tokens + k_cap + 1)

        base_seed = sampling.seed
        if base_seed is None and not sampling.greedy:
            base_seed = int(torch.randint(0, 2**62, (1,)).item())
        rows_all: list[_Row] = []
        for g, p in enumerate(prompts):
            for s in range(n_gen):
                r = g * n_gen + s
                gen = None
                if not sampling.greedy:
                    gen = torch.Generator().manual_seed((base_seed * 1_000_003 + r) % (2**63 - 1))
                rows_all.append(
                    _Row(
                        row_id=r,
                        group_id=g,
                        tokens=list(p),
                        prompt_len=len(p),
                        max_new=min(sampling.max_new_tokens, self.max_context - len(p)),
                        cache_len=0,
                        generator=gen,
                        completion=[],
                        logprobs=[],
                    )
                )
        want_hidden_layers = sorted({layer for s in self.speculators.values() for layer in s.hidden_layers})
        pbar = tqdm(
            total=R * sampling.max_new_tokens,
            disable=not self.config.progress,
            desc="rollout",
            unit="tok",
            leave=False,
        )
        # Groups are processed in waves of whole groups that fit max_rows rows.
        groups_per_wave = max(1, max_rows // n_gen)
        for g0 in range(0, G, groups_per_wave):
            g1 = min(G, g0 + groups_per_wave)
            wave = rows_all[g0 * n_gen : g1 * n_gen]
            self._run_wave(
                wave,
                prompts[g0:g1],
                g0,
                n_gen,
                sampling,
                stops,
                controller,
                cache,
                stats,
                pbar,
                want_hidden_layers,
                k_cap,
            )
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

    def _max_draft_len(self, controller: Controller) -> int:
        return int(controller.max_k) if self.speculators else 0

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
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
        """Prefill unique prompts into slots 0..G-1, then copy them to the group's slots.

        Returns the last-position logits per group ``[G, vocab]`` and, when asked, the prompt hidden
        states per requested layer ``[G, P_max, hidden]``.
        """
        t0 = time.perf_counter()
        dev = self.device
        G = len(prompts)
        want_hidden = bool(hidden_layers) or bool(self._capture_hooks)
        last_logits = []
        hidden_chunks: dict[int, list[torch.Tensor]] = {layer: [] for layer in hidden_layers}
        budget = self.config.prefill_chunk_tokens
        g = 0
        while g < G:
            # grow the chunk while rows x padded length stays within the budget
            g_end = g + 1
            plen = len(prompts[g])
            while g_end < G and (g_end + 1 - g) * max(plen, len(prompts[g_end])) <= budget:
                plen = max(plen, len(prompts[g_end]))
                g_end += 1
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
            last_hidden, all_hidden = self._forward(ids, pos, mask, cache, want_hidden)
            lens = torch.tensor([len(p) for p in chunk], device=dev)
            last = last_hidden[torch.arange(n, device=dev), lens - 1]  # [n, hidden]
            last_logits.append(self._logits(last))
            if all_hidden is not None:
                for layer in hidden_layers:
                    hidden_chunks[layer].append(_pad_to(all_hidden[layer], max(len(p) for p in prompts)))
                if self._capture_hooks:
                    rows_of = [[r.row_id for r in wave[gg * n_gen : (gg + 1) * n_gen]] for gg in range(g, g_end)]
                    self._capture_prefill(chunk, rows_of, ids, pos, all_hidden, last_hidden, last_logits[-1], sampling)
            g = g_end
        # each group's prompt KV -> the slots of its samples (slot g*n_gen + s); src <= dst, gathered first
        if n_gen > 1:
            dst = torch.arange(G * n_gen, device=dev)
            cache.copy_rows(dst, dst // n_gen, max(len(p) for p in prompts))
        for r in wave:
            r.cache_len = r.prompt_len
        stats.prefill_s += time.perf_counter() - t0
        hidden = {layer: torch.cat(ch, 0) for layer, ch in hidden_chunks.items()} if hidden_layers else None
        return torch.cat(last_logits, 0), hidden

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

    def _run_wave(
        self,
        wave: list[_Row],
        prompts: list[list[int]],
        g_offset: int,
        n_gen: int,
        sampling: SamplingParams,
        stops: set[int],
        controller: Controller,
        cache: SlotKVCache,
        stats: SpecStats,
        pbar: tqdm,
        hidden_layers: list[int],
        k_cap: int,
    ) -> None:
        dev = self.device
        specs = self.speculators
        spec_names = list(specs)
        prefill_logits, prompt_hidden = self._prefill(wave, prompts, n_gen, sampling, cache, stats, hidden_layers)

        # first token of every row from its group's last-position distribution (a K=0 verification)
        G = len(prompts)
        n = len(wave)
        first = self.verifier.verify(
            torch.zeros((n, 0), dtype=torch.long, device=dev),
            torch.zeros(n, dtype=torch.long, device=dev),
            None,
            prefill_logits.repeat_interleave(n_gen, dim=0)[:, None, :],
            sampling,
            None if sampling.greedy else draw_uniforms([r.generator for r in wave], [0] * n, 0, dev),
        )
        first_ids = first.output_ids[:, 0].tolist()
        first_lp = first.logprobs[:, 0].tolist()
        for s in specs.values():
            for g in range(G):
                gid = g_offset + g
                s.start(gid, list(prompts[g]), [r.row_id for r in wave[g * n_gen : (g + 1) * n_gen]])
        for i, r in enumerate(wave):
            self._emit(r, [first_ids[i]], [first_lp[i]], stops)
        stats.num_prefill_tokens += n
        pbar.update(n)
        for s in specs.values():
            for r in wave:
                s.observe(r.row_id, r.completion[:1])

        # hidden-state speculators see the prompt features of every row (the group's, shared by its samples)
        hidden_specs = [sp for sp in specs.values() if sp.hidden_layers]
        if prompt_hidden is not None:
            feats = {layer: h.repeat_interleave(n_gen, dim=0) for layer, h in prompt_hidden.items()}
            for sp in hidden_specs:
                sp.observe_hidden(
                    [r.row_id for r in wave], {la: feats[la] for la in sp.hidden_layers}, [r.prompt_len for r in wave]
                )

        active = [r for r in wave if r.finish is None]
        group_left = {g_offset + g: n_gen for g in range(G)}
        for r in wave:
            if r.finish is not None:
                group_left[r.group_id] -= 1
        self._stop_finished_groups(group_left)
        if len(active) < n:
            keep = [i for i, r in enumerate(wave) if r.finish is None]
            keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
            cache.compact(keep_t, max((r.cache_len for r in active), default=0))

        step = 0
        while active:
            t_step = time.perf_counter()
            n = len(active)
            # ---- plan: per row, candidate (speculator, max draft tokens) pairs
            t0 = time.perf_counter()
            state = PlanState(
                row_ids=[r.row_id for r in active],
                group_ids=[r.group_id for r in active],
                remaining=[r.remaining for r in active],
                speculators=spec_names,
                step=step,
                greedy=sampling.greedy,
            )
            plan = controller.plan(state)
            stats.plan_s += time.perf_counter() - t0
            # ---- propose: each speculator once, batched over the rows that asked for it
            candidates: list[dict[str, Draft]] = [{} for _ in range(n)]
            by_spec: dict[str, list[tuple[int, int]]] = {}
            proposals: dict[str, ProposeRecord] = {}
            for i, cands in enumerate(plan):
                for name, k in cands:
                    k = min(int(k), k_cap, active[i].remaining - 1)
                    if name is not None and k > 0:
                        by_spec.setdefault(name, []).append((i, k))
            for name, pairs in by_spec.items():
                spec = specs[name]
                t0 = time.perf_counter()
                inp = ProposeInput(
                    row_ids=[active[i].row_id for i, _ in pairs],
                    group_ids=[active[i].group_id for i, _ in pairs],
                    token_ids=[active[i].tokens for i, _ in pairs],
                    sampling=sampling,
                )
                out = spec.propose(inp, [k for _, k in pairs])
                dt = time.perf_counter() - t0
                stats.propose_s += dt
                stats.speculator(name).propose_s += dt
                proposals[name] = ProposeRecord(len(pairs), sum(k for _, k in pairs), dt)
                for (i, k), d in zip(pairs, out):
                    if d is not None and len(d) > 0:
                        d = d.truncate(k)
                        d.speculator = d.speculator or name
                        candidates[i][name] = d
            # ---- choose: the controller picks (and may shorten) one draft per row
            t0 = time.perf_counter()
            chosen = controller.choose(state, candidates)
            stats.plan_s += time.perf_counter() - t0
            drafts: list[Draft | None] = []
            for i, d in enumerate(chosen):
                cap = min(k_cap, active[i].remaining - 1)
                drafts.append(d.truncate(cap) if d is not None and len(d) > 0 and cap > 0 else None)
            dlens = [len(d) if d is not None else 0 for d in drafts]
            K = max(dlens)
            q = K + 1
            # ---- one target forward over [pending, drafts...] of every active row
            t0 = time.perf_counter()
            ids_list = []
            for r, d in zip(active, drafts):
                row = [r.tokens[-1]]
                if d is not None:
                    row.extend(d.token_ids)
                row.extend([r.tokens[-1]] * (q - len(row)))
                ids_list.append(row)
            input_ids = torch.tensor(ids_list, dtype=torch.long, device=dev)  # [n, q]
            starts = torch.tensor([r.cache_len for r in active], dtype=torch.long, device=dev)  # [n]
            position_ids = starts[:, None] + torch.arange(q, device=dev)[None, :]
            want_hidden = bool(hidden_layers) or bool(self._capture_hooks)
            last_hidden, all_hidden = self._target_forward(input_ids, starts, cache, want_hidden)
            logits = self._logits(last_hidden)  # [n, q, vocab]
            t_fwd = time.perf_counter() - t0
            stats.forward_s += t_fwd
            # ---- verify
            t0 = time.perf_counter()
            draft_ids = input_ids[:, 1:]
            draft_lens = torch.tensor(dlens, dtype=torch.long, device=dev)
            draft_probs = self._dense_draft_probs(drafts, K, logits.dtype) if K > 0 else None
            uniforms = None
            if not sampling.greedy:
                uniforms = draw_uniforms([r.generator for r in active], dlens, K, dev)
            res = self.verifier.verify(draft_ids, draft_lens, draft_probs, logits, sampling, uniforms)
            acc = res.num_accepted.tolist()
            out_ids = res.output_ids.tolist()
            out_lp = res.logprobs.tolist()
            stats.verify_s += time.perf_counter() - t0
            # ---- bookkeeping
            emitted_total = 0
            per_row: list[RowOutcome] = []
            for i, r in enumerate(active):
                a = acc[i]
                toks = out_ids[i][: a + 1]
                lps = out_lp[i][: a + 1]
                r.cache_len += a + 1  # the pending token and the accepted drafts are now in the cache
                emitted = self._emit(r, toks, lps, stops)
                emitted_total += emitted
                d = drafts[i]
                name = d.speculator if d is not None else None
                per_row.append(RowOutcome(d, a, toks))
                if d is not None:
                    ss = stats.speculator(name)
                    ss.num_drafts += 1
                    ss.num_draft_tokens += dlens[i]
                    ss.num_accepted_tokens += a
                    ss.num_emitted_tokens += emitted
                    ss.num_row_forwards += 1
                    ss.add_position_counts(dlens[i], a)
                    stats.num_drafts += 1
                    stats.num_draft_tokens += dlens[i]
                    stats.num_accepted_tokens += a
                    while len(stats.num_accepted_tokens_per_pos) < dlens[i]:
                        stats.num_accepted_tokens_per_pos.append(0)
                    for j in range(a):
                        stats.num_accepted_tokens_per_pos[j] += 1
                else:
                    stats.num_spec_off_row_steps += 1
                for s in specs.values():
                    s.observe(r.row_id, r.completion[-emitted:] if emitted else [])
            stats.num_steps += 1
            stats.num_row_forwards += n
            stats.num_emitted_tokens += emitted_total
            pbar.update(emitted_total)

            if self._capture_hooks:
                self._capture_step(
                    active, input_ids, position_ids, acc, out_ids, all_hidden, last_hidden, logits, sampling
                )
            if hidden_specs:
                # features of the positions that now lie on the sequences (pending token + accepted drafts)
                m = max(acc) + 1
                num_new = [a + 1 for a in acc]
                row_ids = [r.row_id for r in active]
                for sp in hidden_specs:
                    sp.observe_hidden(row_ids, {la: all_hidden[la][:, :m] for la in sp.hidden_layers}, num_new)
            # ---- shrink the batch
            keep = [i for i, r in enumerate(active) if r.finish is None]
            if len(keep) < n:
                for r in active:
                    if r.finish is not None:
                        group_left[r.group_id] -= 1
                self._stop_finished_groups(group_left)
                survivors = [active[i] for i in keep]
                if survivors:
                    keep_t = torch.tensor(keep, dtype=torch.long, device=dev)
                    cache.compact(keep_t, max(r.cache_len for r in survivors))
                active = survivors
            rec = StepRecord(
                num_rows=n,
                query_len=q,
                num_emitted=emitted_total,
                num_draft_tokens=sum(dlens),
                num_accepted=sum(acc),
                forward_s=t_fwd,
                step_s=time.perf_counter() - t_step,
                proposals=proposals,
            )
            stats.steps.append(rec)
            t0 = time.perf_counter()
            controller.update(rec, per_row)
            stats.plan_s += time.perf_counter() - t0
            step += 1

    def _stop_finished_groups(self, group_left: dict[int, int]) -> None:
        done = [g for g, left in group_left.items() if left == 0]
        for g in done:
            for s in self.speculators.values():
                s.stop(g)
            del group_left[g]

    def _dense_draft_probs(self, drafts: list[Draft | None], K: int, dtype: torch.dtype) -> torch.Tensor | None:
        """``[n, K, vocab]`` draft distributions when any draft is soft; one-hot rows for model-free drafts."""
        if not any(d is not None and d.draft_probs is not None for d in drafts):
            return None
        n = len(drafts)
        out = torch.zeros((n, K, self.vocab_size), dtype=dtype, device=self.device)
        for i, d in enumerate(drafts):
            if d is None or len(d) == 0:
                continue
            if d.draft_probs is not None:
                out[i, : len(d)] = d.draft_probs.to(device=self.device, dtype=dtype)
            else:
                out[i, torch.arange(len(d)), torch.tensor(d.token_ids)] = 1.0
        return out

    def _emit(self, r: _Row, toks: list[int], lps: list[float], stops: set[int]) -> int:
        """Append emitted tokens to a row, honouring stop tokens and the length budget; returns the count."""
        toks = toks[: r.remaining]
        for j, t in enumerate(toks):
            if t in stops:
                toks = toks[: j + 1]
                r.finish = "stop"
                break
        lps = lps[: len(toks)]
        r.completion.extend(toks)
        r.logprobs.extend(lps)
        r.tokens.extend(toks)
        if r.finish is None and r.remaining <= 0:
            r.finish = "length"
        return len(toks)

    def _capture_step(
        self, active, input_ids, position_ids, acc, out_ids, all_hidden, last_hidden, logits, sampling
    ) -> None:
        dev = input_ids.device
        next_ids = torch.tensor(out_ids, dtype=torch.long, device=dev)  # [n, q]
        # positions 0..a-1 predicted the accepted drafts (= input_ids[:, 1..a]); position a predicted out[a]
        rec = CaptureRecord(
            policy_version=self.policy_version,
            row_ids=[r.row_id for r in active],
            input_ids=input_ids,
            next_ids=next_ids,
            num_valid=torch.tensor([a + 1 for a in acc], dtype=torch.long, device=dev),
            positions=position_ids,
            hidden_states={i: h for i, h in enumerate(all_hidden)} | {-1: last_hidden},
            target_logits=logits,
            sampling=sampling,
        )
        for hook in self._capture_hooks:
            hook(rec)


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad ``[n, t, h]`` with zeros to ``[n, length, h]``."""
    if x.shape[1] >= length:
        return x[:, :length]
    pad = torch.zeros((x.shape[0], length - x.shape[1], *x.shape[2:]), dtype=x.dtype, device=x.device)
    return torch.cat([x, pad], 1)
