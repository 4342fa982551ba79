"""The adaptive draft head: a :class:`DraftHead` retrained online while the policy changes.

It is the static head's EAGLE-3 network (vLLM's drafter layout; one decoder layer). With a static head it is, by
default, the static head's *exact copy* (same MLP width, same draft vocabulary, every tensor copied): its
acceptance starts equal to the static head's and training moves it from there, so adaptation never starts below
the floor (docs/decisions/adaptive_head_shape.md has the measurement that chose this over a lighter head).

A lighter head is a configuration away (``AdaptiveHeadConfig(draft_vocab_size=..., intermediate_size=...)``),
cheaper per draft token in the two places that dominate its cost:

* a narrower MLP, and
* a smaller draft vocabulary: the first ``draft_vocab_size`` tokens of the static head's frequency-ranked
  vocabulary (``draft_to_target`` is ordered most frequent first), so the output rows, the head's largest
  matmul, cost a fraction of the static head's.

Warm start from a static head (``build_adaptive_head(model, static=...)``): every tensor whose shape matches is
copied (``fc`` when both fuse the same target layers, the norms, attention), a narrower first-layer MLP is
*sliced* — the ``intermediate_size`` hidden units with the largest ``|gate_i| * |up_i| * |down_:,i|`` — and the
output rows are the static head's trained rows of the kept tokens (the target's rows where the static head has
none, or when its rows were frozen). Without a static head the head starts light (2048 tokens, MLP 512) from
random weights with the target's rows, and a vocabulary ranked by :func:`rank_vocab` over token sequences (or the
first ids).

The output rows are frozen by default (``AdaptiveHeadConfig.train_lm_head``): the draft vocabulary can then be
swapped without retraining (:func:`set_draft_vocab`), and rows copied from the target are refreshed from the new
target after a policy update (:func:`refresh_frozen_rows`); an exact copy keeps the static head's trained rows,
frozen (fewer parameters to train within the budget). Checkpoints export like the static head's
(``DraftHead.save_pretrained``: the directory vLLM loads).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from atlas_rl.speculators.draft_head import DraftHead, DraftHeadConfig, default_fuse_layers, head_cost_macs

if TYPE_CHECKING:  # annotations only: speculators sit below training (tests/unit/test_layering.py)
    from atlas_rl.training.samples import SequenceSample

logger = logging.getLogger(__name__)

__all__ = [
    "LIGHT_MLP",
    "LIGHT_VOCAB",
    "AdaptiveHeadConfig",
    "build_adaptive_head",
    "head_cost_macs",
    "rank_vocab",
    "rank_vocab_from_samples",
    "refresh_frozen_rows",
    "set_draft_vocab",
]


LIGHT_VOCAB = 2048  # draft vocabulary of a head built without a static head
LIGHT_MLP = 512  # its MLP width


@dataclass
class AdaptiveHeadConfig:
    """Shape of the adaptive head (target-dependent sizes come from the target, or the static head).

    Parameters:
        draft_vocab_size: tokens the head can propose (the first N of the static head's ranked vocabulary);
            None = the static head's (else ``LIGHT_VOCAB``).
        intermediate_size: MLP width of the draft layer; None = the static head's (else ``LIGHT_MLP``).
        fuse_layers: target layers fused as features; None = the static head's, or vLLM's default aux layers
            (2, L//2, L-3) of an L-layer target without one.
        warm_start: copy / slice the static head's weights when one is given.
        train_lm_head: train the output rows online (else frozen: the static head's rows, or the target's).
    """

    draft_vocab_size: int | None = field(
        default=None,
        metadata={"help": "Tokens the head can propose (the static head's N most frequent); None = the static's."},
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "MLP width of the draft layer; None = the static head's (exact copy)."}
    )
    fuse_layers: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "Target layers fused as features; None = the static head's (else vLLM's default aux layers)."
        },
    )
    warm_start: bool = field(default=True, metadata={"help": "Initialise from the static head when given one."})
    train_lm_head: bool = field(
        default=False,
        metadata={"help": "Train the output rows online (else frozen: the static head's rows, or the target's)."},
    )

    def __post_init__(self) -> None:
        for name in ("draft_vocab_size", "intermediate_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"AdaptiveHeadConfig.{name} must be a positive int or None, got {v!r}")
        if self.fuse_layers is not None:
            self.fuse_layers = tuple(int(x) for x in self.fuse_layers)
            if not self.fuse_layers:
                raise ValueError("fuse_layers must name at least one target layer, or be None (the static head's)")


def rank_vocab(
    sequences: Iterable[Iterable[int]], vocab_size: int, n: int, prior: torch.Tensor | None = None
) -> torch.Tensor:  # [n] long, most frequent first
    """The ``n`` most frequent token ids over ``sequences`` (ties, and unseen tokens, by ``prior`` order, else id)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in sequences:
        t = torch.as_tensor(list(s), dtype=torch.long)
        if t.numel():
            counts += torch.bincount(t, minlength=vocab_size).double()[:vocab_size]
    return _rank(counts, n, prior)


def _rank(counts: torch.Tensor, n: int, prior: torch.Tensor | None) -> torch.Tensor:
    """Indices of ``counts`` by decreasing count; ties by position in ``prior`` (unlisted last), then by id."""
    V = counts.numel()
    order = prior.long() if prior is not None else torch.arange(V)
    rank = torch.full((V,), float(V), dtype=torch.float64)
    rank[order] = torch.arange(order.numel(), dtype=torch.float64)
    idx = torch.argsort(rank, stable=True)  # by prior rank, then id
    idx = idx[torch.argsort(counts[idx], descending=True, stable=True)]  # stable: ties keep the prior order
    return idx[:n].clone()


def rank_vocab_from_samples(
    samples: Iterable[SequenceSample], vocab_size: int, n: int, prior: torch.Tensor | None = None
) -> torch.Tensor:  # [n] long, most frequent first
    """The ``n`` tokens of largest expected frequency in captured samples: every token of the sequences plus the
    target's probability mass at each labeled position (its top-K soft labels), so tokens the policy would likely
    emit count too; ties and unseen tokens by ``prior`` order (else id)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for s in samples:
        counts += torch.bincount(s.tokens.long(), minlength=vocab_size).double()[:vocab_size]
        m = s.label_mask
        ids, probs = s.label_ids[m], s.label_probs[m].double()
        ok = ids >= 0
        counts.index_add_(0, ids[ok], probs[ok])
    return _rank(counts, n, prior)


def _output_rows(model: nn.Module, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    w = model.get_output_embeddings().weight
    return w[ids.to(w.device)].detach().to(device=like.device, dtype=like.dtype)


@torch.no_grad()
def set_draft_vocab(head: DraftHead, model: nn.Module, draft_to_target: torch.Tensor) -> None:
    """Swap a frozen-row head's draft vocabulary in place (same size): new ids, their target output rows.

    Only valid for heads with frozen output rows (``train_lm_head`` False): the trained part of the head does
    not depend on which rows follow it. Call at a safe point (the engine not drafting).
    """
    if head.config.train_lm_head:
        raise ValueError("set_draft_vocab needs a head with frozen output rows (train_lm_head=False)")
    d2t = draft_to_target.long().flatten().to(head.draft_to_target.device)
    if d2t.numel() != head.config.draft_vocab_size:
        raise ValueError(f"expected {head.config.draft_vocab_size} token ids, got {d2t.numel()}")
    if d2t.unique().numel() != d2t.numel():
        raise ValueError("draft_to_target holds duplicate token ids")
    head.draft_to_target.copy_(d2t)
    head.target_to_draft = head._inverse_map(d2t.cpu()).to(head.draft_to_target.device)
    head.lm_head.weight.copy_(_output_rows(model, d2t, head.lm_head.weight))
    head.lm_head_ready = True
    head.rows_follow_target = True


@torch.no_grad()
def refresh_frozen_rows(head: DraftHead, model: nn.Module) -> None:
    """Re-copy the target's (possibly updated) output rows into a frozen-row head (after a policy update)."""
    if not head.config.train_lm_head and head.rows_follow_target:
        head.lm_head.weight.copy_(_output_rows(model, head.draft_to_target, head.lm_head.weight))
        head.lm_head_ready = True


def build_adaptive_head(
    model: nn.Module,
    static: DraftHead | None = None,
    config: AdaptiveHeadConfig | None = None,
    vocab_ranking: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> DraftHead:
    """The adaptive draft head for ``model``, bound to it and ready to serve (see the module docstring).

    Args:
        model: the target (HF causal LM).
        static: the static head to take the vocabulary ranking and the warm start from.
        config: :class:`AdaptiveHeadConfig`.
        vocab_ranking: ``[>= draft_vocab_size]`` token ids, most frequent first; overrides the static head's.
        dtype: parameter dtype.
        seed: initialisation seed of what is not copied.
    """
    cfg = config or AdaptiveHeadConfig()
    fuse = cfg.fuse_layers or (
        tuple(static.config.fuse_layers) if static is not None else default_fuse_layers(model.config.num_hidden_layers)
    )
    n, mlp = _sizes(cfg, static, model)
    d2t = _first_tokens(vocab_ranking if vocab_ranking is not None else _static_ranking(static), n)
    overrides: dict = dict(
        draft_vocab_size=n, intermediate_size=mlp, fuse_layers=fuse, train_lm_head=cfg.train_lm_head
    )
    if static is not None:
        sc = static.config
        overrides.update(
            num_attention_heads=sc.num_attention_heads,
            num_key_value_heads=sc.num_key_value_heads,
            head_dim=sc.head_dim,
            max_position_embeddings=sc.max_position_embeddings,
        )
    hc = DraftHeadConfig.from_target(model, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DraftHead(hc, draft_to_target=d2t)
    head.bind_target(model, init_lm_head=True)  # output rows: the target's, then the static head's where it has them
    if static is not None and cfg.warm_start:
        _warm_start(head, static)
    head.to(dtype)
    logger.info(
        "adaptive head: vocab %d, MLP %d, fuse %s; %.2f M MACs per draft token%s",
        n,
        mlp,
        fuse,
        head_cost_macs(hc) / 1e6,
        f" (static: {head_cost_macs(static.config) / 1e6:.2f} M)" if static is not None else "",
    )
    return head


def _sizes(cfg: AdaptiveHeadConfig, static: DraftHead | None, model: nn.Module) -> tuple[int, int]:
    """(draft vocabulary, MLP width): the configured ones, else the static head's, else the light defaults."""
    vocab = int(model.get_output_embeddings().weight.shape[0])
    n = cfg.draft_vocab_size or (static.config.draft_vocab_size if static is not None else min(LIGHT_VOCAB, vocab))
    mlp = cfg.intermediate_size or (static.config.intermediate_size if static is not None else LIGHT_MLP)
    return n, mlp


def _static_ranking(static: DraftHead | None) -> torch.Tensor | None:
    return static.draft_to_target if static is not None else None


def _first_tokens(ranking: torch.Tensor | None, n: int) -> torch.Tensor:  # ranking: [>= n] long -> [n] long
    """The first ``n`` ids of a frequency ranking (the first ids without one)."""
    if ranking is None:
        return torch.arange(n)
    if ranking.numel() < n:
        raise ValueError(
            f"the vocabulary ranking holds {ranking.numel()} tokens, fewer than draft_vocab_size={n}: "
            "lower AdaptiveHeadConfig.draft_vocab_size"
        )
    return ranking.detach().long().flatten()[:n].cpu()


@torch.no_grad()
def _warm_start(head: DraftHead, static: DraftHead) -> None:
    """Copy what fits from ``static`` into ``head``: equal shapes as they are, the first layer's MLP sliced to the
    strongest units, the output rows of the static head for the tokens both vocabularies hold."""
    src = static.state_dict()
    dst = head.state_dict()
    copied, sliced, skipped = [], [], []
    keep = _mlp_units_to_keep(src, head.config.intermediate_size, static.config.intermediate_size)
    mlp = "layers.0.mlp."
    for name, t in dst.items():
        if name in ("lm_head.weight", "draft_to_target"):
            continue  # the vocabulary was chosen by the caller; rows below
        s = src.get(name)
        if s is None:
            skipped.append(name)
        elif s.shape == t.shape:
            t.copy_(s.to(t.dtype))
            copied.append(name)
        elif keep is not None and name in (mlp + "gate_proj.weight", mlp + "up_proj.weight"):
            t.copy_(s[keep.to(s.device)].to(t.dtype))
            sliced.append(name)
        elif keep is not None and name == mlp + "down_proj.weight":
            t.copy_(s[:, keep.to(s.device)].to(t.dtype))
            sliced.append(name)
        else:
            skipped.append(name)
    rows = copy_output_rows(head, static) if static.config.train_lm_head else 0
    logger.info(
        "adaptive warm start: copied %d tensors, sliced %s, kept random %s, %d output rows from the static head",
        len(copied),
        sliced,
        skipped,
        rows,
    )


def _mlp_units_to_keep(src: dict[str, torch.Tensor], n_new: int, n_old: int) -> torch.Tensor | None:
    """The ``n_new`` first-layer MLP units of largest ``|gate_i| * |up_i| * |down_:,i|`` (sorted), or None."""
    if n_new > n_old:
        return None
    g = src["layers.0.mlp.gate_proj.weight"].float().norm(dim=1)
    u = src["layers.0.mlp.up_proj.weight"].float().norm(dim=1)
    d = src["layers.0.mlp.down_proj.weight"].float().norm(dim=0)
    return torch.argsort(g * u * d, descending=True, stable=True)[:n_new].sort().values


def copy_output_rows(head: DraftHead, static: DraftHead) -> int:
    """The trained output rows of ``static`` for the tokens of ``head``'s vocabulary it holds (the rest stay as they
    are, e.g. the target's); the rows no longer follow the target (see :func:`refresh_frozen_rows`). Returns how many
    rows were copied."""
    idx = static.target_to_draft.to(head.draft_to_target.device)[head.draft_to_target]  # [n] static rows or -1
    have = idx >= 0
    w = head.lm_head.weight
    w[have] = static.lm_head.weight[idx[have].to(static.lm_head.weight.device)].to(device=w.device, dtype=w.dtype)
    head.rows_follow_target = False
    return int(have.sum())
