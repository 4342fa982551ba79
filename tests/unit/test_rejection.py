"""Tests of the batched rejection sampler: agreement with the reference, losslessness, edge cases.

Statistical tests use Pearson's chi-square goodness-of-fit test at significance level ALPHA = 0.001 each, with
fixed seeds (so they are deterministic: a failure is a real change, not bad luck). Sample size: for any alternative
at total-variation distance TV from the target, the noncentrality of the chi-square statistic is
``lambda = N * sum((alt - target)^2 / target) >= N * (2 TV)^2`` (Cauchy-Schwarz: ``(sum |d_i|)^2 <= sum d_i^2 /
target_i * sum target_i``). With N = 50,000 rows and TV = 2%, lambda >= 80; with at most 16 categories (15 degrees
of freedom) the critical value at ALPHA is 37.7 and the power is >= 0.9999 (``test_sample_size_has_power``), so a
2% bias is rejected with near certainty while a correct sampler fails each test with probability 0.001.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from scipy import stats

from atlas_rl.types import SamplingParams, VerifyResult
from atlas_rl.verification import (
    RejectionSampler,
    Verifier,
    draw_uniforms,
    processed_logprobs,
    processed_probs,
    reference_verify,
)
from atlas_rl.verification.rejection import PAD_ID

ALPHA = 1e-3  # significance level of every chi-square test in this file
NUM_ROWS = 50_000  # rows per losslessness case (see the module docstring for the power computation)
PLANTED_TV = 0.02

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")],
    ),
]


# ------------------------------------------------------------------------------------------------- helpers


def chisquare_pvalue(
    counts: torch.Tensor,  # [vocab] observed counts
    target_probs: torch.Tensor,  # [vocab] expected distribution
) -> float:
    """Pearson chi-square goodness-of-fit p-value of ``counts`` against ``target_probs``.

    Zero-probability categories are dropped (callers assert separately that they were never observed).
    Categories with an expected count < 5 are pooled into one bin (merged into the smallest other bin while the
    pool stays < 5), so the chi-square approximation holds.
    """
    target_probs = target_probs.double().cpu()
    counts = counts.double().cpu()
    assert counts[target_probs == 0].sum() == 0, "a zero-probability token was emitted"
    support = target_probs > 0
    observed = counts[support]
    expected = target_probs[support] / target_probs[support].sum() * counts.sum()
    small = expected < 5
    if small.any():
        pooled_obs, pooled_exp = observed[small].sum(), expected[small].sum()
        observed, expected = observed[~small], expected[~small]
        if pooled_exp >= 5 or observed.numel() == 0:
            observed = torch.cat([observed, pooled_obs.reshape(1)])
            expected = torch.cat([expected, pooled_exp.reshape(1)])
        else:
            smallest = int(expected.argmin())
            observed[smallest] += pooled_obs
            expected[smallest] += pooled_exp
    if observed.numel() < 2:
        return 1.0
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


@dataclass
class Case:
    draft_ids: torch.Tensor  # [n, K]
    draft_lens: torch.Tensor  # [n]
    draft_probs: torch.Tensor | None  # [n, K, vocab]
    target_logits: torch.Tensor  # [n, K+1, vocab]
    uniforms: torch.Tensor  # [n, K+1]


def random_case(
    gen: torch.Generator, n: int, num_draft: int, vocab: int, soft: bool, sampling: SamplingParams
) -> Case:
    """Random target logits, drafts that are sometimes right, ragged lengths, garbage past each draft length."""
    scale = float(torch.empty(1).uniform_(0.5, 4.0, generator=gen))
    target_logits = torch.randn(n, num_draft + 1, vocab, generator=gen) * scale
    draft_lens = torch.randint(0, num_draft + 1, (n,), generator=gen)
    if num_draft and n > 1:
        draft_lens[0], draft_lens[-1] = 0, num_draft  # always mix empty and full drafts
    draft_probs = None
    if soft:
        draft_logits = target_logits[:, :num_draft] + torch.randn(n, num_draft, vocab, generator=gen) * scale
        draft_probs = processed_probs(draft_logits, sampling if not sampling.greedy else SamplingParams())
        flat = draft_probs.reshape(-1, vocab)
        draft_ids = torch.multinomial(flat, 1, generator=gen).reshape(n, num_draft) if flat.numel() else None
    else:
        draft_ids = None
    if draft_ids is None or sampling.greedy:
        # one-hot (or greedy): the target's argmax 60% of the time, a random token otherwise
        argmax = target_logits[:, :num_draft].argmax(-1)
        random_ids = torch.randint(0, vocab, (n, num_draft), generator=gen)
        draft_ids = torch.where(torch.rand(n, num_draft, generator=gen) < 0.6, argmax, random_ids)
    # garbage past the draft lengths: must be ignored
    valid = torch.arange(num_draft) < draft_lens.unsqueeze(1)
    draft_ids = draft_ids.masked_fill(~valid, -7)
    if draft_probs is not None:
        draft_probs = torch.where(valid.unsqueeze(-1), draft_probs, torch.full_like(draft_probs, 3.0))
    generators = [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**31, (n,), generator=gen)]
    uniforms = draw_uniforms(generators, draft_lens.tolist(), num_draft, "cpu")
    uniforms = uniforms.masked_fill(torch.arange(num_draft + 1) > draft_lens.unsqueeze(1), float("nan"))
    return Case(draft_ids, draft_lens, draft_probs, target_logits, uniforms)


def verify_case(case: Case, sampling: SamplingParams, device: str = "cpu") -> VerifyResult:
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return RejectionSampler().verify(
        to(case.draft_ids),
        to(case.draft_lens),
        to(case.draft_probs),
        to(case.target_logits),
        sampling,
        to(case.uniforms),
    )


def assert_matches_reference(case: Case, sampling: SamplingParams, result: VerifyResult) -> None:
    n, num_draft = case.draft_ids.shape
    assert result.output_ids.shape == (n, num_draft + 1) and result.logprobs.shape == (n, num_draft + 1)
    target_logprobs = processed_logprobs(case.target_logits, sampling)  # [n, K+1, vocab]
    output_ids, logprobs, num_accepted = result.output_ids.cpu(), result.logprobs.cpu(), result.num_accepted.cpu()
    for i in range(n):
        d = int(case.draft_lens[i])
        tokens, accepted = reference_verify(
            case.draft_ids[i, :d].tolist(),
            None if case.draft_probs is None else case.draft_probs[i, :d],
            case.target_logits[i, : d + 1],
            sampling,
            case.uniforms[i, : d + 1],
        )
        assert int(num_accepted[i]) == accepted, (i, d, sampling)
        assert output_ids[i, : accepted + 1].tolist() == tokens, (i, d, sampling)
        assert (output_ids[i, accepted + 1 :] == PAD_ID).all()
        want_logprobs = target_logprobs[i, torch.arange(accepted + 1), torch.tensor(tokens)]
        torch.testing.assert_close(logprobs[i, : accepted + 1], want_logprobs, rtol=1e-5, atol=1e-5)
        assert (logprobs[i, accepted + 1 :] == 0).all()
        assert torch.isfinite(logprobs[i]).all()


SAMPLINGS = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.5, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.85),
    SamplingParams(temperature=1.0, top_k=1),
]


def sampling_id(sampling: SamplingParams) -> str:
    return f"T{sampling.temperature}-k{sampling.top_k}-p{sampling.top_p}"


# ------------------------------------------------------------------------------------ batched == reference


def test_rejection_sampler_implements_verifier_protocol() -> None:
    sampler: Verifier = RejectionSampler()
    assert callable(sampler.verify)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("soft", [False, True], ids=["one_hot", "soft"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=sampling_id)
def test_batched_matches_reference_on_same_uniforms(sampling: SamplingParams, soft: bool, device: str) -> None:
    gen = torch.Generator().manual_seed(2 * SAMPLINGS.index(sampling) + soft)
    for case_index in range(24):
        num_draft = (0, 1, 2, 4, 8)[case_index % 5]
        vocab = int(torch.randint(2, 17, (1,), generator=gen))
        n = int(torch.randint(1, 9, (1,), generator=gen))
        case = random_case(gen, n, num_draft, vocab, soft, sampling)
        assert_matches_reference(case, sampling, verify_case(case, sampling, device))


def test_batched_matches_reference_float64_and_bf16_logits() -> None:
    gen = torch.Generator().manual_seed(11)
    for dtype in (torch.float64, torch.bfloat16):
        for sampling in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, top_k=5, top_p=0.9)):
            for soft in (False, True):
                case = random_case(gen, 6, 4, 12, soft, sampling)
                case.target_logits = case.target_logits.to(dtype)
                result = verify_case(case, sampling)
                assert result.logprobs.dtype == torch.promote_types(dtype, torch.float32)
                assert_matches_reference(case, sampling, result)


def test_greedy_equals_plain_argmax_decoding() -> None:
    """Greedy is token-for-token the target's argmax chain: accepted drafts + the argmax at the first mismatch."""
    gen = torch.Generator().manual_seed(12)
    target_logits = torch.randn(5, 5, 9, generator=gen, dtype=torch.float64)
    argmax = target_logits.argmax(-1)  # [5, 5]
    draft_ids = argmax[:, :4].clone()
    draft_ids[1, 2] = (draft_ids[1, 2] + 1) % 9  # row 1: mismatch at position 2
    draft_ids[2, 0] = (draft_ids[2, 0] + 1) % 9  # row 2: mismatch at position 0
    draft_lens = torch.tensor([4, 4, 4, 0, 2])
    result = RejectionSampler().verify(draft_ids, draft_lens, None, target_logits, SamplingParams(temperature=0), None)
    assert result.num_accepted.tolist() == [4, 2, 0, 0, 2]
    for i, na in enumerate(result.num_accepted.tolist()):
        assert result.output_ids[i, : na + 1].tolist() == argmax[i, : na + 1].tolist()
    torch.testing.assert_close(
        result.logprobs[0], torch.log_softmax(target_logits[0], -1).gather(-1, argmax[0, :, None]).squeeze(-1)
    )


