"""A draft head's layers on a CPU through the decode glue kernels (``rollout/csrc/decode_glue.cpp``).

Why: drafting one token at 1-4 rows cost 3.8-5.2 ms on the 2-core CPU against ~1.7 ms of streaming the head's
weights; the rest was ~1000 small PyTorch ops a ``propose`` (RMSNorm as six ops, RoPE angles recomputed per call,
an index_put per KV write, a boolean mask per layer). Here one layer is: two RMSNorms and a concatenation (first
layer), three projections, RoPE + KV write + attention as one glue call over the head's own cache (each row attends
its own positions only), the output projection with residual add + RMSNorm as one call, the MLP. RoPE reads a
cos/sin table made once by :func:`~.draft_head.rope_cos_sin` (grown on demand).

Used for float32 heads on a CPU when the glue kernels are built, for steps of up to ``ROW_ATTENTION_MAX_Q``
positions per row over consecutive cache slots (a wave's rows usually are); everything else (CUDA, long catch-ups
over prompts, scattered slots) keeps :meth:`DraftHeadSpeculator._layers`. Same math as the reference up to
summation order (RMSNorm sums in double, attention in the glue's loops); the drafts' distributions are whatever the
head computes, handed to the verifier as they are, so the output stays lossless either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from atlas_rl.speculators.draft_head import DraftHead, DraftLayer, RMSNorm, rope_cos_sin

_HEAD_DIMS = (64, 128)  # the head sizes the glue's row attention is compiled for
_MAX_Q = 16  # positions per row the glue attends row by row (its ROW_ATTENTION_MAX_Q)


class CpuDraftLayers:
    """The draft layers of ``head`` over KV storage ``[layers, slots, kv_heads, length, head_dim]``, float32, CPU."""

    def __init__(self, head: DraftHead, glue: ModuleType) -> None:
        self.head = head
        self.glue = glue
        c = head.config
        self.hq, self.hk, self.d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = 1.0 / math.sqrt(self.d)
        self._cos = torch.zeros(0, self.d)  # [L, d] cos of position x frequency
        self._sin = torch.zeros(0, self.d)  # [L, d] sin, negated on the first half (the glue's rope_ form)

    @staticmethod
    def supports(head: DraftHead) -> bool:
        """Whether this path can run ``head`` (float32 on a CPU, its target's embedding too, a compiled head size)."""
        w, emb = head.fc.weight, head._embed
        cpu32 = w.device.type == "cpu" and w.dtype == torch.float32
        return cpu32 and emb is not None and emb.dtype == torch.float32 and head.config.head_dim in _HEAD_DIMS

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pos: [c] long -> ([c, d], [c, d])
        top = int(pos.max()) + 1
        if top > self._cos.shape[0]:
            n = max(top, 2 * self._cos.shape[0], 256)
            cos, sin = rope_cos_sin(torch.arange(n), self.d, self.head.config.rope_theta, torch.float32)  # [n, d] each
            sin[:, : self.d // 2].neg_()
            self._cos, self._sin = cos, sin
        return self._cos[pos], self._sin[pos]

    def run(
        self,
        keys: torch.Tensor,  # [layers, slots, kv_heads, length, head_dim] the head's key storage
        values: torch.Tensor,  # [layers, slots, kv_heads, length, head_dim]
        tokens: torch.Tensor,  # [n, m] long: the token after each position
        g: torch.Tensor,  # [n, m, hidden] fused target features, or the draft's own previous outputs
        pos: torch.Tensor,  # [n, m] long positions, consecutive within a row
        row0: int,  # the rows' cache slots are row0 .. row0 + n - 1
    ) -> torch.Tensor | None:  # [n, m, hidden] the last layer's pre-norm output; None: not for this call
        n, m = tokens.shape
        if m > _MAX_Q or not keys.is_contiguous() or not values.is_contiguous():
            return None
        c = n * m
        flat = pos.reshape(c)
        cos, sin = self._rope(flat)
        kv_rows = torch.arange(row0, row0 + n)[:, None, None] * self.hk + torch.arange(self.hk)[None, None, :]
        idx = (kv_rows * keys.shape[3] + pos[:, :, None]).reshape(-1)  # [c * kv_heads] rows of keys[i].view(-1, d)
        st = _Step(keys, values, idx, cos, sin, pos[:, 0].contiguous(), n, m, row0, int(flat.max()) + 1)
        e = F.embedding(tokens.reshape(c), self.head._embed)  # [c, hidden] (the target's, float32 like the head)
        h = g.reshape(c, -1)
        for i, layer in enumerate(self.head.layers):
            h = self._layer(layer, i, e if i == 0 else None, h, st)
        return h.view(n, m, -1)

    def _norm(self, x: torch.Tensor, norm: RMSNorm) -> torch.Tensor:  # x: [c, hidden]
        return self.glue.rms_norm(x, norm.weight, norm.eps)

    def _layer(
        self,
        layer: DraftLayer,
        i: int,
        e: torch.Tensor | None,  # [c, hidden] token embeddings (first layer)
        h: torch.Tensor,  # [c, hidden] the feature g (first layer) or the previous layer's output: the residual
        st: _Step,
    ) -> torch.Tensor:  # [c, hidden] the layer's (pre-norm) output
        if e is not None:
            x = torch.cat([self._norm(e, layer.input_layernorm), self._norm(h, layer.hidden_norm)], -1)
        else:
            x = self._norm(h, layer.input_layernorm)
        a = layer.self_attn
        qkv = torch.cat([a.q_proj(x), a.k_proj(x), a.v_proj(x)], -1).view(-1, self.hq + 2 * self.hk, self.d)
        kv = (st.keys, st.values, i, st.row0, st.kv_len, st.idx, None, st.n, st.m, self.scale, st.starts, _MAX_Q)
        attn = self.glue.rope_kv_attend(qkv, self.hq, self.hk, st.cos, st.sin, *kv)  # [c, hq * d]
        post = layer.post_attention_layernorm
        h, x = self.glue.add_rms_norm(h, a.o_proj(attn), post.weight, post.eps)
        mlp = layer.mlp
        return h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [n, hidden] -> [n, draft_vocab]
        """:meth:`DraftHead.logits` with the glue's RMSNorm."""
        head = self.head
        return head.lm_head(self._norm(h, head.norm))


@dataclass
class _Step:
    """What every layer of one call shares."""

    keys: torch.Tensor  # [layers, slots, kv_heads, length, head_dim]
    values: torch.Tensor  # [layers, slots, kv_heads, length, head_dim]
    idx: torch.Tensor  # [n * m * kv_heads] long: the KV rows each new key/value goes to
    cos: torch.Tensor  # [n * m, head_dim]
    sin: torch.Tensor  # [n * m, head_dim] sign-folded
    starts: torch.Tensor  # [n] long: each row's first position
    n: int
    m: int
    row0: int
    kv_len: int
