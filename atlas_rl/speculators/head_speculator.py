"""Serving a :class:`DraftHead` as a speculator: its own per-row KV cache, fed by the engine's target features.

Per row the speculator keeps the sequence (prompt + emitted tokens) and ``committed``: how many positions of
it have passed through the draft layer with *target* features (always the positions the target has verified,
once caught up, ``committed == len(tokens) - 1``: every token but the pending one). ``observe_hidden`` only
*queues* features: a group's prompt features once (its samples share them; all but the last position, whose
draft-layer input is the row's own first token), each row's other features as they come. The draft layer
catches up on a row's queue in one batched call when the row is next asked for a draft (or when its queue
reaches ``max_pending`` positions): the shared prompt first, run once per group by the first of its rows asked
and copied to the others, then the row's own positions. While the controller keeps speculation off (large
batches) the head then costs nothing, not even the prompt pass (a draft layer over every prompt position: ~1 s
of a 64-row call), and a catch-up over many positions reads the head's weights once instead of once per step.
``propose`` drafts a chain from the last committed position, writing the keys/values of its own draft positions
past ``committed``, where the next verified features overwrite them.
"""

from __future__ import annotations

import functools
import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence

from atlas_rl.speculators.draft_head import DraftHead, head_cost_macs
from atlas_rl.speculators.head_cpu import CpuDraftLayers
from atlas_rl.speculators.head_graphs import HeadGraphs
from atlas_rl.types import Draft, ProposeInput, SamplingParams
from atlas_rl.verification.processing import processed_probs, sample_inverse_cdf

logger = logging.getLogger(__name__)

MAX_GRAPHED_POSITIONS = 16  # catch-ups over more positions per row (prompts, long backlogs) run eagerly
_F = TypeVar("_F", bound=Callable[..., Any])


def _inference(fn: _F) -> _F:
    """``torch.inference_mode()`` around ``fn``, entered only when not already on (the engine's decode loop is):
    the decorator's context machinery was ~20 us a call, a third of queueing one row's features a step."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class _RowState:
    slot: int
    group_id: int
    tokens: list[int]
    committed: int = 0
    h_last: torch.Tensor | None = None  # [hidden] draft-layer output at position committed-1
    pending: list[torch.Tensor] = field(default_factory=list)  # queued target features, each [m_i, F]
    num_pending: int = 0  # positions queued in ``pending``
    prompt: int = 0  # prompt positions queued (the group's, see _GroupPrompt); 0 once through the draft layer

    @property
    def queued_upto(self) -> int:
        """Positions with target features: through the draft layer or queued."""
        return self.committed + self.prompt + self.num_pending


@dataclass
class _GroupPrompt:
    """A group's prompt features, run through the draft layer by the first of its rows asked, then copied."""

    feats: tuple[torch.Tensor, ...]  # per fused layer [P - 1, hidden]: the prompt positions but the last (copies,
    # concatenated when first run, not for every row of a wave the head may never be asked for)
    slot: int | None = None  # the slot whose cache holds the prompt's keys/values once computed (rows of a group
    # are freed together, so it stays valid while the group lives)
    h_last: torch.Tensor | None = None  # [hidden] draft-layer output at position P - 2