# ------------------------------------------------------------------------------------------- losslessness


@dataclass(frozen=True)
class LosslessCase:
    vocab: int
    num_draft: int
    draft: str  # "soft", "soft_equal" (draft == target), "one_hot_random", "one_hot_argmax", "one_hot_filtered"
    sampling: SamplingParams
    scale: float  # logit scale: small = flat, large = peaked

    def __str__(self) -> str:
        s = self.sampling
        return f"V{self.vocab}-K{self.num_draft}-{self.draft}-T{s.temperature}-k{s.top_k}-p{s.top_p}-x{self.scale}"


LOSSLESS_CASES = [
    LosslessCase(16, 4, "one_hot_random", SamplingParams(temperature=1.0), 2.0),
    LosslessCase(16, 8, "soft", SamplingParams(temperature=1.0), 2.0),
    LosslessCase(16, 2, "soft", SamplingParams(temperature=0.7, top_k=5), 1.5),
    LosslessCase(16, 1, "one_hot_random", SamplingParams(temperature=1.3, top_p=0.8), 2.0),
    LosslessCase(16, 4, "soft", SamplingParams(temperature=0.9, top_k=8, top_p=0.9), 1.0),
    LosslessCase(16, 0, "one_hot_random", SamplingParams(temperature=1.0, top_p=0.9), 2.0),  # plain decoding
    LosslessCase(5, 8, "soft", SamplingParams(temperature=1.0), 4.0),
    LosslessCase(2, 2, "one_hot_argmax", SamplingParams(temperature=1.0), 1.0),
    LosslessCase(16, 8, "one_hot_argmax", SamplingParams(temperature=0.5, top_k=3), 1.0),
    LosslessCase(12, 4, "soft", SamplingParams(temperature=1.0, top_k=4), 3.0),
    LosslessCase(16, 2, "one_hot_filtered", SamplingParams(temperature=1.0, top_k=4), 2.0),
    LosslessCase(16, 4, "soft_equal", SamplingParams(temperature=0.8, top_p=0.95), 0.5),
]


