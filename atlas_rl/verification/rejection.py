"""Batched, vectorised rejection sampler: the production ``Verifier``.

Same maths and same use of the uniforms as ``reference_verify`` (its test oracle), for a whole batch of rows
with ragged draft lengths at once, in torch ops only (no Python loop over rows or positions, no host sync), so
it runs unchanged on CUDA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from atlas_rl.types import SamplingParams, VerifyResult
from atlas_rl.verification.processing import is_unprocessed, processed_logprobs, sample_inverse_cdf

__all__ = ["PAD_ID", "RejectionSampler", "draw_uniforms"]

PAD_ID = -1
"""Value of ``VerifyResult.output_ids`` past a row's ``num_accepted + 1`` emitted tokens."""


class RejectionSampler:
    """Lossless verification of drafts against the target (Leviathan et al. 2023, Chen et al. 2023).

    Row i carries ``d_i = draft_lens[i]`` draft tokens ``x_0 .. x_{d_i-1}`` (``draft_ids[i, :d_i]``, padding after),
    drawn from ``draft_probs[i, j]`` (None: one-hot drafts, ``draft_probs = onehot(x_j)``), and the target's raw
    logits at the ``K + 1`` verified positions. ``target_probs = processed_probs(target_logits, sampling)``.

    Sampling (T > 0): draft token j is *accepted* iff ``uniforms[i, j] * draft_probs[j, x_j] < target_probs[j, x_j]``
    (probability ``min(1, target_probs / draft_probs)``), for j = 0, 1, ... until the first rejection. At the first
    rejection, position j, one *recovered* token is drawn from the residual
    ``norm(max(target_probs[j] - draft_probs[j], 0))`` (one-hot drafts: ``target_probs[j]`` with ``x_j`` zeroed;
    an all-zero residual falls back to ``target_probs[j]``); if all ``d_i`` drafts are accepted, one *bonus* token is
    drawn from ``target_probs[d_i]``. Either way the draw is ``sample_inverse_cdf(distribution, uniforms[i, d_i])``:
    row i uses ``uniforms[i, :d_i]`` for the accept tests and ``uniforms[i, d_i]`` for its one sample, wherever the
    rejection happened. Every emitted token is then distributed exactly as the target's processed distribution.

    Greedy (T = 0): drafts are accepted while they equal ``argmax(target_logits)``; the recovered/bonus token is
    the argmax at the first mismatch / at position ``d_i``. ``uniforms`` are ignored (may be None).

    Output: ``num_accepted[i]`` (long), ``output_ids[i, :num_accepted[i] + 1]`` = accepted drafts then the
    recovered/bonus token, ``PAD_ID`` (-1) after; ``logprobs[i, j] = processed_logprobs(target_logits)[i, j,
    output_ids[i, j]]`` for emitted tokens, 0 after (float32, or float64 for float64 logits). ``K = 0`` is plain
    decoding: one bonus token per row sampled from position 0.

    Cost (greedy): an argmax and one ``log_softmax`` pass (into a reused buffer on CPU), gathered at the argmax.
    Cost (sampling): one ``processed_logprobs`` pass over ``target_logits`` (the only ``[n, K+1, vocab]`` tensor
    made), then O(n * vocab) work for the single sample of each row (its distribution is gathered first; cumsum +
    searchsorted, no sort). The random path never syncs with the host (top-p without top-k checks a CPU tensor on
    CPU only).

    Preconditions: ``0 <= d_i <= K`` and draft ids in ``[0, vocab)`` at valid positions (values after ``d_i`` are
    ignored). Shapes are always checked; these values only for CPU tensors (checking CUDA tensors would sync).
    ``draft_ids``, ``draft_lens`` and ``uniforms`` are moved to the logits' device; ``draft_probs`` must be there.
    """

    def __init__(self, reuse_cpu_buffer: bool = True) -> None:
        """``reuse_cpu_buffer``: keep the large per-call tensors of CPU calls between calls: the ``[n, K+1, vocab]``
        processed logprobs and, when sampling, the ``[n, vocab]`` distributions sampled from and their float64
        cumulative sums (a fresh allocation of that size costs page faults, about as much as the computation itself:
        at 64 sampled rows ~37 ms of a ~360 ms step while glibc served them by mmap). The buffers never escape into
        a result, but an instance must then not verify from two threads at once."""
        self.reuse_cpu_buffer = reuse_cpu_buffer
        self._cpu_buffers: dict[str, torch.Tensor] = {}  # role -> flat buffer, grown on demand
        # [n, K+1, vocab] log_softmax(target_logits) of the last call when its processing was none (greedy, or T = 1
        # unfiltered: the T = 1 distribution), else None; valid until the next call (it may live in the buffer)
        self.last_raw_logprobs: torch.Tensor | None = None

    def _workspace(self, logits: torch.Tensor) -> torch.Tensor | None:  # logits [n, K+1, vocab]
        """A reusable [n, K+1, vocab] buffer of the compute dtype for CPU logits, else None (allocate per call)."""
        return self._scratch("logprobs", logits.shape, torch.promote_types(logits.dtype, torch.float32), logits.device)

    def _scratch(
        self, role: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor | None:  # -> [*shape] view of the role's buffer
        """The reusable buffer of ``role`` viewed as ``shape`` on a CPU call, else None (allocate per call)."""
        if not self.reuse_cpu_buffer or device.type != "cpu":
            return None
        numel = math.prod(shape)
        buf = self._cpu_buffers.get(role)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self._cpu_buffers.pop(role, None)  # free the old one first
            buf = self._cpu_buffers[role] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(*shape)

    def _logprobs(self, target_logits: torch.Tensor, sampling: SamplingParams) -> torch.Tensor:
        """``processed_logprobs`` of ``target_logits [n, K+1, vocab]`` (into the reused buffer on CPU), remembered
        as :attr:`last_raw_logprobs` when it is the plain ``log_softmax`` (a capture hook's T = 1 labels need it)."""
        out = processed_logprobs(target_logits, sampling, out=self._workspace(target_logits))
        if is_unprocessed(sampling, target_logits.shape[-1]):
            self.last_raw_logprobs = out
        return out

    def verify(
        self,
        draft_ids: torch.Tensor,  # [n, K] long, row i valid up to draft_lens[i]
        draft_lens: torch.Tensor,  # [n] long
        draft_probs: torch.Tensor | None,  # [n, K, vocab] processed draft distributions, or None = one-hot drafts
        target_logits: torch.Tensor,  # [n, K+1, vocab] raw target logits at the verified positions
        sampling: SamplingParams,
        uniforms: torch.Tensor | None,  # [n, K+1] in [0, 1): row i uses [:d_i] for accept tests, [d_i] to sample
    ) -> VerifyResult:
        _check_inputs(draft_ids, draft_lens, draft_probs, target_logits, sampling, uniforms)
        self.last_raw_logprobs = None
        device = target_logits.device
        num_draft = draft_ids.shape[1]  # K
        draft_ids = draft_ids.to(device=device, dtype=torch.long)
        draft_lens = draft_lens.to(device=device, dtype=torch.long)
        valid = torch.arange(num_draft, device=device) < draft_lens.unsqueeze(1)  # [n, K]
        safe_draft_ids = draft_ids.masked_fill(~valid, 0)  # [n, K] padding -> a gatherable id
        if sampling.greedy:
            num_accepted, output_ids, logprobs = self._verify_greedy(safe_draft_ids, valid, target_logits, sampling)
        else:
            assert uniforms is not None  # checked above
            num_accepted, output_ids, logprobs = self._verify_sampled(
                safe_draft_ids, valid, draft_lens, draft_probs, target_logits, sampling, uniforms.to(device)
            )
        emitted = torch.arange(num_draft + 1, device=device) <= num_accepted.unsqueeze(1)  # [n, K+1]
        return VerifyResult(
            num_accepted=num_accepted,
            output_ids=output_ids.masked_fill(~emitted, PAD_ID),
            logprobs=logprobs.masked_fill(~emitted, 0.0),
        )

    def _verify_greedy(
        self,
        safe_draft_ids: torch.Tensor,  # [n, K]
        valid: torch.Tensor,  # [n, K] bool
        target_logits: torch.Tensor,  # [n, K+1, vocab]
        sampling: SamplingParams,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [n], [n, K+1], [n, K+1]
        """Drafts accepted while they equal the argmax; the recovered/bonus token is the argmax at num_accepted.

        The logprobs come from one fused ``log_softmax`` into the reused buffer, then a gather at the argmax:
        measured faster than ``-log(sum(exp(x - max)))`` at the argmax alone, which costs 1.2-4x more on the
        column-major logits of the engine's CPU LM head (``docs/results/step_overhead.md``)."""
        target_argmax = target_logits.argmax(dim=-1)  # [n, K+1]
        accepted = (safe_draft_ids == target_argmax[:, : safe_draft_ids.shape[1]]) & valid  # [n, K]
        target_logprobs = self._logprobs(target_logits, sampling)
        logprobs = target_logprobs.gather(-1, target_argmax.unsqueeze(-1)).squeeze(-1)  # [n, K+1]
        return _num_leading_true(accepted), target_argmax, logprobs

    def _verify_sampled(
        self,
        safe_draft_ids: torch.Tensor,  # [n, K]
        valid: torch.Tensor,  # [n, K] bool
        draft_lens: torch.Tensor,  # [n]
        draft_probs: torch.Tensor | None,  # [n, K, vocab] or None
        target_logits: torch.Tensor,  # [n, K+1, vocab]
        sampling: SamplingParams,
        uniforms: torch.Tensor,  # [n, K+1]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # [n], [n, K+1], [n, K+1]
        n, num_draft = safe_draft_ids.shape
        rows = torch.arange(n, device=target_logits.device)  # [n]
        target_logprobs = self._logprobs(target_logits, sampling)  # [n, K+1, vocab], the one full pass
        target_logprobs_at_draft = (
            target_logprobs[:, :num_draft].gather(-1, safe_draft_ids.unsqueeze(-1)).squeeze(-1)
        )  # [n, K]
        target_probs_at_draft = target_logprobs_at_draft.exp()  # [n, K]
        if draft_probs is None:  # one-hot drafts: draft_probs[j, x_j] = 1
            accepted = uniforms[:, :num_draft] < target_probs_at_draft  # [n, K]
        else:
            draft_probs_at_draft = draft_probs.gather(-1, safe_draft_ids.unsqueeze(-1)).squeeze(-1)  # [n, K]
            accepted = uniforms[:, :num_draft] * draft_probs_at_draft < target_probs_at_draft  # [n, K]
        num_accepted = _num_leading_true(accepted & valid)  # [n]

        # the one distribution per row that needs a sample: target_probs at position num_accepted (bonus) ...
        sample_from = self._sample_rows(target_logprobs, rows, num_accepted)  # [n, vocab] a copy: edited in place
        if num_draft > 0:  # ... or, for the rows that rejected draft num_accepted (< d_i), the residual there
            sample_from = _residual(sample_from, safe_draft_ids, draft_lens, draft_probs, num_accepted)
        sample_uniforms = uniforms.gather(1, draft_lens.unsqueeze(1)).squeeze(1)  # [n] = uniforms[i, d_i]
        cdf = self._scratch("cdf", sample_from.shape, torch.float64, sample_from.device)  # [n, vocab] or None
        sampled_ids = sample_inverse_cdf(sample_from, sample_uniforms, cdf_out=cdf)  # [n] recovered or bonus token
        sampled_logprobs = target_logprobs[rows, num_accepted, sampled_ids].unsqueeze(1)  # [n, 1]

        # drafts then the sampled token at column num_accepted (later columns are masked by the caller)
        output_ids = torch.cat([safe_draft_ids, safe_draft_ids.new_zeros(n, 1)], dim=1)  # [n, K+1]
        output_ids.scatter_(1, num_accepted.unsqueeze(1), sampled_ids.unsqueeze(1))
        logprobs = torch.cat([target_logprobs_at_draft, sampled_logprobs], dim=1)  # [n, K+1]
        logprobs.scatter_(1, num_accepted.unsqueeze(1), sampled_logprobs)
        return num_accepted, output_ids, logprobs

    def _sample_rows(
        self,
        target_logprobs: torch.Tensor,  # [n, K+1, vocab]
        rows: torch.Tensor,  # [n] 0 .. n-1
        num_accepted: torch.Tensor,  # [n]
    ) -> torch.Tensor:  # [n, vocab] exp(target_logprobs[i, num_accepted[i]]), a copy (in a reused buffer on CPU)
        n, positions, vocab = target_logprobs.shape
        out = self._scratch("sample_from", (n, vocab), target_logprobs.dtype, target_logprobs.device)
        if out is None:
            return target_logprobs[rows, num_accepted].exp_()
        flat = target_logprobs.reshape(n * positions, vocab)  # [n * (K+1), vocab]
        return torch.index_select(flat, 0, rows * positions + num_accepted, out=out).exp_()


def _residual(
    sample_from: torch.Tensor,  # [n, vocab] target_probs at position num_accepted (edited in place)
    safe_draft_ids: torch.Tensor,  # [n, K]
    draft_lens: torch.Tensor,  # [n]
    draft_probs: torch.Tensor | None,  # [n, K, vocab] or None
    num_accepted: torch.Tensor,  # [n]
) -> torch.Tensor:  # [n, vocab]
    """For rows that rejected draft ``num_accepted`` the residual ``norm(max(target - draft, 0))`` there (unnormalised;
    an all-zero residual falls back to the target's); other rows keep ``sample_from``."""
    rows = torch.arange(sample_from.shape[0], device=sample_from.device)  # [n]
    rejected = num_accepted < draft_lens  # [n]
    at = num_accepted.clamp(max=safe_draft_ids.shape[1] - 1)  # [n] rejected position (clamped for bonus rows)
    if draft_probs is not None:
        residual = (sample_from - draft_probs[rows, at]).clamp_min_(0.0)  # [n, vocab]
        use_residual = rejected & (residual.sum(dim=-1) > 0)  # [n]; all-zero residual -> target_probs
        return torch.where(use_residual[:, None], residual, sample_from)  # [n, vocab]
    # residual of a one-hot draft: target_probs with the rejected token zeroed, rejected rows only
    rejected_ids = safe_draft_ids[rows, at].unsqueeze(1)  # [n, 1]
    target_probs_at_rejected = sample_from.gather(1, rejected_ids)  # [n, 1]
    sample_from.scatter_(1, rejected_ids, target_probs_at_rejected.masked_fill(rejected[:, None], 0.0))
    use_residual = rejected & (sample_from.sum(dim=-1) > 0)  # all-zero residual -> target_probs
    restored = target_probs_at_rejected.masked_fill(use_residual[:, None], 0.0)  # [n, 1]
    return sample_from.scatter_(1, rejected_ids, restored)


def _num_leading_true(mask: torch.Tensor) -> torch.Tensor:  # mask [n, K] bool -> [n] long
    """Length of the leading run of True per row (the index of the first False, K if none)."""
    return mask.long().cumprod(dim=-1).sum(dim=-1)


def _check_inputs(
    draft_ids: torch.Tensor,  # [n, K]
    draft_lens: torch.Tensor,  # [n]
    draft_probs: torch.Tensor | None,  # [n, K, vocab] or None
    target_logits: torch.Tensor,  # [n, K+1, vocab]
    sampling: SamplingParams,
    uniforms: torch.Tensor | None,  # [n, K+1] or None (greedy)
) -> None:
    """Cheap shape/dtype/device checks (no host sync); value checks only for CPU tensors."""
    if target_logits.dim() != 3:
        raise ValueError(f"target_logits must be [n, K+1, vocab], got shape {tuple(target_logits.shape)}")
    if not target_logits.is_floating_point():
        raise ValueError(f"target_logits must be floating point, got {target_logits.dtype}")
    _check_drafts(draft_ids, draft_lens, target_logits)
    _check_draft_probs(draft_probs, target_logits)
    if not sampling.greedy:
        n, q, _ = target_logits.shape
        if uniforms is None:
            raise ValueError("uniforms [n, K+1] are required when sampling (temperature > 0); see draw_uniforms")
        if uniforms.shape != (n, q):
            raise ValueError(f"uniforms must be [n, K+1] = [{n}, {q}], got {tuple(uniforms.shape)}")
    if target_logits.device.type == "cpu" and draft_lens.device.type == "cpu" and draft_ids.device.type == "cpu":
        _check_draft_values(draft_ids, draft_lens, target_logits.shape[-1])


def _is_integer(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and t.dtype != torch.bool


def _check_drafts(
    draft_ids: torch.Tensor,  # [n, K]
    draft_lens: torch.Tensor,  # [n]
    target_logits: torch.Tensor,  # [n, K+1, vocab]
) -> None:
    n, q, _ = target_logits.shape
    if draft_ids.dim() != 2 or draft_ids.shape[0] != n or draft_ids.shape[1] + 1 != q:
        raise ValueError(
            f"draft_ids must be [n, K] = [{n}, {q - 1}] to match target_logits {tuple(target_logits.shape)}, "
            f"got {tuple(draft_ids.shape)}"
        )
    if not _is_integer(draft_ids):
        raise ValueError(f"draft_ids must be an integer tensor, got {draft_ids.dtype}")
    if draft_lens.shape != (n,) or not _is_integer(draft_lens):
        raise ValueError(
            f"draft_lens must be an integer tensor of shape [{n}], got {draft_lens.dtype} {tuple(draft_lens.shape)}"
        )


def _check_draft_probs(
    draft_probs: torch.Tensor | None,  # [n, K, vocab] or None
    target_logits: torch.Tensor,  # [n, K+1, vocab]
) -> None:
    if draft_probs is None:
        return
    n, q, vocab = target_logits.shape
    if draft_probs.shape != (n, q - 1, vocab):
        raise ValueError(
            f"draft_probs must be [n, K, vocab] = [{n}, {q - 1}, {vocab}] or None, got {tuple(draft_probs.shape)}"
        )
    if draft_probs.device != target_logits.device:
        raise ValueError(f"draft_probs is on {draft_probs.device} but target_logits on {target_logits.device}")


def _check_draft_values(draft_ids: torch.Tensor, draft_lens: torch.Tensor, vocab: int) -> None:  # [n, K], [n]
    """Draft lengths in [0, K] and valid draft ids in [0, vocab) (CPU tensors only: reading them would sync)."""
    n, num_draft = draft_ids.shape
    if n and (int(draft_lens.min()) < 0 or int(draft_lens.max()) > num_draft):
        raise ValueError(f"draft_lens must lie in [0, K={num_draft}], got {draft_lens.tolist()}")
    valid = torch.arange(num_draft) < draft_lens.unsqueeze(1)
    ids = draft_ids[valid]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"draft_ids at valid positions must lie in [0, vocab={vocab})")


def draw_uniforms(
    generators: Sequence[torch.Generator | None],
    draft_lens: Sequence[int],
    K: int,  # padded draft length
    device: torch.device | str,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:  # [n, K+1]
    """Uniforms in [0, 1) for ``RejectionSampler.verify``: row i draws exactly ``d_i + 1`` numbers.

    Each row draws from its own CPU generator (None: the global torch RNG), so a row's randomness does not depend
    on the other rows of the batch or on K. The draws lie at ``[i, :d_i + 1]``, zeros after; the result is moved to
    ``device``.
    """
    if len(generators) != len(draft_lens):
        raise ValueError(f"got {len(generators)} generators for {len(draft_lens)} draft lengths")
    if K < 0:
        raise ValueError(f"K must be >= 0, got {K}")
    out = torch.zeros(len(draft_lens), K + 1, dtype=dtype)  # [n, K+1] on the CPU
    for i, (generator, d) in enumerate(zip(generators, draft_lens)):
        if not 0 <= d <= K:
            raise ValueError(f"draft_lens[{i}] = {d} is outside [0, K={K}]")
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generators must be CPU generators, row {i} has one on {generator.device}")
        out[i, : d + 1] = torch.rand(d + 1, generator=generator, dtype=dtype)
    return out.to(device)
