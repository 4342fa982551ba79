"""Draft head: normalised reduced-vocabulary drafts, losslessness through the engine, training-time test equal to
the inference chain, and checkpoints that round-trip bit-exactly or fail loudly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import teacher_forced_logprobs

from atlas_rl import SamplingParams
from atlas_rl.config import EngineConfig
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.rollout.cpu_glue import glue_kernels
from atlas_rl.rollout.cpu_linear import bf16_matmul_available
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.types import ProposeInput

V = 64
PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, dtype=torch.float64, seed=0)


def _head(model, vocab=48, fuse=(1, 2), seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=vocab, fuse_layers=fuse, intermediate_size=64)
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:vocab]
    return DraftHead(cfg, draft_to_target=d2t).to(dtype).bind_target(model, init_lm_head=True)


def _features(model, seq: list[int], layers) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        hs = model.model(torch.tensor([seq]), output_hidden_states=True).hidden_states
    return {la: hs[la] for la in layers}


def _primed(model, head, seq: list[int], prompt_len: int):
    """A speculator that has seen ``seq`` (prompt + emitted, last token pending) with teacher-forced features."""
    spec = DraftHeadSpeculator(head, seed=3)
    spec.start(0, seq[:prompt_len], [0])
    spec.observe(0, seq[prompt_len:])
    feats = _features(model, seq, head.config.fuse_layers)
    spec.observe_hidden([0], {la: h[:, : len(seq) - 1] for la, h in feats.items()}, [len(seq) - 1])
    return spec


def test_drafts_stay_in_draft_vocab_and_probs_are_normalised(model):
    head = _head(model)
    seq = PROMPTS[1] + [3, 4, 5]
    spec = _primed(model, head, seq, len(PROMPTS[1]))
    allowed = set(head.draft_to_target.tolist())
    sp = SamplingParams(temperature=0.8, top_k=20, max_new_tokens=8)
    for _ in range(5):
        (d,) = spec.propose(ProposeInput([0], [0], [seq], sampling=sp), [4])
        assert len(d) == 4 and set(d.token_ids) <= allowed
        assert torch.allclose(d.draft_probs.sum(-1), torch.ones(4, dtype=d.draft_probs.dtype), atol=1e-6)
        outside = torch.ones(V, dtype=torch.bool)
        outside[head.draft_to_target] = False
        assert (d.draft_probs[:, outside] == 0).all()
        for j, t in enumerate(d.token_ids):
            assert d.confidence[j] == pytest.approx(float(d.draft_probs[j, t]), abs=1e-6)
    (g,) = spec.propose(ProposeInput([0], [0], [seq], sampling=SamplingParams(temperature=0)), [3])
    assert g.draft_probs is None and set(g.token_ids) <= allowed


def test_training_time_test_equals_the_inference_chain(model):
    """ttt_logits at base t = L-1 must reproduce what the serving chain computes when drafting from L."""
    head = _head(model, fuse=(1, 2))
    prompt = PROMPTS[1]
    seq = prompt + [3, 4]
    spec = _primed(model, head, seq, len(prompt))
    (d,) = spec.propose(ProposeInput([0], [0], [seq], sampling=SamplingParams(temperature=0)), [4])
    full = seq + d.token_ids  # the drafted chain taken as the "true" continuation
    feats = _features(model, full, head.config.fuse_layers)
    f = torch.cat([feats[la] for la in head.config.fuse_layers], -1)
    toks = torch.tensor([full])
    with torch.no_grad():
        outs = head.ttt_logits(toks, f, torch.ones_like(toks, dtype=torch.bool), steps=4)
    t = len(seq) - 2  # last verified position L-1 (L = len(seq) - 1 positions are verified)
    for j in range(4):
        probs = torch.softmax(outs[j][0, t], -1)
        assert int(head.draft_to_target[probs.argmax()]) == d.token_ids[j]
        assert float(probs.max()) == pytest.approx(d.confidence[j], abs=1e-9)


@pytest.mark.parametrize("max_pending", [256, 2])
def test_queued_decode_features_catch_up_to_the_eager_result(model, max_pending):
    """Decode-step features are queued and run through the draft layer only when a draft is asked for (or the
    queue is full): the drafts then equal those of a speculator that saw every feature at once."""
    head = _head(model, fuse=(1, 2))
    prompt = PROMPTS[1]
    P = len(prompt)
    seq = prompt + [3, 4, 5, 6, 7, 8]
    feats = _features(model, seq, head.config.fuse_layers)
    ref = _primed(model, head, seq, P)
    lazy = DraftHeadSpeculator(head, seed=3, max_pending=max_pending)
    lazy.start(0, prompt, [0])
    lazy.observe(0, seq[P : P + 1])
    lazy.observe_hidden([0], {la: h[:, :P] for la, h in feats.items()}, [P])  # prompt positions: queued too
    pos = P
    for c in (1, 2, 1, 1):  # decode steps emitting 1, 2, 1, 1 tokens
        lazy.observe(0, seq[pos + 1 : pos + 1 + c])
        lazy.observe_hidden([0], {la: h[:, pos : pos + c] for la, h in feats.items()}, [c])
        pos += c
    assert pos == len(seq) - 1
    assert lazy._rows[0].num_pending < max_pending  # queued (or flushed when the queue filled)
    greedy = SamplingParams(temperature=0)
    (a,) = ref.propose(ProposeInput([0], [0], [seq], sampling=greedy), [4])
    (b,) = lazy.propose(ProposeInput([0], [0], [seq], sampling=greedy), [4])
    assert lazy._rows[0].num_pending == 0 and lazy._rows[0].committed == len(seq) - 1
    assert a.token_ids == b.token_ids
    assert b.confidence == pytest.approx(a.confidence, abs=1e-9)


def test_a_groups_prompt_runs_once_for_the_first_row_asked_and_is_copied_to_the_others(model):
    """Two samples of one prompt, asked at different steps: the later one takes the prompt's keys/values from the
    first (no second prompt pass) and both draft what speculators that saw their whole sequences at once draft."""
    head = _head(model, fuse=(1, 2))
    prompt = PROMPTS[1]
    P = len(prompt)
    seqs = [prompt + [3, 4, 5, 6], prompt + [9, 8, 7]]
    feats = [_features(model, s, head.config.fuse_layers) for s in seqs]
    spec = DraftHeadSpeculator(head, seed=3)
    spec.start(0, prompt, [0, 1])
    for r, s in enumerate(seqs):
        spec.observe(r, s[P : P + 1])
    both = {la: torch.cat([f[la][:, :P] for f in feats]) for la in head.config.fuse_layers}  # [2, P, hidden]
    spec.observe_hidden([0, 1], both, [P, P])
    for r, s in enumerate(seqs):  # each row's decode positions, one step each
        spec.observe(r, s[P + 1 :])
        spec.observe_hidden([r], {la: h[:, P : len(s) - 1] for la, h in feats[r].items()}, [len(s) - 1 - P])
    greedy = SamplingParams(temperature=0)
    for r in (1, 0):  # the second row first: it runs the prompt
        (got,) = spec.propose(ProposeInput([r], [0], [seqs[r]], sampling=greedy), [4])
        assert spec._prompts[0].slot == spec._rows[1].slot
        (want,) = _primed(model, head, seqs[r], P).propose(ProposeInput([0], [0], [seqs[r]], sampling=greedy), [4])
        assert got.token_ids == want.token_ids
        assert got.confidence == pytest.approx(want.confidence, abs=1e-9)


@pytest.mark.parametrize("fuse", [(1, 2), (-1,)])
def test_head_drafts_keep_the_engine_lossless(model, fuse):
    head = _head(model, fuse=fuse)
    sp = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    base = RolloutEngine(model).generate(PROMPTS, sp, num_generations=2)
    eng = RolloutEngine(model, speculators=[DraftHeadSpeculator(head)], controller=FixedController(3))
    out = eng.generate(PROMPTS, sp, num_generations=2)
    assert out.completion_ids == base.completion_ids and out.stats.num_draft_tokens > 0
    sp2 = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=1, ignore_eos=True)
    out = eng.generate(PROMPTS, sp2, num_generations=2)
    assert out.stats.num_accepted_tokens > 0
    for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        assert torch.allclose(
            torch.tensor(lp, dtype=torch.float64), teacher_forced_logprobs(model, p, c, sp2), atol=1e-9
        )


def test_drafted_tokens_follow_the_draft_distribution(model):
    """The first draft token of 4000 proposals from one state follows the draft distribution the verifier is
    given (chi-square, alpha=0.001, fixed seed): the sampler (inverse CDF) and ``draft_probs`` agree."""
    from test_engine import _chi2_pvalue

    head = _head(model, vocab=12)
    seq = PROMPTS[1] + [3, 4, 5]
    spec = _primed(model, head, seq, len(PROMPTS[1]))
    sp = SamplingParams(temperature=1.0, max_new_tokens=8)
    counts = torch.zeros(V, dtype=torch.long)
    probs = None
    for _ in range(4000):
        (d,) = spec.propose(ProposeInput([0], [0], [seq], sampling=sp), [1])
        counts[d.token_ids[0]] += 1
        probs = d.draft_probs[0] if probs is None else probs
        assert torch.equal(d.draft_probs[0], probs)  # the same state: the same distribution every time
    assert _chi2_pvalue(counts, probs) > 1e-3


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        pytest.param(
            torch.float32,  # a float32 head drafts in bfloat16 (EngineConfig.draft_bf16): oneDNN or linear_bf16w
            marks=pytest.mark.skipif(
                not bf16_matmul_available() and glue_kernels() is None,
                reason="no native bfloat16 matmul on this CPU and no compiled decode glue",
            ),
        ),
    ],
)
def test_head_sampling_marginals_match_target(dtype):
    """First two emitted positions of 3000 samples match the enumerated exact marginals (chi-square, alpha=0.001)
    with soft drafts from a draft head, also when the head drafts in bfloat16; fixed seeds."""
    from test_engine import _chi2_pvalue, _exact_marginals

    m = tiny_llama(vocab_size=16, dtype=dtype, seed=3)
    cfg = DraftHeadConfig.from_target(m, draft_vocab_size=12, fuse_layers=(-1,), intermediate_size=32)
    head = DraftHead(cfg, draft_to_target=torch.arange(12)).to(dtype).bind_target(m, init_lm_head=True)
    exact = _exact_marginals(m, [1, 2, 3], 16, 2)
    eng = RolloutEngine(m, speculators=[DraftHeadSpeculator(head)], controller=FixedController(2))
    if dtype == torch.float32:
        assert head.lm_head.forward.__func__.__name__ == "_draft_forward"
    out = eng.generate(
        [[1, 2, 3]], SamplingParams(temperature=1.0, max_new_tokens=3, seed=5, ignore_eos=True), num_generations=3000
    )
    comps = torch.tensor(out.completion_ids)
    assert out.stats.num_accepted_tokens > 0
    for pos in range(2):
        assert _chi2_pvalue(torch.bincount(comps[:, pos], minlength=16), exact[pos]) > 1e-3


def test_checkpoint_round_trip_is_bit_exact(model, tmp_path):
    head = _head(model, dtype=torch.float32)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = head.save_pretrained(tmp_path / "head", dtype=None, card={"steps": 3})
    back = DraftHead.from_pretrained(path, target=model)
    sd_a, sd_b = head.state_dict(), back.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert DraftHead.read_card(path) == {"steps": 3}
    again = back.save_pretrained(tmp_path / "again", dtype=None, card={"steps": 3})
    from safetensors.torch import load_file

    a, b = load_file(str(path / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # tensors re-saved bit for bit
    assert (path / "config.json").read_text() == (again / "config.json").read_text()


def test_checkpoint_is_in_the_vllm_eagle3_layout(model, tmp_path):
    """config.json and tensor names are those of vLLM's Eagle3LlamaForCausalLM; d2t holds offsets, t2d a mask."""
    head = _head(model, dtype=torch.float32)
    path = head.save_pretrained(tmp_path / "head")
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["Eagle3LlamaForCausalLM"] and cfg["num_hidden_layers"] == 1
    assert cfg["vocab_size"] == V and cfg["draft_vocab_size"] == 48 and cfg["torch_dtype"] == "float16"
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 2]
    from safetensors.torch import load_file

    t = load_file(str(path / "model.safetensors"))
    H = model.config.hidden_size
    assert t["fc.weight"].shape == (H, 2 * H) and t["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * H
    assert {"midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "norm.weight", "lm_head.weight"} <= set(
        t
    )
    assert not any(k.startswith("layers.") or "embed_tokens" in k for k in t)
    assert torch.equal(t["d2t"] + torch.arange(48), head.draft_to_target)
    assert t["t2d"].dtype == torch.bool and int(t["t2d"].sum()) == 48 and bool(t["t2d"][head.draft_to_target].all())


def test_bad_checkpoints_fail_with_clear_errors(model, tmp_path):
    head = _head(model, dtype=torch.float32)
    good = head.save_pretrained(tmp_path / "good", dtype=None)
    weights = (good / "model.safetensors").read_bytes()
    corrupt = head.save_pretrained(tmp_path / "corrupt", dtype=None)
    (corrupt / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="corrupt/model.safetensors"):
        DraftHead.from_pretrained(corrupt)
    with pytest.raises(FileNotFoundError, match="nope"):
        DraftHead.from_pretrained(tmp_path / "nope")
    other = tiny_llama(vocab_size=V, dtype=torch.float64, seed=0, hidden_size=32, num_heads=2, num_kv_heads=1)
    with pytest.raises(ValueError, match="trained for target"):
        DraftHead.from_pretrained(good, target=other)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(good / "model.safetensors"))

    def broken(name: str, change) -> Path:
        d = head.save_pretrained(tmp_path / name, dtype=None)
        t = dict(tensors)
        change(t)
        save_file(t, str(d / "model.safetensors"))
        return d

    with pytest.raises(ValueError, match=r"missing/model.safetensors.*missing \['fc.weight'\]"):
        DraftHead.from_pretrained(broken("missing", lambda t: t.pop("fc.weight")))
    with pytest.raises(ValueError, match="shape"):
        DraftHead.from_pretrained(broken("shape", lambda t: t.update({"fc.weight": torch.zeros(3, 3)})))
    with pytest.raises(ValueError, match="NaN"):
        DraftHead.from_pretrained(
            broken("nan", lambda t: t.update({"fc.weight": torch.full_like(t["fc.weight"], float("nan"))}))
        )
    with pytest.raises(ValueError, match="duplicate"):
        DraftHead.from_pretrained(broken("d2t", lambda t: t.update({"d2t": -torch.arange(48)})))
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        DraftHead.from_pretrained(tmp_path / "noconfig")


