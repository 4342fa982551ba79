"""Side-by-side rollout benchmark: every configuration on the same prompts and seeds, interleaved, as ratios.

A *configuration* is a way to produce completions for a :class:`Workload` (HF ``generate``, the engine with
k=0, the engine with a speculator at fixed k, ...). ``run_interleaved`` runs repetition 1 of every
configuration, then repetition 2 of every configuration, and so on, so that machine noise (other processes,
thermal state) hits all of them alike; results are reported relative to a baseline measured in the same run.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from atlas_rl.jsonio import dumps
from atlas_rl.rollout.vllm_engine import lossless_speculation
from atlas_rl.types import RolloutBatch, SpecStats

from .workloads import Workload, left_pad

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One run of one configuration on one workload."""

    config: str
    workload: str
    completion_tokens: int
    seconds: float
    stats: SpecStats | None = None  # None for non-engine baselines (HF generate)
    tau: float | None = None  # mean acceptance length reported by a non-engine runner (vLLM's counters)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class ConfigSummary:
    config: str
    workload: str
    runs: list[RunResult] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs)

    @property
    def mean_acceptance_length(self) -> float:
        stats = [r.stats for r in self.runs if r.stats is not None]
        if not stats:
            taus = [r.tau for r in self.runs if r.tau is not None]
            return sum(taus) / len(taus) if taus else float("nan")
        em = sum(s.num_emitted_tokens for s in stats)
        rf = sum(s.num_row_forwards for s in stats)
        return em / rf if rf else float("nan")

    def regime(self, max_rows: int) -> dict[str, float]:
        """Throughput and acceptance over decode steps with at most ``max_rows`` active rows (all runs)."""
        merged = SpecStats()
        for r in self.runs:
            if r.stats is not None:
                merged.steps.extend(r.stats.steps)
        return merged.regime(max_rows=max_rows)


# a runner returns (batch or None, completion tokens) or (batch or None, completion tokens, seconds) when it times
# itself (e.g. vLLM in a subprocess, whose start-up is not part of generating)
Runner = Callable[[Workload], tuple]


def hf_generate_runner(model: torch.nn.Module, tokenizer, eos_token_ids: list[int]) -> Runner:
    """HF ``generate`` on the workload (left-padded batch, ``num_return_sequences`` samples per prompt).

    Counts completion tokens up to and including the first EOS of each row, as the engine does; HF keeps
    decoding finished rows until the longest one ends, which is part of what it costs.
    """

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_token_ids[0]

    @torch.inference_mode()
    def run(w: Workload) -> tuple[None, int]:
        ids, att = left_pad(w.prompt_ids, pad_id)  # [B, W] each
        dev = next(model.parameters()).device
        sp = w.sampling
        kwargs: dict = {"max_new_tokens": sp.max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_token_ids}
        if sp.greedy:
            kwargs["do_sample"] = False
        else:
            # top_k=0, never None: None falls back to GenerationConfig's default top_k=50 (another distribution)
            kwargs.update(do_sample=True, temperature=sp.temperature, top_k=sp.top_k or 0, top_p=sp.top_p)
            if sp.seed is not None:
                torch.manual_seed(sp.seed)
        out = model.generate(
            input_ids=ids.to(dev), attention_mask=att.to(dev), num_return_sequences=w.num_generations, **kwargs
        )
        comp = out[:, ids.shape[1] :].tolist()
        eos = set(eos_token_ids)
        n_tokens = 0
        for row in comp:
            for j, t in enumerate(row):
                if t in eos:
                    n_tokens += j + 1
                    break
            else:
                n_tokens += len(row)
        return None, n_tokens

    return run


def engine_runner(make_engine: Callable[[], object]) -> Runner:
    """The atlas engine built fresh for each run by ``make_engine`` (fresh speculator state: only what a
    single generate call learns — its own prompt, siblings and earlier rows — helps it).

    Timed: ``generate`` only. Building the engine (loading a draft head from disk, allocating) happens once per
    training run, not per rollout, so — like vLLM's start-up — it is not part of what a rollout costs."""

    def run(w: Workload) -> tuple[RolloutBatch, int, float]:
        eng = make_engine()
        t0 = time.perf_counter()
        batch = eng.generate(w.prompt_ids, w.sampling, num_generations=w.num_generations)
        return batch, batch.num_completion_tokens, time.perf_counter() - t0

    return run


def _omp_bind(threads: int) -> str:
    """The first ``threads`` cores this process may run on, as vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` list."""
    cores = sorted(os.sched_getaffinity(0))[: max(1, threads)]
    return ",".join(str(c) for c in cores)


