"""CUDA-graph replay of the lean forward: the static forward equals the eager one, and the graph runner's buffers,
padding, buckets, invalidation and fallback keep every output equal to the eager forward's.

No CUDA here: ``engine_helpers.RerunGraph`` stands in for ``torch.cuda.CUDAGraph`` by re-running the captured
function over the same static buffers at each replay (what a replay computes); the model, the cache and the forward
are the real ones.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import FailingGraph, NoisyOracleSpeculator, RerunGraph

from atlas_rl import SamplingParams
from atlas_rl.config import EngineConfig
from atlas_rl.graph_capture import row_bucket
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine, SlotKVCache
from atlas_rl.rollout import cuda_graphs as cg
from atlas_rl.rollout.forward import LeanForward

VOCAB = 96


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB, num_heads=6, num_kv_heads=2, hidden_size=48, dtype=torch.float64, seed=3)


def _cache(model, rows: int, length: int) -> SlotKVCache:
    mc = model.config
    return SlotKVCache(mc.num_hidden_layers, rows, length, 2, 8, model.dtype, "cpu")


def _prefilled(lean: LeanForward, model, rows: int, starts: list[int], length: int, seed: int) -> SlotKVCache:
    """A cache of ``rows`` slots whose first ``len(starts)`` hold random prefixes of those lengths."""
    cache = _cache(model, rows, length)
    g = torch.Generator().manual_seed(seed)
    width = max(starts)
    pre = torch.randint(0, VOCAB, (len(starts), width), generator=g)  # [n, width]
    lean(pre, torch.zeros(len(starts), dtype=torch.long), cache, False)
    return cache


def _step(n: int, q: int, seed: int) -> torch.Tensor:  # [n, q]
    return torch.randint(0, VOCAB, (n, q), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q", [1, 2, 5])
@pytest.mark.parametrize("fuse", [False, True])
def test_static_forward_equals_eager_with_keys_past_every_row(model, q, fuse):
    lean = LeanForward(model, fuse=fuse)
    starts = [7, 3, 11]
    with torch.inference_mode():
        a = _prefilled(lean, model, 3, starts, 64, seed=q)
        b = _prefilled(lean, model, 3, starts, 64, seed=q)
        lean.rope_tables(64, model.dtype, torch.device("cpu"))
        ids, st = _step(3, q, 10 + q), torch.tensor(starts)
        ref_last, ref_hidden = lean(ids, st, a, True)
        last, hidden = lean(ids, st, b, True, kv_len=40, static=True)  # 40 > 11 + q: masked keys
    torch.testing.assert_close(last, ref_last, rtol=0, atol=1e-12)
    for mine, theirs in zip(hidden, ref_hidden):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.keys[:, :, :, :20], a.keys[:, :, :, :20], rtol=0, atol=0)


def test_a_static_forward_without_rope_tables_says_what_to_call(model):
    lean = LeanForward(model, fuse=False)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="call rope_tables"):
        lean(_step(1, 1, 0), torch.zeros(1, dtype=torch.long), _cache(model, 1, 8), False, kv_len=4, static=True)


def _graphed(model, factory=RerunGraph) -> cg.GraphedForward:
    return cg.GraphedForward(LeanForward(model, fuse=False), model, graph_factory=factory)


@pytest.mark.parametrize("want_hidden", [False, True])
def test_replayed_forward_equals_eager_and_leaves_live_slots_alone(model, want_hidden):
    graphed, lean = _graphed(model), LeanForward(model, fuse=False)
    starts = [5, 9, 2]  # 3 rows: padded to the 4-row bucket, the dummy row writes slot 3 only
    with torch.inference_mode():
        ref_cache = _prefilled(lean, model, 4, starts, 48, seed=1)
        cache = _prefilled(lean, model, 4, starts, 48, seed=1)
        ids, st = _step(3, 2, 4), torch.tensor(starts)
        ref_last, ref_hidden = lean(ids, st, ref_cache, want_hidden)
        last, hidden = graphed(ids, st, cache, want_hidden, kv_len=11)
    assert graphed.num_captures == 1 and graphed.num_replays == 1
    torch.testing.assert_close(last, ref_last, rtol=0, atol=1e-12)
    assert (hidden is None) == (not want_hidden)
    for mine, theirs in zip(hidden or (), ref_hidden or ()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    # the live slots hold what the eager step wrote (up to the rounding of a 4-row matmul against a 3-row one)
    torch.testing.assert_close(cache.keys[:, :3], ref_cache.keys[:, :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(cache.values[:, :3], ref_cache.values[:, :3], rtol=0, atol=1e-12)


def test_outputs_survive_the_next_replay_and_buckets_share_a_graph(model):
    graphed, lean = _graphed(model), LeanForward(model, fuse=False)
    with torch.inference_mode():
        cache = _prefilled(lean, model, 4, [6, 6, 6, 6], 48, seed=2)
        first, _ = graphed(_step(3, 1, 5), torch.tensor([6, 6, 6]), cache, False, kv_len=7)
        kept = first.clone()
        graphed(_step(4, 1, 6), torch.tensor([7, 7, 7, 7]), cache, False, kv_len=8)  # 3 and 4 rows: one bucket
        assert graphed.num_graphs == 1 and graphed.num_captures == 1 and graphed.num_replays == 2
        torch.testing.assert_close(first, kept, rtol=0, atol=0)
        graphed(_step(4, 3, 7), torch.tensor([8, 8, 8, 8]), cache, False, kv_len=11)  # another q: another graph
        assert graphed.num_graphs == 2
        graphed(_step(4, 1, 8), torch.tensor([11, 11, 11, 11]), _prefilled(lean, model, 4, [11] * 4, 48, 3), False, 12)
        assert graphed.num_graphs == 1, "another KV cache: the graphs over the old one are dropped"


def test_a_replaced_parameter_drops_the_graphs(model):
    m = tiny_llama(vocab_size=VOCAB, num_heads=6, num_kv_heads=2, hidden_size=48, dtype=torch.float64, seed=4)
    graphed = _graphed(m)
    with torch.inference_mode():
        cache = _prefilled(graphed.lean, m, 2, [4, 4], 32, seed=5)
        graphed(_step(2, 1, 9), torch.tensor([4, 4]), cache, False, kv_len=5)
        graphed.validate()
        assert graphed.num_graphs == 1, "nothing moved: the graphs stay"
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(m.model.layers[0].mlp.down_proj.weight * 2)
    graphed.validate()
    assert graphed.num_graphs == 0


def test_a_failed_capture_leaves_the_eager_forward(model, caplog):
    graphed, lean = _graphed(model, FailingGraph), LeanForward(model, fuse=False)
    with torch.inference_mode():
        ref_cache = _prefilled(lean, model, 2, [3, 8], 32, seed=6)
        cache = _prefilled(lean, model, 2, [3, 8], 32, seed=6)
        ids, st = _step(2, 3, 11), torch.tensor([3, 8])
        with caplog.at_level("WARNING", logger="atlas_rl.rollout.cuda_graphs"):
            last, _ = graphed(ids, st, cache, False, kv_len=11)
        ref, _ = lean(ids, st, ref_cache, False)
        graphed(ids, st, cache, False, kv_len=11)
    torch.testing.assert_close(last, ref, rtol=0, atol=1e-12)
    assert graphed.failed and "stream is capturing" in graphed.failed
    assert graphed.num_graphs == 0 and graphed.num_replays == 0
    assert sum("capture failed" in r.message for r in caplog.records) == 1


def test_shapes_without_a_bucket_run_eagerly(model):
    graphed = _graphed(model)
    with torch.inference_mode():
        cache = _prefilled(graphed.lean, model, 3, [4, 4, 4], 32, seed=7)  # 3 slots: the 4-row bucket does not fit
        graphed(_step(3, 1, 12), torch.tensor([4, 4, 4]), cache, False, kv_len=5)
    assert graphed.num_graphs == 0 and graphed.num_replays == 0
    assert [row_bucket(n) for n in (1, 3, 5, 9, 17, 33, 65, 257, 300)] == [1, 4, 8, 16, 24, 48, 96, 257, 300]


def test_engine_output_is_identical_with_graphs(model):
    """Greedy decoding with ragged speculation and rows finishing at different steps (stop tokens), so the row
    buckets pad and shrink: the same tokens and logprobs as the eager engine."""
    prompts = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]  # 8 rows: 8/4/2-row buckets
    sp = SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=[40, 58], ignore_eos=True)
    config = EngineConfig(num_speculative_tokens=3)
    base = RolloutEngine(model, speculators=[NoisyOracleSpeculator(model, noise=0.3)], config=config)
    graphed = RolloutEngine(model, speculators=[NoisyOracleSpeculator(model, noise=0.3)], config=config)
    assert graphed._graphs is None, "a CPU engine never captures"
    graphed._graphs = cg.GraphedForward(graphed._lean, model, graph_factory=RerunGraph)
    want = base.generate(prompts, sp, num_generations=2)
    got = graphed.generate(prompts, sp, num_generations=2)
    assert got.completion_ids == want.completion_ids
    flat = [x for row in got.logprobs for x in row]
    assert flat == pytest.approx([x for row in want.logprobs for x in row], abs=1e-9)
    assert len({len(c) for c in want.completion_ids}) > 2, "rows finished at different steps"
    assert graphed._graphs.num_replays == got.stats.num_steps > 0
    assert 1.0 < got.stats.mean_acceptance_length
    # 3 rows: the cache gets the 4-row bucket's slots, so every step still replays
    few = graphed.generate(prompts[:3], sp)
    assert few.completion_ids == base.generate(prompts[:3], sp).completion_ids
    assert graphed._graphs.num_replays == got.stats.num_steps + few.stats.num_steps


def test_graphs_dropped_together_are_followed_by_a_new_memory_pool(model):
    """CUDA's allocator refuses a capture into a pool whose graphs were all destroyed (the H200's ``use_count > 0``
    assert after the cost probe's fresh caches dropped an engine's graphs): each generation gets its own pool."""
    graphed, lean = _graphed(model), LeanForward(model, fuse=False)
    with torch.inference_mode():
        for gen, seed in enumerate((1, 2, 3), start=1):  # a new cache each time: every graph dropped
            cache = _prefilled(lean, model, 2, [4, 4], 32, seed=seed)
            graphed(_step(2, 1, seed), torch.tensor([4, 4]), cache, False, kv_len=5)
            graphed(_step(2, 2, seed), torch.tensor([5, 5]), cache, False, kv_len=7)
            assert graphed._pool.generations == gen and graphed.num_graphs == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_graphs_equal_the_eager_forward_and_keep_the_engine_lossless():
    """On a CUDA device (float64: exact comparisons): captured replays equal the eager lean forward, and an engine
    with graphs decodes what one without them decodes, speculating or not."""
    model = tiny_llama(vocab_size=VOCAB, num_heads=6, num_kv_heads=2, hidden_size=48, dtype=torch.float64, seed=3)
    model = model.cuda()
    lean = LeanForward(model, fuse=False)
    graphed = cg.GraphedForward(LeanForward(model, fuse=False), model)
    mc = model.config
    with torch.inference_mode():
        caches = [SlotKVCache(mc.num_hidden_layers, 4, 48, 2, 8, model.dtype, "cuda") for _ in range(2)]
        pre = _step(3, 6, 1).cuda()
        for c in caches:
            lean(pre, torch.zeros(3, dtype=torch.long, device="cuda"), c, False)
        ids, st = _step(3, 3, 2).cuda(), torch.tensor([6, 6, 6], device="cuda")
        want, _ = lean(ids, st, caches[0], False)
        got, _ = graphed(ids, st, caches[1], False, kv_len=9)
    assert graphed.failed is None and graphed.num_replays == 1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    sp = SamplingParams(temperature=0.0, max_new_tokens=16, ignore_eos=True)
    prompts = [[1, 5, 7], [2, 9, 11, 13], [6]]
    base = RolloutEngine(model, config=EngineConfig(cuda_graphs=False)).generate(prompts, sp)
    spec = RolloutEngine(
        model, speculators=[NoisyOracleSpeculator(model, noise=0.3)], config=EngineConfig(num_speculative_tokens=3)
    )
    out = spec.generate(prompts, sp)
    assert out.completion_ids == base.completion_ids and spec.captures_graphs and spec._graphs.num_replays > 0


def test_the_cost_table_of_an_engine_that_replays_graphs_is_cached_apart(model):
    """A cost table measured eagerly must not price graph replays (on an H200: 13-15 ms against 3-7 ms a step)."""
    engine = RolloutEngine(model, config=EngineConfig(num_speculative_tokens=0))
    eager_key = engine._cost_key()
    engine._graphs = cg.GraphedForward(engine._lean, model, graph_factory=RerunGraph)
    assert engine.captures_graphs and engine._cost_key() != eager_key
    engine._graphs.failed = "capture failed"  # eager again: the eager table applies
    assert not engine.captures_graphs and engine._cost_key() == eager_key


def test_past_the_graph_limit_the_least_recently_used_graph_goes(model, monkeypatch):
    """A long run meets more shapes than it keeps graphs for (key buckets x tokens per row x row buckets): the
    least recently used graph is dropped, never the shape in use, and every shape keeps replaying."""
    monkeypatch.setattr(cg, "MAX_GRAPHS", 2)
    graphed, lean = _graphed(model), LeanForward(model, fuse=False)
    with torch.inference_mode():
        cache = _prefilled(lean, model, 2, [4, 4], 64, seed=8)
        for q in (1, 2, 1, 3, 1):  # q=1 used again before q=3 comes: q=2 is the one dropped
            graphed(_step(2, q, q), torch.tensor([4, 4]), cache, False, kv_len=4 + q)
    assert [k[1] for k in graphed._graphs] == [3, 1] and graphed.num_captures == 3 and graphed.num_replays == 5
