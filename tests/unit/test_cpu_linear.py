"""The CPU small-batch linear kernel: same product as F.linear, used only where it is safe."""

from __future__ import annotations

import torch
from torch import nn

from atlas_rl.models import tiny_llama
from atlas_rl.rollout.cpu_linear import MAX_ROWS, install_cpu_linear


def test_small_batch_kernel_matches_f_linear_and_uninstalls():
    torch.manual_seed(0)
    lin = nn.Linear(48, 96)
    uninstall = install_cpu_linear(nn.Sequential(lin))
    assert "forward" in lin.__dict__
    for shape in [(1, 48), (3, 5, 48), (MAX_ROWS, 48), (MAX_ROWS + 1, 48)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            got = lin(x)
        ref = nn.functional.linear(x, lin.weight, lin.bias)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-5)
    uninstall()
    assert "forward" not in lin.__dict__


def test_training_forward_keeps_autograd_path():
    lin = nn.Linear(8, 4)
    install_cpu_linear(nn.Sequential(lin))
    x = torch.randn(2, 8, requires_grad=True)
    lin(x).sum().backward()  # grad enabled: F.linear path, gradients flow as usual
    assert x.grad is not None and lin.weight.grad is not None


def test_not_installed_for_float64_models():
    m = tiny_llama(vocab_size=32, dtype=torch.float64)
    install_cpu_linear(m)
    assert not any("forward" in mod.__dict__ for mod in m.modules() if isinstance(mod, nn.Linear))