def run_lossless_case(
    spec: LosslessCase, seed: int, num_rows: int = NUM_ROWS
) -> tuple[VerifyResult, torch.Tensor, torch.Tensor]:
    """One batched call over ``num_rows`` independent rows sharing one target (and draft) distribution per
    position; returns (result, target_probs [K+1, vocab], draft_lens [num_rows])."""
    gen = torch.Generator().manual_seed(seed)
    k, vocab, sampling = spec.num_draft, spec.vocab, spec.sampling
    target_logits_1 = torch.randn(k + 1, vocab, generator=gen) * spec.scale  # [K+1, vocab]
    target_probs = processed_probs(target_logits_1, sampling)  # [K+1, vocab]
    draft_lens = torch.randint(0, k + 1, (num_rows,), generator=gen)  # ragged, independent of everything else
    draft_probs = None
    if spec.draft.startswith("soft"):
        if spec.draft == "soft_equal":
            draft_probs_1 = target_probs[:k]
        else:  # a different model: correlated with the target but not equal, processed the same way
            draft_logits_1 = 0.5 * target_logits_1[:k] + torch.randn(k, vocab, generator=gen) * spec.scale
            draft_probs_1 = processed_probs(draft_logits_1, sampling)  # [K, vocab]
        draft_ids = torch.stack(
            [torch.multinomial(draft_probs_1[j], num_rows, replacement=True, generator=gen) for j in range(k)], dim=1
        ).reshape(num_rows, k)  # x_j ~ draft_probs[j], independently per row
        draft_probs = draft_probs_1.expand(num_rows, k, vocab)
    elif spec.draft == "one_hot_random":  # a model-free guess independent of the uniforms
        draft_ids = torch.randint(0, vocab, (num_rows, k), generator=gen)
    elif spec.draft == "one_hot_argmax":
        draft_ids = target_probs[:k].argmax(-1).expand(num_rows, k)
    elif spec.draft == "one_hot_filtered":  # always a token the target cannot emit
        draft_ids = target_probs[:k].argmin(-1).expand(num_rows, k)
        assert (target_probs[:k].min(-1).values == 0).all()
    else:
        raise AssertionError(spec.draft)
    uniforms = torch.rand(num_rows, k + 1, generator=gen, dtype=torch.float64)
    result = RejectionSampler().verify(
        draft_ids, draft_lens, draft_probs, target_logits_1.expand(num_rows, k + 1, vocab), sampling, uniforms
    )
    return result, target_probs, draft_lens


