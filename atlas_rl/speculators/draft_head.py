"""EAGLE-style draft head: one decoder layer over the target's own hidden states.

Model (per position t of a sequence ``x``; ``f_t`` are the target's features at position t, i.e. the hidden
states that produced ``x_{t+1}``)::

    g_t   = fuse(concat(f_t[l] for l in fuse_layers))          # [hidden]   (identity for a single layer)
    u_t   = fc(concat(norm_e(embed(x_{t+1})), norm_g(g_t)))    # [hidden]   embed = the target's frozen embedding
    h_t   = DecoderLayer(u_t | keys/values of positions <= t)   # [hidden]   one Llama layer, RoPE at position t
    logits_t = lm_head(norm(h_t))                               # [draft_vocab]  predicts x_{t+2}

Drafting from a sequence whose positions ``0..L-1`` the target has verified (pending token ``x_L``): position
``L-1`` gives ``d_1``; then the draft continues on its own output — position ``L`` takes ``(g = h_{L-1}, d_1)``
and gives ``d_2``, and so on (EAGLE-3: the draft's output stands in for the target features it does not
have). Its keys/values live in its own small KV cache; draft positions past the verified length are
overwritten when the next verified features arrive.

**Reduced vocabulary.** The head predicts over ``draft_vocab_size`` frequency-ranked target tokens
(``draft_to_target``); its output rows start as the target's own output-head rows for those tokens and are
frozen unless ``train_lm_head``. A token outside the draft vocabulary gets draft probability 0 and is never
proposed, so verification stays lossless.

Training uses *training-time test* (:func:`DraftHead.ttt_logits`): the head is unrolled on its own outputs
for several steps, exactly as it runs when drafting, and every step is scored against the target's
distribution (soft cross-entropy, later steps weighted less; see ``atlas_rl.training.losses``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "atlas-rl/draft-head/v1"


@dataclass
class DraftHeadConfig:
    """Shape of a draft head. ``from_target`` fills the target-dependent fields from a HF model."""

    hidden_size: int = field(metadata={"help": "The target's hidden size (features and embeddings)."})
    target_vocab_size: int = field(metadata={"help": "The target's vocabulary size."})
    draft_vocab_size: int = field(default=8192, metadata={"help": "Tokens the head can propose (frequency-ranked)."})
    fuse_layers: tuple[int, ...] = field(
        default=(-1,),
        metadata={"help": "Target hidden_states indices fused as features (0=embeddings, l=after layer l, -1=final)."},
    )
    num_attention_heads: int = field(default=8, metadata={"help": "Attention heads of the draft layer."})
    num_key_value_heads: int = field(default=4, metadata={"help": "Key/value heads of the draft layer (GQA)."})
    head_dim: int = field(default=64, metadata={"help": "Dimension per attention head."})
    intermediate_size: int = field(default=1536, metadata={"help": "MLP width of the draft layer."})
    rms_norm_eps: float = field(default=1e-5, metadata={"help": "RMSNorm epsilon."})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base (the target's)."})
    max_position_embeddings: int = field(default=8192, metadata={"help": "Longest sequence the head drafts for."})
    train_lm_head: bool = field(
        default=False, metadata={"help": "Train the draft output rows (else frozen copies of the target's)."}
    )
    target_name: str = field(default="", metadata={"help": "Which target this head was trained for (checked)."})

    def __post_init__(self) -> None:
        self.fuse_layers = tuple(int(x) for x in self.fuse_layers)
        for name in (
            "hidden_size",
            "target_vocab_size",
            "draft_vocab_size",
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
            raise ValueError("fuse_layers needs at least one target layer, e.g. (-1,)")

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


class DraftHead(nn.Module):
    """The draft network (weights only; the serving logic is :class:`DraftHeadSpeculator`)."""

    def __init__(self, config: DraftHeadConfig, draft_to_target: torch.Tensor | None = None) -> None:
        super().__init__()
        c = self.config = config
        H = c.hidden_size
        nf = len(c.fuse_layers)
        self.fuse = nn.Linear(nf * H, H, bias=False) if nf > 1 else nn.Identity()
        self.norm_e = RMSNorm(H, c.rms_norm_eps)
        self.norm_g = RMSNorm(H, c.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.input_layernorm = RMSNorm(H, c.rms_norm_eps)
        self.q_proj = nn.Linear(H, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(H, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(H, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, H, bias=False)
        self.post_attention_layernorm = RMSNorm(H, c.rms_norm_eps)
        self.gate_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(H, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, H, bias=False)
        self.norm = RMSNorm(H, c.rms_norm_eps)
        self.lm_head = nn.Linear(H, c.draft_vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(c.train_lm_head)
        if draft_to_target is None:
            draft_to_target = torch.arange(c.draft_vocab_size)
        self.register_buffer("draft_to_target", draft_to_target.long().clone(), persistent=True)
        self.register_buffer("target_to_draft", self._inverse_map(draft_to_target), persistent=False)
        # the target's input embedding weights [vocab, hidden], frozen, not part of the state (see bind_target)
        self._embed: torch.Tensor | None = None
        # a frozen output head is not stored in checkpoints: it must come from the target before use
        self.lm_head_ready = c.train_lm_head
        self._init_weights()

    def _inverse_map(self, d2t: torch.Tensor) -> torch.Tensor:
        inv = torch.full((self.config.target_vocab_size,), -1, dtype=torch.long)
        inv[d2t.long()] = torch.arange(d2t.numel())
        return inv

    def _init_weights(self) -> None:
        std = 0.02
        for m in (self.fc, self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj):
            nn.init.normal_(m.weight, std=std)
        for m in (self.o_proj, self.down_proj):
            nn.init.normal_(m.weight, std=std / math.sqrt(2))
        if isinstance(self.fuse, nn.Linear):
            nn.init.normal_(self.fuse.weight, std=std)

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
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [...] long -> [..., hidden]
        if self._embed is None:
            raise RuntimeError("DraftHead.bind_target(model) must be called before use")
        return F.embedding(tokens.to(self._embed.device), self._embed)

    # ----------------------------------------------------------------------------------------- pieces
    def fuse_features(self, feats: torch.Tensor) -> torch.Tensor:  # feats: [..., n_layers*hidden] -> [..., hidden]
        return self.fuse(feats)

    def input_proj(
        self,
        tokens: torch.Tensor,  # [b, t] long: x_{t+1}, the token after each position
        g: torch.Tensor,  # [b, t, hidden] fused target features or the draft's own previous outputs
    ) -> torch.Tensor:  # [b, t, hidden]
        with torch.no_grad():  # the target's embedding is frozen: no gradient into the target's weights
            e = self.embed(tokens).to(g.dtype)
        return self.fc(torch.cat([self.norm_e(e), self.norm_g(g)], -1))

    def qkv(
        self,
        u: torch.Tensor,  # [b, t, hidden]
        positions: torch.Tensor,  # [b, t] long
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # q [b,h,t,d], k/v [b,kvh,t,d]
        c = self.config
        b, t, _ = u.shape
        x = self.input_layernorm(u)
        q = self.q_proj(x).view(b, t, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, u.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(
        self,
        q: torch.Tensor,  # [b, heads, t, d]
        k: torch.Tensor,  # [b, kv_heads, s, d]
        v: torch.Tensor,  # [b, kv_heads, s, d]
        mask: torch.Tensor,  # [b, 1, t, s] bool
    ) -> torch.Tensor:  # [b, t, heads*d]
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b, h, t, d = out.shape
        return out.transpose(1, 2).reshape(b, t, h * d)

    def finish_layer(
        self,
        u: torch.Tensor,  # [b, t, hidden] layer input (residual)
        attn: torch.Tensor,  # [b, t, heads*d]
    ) -> torch.Tensor:  # [b, t, hidden] the layer output h (the next draft step's feature)
        h = u + self.o_proj(attn)
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # h: [..., hidden] -> [..., draft_vocab]
        if not self.lm_head_ready:
            raise RuntimeError(
                "the draft output head is frozen and not loaded: call bind_target(model, init_lm_head=True)"
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
        only continue after an accepted token). Step j's query sits at position ``t+j-1`` and attends to the
        target-feature keys of positions ``<= t`` plus its own earlier steps' keys for the same base t (the
        diagonal), the exact attention pattern of a draft chain on top of a verified prefix.
        """
        b, T = tokens.shape
        dev = tokens.device
        feats = feats.to(self.fc.weight.dtype)
        pos = torch.arange(T, device=dev)[None].expand(b, T)
        next_tok = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1)  # x_{t+1}
        g = self.fuse_features(feats)
        u = self.input_proj(next_tok, g)
        q, k1, v1 = self.qkv(u, pos)
        causal = (pos[:, None, :] <= pos[:, :, None]) & valid[:, None, :]  # [b, t, s]
        attn = self.attend(q, k1, v1, causal[:, None])
        h = self.finish_layer(u, attn)
        outs = [self.logits(h)]
        diag_k: list[torch.Tensor] = []
        diag_v: list[torch.Tensor] = []
        rep = self.config.num_attention_heads // self.config.num_key_value_heads
        scale = 1.0 / math.sqrt(self.config.head_dim)
        k1r = k1.repeat_interleave(rep, 1) if rep > 1 else k1  # [b, heads, T, d]
        v1r = v1.repeat_interleave(rep, 1) if rep > 1 else v1
        for j in range(2, steps + 1):
            # base t, query position t+j-1, input token x_{t+j}, feature = previous step's output at t
            tok_j = torch.cat([tokens[:, j:], tokens[:, -1:].expand(b, j)], 1)[:, :T]
            u = self.input_proj(tok_j, h)
            qj, kj, vj = self.qkv(u, pos + (j - 1))
            kjr = kj.repeat_interleave(rep, 1) if rep > 1 else kj
            vjr = vj.repeat_interleave(rep, 1) if rep > 1 else vj
            diag_k.append(kjr)
            diag_v.append(vjr)
            s_main = torch.matmul(qj, k1r.transpose(-1, -2)) * scale  # [b, heads, T, T]
            s_main = s_main.masked_fill(~causal[:, None], float("-inf"))
            s_diag = torch.stack([(qj * dk).sum(-1) * scale for dk in diag_k], -1)  # [b, heads, T, j-1]
            p = torch.softmax(torch.cat([s_main, s_diag], -1), -1)
            out = torch.matmul(p[..., :T], v1r) + sum(
                p[..., T + i, None] * dv for i, dv in enumerate(diag_v)
            )  # [b, heads, T, d]
            attn = out.transpose(1, 2).reshape(b, T, -1)
            h = self.finish_layer(u, attn)
            outs.append(self.logits(h))
        return outs

    # ----------------------------------------------------------------------------------------- I/O
    def save(self, path: str | Path, dtype: torch.dtype | None = None, card: dict[str, Any] | None = None) -> None:
        """Safetensors with the config in its metadata (frozen target rows are not stored unless trained)."""
        from safetensors.torch import save_file

        state = {k: v for k, v in self.state_dict().items() if self.config.train_lm_head or k != "lm_head.weight"}
        if dtype is not None:
            state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        meta = {"format": CHECKPOINT_FORMAT, "config": json.dumps(asdict(self.config))}
        if card is not None:
            meta["card"] = json.dumps(card)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path, target: nn.Module | None = None, dtype: torch.dtype = torch.float32) -> DraftHead:
        """Load a head saved by :meth:`save`; with ``target`` given, bind to it and check it is the right one.

        Raises ``ValueError`` naming the file for a corrupt file, a missing/unexpected tensor, a shape mismatch
        or a target mismatch — never returns a silently random head.
        """
        path = Path(path)
        meta, tensors = _read_checkpoint(path)
        try:
            config = DraftHeadConfig(**json.loads(meta["config"]))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid draft head config: {e}") from e
        head = cls(config, draft_to_target=tensors.get("draft_to_target"))
        expected = dict(head.state_dict())
        if not config.train_lm_head:
            expected.pop("lm_head.weight")
        _check_tensors(path, tensors, expected)
        head.load_state_dict(tensors, strict=False)
        head.target_to_draft = head._inverse_map(head.draft_to_target)
        head.lm_head_ready = config.train_lm_head
        head.to(dtype)
        if target is not None:
            fp = target_fingerprint(target)
            if config.target_name and config.target_name != fp:
                raise ValueError(f"{path} was trained for target {config.target_name!r}; this model is {fp!r}")
            head.bind_target(target, init_lm_head=not config.train_lm_head)
        return head

    @staticmethod
    def read_card(path: str | Path) -> dict[str, Any]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("card", "{}"))


def _read_checkpoint(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """``(metadata, tensors)`` of a draft-head checkpoint; ``ValueError`` naming the file when it is not one."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"draft head checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors draft-head checkpoint: {e}") from e
    if meta.get("format") != CHECKPOINT_FORMAT or "config" not in meta:
        raise ValueError(f"{path} is not an atlas-rl draft head checkpoint (format {meta.get('format')!r})")
    return meta, tensors


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The checkpoint holds exactly the ``expected`` tensors, with their shapes, and finite values."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint tensors do not match the head: missing {missing}, unexpected {unexpected}"
        )
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{path}: tensor {k!r} holds NaN or inf values")
