"""The CPU small-batch linear kernel: same product as F.linear, used only where it is safe."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def test_small_linear_takes_onednn_for_7_to_64_rows_and_follows_in_place_updates():
    """From MAX_ROWS + 1 rows a oneDNN copy of the weight does the product; an in-place update (a new _version)
    rebuilds it, so a policy update is never served from a stale copy."""
    from atlas_rl.rollout.cpu_linear import MAX_ROWS, ONEDNN_MAX_ROWS, drop_packed_weights, small_linear

    lin = torch.nn.Linear(24, 40)
    x = torch.randn(MAX_ROWS + 2, 24)
    with torch.no_grad():
        torch.testing.assert_close(small_linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        if torch.backends.mkldnn.is_available():
            assert hasattr(lin.weight, "_atlas_onednn_weight")
        lin.weight.mul_(2.0)  # in place, as an optimizer step or update_weights does
        torch.testing.assert_close(small_linear(x, lin.weight, lin.bias), F.linear(x, lin.weight, lin.bias))
        wide = torch.randn(ONEDNN_MAX_ROWS + 1, 24)
        torch.testing.assert_close(small_linear(wide, lin.weight, None), F.linear(wide, lin.weight))
    drop_packed_weights(lin)
    assert not hasattr(lin.weight, "_atlas_onednn_weight")
