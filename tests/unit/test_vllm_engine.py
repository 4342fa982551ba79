"""The vLLM path's parts that run without vLLM: the per-batch-size schedule, the statistics from vLLM's counters,
the configuration checks. The engine itself is tested in the vLLM venv (tests/integration/test_vllm_grpo.py)."""

from __future__ import annotations

import pytest
from datasets import Dataset

from atlas_rl.controller.vllm_schedule import PositionAcceptance, StepCosts, best_k, plan_schedule
from atlas_rl.models import tiny_llama, tiny_token_ids, tiny_tokenizer
from atlas_rl.rollout.vllm_engine import counters_delta, counters_to_stats
from atlas_rl.trainers import AtlasGRPOConfig, AtlasGRPOTrainer

K = 4


def memory_bound() -> StepCosts:  # a GPU, or a CPU at one row: drafting 4 tokens costs 20% more than none
    return StepCosts(max_k=K, plain={1: 0.010, 16: 0.011}, drafted={1: 0.012, 16: 0.013})


def compute_bound() -> StepCosts:  # a 2-core CPU at many rows: every verified token costs like a generated one
    return StepCosts(max_k=K, plain={1: 0.010, 16: 0.080}, drafted={1: 0.012, 16: 0.400})


def test_cost_is_linear_in_k_and_interpolates_in_rows():
    c = compute_bound()
    assert c.cost(1, 0) == pytest.approx(0.010) and c.cost(1, K) == pytest.approx(0.012)
    assert c.cost(1, 2) == pytest.approx(0.011)
    assert c.cost(16, 0) == pytest.approx(0.080)
    assert 0.010 < c.cost(4, 0) < 0.080  # between the measured row counts
    assert c.cost(64, 0) == pytest.approx(0.320)  # beyond the largest: grows with the rows
    assert all(c.cost(r, k + 1) >= c.cost(r, k) for r in (1, 3, 16, 100) for k in range(K))


def test_k_follows_the_physics():
    rates = [0.6, 0.4, 0.25, 0.15]  # tau(k=4) = 2.4
    assert best_k(memory_bound(), rates, rows=1) == K  # cheap verification: draft all
    assert best_k(compute_bound(), rates, rows=16) == 0  # verification as dear as generation: off
    assert best_k(memory_bound(), [0.01] * K, rows=1) == 0  # a useless head is switched off
    assert best_k(memory_bound(), [0.5, 0.02, 0.01, 0.0], rows=1) == 1  # only the first draft pays


def test_schedule_covers_every_batch_size_once_in_vllm_format():
    sched = plan_schedule(compute_bound(), [0.6, 0.4, 0.25, 0.15], max_num_seqs=64)
    assert sched[0][0] == 1 and sched[-1][1] == 64
    assert all(b + 1 == a2 for (_, b, _), (a2, _, _) in zip(sched, sched[1:]))
    assert sched[0][2] > 0 and sched[-1][2] == 0  # drafts at one row, off at 64
    assert all(k1 != k2 for (_, _, k1), (_, _, k2) in zip(sched, sched[1:]))  # adjacent equal ranges merged


def test_acceptance_prior_then_counters_dominate():
    acc = PositionAcceptance(max_k=K, prior_drafts=10)
    acc.set_prior(2.0)
    assert 1 + sum(acc.rates()) == pytest.approx(2.0, abs=1e-6)
    assert all(a >= b for a, b in zip(acc.rates(), acc.rates()[1:]))
    acc.observe(10_000, [9000, 8000, 7000, 6000])
    assert acc.rates()[0] == pytest.approx(0.9, abs=0.01)
    acc.observe(10_000, [1000, 0, 0, 0])  # the policy moved: the newest counts weigh most
    assert acc.rates()[0] < 0.5


def test_bad_costs_fail_clearly():
    with pytest.raises(ValueError, match="same, non-empty"):
        StepCosts(max_k=K, plain={1: 0.1}, drafted={2: 0.1})
    with pytest.raises(ValueError, match="finite seconds"):
        StepCosts(max_k=K, plain={1: 0.0}, drafted={1: 0.1})