def test_old_v1_checkpoint_is_refused_naming_its_format(tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "old_head.safetensors"
    save_file(
        {"fc.weight": torch.zeros(2, 2)}, str(old), metadata={"format": "atlas-rl/draft-head/v1", "config": "{}"}
    )
    with pytest.raises(ValueError, match=r"old_head.safetensors is an atlas-rl/draft-head/v1 checkpoint"):
        DraftHead.from_pretrained(old)


def test_two_layer_head_drafts_losslessly_and_matches_training_time_test(model):
    """num_hidden_layers=2: the serving chain (a KV cache per layer) equals the unrolled training-time test."""
    torch.manual_seed(1)
    cfg = DraftHeadConfig.from_target(
        model, draft_vocab_size=48, fuse_layers=(1, 2), intermediate_size=64, num_hidden_layers=2
    )
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:48]
    head = DraftHead(cfg, draft_to_target=d2t).double().bind_target(model, init_lm_head=True)
    prompt = PROMPTS[1]
    seq = prompt + [3, 4]
    spec = _primed(model, head, seq, len(prompt))
    (d,) = spec.propose(ProposeInput([0], [0], [seq], sampling=SamplingParams(temperature=0)), [4])
    full = seq + d.token_ids
    feats = _features(model, full, cfg.fuse_layers)
    f = torch.cat([feats[la] for la in cfg.fuse_layers], -1)
    toks = torch.tensor([full])
    with torch.no_grad():
        outs = head.ttt_logits(toks, f, torch.ones_like(toks, dtype=torch.bool), steps=4)
    base = len(seq) - 2  # the last verified position
    chain = [int(head.draft_to_target[outs[j][0, base].argmax()]) for j in range(4)]
    assert chain == d.token_ids