def test_sample_size_has_power() -> None:
    """Any 2%-TV bias gives noncentrality >= N (2 TV)^2; the chi-square test at ALPHA then rejects w.p. >= 0.9999."""
    for df in (1, 4, 15):
        critical = stats.chi2.ppf(1 - ALPHA, df)
        power = stats.ncx2.sf(critical, df, NUM_ROWS * (2 * PLANTED_TV) ** 2)
        assert power >= 0.9999, (df, power)


@pytest.mark.parametrize("spec", LOSSLESS_CASES, ids=str)
def test_first_emitted_token_follows_target_distribution(spec: LosslessCase) -> None:
    """Chi-square goodness of fit at ALPHA = 0.001, N = 50,000 rows (power >= 0.9999 against a 2% TV bias)."""
    result, target_probs, _ = run_lossless_case(spec, seed=LOSSLESS_CASES.index(spec))
    first = result.output_ids[:, 0]
    counts = torch.bincount(first, minlength=spec.vocab)
    assert counts[target_probs[0] == 0].sum() == 0, "emitted a token of zero target probability"
    assert chisquare_pvalue(counts, target_probs[0]) > ALPHA
    if spec.draft == "one_hot_filtered":
        assert (result.num_accepted == 0).all()


@pytest.mark.parametrize(
    "spec",
    [
        LosslessCase(10, 3, "one_hot_argmax", SamplingParams(temperature=1.0), 3.0),
        LosslessCase(10, 3, "soft", SamplingParams(temperature=0.8, top_k=6), 1.0),
    ],
    ids=str,
)
def test_later_tokens_follow_target_distribution_given_accepted_prefix(spec: LosslessCase) -> None:
    """Token j, among rows whose first j tokens were accepted drafts, follows target_probs[j].

    Chi-square at ALPHA = 0.001 on every position with >= 10,000 such rows (there the test detects any bias of
    TV >= 4.5% with power >= 0.9999, by the bound of the module docstring; position 0 uses all 100,000 rows).
    """
    result, target_probs, draft_lens = run_lossless_case(spec, seed=100, num_rows=100_000)
    tested = 0
    for j in range(spec.num_draft + 1):
        rows = (result.num_accepted >= j) & (draft_lens >= j)
        if int(rows.sum()) < 10_000:
            continue
        counts = torch.bincount(result.output_ids[rows, j], minlength=spec.vocab)
        assert counts[target_probs[j] == 0].sum() == 0
        assert chisquare_pvalue(counts, target_probs[j]) > ALPHA, j
        tested += 1
    assert tested >= 2


# ------------------------------------------------------------------------------------- negative controls