def test_stats_from_vllm_counters():
    before = {"num_drafts": 5, "num_draft_tokens": 20, "num_accepted_tokens": 3, "num_accepted_tokens_per_pos": [2, 1]}
    after = {
        "num_drafts": 15,
        "num_draft_tokens": 60,
        "num_accepted_tokens": 23,
        "num_accepted_tokens_per_pos": [10, 6, 3, 1],
    }
    d = counters_delta(before, after)
    assert d == {
        "num_drafts": 10,
        "num_draft_tokens": 40,
        "num_accepted_tokens": 20,
        "num_accepted_tokens_per_pos": [8, 5, 3, 1],
    }
    # 2 rows x 20 tokens: 2 from the prefill, 38 from decode steps, of which 20 accepted drafts -> 18 row forwards
    s = counters_to_stats(d, num_sequences=2, num_completion_tokens=40, speculator="adaptive")
    assert s.num_row_forwards == 18 and s.num_drafts == 10 and s.num_spec_off_row_steps == 8
    assert s.mean_acceptance_length == pytest.approx(38 / 18)  # tokens per decode-step row forward (ours)
    assert s.per_speculator["adaptive"].mean_acceptance_length == pytest.approx(1 + 20 / 10)  # vLLM's tau
    assert s.per_speculator["adaptive"].num_accepted_tokens_per_pos == [8, 5, 3, 1]
    off = counters_to_stats(counters_delta(after, after), 2, 40, speculator="static")
    assert off.num_drafts == 0 and off.num_row_forwards == 38 and "static" not in off.per_speculator


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(atlas_engine="sglang"), "atlas_engine must be"),
        (dict(atlas_capture="prefill"), "atlas_capture must be"),
        (dict(atlas_engine="vllm", atlas_capture="engine"), "hands out no hidden states"),
        (dict(atlas_vllm_drafter="sometimes"), "atlas_vllm_drafter must be"),
    ],
)
def test_engine_options_are_checked(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        AtlasGRPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)


def _trainer(tmp_path, **kw):
    tok = tiny_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden_size=64, seed=0, **tiny_token_ids(tok))
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(4)])
    cfg = AtlasGRPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, atlas_engine="vllm", **kw,
    )  # fmt: skip
    return AtlasGRPOTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=cfg,
                            train_dataset=ds, processing_class=tok)  # fmt: skip


def test_vllm_engine_refuses_what_it_cannot_draft_with(tmp_path):
    tr = _trainer(tmp_path, atlas_speculators="suffix")
    assert tr.atlas_backend.capture_mode == "trainer"  # auto: vLLM hands out no features
    with pytest.raises(ValueError, match="EAGLE-3 heads only"):
        tr.atlas_backend._heads(tr.model)
    tr = _trainer(tmp_path / "b")
    with pytest.raises(ValueError, match="needs a static draft head"):  # none ships for the tiny model
        tr.atlas_backend._heads(tr.model)


def test_intel_openmp_preload_only_where_shipped(tmp_path, monkeypatch):
    from atlas_rl import openmp

    assert openmp.intel_openmp_library(str(tmp_path)) is None
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    assert openmp.intel_openmp_library(str(tmp_path)) == tmp_path / "lib" / "libiomp5.so"
    calls = []
    monkeypatch.setattr(openmp.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(openmp, "intel_openmp_library", lambda prefix=None: tmp_path / "lib" / "libiomp5.so")
    monkeypatch.setenv("LD_PRELOAD", "/x/libiomp5.so")
    assert openmp.preload_intel_openmp(["r.py"]) is False and not calls  # already preloaded
    monkeypatch.setenv("LD_PRELOAD", "")
    monkeypatch.delenv(openmp.OPT_OUT, raising=False)
    assert openmp.preload_intel_openmp(["r.py", "--x"]) is True
    ((exe, args, env),) = calls
    assert args[1:] == ["r.py", "--x"] and env["LD_PRELOAD"].endswith("libiomp5.so") and env[openmp.OPT_OUT] == "1"


def test_server_counters_parse_prometheus_text():
    from atlas_rl.rollout.vllm_server import parse_spec_counters

    text = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 12.0
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 48.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 20.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="1"} 7.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 10.0
vllm:num_requests_running{engine="0"} 0.0"""
    c = parse_spec_counters(text)
    assert c == {"num_drafts": 12, "num_draft_tokens": 48, "num_accepted_tokens": 20,
                 "num_accepted_tokens_per_pos": [10, 7]}  # fmt: skip


def test_tensors_travel_as_one_base64_string_bit_exactly():
    import torch

    from atlas_rl.rollout.vllm_worker import decode_tensors, encode_tensors

    w = torch.randn(3, 4)
    t = {"fc.weight": torch.randn(3, 4), "d2t": torch.arange(5), "t2d": torch.tensor([True, False]), "a": w, "b": w}
    payload = encode_tensors(t)
    assert isinstance(payload, str)
    back = dict(decode_tensors(payload))
    assert all(torch.equal(back[k], v) for k, v in t.items())
    assert decode_tensors(list(t.items()))[0][0] == "fc.weight"  # in-process: passed through
