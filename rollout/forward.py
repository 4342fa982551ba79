"""A lean decode/verification forward for the Llama family (llama, mistral, qwen2, qwen3), gpt-fast style.

Same math as the Hugging Face decoder (``model.get_decoder()``), op for op where it matters for rounding
(RMSNorm in float32, RoPE ``q * cos + rotate_half(q) * sin`` from the same float32 tables), but without the
module stack, the per-call mask and RoPE construction, and with attention kept on SDPA's fused CPU kernel:

* it reads the model's OWN parameter tensors (from the layers' parameter dicts at every call, the submodules
  resolved once: no copies, so in-place policy updates, replaced parameters and ``update_weights`` are seen at
  once);
* RoPE cos/sin come from a table (float32 products ``position * inv_freq`` as HF computes them, cast once)
  grown on demand; rebuilt when ``inv_freq`` changes;
* grouped-query attention is *folded*: the ``g`` query heads that share a key/value head become ``g`` extra
  query rows of that head, so keys/values are never repeated and one additive float mask (or none: one token
  per row at equal positions) keeps SDPA on its flash kernel instead of the boolean-mask math path;
* the small matmuls use :func:`small_linear` (the kernel tuned for this machine, see :mod:`.cpu_linear`);
* on a CPU, fewer and cheaper ops per layer: each op that follows a matmul streaming megabytes of weights starts
  with cold caches (an RMSNorm costs ~70 us there against ~12 us warm), so q/k/v and gate/up run as one matmul
  each over concatenated weights (:class:`FusedProjections`: a copy, rebuilt when a weight changes), RMSNorm is
  a sum and in-place ops, RoPE is one ``addcmul`` over q and k together with a sign-folded sine table; with
  ``glue`` (float32 CPU, default) RMSNorm, residual add + RMSNorm and SiLU x up are one compiled loop each, and RoPE,
  the KV-cache write and SDPA one compiled call (:mod:`.cpu_glue`).

The HF decoder remains the reference: ``tests/unit/test_forward.py`` checks equality (1e-10 in float64, 1e-4
in float32) for every supported family with ragged cache lengths. Bump :data:`FORWARD_VERSION` whenever this
file changes what a forward costs: it is part of the verification cost model's cache key.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from atlas_rl.attention_backends import decode_attention

from . import cpu_glue
from .cpu_linear import small_linear
from .kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

FORWARD_VERSION = 5
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


class FusedProjections:
    """The q/k/v and the gate/up weights (and biases) of every layer concatenated: one matmul each per layer.

    A copy (the attention and MLP input weights once more in memory), made on first use and again whenever a source
    changes (another tensor, or its ``_version`` moved: an in-place optimizer step); :meth:`clear` drops them all
    (``RolloutEngine.update_weights``: an update through ``.data`` keeps ``_version``). Weights that track no
    version (inference tensors) and layers whose parts differ in having a bias are not fused (None)."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, str], tuple[tuple, torch.Tensor, torch.Tensor | None]] = {}

    def clear(self) -> None:
        self._cache.clear()

    def get(
        self, li: int, part: str, mods: Sequence[nn.Linear]
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:  # ([sum of out, in], [sum of out] | None)
        pairs = [_wb(m) for m in mods]
        weights, biases = [w for w, _ in pairs], [b for _, b in pairs]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            return None
        parts = weights + [b for b in biases if b is not None]
        try:
            key = tuple((t.data_ptr(), t._version) for t in parts)
        except RuntimeError:  # an inference tensor tracks no version: a copy of it could go stale unseen
            return None
        hit = self._cache.get((li, part))
        if hit is not None and hit[0] == key:
            return hit[1], hit[2]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: oneDNN caches its packed copy
            weight = torch.cat(weights)
            bias = None if biases[0] is None else torch.cat(biases)
        self._cache[(li, part)] = (key, weight, bias)
        return weight, bias


class _Block(NamedTuple):
    """One decoder layer's submodules, looked up once (``nn.Module.__getattr__`` costs ~0.5 us a call, ~900 calls a
    forward); their parameters are still read at every call, from the modules' parameter dicts."""

    att: nn.Module
    qkv: tuple[nn.Module, ...]  # q_proj, k_proj, v_proj
    o: nn.Module
    mlp: nn.Module
    gate_up: tuple[nn.Module, ...]  # gate_proj, up_proj
    down: nn.Module
    post_norm: nn.Module  # post_attention_layernorm
    next_norm: nn.Module  # the next layer's input_layernorm, the decoder's final norm after the last layer
    qk_norm: bool  # qwen3: RMSNorm of q and k over the head dim

    @classmethod
    def of(cls, layer: nn.Module, next_norm: nn.Module) -> _Block:
        att, mlp = layer.self_attn, layer.mlp
        return cls(
            att,
            (att.q_proj, att.k_proj, att.v_proj),
            att.o_proj,
            mlp,
            (mlp.gate_proj, mlp.up_proj),
            mlp.down_proj,
            layer.post_attention_layernorm,
            next_norm,
            hasattr(att, "q_norm"),
        )


def _wb(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A linear module's (weight [out, in], bias [out] | None), read from its parameter dict."""
    return mod._parameters["weight"], mod._parameters.get("bias")


class LeanForward:
    """``(input_ids [n, q], starts [n], cache, want_hidden) -> (last_hidden [n, q, H], hidden_states | None)``.

    ``hidden_states`` follows HF's ``output_hidden_states``: the embeddings, the output of every layer but the
    last, and the final normed output (``num_layers + 1`` tensors ``[n, q, H]``). ``fuse``: run q/k/v and gate/up
    as one matmul each (:class:`FusedProjections`; default: on a CPU). ``glue``: the small ops as compiled loops
    (:mod:`.cpu_glue`; default: for a float32 CPU model, when they build).
    """

    def __init__(
        self, model: nn.Module, cpu_linear: bool = True, fuse: bool | None = None, glue: bool | None = None
    ) -> None:
        why = lean_forward_unsupported(model)
        if why is not None:
            raise ValueError(f"LeanForward does not support this model: {why}")
        mc = model.config
        self.decoder = model.get_decoder()
        self.layers = list(self.decoder.layers)
        nxt = [layer.input_layernorm for layer in self.layers[1:]] + [self.decoder.norm]
        self._blocks = [_Block.of(layer, norm) for layer, norm in zip(self.layers, nxt)]
        self.num_heads = int(mc.num_attention_heads)
        self.num_kv_heads = int(getattr(mc, "num_key_value_heads", None) or self.num_heads)
        self.groups = self.num_heads // self.num_kv_heads
        self.head_dim = int(getattr(mc, "head_dim", None) or mc.hidden_size // self.num_heads)
        self.scaling = float(getattr(self.layers[0].self_attn, "scaling", self.head_dim**-0.5))
        self.cpu_linear = cpu_linear
        p = next(model.parameters())
        if fuse is None:
            fuse = p.device.type == "cpu"
        self.fused = FusedProjections() if fuse else None
        if glue is None:
            glue = p.device.type == "cpu" and p.dtype == torch.float32
        self.glue = cpu_glue.glue_kernels() if glue else None
        self._rope_key: tuple | None = None
        self._cos: torch.Tensor | None = None  # [P, head_dim]
        self._sin: torch.Tensor | None = None  # [P, head_dim], sign-folded: -sin on the first half

    def weight_chain(self, lm_head: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The weights a forward multiplies by, in order (the fused copies where projections are fused), then
        ``lm_head``: what the kernel plan is tuned over (:func:`~.kernel_tune.load_or_tune`)."""
        chain = []
        with torch.no_grad():
            for li, layer in enumerate(self.layers):
                att, mlp = layer.self_attn, layer.mlp
                parts = (("qkv", (att.q_proj, att.k_proj, att.v_proj)), ("o", (att.o_proj,)))
                parts += (("gate_up", (mlp.gate_proj, mlp.up_proj)), ("down", (mlp.down_proj,)))
                for part, mods in parts:
                    fused = self.fused.get(li, part, mods) if self.fused is not None and len(mods) > 1 else None
                    chain.extend([fused[0]] if fused is not None else [m.weight for m in mods])
        return chain + ([] if lm_head is None else [lm_head])

    # ------------------------------------------------------------------------------------------ pieces
    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:  # x: [c, in] -> [c, out]
        if self.cpu_linear:
            return small_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # x: [..., d]; HF's RMSNorm
        if x.dtype != torch.float32:  # HF computes the norm in float32 whatever the model's dtype
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            return norm.weight * h.to(x.dtype)
        # the same products in fewer, in-place ops: mean(x^2) is sum / d on the CPU as well
        ms = (x * x).sum(-1, keepdim=True).div_(x.shape[-1]).add_(norm.variance_epsilon)
        return (x * ms.rsqrt_()).mul_(norm.weight)

    def _norm(self, x: torch.Tensor, norm: nn.Module) -> torch.Tensor:  # x: [c, H]
        if self.glue is not None and x.dtype == torch.float32:
            return cpu_glue.rms_norm(self.glue, x, norm)
        return self._rms(x, norm)

    def _add_norm(
        self, h: torch.Tensor, y: torch.Tensor, norm: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:  # h, y: [c, H] -> (h + y, RMSNorm(h + y))
        if self.glue is not None and h.dtype == torch.float32:
            return cpu_glue.add_rms_norm(self.glue, h, y, norm)
        h = h + y
        return h, self._rms(h, norm)

    def rope_tables(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE tables grown to at least ``length`` positions (before a ``static`` forward: it grows none)."""
        return self._rope_tables(length, dtype, device)

    def _rope_tables(self, length: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin ``[P >= length, head_dim]`` from HF's rotary embedding's per-position products."""
        rotary = self.decoder.rotary_emb
        inv = rotary.inv_freq
        key = (inv.data_ptr(), inv._version, float(rotary.attention_scaling), dtype, device)
        if self._cos is None or self._rope_key != key or self._cos.shape[0] < length:
            size = max(length, 256, 0 if self._cos is None else 2 * self._cos.shape[0])
            pos = torch.arange(size, device=device, dtype=torch.float32)
            freqs = pos[:, None] * inv.to(device=device, dtype=torch.float32)[None, :]  # [P, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin() * rotary.attention_scaling
            half = sin.shape[-1] // 2
            self._cos = (emb.cos() * rotary.attention_scaling).to(dtype)
            self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(dtype)
            self._rope_key = key
        return self._cos, self._sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # x: [n, q, heads, d]
        """``x * cos + rotate_half(x) * sin`` (HF's RoPE) with the sign of ``rotate_half`` folded into ``sin``."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)

    def _mask(
        self, starts: torch.Tensor, q: int, kv_len: int, dtype: torch.dtype, static: bool = False
    ) -> torch.Tensor | None:
        """Additive mask ``[n, 1, q * groups, kv]`` (0 where query position >= key position, else -inf); None when
        every query sees every key (one token per row, all rows at the same position) unless ``static`` (always a
        mask, built without reading ``starts`` on the host: what a CUDA graph can replay)."""
        if not static and q == 1 and bool((starts == starts[0]).all()) and int(starts[0]) + 1 == kv_len:
            return None
        qpos = starts[:, None] + torch.arange(q, device=starts.device)[None, :]  # [n, q]
        qpos = qpos.repeat_interleave(self.groups, dim=1)  # [n, q * groups]: folded query rows t * g + j
        kpos = torch.arange(kv_len, device=starts.device)
        mask = torch.zeros((starts.shape[0], 1, qpos.shape[1], kv_len), dtype=dtype, device=starts.device)
        return mask.masked_fill_((kpos[None, None, :] > qpos[:, :, None])[:, None], -math.inf)

    # ------------------------------------------------------------------------------------------ forward
    def _qkv(self, blk: _Block, li: int, x: torch.Tensor, fused, cos, sin, cache: SlotKVCache, n: int, q: int):
        """Rotated queries ``[n, q, heads, d]``; the step's keys and values written into ``cache``, and the keys and
        values to attend over returned, ``[n, kv_heads, kv_len, d]`` each. ``fused``: the q/k/v weights as one
        (:class:`FusedProjections`) or None."""
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        att = blk.att
        if fused is None:
            qs, ks, vs = (self._linear(x, *_wb(m)).view(n, q, -1, d) for m in blk.qkv)
        else:
            qkv = self._linear(x, *fused).contiguous().view(n, q, hq + 2 * hk, d)  # ("mm" returns a transpose)
            qs, ks, vs = qkv[:, :, :hq], qkv[:, :, hq : hq + hk], qkv[:, :, hq + hk :]
        if blk.qk_norm:  # qwen3: RMSNorm over the head dim before RoPE
            qs, ks = (
                self._rotate(self._rms(qs, att.q_norm), cos, sin),
                self._rotate(self._rms(ks, att.k_norm), cos, sin),
            )
        elif fused is not None:  # q and k side by side: one rotation
            qk = self._rotate(qkv[:, :, : hq + hk], cos, sin)
            qs, ks = qk[:, :, :hq], qk[:, :, hq:]
        else:
            qs, ks = self._rotate(qs, cos, sin), self._rotate(ks, cos, sin)
        return qs, *cache.write_step(li, ks, vs)

    def _attention(self, blk: _Block, li: int, x, cos, sin, mask: Callable, cache: SlotKVCache, n: int, q: int):
        hk, g, d = self.num_kv_heads, self.groups, self.head_dim
        fused = None if self.fused is None else self.fused.get(li, "qkv", blk.qkv)
        if fused is not None and self.glue is not None and x.dtype == torch.float32 and not blk.qk_norm:
            qkv = self._linear(x, *fused).contiguous().view(n * q, -1, d)  # ("mm" returns a transpose)
            c = n * q  # RoPE, the KV write and SDPA in one compiled call
            m = None if cpu_glue.attends_by_row(q, d) else mask()  # the row attention needs no mask
            out = cpu_glue.rope_kv_attend(
                self.glue, qkv, self.num_heads, hk, cos.view(c, d), sin.view(c, d), cache, li, m, n, q, self.scaling
            )
            return self._linear(out, *_wb(blk.o))
        qs, keys, values = self._qkv(blk, li, x, fused, cos, sin, cache, n, q)  # keys, values: [n, hk, kv, d]
        qf = qs.reshape(n, q, hk, g, d).permute(0, 2, 1, 3, 4).reshape(n, hk, q * g, d)  # folded GQA
        out = F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask(), scale=self.scaling)
        out = out.reshape(n, hk, q, g, d).permute(0, 2, 1, 3, 4).reshape(n * q, hk * g * d)  # [c, heads * d]
        return self._linear(out, *_wb(blk.o))

    def _mlp(self, li: int, blk: _Block, x: torch.Tensor) -> torch.Tensor:  # x: [c, H]
        fused = None if self.fused is None else self.fused.get(li, "gate_up", blk.gate_up)
        if fused is not None:
            gu = self._linear(x, *fused)  # [c, 2 * intermediate]
            if self.glue is not None and gu.dtype == torch.float32:
                return self._linear(cpu_glue.silu_mul(self.glue, gu), *_wb(blk.down))
            inter = gu.shape[-1] // 2
            act = F.silu(gu[:, :inter]).mul_(gu[:, inter:])
        else:
            gate, up = blk.gate_up
            act = F.silu(self._linear(x, *_wb(gate))).mul_(self._linear(x, *_wb(up)))
        return self._linear(act, *_wb(blk.down))

    def __call__(
        self,
        input_ids: torch.Tensor,  # [n, q]
        starts: torch.Tensor,  # [n] cache length of each row (position of input_ids[:, 0])
        cache: SlotKVCache,
        want_hidden: bool,
        kv_len: int | None = None,
        static: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """``kv_len``: key positions to attend over, at least ``max(starts) + q`` (None: read from ``starts``, a
        device sync on a GPU); keys past a row's own positions are masked. ``static``: no op reads a tensor on the
        host and the RoPE table is not grown (:mod:`.cuda_graphs` captures the forward in this mode)."""
        n, q = input_ids.shape
        if kv_len is None:
            kv_len = int(starts.max()) + q
        if static and (self._cos is None or self._cos.shape[0] < kv_len):
            raise RuntimeError(f"a static forward needs RoPE tables of {kv_len} positions: call rope_tables() first")
        h = F.embedding(input_ids.reshape(-1), self.decoder.embed_tokens.weight)  # [c, H]
        cos_t, sin_t = (self._cos, self._sin) if static else self._rope_tables(kv_len, h.dtype, h.device)
        pos = starts[:, None] + torch.arange(q, device=starts.device)[None, :]  # [n, q]
        cos, sin = cos_t[pos][:, :, None], sin_t[pos][:, :, None]  # [n, q, 1, d]
        # built on first use: steps the glue attends row by row in every layer (decoding, verification) need none
        mask = functools.cache(lambda: self._mask(starts, q, kv_len, h.dtype, static))
        cache.set_step(0, starts, q, kv_len)
        hidden = [h] if want_hidden else None
        x = self._norm(h, self.layers[0].input_layernorm)  # the next block's normed input
        last = len(self._blocks) - 1
        with decode_attention(h.device):
            for li, blk in enumerate(self._blocks):
                y = self._attention(blk, li, x, cos, sin, mask, cache, n, q)
                h, x = self._add_norm(h, y, blk.post_norm)
                h, x = self._add_norm(h, self._mlp(li, blk, x), blk.next_norm)
                if hidden is not None and li != last:
                    hidden.append(h)
        x = x.view(n, q, -1)  # the final norm's output
        if hidden is None:
            return x, None
        return x, tuple(t.view(n, q, -1) for t in hidden) + (x,)
