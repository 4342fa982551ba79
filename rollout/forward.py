"""A lean decode/verification forward for the Llama family (llama, mistral, qwen2, qwen3), gpt-fast style.

Same math as the Hugging Face decoder (``model.get_decoder()``), op for op where it matters for rounding
(RMSNorm in float32, RoPE ``q * cos + rotate_half(q) * sin`` from the same float32 tables), but without the
module stack, the per-call mask and RoPE construction, and with attention kept on SDPA's fused CPU kernel:

* it reads the model's OWN parameter tensors (module attributes looked up at every call: no copies, so
  in-place policy updates and ``update_weights`` are seen at once);
* RoPE cos/sin come from a table (float32 products ``position * inv_freq`` as HF computes them, cast once)
  grown on demand; rebuilt when ``inv_freq`` changes;
* grouped-query attention is *folded*: the ``g`` query heads that share a key/value head become ``g`` extra
  query rows of that head, so keys/values are never repeated and one additive float mask (or none: one token
  per row at equal positions) keeps SDPA on its flash kernel instead of the boolean-mask math path;
* the small matmuls use :func:`small_linear` (``(W @ x.T).T`` on float32 CPU, see :mod:`.cpu_linear`).

The HF decoder remains the reference: ``tests/unit/test_forward.py`` checks equality (1e-10 in float64, 1e-4
in float32) for every supported family with ragged cache lengths. Bump :data:`FORWARD_VERSION` whenever this
file changes what a forward costs: it is part of the verification cost model's cache key.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_linear import small_linear
from .kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

FORWARD_VERSION = 2
LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def lean_forward_unsupported(model: nn.Module) -> str | None:
    """Why :class:`LeanForward` cannot run ``model`` (None when it can)."""
    mc = getattr(model, "config", None)
    if getattr(mc, "model_type", None) not in LEAN_MODEL_TYPES:
        return f"model type {getattr(mc, 'model_type', None)!r}"
    decoder = model.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in STATIC_ROPE_TYPES:
        return f"RoPE type {getattr(rotary, 'rope_type', None)!r} (only static tables are supported)"
    if getattr(mc, "hidden_act", "silu") not in ("silu", "swish"):
        return f"activation {mc.hidden_act!r}"
    return None


class LeanForward:
    """``(input_ids [n, q], starts [n], cache, want_hidden) -> (last_hidden [n, q, H], hidden_states | None)``.

    ``hidden_states`` follows HF's ``output_hidden_states``: the embeddings, the output of every layer but the
    last, and the final normed output (``num_layers + 1`` tensors ``[n, q, H]``).
    """

    def __init__(self, model: nn.Module, cpu_linear: bool = True) -> None:
        why = lean_forward_unsupported(model)
        if why is not None:
            raise ValueError(f"LeanForward does not support this model: {why}")
        mc = model.config
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        self.num_heads = int(mc.num_attention_heads)
        self.num_kv_heads = int(getattr(mc, "num_key_value_heads", None) or self.num_heads)
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = int(getattr(mc, "head_dim", None) or mc.hidden_size // self.num_heads)
        self.scaling = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.cpu_linear = cpu_linear
        self._rope_key: tuple | None = None
        self._cos: torch.Tensor | None = None  # [P, head_dim]
        self._sin: torch.Tensor | None = None  # [P, head_dim]

    # ------------------------------------------------------------------------------------------ pieces
    def _linear(self, x: torch.Tensor, mod: nn.Linear) -> torch.Tensor:  # x: [c, in] -> [c, out]
        if self.cpu_linear:
            return small_linear(x, mod.weight, mod.bias)
        return F.linear(x, mod.weight, mod.bias)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # x: [..., d]; HF's RMSNorm, op for op
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    def _rope_tables(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[P >= length, head_dim]`` exactly as HF's rotary embedding computes them per position."""
        rotary = self.decoder.rotary_emb
        inv = rotary.inv_freq
        key = (inv.data_ptr(), inv._version, float(rotary.attention_scaling), dtype, device)
        if self._cos is None or self._rope_key != key or self._cos.shape[0] < length:
            size = max(length, 256, 0 if self._cos is None else 2 * self._cos.shape[0])
            pos = torch.arange(size, device=device, dtype=torch.float32)
            freqs = pos[:, None] * inv.to(device=device, dtype=torch.float32)[None, :]  # [P, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * rotary.attention_scaling).to(dtype)
            self._sin = (emb.sin() * rotary.attention_scaling).to(dtype)
            self._rope_key = key
        return self._cos, self._sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def _mask(self, starts: torch.Tensor, q: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask ``[n, 1, q * groups, kv]`` (0 where query position >= key position, else -inf); None when
        every query sees every key (one token per row, all rows at the same position)."""
        if q == 1 and bool((starts == starts[0]).all()) and int(starts[0]) + 1 == kv_len:
            return None
        qpos = starts[:, None] + torch.arange(q, device=starts.device)[None, :]  # [n, q]
        qpos = qpos.repeat_interleave(self.groups, dim=1)  # [n, q * groups]: folded query rows t * g + j
        kpos = torch.arange(kv_len, device=starts.device)
        mask = torch.zeros((starts.shape[0], 1, qpos.shape[1], kv_len), dtype=dtype, device=starts.device)
        return mask.masked_fill_((kpos[None, None, :] > qpos[:, :, None])[:, None], -math.inf)

    # ------------------------------------------------------------------------------------------ forward
    def _attention(self, layer: nn.Module, li: int, x, cos, sin, mask, cache: SlotKVCache, n: int, q: int):
        att = layer.self_attn
        hk, g, d = self.num_kv_heads, self.groups, self.head_dim
        qs = self._linear(x, att.q_proj).view(n, q, hk, g, d)
        ks = self._linear(x, att.k_proj).view(n, q, hk, d)
        vs = self._linear(x, att.v_proj).view(n, q, hk, d)
        if hasattr(att, "q_norm"):  # qwen3: RMSNorm over the head dim before RoPE
            qs, ks = self._rms(qs, att.q_norm), self._rms(ks, att.k_norm)
        qs = self._rotate(qs, cos[:, :, None, None], sin[:, :, None, None])
        ks = self._rotate(ks, cos[:, :, None], sin[:, :, None])
        keys, values = cache.write_step(li, ks, vs)  # [n, hk, kv, d] each
        qf = qs.permute(0, 2, 1, 3, 4).reshape(n, hk, q * g, d)  # folded GQA: [n, hk, q * g, d]
        out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=self.scaling)
        out = out.view(n, hk, q, g, d).permute(0, 2, 1, 3, 4).reshape(n * q, hk * g * d)  # [c, heads * d]
        return self._linear(out, att.o_proj)

    def _mlp(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:  # x: [c, H]
        return self._linear(F.silu(self._linear(x, mlp.gate_proj)) * self._linear(x, mlp.up_proj), mlp.down_proj)

    def __call__(
        self,
        input_ids: torch.Tensor,  # [n, q]
        starts: torch.Tensor,  # [n] cache length of each row (position of input_ids[:, 0])
        cache: SlotKVCache,
        want_hidden: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        n, q = input_ids.shape
        kv_len = int(starts.max()) + q
        h = F.embedding(input_ids.reshape(-1), self.decoder.embed_tokens.weight)  # [c, H]
        cos_t, sin_t = self._rope_tables(kv_len, h.dtype, h.device)
        pos = starts[:, None] + torch.arange(q, device=starts.device)[None, :]  # [n, q]
        cos, sin = cos_t[pos], sin_t[pos]  # [n, q, d]
        mask = self._mask(starts, q, kv_len, h.dtype)
        cache.set_step(0, starts, q, kv_len)
        hidden = [h] if want_hidden else None
        for li, layer in enumerate(self.layers):
            h = h + self._attention(layer, li, self._rms(h, layer.input_layernorm), cos, sin, mask, cache, n, q)
            h = h + self._mlp(layer.mlp, self._rms(h, layer.post_attention_layernorm))
            if hidden is not None and li < len(self.layers) - 1:
                hidden.append(h)
        h = self._rms(h, self.decoder.norm).view(n, q, -1)
        if hidden is None:
            return h, None
        return h, tuple(t.view(n, q, -1) for t in hidden) + (h,)
