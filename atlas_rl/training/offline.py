"""Building draft-head training samples from whole sequences with teacher-forced target forwards."""

from __future__ import annotations

import torch

from atlas_rl.training.samples import SequenceSample, topk_labels


@torch.inference_mode()
def samples_from_sequences(
    model: torch.nn.Module,
    sequences: list[list[int]],
    prompt_lens: list[int],
    fuse_layers: tuple[int, ...],
    top_k: int = 32,
    policy_version: int = 0,
    batch_size: int = 8,
    feat_dtype: torch.dtype = torch.float16,
) -> list[SequenceSample]:
    """One teacher-forced target forward per batch of sequences: features of ``fuse_layers`` and top-K soft labels
    at every position; labels train the head on completion positions (``p >= prompt_len - 1``)."""
    if len(sequences) != len(prompt_lens):
        raise ValueError("sequences and prompt_lens must have the same length")
    dev = next(model.parameters()).device
    out: list[SequenceSample] = []
    for b0 in range(0, len(sequences), batch_size):
        seqs = sequences[b0 : b0 + batch_size]
        T = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            att[i, : len(s)] = 1
        res = model(input_ids=ids.to(dev), attention_mask=att.to(dev), output_hidden_states=True)
        hs = res.hidden_states
        feats = torch.cat([hs[la] for la in fuse_layers], -1)  # [b, T, F]
        lids, lprobs = topk_labels(res.logits, top_k)  # [b, T, K]
        for i, s in enumerate(seqs):
            n = len(s)
            pl = prompt_lens[b0 + i]
            has = torch.ones(n, dtype=torch.bool)
            has[n - 1] = False  # features of the last token exist but its label has no next token: keep it simple
            mask = torch.zeros(n, dtype=torch.bool)
            mask[max(pl - 1, 0) : n - 1] = True
            out.append(
                SequenceSample(
                    tokens=torch.tensor(s, dtype=torch.long),
                    feats=feats[i, :n].to("cpu", feat_dtype),
                    has_feats=has,
                    label_ids=lids[i, :n].cpu(),
                    label_probs=lprobs[i, :n].cpu(),
                    label_mask=mask,
                    policy_version=policy_version,
                )
            )
    return out
