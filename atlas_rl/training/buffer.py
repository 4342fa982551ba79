"""A bounded capture buffer: the engine's verification forwards turned into draft-head training samples.

Register it as the engine's capture hook (``buffer.attach(engine)``); it then sees every prefill and
verification forward (:class:`~atlas_rl.types.CaptureRecord`) and assembles, per row of a ``generate`` call,
one :class:`~atlas_rl.training.samples.SequenceSample` — no extra target forward:

* the prefill record gives the prompt positions ``0 .. P-1``: tokens and the features of the head's
  ``fuse_layers``; the only prompt label is that of the last position (the distribution of the first completion
  token), from ``last_logits``. The other prompt positions carry no label (``label_mask`` False): they are
  attention context, and bases of later training-time-test steps;
* every verification record gives, for each row, its ``num_valid`` positions (the pending token and the accepted
  drafts) in position order: tokens, features, and top-K soft labels from ``target_logits`` (the target's T = 1
  distribution of the next token, as in the offline pipeline);
* the last token of a sequence (emitted, never run through the target) closes the sample without features.

A row's sample is *finalized* when its ``generate`` call ends: on :meth:`flush` (call it after ``generate``
returns), or automatically when a prefill record follows a verification record (a new call or a new wave of
rows began) or names a row that is still open. Rows stop at their stop token (``SamplingParams.stop_token_ids``
plus ``eos_token_ids``), exactly where the engine stops them.

Every sample carries the ``policy_version`` of the records it was built from. Memory is bounded by
``max_positions`` and/or ``max_bytes`` over everything held (finalized samples and rows still open): the oldest
finalized samples are evicted first, and when only open rows are left the oldest open row is dropped.

The hook is cheap: it copies only the valid slices, computes the top-K labels on the fly (one ``topk`` and one
``logsumexp`` over the valid positions of a record), and stores features in ``feat_dtype`` (float16 default).
It is thread-safe: a trainer may read :meth:`samples` from another thread while the engine generates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from atlas_rl.training.samples import SequenceSample
from atlas_rl.types import CaptureRecord

logger = logging.getLogger(__name__)

__all__ = ["CaptureBuffer", "CaptureBufferConfig"]


@dataclass
class CaptureBufferConfig:
    """Settings of :class:`CaptureBuffer`.

    Parameters:
        fuse_layers: target ``hidden_states`` indices whose features are kept (the draft head's ``fuse_layers``).
        top_k: soft labels kept per position (the target's most likely tokens).
        max_positions: bound on the positions held (finalized samples + open rows); None = unbounded.
        max_bytes: bound on the bytes of the tensors held; None = unbounded.
        feat_dtype: dtype the features are stored in.
        min_labels: finalized samples with fewer labeled positions are discarded.
        eos_token_ids: tokens that end a row besides ``SamplingParams.stop_token_ids`` (``attach`` fills them in
            from the engine unless ``ignore_eos``).
    """

    fuse_layers: tuple[int, ...] = field(
        default=(-1,),
        metadata={"help": "Target hidden_states indices kept as features: the adaptive head's fuse_layers."},
    )
    top_k: int = field(default=32, metadata={"help": "Soft labels kept per position (target top-K tokens)."})
    max_positions: int | None = field(
        default=200_000,
        metadata={
            "help": "Max positions held (finalized + open rows); the oldest samples are evicted. None: no bound."
        },
    )
    max_bytes: int | None = field(
        default=None, metadata={"help": "Max bytes of tensors held; the oldest samples are evicted. None: no bound."}
    )
    feat_dtype: torch.dtype = field(
        default=torch.float16, metadata={"help": "Storage dtype of the features (float16 halves the memory)."}
    )
    min_labels: int = field(default=1, metadata={"help": "Discard finalized samples with fewer labeled positions."})
    eos_token_ids: tuple[int, ...] = field(
        default=(), metadata={"help": "Tokens that end a row besides the sampling stop tokens (attach() sets them)."}
    )

    def __post_init__(self) -> None:
        self.fuse_layers = tuple(int(x) for x in self.fuse_layers)
        if not self.fuse_layers:
            raise ValueError("fuse_layers needs at least one target layer, e.g. (-1,) (use the head's fuse_layers)")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        for name in ("max_positions", "max_bytes"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None (no bound) or an int >= 1, got {v!r}")
        if not isinstance(self.feat_dtype, torch.dtype) or not self.feat_dtype.is_floating_point:
            raise ValueError(
                f"feat_dtype must be a floating torch.dtype such as torch.float16, got {self.feat_dtype!r}"
            )
        if isinstance(self.min_labels, bool) or not isinstance(self.min_labels, int) or self.min_labels < 0:
            raise ValueError(f"min_labels must be an int >= 0, got {self.min_labels!r}")
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)


@dataclass
class _Chunk:
    """Consecutive positions of one row, from one record (tensors are the buffer's own: copies, or views of tensors
    the buffer made for the whole record)."""

    tokens: torch.Tensor  # [m] long
    feats: torch.Tensor  # [m, F] feat_dtype
    label_ids: torch.Tensor  # [m, K] long, -1 = no label
    label_probs: torch.Tensor  # [m, K] float32
    label_mask: torch.Tensor  # [m] bool

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.tokens, self.feats, self.label_ids, self.label_probs, self.label_mask)
        )


@dataclass
class _OpenRow:
    """A row of the current ``generate`` call whose sample is being assembled."""

    policy_version: int
    next_pos: int  # absolute position of the next position to append
    chunks: list[_Chunk]
    order: int  # creation order (oldest open rows are dropped first when over the bound)
    last_token: int | None = None  # the emitted token after the last position (not yet run through the target)
    stopped: bool = False  # the row emitted a stop token: later records are ignored
    positions: int = 0
    nbytes: int = 0

    def add(self, chunk: _Chunk) -> None:
        self.chunks.append(chunk)
        m = int(chunk.tokens.shape[0])
        self.next_pos += m
        self.positions += m
        self.nbytes += chunk.nbytes


class CaptureBuffer:
    """Bounded store of draft-head training samples built from the engine's capture records.

    Example::

        buffer = CaptureBuffer(CaptureBufferConfig(fuse_layers=head.config.fuse_layers, max_positions=100_000))
        handle = buffer.attach(engine)
        engine.generate(prompts, sampling)
        buffer.flush()                      # the call ended: finalize its rows
        samples = buffer.samples()          # list[SequenceSample], oldest first, tagged with policy_version
    """

    def __init__(self, config: CaptureBufferConfig | None = None) -> None:
        self.config = config or CaptureBufferConfig()
        self._lock = threading.RLock()
        self._samples: deque[SequenceSample] = deque()
        self._open: dict[int, _OpenRow] = {}
        self._open_order = 0
        self._last_was_prefill = False
        self._positions = 0  # finalized samples
        self._bytes = 0
        # counters
        self.num_records = 0
        self.num_samples_added = 0
        self.num_samples_evicted = 0
        self.num_rows_dropped = 0  # open rows dropped (over the bound, or out of sync with the engine)
        self.hook_s = 0.0  # wall time spent inside the hook

    # ------------------------------------------------------------------------------------------ wiring
    def attach(self, engine: Any) -> Any:
        """Register this buffer as ``engine``'s capture hook (and take its EOS tokens); returns the hook handle."""
        eos = tuple(int(t) for t in getattr(engine, "eos_token_ids", ()))
        if eos and not self.config.eos_token_ids:
            self.config.eos_token_ids = eos
        return engine.add_capture_hook(self)

    def __call__(self, record: CaptureRecord) -> None:
        t0 = time.perf_counter()
        try:
            # the engine runs generate() under inference_mode; copies made here must be normal tensors, usable
            # later by autograd in the trainer
            with torch.inference_mode(False), torch.no_grad():
                if record.is_prefill:
                    self._on_prefill(record)
                else:
                    self._on_step(record)
        finally:
            self.hook_s += time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------ reading
    def samples(self, min_version: int | None = None) -> list[SequenceSample]:
        """The finalized samples (oldest first), optionally only those of ``policy_version >= min_version``."""
        with self._lock:
            if min_version is None:
                return list(self._samples)
            return [s for s in self._samples if s.policy_version >= min_version]

    def labels_by_version(self) -> dict[int, int]:
        """Labeled positions held per policy version (finalized samples)."""
        out: dict[int, int] = {}
        with self._lock:
            for s in self._samples:
                out[s.policy_version] = out.get(s.policy_version, 0) + s.num_labels
        return out

    @property
    def newest_version(self) -> int | None:
        """The newest policy version among the finalized samples (None when empty)."""
        with self._lock:
            return max((s.policy_version for s in self._samples), default=None)

    @property
    def num_positions(self) -> int:
        """Positions held: finalized samples plus open rows (what ``max_positions`` bounds)."""
        with self._lock:
            return self._positions + sum(r.positions for r in self._open.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held: finalized samples plus open rows (what ``max_bytes`` bounds)."""
        with self._lock:
            return self._bytes + sum(r.nbytes for r in self._open.values())

    @property
    def num_open_rows(self) -> int:
        with self._lock:
            return len(self._open)

    def __len__(self) -> int:
        with self._lock:
            return len(self._samples)

    def stats(self) -> dict[str, float]:
        with self._lock:
            return {
                "samples": len(self._samples),
                "positions": self.num_positions,
                "bytes": self.nbytes,
                "open_rows": len(self._open),
                "records": self.num_records,
                "samples_added": self.num_samples_added,
                "samples_evicted": self.num_samples_evicted,
                "rows_dropped": self.num_rows_dropped,
                "hook_s": self.hook_s,
            }

    # ------------------------------------------------------------------------------------------ writing
    def flush(self) -> int:
        """Finalize every open row (call after ``generate`` returns). Returns the number of samples added."""
        with self._lock:
            rows = sorted(self._open.items())  # the batch's order (row ids), not the engine's prefill order
            self._open.clear()
            added = sum(self._finalize(r) for _, r in rows)
            self._enforce_bound()
            return added

    def add(self, samples: SequenceSample | Iterable[SequenceSample]) -> None:
        """Add ready-made samples (e.g. from :func:`atlas_rl.training.offline.samples_from_sequences`)."""
        if isinstance(samples, SequenceSample):
            samples = [samples]
        with self._lock:
            for s in samples:
                self._push(s)
            self._enforce_bound()

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()
            self._open.clear()
            self._positions = 0
            self._bytes = 0

    # ------------------------------------------------------------------------------------------ internals
    def _features(
        self, hidden_states: dict[int, torch.Tensor]
    ) -> torch.Tensor:  # [n, q, F] concatenated fuse_layers (a view when there is one layer)
        missing = [la for la in self.config.fuse_layers if la not in hidden_states]
        if missing:
            raise ValueError(
                f"capture record has no hidden states for layers {missing} (it has {sorted(hidden_states)}); "
                "set CaptureBufferConfig.fuse_layers to valid hidden_states indices"
            )
        hs = [hidden_states[la] for la in self.config.fuse_layers]
        return hs[0] if len(hs) == 1 else torch.cat(hs, -1)

    def _labels(
        self,
        logits: torch.Tensor,  # [M, vocab] raw logits
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ids [M, K] long, probs [M, K] float32
        """Top-K of the T=1 distribution without materialising the full log-softmax."""
        k = min(self.config.top_k, logits.shape[-1])
        vals, ids = logits.topk(k, dim=-1)
        lse = torch.logsumexp(logits.float(), -1, keepdim=True)
        return ids.to("cpu", torch.long), (vals.float() - lse).exp().to("cpu")

    def _step_labels(
        self,
        rec: CaptureRecord,
        valid: torch.Tensor,  # [n, q] bool, positions on the sequences
    ) -> tuple[torch.Tensor, torch.Tensor]:  # ids [M, K] long, probs [M, K] float32
        """Top-K labels of a verification step: from the verifier's log-softmax when the record carries it (no
        second pass over the vocabulary), picked by a compiled top-k on CPU; else :meth:`_labels` of the logits."""
        lp = rec.target_logprobs
        if lp is None:
            return self._labels(rec.target_logits[valid])
        from atlas_rl.rollout.cpu_glue import topk_rows  # the compiled loops live with the engine's

        vocab = lp.shape[-1]
        flat = valid.reshape(-1).nonzero().squeeze(1)  # [M] positions in n * q order (= boolean indexing's)
        vals, ids = topk_rows(lp.reshape(-1, vocab), flat, min(self.config.top_k, vocab))
        return ids.to("cpu", torch.long), vals.float().exp().to("cpu")

    def _on_prefill(self, rec: CaptureRecord) -> None:
        cfg = self.config
        n = int(rec.input_ids.shape[0])
        plens = (rec.num_valid + 1).tolist()
        if rec.last_logits is None or rec.prompt_rows is None:
            raise ValueError("prefill capture records need last_logits and prompt_rows (engine too old?)")
        feats = self._features(rec.hidden_states)  # [n, plen, F]
        last_ids, last_probs = self._labels(rec.last_logits)  # [n, K]
        K = last_ids.shape[-1]
        ids_cpu = rec.input_ids.to("cpu")
        with self._lock:
            self.num_records += 1
            if not self._last_was_prefill and self._open:
                # a prefill after verification steps: the previous call (or wave) has ended
                for _, r in sorted(self._open.items()):  # the batch's order (row ids)
                    self._finalize(r)
                self._open.clear()
            self._last_was_prefill = True
            for g in range(n):
                P = plens[g]
                f = feats[g, :P].to("cpu", cfg.feat_dtype, copy=True)
                lid = torch.full((P, K), -1, dtype=torch.long)
                lpr = torch.zeros((P, K), dtype=torch.float32)
                lid[P - 1] = last_ids[g]
                lpr[P - 1] = last_probs[g]
                lmask = torch.zeros(P, dtype=torch.bool)
                lmask[P - 1] = True
                chunk = _Chunk(ids_cpu[g, :P].clone(), f, lid, lpr, lmask)  # shared by the group's rows (read-only)
                for row_id in rec.prompt_rows[g]:
                    old = self._open.pop(row_id, None)
                    if old is not None:
                        self._finalize(old)
                    row = _OpenRow(policy_version=rec.policy_version, next_pos=0, chunks=[], order=self._open_order)
                    self._open_order += 1
                    row.add(chunk)
                    self._open[row_id] = row
            self._enforce_bound()

    def _on_step(self, rec: CaptureRecord) -> None:
        cfg = self.config
        n, q = rec.input_ids.shape
        nv = rec.num_valid.to("cpu")
        valid = torch.arange(q)[None, :] < nv[:, None]  # [n, q]
        valid_dev = valid.to(rec.input_ids.device)
        feats = self._features(rec.hidden_states)[valid_dev].to("cpu", cfg.feat_dtype)  # [M, F]
        lids, lprobs = self._step_labels(rec, valid_dev)  # [M, K]
        toks = rec.input_ids[valid_dev].to("cpu")  # [M]
        ones = torch.ones(toks.shape[0], dtype=torch.bool)  # [M] label masks
        counts = nv.tolist()
        next_ids = rec.next_ids.to("cpu")
        pos0 = rec.positions[:, 0].tolist()
        stops = set(rec.sampling.stop_token_ids)
        if not rec.sampling.ignore_eos:
            stops.update(cfg.eos_token_ids)
        with self._lock:
            self.num_records += 1
            self._last_was_prefill = False
            off = 0
            for i, row_id in enumerate(rec.row_ids):
                m = counts[i]
                a, b = off, off + m
                off = b
                row = self._open.get(row_id)
                if row is None or row.stopped:
                    continue
                if pos0[i] != row.next_pos or (row.last_token is not None and int(toks[a]) != row.last_token):
                    logger.debug(
                        "row %d: capture out of sync (position %d, expected %d); dropped",
                        row_id,
                        pos0[i],
                        row.next_pos,
                    )
                    del self._open[row_id]
                    self.num_rows_dropped += 1
                    continue
                emitted = next_ids[i, :m].tolist()
                for j, t in enumerate(emitted):
                    if t in stops:  # the row ends here; positions past the stop token are not on its sequence
                        m = j + 1
                        row.stopped = True
                        break
                # views: the step's tensors were made here (indexing copies), its rows' slices share them
                row.add(_Chunk(toks[a : a + m], feats[a : a + m], lids[a : a + m], lprobs[a : a + m], ones[a : a + m]))
                row.last_token = int(emitted[m - 1])
            self._enforce_bound()

    def _finalize(self, row: _OpenRow) -> int:
        """Turn an open row into a SequenceSample (1 if kept, 0 if discarded). Caller holds the lock."""
        if not row.chunks:
            return 0
        tokens = torch.cat([c.tokens for c in row.chunks])
        feats = torch.cat([c.feats for c in row.chunks])
        lids = torch.cat([c.label_ids for c in row.chunks])
        lprobs = torch.cat([c.label_probs for c in row.chunks])
        lmask = torch.cat([c.label_mask for c in row.chunks])
        has = torch.ones(tokens.shape[0], dtype=torch.bool)
        if row.last_token is not None:
            # the last emitted token closes the sequence: it was never run through the target (no features/label)
            K = lids.shape[-1]
            tokens = torch.cat([tokens, torch.tensor([row.last_token], dtype=torch.long)])
            feats = torch.cat([feats, feats.new_zeros((1, feats.shape[-1]))])
            lids = torch.cat([lids, torch.full((1, K), -1, dtype=torch.long)])
            lprobs = torch.cat([lprobs, torch.zeros((1, K), dtype=torch.float32)])
            lmask = torch.cat([lmask, torch.zeros(1, dtype=torch.bool)])
            has = torch.cat([has, torch.zeros(1, dtype=torch.bool)])
        # the head reads x_{t+1} at position t: the last position has no next token, so it cannot be a base
        has[-1] = False
        sample = SequenceSample(tokens, feats, has, lids, lprobs, lmask, policy_version=row.policy_version)
        if sample.num_labels < max(1, self.config.min_labels):
            return 0
        self._push(sample)
        return 1

    def _push(self, sample: SequenceSample) -> None:
        self._samples.append(sample)
        self._positions += len(sample)
        self._bytes += sample.nbytes
        self.num_samples_added += 1

    def _over(self) -> bool:
        cfg = self.config
        pos = self._positions + sum(r.positions for r in self._open.values())
        if cfg.max_positions is not None and pos > cfg.max_positions:
            return True
        nb = self._bytes + sum(r.nbytes for r in self._open.values())
        return cfg.max_bytes is not None and nb > cfg.max_bytes

    def _enforce_bound(self) -> None:
        """Evict the oldest finalized samples, then the oldest open rows, until the bounds hold."""
        while self._over():
            if self._samples:
                s = self._samples.popleft()
                self._positions -= len(s)
                self._bytes -= s.nbytes
                self.num_samples_evicted += 1
            elif self._open:
                row_id = min(self._open, key=lambda r: self._open[r].order)
                del self._open[row_id]
                self.num_rows_dropped += 1
            else:  # pragma: no cover - nothing held yet over the bound is impossible
                break
