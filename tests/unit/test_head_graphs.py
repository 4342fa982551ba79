"""Draft heads replayed from CUDA graphs: the same drafts (tokens, confidences, distributions) as the eager head,
padded rows kept out of every row's cache, the engine lossless, and the eager head after a failed capture.

``engine_helpers.RerunGraph`` stands in for ``torch.cuda.CUDAGraph`` (no CUDA here): it re-runs the captured
function over the same static buffers at each replay; the head, its KV storage and the target are the real ones.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import FailingGraph, RerunGraph, teacher_forced_logprobs

from atlas_rl import SamplingParams
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine
from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig
from atlas_rl.speculators.head_graphs import HeadGraphs
from atlas_rl.speculators.head_speculator import DraftHeadSpeculator
from atlas_rl.types import ProposeInput

V = 64
PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=V, dtype=torch.float64, seed=0)


def _head(model) -> DraftHead:
    torch.manual_seed(0)
    cfg = DraftHeadConfig.from_target(model, draft_vocab_size=48, fuse_layers=(1, 2), intermediate_size=64)
    d2t = torch.randperm(V, generator=torch.Generator().manual_seed(0))[:48]
    return DraftHead(cfg, draft_to_target=d2t).to(torch.float64).bind_target(model, init_lm_head=True)


def _graphed(spec: DraftHeadSpeculator, factory=RerunGraph) -> DraftHeadSpeculator:
    spec._graphs = HeadGraphs(spec._graph_reads, graph_factory=factory)
    return spec


def _decode(model, spec: DraftHeadSpeculator, seqs: list[list[int]], sp: SamplingParams, k: int) -> list:
    """Three rows fed their prompts, then four steps of verified positions (1, 2, 3, 1 per step, as a decode's
    acceptances come), a ``k``-token proposal after each: every draft."""
    P = [len(p) for p in PROMPTS[:3]]
    for r, (s, p) in enumerate(zip(seqs, P)):
        spec.start(r, s[:p], [r])
        spec.observe(r, s[p : p + 1])
    hs = [model.model(torch.tensor([s]), output_hidden_states=True).hidden_states for s in seqs]
    for r, p in enumerate(P):
        spec.observe_hidden([r], {la: hs[r][la][:, :p] for la in spec.hidden_layers}, [p])
    done, drafts = list(P), []
    for c in (1, 2, 3, 1):
        for r in range(3):
            spec.observe(r, seqs[r][done[r] + 1 : done[r] + 1 + c])
            spec.observe_hidden([r], {la: hs[r][la][:, done[r] : done[r] + c] for la in spec.hidden_layers}, [c])
            done[r] += c
        rows = ProposeInput([0, 1, 2], [0, 1, 2], [s[: d + 1] for s, d in zip(seqs, done)], sampling=sp)
        drafts.append(spec.propose(rows, [k, k, k]))
    return drafts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_replayed_drafts_equal_the_eager_head(model, temperature):
    head = _head(model)
    seqs = [p + list(range(10, 20)) for p in PROMPTS[:3]]
    sp = SamplingParams(temperature=temperature, top_p=0.9 if temperature else 1.0)
    with torch.inference_mode():
        want = _decode(model, DraftHeadSpeculator(head, seed=5), seqs, sp, k=3)
        graphed = _graphed(DraftHeadSpeculator(head, seed=5))
        got = _decode(model, graphed, seqs, sp, k=3)
    g = graphed._graphs
    # 3 rows -> the 4-row bucket; captured when met a second time: the chain (steps 2-4) and one-position
    # catch-ups (step 4); the catch-ups of 2 and 3 positions and the prompts, met once, stayed eager
    assert (g.num_captures, g.num_replays) == (2, 4)
    for a_step, b_step in zip(want, got):
        for a, b in zip(a_step, b_step):
            assert b.token_ids == a.token_ids
            assert b.confidence == pytest.approx(a.confidence, abs=1e-9)
            if temperature:
                torch.testing.assert_close(b.draft_probs, a.draft_probs, rtol=0, atol=1e-9)
    scratch = graphed._k.shape[1] - 1
    assert scratch not in {st.slot for st in graphed._rows.values()}


def test_the_engine_stays_lossless_with_a_replayed_head(model):
    head = _head(model)
    sp = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    base = RolloutEngine(model).generate(PROMPTS, sp, num_generations=2)
    spec = _graphed(DraftHeadSpeculator(head))
    eng = RolloutEngine(model, speculators=[spec], controller=FixedController(3))
    out = eng.generate(PROMPTS, sp, num_generations=2)
    assert out.completion_ids == base.completion_ids and out.stats.num_draft_tokens > 0
    sp2 = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=1, ignore_eos=True)
    out = eng.generate(PROMPTS, sp2, num_generations=2)
    assert out.stats.num_accepted_tokens > 0 and spec._graphs.num_replays > 0
    for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        want = teacher_forced_logprobs(model, p, c, sp2)
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), want, rtol=0, atol=1e-9)


def test_a_failed_capture_leaves_the_eager_head(model, caplog):
    head = _head(model)
    seqs = [p + list(range(10, 20)) for p in PROMPTS[:3]]
    greedy = SamplingParams(temperature=0)
    with torch.inference_mode():
        want = _decode(model, DraftHeadSpeculator(head, seed=5), seqs, greedy, k=2)
        failing = _graphed(DraftHeadSpeculator(head, seed=5), FailingGraph)
        with caplog.at_level("WARNING", logger="atlas_rl.speculators.head_graphs"):
            got = _decode(model, failing, seqs, greedy, k=2)
    assert [[d.token_ids for d in s] for s in got] == [[d.token_ids for d in s] for s in want]
    assert failing._graphs.failed and failing._graph_runner() is None
    assert sum("capture failed" in r.message for r in caplog.records) == 1


def test_graphs_are_dropped_when_the_storage_or_a_weight_moves():
    graphs = HeadGraphs(lambda: (a,), graph_factory=RerunGraph)
    a = torch.zeros(4)
    x = torch.arange(3.0)
    ins = {"x": (x, 0.0)}
    assert graphs.run(("double",), ins, lambda x: (x * 2,)) is None, "met once: the caller runs it eagerly"
    assert graphs.run(("double",), ins, lambda x: (x * 2,))[0].tolist() == [0.0, 2.0, 4.0]
    graphs.run(("double",), {"x": (x + 1, 0.0)}, lambda x: (x * 2,))
    assert graphs.num_captures == 1 and graphs.num_replays == 2 and graphs.num_graphs == 1
    a = torch.zeros(4)  # another tensor: every graph goes (a shape seen before is captured again at once)
    out = graphs.run(("double",), {"x": (x + 5, 0.0)}, lambda x: (x * 2,))
    assert out[0].tolist() == [10.0, 12.0, 14.0] and graphs.num_captures == 2 and graphs.num_graphs == 1
    assert graphs.run(("double",), {"x": (x[:2], 0.0)}, lambda x: (x * 2,)) is None  # 2 rows: another bucket


def test_a_new_storage_starts_a_new_memory_pool():
    store = [torch.zeros(4)]
    graphs = HeadGraphs(lambda: (store[0],), graph_factory=RerunGraph)
    for gen in (1, 2):
        for _ in range(2):  # captured when met a second time (generation 1), at once after a drop (generation 2)
            graphs.run(("a",), {"x": (torch.ones(2), 0.0)}, lambda x: (x + 1,))
            graphs.run(("b",), {"x": (torch.ones(2), 0.0)}, lambda x: (x + 2,))
        assert graphs._pool.generations == gen and graphs.num_graphs == 2
        store[0] = torch.zeros(4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_of_a_draft_head_keep_the_engine_lossless():
    model = tiny_llama(vocab_size=V, dtype=torch.float64, seed=0).cuda()
    head = _head(model.cpu()).cuda().bind_target(model.cuda())
    sp = SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True)
    base = RolloutEngine(model).generate(PROMPTS, sp, num_generations=2)
    spec = DraftHeadSpeculator(head)
    out = RolloutEngine(model, speculators=[spec], controller=FixedController(3)).generate(
        PROMPTS, sp, num_generations=2
    )
    assert out.completion_ids == base.completion_ids and out.stats.num_draft_tokens > 0
    assert spec._graphs is not None and spec._graphs.failed is None and spec._graphs.num_replays > 0


def test_a_head_keeps_its_most_recently_used_graphs(monkeypatch):
    import atlas_rl.speculators.head_graphs as hg

    monkeypatch.setattr(hg, "MAX_GRAPHS", 2)
    graphs = HeadGraphs(lambda: (), graph_factory=RerunGraph)
    for name in ("a", "a", "b", "b", "a", "c", "c"):
        graphs.run((name,), {"x": (torch.ones(2), 0.0)}, lambda x: (x + 1,))
    assert [k[0] for k in graphs._graphs] == ["a", "c"] and graphs.num_captures == 3
