"""Sampling-parameter processing shared by the target and every draft distribution.

The verifier is lossless only if ``target_probs`` and ``draft_probs`` are the *same* processing of their
logits, so draft heads call these functions on their own logits too.

Processing (``SamplingParams``), in the order of HF transformers and vLLM:

1. temperature: ``logits / T`` (T > 0);
2. top-k (``top_k > 0``): keep the k largest scaled logits, set the others to -inf. Every token tied with the
   k-th largest value is kept, so more than k tokens survive when there are ties at the boundary;
3. top-p (``top_p < 1``): on the distribution left by top-k, sort descending and keep the smallest prefix
   whose mass reaches ``top_p`` (``cumsum >= top_p``), at least the top token; tokens tied with the last
   kept one are kept as well (the kept set depends on the values only, never on how a sort broke ties);
4. ``log_softmax`` over what is left; filtered tokens get logprob -inf (probability exactly 0).

Greedy decoding (T = 0) ignores top-k/top-p: its logprobs are the plain ``log_softmax(logits)``.
Everything is computed in the logits' dtype but at least float32 (bf16/fp16 logits are upcast).
"""

from __future__ import annotations

import torch

from atlas_rl.types import SamplingParams

__all__ = ["is_unprocessed", "processed_logprobs", "processed_probs", "sample_inverse_cdf"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logits' dtype, but at least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def is_unprocessed(sampling: SamplingParams, vocab: int) -> bool:
    """Whether :func:`processed_logprobs` under ``sampling`` is the plain ``log_softmax`` of the logits (the T = 1
    distribution): greedy decoding, or T = 1 without top-k / top-p filtering."""
    if sampling.greedy:
        return True
    top_k = sampling.top_k if 0 < sampling.top_k < vocab else 0
    return sampling.temperature == 1.0 and top_k == 0 and sampling.top_p >= 1.0


def processed_logprobs(
    logits: torch.Tensor,  # [..., vocab] raw logits
    sampling: SamplingParams,
    *,
    out: torch.Tensor | None = None,  # [..., vocab] of the compute dtype, on the logits' device; None = allocate
) -> torch.Tensor:  # [..., vocab] processed log-probabilities, -inf for filtered tokens
    """Log-probabilities of the distribution tokens are sampled from under ``sampling``.

    ``log_softmax(filter_top_p(filter_top_k(logits / T)))`` for T > 0, ``log_softmax(logits)`` for T = 0
    (see the module docstring for the exact top-k/top-p rules). The hot path (``top_k == 0`` and
    ``top_p == 1``) never sorts; with ``top_k > 0`` only the k kept values are sorted (``topk``); top-p alone
    sorts, on CPU first only the ``_TOP_P_PREFIX`` largest values of a row and the whole row only when those
    do not reach ``top_p``.

    The result is written into ``out`` when given (a buffer reused between calls saves the page faults of a fresh
    large allocation on CPU); it must not overlap ``logits``. ``logits`` is never modified.
    """
    dtype = _compute_dtype(logits.dtype)
    if out is not None and (out.shape != logits.shape or out.dtype != dtype or out.device != logits.device):
        raise ValueError(
            f"out must be a {dtype} tensor of shape {tuple(logits.shape)} on {logits.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    vocab = logits.shape[-1]
    top_k = sampling.top_k if 0 < sampling.top_k < vocab else 0
    top_p = sampling.top_p
    scale = not sampling.greedy and sampling.temperature != 1.0
    filtered = not sampling.greedy and (top_k > 0 or top_p < 1.0)
    if logits.dtype == dtype and is_unprocessed(sampling, vocab):
        return _log_softmax(logits, out)  # greedy, and the hot path at T = 1: no copy, no sort
    # x: the scaled, filtered logits [..., vocab], in `out` when given, else in one fresh tensor; edited in place
    if out is None:
        x = logits / sampling.temperature if scale and logits.dtype == dtype else logits.to(dtype, copy=True)
    elif scale and logits.dtype == dtype:
        x = torch.div(logits, sampling.temperature, out=out)
    else:
        x = out.copy_(logits)
    if scale and logits.dtype != dtype:
        x.div_(sampling.temperature)  # upcast first, then scale
    if filtered:
        top_k_indices: torch.Tensor | None = None  # [..., top_k] positions of the k largest values, descending
        if top_k:
            top = torch.topk(x, top_k, dim=-1)
            x.masked_fill_(x < top.values[..., -1:], float("-inf"))  # every token tied with the k-th is kept
            top_k_indices = top.indices
        if top_p < 1.0:
            # logprobs of the top-k-filtered distribution (in place on CPU): the nucleus mass is read off them
            x = _log_softmax(x, x if x.device.type == "cpu" else None)
            x.masked_fill_(x < _top_p_threshold(x, top_p, top_k_indices), float("-inf"))
    return _log_softmax(x, x if x.device.type == "cpu" else out)


def _log_softmax(
    x: torch.Tensor,  # [..., vocab] the compute dtype
    out: torch.Tensor | None,  # [..., vocab] where to write; None = a fresh tensor; may be x itself on CPU
) -> torch.Tensor:  # [..., vocab]
    """``log_softmax(x)``, written into ``out`` when given. In place (``out is x``) on CPU, whose kernel reads each
    row before writing it (the tests compare against the out-of-place result); elsewhere through a temporary."""
    if out is None:
        return torch.log_softmax(x, dim=-1)
    if out is x and x.device.type != "cpu":
        return out.copy_(torch.log_softmax(x, dim=-1))
    return torch.log_softmax(x, dim=-1, out=out)


_TOP_P_PREFIX = 256
"""Top-p without top-k on CPU: sort only this many of the largest values of a row first (``topk``)."""


def _top_p_threshold(
    logprobs: torch.Tensor,  # [..., vocab] log-probabilities after top-k (filtered tokens at -inf)
    top_p: float,
    top_k_indices: torch.Tensor | None,  # [..., k] positions of the k largest values, descending; None: no top-k
) -> torch.Tensor:  # [..., 1] the smallest logprob top-p keeps
    """Smallest kept logprob of the top-p nucleus: sorted descending, sorted position i is kept iff the mass
    before it is < ``top_p`` (the smallest prefix whose mass reaches ``top_p``; position 0 always kept).

    Works on a sorted prefix of each row. A prefix whose mass does not reach ``top_p`` is final only when it holds
    every token of the row that top-k kept (the top-k positions: tokens tied with the k-th are kept anyway);
    otherwise (CPU prefix of ``_TOP_P_PREFIX`` values) such rows are redone on a full sort.
    """
    vocab = logprobs.shape[-1]
    rows = logprobs.reshape(-1, vocab)  # [r, vocab]
    if top_k_indices is not None:  # logprobs are monotone in the logits: same order as topk's
        prefix = rows.gather(-1, top_k_indices.reshape(rows.shape[0], top_k_indices.shape[-1]))  # [r, k]
        threshold, _ = _prefix_threshold(prefix, top_p)
    elif logprobs.device.type != "cpu" or vocab <= _TOP_P_PREFIX:  # accelerators sort fast, and never sync here
        threshold, _ = _prefix_threshold(torch.sort(rows, dim=-1, descending=True).values, top_p)
    else:
        threshold, reached = _prefix_threshold(torch.topk(rows, _TOP_P_PREFIX, dim=-1).values, top_p)
        redo = ~reached.squeeze(-1)  # [r] rows whose nucleus is longer than the prefix
        if bool(redo.any()):  # a CPU tensor: no device sync
            full_sorted = torch.sort(rows[redo], dim=-1, descending=True).values  # [r', vocab]
            threshold[redo] = _prefix_threshold(full_sorted, top_p)[0]
    return threshold.reshape(*logprobs.shape[:-1], 1)


def _prefix_threshold(
    sorted_logprobs: torch.Tensor,  # [r, m] descending
    top_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # [r, 1] smallest kept logprob, [r, 1] bool: prefix mass >= top_p
    cum = torch.cumsum(sorted_logprobs.exp(), dim=-1)  # [r, m]
    mass_before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # [r, m]
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True)  # [r, 1], >= 1
    return sorted_logprobs.gather(-1, num_kept - 1), cum[:, -1:] >= top_p


def processed_probs(
    logits: torch.Tensor,  # [..., vocab] raw logits
    sampling: SamplingParams,
) -> torch.Tensor:  # [..., vocab] processed probabilities, exactly 0 for filtered tokens
    """``exp(processed_logprobs(logits, sampling))``: the processed distribution (sums to 1 per row)."""
    return processed_logprobs(logits, sampling).exp()


def sample_inverse_cdf(
    probs: torch.Tensor,  # [..., vocab] non-negative weights (need not be normalised)
    uniforms: torch.Tensor,  # [...] in [0, 1)
    *,
    cdf_out: torch.Tensor | None = None,  # [..., vocab] float64 on the probs' device: where the cumsum goes
) -> torch.Tensor:  # [...] long token ids
    """Sample one token per distribution by inverse CDF: the first index i with ``cumsum[i] > u * cumsum[-1]``.

    Deterministic given ``uniforms``, so a batched sampler and the reference agree token for token. The cumsum
    is taken in float64. A token of weight 0 is never returned: the threshold is kept strictly below the total,
    and the first cumsum entry exceeding it is one where the cumsum grew, i.e. a token of positive weight.
    (An all-zero row has no valid answer; it returns the last index.) ``cdf_out``: a buffer reused between calls
    (a fresh ``[n, vocab]`` float64 tensor per call costs page faults on CPU); the same values either way.
    """
    if probs.shape[:-1] != uniforms.shape:
        raise ValueError(
            f"sample_inverse_cdf: probs {tuple(probs.shape)} needs uniforms of shape {tuple(probs.shape[:-1])}, "
            f"got {tuple(uniforms.shape)}"
        )
    if cdf_out is None:
        cdf = torch.cumsum(probs.to(torch.float64), dim=-1)  # [..., vocab]
    elif cdf_out.shape != probs.shape or cdf_out.dtype != torch.float64 or cdf_out.device != probs.device:
        raise ValueError(
            f"sample_inverse_cdf: cdf_out must be a float64 tensor of shape {tuple(probs.shape)} on {probs.device}, "
            f"got {cdf_out.dtype} {tuple(cdf_out.shape)} on {cdf_out.device}"
        )
    else:
        cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64, out=cdf_out)  # [..., vocab], cast on the fly
    total = cdf[..., -1:]  # [..., 1]
    threshold = uniforms.to(torch.float64).unsqueeze(-1) * total  # [..., 1]
    # u < 1 in exact arithmetic, but u * total may round up to total: keep the threshold strictly below it
    threshold = torch.minimum(threshold, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf.contiguous(), threshold.contiguous(), right=True)  # [..., 1]
    return ids.squeeze(-1).clamp_(max=probs.shape[-1] - 1)
