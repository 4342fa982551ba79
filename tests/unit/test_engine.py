"""RolloutEngine: losslessness (greedy and sampling), exact logprobs, stops, batching, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from engine_helpers import BigramSpeculator, NoisyOracleSpeculator, teacher_forced_logprobs

from atlas_rl import SamplingParams
from atlas_rl.config import EngineConfig
from atlas_rl.controller import FixedController
from atlas_rl.models import tiny_llama
from atlas_rl.rollout import RolloutEngine

PROMPTS = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [30, 31, 32, 33, 34]]


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(vocab_size=64, dtype=torch.float64, seed=0)


def _greedy(n=24, **kw):
    return SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True, **kw)


def test_greedy_speculation_is_token_identical_float64(model64):
    sp = _greedy()
    base = RolloutEngine(model64).generate(PROMPTS, sp, num_generations=3)
    for spec, k in [
        (NoisyOracleSpeculator(model64, noise=0.3), 4),
        (BigramSpeculator(64, soft=False), 3),
        (BigramSpeculator(64, soft=True), 5),
    ]:
        eng = RolloutEngine(model64, speculators=[spec], config=EngineConfig(num_speculative_tokens=k))
        out = eng.generate(PROMPTS, sp, num_generations=3)
        assert out.completion_ids == base.completion_ids, spec.name
        assert out.stats.num_draft_tokens > 0
        if spec.name == "oracle":  # the oracle run really exercised ragged acceptance (rows and steps vary)
            assert 1.0 < out.stats.mean_acceptance_length < k + 1


def test_engine_k0_matches_hf_generate_greedy(model64):
    out = RolloutEngine(model64).generate(PROMPTS, _greedy(16))
    for p, c in zip(PROMPTS, out.completion_ids):
        ref = model64.generate(
            torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(p) :].tolist()
        assert c == ref


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_model_families_greedy_lossless(model_type):
    m = tiny_llama(vocab_size=64, dtype=torch.float64, seed=1, model_type=model_type)
    sp = _greedy(12)
    base = RolloutEngine(m).generate(PROMPTS, sp, num_generations=2)
    spec = NoisyOracleSpeculator(m, noise=0.25)
    out = RolloutEngine(m, speculators=[spec], config=EngineConfig(num_speculative_tokens=3)).generate(
        PROMPTS, sp, num_generations=2
    )
    assert out.completion_ids == base.completion_ids
    ref = m.generate(
        torch.tensor([PROMPTS[1]]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPTS[1]) :].tolist()
    assert base.completion_ids[2] == ref


@pytest.mark.parametrize(
    "sp",
    [
        SamplingParams(temperature=1.0, max_new_tokens=20, seed=3, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=10, top_p=0.9, max_new_tokens=20, seed=4, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=20, ignore_eos=True),
    ],
)
def test_logprobs_equal_teacher_forced_recompute_float64(model64, sp):
    for spec in (BigramSpeculator(64, soft=True), BigramSpeculator(64, soft=False)):
        eng = RolloutEngine(model64, speculators=[spec], config=EngineConfig(num_speculative_tokens=4))
        out = eng.generate(PROMPTS, sp, num_generations=2)
        for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
            assert len(lp) == len(c)
            ref = teacher_forced_logprobs(model64, p, c, sp)
            assert torch.allclose(torch.tensor(lp, dtype=torch.float64), ref, atol=1e-6, rtol=0)
            assert all(math.isfinite(x) for x in lp)


def test_logprobs_equal_teacher_forced_recompute_float32():
    m = tiny_llama(vocab_size=64, dtype=torch.float32, seed=2)
    sp = SamplingParams(temperature=1.0, max_new_tokens=20, seed=5, ignore_eos=True)
    eng = RolloutEngine(
        m, speculators=[BigramSpeculator(64, soft=False)], config=EngineConfig(num_speculative_tokens=4)
    )
    out = eng.generate(PROMPTS, sp, num_generations=2)
    for p, c, lp in zip(out.prompt_ids, out.completion_ids, out.logprobs):
        ref = teacher_forced_logprobs(m, p, c, sp).double()
        assert torch.allclose(torch.tensor(lp, dtype=torch.float64), ref, atol=1e-4, rtol=0)


def _exact_marginals(model, prompt: list[int], vocab: int, depth: int) -> list[torch.Tensor]:
    """Exact per-position token marginals of ancestral sampling at T=1 for the first ``depth`` positions,
    by enumerating every prefix (vocab ** (depth-1) sequences)."""
    marg = []
    with torch.no_grad():
        prefixes = torch.empty((1, 0), dtype=torch.long)
        weights = torch.ones(1, dtype=torch.float64)
        for _ in range(depth):
            ids = torch.cat([torch.tensor(prompt).expand(prefixes.shape[0], -1), prefixes], 1)
            probs = torch.softmax(model(ids).logits[:, -1].double(), -1)  # [num_prefixes, V]
            joint = weights[:, None] * probs
            marg.append(joint.sum(0))
            prefixes = torch.cat(
                [prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(prefixes.shape[0])[:, None]], 1
            )
            weights = joint.reshape(-1)
    return marg


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    n = counts.sum().item()
    expected = probs * n
    keep = expected >= 5  # pool categories with small expectation into one bin
    obs = torch.cat([counts[keep].double(), counts[~keep].double().sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


def test_sampling_marginals_match_target_with_and_without_speculation():
    """Per-position token marginals (positions 0..2) of 3000 samples, at T=1, match the exact marginals of the
    target (enumerated) by a chi-square test at alpha = 0.001, for k=0 and for speculation with soft and one-hot
    drafts. Fixed seeds. A sampler biased by 2% TV is caught at this size with a modest power; the strong
    statistical checks of the sampler itself are in test_rejection.py."""
    V = 16
    m = tiny_llama(vocab_size=V, dtype=torch.float64, seed=3)
    prompt = [1, 2, 3]
    exact = _exact_marginals(m, prompt, V, 3)
    sp = SamplingParams(temperature=1.0, max_new_tokens=3, seed=11, ignore_eos=True)
    n = 3000
    configs = {
        "k0": RolloutEngine(m),
        "soft": RolloutEngine(
            m, speculators=[BigramSpeculator(V, soft=True, scale=2.0)], config=EngineConfig(num_speculative_tokens=2)
        ),
        "onehot": RolloutEngine(
            m, speculators=[BigramSpeculator(V, soft=False, scale=2.0)], config=EngineConfig(num_speculative_tokens=2)
        ),
    }
    for name, eng in configs.items():
        out = eng.generate([prompt], sp, num_generations=n)
        comps = torch.tensor(out.completion_ids)  # [n, 3]
        if name != "k0":
            assert out.stats.num_accepted_tokens > 0
        for pos in range(3):
            counts = torch.bincount(comps[:, pos], minlength=V)
            assert _chi2_pvalue(counts, exact[pos]) > 1e-3, (name, pos)


def test_seeded_sampling_is_reproducible_and_independent_of_batching(model64):
    sp = SamplingParams(temperature=1.0, max_new_tokens=10, seed=7, ignore_eos=True)
    a = RolloutEngine(model64).generate(PROMPTS, sp, num_generations=2)
    b = RolloutEngine(model64, config=EngineConfig(max_rows=2)).generate(PROMPTS, sp, num_generations=2)
    assert a.completion_ids == b.completion_ids
    c = RolloutEngine(model64).generate(
        PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10, seed=8, ignore_eos=True), num_generations=2
    )
    assert c.completion_ids != a.completion_ids


def test_stop_token_inside_accepted_draft_truncates_exactly_there(model64):
    base = RolloutEngine(model64).generate(PROMPTS, _greedy(24), num_generations=1)
    # pick as stop token one that first appears at index >= 4 of row 1: rows must end right after it
    row1 = base.completion_ids[1]
    idx = next(j for j in range(4, len(row1)) if row1[j] not in row1[:j])
    stop = row1[idx]
    sp = SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=[stop], ignore_eos=True)
    eng = RolloutEngine(
        model64, speculators=[NoisyOracleSpeculator(model64, noise=0.0)], config=EngineConfig(num_speculative_tokens=6)
    )
    out = eng.generate(PROMPTS, sp)
    for full, got, reason in zip(base.completion_ids, out.completion_ids, out.finish_reasons):
        if stop in full:
            cut = full.index(stop) + 1
            assert got == full[:cut] and reason == "stop"
        else:
            assert got == full and reason == "length"
    # with perfect drafts of 6 tokens the stop at index >= 4 of row 1 sits inside an accepted draft
    assert out.stats.num_accepted_tokens > 0 and len(out.completion_ids[1]) == idx + 1


def test_eos_from_generation_config_stops_unless_ignored(model64):
    base = RolloutEngine(model64).generate(PROMPTS, _greedy(30))
    eos = base.completion_ids[0][3]
    eng = RolloutEngine(model64, eos_token_ids=[eos], speculators=[BigramSpeculator(64, soft=False)])
    out = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=30))
    assert out.completion_ids[0] == base.completion_ids[0][:4] and out.finish_reasons[0] == "stop"
    out2 = eng.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=30, ignore_eos=True))
    assert out2.completion_ids == base.completion_ids


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_max_new_tokens_never_exceeded(model64, k):
    for n in (1, 2, 5, 9):
        sp = SamplingParams(temperature=1.0, max_new_tokens=n, seed=n, ignore_eos=True)
        eng = RolloutEngine(
            model64, speculators=[BigramSpeculator(64, soft=True)], config=EngineConfig(num_speculative_tokens=k)
        )
        out = eng.generate(PROMPTS, sp, num_generations=2)
        assert all(len(c) == n for c in out.completion_ids)
        assert all(r == "length" for r in out.finish_reasons)


def test_context_end_finishes_with_length():
    m = tiny_llama(vocab_size=64, dtype=torch.float64, max_position_embeddings=32)
    out = RolloutEngine(m, speculators=[BigramSpeculator(64, soft=False)]).generate([[1] * 28], _greedy(50))
    assert len(out.completion_ids[0]) == 4 and out.finish_reasons == ["length"]


def test_group_prompt_is_prefilled_once(model64):
    eng = RolloutEngine(model64)
    out = eng.generate([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12]], _greedy(4), num_generations=8)
    assert len(out) == 16 and out.group_ids == [0] * 8 + [1] * 8
    assert out.stats.num_prefill_positions == 2 * 7  # two prompts (padded to 7), not 16 rows
    assert out.prompt_ids[3] == [1, 2, 3, 4, 5] and out.prompt_ids[8] == [6, 7, 8, 9, 10, 11, 12]


def test_batch_shrinks_as_rows_finish(model64):
    base = RolloutEngine(model64).generate(PROMPTS, _greedy(20))
    stop = base.completion_ids[0][2]
    out = RolloutEngine(model64).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=[stop], ignore_eos=True)
    )
    rows = [s.num_rows for s in out.stats.steps]
    assert rows[0] > rows[-1] and rows == sorted(rows, reverse=True)
    assert sum(rows) == sum(len(c) - 1 for c in out.completion_ids)  # k=0: one token per row-step


def test_kv_cache_is_not_reallocated(model64):
    eng = RolloutEngine(model64, speculators=[BigramSpeculator(64, soft=False)])
    eng.generate(PROMPTS, _greedy(16), num_generations=2)
    ptr = eng._cache.keys.data_ptr()
    seen = set()
    eng.add_capture_hook(lambda rec: seen.add(eng._cache.keys.data_ptr()))
    eng.generate(PROMPTS, _greedy(12), num_generations=2)
    assert seen == {ptr}


def test_capture_hook_hands_out_verified_positions(model64):
    records = []
    eng = RolloutEngine(
        model64, speculators=[NoisyOracleSpeculator(model64, noise=0.3)], config=EngineConfig(num_speculative_tokens=3)
    )
    eng.update_weights(version=5)
    h = eng.add_capture_hook(records.append)
    out = eng.generate(PROMPTS[:2], _greedy(10), num_generations=2)
    steps = [r for r in records if not r.is_prefill]
    assert records[0].is_prefill and steps
    hidden = model64.config.hidden_size
    for rec in steps:
        n, q = rec.input_ids.shape
        assert rec.policy_version == 5
        assert rec.hidden_states[-1].shape == (n, q, hidden) and rec.target_logits.shape == (n, q, 64)
        for i, row in enumerate(rec.row_ids):
            v = int(rec.num_valid[i])
            comp = out.completion_ids[row]
            start = int(rec.positions[i, 0]) - len(out.prompt_ids[row])  # index of the pending token in comp
            assert rec.next_ids[i, :v].tolist() == comp[start + 1 : start + 1 + v]
            assert rec.input_ids[i, 0].item() == comp[start]
    h.remove()
    n_before = len(records)
    eng.generate(PROMPTS[:1], _greedy(4))
    assert len(records) == n_before


def test_update_weights_bumps_version_and_loads(model64):
    m = tiny_llama(vocab_size=64, dtype=torch.float64, seed=0)
    other = tiny_llama(vocab_size=64, dtype=torch.float64, seed=9)
    eng = RolloutEngine(m)
    before = eng.generate(PROMPTS, _greedy(8)).completion_ids
    assert eng.update_weights(other.state_dict(), version=1) == 1 and eng.policy_version == 1
    after = eng.generate(PROMPTS, _greedy(8))
    assert after.policy_version == 1 and after.completion_ids != before
    assert after.completion_ids == RolloutEngine(other).generate(PROMPTS, _greedy(8)).completion_ids
    assert eng.update_weights() == 2  # in-place update: just the version
    with pytest.raises(ValueError, match="must increase"):
        eng.update_weights(version=2)
    with pytest.raises(ValueError, match="no parameter named"):
        eng.update_weights({"nope.weight": torch.zeros(1)}, version=3)
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights({"lm_head.weight": torch.zeros(3, 3)}, version=3)


def test_speculator_lifecycle_calls(model64):
    spec = BigramSpeculator(64, soft=False)
    out = RolloutEngine(model64, speculators=[spec]).generate(PROMPTS, _greedy(6), num_generations=2)
    assert sorted(spec.started) == [0, 1, 2, 3] and sorted(spec.stopped) == [0, 1, 2, 3]
    for r, comp in enumerate(out.completion_ids):
        assert spec.observed[r] == comp


def test_bad_input_errors(model64):
    eng = RolloutEngine(model64)
    empty = eng.generate([], _greedy(4), num_generations=3)
    assert len(empty) == 0 and empty.completion_ids == []
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        eng.generate([[1, 2], []], _greedy(4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([[1, 64]], _greedy(4))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.generate([[-1, 3]], _greedy(4))
    with pytest.raises(ValueError, match="context"):
        eng.generate([[1] * 600], _greedy(4))
    with pytest.raises(ValueError, match="num_generations"):
        eng.generate([[1, 2]], _greedy(4), num_generations=0)
    with pytest.raises(ValueError, match="not a string"):
        eng.generate("hello", _greedy(4))
    with pytest.raises(ValueError, match="SamplingParams"):
        eng.generate([[1, 2]], {"temperature": 0})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -3}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="gpt2"):
        RolloutEngine(m)


def test_fixed_controller_k0_is_plain_decoding(model64):
    spec = BigramSpeculator(64, soft=False)
    eng = RolloutEngine(model64, speculators=[spec], config=EngineConfig(num_speculative_tokens=4))
    out = eng.generate(PROMPTS, _greedy(8), controller=FixedController(0))
    assert out.stats.num_draft_tokens == 0 and out.stats.mean_acceptance_length == 1.0


class _HiddenRecorder:
    """A speculator that drafts nothing and records the target features the engine hands out."""

    name = "recorder"
    hidden_layers = (1, -1)

    def __init__(self):
        self.feats: dict[int, dict[int, list[torch.Tensor]]] = {}

    def start(self, group_id, prompt_ids, row_ids):
        pass

    def observe(self, row_id, emitted_ids):
        pass

    def stop(self, group_id):
        pass

    def propose(self, rows, max_tokens):
        return [None] * len(rows)

    def observe_hidden(self, row_ids, hidden_states, num_new):
        for i, r in enumerate(row_ids):
            for layer, h in hidden_states.items():
                self.feats.setdefault(r, {}).setdefault(layer, []).append(h[i, : num_new[i]].clone())


def test_hidden_state_speculators_get_every_committed_position(model64):
    rec = _HiddenRecorder()
    oracle = NoisyOracleSpeculator(model64, noise=0.3)
    eng = RolloutEngine(model64, speculators=[oracle, rec], config=EngineConfig(num_speculative_tokens=3))
    out = eng.generate(PROMPTS[:2], _greedy(12), num_generations=2)
    for r, (p, c) in enumerate(zip(out.prompt_ids, out.completion_ids)):
        with torch.no_grad():
            ref = model64.model(torch.tensor([p + c]), output_hidden_states=True).hidden_states
        for layer in (1, -1):
            got = torch.cat(rec.feats[r][layer], 0)  # positions 0 .. len(p)+len(c)-2 (the last token never ran)
            assert got.shape[0] == len(p) + len(c) - 1
            assert torch.allclose(got, ref[layer][0, : got.shape[0]], atol=1e-9)


def test_a_prefill_keeps_only_the_asked_layers_and_they_equal_hfs_hidden_states(model64):
    """The prefill reads the hidden states speculators ask for through hooks on those layers only (no
    ``output_hidden_states``: it keeps every layer's); each equals HF's entry of the same index: the embeddings
    (0), a layer's output (1 .. L-1), the final normed output (L or -1)."""
    eng = RolloutEngine(model64)
    L = len(model64.model.layers)
    layers = [0, 1, L // 2, L - 1, L, -1, -2]
    ids = torch.tensor([[3, 9, 4, 7, 1], [5, 2, 8, 8, 6]])
    n, q = ids.shape
    pos = torch.arange(q)[None].expand(n, q)

    def hooks():
        return [len(b._forward_hooks) + len(b._forward_pre_hooks) for b in model64.model.layers]

    outs = []
    for tapped in (False, True):  # transformers adds hooks of its own on its first output_hidden_states call
        cache = eng._ensure_cache(n, q)
        cache.set_uniform_step(0, n, 0, q)
        mask = eng._mask(torch.zeros(n, dtype=torch.long), q, q)
        before = hooks()
        if tapped:
            outs.append(eng._forward_tapped(ids, pos, mask, cache, layers))
        else:
            outs.append(eng._forward(ids, pos, mask, cache, True))
    (last_f, full), (last_t, taps) = outs
    assert torch.equal(last_t, last_f)
    assert sorted(taps) == sorted(set(layers))
    for layer in layers:
        assert torch.equal(taps[layer], full[layer]), layer
    assert hooks() == before  # the taps are removed (transformers keeps hooks of its own on the layers)


def test_best_of_controller_picks_the_more_confident_draft_and_stays_lossless(model64):
    from atlas_rl.controller import BestOfController

    good = NoisyOracleSpeculator(model64, noise=0.0)
    bad = BigramSpeculator(64, soft=False, name="bigram")
    # the oracle reports full confidence; the bigram chain a low one
    orig = bad.propose

    def low_conf(rows, k):
        ds = orig(rows, k)
        for d in ds:
            d.confidence = [0.1] * len(d)
        return ds

    bad.propose = low_conf
    eng = RolloutEngine(model64, speculators=[bad, good], controller=BestOfController(3))
    out = eng.generate(PROMPTS, _greedy(12), num_generations=2)
    base = RolloutEngine(model64).generate(PROMPTS, _greedy(12), num_generations=2)
    assert out.completion_ids == base.completion_ids
    assert out.stats.per_speculator["oracle"].num_drafts > 0 and out.stats.per_speculator["bigram"].num_drafts == 0


def _chunk_cost(lengths: list[int], chunks: list[tuple[int, int]], overhead: int) -> int:
    return sum((b - a) * max(lengths[a:b]) + overhead for a, b in chunks)


@pytest.mark.parametrize("seed", range(6))
def test_prefill_chunks_are_the_cheapest_cut_within_the_budget(seed):
    """Against brute force over every cut of up to 9 prompts: consecutive, complete, within the budget (a lone
    prompt may exceed it), and no cut pays less padding plus per-forward overhead."""
    import itertools

    from atlas_rl.rollout.engine import _prefill_chunks

    g = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(1, 40, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist())
    budget, overhead = 60, 7
    chunks = _prefill_chunks([[0] * n for n in lengths], budget, overhead)
    assert [a for a, _ in chunks][0] == 0 and chunks[-1][1] == len(lengths)
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(chunks, chunks[1:]))
    assert all(b - a == 1 or (b - a) * max(lengths[a:b]) <= budget for a, b in chunks)
    best = min(
        _chunk_cost(lengths, cut, overhead)
        for r in range(len(lengths))
        for inner in itertools.combinations(range(1, len(lengths)), r)
        for cut in [list(zip((0, *inner), (*inner, len(lengths))))]
        if all(b - a == 1 or (b - a) * max(lengths[a:b]) <= budget for a, b in cut)
    )
    assert _chunk_cost(lengths, chunks, overhead) == best


def test_prompts_of_mixed_lengths_in_any_order_give_the_same_rows(model64):
    """The wave prefills its groups by prompt length; each prompt's completions do not depend on where it stands."""
    prompts = [[1, 5, 7], [2, 9, 11, 13, 4, 8, 3, 17, 21], [6], [3, 3, 8, 1, 9]]
    sp = _greedy(12)
    out = RolloutEngine(model64).generate(prompts, sp, num_generations=2)
    rev = RolloutEngine(model64).generate(prompts[::-1], sp, num_generations=2)
    assert out.prompt_ids == [p for p in prompts for _ in range(2)]
    pairs = [out.completion_ids[i : i + 2] for i in range(0, 8, 2)]
    assert pairs == [rev.completion_ids[i : i + 2] for i in range(0, 8, 2)][::-1]