@pytest.mark.parametrize("spec", [LOSSLESS_CASES[i] for i in (1, 4, 7, 8)], ids=str)
def test_chisquare_check_rejects_planted_2pct_bias(spec: LosslessCase) -> None:
    """The check must fail on a sampler that is 2% (TV) off: the real output with 2% of the mass moved from the
    most to the second most probable token (the hardest direction: lambda = N 0.02^2 (1/p_a + 1/p_b) is smallest
    there). Rejected at ALPHA = 0.001."""
    result, target_probs, _ = run_lossless_case(spec, seed=LOSSLESS_CASES.index(spec))
    first = result.output_ids[:, 0].clone()
    top2 = target_probs[0].topk(2).indices
    a, b = int(top2[0]), int(top2[1])
    gen = torch.Generator().manual_seed(7)
    move = (first == a) & (torch.rand(first.shape, generator=gen) < PLANTED_TV / float(target_probs[0, a]))
    first[move] = b
    counts = torch.bincount(first, minlength=spec.vocab)
    assert chisquare_pvalue(counts, target_probs[0]) < ALPHA


def test_chisquare_check_rejects_sampler_that_recovers_from_target_instead_of_residual() -> None:
    """The classic bug (after a rejection, resample from target_probs, not the residual) is detected at ALPHA."""
    gen = torch.Generator().manual_seed(3)
    target_probs = torch.softmax(torch.randn(8, generator=gen) * 1.5, -1)
    # one-hot drafts of the most likely token (with uniformly random one-hot drafts this bug happens to be unbiased)
    draft_ids = target_probs.argmax().expand(NUM_ROWS)
    uniforms = torch.rand(NUM_ROWS, 2, generator=gen, dtype=torch.float64)
    accepted = uniforms[:, 0] < target_probs[draft_ids]
    resampled = torch.multinomial(target_probs, NUM_ROWS, replacement=True, generator=gen)  # wrong distribution
    first = torch.where(accepted, draft_ids, resampled)
    assert chisquare_pvalue(torch.bincount(first, minlength=8), target_probs) < ALPHA


# --------------------------------------------------------------------------------------------- edge cases


