"""The lean decode forward equals the Hugging Face decoder (the reference) on every supported family."""

from __future__ import annotations

import pytest
import torch

from atlas_rl.config import EngineConfig
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine, SlotKVCache
from atlas_rl.rollout.forward import LeanForward
from atlas_rl.types import SamplingParams

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 96


def _model(model_type: str, dtype: torch.dtype) -> torch.nn.Module:
    m = tiny_llama(vocab_size=VOCAB, num_heads=6, num_kv_heads=2, hidden_size=48, model_type=model_type, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases and q/k norms start at 0 / 1: make them matter
        for name, p in m.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.5)
    return m


def _seqs(starts: list[int], q: int, seed: int) -> list[list[int]]:
    """One random token sequence per row: its cached prefix (``starts``) and ``q`` new tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (s + q,), generator=g).tolist() for s in starts]


def _lean_step(model, starts: list[int], q: int, seqs: list[list[int]], want_hidden: bool, fuse: bool = True):
    """Prefill every row's prefix (right-padded, one forward), then one forward of q tokens at ragged starts."""
    lean = LeanForward(model, fuse=fuse)
    mc = model.config
    n = len(seqs)
    cache = SlotKVCache(mc.num_hidden_layers, n, max(starts) + q, lean.num_kv_heads, lean.head_dim, model.dtype, "cpu")
    width = max(starts)
    pre = torch.tensor([s[:width] + [0] * (width - len(s[:width])) for s in seqs])  # [n, width]
    lean(pre, torch.zeros(n, dtype=torch.long), cache, False)
    new = torch.tensor([s[st : st + q] for s, st in zip(seqs, starts)])  # [n, q]
    return lean(new, torch.tensor(starts), cache, want_hidden)


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("q", [1, 2, 5])
def test_lean_forward_equals_hf_decoder_ragged_float64(model_type, q):
    model = _model(model_type, torch.float64)
    starts = [7, 3, 11]
    seqs = _seqs(starts, q, q)
    with torch.inference_mode():
        last, hidden = _lean_step(model, starts, q, seqs, want_hidden=True)
        for r, (s, st) in enumerate(zip(seqs, starts)):
            ref = model.get_decoder()(input_ids=torch.tensor([s]), output_hidden_states=True)
            torch.testing.assert_close(last[r], ref.last_hidden_state[0, st:], rtol=0, atol=1e-10)
            assert len(hidden) == len(ref.hidden_states)
            for mine, theirs in zip(hidden, ref.hidden_states):
                torch.testing.assert_close(mine[r], theirs[0, st:], rtol=0, atol=1e-10)
            logits = model.lm_head(last[r])
            torch.testing.assert_close(logits, model.lm_head(ref.last_hidden_state[0, st:]), rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_lean_forward_logits_match_hf_float32(model_type):
    model = _model(model_type, torch.float32)
    starts, q = [4, 9], 5
    seqs = _seqs(starts, q, 3)
    with torch.inference_mode():
        last, _ = _lean_step(model, starts, q, seqs, want_hidden=False)
        for r, (s, st) in enumerate(zip(seqs, starts)):
            ref = model(input_ids=torch.tensor([s])).logits[0, st:]
            torch.testing.assert_close(model.lm_head(last[r]), ref, rtol=0, atol=1e-4)


def test_lean_forward_sees_in_place_weight_updates():
    model = _model("llama", torch.float64)
    seqs, starts = [[1, 2, 3, 4, 5]], [3]
    with torch.inference_mode():
        before, _ = _lean_step(model, starts, 2, seqs, False)
        model.model.layers[0].mlp.down_proj.weight.mul_(2.0)  # an optimizer step, in place
        after, _ = _lean_step(model, starts, 2, seqs, False)
        ref = model.get_decoder()(input_ids=torch.tensor(seqs)).last_hidden_state[0, 3:]
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(after[0], ref, rtol=0, atol=1e-10)


def test_one_lean_forward_sees_parameters_replaced_on_their_modules():
    """The forward resolves submodules once but reads their parameters at every call: a parameter object replaced
    on its module (``module.weight = nn.Parameter(...)``, e.g. ``load_state_dict(assign=True)``) is used by the next
    forward of the same instance, for the fused (gate/up) and the plain (o, down) projections and the norms."""
    model = _model("llama", torch.float64)
    lean = LeanForward(model)
    mc = model.config
    seqs = [[1, 2, 3, 4, 5, 6]]
    ids = torch.tensor(seqs)

    def step() -> torch.Tensor:  # [1, 6, hidden]: a fresh cache each time, the same forward instance
        cache = SlotKVCache(mc.num_hidden_layers, 1, 6, lean.num_kv_heads, lean.head_dim, model.dtype, "cpu")
        return lean(ids, torch.zeros(1, dtype=torch.long), cache, False)[0]

    layer = model.model.layers[0]
    with torch.inference_mode():
        before = step()
    with torch.no_grad():
        for mod in (layer.mlp.gate_proj, layer.mlp.down_proj, layer.self_attn.o_proj, layer.post_attention_layernorm):
            mod.weight = torch.nn.Parameter(mod.weight.detach() * 1.5)
    with torch.inference_mode():
        after = step()
        ref = model.get_decoder()(input_ids=ids).last_hidden_state
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_greedy_generate_lean_equals_hf_decoder_path(model_type):
    model = _model(model_type, torch.float64)
    prompts = [[1, 5, 9, 2], [3, 3, 7], [8, 1, 4, 4, 6, 2]]
    sp = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    out = {}
    for lean in (True, False):
        eng = RolloutEngine(model, config=EngineConfig(num_speculative_tokens=0, lean_forward=lean))
        assert (eng._lean is not None) == lean
        out[lean] = eng.generate(prompts, sp)
    assert out[True].completion_ids == out[False].completion_ids
    for a, b in zip(out[True].logprobs, out[False].logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-10)


def test_small_linear_matches_f_linear_for_column_major_and_single_row_inputs():
    from atlas_rl.rollout.cpu_linear import small_linear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    for x in (
        torch.randn(24, 4, generator=g).t(),
        torch.randn(1, 24, generator=g),
        torch.randn(2, 1, 24, generator=g),
    ):
        with torch.inference_mode():
            got = small_linear(x, w, b)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_unfused_projections_equal_hf_decoder(model_type):
    """The path without concatenated q/k/v and gate/up weights (other devices, or ``fuse_projections=False``)."""
    model = _model(model_type, torch.float64)
    starts, q = [5, 2], 3
    seqs = _seqs(starts, q, 7)
    with torch.inference_mode():
        last, _ = _lean_step(model, starts, q, seqs, want_hidden=False, fuse=False)
        for r, (s, st) in enumerate(zip(seqs, starts)):
            ref = model.get_decoder()(input_ids=torch.tensor([s])).last_hidden_state[0, st:]
            torch.testing.assert_close(last[r], ref, rtol=0, atol=1e-10)


def test_fused_projections_follow_every_kind_of_weight_update():
    """In place (an optimizer step bumps ``_version``) and a new tensor (``param.data = ...``), seen at once as
    every update of the shared model is; a copy through ``.data`` (no version bump) once ``update_weights`` is
    called: the fused copies never serve stale weights."""
    model = _model("qwen2", torch.float64)  # q/k/v biases: fused as well
    eng = RolloutEngine(model, config=EngineConfig(num_speculative_tokens=0))
    assert eng._lean is not None and eng._lean.fused is not None
    attn = model.model.layers[0].self_attn
    sp = SamplingParams(temperature=0.0, max_new_tokens=6, ignore_eos=True)
    ref_cfg = EngineConfig(num_speculative_tokens=0, lean_forward=False)
    updates = (
        (lambda: attn.k_proj.weight.mul_(1.5), False),
        (lambda: setattr(attn.v_proj.weight, "data", attn.v_proj.weight.data * -1.0), False),
        (lambda: attn.q_proj.bias.data.copy_(attn.q_proj.bias.data + 0.7), True),
    )
    for update, announced in updates:
        eng.generate([[1, 2, 3]], sp)  # the fused copies of the current weights are built here
        with torch.no_grad():
            update()
        if announced:
            eng.update_weights()
        got = eng.generate([[1, 2, 3]], sp)
        want = RolloutEngine(model, config=ref_cfg).generate([[1, 2, 3]], sp)
        assert got.completion_ids == want.completion_ids
        torch.testing.assert_close(torch.tensor(got.logprobs[0]), torch.tensor(want.logprobs[0]), rtol=0, atol=1e-10)


def test_lean_forward_takes_attention_output_strided_as_gpu_kernels_return_it(monkeypatch):
    """GPU SDPA kernels return [n, heads, q, d] laid out as [n, q, heads, d] (not viewable as the folded query
    rows); the forward must give the same hidden states as with a contiguous output (the draft head's folded
    attention failed on exactly this on an H200; this path's split of q*g still views, and must keep working)."""
    model = _model("llama", torch.float64)
    starts, q = [7, 3, 11], 3
    seqs = _seqs(starts, q, 5)
    with torch.inference_mode():
        ref, _ = _lean_step(model, starts, q, seqs, want_hidden=False)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def gpu_strided(*args, **kwargs):
            return sdpa(*args, **kwargs).transpose(1, 2).contiguous().transpose(1, 2)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", gpu_strided)
        out, _ = _lean_step(model, starts, q, seqs, want_hidden=False)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