class DraftHeadSpeculator:
    """A learned speculator (static or adaptive role) around a :class:`DraftHead`.

    Args:
        head: the draft network, bound to the target (``head.bind_target(model, ...)``).
        name: the speculator's name in stats and plans (e.g. "static", "adaptive").
        seed: seeds the draft sampler (drafts may be random; verification keeps the output exact anyway).
        max_pending: decode positions a row may queue before the draft layer catches up on them anyway.
        expected_acceptance: per-token acceptance expected under sampling before any evidence (the controller's
            prior for this speculator; e.g. from the head's card), or None.
    """

    def __init__(
        self,
        head: DraftHead,
        name: str = "static",
        seed: int = 0,
        max_pending: int = 256,
        expected_acceptance: float | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if expected_acceptance is not None and not (0.0 < expected_acceptance < 1.0):
            raise ValueError(f"expected_acceptance must lie in (0, 1), got {expected_acceptance!r}")
        self.expected_acceptance = expected_acceptance
        self.draft_macs_per_token = head_cost_macs(head.config)  # the controller's drafting-cost prior
        if head._embed is None or not head.lm_head_ready:
            raise ValueError("bind the draft head to its target first: head.bind_target(model, init_lm_head=...)")
        self.head = head
        self.name = name
        self.hidden_layers: tuple[int, ...] = tuple(head.config.fuse_layers)
        self._gen = torch.Generator().manual_seed(seed)
        self._rows: dict[int, _RowState] = {}
        self._groups: dict[int, list[int]] = {}
        self._prompts: dict[int, _GroupPrompt] = {}
        self._free: list[int] = []  # a min-heap: rows started in order get consecutive ascending slots again
        self.max_pending = max_pending
        self._k: torch.Tensor | None = None  # [layers, slots, kv_heads, max_len, head_dim]
        self._v: torch.Tensor | None = None
        self.policy_version = 0
        # on a CUDA device, replay catch-up and drafting from CUDA graphs (head_graphs; the engine sets it from
        # EngineConfig.cuda_graphs); made on first use
        self.cuda_graphs = True
        self._graphs: HeadGraphs | None = None
        # on a CPU, the decode glue kernels for the draft layers (head_cpu; the engine hands them over with its lean
        # forward); None: the PyTorch ops of _layers
        self.cpu_glue: ModuleType | None = None
        self._cpu: CpuDraftLayers | None = None

    # ------------------------------------------------------------------------------------------ storage
    @property
    def device(self) -> torch.device:
        return self.head.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.fc.weight.dtype

    def _ensure_storage(self, slots: int, length: int) -> None:
        c = self.head.config
        cur_slots = 0 if self._k is None else self._k.shape[1]
        cur_len = 0 if self._k is None else self._k.shape[3]
        if slots <= cur_slots and length <= cur_len:
            return
        new_slots = max(slots, cur_slots, 8)
        new_len = max(length, cur_len, 256)
        if cur_len and length > cur_len:
            new_len = max(new_len, 2 * cur_len)
        if cur_slots and slots > cur_slots:
            new_slots = max(new_slots, 2 * cur_slots)
        shape = (c.num_hidden_layers, new_slots, c.num_key_value_heads, new_len, c.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self._k is not None:
            k[:, :cur_slots, :, :cur_len] = self._k
            v[:, :cur_slots, :, :cur_len] = self._v
        self._k, self._v = k, v

    def _alloc_slot(self) -> int:
        if self._free:  # the lowest free slot: a wave's rows then sit in consecutive slots, read as one view
            return heapq.heappop(self._free)
        return len(self._rows) + len(self._free)

    def _graph_runner(self) -> HeadGraphs | None:
        """The graphs to replay drafting from, or None (eager): a CUDA device, ``cuda_graphs``, no failed capture."""
        if self._graphs is None and self.cuda_graphs and self.device.type == "cuda":
            self._graphs = HeadGraphs(self._graph_reads)
        if self._graphs is None or not self.cuda_graphs or self._graphs.failed is not None:
            return None
        return self._graphs

    def _cpu_layers(self) -> CpuDraftLayers | None:
        """The glue path of the draft layers, or None (no kernels handed over, or a head it cannot run)."""
        if self.cpu_glue is None or not CpuDraftLayers.supports(self.head):
            return None
        if self._cpu is None or self._cpu.glue is not self.cpu_glue or self._cpu.head is not self.head:
            self._cpu = CpuDraftLayers(self.head, self.cpu_glue)
        return self._cpu

    def _graph_reads(self) -> tuple[torch.Tensor, ...]:
        """Every tensor the graphs read besides their inputs: the KV storage and the head's weights."""
        head = self.head
        return (self._k, self._v, head._embed, head.draft_to_target, *head.parameters())  # type: ignore[return-value]

    def _reserve(self, max_slot: int, length: int, graphed: bool) -> int:
        """Storage for slots ``0..max_slot`` and ``length`` positions, plus a scratch slot no row owns when
        ``graphed`` (the padded rows of a graph write there); returns that slot (-1 when not graphed)."""
        self._ensure_storage(max_slot + 1 + graphed, length)
        assert self._k is not None
        return self._k.shape[1] - 1 if graphed else -1

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self, group_id: int, prompt_ids: list[int], row_ids: list[int]) -> None:
        self._groups[group_id] = list(row_ids)
        for r in row_ids:
            self._rows[r] = _RowState(slot=self._alloc_slot(), group_id=group_id, tokens=list(prompt_ids))

    def observe(self, row_id: int, emitted_ids: list[int]) -> None:
        st = self._rows.get(row_id)
        if st is not None:
            st.tokens.extend(emitted_ids)

    def stop(self, group_id: int) -> None:
        self._prompts.pop(group_id, None)
        for r in self._groups.pop(group_id, []):
            st = self._rows.pop(r, None)
            if st is not None:
                heapq.heappush(self._free, st.slot)

    def reset(self) -> None:
        self._rows.clear()
        self._groups.clear()
        self._prompts.clear()
        self._free.clear()

    def on_policy_update(self, version: int) -> None:
        self.policy_version = version

    # ------------------------------------------------------------------------------------------ features
    @_inference
    def observe_hidden(self, row_ids: list[int], hidden_states: dict[int, torch.Tensor], num_new: list[int]) -> None:
        layers = [hidden_states[la] for la in self.hidden_layers]  # each [n, m, hidden]
        m = layers[0].shape[1]
        rows: tuple[torch.Tensor, ...] | None = None  # per row [m, n_layers*hidden], made when a decode step needs it
        overflow = False
        for i, r in enumerate(row_ids):
            st = self._rows.get(r)
            if st is None or num_new[i] <= 0 or len(st.tokens) < st.queued_upto + num_new[i] + 1:
                continue  # unknown row, or a row that stopped in this step (fewer tokens than features)
            # (the features are a fresh tensor per target forward: queue views)
            if st.queued_upto == 0 and num_new[i] > 1:
                own = self._queue_prompt(st, [h[i, : num_new[i]] for h in layers])
            else:
                rows = torch.cat(layers, -1).unbind(0) if rows is None else rows  # one op for every row's view
                own = rows[i] if num_new[i] == m else rows[i][: num_new[i]]
            st.pending.append(own)
            st.num_pending += own.shape[0]
            overflow = overflow or st.num_pending >= self.max_pending
        if overflow:
            self.catch_up([r for r in row_ids if r in self._rows and self._rows[r].num_pending >= self.max_pending])

    def _queue_prompt(self, st: _RowState, layers: list[torch.Tensor]) -> torch.Tensor:
        """A row's prompt features (per fused layer ``[P, hidden]``): all but the last position kept once per group;
        returns the row's own part (``[1, n_layers*hidden]``): the last position reads the row's first token, which
        differs between samples."""
        first = layers[0].shape[0] - 1
        gp = self._prompts.get(st.group_id)
        if gp is None or gp.feats[0].shape[0] != first:
            # copies: views would keep the engine's whole prompt-feature tensors (every sample of every group, e.g.
            # 512 rows x 512 positions x 3 layers = 1.8 GB) alive for the wave
            self._prompts[st.group_id] = _GroupPrompt(tuple(h[:first].clone() for h in layers))
        st.prompt = first
        return torch.cat([h[first:] for h in layers], -1)

    @_inference
    def catch_up(self, row_ids: list[int]) -> None:
        """Run the draft layer over the queued positions of ``row_ids``: their prompts (once per group), then their
        decode positions (one batched call)."""
        rows = [r for r in row_ids if r in self._rows]
        self._catch_up_prompts([r for r in rows if self._rows[r].prompt > 0])
        rows = [r for r in rows if self._rows[r].num_pending > 0]
        if not rows:
            return
        states = [self._rows[r] for r in rows]
        feats = pad_sequence([torch.cat(st.pending, 0) for st in states], batch_first=True)  # [n, m, F]
        num_new = [st.num_pending for st in states]
        for st in states:
            st.pending, st.num_pending = [], 0
        self._extend(rows, list(range(len(rows))), feats, num_new)

    def _catch_up_prompts(self, rows: list[int]) -> None:
        """The queued prompts of ``rows``: through the draft layer for the first row asked of each group (batched),
        copied (keys/values, last output) to the group's other rows."""
        leaders: dict[int, int] = {}
        for r in rows:
            st = self._rows[r]
            if self._prompts[st.group_id].slot is None:
                leaders.setdefault(st.group_id, r)
        if leaders:
            prompts = [torch.cat(self._prompts[g].feats, -1) for g in leaders]
            lead_rows = list(leaders.values())
            feats = pad_sequence(prompts, batch_first=True)  # [n, P_max - 1, F]
            self._extend(lead_rows, list(range(len(lead_rows))), feats, [f.shape[0] for f in prompts])
            for g, r in leaders.items():
                st = self._rows[r]
                st.prompt = 0
                self._prompts[g].slot, self._prompts[g].h_last = st.slot, st.h_last
        for r in rows:
            st = self._rows[r]
            if st.prompt > 0:
                self._copy_prompt(st, self._prompts[st.group_id])

    def _copy_prompt(self, st: _RowState, gp: _GroupPrompt) -> None:
        """Row ``st`` takes the prompt keys/values and last output its group's first row computed."""
        P = st.prompt
        self._ensure_storage(st.slot + 1, P + 1)
        self._k[:, st.slot, :, :P] = self._k[:, gp.slot, :, :P]
        self._v[:, st.slot, :, :P] = self._v[:, gp.slot, :, :P]
        st.committed, st.h_last, st.prompt = P, gp.h_last, 0

    def _extend(self, row_ids: list[int], todo: list[int], feats: torch.Tensor, num_new: list[int]) -> None:
        """Run the draft layer over the new verified positions of rows ``todo`` (with target features)."""
        dev = self.device
        head = self.head
        states = [self._rows[row_ids[i]] for i in todo]
        m = max(num_new[i] for i in todo)
        n = len(todo)
        start = torch.tensor([st.committed for st in states], device=dev)  # [n]
        runner = self._graph_runner() if m <= MAX_GRAPHED_POSITIONS else None
        top = max(st.committed for st in states) + m + 1
        scratch = self._reserve(max(st.slot for st in states), top, runner is not None)
        nxt = torch.zeros((n, m), dtype=torch.long)
        for a, (i, st) in enumerate(zip(todo, states)):
            c = st.committed
            toks = st.tokens[c + 1 : c + 1 + num_new[i]]
            nxt[a, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        nxt = nxt.to(dev)
        idx = torch.tensor(todo, device=feats.device)
        f = feats[idx, :m].to(device=dev, dtype=self.dtype)  # [n, m, n_layers*hidden]
        pos = start[:, None] + torch.arange(m, device=dev)[None]  # [n, m]
        slots = torch.tensor([st.slot for st in states], device=dev)
        h = None
        if runner is not None:
            ins = {"tokens": (nxt, 0), "feats": (f, 0.0), "pos": (pos, 0), "slots": (slots, scratch)}
            h = (runner.run(("layers", m), ins, self._static_layers) or (None,))[0]
        if h is None:
            h = self._layers(nxt, head.fuse_features(f), pos, slots)  # [n, m, hidden]
        last = torch.tensor([num_new[i] - 1 for i in todo], device=dev)
        h_last = h[torch.arange(n, device=dev), last]
        for a, (i, st) in enumerate(zip(todo, states)):
            st.committed += num_new[i]
            st.h_last = h_last[a]

    def _layers(
        self,
        tokens: torch.Tensor,  # [n, m] long: the token after each position
        g: torch.Tensor,  # [n, m, hidden] fused target features, or the draft's own previous outputs
        pos: torch.Tensor,  # [n, m] long positions
        slots: torch.Tensor,  # [n] cache slots
        static: bool = False,
    ) -> torch.Tensor:  # [n, m, hidden] the last layer's pre-norm output
        """The draft layers over ``(tokens, g)`` at ``pos``: each writes its keys/values into its cache of the rows'
        ``slots`` and attends causally to that cache. ``static``: no host reads (over the whole storage length,
        masked, and the slots' rows gathered): what a CUDA graph replays."""
        head = self.head
        assert self._k is not None and self._v is not None
        rows = slots if static else self._cache_rows(slots)  # decided once for every layer
        cpu = None if static or not isinstance(rows, slice) else self._cpu_layers()
        if cpu is not None:
            h = cpu.run(self._k, self._v, tokens, g, pos, rows.start)
            if h is not None:
                return h
        e = head.token_embeddings(tokens, g)
        kv_len = self._k.shape[3] if static else int(pos.max()) + 1
        kpos = torch.arange(kv_len, device=self.device)
        mask = (kpos[None, None, :] <= pos[:, :, None])[:, None]  # [n, 1, m, kv]
        h = g
        for i, layer in enumerate(head.layers):
            x, res = layer.layer_input(e if i == 0 else None, h)
            q, k, v = head.qkv(i, x, pos)
            self._k[i, slots[:, None], :, pos] = k.transpose(1, 2)
            self._v[i, slots[:, None], :, pos] = v.transpose(1, 2)
            attn = head.attend(q, self._k[i, rows, :, :kv_len], self._v[i, rows, :, :kv_len], mask)
            h = layer.finish(res, attn)
        return h

    @staticmethod
    def _cache_rows(slots: torch.Tensor) -> slice | torch.Tensor:  # slots: [n] cache slots
        """How to read the cache rows of ``slots``: a slice (a view, no copy) when they are consecutive (a wave's
        rows usually are), the slots themselves (a gathered copy) otherwise."""
        n = slots.shape[0]
        first = int(slots[0])
        if bool((slots == torch.arange(first, first + n, device=slots.device)).all()):
            return slice(first, first + n)
        return slots

    # ------------------------------------------------------------------------------------------ drafting
    @_inference
    def propose(self, rows: ProposeInput, max_tokens: list[int]) -> list[Draft]:
        sampling = rows.sampling or SamplingParams()
        out: list[Draft] = [Draft([], None, [], self.name) for _ in rows.row_ids]
        self.catch_up([r for r, k in zip(rows.row_ids, max_tokens) if k > 0])
        live = self._live_rows(rows, max_tokens)
        if not live:
            return out
        states = [self._rows[rows.row_ids[i]] for i in live]
        kmax = max(max_tokens[i] for i in live)
        tokens, confs, probs = self._draft_chains(states, kmax, sampling)  # [n, kmax] x 2, [n, kmax, draft_vocab]
        tok_all = tokens.tolist()
        conf_all = confs.tolist()
        prob_all = None if probs is None else self._to_target_vocab(probs)  # [n, kmax, vocab]
        for a, i in enumerate(live):
            k = max_tokens[i]
            out[i] = Draft(
                token_ids=tok_all[a][:k],
                draft_probs=None if prob_all is None else prob_all[a, :k],
                confidence=[min(1.0, max(0.0, c)) for c in conf_all[a][:k]],
                speculator=self.name,
            )
        return out

    def _live_rows(self, rows: ProposeInput, max_tokens: list[int]) -> list[int]:
        """Indices of the rows that want a draft and whose draft state is in step with the engine's sequence."""
        live = []
        for i, (r, k) in enumerate(zip(rows.row_ids, max_tokens)):
            st = self._rows.get(r)
            if k <= 0 or st is None or st.h_last is None:
                continue
            if st.committed != len(rows.token_ids[i]) - 1:
                logger.debug(
                    "row %d: draft head out of sync (%d vs %d); skipping", r, st.committed, len(rows.token_ids[i]) - 1
                )
                continue
            live.append(i)
        return live

    def _draft_chains(
        self, states: list[_RowState], kmax: int, sampling: SamplingParams
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Unroll the head ``kmax`` steps from each row's last committed position: the tokens ``[n, kmax]`` (target
        ids), their confidences ``[n, kmax]`` and (sampling only) the draft distributions ``[n, kmax, draft_vocab]``;
        replayed from a CUDA graph where :meth:`_graph_runner` says so."""
        dev = self.device
        runner = self._graph_runner()
        top = max(st.committed for st in states) + kmax + 1
        scratch = self._reserve(max(st.slot for st in states), top, runner is not None)
        slots = torch.tensor([st.slot for st in states], device=dev)
        committed = torch.tensor([st.committed for st in states], device=dev)  # [n]
        h = torch.stack([st.h_last for st in states])  # [n, hidden]
        u = None
        if not sampling.greedy:  # drawn in the eager path's order: per step, one per row
            u = torch.stack([self._uniforms(len(states)) for _ in range(kmax)], 1)  # [n, kmax]
        if runner is not None:
            ins = {"h": (h, 0.0), "committed": (committed, 0), "slots": (slots, scratch)}
            if u is not None:
                ins["u"] = (u, 0.5)
            key = ("chain", kmax, sampling.temperature, sampling.top_k, sampling.top_p)
            out = runner.run(key, ins, lambda **b: self._chain(kmax=kmax, sampling=sampling, static=True, **b))
            if out is not None:
                return out  # type: ignore[return-value]
        return self._chain(h, committed, slots, u, kmax=kmax, sampling=sampling)

    def _chain(
        self,
        h: torch.Tensor,  # [n, hidden] each row's last draft-layer output
        committed: torch.Tensor,  # [n] long
        slots: torch.Tensor,  # [n] long
        u: torch.Tensor | None = None,  # [n, kmax] float64 uniforms (sampling), None when greedy
        *,
        kmax: int,
        sampling: SamplingParams,
        static: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """:meth:`_draft_chains`' loop over its inputs (``static``: as a CUDA graph replays it)."""
        tokens, confs, probs = [], [], []
        for j in range(kmax):
            tok, conf, p = self._draft_token(h, sampling, None if u is None else u[:, j])
            tokens.append(tok)
            confs.append(conf)
            if p is not None:
                probs.append(p)
            if j + 1 < kmax:
                pos = (committed + j)[:, None]  # [n, 1] draft position L + j - 1 ... (L = committed)
                h = self._layers(tok[:, None], h[:, None], pos, slots, static)[:, 0]
        return torch.stack(tokens, 1), torch.stack(confs, 1), torch.stack(probs, 1) if probs else None

    def _static_layers(
        self, tokens: torch.Tensor, feats: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor]:  # tokens, pos: [n, m]; feats: [n, m, n_layers*hidden]; slots: [n] -> ([n, m, hidden],)
        """The catch-up's draft layers over target features as a CUDA graph replays them."""
        return (self._layers(tokens, self.head.fuse_features(feats), pos, slots, static=True),)

    def _uniforms(self, n: int) -> torch.Tensor:  # [n] float64 on the head's device, from the draft sampler
        return torch.rand(n, generator=self._gen, dtype=torch.float64).to(self.device)

    def _to_target_vocab(self, p_d: torch.Tensor) -> torch.Tensor:  # [..., draft_vocab] -> [..., vocab]
        """Draft distributions over the target vocabulary (zero outside the draft vocabulary)."""
        head = self.head
        p = torch.zeros((*p_d.shape[:-1], head.config.target_vocab_size), dtype=p_d.dtype, device=p_d.device)
        p[..., head.draft_to_target] = p_d
        return p

    def _draft_token(
        self, h: torch.Tensor, sampling: SamplingParams, u: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One draft token per row from the head's state ``h`` [n, hidden]: ``(token ids [n], confidence [n],
        draft distribution over the draft vocabulary [n, draft_vocab] or None when greedy)``; ``u`` [n]: the
        uniforms to sample with (drawn from the draft sampler when None)."""
        head = self.head
        d2t = head.draft_to_target
        cpu = self._cpu_layers()
        logits_d = cpu.logits(h) if cpu is not None else head.logits(h)  # [n, draft_vocab]
        if logits_d.dtype not in (torch.float32, torch.float64):
            logits_d = logits_d.float()
        if sampling.greedy:
            conf, tok_d = torch.softmax(logits_d, -1).max(-1)
            return d2t[tok_d], conf, None
        # processing the draft-vocabulary logits equals processing the full-vocabulary logits with -inf outside the
        # draft vocabulary, restricted to it (temperature, top-k, top-p only see finite values): sample in draft
        # space; the [n, vocab] distribution the verifier needs is scattered from it (_to_target_vocab)
        p_d = processed_probs(logits_d, sampling)  # [n, draft_vocab]
        # inverse CDF over a float64 cumsum, as torch's multinomial kernel, at a tenth of its time (0.03 vs 0.4 ms
        # over an 18k draft vocabulary on this CPU: its per-category exponentials cost 1-3% of a decode step per token)
        tok_d = sample_inverse_cdf(p_d, self._uniforms(p_d.shape[0]) if u is None else u)
        conf = p_d.gather(1, tok_d[:, None])[:, 0]
        return d2t[tok_d], conf, p_d