def test_k0_is_plain_decoding_from_position_0() -> None:
    gen = torch.Generator().manual_seed(20)
    target_logits = torch.randn(6, 1, 11, generator=gen)
    empty_ids, zero_lens = torch.empty(6, 0, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    uniforms = torch.rand(6, 1, generator=gen, dtype=torch.float64)
    for sampling in (SamplingParams(temperature=0.9, top_k=4), SamplingParams(temperature=0.0)):
        result = RejectionSampler().verify(empty_ids, zero_lens, None, target_logits, sampling, uniforms)
        assert result.num_accepted.tolist() == [0] * 6
        assert result.output_ids.shape == (6, 1)
        if sampling.greedy:
            want = target_logits[:, 0].argmax(-1)
        else:
            cdf = processed_probs(target_logits[:, 0], sampling).double().cumsum(-1)
            want = (cdf <= uniforms * cdf[:, -1:]).sum(-1)  # first index with cdf > u * total
        assert result.output_ids[:, 0].tolist() == want.tolist()
        # soft drafts of length 0 too
        result_soft = RejectionSampler().verify(
            empty_ids, zero_lens, torch.empty(6, 0, 11), target_logits, sampling, uniforms
        )
        assert torch.equal(result_soft.output_ids, result.output_ids)


def test_empty_drafts_mixed_with_long_drafts() -> None:
    """Row 0 (d=0) samples its bonus from position 0 with uniforms[0, 0]; row 1 (d=8) accepts its sure drafts."""
    vocab, k = 6, 8
    target_logits = torch.full((2, k + 1, vocab), -30.0)
    target_logits[1, :, 2] = 30.0  # row 1: token 2 has probability ~1 everywhere
    target_logits[0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    draft_ids = torch.tensor([[-1] * k, [2] * k])
    draft_lens = torch.tensor([0, k])
    uniforms = torch.zeros(2, k + 1, dtype=torch.float64)
    uniforms[0, 0] = 0.999  # last token of row 0's position-0 distribution
    uniforms[0, 1:] = float("nan")  # never read
    uniforms[1] = 0.5
    sampling = SamplingParams(temperature=1.0)
    result = RejectionSampler().verify(draft_ids, draft_lens, None, target_logits, sampling, uniforms)
    assert result.num_accepted.tolist() == [0, k]
    assert result.output_ids[0].tolist() == [5] + [PAD_ID] * k
    assert result.output_ids[1].tolist() == [2] * (k + 1)
    assert (result.logprobs[0, 1:] == 0).all()


@pytest.mark.parametrize("soft", [False, True])
def test_draft_token_with_zero_target_prob_is_never_accepted(soft: bool) -> None:
    """Even with u = 0 (the most lenient accept test: 0 * draft_probs < target_probs) and draft_probs ~ 0."""
    vocab = 5
    target_logits = torch.tensor([[[4.0, 3.0, 0.0, -1.0, -2.0]] * 3]).expand(4, 3, vocab)
    sampling = SamplingParams(temperature=1.0, top_k=2)  # tokens 2, 3, 4 have target_probs 0
    draft_ids = torch.tensor([[2, 0], [3, 3], [0, 4], [4, 1]])
    draft_probs = None
    if soft:
        draft_probs = torch.full((4, 2, vocab), 1e-30)
        draft_probs[:, :, 2:] = 1.0 / 3
    uniforms = torch.zeros(4, 3, dtype=torch.float64)
    result = RejectionSampler().verify(draft_ids, torch.full((4,), 2), draft_probs, target_logits, sampling, uniforms)
    assert result.num_accepted.tolist() == [0, 0, 1, 0]
    emitted = [result.output_ids[i, : int(na) + 1].tolist() for i, na in enumerate(result.num_accepted)]
    assert all(t in (0, 1) for row in emitted for t in row)


def test_draft_probs_equal_to_target_probs_always_accept() -> None:
    """draft_probs == target_probs: ratio 1, accepted for every u < 1."""
    gen = torch.Generator().manual_seed(21)
    sampling = SamplingParams(temperature=0.7, top_p=0.9)
    target_logits = torch.randn(8, 4, 10, generator=gen)
    draft_probs = processed_probs(target_logits[:, :3], sampling)
    draft_ids = torch.multinomial(draft_probs.reshape(-1, 10), 1, generator=gen).reshape(8, 3)
    uniforms = torch.full((8, 4), 1 - 2**-40, dtype=torch.float64)
    result = RejectionSampler().verify(draft_ids, torch.full((8,), 3), draft_probs, target_logits, sampling, uniforms)
    assert result.num_accepted.tolist() == [3] * 8


def test_zero_draft_prob_of_drafted_token_accepts_when_target_allows() -> None:
    """draft_probs[j, x_j] = 0 (ratio infinite): accepted iff target_probs[j, x_j] > 0, as min(1, inf) = 1."""
    target_logits = torch.zeros(1, 2, 4)
    draft_probs = torch.tensor([[[0.0, 0.5, 0.5, 0.0]]])
    uniforms = torch.tensor([[0.99, 0.3]], dtype=torch.float64)
    result = RejectionSampler().verify(
        torch.tensor([[0]]), torch.tensor([1]), draft_probs, target_logits, SamplingParams(), uniforms
    )
    assert result.num_accepted.tolist() == [1]


def test_all_zero_residual_falls_back_to_target_probs() -> None:
    """Unnormalised draft_probs = 2 target_probs: rejected iff u >= 0.5, and the residual max(t - 2t, 0) is all
    zero, so the recovered token is sampled from target_probs (same as the reference)."""
    gen = torch.Generator().manual_seed(22)
    sampling = SamplingParams(temperature=1.0)
    target_logits = torch.randn(4, 2, 6, generator=gen)
    draft_probs = 2 * processed_probs(target_logits[:, :1], sampling)
    draft_ids = torch.tensor([[1], [2], [3], [4]])
    uniforms = torch.tensor([[0.9, 0.1], [0.2, 0.5], [0.7, 0.99], [0.5, 0.0]], dtype=torch.float64)
    case = Case(draft_ids, torch.ones(4, dtype=torch.long), draft_probs, target_logits, uniforms)
    result = verify_case(case, sampling)
    assert result.num_accepted.tolist() == [0, 1, 0, 0]
    assert_matches_reference(case, sampling, result)
    assert result.output_ids[0, 0] == sample_from_target(target_logits[0, 0], sampling, 0.1)


def sample_from_target(logits: torch.Tensor, sampling: SamplingParams, u: float) -> int:  # logits [vocab]
    cdf = processed_probs(logits, sampling).double().cumsum(-1)
    return int((cdf <= u * cdf[-1]).sum())


def test_recovered_token_uses_last_uniform_whatever_the_rejection_position() -> None:
    """Row with d = 3 rejected at position 0: the recovered token is drawn with uniforms[3], not uniforms[1]."""
    target_logits = torch.zeros(1, 4, 4)
    draft_ids = torch.tensor([[0, 0, 0]])
    uniforms = torch.tensor([[0.9, 0.05, 0.05, 0.99]], dtype=torch.float64)  # reject x_0 (target prob 1/4)
    result = RejectionSampler().verify(draft_ids, torch.tensor([3]), None, target_logits, SamplingParams(), uniforms)
    assert result.num_accepted.tolist() == [0]
    assert result.output_ids[0].tolist() == [3, PAD_ID, PAD_ID, PAD_ID]  # residual {1, 2, 3}; u = 0.99 -> 3


def test_greedy_ignores_uniforms() -> None:
    gen = torch.Generator().manual_seed(23)
    case = random_case(gen, 7, 4, 9, False, SamplingParams(temperature=0.0))
    greedy = SamplingParams(temperature=0.0)
    with_uniforms = verify_case(case, greedy)
    case.uniforms = None  # type: ignore[assignment]
    without = verify_case(case, greedy)
    assert torch.equal(with_uniforms.output_ids, without.output_ids)
    assert torch.equal(with_uniforms.num_accepted, without.num_accepted)
    assert torch.equal(with_uniforms.logprobs, without.logprobs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "sampling", [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=3)], ids=sampling_id
)
def test_output_dtypes_and_devices(sampling: SamplingParams, device: str) -> None:
    gen = torch.Generator().manual_seed(24)
    case = random_case(gen, 5, 3, 8, True, sampling)
    result = verify_case(case, sampling, device)
    assert result.num_accepted.dtype == torch.long and result.num_accepted.shape == (5,)
    assert result.output_ids.dtype == torch.long and result.output_ids.shape == (5, 4)
    assert result.logprobs.dtype == torch.float32 and result.logprobs.shape == (5, 4)
    for t in (result.num_accepted, result.output_ids, result.logprobs):
        assert t.device.type == device


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9),
        SamplingParams(temperature=1.0, top_p=0.9),
    ],
    ids=sampling_id,
)
@pytest.mark.parametrize("soft", [False, True], ids=["one_hot", "soft"])
def test_verify_runs_on_meta_tensors_without_host_sync(sampling: SamplingParams, soft: bool) -> None:
    """Meta tensors have no data: any .item()/bool()/tolist() would raise. Passing shows the non-CPU code path
    is device-agnostic and never syncs with the host (the uniforms may come from the CPU)."""
    n, k, vocab = 4, 3, 300
    result = RejectionSampler().verify(
        torch.zeros(n, k, dtype=torch.long, device="meta"),
        torch.zeros(n, dtype=torch.long, device="meta"),
        torch.empty(n, k, vocab, device="meta") if soft else None,
        torch.empty(n, k + 1, vocab, device="meta"),
        sampling,
        torch.rand(n, k + 1, dtype=torch.float64),
    )
    assert result.output_ids.device.type == "meta" and result.output_ids.shape == (n, k + 1)
    assert result.logprobs.dtype == torch.float32 and result.num_accepted.dtype == torch.long


