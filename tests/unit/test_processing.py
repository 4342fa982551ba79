"""Tests of the sampling-parameter processing (temperature, top-k, top-p) and of inverse-CDF sampling."""

from __future__ import annotations

import math

import pytest
import torch

from atlas_rl.types import SamplingParams
from atlas_rl.verification import processed_logprobs, processed_probs, sample_inverse_cdf
from atlas_rl.verification import processing as processing_module

SAMPLINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.7, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.8, top_k=5, top_p=0.7),
    SamplingParams(temperature=1.2, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.05),
    SamplingParams(temperature=1.0, top_k=64, top_p=0.95),
]


def sampling_id(sampling: SamplingParams) -> str:
    return f"T{sampling.temperature}-k{sampling.top_k}-p{sampling.top_p}"


def naive_processed_logprobs(row: list[float], sampling: SamplingParams) -> list[float]:
    """Per-row reference in plain Python floats: temperature, top-k (ties kept), top-p (ties kept), log_softmax."""

    def log_softmax(x: list[float]) -> list[float]:
        m = max(x)
        lse = m + math.log(sum(math.exp(v - m) for v in x))
        return [v - lse for v in x]

    if sampling.temperature == 0:
        return log_softmax(row)
    x = [v / sampling.temperature for v in row]
    vocab = len(x)
    if 0 < sampling.top_k < vocab:
        kth = sorted(x, reverse=True)[sampling.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]
    if sampling.top_p < 1.0:
        probs = [math.exp(v) for v in log_softmax(x)]
        mass_before, smallest_kept = 0.0, math.inf
        for i in sorted(range(vocab), key=lambda i: -x[i]):
            if mass_before >= sampling.top_p:
                break
            smallest_kept = x[i]
            mass_before += probs[i]
        x = [v if v >= smallest_kept else -math.inf for v in x]
    return log_softmax(x)


