"""A preallocated, row-slotted KV cache for ragged speculative decoding with Hugging Face models.

Layout: for every layer one key and one value buffer ``[max_rows, num_kv_heads, max_len, head_dim]``
allocated once per ``generate`` call (or reused when large enough). Row r's tokens occupy positions
``0 .. length[r]-1`` contiguously (left-aligned, no padding holes). A forward over ``q`` new tokens per row
writes them at ``start[r] .. start[r]+q-1`` and attends through a 4-D mask ``key_pos <= query_pos``; rows
that accepted fewer draft tokens simply roll their ``length`` back — rejected entries are overwritten by
the next forward before anything can attend to them. Nothing is reallocated per step.

Active rows are always the first ``num_rows`` slots: when rows finish, :meth:`compact` moves the survivors
to the front (one copy when the batch shrinks, not one per step), so finished rows stop costing compute.

The class plugs into HF models through the ``Cache.update`` protocol (``update(key, value, layer_idx)``
returning the full keys/values to attend over), which is the same in transformers 4.5x and 5.x.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKVCache(Cache):
    """Preallocated per-row KV storage. Call :meth:`set_step` before every forward."""

    def __init__(
        self,
        num_layers: int,
        max_rows: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        # Deliberately not calling Cache.__init__: this cache owns its storage and needs no layer objects.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self.num_layers = num_layers
        self.max_rows = max_rows
        self.max_len = max_len
        shape = (num_layers, max_rows, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)  # [L, rows, kv_heads, max_len, head_dim]
        self.values = torch.zeros(shape, dtype=dtype, device=device)  # [L, rows, kv_heads, max_len, head_dim]
        self._row0 = 0
        self._nrows = 0
        self._kv_len = 0
        self._write_rows: torch.Tensor | None = None  # [n, 1]
        self._write_pos: torch.Tensor | None = None  # [n, q]
        self._starts: torch.Tensor | None = None  # [n]
        self._uniform_start: int | None = None
        self._flat_idx: torch.Tensor | None = None  # [n * q * kv_heads] rows of a layer's [-1, head_dim] view

    def fits(self, max_rows: int, max_len: int, num_kv_heads: int, head_dim: int, dtype, device) -> bool:
        return (
            self.max_rows >= max_rows
            and self.max_len >= max_len
            and self.keys.shape[2] == num_kv_heads
            and self.keys.shape[4] == head_dim
            and self.keys.dtype == dtype
            and self.keys.device == torch.device(device)
        )

    def set_step(self, row0: int, starts: torch.Tensor, q_len: int, kv_len: int) -> None:
        """Prepare a forward of ``q_len`` tokens for rows ``row0 .. row0+len(starts)-1``.

        ``starts`` ``[n]`` (long, on the cache device) is each row's first write position; ``kv_len`` is the
        number of key positions to attend over (max over rows of ``start + q_len``).
        """
        n = int(starts.shape[0])
        if row0 + n > self.max_rows or kv_len > self.max_len:
            raise RuntimeError(f"KV cache too small: rows {row0 + n}/{self.max_rows}, length {kv_len}/{self.max_len}")
        self._row0, self._nrows, self._kv_len = row0, n, kv_len
        ar = torch.arange(q_len, device=starts.device)
        self._write_pos = starts[:, None] + ar[None, :]  # [n, q]
        self._starts = starts
        self._write_rows = torch.arange(row0, row0 + n, device=starts.device)[:, None]  # [n, 1]
        self._uniform_start = None
        self._flat_idx = None

    def write_step(
        self,
        layer_idx: int,
        key_states: torch.Tensor,  # [n, q, kv_heads, head_dim] (token-major, as a projection produces them)
        value_states: torch.Tensor,  # [n, q, kv_heads, head_dim]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`update` for the lean forward after :meth:`set_step`: one ``index_copy_`` per buffer with flat
        indices computed once per step (instead of an advanced-index write per layer). Returns the keys/values
        to attend over, ``[n, kv_heads, kv_len, head_dim]`` each (views of the buffers)."""
        k_flat, v_flat, idx = self.write_targets(layer_idx)
        d = k_flat.shape[1]
        k_flat.index_copy_(0, idx, key_states.reshape(-1, d))
        v_flat.index_copy_(0, idx, value_states.reshape(-1, d))
        return self.step_views(layer_idx)

    def write_targets(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(keys [slots, head_dim], values [slots, head_dim], index [n * q * kv_heads])``: the layer's buffers
        as rows, and the row each new (token, kv head) of this step goes to, ordered token-major as a projection
        produces them (computed once per step, after :meth:`set_step`)."""
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]  # [rows, kv_heads, max_len, head_dim]
        d = k_buf.shape[3]
        return k_buf.view(-1, d), v_buf.view(-1, d), self._step_index()

    def _step_index(self) -> torch.Tensor:  # [n * q * kv_heads] long, computed once per step
        if self._flat_idx is None:
            hk = self.keys.shape[2]
            heads = torch.arange(hk, device=self.keys.device)
            idx = (self._write_rows[:, :, None] * hk + heads) * self.max_len + self._write_pos[:, :, None]
            self._flat_idx = idx.reshape(-1)  # ordered like key_states: token-major, then kv head
        return self._flat_idx

    def step_layout(self) -> tuple[int, int, torch.Tensor]:
        """``(row0, kv_len, index [n * q * kv_heads])`` of the step set by :meth:`set_step`: the first cache row,
        the key positions to attend over, and :meth:`write_targets`' row index (for the compiled decode glue)."""
        return self._row0, self._kv_len, self._step_index()

    def step_starts(self) -> torch.Tensor | None:  # [n] long
        """Each row's first write position in the step set by :meth:`set_step` (its ``starts``)."""
        return self._starts

    def step_views(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys/values this step attends over, ``[n, kv_heads, kv_len, head_dim]`` each (views)."""
        r0, r1 = self._row0, self._row0 + self._nrows
        return self.keys[layer_idx, r0:r1, :, : self._kv_len], self.values[layer_idx, r0:r1, :, : self._kv_len]

    def set_uniform_step(self, row0: int, nrows: int, start: int, q_len: int) -> None:
        """Fast path when all rows write at the same positions (e.g. prefill of a right-padded batch)."""
        if row0 + nrows > self.max_rows or start + q_len > self.max_len:
            raise RuntimeError("KV cache too small for this prefill")
        self._row0, self._nrows, self._kv_len = row0, nrows, start + q_len
        self._starts = None  # a uniform step has no per-row starts (the row attention of the glue is not used)
        self._uniform_start = start
        self._q_len = q_len

    def update(
        self,
        key_states: torch.Tensor,  # [n, kv_heads, q, head_dim]
        value_states: torch.Tensor,  # [n, kv_heads, q, head_dim]
        layer_idx: int,
        *args: object,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r0, r1 = self._row0, self._row0 + self._nrows
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        if self._uniform_start is not None:
            s = self._uniform_start
            q = key_states.shape[2]
            k_buf[r0:r1, :, s : s + q] = key_states
            v_buf[r0:r1, :, s : s + q] = value_states
        else:
            # advanced indices (rows [n,1], positions [n,q]) around a slice -> target shape [n, q, heads, dim]
            k_buf[self._write_rows, :, self._write_pos] = key_states.transpose(1, 2)
            v_buf[self._write_rows, :, self._write_pos] = value_states.transpose(1, 2)
        return k_buf[r0:r1, :, : self._kv_len], v_buf[r0:r1, :, : self._kv_len]

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor, length: int) -> None:
        """``slot[dst[i]] = slot[src[i]]`` for the first ``length`` positions (dst and src: [m] long)."""
        self.keys[:, dst, :, :length] = self.keys[:, src, :, :length]
        self.values[:, dst, :, :length] = self.values[:, src, :, :length]

    def compact(self, keep: list[int], length: int) -> list[int]:
        """Drop every slot not in ``keep`` (ascending indices of the live slots) and return the new order: slot
        ``i`` now holds what slot ``order[i]`` held (first ``length`` positions). The live slots stay where they
        are; the holes among the first ``len(keep)`` slots take the live slots behind them, in order, so a step where
        rows finish copies only as many rows as there are holes (not every survivor: the cache of a 16-row batch
        at 250 positions is ~180 MB)."""
        order = fill_holes(keep)
        moves = [(i, j) for i, j in enumerate(order) if i != j]
        if moves:
            dev = self.keys.device
            dst = torch.tensor([i for i, _ in moves], dtype=torch.long, device=dev)  # [h]
            src = torch.tensor([j for _, j in moves], dtype=torch.long, device=dev)  # [h]
            self.copy_rows(dst, src, length)
        return order

    # --- parts of the HF Cache interface a model may query -------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_len

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * self.num_layers

    def __len__(self) -> int:
        return self.num_layers

    def __repr__(self) -> str:
        return f"SlotKVCache(layers={self.num_layers}, rows={self.max_rows}, max_len={self.max_len})"


def fill_holes(keep: list[int]) -> list[int]:
    """``keep`` (ascending live slot indices) -> ``order``: the live slots packed into ``0 .. len(keep)-1`` with
    the fewest moves (the holes, in order, filled by the live slots behind the packed range, in order)."""
    m = len(keep)
    order = [j for j in keep if j < m]
    movers = [j for j in keep if j >= m]
    holes = sorted(set(range(m)) - set(order))
    placed = dict(zip(holes, movers))
    return [placed.get(i, i) for i in range(m)]