def test_int32_draft_tensors_are_accepted() -> None:
    gen = torch.Generator().manual_seed(25)
    sampling = SamplingParams(temperature=1.0)
    case = random_case(gen, 4, 2, 7, False, sampling)
    want = verify_case(case, sampling)
    case.draft_ids, case.draft_lens = case.draft_ids.int(), case.draft_lens.int()
    got = verify_case(case, sampling)
    assert torch.equal(got.output_ids, want.output_ids)


def test_bad_shapes_raise_value_error() -> None:
    n, k, vocab = 3, 2, 5
    ids, lens = torch.zeros(n, k, dtype=torch.long), torch.full((n,), k)
    logits, uniforms = torch.zeros(n, k + 1, vocab), torch.zeros(n, k + 1, dtype=torch.float64)
    sampler, sampling = RejectionSampler(), SamplingParams()
    bad_calls = {
        "target_logits must be": (ids, lens, None, logits[0], sampling, uniforms),
        "draft_ids must be": (ids[:, :1], lens, None, logits, sampling, uniforms),
        "draft_ids must be an integer": (ids.float(), lens, None, logits, sampling, uniforms),
        "draft_lens must be": (ids, lens[:2], None, logits, sampling, uniforms),
        "draft_probs must be": (ids, lens, torch.zeros(n, k, vocab + 1), logits, sampling, uniforms),
        "uniforms .* required": (ids, lens, None, logits, sampling, None),
        "uniforms must be": (ids, lens, None, logits, sampling, uniforms[:, :k]),
        "draft_lens must lie": (ids, torch.full((n,), k + 1), None, logits, sampling, uniforms),
        "draft_ids at valid positions": (ids + vocab, lens, None, logits, sampling, uniforms),
        "target_logits must be floating": (ids, lens, None, logits.long(), sampling, uniforms),
    }
    for message, args in bad_calls.items():
        with pytest.raises(ValueError, match=message):
            sampler.verify(*args)


