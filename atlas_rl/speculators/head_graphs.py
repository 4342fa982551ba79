"""CUDA graphs of a draft head's two calls per decode step: the draft layers over the newly verified positions
(catch-up) and the chain of draft tokens.

On an H200 with the target's forward replayed from graphs (3-7 ms a step), the head's eager drafting cost 4-8 ms a
step at k=2-4 (~1.5-2 ms a draft token, launch-bound): more than the step it should shorten. Replayed, each call is
one launch. As for the target (:mod:`atlas_rl.rollout.cuda_graphs`): rows are padded to
:data:`~atlas_rl.graph_capture.ROW_BUCKETS` (the dummy rows write into a scratch slot of the head's KV storage that
no row owns), attention runs over the whole storage length with a mask, the inputs are copied into static buffers
and the outputs out of the graph's, graphs are dropped when the storage or a weight is another tensor, and a failed
capture leaves the head eager. Sampled drafts take their uniforms as an input (drawn on the host from the
speculator's generator, in the order the eager path draws them), so replays never repeat a draw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from atlas_rl.graph_capture import Graph, GraphSet, row_bucket

logger = logging.getLogger(__name__)

MAX_GRAPHS = 128  # graphs kept at once; past it the least recently used goes
CAPTURE_AFTER = 2  # a shape is captured the second time it is met (a one-off catch-up backlog never pays a capture)

Inputs = dict[str, tuple[torch.Tensor, float]]  # name -> (live tensor [n, ...], the dummy rows' fill value)


class _Entry:
    """One shape's graph, its static inputs ``[nb, ...]`` and its outputs."""

    def __init__(self, graph: Graph, nb: int, inputs: Inputs) -> None:
        self.graph = graph
        self.buffers = {
            name: torch.empty((nb, *t.shape[1:]), dtype=t.dtype, device=t.device) for name, (t, _) in inputs.items()
        }
        self.outputs: tuple[torch.Tensor | None, ...] | None = None


class HeadGraphs(GraphSet[_Entry]):
    """Graph replay of ``fn(**static inputs) -> tuple of [nb, ...] tensors`` per key and row bucket.

    ``reads``: what the graphs read besides their inputs (weights, the KV storage) as a tuple of tensors; when one
    of them is another tensor (a new data pointer) every graph is dropped. ``graph_factory``: makes one
    :class:`~atlas_rl.graph_capture.Graph` (default: CUDA graphs, one memory pool per generation of graphs)."""

    def __init__(
        self, reads: Callable[[], tuple[torch.Tensor, ...]], graph_factory: Callable[[], Graph] | None = None
    ) -> None:
        super().__init__(graph_factory, MAX_GRAPHS, logger, "drafting eagerly")
        self._reads_fn = reads
        self._seen: dict[tuple, int] = {}  # shapes met and not captured yet -> how often
        self._reads: tuple[int, ...] | None = None

    def run(
        self, key: tuple, inputs: Inputs, fn: Callable[..., tuple[torch.Tensor | None, ...]]
    ) -> tuple[torch.Tensor | None, ...] | None:
        """The outputs of ``fn`` over ``inputs`` (each ``[n, ...]``), rows ``:n`` copied out of the graph's; None
        where no graph applies (a shape met for the first time, capture failed): the caller runs eagerly."""
        n = next(iter(inputs.values()))[0].shape[0]
        nb = row_bucket(n)
        entry = self._entry((*key, nb), nb, inputs)
        if entry is None:
            return None
        for name, (t, fill) in inputs.items():
            buf = entry.buffers[name]
            buf[:n].copy_(t)
            if n < nb:
                buf[n:].fill_(fill)
        if entry.outputs is None:
            entry.outputs = self._capture(entry.graph, lambda: fn(**entry.buffers))
            if entry.outputs is None:
                return None
        entry.graph.replay()
        self.num_replays += 1
        return tuple(None if o is None else o[:n].clone() for o in entry.outputs)

    def _entry(self, key: tuple, nb: int, inputs: Inputs) -> _Entry | None:
        if self.failed is not None:
            return None
        reads = tuple(t.data_ptr() for t in self._reads_fn())
        if reads != self._reads:
            self._drop()
            self._reads = reads
        if key not in self._graphs:
            self._seen[key] = seen = self._seen.get(key, 0) + 1
            if seen < CAPTURE_AFTER:
                return None
        return self._admit(key, lambda graph: _Entry(graph, nb, inputs))
