"""The attention split of ``atlas_rl.bench.forward_profile``: what it measures; it leaves the forward as found."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.bench import forward_profile
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine, SlotKVCache, cpu_glue

needs_glue = pytest.mark.skipif(cpu_glue.glue_kernels() is None, reason="no C++ compiler: no decode glue")
SIZES = {"vocab_size": 96, "num_heads": 3, "num_kv_heads": 1, "hidden_size": 192}  # head size 64: row attention


@pytest.fixture(scope="module")
def engine() -> RolloutEngine:
    return RolloutEngine(tiny_llama(**SIZES))


def test_kv_bytes_are_the_cache_blocks_a_forward_attends_over(engine):
    cache = SlotKVCache(engine.num_layers, 3, 20 + 2, engine.num_kv_heads, engine.head_dim, engine.dtype, "cpu")
    want = (cache.keys.numel() + cache.values.numel()) * cache.keys.element_size()
    assert forward_profile.kv_bytes(engine, 3, 2, 20) == want


@needs_glue
def test_attention_split_restores_the_attention_call_and_reports_a_cell(engine):
    real = cpu_glue.rope_kv_attend
    out = forward_profile.attention_split_cell(engine, rows=2, tokens=3, context=16, repeats=2)
    assert cpu_glue.rope_kv_attend is real
    assert set(out) == {"wall_ms", "no_attention_ms", "attention_ms", "kv_mb", "kv_gb_s"}
    assert out["wall_ms"] > 0 and out["no_attention_ms"] > 0
    assert out["kv_mb"] == pytest.approx(forward_profile.kv_bytes(engine, 2, 3, 16) / 1e6)


@needs_glue
def test_attention_split_restores_the_call_when_the_forward_fails(engine, monkeypatch):
    real = cpu_glue.rope_kv_attend

    def broken(*args, **kwargs):
        raise RuntimeError("forward failed")

    monkeypatch.setattr("atlas_rl.rollout.cost_probe.forward_cost_ms", broken)
    with pytest.raises(RuntimeError, match="forward failed"):
        forward_profile.attention_split_cell(engine, rows=1, tokens=1, context=8, repeats=1)
    assert cpu_glue.rope_kv_attend is real


def test_attention_split_refuses_steps_the_row_attention_does_not_take(engine):
    with pytest.raises(ValueError, match="attention split"):
        forward_profile.attention_split_cell(engine, rows=1, tokens=cpu_glue.ROW_ATTENTION_MAX_Q + 1, context=8)


def test_the_stub_keeps_the_shape_of_the_attention_output():
    x = torch.randn(2 * 3, 9 + 2 * 3, 64)  # [n * q, hq + 2 * hk, d]
    out = forward_profile._no_attention(None, x, 9, 3, None, None, None, 0, None, 2, 3, 0.125)
    assert out.shape == (6, 9 * 64)


def test_render_attention_split_has_one_line_per_cell():
    cell = {"wall_ms": 10.0, "no_attention_ms": 8.0, "attention_ms": 2.0, "kv_mb": 24.0, "kv_gb_s": 12.0}
    text = forward_profile.render_attention_split_markdown({"4x1, 128": cell, "16x1, 128": cell})
    assert text.count("\n") == 3 and "| 4x1, 128 | 10.0 | 8.0 | 2.0 | 24 | 12.0 |" in text


def test_render_attention_split_reports_no_rate_where_the_attention_is_within_noise():
    # a one-row cell at a short context: the forward without the attention call measured slower than with it
    cell = {"wall_ms": 38.0, "no_attention_ms": 38.4, "attention_ms": -0.4, "kv_mb": 3.0, "kv_gb_s": None}
    text = forward_profile.render_attention_split_markdown({"1x1, 128": cell})
    assert "| 1x1, 128 | 38.0 | 38.4 | -0.4 | 3 | within noise |" in text
