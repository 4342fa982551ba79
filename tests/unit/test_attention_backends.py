"""Decode attention leaves cuDNN out on a GPU (per-shape plan builds), and nothing changes on a CPU."""

from __future__ import annotations

import torch

from atlas_rl.attention_backends import decode_attention


def _flags() -> tuple[bool, bool, bool, bool]:
    b = torch.backends.cuda
    return b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled()


def test_on_cuda_only_cudnn_is_left_out_and_the_flags_come_back():
    before = _flags()
    assert before[0], "the process default enables cuDNN attention (else this test shows nothing)"
    with decode_attention(torch.device("cuda")):
        assert _flags() == (False, True, True, True)
    assert _flags() == before


def test_on_a_cpu_the_backends_are_untouched():
    before = _flags()
    with decode_attention(torch.device("cpu")):
        assert _flags() == before
