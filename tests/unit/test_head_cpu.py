"""The draft layers through the CPU decode glue (speculators/head_cpu.py) against the PyTorch reference path of
DraftHeadSpeculator._layers: same drafts, same draft distributions and KV storage within float32 rounding; the
reference kept where the glue path does not apply (scattered slots); the engine hands the kernels over."""

from __future__ import annotations

import pytest
import torch

from atlas_rl import SamplingParams
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.rollout.cpu_glue import glue_kernels
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.types import ProposeInput

V = 96
# (prompt, emitted tokens) per row: prompts of different lengths, so rows sit at different positions
ROWS = [([1, 5, 7, 9, 11], [3, 4, 6]), ([2, 9, 11, 13, 4, 8, 3, 17, 21], [5]), ([6, 7, 8], [30, 31, 32, 33])]


@pytest.fixture(scope="module")
def glue():
    g = glue_kernels()
    if g is None:
        pytest.skip("the CPU decode glue kernels cannot be built here")
    return g


@pytest.fixture(scope="module")
def model():
    # head_dim 64: a head size the glue's row attention is compiled for
    return tiny_llama(vocab_size=V, hidden_size=256, num_heads=4, num_kv_heads=2, dtype=torch.float32, seed=1)


def _head(model, layers: int = 1) -> DraftHead:
    torch.manual_seed(0)
    cfg = DraftHeadConfig.from_target(
        model, draft_vocab_size=64, fuse_layers=(1, 2), intermediate_size=128, num_hidden_layers=layers
    )
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:64]
    head = DraftHead(cfg, draft_to_target=d2t).bind_target(model, init_lm_head=True)
    with torch.no_grad():  # weights of a trained head's scale, so drafts are not all ties
        for p in head.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    return head


def _primed(model, head: DraftHead, glue) -> DraftHeadSpeculator:
    """A speculator that has seen every row of ROWS (each its own group) with teacher-forced features."""
    spec = DraftHeadSpeculator(head, seed=3)
    spec.cpu_glue = glue
    for r, (prompt, emitted) in enumerate(ROWS):
        seq = prompt + emitted
        spec.start(r, prompt, [r])
        spec.observe(r, emitted)
        with torch.no_grad():
            hs = model.model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        feats = {la: hs[la][:, : len(prompt)] for la in head.config.fuse_layers}
        spec.observe_hidden([r], feats, [len(prompt)])  # the prompt positions, then the emitted ones one by one
        for p in range(len(prompt), len(seq) - 1):
            spec.observe_hidden([r], {la: hs[la][:, p : p + 1] for la in head.config.fuse_layers}, [1])
    return spec


def _propose(spec: DraftHeadSpeculator, rows: list[int], k: int, sampling: SamplingParams):
    seqs = [ROWS[r][0] + ROWS[r][1] for r in rows]
    return spec.propose(ProposeInput(rows, rows, seqs, sampling=sampling), [k] * len(rows))


@pytest.mark.parametrize("layers", [1, 2])
def test_glue_drafts_equal_the_reference_path(model, glue, layers):
    head = _head(model, layers)
    ref, fast = _primed(model, head, None), _primed(model, head, glue)
    for sp in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=40)):
        a, b = _propose(ref, [0, 1, 2], 5, sp), _propose(fast, [0, 1, 2], 5, sp)
        for x, y in zip(a, b):
            assert x.token_ids == y.token_ids
            assert y.confidence == pytest.approx(x.confidence, abs=2e-5)
            if x.draft_probs is not None:
                torch.testing.assert_close(y.draft_probs, x.draft_probs, atol=2e-5, rtol=0)
    assert ref._k is not None and fast._k is not None
    n = max(len(p) + len(e) for p, e in ROWS)  # every position any row wrote
    torch.testing.assert_close(fast._k[:, :3, :, :n], ref._k[:, :3, :, :n], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(fast._v[:, :3, :, :n], ref._v[:, :3, :, :n], atol=2e-5, rtol=1e-4)


def test_the_glue_path_runs_and_scattered_slots_keep_the_reference(model, glue, monkeypatch):
    head = _head(model)
    spec = _primed(model, head, glue)
    calls = []
    run = spec._cpu_layers().run
    monkeypatch.setattr(spec._cpu_layers(), "run", lambda *a: calls.append(a[-1]) or run(*a))
    ref = _primed(model, head, None)
    greedy = SamplingParams(temperature=0.0)
    a, b = _propose(ref, [0, 2], 4, greedy), _propose(spec, [0, 2], 4, greedy)  # slots 0 and 2: not consecutive
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert calls == []  # catch-ups and chain run over slots 0 and 2 together: the reference path
    a, b = _propose(ref, [1, 2], 4, greedy), _propose(spec, [1, 2], 4, greedy)
    assert [x.token_ids for x in a] == [y.token_ids for y in b]
    assert calls and set(calls) == {1}  # slots 1, 2: the glue path from row 1 on (catch-ups, then the chain)


def test_the_engine_hands_the_glue_to_a_float32_head_and_stays_lossless(model, glue):
    head = _head(model)
    spec = DraftHeadSpeculator(head, seed=3)
    eng = RolloutEngine(model, speculators=[spec], controller=FixedController(3), eos_token_ids=[])
    assert spec.cpu_glue is glue and spec._cpu_layers() is not None
    prompts = [p for p, _ in ROWS]
    sp = SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True)
    plain = RolloutEngine(model, controller=FixedController(0), eos_token_ids=[]).generate(prompts, sp)
    out = eng.generate(prompts, sp)
    assert out.completion_ids == plain.completion_ids
    assert out.stats.num_draft_tokens > 0
