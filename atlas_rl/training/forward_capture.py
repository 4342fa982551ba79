"""Draft-head training samples from a forward the trainer runs anyway (the loss forward over prompt + completion).

When vLLM rolls out, nobody hands us the target's hidden states; but the RL trainer runs the policy over every
rollout (prompt + completion) to score it. :class:`ForwardCapture` hooks that forward: while the ``with`` block
is open it keeps (detached, no copy) the hidden states of the head's ``fuse_layers`` and the final normed hidden
state, chunk after chunk; :meth:`ForwardCapture.samples` then turns them into one
:class:`~atlas_rl.training.samples.SequenceSample` per row, the same sample
:func:`atlas_rl.training.offline.samples_from_sequences` builds from a teacher-forced forward of the sequence:

* ``tokens`` = the row's real tokens (``attention_mask`` 1; prompts left-padded, completions right-padded, padding
  after EOS masked), ``feats`` at every one of them, ``has_feats`` True but at the last position;
* labels (top-K of the T = 1 next-token distribution from the raw logits, never divided by a sampling
  temperature) only at the positions that predict a completion token: the last prompt token and every completion
  token but the last. Only these are needed, so the LM head is applied to them alone — fused-LM-head trainers
  (TRL) never materialise the logits. Elsewhere ``label_ids`` is -1 (the offline pipeline fills every position;
  ``label_mask`` is the same).

``hidden_states`` indices are HF's ``output_hidden_states`` ones: 0 = the embeddings, ``i`` = the output of decoder
layer ``i - 1``, ``num_layers`` (or -1) = the final normed output. Hooks never change what the forward computes
(they only hold references to its outputs) and are removed when the block exits, exception or not. The model
must be a HF Llama-family causal LM (``get_decoder()`` with ``embed_tokens``, ``layers``, ``norm``).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from atlas_rl.training.samples import SequenceSample, topk_labels

__all__ = ["ForwardCapture"]

LABEL_CHUNK = 512  # label positions projected through the LM head at a time (bounds the [chunk, vocab] logits)


class ForwardCapture:
    """Forward hooks that capture draft-head training data from one (possibly chunked) forward over a batch.

    Example::

        with ForwardCapture(model, fuse_layers=head.config.fuse_layers, top_k=32) as cap:
            model(input_ids=input_ids, attention_mask=attention_mask)      # any number of row chunks, in order
        samples = cap.samples(input_ids, attention_mask, logits_to_keep=C, policy_version=v)
    """

    def __init__(
        self,
        model: nn.Module,
        fuse_layers: tuple[int, ...],
        top_k: int = 32,
        feat_dtype: torch.dtype = torch.float16,
    ) -> None:
        decoder = model.get_decoder()
        self._num_layers = len(decoder.layers)
        self.fuse_layers = tuple(self._index(la) for la in fuse_layers)
        if not self.fuse_layers:
            raise ValueError("fuse_layers needs at least one hidden_states index, e.g. the head's (2, 15, 27)")
        self.top_k = int(top_k)
        self.feat_dtype = feat_dtype
        self._lm_head = model.get_output_embeddings()
        if hasattr(self._lm_head.weight, "ds_id"):  # calling it would all-gather from one rank only: a hang
            raise ValueError("ForwardCapture needs a whole LM head; under DeepSpeed ZeRO-3 it is partitioned")
        self._modules = self._hooked_modules(decoder)
        self._handles: list[Any] = []
        self._records: dict[int, list[torch.Tensor]] = {}  # hidden_states index -> per forward chunk [b, L, H]
        self.hook_s = 0.0  # wall time spent inside the hooks
        self.process_s = 0.0  # wall time spent in samples()

    def _index(self, la: int) -> int:
        n = self._num_layers + 1
        if not -n <= int(la) < n:
            raise ValueError(f"hidden_states index {la} is out of range for a {self._num_layers}-layer model")
        return int(la) % n

    def _hooked_modules(self, decoder: nn.Module) -> dict[int, nn.Module]:
        """hidden_states index -> the module whose output it is (the final norm is always needed: labels)."""
        out: dict[int, nn.Module] = {self._num_layers: decoder.norm}
        for la in self.fuse_layers:
            if la == 0:
                out[0] = decoder.embed_tokens
            elif la < self._num_layers:
                out[la] = decoder.layers[la - 1]
        return out

    # ------------------------------------------------------------------------------------------ hooks
    def __enter__(self) -> ForwardCapture:
        self._records = {la: [] for la in self._modules}
        try:
            for la, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._hook(la)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, la: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t0 = time.perf_counter()
            hs = output[0] if isinstance(output, (tuple, list)) else output  # [b, L, H]
            self._records[la].append(hs.detach())
            self.hook_s += time.perf_counter() - t0

        return hook

    # ------------------------------------------------------------------------------------------ samples
    def _stacked(self, la: int, rows: int) -> torch.Tensor:  # [B, L, H] over every captured forward chunk
        rec = self._records.get(la) or []
        if not rec:
            raise RuntimeError("ForwardCapture saw no forward: run the model inside the `with` block")
        out = rec[0] if len(rec) == 1 else torch.cat(rec, 0)
        if out.shape[0] != rows:
            raise ValueError(f"the captured forwards covered {out.shape[0]} rows, the batch has {rows}")
        return out

    @torch.no_grad()
    def samples(
        self,
        input_ids: torch.Tensor,  # [B, L] prompt (left-padded) + completion (right-padded)
        attention_mask: torch.Tensor,  # [B, L] 1 = a real token
        logits_to_keep: int,
        policy_version: int = 0,
    ) -> list[SequenceSample]:
        """One sample per row of the batch the captured forward ran over (module docstring); the completion is the
        last ``logits_to_keep`` columns. Rows without a real completion token come back with no label. Call it
        once, after the forward: it lets go of the captured activations."""
        t0 = time.perf_counter()
        try:
            return self._samples(input_ids, attention_mask, int(logits_to_keep), int(policy_version))
        finally:
            self._records = {}  # let go of the forward's activations
            self.process_s += time.perf_counter() - t0

    def _samples(
        self,
        input_ids: torch.Tensor,  # [B, L]
        attention_mask: torch.Tensor,  # [B, L]
        logits_to_keep: int,
        policy_version: int,
    ) -> list[SequenceSample]:
        B, L = input_ids.shape
        real = attention_mask.bool()
        rows, cols = real.nonzero(as_tuple=True)  # [N] each, row-major: a row's real positions in order
        feats = torch.cat([self._stacked(la, B)[rows, cols] for la in self.fuse_layers], -1)  # [N, F]
        feats = feats.to("cpu", self.feat_dtype)
        # a position is labeled when the next real position of its row holds a completion token
        labeled = torch.zeros_like(rows, dtype=torch.bool)  # [N]
        labeled[:-1] = (rows[1:] == rows[:-1]) & (cols[1:] >= L - logits_to_keep)
        normed = self._stacked(self._num_layers, B)[rows[labeled], cols[labeled]]  # [M, H]
        lids, lprobs = self._labels(normed)  # [M, K] each, on the CPU
        tokens = input_ids[rows, cols].cpu()  # [N]
        return self._split(tokens, feats, labeled.cpu(), lids, lprobs, real.sum(1).tolist(), policy_version)

    def _labels(
        self,
        normed: torch.Tensor,  # [M, H] final normed hidden states at the labeled positions
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ids [M, K] long, probs [M, K] float32, on the CPU
        w = self._lm_head.weight
        ids, probs = [], []
        for a in range(0, max(int(normed.shape[0]), 1), LABEL_CHUNK):
            logits = self._lm_head(normed[a : a + LABEL_CHUNK].to(device=w.device, dtype=w.dtype))  # [m, vocab]
            i, p = topk_labels(logits, self.top_k)
            ids.append(i.cpu())
            probs.append(p.float().cpu())
        return torch.cat(ids), torch.cat(probs)

    @staticmethod
    def _split(
        tokens: torch.Tensor,  # [N] long, the real tokens of every row, row-major
        feats: torch.Tensor,  # [N, F]
        labeled: torch.Tensor,  # [N] bool
        lids: torch.Tensor,  # [M, K] long, one row per labeled position
        lprobs: torch.Tensor,  # [M, K] float32
        lengths: list[int],
        policy_version: int,
    ) -> list[SequenceSample]:
        K = lids.shape[-1]
        all_ids = torch.full((tokens.shape[0], K), -1, dtype=torch.long)
        all_probs = torch.zeros((tokens.shape[0], K), dtype=torch.float32)
        all_ids[labeled] = lids
        all_probs[labeled] = lprobs
        out: list[SequenceSample] = []
        a = 0
        for n in lengths:
            b = a + n
            has = torch.ones(n, dtype=torch.bool)
            has[n - 1 :] = False  # the last token has no next token: not a base position (as offline)
            out.append(
                SequenceSample(
                    tokens[a:b].clone(),
                    feats[a:b].clone(),
                    has,
                    all_ids[a:b].clone(),
                    all_probs[a:b].clone(),
                    labeled[a:b].clone(),
                    policy_version=policy_version,
                )
            )
            a = b
        return out