def test_config_validation_messages():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        DraftHeadConfig(hidden_size=8, target_vocab_size=10, draft_vocab_size=20)
    with pytest.raises(ValueError, match="fuse_layers"):
        DraftHeadConfig(hidden_size=8, target_vocab_size=10, draft_vocab_size=5, fuse_layers=())


def test_large_heads_are_sharded_with_an_index_and_load_back_bit_exact(model, tmp_path):
    """Over ``max_shard_bytes`` the weights go into HF-style shards + model.safetensors.index.json (what vLLM's
    loader reads); re-saving small removes the shards and the index."""
    head = _head(model, dtype=torch.float32)
    d = head.save_pretrained(tmp_path / "head", dtype=None, max_shard_bytes=4096)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (d / "model.safetensors").exists()
    per_shard = {s: [k for k, v in index["weight_map"].items() if v == s] for s in shards}
    for s, names in per_shard.items():  # a shard over the bound holds one tensor that alone exceeds it
        assert (d / s).is_file() and ((d / s).stat().st_size < 4096 + 2048 or len(names) == 1), (s, names)
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "d2t", "t2d"} <= set(index["weight_map"])
    back = DraftHead.from_pretrained(d, target=model)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in head.state_dict().items())
    head.save_pretrained(d, dtype=None)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    (d / "model.safetensors").unlink()
    head.save_pretrained(d, dtype=None, max_shard_bytes=4096)
    (d / shards[0]).unlink()
    with pytest.raises(FileNotFoundError, match=shards[0]):
        DraftHead.from_pretrained(d)


