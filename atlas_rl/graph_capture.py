"""CUDA-graph capture shared by the target's decode forward (:mod:`atlas_rl.rollout.cuda_graphs`) and the draft
heads (:mod:`atlas_rl.speculators.head_graphs`): a :class:`Graph` protocol (so the static-buffer logic is tested on
any device with a graph that re-runs what it captured), its CUDA implementation, and the row buckets both pad to."""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import Protocol, TypeVar

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

_Out = TypeVar("_Out")


class Graph(Protocol):
    """A captured computation: :meth:`capture` runs ``fn`` once to record it and returns its outputs;
    :meth:`replay` recomputes them in place from the same input buffers."""

    def capture(self, fn: Callable[[], _Out]) -> _Out: ...

    def replay(self) -> None: ...


class CudaGraph:
    """:class:`Graph` on ``torch.cuda.CUDAGraph`` (warm-up on a side stream, then capture into ``pool``, shared by
    the graphs of one owner: they never run at the same time and their outputs are copied out after each replay)."""

    def __init__(self, pool: object) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._pool = pool

    def capture(self, fn: Callable[[], _Out]) -> _Out:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # first calls pick kernels and allocate workspaces outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(self._graph, pool=self._pool):
            return fn()

    def replay(self) -> None:
        self._graph.replay()


def cuda_graph_factory() -> Callable[[], Graph]:
    """A factory of :class:`CudaGraph` over one new memory pool."""
    pool = torch.cuda.graph_pool_handle()
    return lambda: CudaGraph(pool)


def row_bucket(n: int) -> int:
    """The smallest of :data:`ROW_BUCKETS` >= ``n`` (``n`` itself past the last)."""
    i = bisect.bisect_left(ROW_BUCKETS, n)
    return ROW_BUCKETS[i] if i < len(ROW_BUCKETS) else n


class GraphPool:
    """Where one owner's graphs come from: a memory pool per *generation* of graphs. :meth:`renew` starts a new
    generation when the owner drops every graph: CUDA's caching allocator refuses a capture into a pool whose graphs
    were all destroyed (``use_count > 0`` internal assert, seen on the H200 when the cost probe's new caches dropped
    an engine's graphs). ``graph_factory``: makes every graph instead (tests; then a generation is only counted)."""

    def __init__(self, graph_factory: Callable[[], Graph] | None = None) -> None:
        self._fixed = graph_factory
        self._factory: Callable[[], Graph] | None = None
        self.generations = 0

    def make(self) -> Graph:
        if self._factory is None:
            self._factory = self._fixed or cuda_graph_factory()
            self.generations += 1
        return self._factory()

    def renew(self) -> None:
        """The next graph starts a new pool (call after dropping every graph of this one)."""
        self._factory = None
