"""EAGLE-3 draft head in the layout of vLLM's ``Eagle3LlamaForCausalLM``: decoder layer(s) over the target's features.

Model (per position t of a sequence ``x``; ``f_t`` are the target's aux-layer features at position t, i.e. hidden
states of the layers ``fuse_layers`` that produced ``x_{t+1}``)::

    g_t   = fc(concat(f_t[l] for l in fuse_layers))                 # [hidden]
    a_t   = concat(input_layernorm(embed(x_{t+1})), hidden_norm(g_t))  # [2*hidden]  embed = the target's (frozen)
    h_t   = g_t + o_proj(Attn(q/k/v_proj(a_t) | positions <= t))    # layer 0 ("midlayer"): q/k/v read the 2H input
    h_t   = h_t + mlp(post_attention_layernorm(h_t))
    (layers 1.. num_hidden_layers-1: plain Llama decoder layers over h)
    logits_t = lm_head(norm(h_t))                                   # [draft_vocab]  predicts x_{t+2}

Drafting from a sequence whose positions ``0..L-1`` the target has verified (pending token ``x_L``): position
``L-1`` gives ``d_1``; then the draft continues on its own output — position ``L`` takes ``(g = h_{L-1}, d_1)``
(the pre-norm output stands in for ``g``, as in vLLM's EAGLE-3 proposer) and gives ``d_2``, and so on. Its
keys/values live in its own small KV cache, one per layer; draft positions past the verified length are
overwritten when the next verified features arrive.

**Reduced vocabulary.** The head predicts over ``draft_vocab_size`` frequency-ranked target tokens
(``draft_to_target``); its output rows start as the target's own rows for those tokens and are trained unless
``train_lm_head`` is False. A token outside the draft vocabulary gets draft probability 0 and is never proposed, so
verification stays lossless.

Training uses *training-time test* (:func:`DraftHead.ttt_logits`): the head is unrolled on its own outputs for
several steps, exactly as it runs when drafting, and every step is scored against the target's distribution
(see ``atlas_rl.training.losses``). Checkpoints: :mod:`atlas_rl.speculators.draft_head_io` (the directory vLLM
loads with ``speculative_config={"method": "eagle3", "model": DIR}``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from atlas_rl.attention_backends import decode_attention

logger = logging.getLogger(__name__)


@dataclass
class DraftHeadConfig:
    """Shape of a draft head. ``from_target`` fills the target-dependent fields from a HF model."""

    hidden_size: int = field(metadata={"help": "The target's hidden size (features and embeddings)."})
    target_vocab_size: int = field(metadata={"help": "The target's vocabulary size."})
    draft_vocab_size: int = field(default=8192, metadata={"help": "Tokens the head can propose (frequency-ranked)."})
    fuse_layers: tuple[int, ...] = field(
        default=(-1,),
        metadata={
            "help": "Target hidden_states indices fused by fc (0=embeddings, l=after layer l, -1=final); vLLM's "
            "eagle_aux_hidden_state_layer_ids, which needs 0 <= l < num_layers."
        },
    )
    num_hidden_layers: int = field(default=1, metadata={"help": "Decoder layers of the head (EAGLE-3: 1)."})
    num_attention_heads: int = field(default=8, metadata={"help": "Attention heads of the draft layers."})
    num_key_value_heads: int = field(default=4, metadata={"help": "Key/value heads of the draft layers (GQA)."})
    head_dim: int = field(default=64, metadata={"help": "Dimension per attention head."})
    intermediate_size: int = field(default=1536, metadata={"help": "MLP width of the draft layers."})
    rms_norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base (the target's)."})
    max_position_embeddings: int = field(default=8192, metadata={"help": "Longest sequence the head drafts for."})
    train_lm_head: bool = field(
        default=True, metadata={"help": "Train the draft output rows (else frozen copies of the target's rows)."}
    )
    target_name: str = field(default="", metadata={"help": "Which target this head was trained for (checked)."})

    def __post_init__(self) -> None:
        self.fuse_layers = tuple(int(x) for x in self.fuse_layers)
        for name in (
            "hidden_size",
            "target_vocab_size",
            "draft_vocab_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DraftHeadConfig.{name} must be a positive int, got {v!r}")
        if self.draft_vocab_size > self.target_vocab_size:
            raise ValueError(
                f"draft_vocab_size ({self.draft_vocab_size}) cannot exceed the target vocabulary "
                f"({self.target_vocab_size}); lower draft_vocab_size"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (rotary embeddings)")
        if not self.fuse_layers:
            raise ValueError("fuse_layers needs at least one target layer, e.g. (2, 15, 27) or (-1,)")

    @classmethod
    def from_target(cls, model: nn.Module, **overrides: Any) -> DraftHeadConfig:
        """Target-dependent fields from a HF causal LM config; everything else from ``overrides``/defaults."""
        c = model.config
        kw: dict[str, Any] = dict(
            hidden_size=int(c.hidden_size),
            target_vocab_size=int(model.get_output_embeddings().weight.shape[0]),
            rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-5)),
            rope_theta=float(_rope_theta(c)),
            max_position_embeddings=int(getattr(c, "max_position_embeddings", 8192)),
            num_attention_heads=int(c.num_attention_heads),
            num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or c.num_attention_heads),
            head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
            target_name=target_fingerprint(model),
        )
        kw.update(overrides)
        return cls(**kw)


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        theta = params.get("rope_theta", 10000.0) if isinstance(params, dict) else 10000.0
    return float(theta)


def default_fuse_layers(num_layers: int) -> tuple[int, ...]:
    """vLLM's default EAGLE-3 aux layers of an L-layer target, ``(2, L // 2, L - 3)``, clamped into ``[0, L - 1]``
    (HF ``hidden_states`` indices; every one is a layer vLLM can hand the drafter)."""
    return tuple(min(max(x, 0), num_layers - 1) for x in (2, num_layers // 2, num_layers - 3))


def target_fingerprint(model: nn.Module) -> str:
    """A short description of the target a head belongs to (architecture, sizes, vocabulary)."""
    c = model.config
    return (
        f"{getattr(c, 'model_type', '?')}-L{c.num_hidden_layers}-H{c.hidden_size}"
        f"-V{model.get_output_embeddings().weight.shape[0]}"
    )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., dim]
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rope_cos_sin(
    positions: torch.Tensor,  # [...] long
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:  # each [..., head_dim]
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[..., None] * inv  # [..., head_dim/2]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(
    x: torch.Tensor,  # [b, heads, t, head_dim]
    cos: torch.Tensor,  # [b, t, head_dim]
    sin: torch.Tensor,  # [b, t, head_dim]
) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rot * sin[:, None]


class _Attention(nn.Module):
    def __init__(self, c: DraftHeadConfig, in_size: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(in_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(in_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(in_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)


class _MLP(nn.Module):
    def __init__(self, c: DraftHeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DraftLayer(nn.Module):
    """One decoder layer; the first (``first=True``, vLLM's ``midlayer``) reads the 2H concatenation of the
    normed token embedding and the normed feature, with the feature as residual."""

    def __init__(self, c: DraftHeadConfig, first: bool) -> None:
        super().__init__()
        H = c.hidden_size
        self.first = first
        self.input_layernorm = RMSNorm(H, c.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(H, c.rms_norm_eps)
        self.self_attn = _Attention(c, 2 * H if first else H)
        self.post_attention_layernorm = RMSNorm(H, c.rms_norm_eps)
        self.mlp = _MLP(c)

    def layer_input(
        self,
        e: torch.Tensor | None,  # [b, t, hidden] token embeddings (first layer only)
        h: torch.Tensor,  # [b, t, hidden] the feature g (first layer) or the previous layer's output
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (attention input [b, t, 2H or H], residual [b, t, hidden])
        if self.first:
            assert e is not None
            return torch.cat([self.input_layernorm(e), self.hidden_norm(h)], -1), h
        return self.input_layernorm(h), h

    def finish(
        self,
        residual: torch.Tensor,  # [b, t, hidden]
        attn: torch.Tensor,  # [b, t, heads*d]
    ) -> torch.Tensor:  # [b, t, hidden] the layer's (pre-norm) output
        h = residual + self.self_attn.o_proj(attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class DraftHead(nn.Module):
    """The draft network (weights only; the serving logic is :class:`DraftHeadSpeculator`)."""

    def __init__(self, config: DraftHeadConfig, draft_to_target: torch.Tensor | None = None) -> None:
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        self.fc = nn.Linear(len(c.fuse_layers) * H, H, bias=False)
        self.layers = nn.ModuleList([DraftLayer(c, first=i == 0) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(H, c.rms_norm_eps)
        self.lm_head = nn.Linear(H, c.draft_vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(c.train_lm_head)
        if draft_to_target is None:
            draft_to_target = torch.arange(c.draft_vocab_size)
        self.register_buffer("draft_to_target", draft_to_target.long().clone(), persistent=True)
        self.register_buffer("target_to_draft", self._inverse_map(draft_to_target), persistent=False)
        # the target's input embedding weights [vocab, hidden], frozen, not part of the state (see bind_target)
        self._embed: torch.Tensor | None = None
        # output rows not yet initialised (from the target or a checkpoint): refuse to draft with random rows
        self.lm_head_ready = False
        # frozen output rows that are copies of the target's (refreshed after policy updates; see adaptive.py)
        self.rows_follow_target = False
        self._init_weights()

    def _inverse_map(self, d2t: torch.Tensor) -> torch.Tensor:
        inv = torch.full((self.config.target_vocab_size,), -1, dtype=torch.long)
        inv[d2t.long()] = torch.arange(d2t.numel())
        return inv

    def _init_weights(self) -> None:
        std = 0.02
        nn.init.normal_(self.fc.weight, std=std)
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                nn.init.normal_(lin.weight, std=std)
            for lin in (a.o_proj, m.down_proj):
                nn.init.normal_(lin.weight, std=std / math.sqrt(2))

    # ----------------------------------------------------------------------------------------- binding
    def bind_target(self, model: nn.Module, init_lm_head: bool = False, copy_embedding: bool = False) -> DraftHead:
        """Use the target's (frozen) input embedding; optionally copy its output rows into the draft head.

        The embedding is read as a tensor (``F.embedding``), never by calling the target's module (so no framework
        hooks fire, e.g. DeepSpeed ZeRO-3's parameter tracking). By default the head shares the target's storage
        and so follows in-place policy updates; ``copy_embedding=True`` keeps a private copy (for targets whose
        parameters are only materialised temporarily, like ZeRO-3: call this again at each rollout).
        """
        weight = model.get_input_embeddings().weight
        if tuple(weight.shape) != (self.config.target_vocab_size, self.config.hidden_size):
            raise ValueError(
                f"this draft head expects a target with vocabulary {self.config.target_vocab_size} and hidden size "
                f"{self.config.hidden_size}; the model has {tuple(weight.shape)}"
            )
        w = weight.detach()
        object.__setattr__(self, "_embed", w.clone() if copy_embedding else w)  # not registered: never saved/trained
        if init_lm_head:
            with torch.no_grad():
                out = model.get_output_embeddings().weight
                rows = out[self.draft_to_target.to(out.device)]
                self.lm_head.weight.copy_(rows.to(device=self.lm_head.weight.device, dtype=self.lm_head.weight.dtype))
            self.lm_head_ready = True
            self.rows_follow_target = True
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [...] long -> [..., hidden]
        if self._embed is None:
            raise RuntimeError("DraftHead.bind_target(model) must be called before use")
        return F.embedding(tokens.to(self._embed.device), self._embed)

    # ----------------------------------------------------------------------------------------- pieces
    def fuse_features(self, feats: torch.Tensor) -> torch.Tensor:  # feats: [..., n_layers*hidden] -> [..., hidden]
        return self.fc(feats)

    def token_embeddings(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``tokens`` [b, t] -> [b, t, hidden] in ``like``'s dtype; no gradient into the target's embedding."""
        with torch.no_grad():
            return self.embed(tokens).to(device=like.device, dtype=like.dtype)

    def qkv(
        self,
        layer: int,
        x: torch.Tensor,  # [b, t, 2H or H] the layer's attention input (DraftLayer.layer_input)
        positions: torch.Tensor,  # [b, t] long
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [b,h,t,d], k/v [b,kvh,t,d]
        c = self.config
        a = self.layers[layer].self_attn
        b, t, _ = x.shape
        q = a.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = a.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = a.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self,
        q: torch.Tensor,  # [b, heads, t, d]
        k: torch.Tensor,  # [b, kv_heads, s, d]
        v: torch.Tensor,  # [b, kv_heads, s, d]
        mask: torch.Tensor,  # [b, 1, t, s] bool
    ) -> torch.Tensor:  # [b, t, heads*d]
        """Grouped-query attention with the query heads of each kv head folded into its query rows: keys and values
        are read as they are (no ``repeat_interleave`` copy of the cache: at 4 rows x 260 positions that copy was
        ~5 MB per draft-layer pass, more than the layer's bfloat16 weights)."""
        b, h, t, d = q.shape
        kvh = k.shape[1]
        rep = h // kvh
        qf = q.reshape(b, kvh, rep * t, d)  # query head kv * rep + r, position i -> row r * t + i of kv head kv
        m = mask if rep == 1 else mask.repeat(1, 1, rep, 1)  # [b, 1, rep*t, s]
        with decode_attention(q.device):
            out = F.scaled_dot_product_attention(qf, k, v, attn_mask=m)  # [b, kvh, rep*t, d]
        # reshape, not view: a GPU kernel may return the output strided as [b, rep*t, kvh, d] (a view on a CPU)
        return out.reshape(b, h, t, d).transpose(1, 2).reshape(b, t, h * d)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [..., hidden] -> [..., draft_vocab]
        if not self.lm_head_ready:
            raise RuntimeError(
                "the draft output rows are not initialised: load a checkpoint or call "
                "bind_target(model, init_lm_head=True)"
            )
        return self.lm_head(self.norm(h))

    # ----------------------------------------------------------------------------------------- training
    def ttt_logits(
        self,
        tokens: torch.Tensor,  # [b, T] long, x_0 .. x_{T-1}
        feats: torch.Tensor,  # [b, T, n_layers*hidden] target features f_t (produced x_{t+1})
        valid: torch.Tensor,  # [b, T] bool, real (non-padding) positions
        steps: int,
    ) -> list[torch.Tensor]:
        """Training-time test: unroll the head ``steps`` times as it runs when drafting.

        Returns one ``[b, T, draft_vocab]`` tensor per step j = 1..steps: entry t of step j is the head's
        prediction of ``x_{t+j+1}`` after drafting from base position t — step 1 from the target features
        (teacher forcing), step j > 1 from its own step j-1 output at t, fed the true token ``x_{t+j}`` (drafts
        only continue after an accepted token). Step j's query sits at position ``t+j-1`` and attends, in every
        layer, to the target-feature keys of positions ``<= t`` plus its own earlier steps' keys for the same base
        t (the diagonal): the exact attention pattern of a draft chain on top of a verified prefix.
        """
        b, T = tokens.shape
        pos = torch.arange(T, device=tokens.device)[None].expand(b, T)
        causal = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]  # [b, t, s]
        state = _TTTState(len(self.layers))
        h = self.fuse_features(feats.to(self.fc.weight.dtype))
        outs = []
        for j in range(1, steps + 1):
            tok_j = torch.cat([tokens[:, j:], tokens[:, -1:].expand(b, j)], 1)[:, :T]  # x_{t+j}
            h = self._ttt_step(tok_j, h, pos + (j - 1), causal, state, first=j == 1)
            outs.append(self.logits(h))
        return outs

    def _ttt_step(
        self,
        tok: torch.Tensor,  # [b, T] input tokens of this step
        g: torch.Tensor,  # [b, T, hidden] features (step 1) or the previous step's output
        pos: torch.Tensor,  # [b, T] query positions
        causal: torch.Tensor,  # [b, T, T] bool, base-position mask
        state: _TTTState,
        first: bool,
    ) -> torch.Tensor:  # [b, T, hidden]
        e = self.token_embeddings(tok, g)
        h = g
        for i, layer in enumerate(self.layers):
            x, res = layer.layer_input(e if i == 0 else None, h)
            q, k, v = self.qkv(i, x, pos)
            k, v = self._repeat_kv(k), self._repeat_kv(v)
            if first:
                state.main_k[i], state.main_v[i] = k, v
                attn = self._attend_full(q, k, v, causal)
            else:
                state.diag_k[i].append(k)
                state.diag_v[i].append(v)
                attn = self._attend_ttt(q, state, i, causal)
            h = layer.finish(res, attn)
        return h

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:  # [b, kvh, T, d] -> [b, heads, T, d]
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        return x.repeat_interleave(rep, 1) if rep > 1 else x

    @staticmethod
    def _attend_full(
        q: torch.Tensor,  # [b, heads, T, d]
        k: torch.Tensor,  # [b, heads, T, d]
        v: torch.Tensor,  # [b, heads, T, d]
        causal: torch.Tensor,  # [b, T, T] bool
    ) -> torch.Tensor:  # [b, T, heads*d]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal[:, None])
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)

    def _attend_ttt(self, q: torch.Tensor, state: _TTTState, i: int, causal: torch.Tensor) -> torch.Tensor:
        """Step j > 1 of layer ``i``: q [b, heads, T, d] attends to the step-1 keys of positions <= t (masked by
        ``causal`` [b, T, T]) and to its own earlier steps' keys at the same base t; returns [b, T, heads*d]."""
        T = q.shape[2]
        scale = 1.0 / math.sqrt(self.config.head_dim)
        s_main = torch.matmul(q, state.main_k[i].transpose(-1, -2)) * scale  # [b, heads, T, T]
        s_main = s_main.masked_fill(~causal[:, None], float("-inf"))
        s_diag = torch.stack([(q * dk).sum(-1) * scale for dk in state.diag_k[i]], -1)  # [b, heads, T, j-1]
        p = torch.softmax(torch.cat([s_main, s_diag], -1), -1)
        out = torch.matmul(p[..., :T], state.main_v[i])
        for n, dv in enumerate(state.diag_v[i]):
            out = out + p[..., T + n, None] * dv
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)

    # ----------------------------------------------------------------------------------------- I/O
    def save_pretrained(
        self,
        directory: str | Path,
        dtype: torch.dtype | None = torch.float16,
        card: dict[str, Any] | None = None,
        max_shard_bytes: int | None = None,
    ) -> Path:
        """Write the directory vLLM loads as an EAGLE-3 drafter (see :mod:`~atlas_rl.speculators.draft_head_io`)."""
        from atlas_rl.speculators.draft_head_io import MAX_SHARD_BYTES, save_pretrained

        return save_pretrained(
            self, directory, dtype=dtype, card=card, max_shard_bytes=max_shard_bytes or MAX_SHARD_BYTES
        )

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, target: nn.Module | None = None, dtype: torch.dtype = torch.float32
    ) -> DraftHead:
        """Load a head directory written by :meth:`save_pretrained`; bind to ``target`` (checked) when given."""
        from atlas_rl.speculators.draft_head_io import from_pretrained

        return from_pretrained(directory, target=target, dtype=dtype)

    @staticmethod
    def read_card(directory: str | Path) -> dict[str, Any]:
        from atlas_rl.speculators.draft_head_io import read_card

        return read_card(directory)


@dataclass
class _TTTState:
    """Per-layer keys/values of the training-time test: step 1's (all positions) and the later steps' diagonals."""

    n_layers: int
    main_k: list[Any] = field(default_factory=list)
    main_v: list[Any] = field(default_factory=list)
    diag_k: list[list[torch.Tensor]] = field(default_factory=list)
    diag_v: list[list[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.main_k = [None] * self.n_layers
        self.main_v = [None] * self.n_layers
        self.diag_k = [[] for _ in range(self.n_layers)]
        self.diag_v = [[] for _ in range(self.n_layers)]


def head_cost_macs(config: DraftHeadConfig) -> int:
    """Multiply-accumulates per drafted token of a head (draft layers + output rows; the feature fusion ``fc``
    excluded: it runs on verified positions only). The first layer's q/k/v read the 2H concatenation."""
    c = config
    H = c.hidden_size
    qkv_out = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    per_layer = qkv_out * H + c.num_attention_heads * c.head_dim * H + 3 * H * c.intermediate_size
    return per_layer * c.num_hidden_layers + qkv_out * H + H * c.draft_vocab_size