@pytest.mark.parametrize("bf16", [False, True])
def test_the_engine_puts_a_float32_draft_head_on_the_tuned_kernels_and_training_keeps_autograd(bf16):
    model = tiny_llama(vocab_size=V, seed=0)
    head = _head(model, dtype=torch.float32)
    cfg = EngineConfig(draft_bf16=bf16)
    RolloutEngine(model, speculators=[DraftHeadSpeculator(head)], controller=FixedController(2), config=cfg)
    assert getattr(head.lm_head, "_atlas_cpu_linear", False)  # routed through small_linear / draft_linear
    h = torch.randn(3, model.config.hidden_size)
    lowp = bf16 and (bf16_matmul_available() or glue_kernels() is not None)  # oneDNN bfloat16 or linear_bf16w
    tol = 3e-2 if lowp else 1e-5  # bfloat16 keeps 8 bits of mantissa
    with torch.no_grad():
        torch.testing.assert_close(head.logits(h), F.linear(head.norm(h), head.lm_head.weight), rtol=tol, atol=tol)
    loss = head.fuse_features(torch.randn(2, len(head.config.fuse_layers) * model.config.hidden_size)).sum()
    loss.backward()  # the training path (grad enabled) stays on F.linear, in float32
    assert head.fc.weight.grad is not None