def _assert_matches_naive(logits: torch.Tensor, sampling: SamplingParams) -> None:  # logits [rows, vocab]
    got = processed_logprobs(logits, sampling)
    for r in range(logits.shape[0]):
        want = torch.tensor(naive_processed_logprobs(logits[r].double().tolist(), sampling), dtype=torch.float64)
        assert torch.equal(torch.isinf(got[r]), torch.isinf(want)), (sampling, r, got[r], want)
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[r][finite].double(), want[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sampling", SAMPLINGS + [SamplingParams(temperature=0.0, top_k=2, top_p=0.5)], ids=sampling_id
)
def test_processed_logprobs_matches_naive_reference(sampling: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(0)
    for vocab in (1, 2, 7, 16, 300):
        logits = torch.randn(12, vocab, generator=gen) * 3
        _assert_matches_naive(logits, sampling)


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=sampling_id)
def test_processed_logprobs_matches_naive_reference_with_ties(sampling: SamplingParams) -> None:
    """Integer logits make exact ties at the top-k / top-p boundary: every tied token is kept."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randint(-2, 3, (40, 9), generator=gen).float()
    _assert_matches_naive(logits, sampling)


def test_top_k_ties_keep_every_tied_token() -> None:
    logits = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    lp = processed_logprobs(logits, SamplingParams(top_k=2))
    assert torch.isfinite(lp).tolist() == [[True, True, True, True, False]]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=sampling_id)
def test_processed_probs_normalised_and_filtered_are_zero(sampling: SamplingParams) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 50, generator=gen) * 2
    lp = processed_logprobs(logits, sampling)
    probs = processed_probs(logits, sampling)
    assert lp.shape == probs.shape == logits.shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
    assert torch.equal(probs == 0, lp == float("-inf"))
    assert not torch.isnan(lp).any()


@pytest.mark.parametrize("top_k", [1, 3, 10, 49])
def test_top_k_keeps_exactly_the_k_largest(top_k: int) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 50, generator=gen)  # continuous: no ties
    lp = processed_logprobs(logits, SamplingParams(temperature=0.9, top_k=top_k))
    kept = torch.isfinite(lp)
    assert (kept.sum(-1) == top_k).all()
    top_ids = logits.topk(top_k, dim=-1).indices
    assert kept.gather(-1, top_ids).all()
    # renormalised over the kept tokens: equal to log_softmax of the kept scaled logits
    want = torch.log_softmax((logits / 0.9).masked_fill(~kept, float("-inf")), dim=-1)
    torch.testing.assert_close(lp[kept], want[kept])


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("top_k", [0, 6])
def test_top_p_keeps_the_minimal_set_reaching_top_p(top_p: float, top_k: int) -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(30, 20, generator=gen) * 2
    sampling = SamplingParams(temperature=1.3, top_k=top_k, top_p=top_p)
    before_top_p = processed_probs(logits, SamplingParams(temperature=1.3, top_k=top_k)).double()  # [30, 20]
    kept = processed_probs(logits, sampling) > 0
    for r in range(logits.shape[0]):
        kept_mass = before_top_p[r][kept[r]]
        assert kept_mass.sum() >= top_p - 1e-6  # reaches top_p
        assert kept_mass.sum() - kept_mass.min() < top_p + 1e-6  # minimal: without its smallest it does not
        # it is a prefix of the sorted distribution: every kept token is at least as likely as every dropped one
        dropped = before_top_p[r][~kept[r]]
        if dropped.numel():
            assert kept_mass.min() >= dropped.max()


def test_top_p_always_keeps_the_top_token() -> None:
    logits = torch.tensor([[0.0, 0.1, 0.2, 5.0]])
    probs = processed_probs(logits, SamplingParams(top_p=1e-6))
    assert probs.tolist() == [[0.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_temperature_only_is_log_softmax_of_scaled_logits(temperature: float) -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 33, generator=gen)
    got = processed_logprobs(logits, SamplingParams(temperature=temperature))
    torch.testing.assert_close(got, torch.log_softmax(logits / temperature, dim=-1))


def test_greedy_is_plain_log_softmax_ignoring_top_k_top_p() -> None:
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 33, generator=gen, dtype=torch.float64)
    got = processed_logprobs(logits, SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    assert torch.equal(got, torch.log_softmax(logits, dim=-1))


@pytest.mark.parametrize(
    ("dtype", "want"),
    [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.float32),
     (torch.float64, torch.float64)],
)  # fmt: skip
def test_processed_logprobs_dtype_is_at_least_float32(dtype: torch.dtype, want: torch.dtype) -> None:
    logits = torch.randn(2, 10).to(dtype)
    for sampling in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_k=4, top_p=0.9)):
        out = processed_logprobs(logits, sampling)
        assert out.dtype == want
        # upcast first, then processed: same as processing the upcast logits
        torch.testing.assert_close(out, processed_logprobs(logits.to(want), sampling))


def test_hot_path_does_not_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the hot path must not sort")

    monkeypatch.setattr(torch, "sort", forbidden)
    monkeypatch.setattr(torch, "topk", forbidden)
    monkeypatch.setattr(torch, "argsort", forbidden)
    logits = torch.randn(3, 100)
    processed_logprobs(logits, SamplingParams(temperature=0.7))
    processed_logprobs(logits, SamplingParams(temperature=1.0, top_k=0, top_p=1.0))
    processed_logprobs(logits, SamplingParams(temperature=1.0, top_k=100))  # k >= vocab: no filtering


@pytest.mark.parametrize("prefix", [1, 3, 8])
def test_top_p_cpu_prefix_path_matches_full_sort(monkeypatch: pytest.MonkeyPatch, prefix: int) -> None:
    """On CPU, top-p alone first sorts only a prefix of each row; rows whose nucleus is longer are redone."""
    gen = torch.Generator().manual_seed(7)
    # peaked rows (the nucleus fits in the prefix) and flat rows (it does not), in one batch
    logits = torch.randn(2, 16, 32, generator=gen) * torch.linspace(0.1, 6.0, 16).unsqueeze(-1)
    sampling = SamplingParams(temperature=1.0, top_p=0.7)
    full = processed_logprobs(logits, sampling)  # 32 <= _TOP_P_PREFIX: full sort
    monkeypatch.setattr(processing_module, "_TOP_P_PREFIX", prefix)
    assert torch.equal(processed_logprobs(logits, sampling), full)
    _assert_matches_naive(logits.reshape(-1, 32), sampling)


def test_top_p_large_vocab_matches_naive_reference() -> None:
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(6, 1000, generator=gen) * torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0, 16.0]).unsqueeze(-1)
    _assert_matches_naive(logits, SamplingParams(temperature=1.0, top_p=0.9))
    _assert_matches_naive(logits, SamplingParams(temperature=0.7, top_k=300, top_p=0.9))


# ---------------------------------------------------------------------------------------------- inverse CDF


def test_sample_inverse_cdf_is_first_index_whose_cumsum_exceeds_u_times_total() -> None:
    gen = torch.Generator().manual_seed(9)
    weights = torch.rand(200, 7, generator=gen) * (torch.rand(200, 7, generator=gen) > 0.3)  # unnormalised, zeros
    weights[:, 0] += 1e-3  # no all-zero row
    uniforms = torch.rand(200, generator=gen, dtype=torch.float64)
    got = sample_inverse_cdf(weights, uniforms)
    assert got.dtype == torch.long and got.shape == (200,)
    for r in range(200):
        cum = torch.cumsum(weights[r].double(), 0)
        want = next(i for i in range(7) if cum[i] > uniforms[r] * cum[-1])
        assert int(got[r]) == want
        assert weights[r, want] > 0


def test_sample_inverse_cdf_never_picks_zero_probability_tokens() -> None:
    probs = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.75, 0.0, 0.0])
    edge_uniforms = torch.tensor([0.0, 1e-300, 0.25, 0.2500000001, 0.5, 1 - 2**-53, 0.9999999], dtype=torch.float64)
    got = sample_inverse_cdf(probs.expand(len(edge_uniforms), -1), edge_uniforms)
    assert set(got.tolist()) <= {1, 4}
    assert got[0] == 1 and got[-2] == 4


def test_sample_inverse_cdf_exact_frequencies_on_a_uniform_grid() -> None:
    """Deterministic: uniforms at the midpoints of a fine grid reproduce the probabilities exactly."""
    probs = torch.tensor([0.125, 0.0, 0.5, 0.375])
    m = 8000
    uniforms = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    counts = torch.bincount(sample_inverse_cdf(probs.expand(m, -1), uniforms), minlength=4)
    assert counts.tolist() == [1000, 0, 4000, 3000]


def test_sample_inverse_cdf_shapes() -> None:
    probs = torch.softmax(torch.randn(2, 3, 5), -1)
    assert sample_inverse_cdf(probs, torch.rand(2, 3, dtype=torch.float64)).shape == (2, 3)
    assert sample_inverse_cdf(probs[0, 0], torch.tensor(0.5, dtype=torch.float64)).shape == ()
    with pytest.raises(ValueError, match="uniforms of shape"):
        sample_inverse_cdf(probs, torch.rand(2, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------- out buffer


@pytest.mark.parametrize("sampling", SAMPLINGS + [SamplingParams(temperature=0.0)], ids=sampling_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_processed_logprobs_into_out_buffer_equals_fresh_result(sampling: SamplingParams, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10)
    logits = (torch.randn(3, 4, 300, generator=gen) * 2).to(dtype)
    logits_before = logits.clone()
    out = torch.full(logits.shape, float("nan"), dtype=torch.promote_types(dtype, torch.float32))
    got = processed_logprobs(logits, sampling, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, processed_logprobs(logits, sampling))
    assert torch.equal(logits, logits_before)  # never modified


def test_processed_logprobs_bad_out_raises() -> None:
    logits = torch.randn(2, 10)
    for bad in (torch.empty(2, 11), torch.empty(2, 10, dtype=torch.float64), torch.empty(20)):
        with pytest.raises(ValueError, match="out must be"):
            processed_logprobs(logits, SamplingParams(), out=bad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_in_place_log_softmax_is_bitwise_the_out_of_place_one(temperature: float) -> None:
    """The CPU path runs log_softmax in place on its own buffer; it must equal the out-of-place kernel exactly."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(64, 5000, generator=gen) * 4
    want = torch.log_softmax(logits / temperature, dim=-1)
    out = torch.empty_like(logits)
    assert torch.equal(processed_logprobs(logits, SamplingParams(temperature=temperature), out=out), want)
    assert torch.equal(processed_logprobs(logits, SamplingParams(temperature=temperature)), want)


def test_sample_inverse_cdf_into_a_buffer_is_the_same_draw() -> None:
    """The float64 cumsum written into ``cdf_out`` (cast on the fly) equals the cumsum of a float64 copy bit for bit,
    so the ids are the same; a buffer of the wrong dtype or shape is refused with an actionable error."""
    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(5, 3000, generator=gen) * 4, dim=-1)  # float32, [5, 3000]
    uniforms = torch.rand(5, generator=gen, dtype=torch.float64)
    buf = torch.empty(5, 3000, dtype=torch.float64)
    assert torch.equal(sample_inverse_cdf(probs, uniforms, cdf_out=buf), sample_inverse_cdf(probs, uniforms))
    assert torch.equal(buf, torch.cumsum(probs.to(torch.float64), dim=-1))
    with pytest.raises(ValueError, match="cdf_out must be a float64 tensor of shape"):
        sample_inverse_cdf(probs, uniforms, cdf_out=buf.float())
    with pytest.raises(ValueError, match="cdf_out must be a float64 tensor of shape"):
        sample_inverse_cdf(probs, uniforms, cdf_out=buf[:4])
