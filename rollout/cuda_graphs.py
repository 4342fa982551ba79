"""CUDA graphs of the lean decode/verification forward: one launch a step instead of ~40 a layer.

On an H200 the eager forward is launch-bound (``docs/results/gpu_costs.md``: 13-15 ms a step for SmolLM2-135M and a
7B shape alike, ~1,160 kernel launches a forward, the GPU ~10% busy). :class:`GraphedForward` captures
:class:`~.forward.LeanForward` in its ``static`` mode (no host reads, a fixed RoPE table) once per shape bucket and
replays it:

* rows are padded up to :data:`~atlas_rl.graph_capture.ROW_BUCKETS` with dummy rows that write into cache slots
  past the active ones (dead during a decode: a wave's active rows are always the first slots, :mod:`.kv_cache`),
  key positions are rounded up to :data:`KV_BUCKET` and masked, so a rollout needs a handful of graphs, not one per
  step;
* the inputs are copied into static buffers, the outputs copied out after each replay (a speculator may keep the
  features it is handed past the next step);
* the graphs are dropped when what they read moved: another KV cache, a regrown RoPE table, or a parameter that is
  a different tensor (:meth:`GraphedForward.validate`, called by the engine at each ``generate`` and weight update;
  updates in place, as optimizers and ``update_weights`` make them, keep the graphs valid);
* a capture that fails logs once and leaves that engine on the eager forward: never slower than without graphs.

The math is the lean forward's (tested against it with a graph that re-runs the captured function,
``tests/unit/test_cuda_graphs.py``); the decision record is ``docs/decisions/cuda_graphs.md``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from atlas_rl.graph_capture import Graph, GraphSet, row_bucket

from .forward import LeanForward
from .kv_cache import SlotKVCache

logger = logging.getLogger(__name__)

KV_BUCKET = 256  # key positions are rounded up to a multiple of this
MAX_GRAPHS = 96  # graphs kept at once (each keeps its outputs on the device); past it the least recently used goes
MAX_COLUMNS = 2304  # rows x tokens past this run eagerly (compute-bound: launches no longer matter)

Outputs = tuple[torch.Tensor, torch.Tensor | None]  # (last [nb, q, H], stacked hidden states [L + 1, nb, q, H])


class _Captured:
    """One shape's graph, its static input buffers and its outputs."""

    def __init__(self, graph: Graph, nb: int, q: int, device: torch.device) -> None:
        self.graph = graph
        self.ids = torch.zeros((nb, q), dtype=torch.long, device=device)  # [nb, q]
        self.starts = torch.zeros((nb,), dtype=torch.long, device=device)  # [nb]
        self.outputs: Outputs | None = None


class GraphedForward(GraphSet[_Captured]):
    """``(input_ids [n, q], starts [n], cache, want_hidden, kv_len) -> LeanForward's outputs``, replayed from a
    graph per (row bucket, q, key bucket, want_hidden); eager where no graph applies.

    ``graph_factory``: makes one :class:`~atlas_rl.graph_capture.Graph` (default: CUDA graphs, one memory pool
    per generation of graphs: :class:`~atlas_rl.graph_capture.GraphPool`)."""

    def __init__(self, lean: LeanForward, model: nn.Module, graph_factory: Callable[[], Graph] | None = None) -> None:
        super().__init__(graph_factory, MAX_GRAPHS, logger, "decoding eagerly")
        self.lean, self.model = lean, model
        self._reads: tuple[int, int] | None = None  # data pointers of the KV cache and the RoPE table graphs read
        self._params: tuple[int, ...] | None = None  # data pointers of the parameters they read

    def validate(self) -> None:
        """Drop every graph when a parameter is no longer the tensor its graphs read (once per ``generate``)."""
        params = tuple(p.data_ptr() for p in self.model.parameters())
        if params != self._params:
            self._drop()
            self._params = params

    def clear(self) -> None:
        self._drop()
        self._reads = self._params = None

    def __call__(
        self,
        input_ids: torch.Tensor,  # [n, q]
        starts: torch.Tensor,  # [n]
        cache: SlotKVCache,
        want_hidden: bool,
        kv_len: int,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        n, q = input_ids.shape
        entry = self._entry(n, q, kv_len, want_hidden, cache, input_ids.device)
        if entry is None:
            return self.lean(input_ids, starts, cache, want_hidden, kv_len)
        entry.ids[:n].copy_(input_ids)
        entry.starts[:n].copy_(starts)
        if n < entry.starts.shape[0]:
            entry.starts[n:].zero_()  # dummy rows write positions 0 .. q-1 of dead slots, whatever ran before
        if entry.outputs is None:
            entry.outputs = self._capture_forward(entry, cache, want_hidden, self._kv_bucket(kv_len, cache))
            if entry.outputs is None:
                return self.lean(input_ids, starts, cache, want_hidden, kv_len)
        entry.graph.replay()
        self.num_replays += 1
        last, stacked = entry.outputs
        if stacked is None:
            return last[:n].clone(), None
        hidden = stacked[:, :n].clone()  # [L + 1, n, q, H]
        return last[:n].clone(), tuple(hidden.unbind(0))

    @staticmethod
    def _kv_bucket(kv_len: int, cache: SlotKVCache) -> int:
        return min(cache.max_len, -(-kv_len // KV_BUCKET) * KV_BUCKET)

    def _entry(
        self, n: int, q: int, kv_len: int, want_hidden: bool, cache: SlotKVCache, device: torch.device
    ) -> _Captured | None:
        """The shape's graph (made, not yet captured, where none is); None where this shape runs eagerly."""
        nb = row_bucket(n)
        if self.failed is not None or nb > cache.max_rows or nb * q > MAX_COLUMNS:
            return None
        self._check_reads(cache)
        key = (nb, q, self._kv_bucket(kv_len, cache), want_hidden)
        return self._admit(key, lambda graph: _Captured(graph, nb, q, device))

    def _check_reads(self, cache: SlotKVCache) -> None:
        """Drop the graphs when the KV cache or the RoPE table they read is another tensor now."""
        emb = self.lean.decoder.embed_tokens.weight  # the forward's RoPE tables are in the embeddings' dtype
        cos, _ = self.lean.rope_tables(cache.max_len, emb.dtype, emb.device)
        reads = (cache.keys.data_ptr(), cos.data_ptr())
        if reads != self._reads:
            self._drop()
            self._reads = reads
        if self._params is None:
            self.validate()

    def _capture_forward(self, entry: _Captured, cache: SlotKVCache, want_hidden: bool, kvb: int) -> Outputs | None:
        def fn() -> Outputs:
            last, hidden = self.lean(entry.ids, entry.starts, cache, want_hidden, kvb, static=True)
            return last, None if hidden is None else torch.stack(hidden)

        return self._capture(entry.graph, fn)
