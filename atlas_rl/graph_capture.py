"""CUDA-graph capture shared by the target's decode forward (:mod:`atlas_rl.rollout.cuda_graphs`) and the draft
heads (:mod:`atlas_rl.speculators.head_graphs`): a :class:`Graph` protocol (so the static-buffer logic is tested on
any device with a graph that re-runs what it captured), its CUDA implementation, and the row buckets both pad to."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Hashable
from typing import Generic, Protocol, TypeVar

import torch

ROW_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

_Out = TypeVar("_Out")
_Entry = TypeVar("_Entry")


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


class GraphSet(Generic[_Entry]):
    """The bookkeeping an owner of graphs shares with every other (the target's forward, each draft head): its
    entries by key with the least recently used dropped past ``limit``, one :class:`GraphPool` renewed whenever the
    entries are all dropped, and one failed capture turning capture off for good (``failed`` says why)."""

    def __init__(self, graph_factory: Callable[[], Graph] | None, limit: int, log: logging.Logger, off: str) -> None:
        self._pool = GraphPool(graph_factory)
        self._graphs: dict[Hashable, _Entry] = {}  # least recently used first
        self._limit, self._log, self._off = limit, log, off  # off: what the owner does after a failure
        self.failed: str | None = None
        self.num_replays = 0
        self.num_captures = 0

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _drop(self) -> None:
        """Drop every graph; the next ones are captured into a new memory pool (:class:`GraphPool`)."""
        if self._graphs:
            self._graphs.clear()
            self._pool.renew()

    def _admit(self, key: Hashable, make: Callable[[Graph], _Entry]) -> _Entry:
        """The entry of ``key``, made over a new graph where there is none (the least recently used goes past the
        limit); either way it becomes the most recently used."""
        entry = self._graphs.pop(key, None)
        if entry is None:
            if len(self._graphs) >= self._limit:
                self._graphs.pop(next(iter(self._graphs)))
                if not self._graphs:  # its pool is empty now: the next capture needs a new one
                    self._pool.renew()
            entry = make(self._pool.make())
        self._graphs[key] = entry
        return entry

    def _capture(self, graph: Graph, fn: Callable[[], _Out]) -> _Out | None:
        """``graph.capture(fn)``; None after a failure, which drops every graph and turns capture off."""
        try:
            out = graph.capture(fn)
        except Exception as exc:  # noqa: BLE001 - any failure: the owner stays correct on its eager path
            self.failed = f"{type(exc).__name__}: {exc}"
            self._drop()
            self._log.warning("CUDA graph capture failed, %s from now on: %s", self._off, self.failed)
            return None
        self.num_captures += 1
        return out
