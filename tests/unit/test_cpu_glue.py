"""The compiled decode glue (RMSNorm, add + RMSNorm, RoPE, SiLU x up) against the PyTorch ops it replaces."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from atlas_rl.models import tiny_llama
from atlas_rl.rollout import SlotKVCache, cpu_glue
from atlas_rl.rollout.cpu_linear import kernel_plan, set_kernel_plan
from atlas_rl.rollout.forward import LeanForward
from atlas_rl.rollout.kernel_tune import MAX_PLAN_ROWS, KernelPlan

GLUE = cpu_glue.glue_kernels()
needs_glue = pytest.mark.skipif(GLUE is None, reason="no C++ compiler: the decode glue could not be built")


class _Norm(torch.nn.Module):
    def __init__(self, d: int, g: torch.Generator) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d, generator=g))
        self.variance_epsilon = 1e-5


def _ref_rms(x: torch.Tensor, norm: _Norm) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


@needs_glue
def test_glue_kernels_equal_the_pytorch_ops():
    g = torch.Generator().manual_seed(0)
    norm = _Norm(48, g)
    h, y = torch.randn(5, 48, generator=g), torch.randn(48, 5, generator=g).t()  # y: a transposed view
    with torch.inference_mode():
        torch.testing.assert_close(cpu_glue.rms_norm(GLUE, h, norm), _ref_rms(h, norm), rtol=1e-6, atol=1e-6)
        s, out = cpu_glue.add_rms_norm(GLUE, h, y, norm)
        torch.testing.assert_close(s, h + y, rtol=0, atol=0)
        torch.testing.assert_close(out, _ref_rms(h + y, norm), rtol=1e-6, atol=1e-6)
        gu = torch.randn(5, 2 * 24, generator=g)
        torch.testing.assert_close(cpu_glue.silu_mul(GLUE, gu), F.silu(gu[:, :24]) * gu[:, 24:], rtol=1e-6, atol=1e-6)
        x = torch.randn(5, 4, 8, generator=g)  # [c, heads, d]: rotate the first 3 heads
        cos, sin = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
        half_sin = torch.cat((-sin[:, :4], sin[:, 4:]), -1)
        rot = torch.cat((-x[..., 4:], x[..., :4]), -1)  # HF's rotate_half
        want = x.clone()
        want[:, :3] = (x * cos[:, None] + rot * sin[:, None])[:, :3]
        cpu_glue.rope_(GLUE, x, 3, cos, half_sin)
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-6)


@needs_glue
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_forward_with_glue_equals_forward_without_under_a_transposing_kernel(model_type):
    """Also when the matmul kernel returns transposed (column-major) results, as "mm" does on some machines."""
    model = tiny_llama(vocab_size=96, num_heads=6, num_kv_heads=2, hidden_size=48, model_type=model_type)
    g = torch.Generator().manual_seed(1)
    prompt, step = torch.randint(0, 96, (3, 4), generator=g), torch.randint(0, 96, (3, 2), generator=g)
    saved = kernel_plan()
    set_kernel_plan(KernelPlan(("mm",) * MAX_PLAN_ROWS))
    try:
        outs = []
        with torch.inference_mode():
            for glue in (True, False):
                lean = LeanForward(model, glue=glue)
                assert (lean.glue is not None) == glue
                cache = SlotKVCache(2, 3, 8, lean.num_kv_heads, lean.head_dim, torch.float32, "cpu")
                lean(prompt, torch.zeros(3, dtype=torch.long), cache, want_hidden=False)
                outs.append(lean(step, torch.tensor([4, 2, 3]), cache, want_hidden=True))  # ragged rows
    finally:
        set_kernel_plan(saved)
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-4)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_glue_that_cannot_be_built_leaves_the_pytorch_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cpu_glue, "SOURCE", tmp_path / "missing.cpp")
    monkeypatch.setattr(cpu_glue, "_state", {"tried": False, "module": None})
    with caplog.at_level(logging.WARNING, logger="atlas_rl.rollout.cpu_glue"):
        assert cpu_glue.glue_kernels() is None
    assert "PyTorch ops" in caplog.text
    model = tiny_llama(vocab_size=96, num_heads=6, num_kv_heads=2, hidden_size=48)
    assert LeanForward(model).glue is None
