"""The measured cost of a decode step: one target verification forward over ``rows`` active rows x ``tokens``
tokens per row (the pending token + the longest draft), plus the rest of the step (verification, bookkeeping).

Physics this model must capture without assuming a shape:

* memory-bound decoding (GPU; a CPU at one row): verifying a few tokens costs little more than generating one,
  so speculation pays even at modest acceptance;
* compute-bound decoding (a 2-core CPU at 16-64 rows): the cost grows about linearly with the tokens of the
  forward, so a verified token costs about as much as a generated one and speculation cannot pay.

So the cost is a *table* of measured seconds over a grid of rows (powers of two) x tokens per row (1 .. T),
interpolated linearly in rows, exact in tokens. It is calibrated once per model/device/dtype/threads/engine code
version by timing engine-style forwards in interleaved passes within a time budget, keeping each point's fastest
time and a table monotone in tokens and rows (cached as JSON under ``cache_dir()/controller``), then refined online
from the engine's own step timings (``StepRecord.forward_s``): each observation moves the table cells around it,
multiplicatively, toward what was measured. Cells the calibration did not reach are filled by interpolation and
(beyond the largest measured row) linear extrapolation in rows; online refinement then corrects them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# (rows, tokens per row, repeats) -> median seconds of one verification forward
ForwardTimer = Callable[[int, int, int], float]

# every power of two up to 16: on a CPU the cost of a forward follows its columns (rows x tokens) in steps of the
# matmul kernels' row tiles, which interpolating in rows between 4 and 16 cannot see (the AMD host: 8 rows x 2 tokens
# priced 104 ms from rows 4 and 16, measured 131 ms inside generate; 1.9x one token, not 1.4x)
CALIBRATION_ROWS: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
CALIBRATION_TOKENS: tuple[int, ...] = (1, 2, 3, 5, 9)
CALIBRATION_ROUNDS = 3  # interleaved passes over the calibration points (each point keeps its fastest)
CACHE_FORMAT = "atlas-rl/verification-cost"
CACHE_VERSION = 3  # 2: interleaved passes (a table from single timings is measured again); 3: rows 2 and 8 timed
# a cached table is checked at load on a few one-row points (timed SPOT_CHECK_ROUNDS times, fastest kept) and
# measured again when one of them is off by more than this factor either way: the machine's state changed since
# it was calibrated (seen here: 1 row x 3 tokens priced 1.04x a plain step by a table from a faster evening, 1.2x)
STALE_FACTOR = 1.15
# ... or when the one-row curve's *shape* (t tokens over one token, what every draft-length decision divides) is off
# by more than this: a table cached while the other core was busy had 1x1 5% dear and 1x2 5% cheap (1x2 / 1x1 1.01
# against 1.12 now), within STALE_FACTOR point by point, and the controller verified 1-token drafts at a loss
SHAPE_FACTOR = 1.06
SPOT_CHECK_ROUNDS = 2
SPOT_CHECK_JITTER_S = 2e-4  # added to both sides of the comparison: sub-millisecond forwards (tiny test models)


class VerificationCost:
    """Seconds of a decode step as a function of active rows ``n`` and tokens per row ``t`` (= draft length + 1).

    ``forward_s(n, t)`` is the target forward (the part that grows with the draft); ``overhead_s(n, t)`` the rest of
    the step besides drafting (sampling and verification, bookkeeping, planning; learned online, 0 until observed),
    which a step that verifies drafts pays more of than a plain one: kept per tokens per row like the forward, so a
    speculating step's extras are priced where they are paid, not averaged into every plain step.

    Args:
        measured: ``{(rows, tokens): seconds}`` calibration points; must hold ``(1, 1)``.
        refine_rate: step size of online refinement in log space (0 freezes the table).
        shared_rate: fraction of a refinement applied to the other token cells of the same rows (a slower
            common drift, e.g. from a longer context, moves the whole row).
        key: the cache key the table belongs to (informational).
    """

    def __init__(
        self,
        measured: dict[tuple[int, int], float],
        refine_rate: float = 0.2,
        shared_rate: float = 0.3,
        key: str = "",
    ) -> None:
        if (1, 1) not in measured:
            raise ValueError("VerificationCost needs at least the (rows=1, tokens=1) measurement")
        if any(s <= 0 or not math.isfinite(s) for s in measured.values()):
            raise ValueError(f"measured seconds must be finite and > 0, got {measured}")
        if not (0.0 <= refine_rate <= 1.0) or not (0.0 <= shared_rate <= 1.0):
            raise ValueError("refine_rate and shared_rate must lie in [0, 1]")
        self.measured = dict(measured)
        self.refine_rate = refine_rate
        self.shared_rate = shared_rate
        self.key = key
        self.from_cache = False
        self.reliable = True  # False: the calibration looked disturbed (then it is not cached)
        self.requested_tokens = max(t for _, t in measured)  # tokens per row the calibration was asked to cover
        self.calibration_s = 0.0
        self.num_observations = 0
        max_rows = max(r for r, _ in measured)
        self.rows: list[int] = [1 << i for i in range(max(7, math.ceil(math.log2(max_rows)) + 1))]
        self.max_tokens = max(t for _, t in measured)
        self._log = np.log(_fill_table(measured, self.rows, self.max_tokens))  # [R, T] log seconds
        self._overhead = np.zeros(self._log.shape)  # [R, T] seconds, never decreasing in tokens

    # ------------------------------------------------------------------------------------------ queries
    def forward_s(self, rows: int, tokens: int) -> float:
        """Predicted seconds of one verification forward of ``rows`` rows x ``tokens`` tokens per row."""
        return float(self.forward_curve(rows, tokens)[-1])

    def forward_curve(self, rows: int, max_tokens: int) -> np.ndarray:
        """``[max_tokens]`` predicted forward seconds for tokens per row = 1 .. max_tokens at ``rows`` rows."""
        self._ensure(rows, max_tokens)
        i, w = self._bracket(rows)
        sec = np.exp(self._log[i, :max_tokens])
        if w > 0:
            sec = (1 - w) * sec + w * np.exp(self._log[i + 1, :max_tokens])
        return sec

    def overhead_s(self, rows: int, tokens: int = 1) -> float:
        """Predicted seconds of a step of ``tokens`` tokens per row besides the forward and drafting (verification,
        bookkeeping, planning)."""
        return float(self.overhead_curve(rows, tokens)[-1])

    def overhead_curve(self, rows: int, max_tokens: int) -> np.ndarray:
        """``[max_tokens]`` predicted :meth:`overhead_s` for tokens per row = 1 .. max_tokens at ``rows`` rows."""
        self._ensure(rows, max_tokens)
        i, w = self._bracket(rows)
        o = self._overhead[i, :max_tokens]
        return o.copy() if w == 0 else (1 - w) * o + w * self._overhead[i + 1, :max_tokens]

    def step_curve(self, rows: int, max_tokens: int) -> np.ndarray:
        """``[max_tokens]`` predicted seconds of a whole step but its drafting (forward + overhead)."""
        return self.forward_curve(rows, max_tokens) + self.overhead_curve(rows, max_tokens)

    # ------------------------------------------------------------------------------------------ online
    def observe(
        self, rows: int, tokens: int, forward_s: float, overhead_s: float | None = None, count: int = 1
    ) -> None:
        """Move the table toward one measured step (``forward_s`` of the forward, ``overhead_s`` of the rest), or
        toward ``count`` alike steps at once (their typical timings): the refinement ``count`` single observations
        of them would make (``1 - (1 - refine_rate) ** count`` of the error), in one update of the table."""
        if rows < 1 or tokens < 1 or not (forward_s > 0) or not math.isfinite(forward_s) or count < 1:
            return
        self.num_observations += count
        rate = 1.0 - (1.0 - self.refine_rate) ** count
        self._ensure(rows, tokens)
        i, w = self._bracket(rows)
        pred = self.forward_s(rows, tokens)
        err = min(0.5, max(-0.5, math.log(forward_s / pred)))
        d = None
        if overhead_s is not None and math.isfinite(overhead_s):
            d = max(0.0, overhead_s) - self.overhead_s(rows, tokens)
        for idx, wt in ((i, 1 - w), (i + 1, w)):
            if wt <= 0:
                continue
            self._refine(self._log, idx, tokens, wt * err, rate)
            if d is not None:
                self._refine(self._overhead, idx, tokens, wt * d, rate)
                np.maximum(self._overhead[idx], 0.0, out=self._overhead[idx])

    def _refine(self, table: np.ndarray, idx: int, tokens: int, delta: float, rate: float) -> None:  # table: [R, T]
        """Move row ``idx`` of ``table`` (log forward seconds, or overhead seconds) toward an observation at
        ``tokens``: the observed cell by ``rate x delta``, the rest of the row by ``shared_rate`` of it (a common
        drift, e.g. a longer context); then more tokens per row never cost less than fewer."""
        table[idx] += rate * self.shared_rate * delta
        table[idx, tokens - 1] += rate * (1 - self.shared_rate) * delta
        table[idx] = np.maximum.accumulate(table[idx])

    # ------------------------------------------------------------------------------------------ grid
    def _bracket(self, rows: int) -> tuple[int, float]:
        """Grid index i and weight w of ``rows`` between ``self.rows[i]`` and ``self.rows[i + 1]``."""
        i = max(0, min(len(self.rows) - 1, int(math.floor(math.log2(max(rows, 1))))))
        if self.rows[i] == rows or i == len(self.rows) - 1:
            return i, 0.0
        return i, (rows - self.rows[i]) / (self.rows[i + 1] - self.rows[i])

    def _ensure(self, rows: int, tokens: int) -> None:
        """Grow the grid when asked beyond it: doubling rows (as :func:`_fill_table` extrapolates) and one more
        token column at a time (linearly, never decreasing)."""
        while self.rows[-1] < rows:
            # as in _fill_table: one token linear in rows, the token ratio tending to t (more compute-bound)
            a, b = np.exp(self._log[-2]), np.exp(self._log[-1])
            c1 = b[0] + max(0.0, b[0] - a[0]) / (self.rows[-1] - self.rows[-2]) * self.rows[-1]
            tok = np.arange(1, len(b) + 1, dtype=float)
            nxt = c1 * (tok - (tok - b / b[0]) * 0.5)
            self.rows.append(self.rows[-1] * 2)
            self._log = np.vstack([self._log, np.log(nxt)[None]])
            self._overhead = np.vstack([self._overhead, self._overhead[-1:]])
        while self._log.shape[1] < tokens:
            t = self._log.shape[1]
            b = np.exp(self._log[:, -1])
            step = b - np.exp(self._log[:, -2]) if t >= 2 else b  # one column only: linear in tokens
            self._log = np.hstack([self._log, np.log(np.minimum(b + np.maximum(step, 0.0), b * (t + 1) / t))[:, None]])
            self._overhead = np.hstack([self._overhead, self._overhead[:, -1:]])

    # ------------------------------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key": self.key,
            "calibration_s": self.calibration_s,
            "requested_tokens": self.requested_tokens,
            "measured": [[r, t, s] for (r, t), s in sorted(self.measured.items())],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any], **kwargs: Any) -> VerificationCost:
        if d.get("format") != CACHE_FORMAT or d.get("version") != CACHE_VERSION:
            raise ValueError(f"not a {CACHE_FORMAT} v{CACHE_VERSION} file")
        out = cls({(int(r), int(t)): float(s) for r, t, s in d["measured"]}, key=d.get("key", ""), **kwargs)
        out.calibration_s = float(d.get("calibration_s", 0.0))
        out.requested_tokens = int(d.get("requested_tokens", out.requested_tokens))
        return out


def _sanitize(measured: dict[tuple[int, int], float]) -> dict[int, dict[int, float]]:
    """Measurements per row, made consistent with what any device obeys (a timing spike from another process
    must not become a permanent belief): more tokens or more rows never cost less, and never more than running
    them one after the other (t tokens <= t x one token; r rows <= r / r' x the cost of r' rows)."""
    by_row: dict[int, dict[int, float]] = {}
    for r in sorted({r for r, _ in measured}):
        row = {t: s for (rr, t), s in sorted(measured.items()) if rr == r}
        one, run = row.get(1), 0.0
        for t in sorted(row):
            v = min(row[t], one * t) if one is not None else row[t]
            run = max(run, v)
            row[t] = run
        lower = [rr for rr in by_row if rr < r]
        if lower:
            prev = by_row[max(lower)]
            for t in row:
                if t in prev:
                    row[t] = min(max(row[t], prev[t]), prev[t] * r / max(lower))
        by_row[r] = row
    return by_row


def _fill_table(measured: dict[tuple[int, int], float], grid_rows: list[int], max_tokens: int) -> np.ndarray:
    """``[len(grid_rows), max_tokens]`` seconds from scattered measurements, as ``C(r, t) = C(r, 1) * ratio(r, t)``.

    * ``C(r, 1)`` (one token per row) is piecewise-linear in rows through the rows that measured it, extrapolated
      linearly past the largest (proportionally to the rows when only one row was measured);
    * ``ratio(r, t)`` (what t tokens per row cost relative to one) is piecewise-linear in tokens for every row
      that measured several token counts (extrapolated linearly past its largest, never decreasing), linear in
      log-rows between such rows, the smallest one's below them, and past the largest one it tends to ``t``: larger
      batches are more compute-bound, and a forward over ``t`` tokens costs at most ``t`` forwards of one. So an
      unmeasured large batch is assumed *less* favourable to speculation than the largest measured one (never
      slower), until online refinement shows otherwise.
    """
    by_row = {r: pts for r, pts in _sanitize(measured).items() if 1 in pts}
    tok = np.arange(1, max_tokens + 1, dtype=float)
    one_rows = np.array(sorted(by_row), dtype=float)
    one = np.array([by_row[int(r)][1] for r in one_rows])
    ratios: dict[int, np.ndarray] = {}
    for r, pts in by_row.items():
        if len(pts) >= 2:
            ts = np.array(sorted(pts), dtype=float)
            ss = np.array([pts[int(t)] for t in ts]) / pts[1]
            line = np.interp(tok, ts, ss)
            hi = tok > ts[-1]
            slope = max(0.0, (ss[-1] - ss[-2]) / (ts[-1] - ts[-2]))
            line[hi] = np.minimum(ss[-1] + slope * (tok[hi] - ts[-1]), tok[hi])
            ratios[r] = line
    prow = np.array(sorted(ratios), dtype=float)
    pmat = np.stack([ratios[int(r)] for r in prow]) if ratios else np.empty((0, max_tokens))  # [P, T]
    table = np.empty((len(grid_rows), max_tokens))
    for i, g in enumerate(grid_rows):
        if g <= one_rows[-1]:
            c1 = float(np.interp(g, one_rows, one))
        elif len(one_rows) >= 2:
            c1 = one[-1] + max(0.0, (one[-1] - one[-2]) / (one_rows[-1] - one_rows[-2])) * (g - one_rows[-1])
        else:
            c1 = one[-1] * g / one_rows[-1]
        if len(prow) == 0:
            ratio = tok  # nothing known about several tokens: compute-bound, the pessimistic assumption
        elif g <= prow[-1]:
            ratio = np.array([np.interp(math.log(g), np.log(prow), pmat[:, j]) for j in range(max_tokens)])
        else:
            ratio = tok - (tok - pmat[-1]) * (prow[-1] / g)
        table[i] = c1 * ratio
    return np.maximum(table, 1e-9)


# ---------------------------------------------------------------------------------------------- calibration
def token_points(tokens: Sequence[int], max_tokens: int) -> list[int]:
    """The tokens-per-row points a calibration times: ``tokens`` up to ``max_tokens``, and 1 and ``max_tokens``."""
    return sorted({t for t in tokens if t <= max_tokens} | {1, max_tokens})


def calibrate(
    timer: ForwardTimer,
    max_tokens: int = 9,
    budget_s: float = 5.0,
    rows: Sequence[int] = CALIBRATION_ROWS,
    tokens: Sequence[int] = CALIBRATION_TOKENS,
    key: str = "",
    rounds: int = CALIBRATION_ROUNDS,
) -> VerificationCost:
    """Time verification forwards on this machine within ``budget_s``, in ``rounds`` interleaved passes.

    Points are ``rows x tokens`` (plus ``max_tokens`` when it exceeds every entry of ``tokens``). The first pass
    goes cheapest first, row by row, within ``budget_s / rounds``: a point is skipped when its predicted cost (from
    the points already measured) no longer fits, and the pass stops at the first row whose single-token forward
    does not fit; ``(1, 1)`` is always measured. The further passes time every chosen point once more, in the same
    order, while a whole pass still fits the budget: a busy spell of another process then slows a pass, not one
    point. Each point keeps its fastest time (interference only ever adds time), and the table is made monotone
    (more tokens or rows never cost less; see :func:`_sanitize`). Points whose passes disagree by more than 2x
    mark the calibration as disturbed (used, not cached).
    """
    if budget_s <= 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    toks = token_points(tokens, max_tokens)
    t_start = time.perf_counter()
    timer(1, 1, 1)  # warm-up (allocator, kernels); not recorded
    times = {p: [s] for p, s in _first_pass(timer, sorted(set(rows)), toks, budget_s / rounds, t_start).items()}
    for _ in range(rounds - 1):
        if time.perf_counter() - t_start + sum(min(v) for v in times.values()) > budget_s:
            break
        for (r, t), v in times.items():
            v.append(timer(r, t, 1))
    measured = {p: min(v) for p, v in times.items()}
    spread = max(max(v) / min(v) for v in times.values())
    sane = _sanitize(measured)
    worst = max(measured[(r, t)] / sane[r][t] for r, t in measured)
    cost = VerificationCost(measured, key=key)
    cost.requested_tokens = max_tokens
    cost.calibration_s = time.perf_counter() - t_start
    # a table is cached only when it is complete enough to decide with: every draft length at one row, timed in
    # two passes or more (a busy machine can leave time for the (1, 1) point alone, and a one-point table
    # extrapolates every verification as dear as that point: the controller would never draft again)
    complete = all((1, t) in times for t in toks) and min(len(v) for v in times.values()) >= 2
    cost.reliable = worst <= 3.0 and spread <= 2.0 and complete
    logger.info(
        "verification cost calibrated in %.1f s (%d passes)%s: %s",
        cost.calibration_s,
        max(len(v) for v in times.values()),
        "" if cost.reliable else " (disturbed: the machine looks busy; not cached)",
        ", ".join(f"{r}x{t}={s * 1e3:.1f}ms" for (r, t), s in sorted(measured.items())),
    )
    return cost


def _first_pass(
    timer: ForwardTimer, rows: list[int], toks: list[int], budget_s: float, t_start: float
) -> dict[tuple[int, int], float]:
    """One timing per point, cheapest first, of the points that fit ``budget_s`` (see :func:`calibrate`)."""
    measured: dict[tuple[int, int], float] = {}
    for r in rows:
        for t in toks:
            est = _estimate(measured, r, t)
            if measured and time.perf_counter() - t_start + est > budget_s:
                if t == 1:
                    return measured
                continue
            measured[(r, t)] = timer(r, t, 1)
    return measured


def _estimate(measured: dict[tuple[int, int], float], r: int, t: int) -> float:
    """Pessimistic guess of an unmeasured point: linear in tokens from this row's largest measured point, else
    linear in rows from the largest smaller row."""
    same = [(tt, s) for (rr, tt), s in measured.items() if rr == r]
    if same:
        tt, s = max(same)
        return s * t / tt
    lower = [(rr, tt, s) for (rr, tt), s in measured.items() if rr < r and tt == 1]
    if lower:
        rr, _, s = max(lower)
        return s * r / rr * t
    return 0.0


def cost_cache_key(config: dict[str, Any], device: str, dtype: str, threads: int, extra: str = "") -> str:
    """A short hash of what the verification cost depends on: the model's architecture (its config, without
    names and versions), the device, the dtype, the torch thread count and any ``extra`` (e.g. kernel choices)."""
    drop = {"_name_or_path", "transformers_version", "name_or_path", "torch_dtype", "dtype", "_commit_hash"}
    cfg = {k: v for k, v in config.items() if k not in drop}
    blob = json.dumps(
        {"config": cfg, "device": device, "dtype": dtype, "threads": threads, "extra": extra},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cost_cache_path(key: str, root: Path | None = None) -> Path:
    """``<cache_dir>/controller/verification_cost_<key>.json``."""
    if root is None:
        from atlas_rl.models import cache_dir

        root = cache_dir()
    return root / "controller" / f"verification_cost_{key}.json"


def covers_one_row(cost: VerificationCost, max_tokens: int) -> bool:
    """Whether a table measured one row at every calibrated draft length up to ``max_tokens`` (an incomplete
    table cached by an earlier version is measured again)."""
    return all((1, t) in cost.measured for t in token_points(CALIBRATION_TOKENS, max_tokens))


def spot_check(cost: VerificationCost, timer: ForwardTimer, rounds: int = SPOT_CHECK_ROUNDS) -> float:
    """The largest factor (>= 1, either way) by which ``cost`` misprices a few points timed now: one row at 1, 3
    and the largest calibrated tokens, and 4 rows x 1 token when the table measured it; interleaved passes, each
    point keeping its fastest time (as :func:`calibrate`)."""
    return _price_off(cost, _spot_times(cost, timer, rounds))


def _spot_times(cost: VerificationCost, timer: ForwardTimer, rounds: int) -> dict[tuple[int, int], float]:
    """The spot-check points timed now (fastest of ``rounds`` interleaved passes), seconds."""
    points = sorted(
        {(1, 1), (1, min(3, cost.requested_tokens)), (1, cost.requested_tokens)} | ({(4, 1)} & set(cost.measured))
    )
    timer(1, 1, 1)  # warm-up, not recorded
    best = {p: math.inf for p in points}
    for _ in range(rounds):
        for r, t in points:
            best[(r, t)] = min(best[(r, t)], timer(r, t, 1))
    return best


def _price_off(cost: VerificationCost, best: dict[tuple[int, int], float]) -> float:
    j = SPOT_CHECK_JITTER_S
    ratios = [(s + j) / (cost.forward_s(r, t) + j) for (r, t), s in best.items()]
    return max(max(x, 1.0 / x) for x in ratios)


def _shape_off(cost: VerificationCost, best: dict[tuple[int, int], float]) -> float:
    """The largest factor (>= 1, either way) by which ``cost`` misprices one row's t tokens *relative to one token*
    (the ratios every draft-length decision is made of), from the spot-check times ``best``."""
    j = SPOT_CHECK_JITTER_S
    base_now, base_table = best[(1, 1)] + j, cost.forward_s(1, 1) + j
    ratios = [
        ((s + j) / base_now) / ((cost.forward_s(1, t) + j) / base_table)
        for (r, t), s in best.items()
        if r == 1 and t > 1
    ]
    return max((max(x, 1.0 / x) for x in ratios), default=1.0)


def _load_cached(path: Path, timer: ForwardTimer, max_tokens: int) -> VerificationCost | None:
    """The cached table at ``path`` when it covers ``max_tokens`` and still prices this machine (``spot_check``)."""
    if not path.is_file():
        return None
    cost = VerificationCost.from_json(json.loads(path.read_text()))
    if cost.requested_tokens < max_tokens or not covers_one_row(cost, max_tokens):
        return None
    best = _spot_times(cost, timer, SPOT_CHECK_ROUNDS)
    off, shape = _price_off(cost, best), _shape_off(cost, best)
    if off > STALE_FACTOR or shape > SHAPE_FACTOR:
        logger.info(
            "verification cost: %s misprices this machine now by %.2fx (one-row shape %.2fx); measuring again",
            path,
            off,
            shape,
        )
        return None
    cost.from_cache = True
    logger.info("verification cost: reusing %s (spot check within %.2fx, one-row shape %.2fx)", path, off, shape)
    return cost


def load_or_calibrate(
    key: str,
    timer: ForwardTimer,
    max_tokens: int = 9,
    budget_s: float = 5.0,
    root: Path | None = None,
) -> VerificationCost:
    """The cached table of ``key`` when it covers ``max_tokens`` and a spot check of a few points finds it within
    ``STALE_FACTOR`` of this machine now; else calibrate now and cache the result.

    The returned object's ``from_cache`` tells which happened. A calibration that looked disturbed (timings
    inconsistent, see :func:`calibrate`) is used but not cached. A cache that cannot be read or written is
    logged and ignored (the table is then measured again at the next start). Delete the cache files (or the
    ``controller`` folder of the cache) to force a new calibration, e.g. after a hardware change.
    """
    path = cost_cache_path(key, root)
    try:
        cached = _load_cached(path, timer, max_tokens)
        if cached is not None:
            return cached
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("verification cost cache %s is unreadable (%s); measuring again", path, e)
    cost = calibrate(timer, max_tokens=max_tokens, budget_s=budget_s, key=key)
    if not cost.reliable:
        return cost
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(cost.to_json(), f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not cache the verification cost at %s: %s", path, e)
    return cost
