"""The GEMM kernel comparison runs and every kernel it times computes the same product as F.linear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from atlas_rl.bench.gemm_kernels import _packed_kernels, kernel_chain_ms, render_kernels_markdown
from atlas_rl.models import tiny_llama


def test_kernel_chain_times_every_available_kernel_on_a_tiny_model():
    model = tiny_llama(seed=0)
    table = {c: kernel_chain_ms(model, c, repeats=1) for c in (1, 2)}
    for row in table.values():
        assert {"linear", "mm"} <= row.keys() and all(math.isfinite(v) and v > 0 for v in row.values())
    assert render_kernels_markdown(table).count("\n") == 4


@pytest.mark.parametrize("columns", [1, 3, 8])
def test_packed_kernels_compute_the_same_product(columns):
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(columns))
    x = torch.randn(columns, 24, generator=torch.Generator().manual_seed(columns + 1))
    for name, k in _packed_kernels([w], columns).items():
        torch.testing.assert_close(k(x, w), F.linear(x, w), rtol=1e-4, atol=1e-5, msg=name)


def test_kernel_chain_refuses_non_float32_models():
    with pytest.raises(ValueError, match="float32"):
        kernel_chain_ms(tiny_llama(seed=0, dtype=torch.float64), 1)