def test_folded_grouped_query_attention_equals_repeated_kv_heads(model):
    """``DraftHead.attend`` folds each kv head's query heads into its query rows instead of copying the keys and
    values per query head; same result as the reference with ``repeat_interleave`` (float64, ragged masks)."""
    head = _head(model)
    c = head.config
    assert c.num_attention_heads > c.num_key_value_heads  # the tiny model groups its query heads
    g = torch.Generator().manual_seed(0)
    b, t, s, d = 3, 2, 7, c.head_dim
    q = torch.randn(b, c.num_attention_heads, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, c.num_key_value_heads, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    pos = torch.tensor([[3, 4], [5, 6], [0, 1]])  # [b, t] each row's own length
    mask = (torch.arange(s)[None, None, :] <= pos[:, :, None])[:, None]  # [b, 1, t, s]
    rep = c.num_attention_heads // c.num_key_value_heads
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask)
    torch.testing.assert_close(head.attend(q, k, v, mask), ref.transpose(1, 2).reshape(b, t, -1), rtol=0, atol=1e-12)


def test_draft_cache_is_read_as_a_view_for_consecutive_slots_and_gathered_otherwise(model):
    spec = DraftHeadSpeculator(_head(model))
    spec._ensure_storage(6, 9)
    spec._k.copy_(torch.randn_like(spec._k))
    spec._v.copy_(torch.randn_like(spec._v))
    for slots in ([2, 3, 4], [4, 1, 5], [0]):
        rows = spec._cache_rows(torch.tensor(slots))
        k, v = spec._k[0, rows, :, :5], spec._v[0, rows, :, :5]
        assert torch.equal(k, spec._k[0, slots, :, :5]) and torch.equal(v, spec._v[0, slots, :, :5])
        assert (k.data_ptr() == spec._k[0, slots[0]].data_ptr()) == (slots != [4, 1, 5])  # a view, no copy


def test_attend_takes_attention_output_strided_as_gpu_kernels_return_it(model, monkeypatch):
    """On an H200 the SDPA output came back laid out as [b, rep*t, kvh, d] and ``view`` refused it; the folded
    attention must give the same result from such an output as from a contiguous one."""
    head = _head(model)
    c = head.config
    g = torch.Generator().manual_seed(1)
    b, t, s, d = 2, 3, 6, c.head_dim
    q = torch.randn(b, c.num_attention_heads, t, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, c.num_key_value_heads, s, d, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(b, 1, t, s, dtype=torch.bool).tril(s - t)
    ref = head.attend(q, k, v, mask)
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda *a, **kw: sdpa(*a, **kw).transpose(1, 2).contiguous().transpose(1, 2)
    )
    torch.testing.assert_close(head.attend(q, k, v, mask), ref, rtol=0, atol=0)