def test_reused_cpu_buffer_changes_nothing() -> None:
    """One sampler over calls of different shapes and dtypes (soft and one-hot drafts, plain decoding, T = 1 and
    filtered sampling) == a sampler that allocates every time; earlier results are not overwritten by later calls
    (nothing returned aliases the reused buffers)."""
    gen = torch.Generator().manual_seed(26)
    reused, fresh = RejectionSampler(), RejectionSampler(reuse_cpu_buffer=False)
    kept: list[tuple[VerifyResult, VerifyResult]] = []
    cells = [(6, 4, 30, torch.float32), (9, 8, 40, torch.float32), (3, 2, 20, torch.float64)]
    cells.append((7, 0, 30, torch.float32))
    samplings = (SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5, top_p=0.9))
    for n, k, vocab, dtype in cells:  # k = 0: plain decoding, the sampled rows' distributions and cumsums reused
        for sampling, soft in [(s, True) for s in samplings] + [(SamplingParams(temperature=1.0), False)]:
            case = random_case(gen, n, k, vocab, soft, sampling)
            case.target_logits = case.target_logits.to(dtype)
            args = (case.draft_ids, case.draft_lens, case.draft_probs, case.target_logits, sampling, case.uniforms)
            kept.append((reused.verify(*args), fresh.verify(*args)))
    for a, b in kept:
        assert torch.equal(a.output_ids, b.output_ids) and torch.equal(a.num_accepted, b.num_accepted)
        assert torch.equal(a.logprobs, b.logprobs)


# ------------------------------------------------------------------------------------------- draw_uniforms


def test_draw_uniforms_rows_are_independent_of_the_batch() -> None:
    def gens(*seeds: int | None) -> list[torch.Generator | None]:
        return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]

    alone = draw_uniforms(gens(5), [3], 3, "cpu")
    in_batch = draw_uniforms(gens(1, 5, 2), [8, 3, 0], 8, "cpu")
    assert in_batch.shape == (3, 9) and in_batch.dtype == torch.float64
    assert torch.equal(in_batch[1, :4], alone[0])
    assert (in_batch[1, 4:] == 0).all() and (in_batch[2, 1:] == 0).all()
    assert ((in_batch[0] >= 0) & (in_batch[0] < 1)).all()
    # the row draws exactly d + 1 numbers: its generator continues where d + 1 draws leave it
    g = torch.Generator().manual_seed(5)
    torch.rand(4, generator=g, dtype=torch.float64)
    g_used = gens(5)
    draw_uniforms(g_used, [3], 6, "cpu")
    assert torch.equal(
        torch.rand(2, generator=g_used[0], dtype=torch.float64), torch.rand(2, generator=g, dtype=torch.float64)
    )
    # None: the global RNG
    torch.manual_seed(0)
    first = draw_uniforms([None, None], [1, 2], 2, "cpu")
    torch.manual_seed(0)
    assert torch.equal(first, draw_uniforms([None, None], [1, 2], 2, "cpu"))
    assert draw_uniforms(gens(1), [0], 0, "cpu", dtype=torch.float32).dtype == torch.float32


def test_draw_uniforms_errors() -> None:
    with pytest.raises(ValueError, match="generators"):
        draw_uniforms([None], [1, 2], 2, "cpu")
    with pytest.raises(ValueError, match="outside"):
        draw_uniforms([None], [3], 2, "cpu")