def _root_cause(output: str, limit: int = 1500) -> str:
    """The first error of a subprocess's output (its first traceback or ERROR line), not just the tail: vLLM's
    engine-core death is reported last, after the error that caused it. vLLM prefixes every log line, so a
    traceback cut at ``limit`` may not reach its exception line: that line is then appended."""
    lines = output.splitlines()
    first = next((i for i, ln in enumerate(lines) if "Traceback" in ln or " ERROR " in ln or "Error:" in ln), None)
    if first is None:
        return "last output: " + output[-limit:]
    block = "\n".join(lines[first : first + 40])[:limit]
    exc = next((ln for ln in lines[first:] if re.search(r"\b[A-Z]\w*(Error|Exception): ", ln)), None)
    if exc is not None and exc not in block:
        block += "\n... " + exc.strip()
    return "first error: " + block


def vllm_runner(python: str, model_dir: str, speculative: dict | None, eos_token_ids: list[int]) -> Runner:
    """vLLM (``vllm-cpu`` on CPU) in a subprocess of ``python``, timed inside that process after a warm-up; its
    mean acceptance length comes from vLLM's own spec-decode counters when ``speculative`` is set."""
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    script = str(Path(__file__).with_name("vllm_runner.py"))

    def run(w: Workload) -> tuple[None, int, float]:
        sp = w.sampling
        drafts = speculative and any(
            r[2] > 0 for r in speculative.get("num_speculative_tokens_per_batch_size", [(1, 1, 1)])
        )
        if drafts and not lossless_speculation(sp):
            raise RuntimeError(
                "vllm-cpu's speculative sampling is not lossless at temperature > 0 (its rejection sampler emits "
                "tokens the target gives ~1e-14; docs/decisions/vllm_engine.md): left out of sampled workloads"
            )
        job = {
            "model": model_dir,
            "prompt_ids": w.prompt_ids,
            "num_generations": w.num_generations,
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "max_new_tokens": sp.max_new_tokens,
            "seed": sp.seed or 0,
            "stop_token_ids": eos_token_ids,
            "speculative": speculative,
            "repeats": 1,
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(dumps(job))
        env = dict(os.environ)
        # vLLM binds its OpenMP threads itself: give it the cores (and as many threads) this process computes on
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", _omp_bind(torch.get_num_threads()))
        env.setdefault("VLLM_PLUGINS", "none")  # arctic-inference's plugin (suffix decoding) targets vLLM 0.9.1
        proc = subprocess.run([python, script, f.name], capture_output=True, text=True, timeout=3600, env=env)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            log = Path(f.name).with_suffix(".log")
            log.write_text(proc.stderr + "\n----- stdout (vLLM logs here) -----\n" + proc.stdout)
            raise RuntimeError(
                f"vLLM run failed (exit {proc.returncode}); its output in {log}; "
                f"{_root_cause(proc.stdout + chr(10) + proc.stderr)}"
            )
        res = json.loads(line)
        r = res["runs"][0]
        run.last_tau = res.get("mean_acceptance_length")
        return None, r["tokens"], r["seconds"]

    run.last_tau = None
    run.python, run.model_dir = python, model_dir
    run.optional = True
    return run


def run_interleaved(
    workload: Workload,
    configs: dict[str, Runner],
    repeats: int = 1,
    on_result: Callable[[RunResult], None] | None = None,
) -> dict[str, ConfigSummary]:
    """Run every configuration ``repeats`` times, interleaved, on the same workload; the order within a repeat
    alternates (A B, B A, ...), so a machine that drifts within a repeat does not always favour the configuration
    that runs first (a ratio to k=0 pairs the runs of the same repeat)."""
    out = {name: ConfigSummary(name, workload.name) for name in configs}
    failed: set[str] = set()
    for rep in range(repeats):
        order = list(configs.items())
        for name, runner in order if rep % 2 == 0 else order[::-1]:
            if name in failed:
                continue
            t0 = time.perf_counter()
            try:
                result = runner(workload)
            except Exception as e:  # an optional external system (vLLM) must not sink the whole benchmark
                if not getattr(runner, "optional", False):
                    raise
                logger.error("%s / %s failed and is left out of this workload: %s", workload.name, name, e)
                failed.add(name)
                out.pop(name, None)
                continue
            secs = time.perf_counter() - t0
            batch, n_tokens = result[0], result[1]
            if len(result) > 2:
                secs = result[2]
            res = RunResult(
                name,
                workload.name,
                n_tokens,
                secs,
                batch.stats if batch is not None else None,
                getattr(runner, "last_tau", None),
            )
            out[name].runs.append(res)
            logger.info(
                "%s / %s rep %d: %d tokens in %.1f s = %.1f tok/s",
                workload.name,
                name,
                rep,
                n_tokens,
                secs,
                res.tokens_per_s,
            )
            if on_result is not None:
                on_result(res)
    return out
