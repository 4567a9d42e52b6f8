"""Join every frame to its scan position.

Positions are metres, ordered (y, x), relative to the scan centre (see :mod:`ptychostream.mosaic.stitch`
for the full geometry convention).

Three sources are supported:

* :class:`PositionJoiner`: positions streamed in chunks keyed by the detector trigger count
  (``uniqueId``), possibly late, shuffled or duplicated, joined to frames by uid. Frames whose
  position has not arrived wait in a bounded holding area. Joining by arrival order is never
  done: it shears mosaics when patches run ahead of positions.
* :class:`TimestampMatcher`: scalar motor readbacks matched by timestamp (the fallback).
* :class:`PatternPositions` / :func:`trajectory_from_file`: a known trajectory indexed by frame
  number (``index = uid - first_uid``), loaded from HDF5, CSV, NPY or NPZ.

The joiner holds opaque items (a patch index, a batch reference...): it never looks into them.

Restarts and duplicates (PositionJoiner)
----------------------------------------
* A position for a uid already in the table with the same value is a duplicate (counted,
  ignored). With a different value it is a conflict: counted, and the latest value wins, except
  for uid <= ``restart_uid`` (the first trigger of a scan), where a conflict means the position
  stream restarted: the table is cleared (``counts["restarts"]``) before the chunk is stored.
* A frame whose uid is already waiting, or was already released, is a duplicate and dropped,
  unless its uid is <= ``restart_uid`` or lies more than ``reorder_window`` below the highest
  released uid: then the detector restarted counting (``counts["frame_restarts"]``) and the
  record of released uids is cleared.
* Positions carry no scan id: frames of a new scan that arrive before that scan's positions
  can meet the previous scan's table. Call :meth:`PositionJoiner.new_scan` when a scan starts
  (e.g. on Acquire) to rule that out.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.positions import read_positions

__all__ = [
    "PatternPositions",
    "PositionJoiner",
    "TimestampMatcher",
    "trajectory_from_file",
]

Pos = tuple[float, float]


def _as_uids(uids) -> list[int]:
    a = np.asarray(uids).reshape(-1)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or (a != np.round(a)).any():
            raise ValueError("uniqueIds must be integers")
    return [int(u) for u in a.tolist()]


class PositionJoiner:
    """Join frames (opaque items keyed by uniqueId) to positions keyed by the same uid.

    Parameters
    ----------
    max_pending: most frames held while waiting for their position; when full the oldest is
        evicted and released as unpositioned.
    timeout_s: frames older than this are released as unpositioned by :meth:`expire`.
    max_positions: most positions kept (oldest evicted); also bounds the record of released uids.
    max_abs_m: positions with |y| or |x| above this (metres) are rejected as out of range.
    restart_uid: uids at or below this start a scan (areaDetector counts from 1).
    reorder_window: how far below the highest released uid a repeated frame uid must fall to
        be taken as a detector restart rather than a duplicate.
    conflict_tol_m: two positions for one uid closer than this are the same.
    clock: time source for ``now`` defaults (``time.monotonic``).
    """

    COUNT_KEYS = (
        "frames", "positions", "matched", "matched_from_frame", "matched_late",
        "unpositioned", "evicted", "timed_out", "dropped_released", "nan_positions",
        "out_of_range", "duplicate_frames", "duplicate_positions", "conflicting_positions",
        "restarts", "frame_restarts", "positions_evicted",
    )

    def __init__(self, max_pending: int = 100_000, timeout_s: float = 5.0,
                 max_positions: int = 1_000_000, max_abs_m: float = 0.01,
                 restart_uid: int = 1, reorder_window: int = 10_000,
                 conflict_tol_m: float = 1e-12,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_pending < 1 or max_positions < 1:
            raise ValueError("max_pending and max_positions must be >= 1")
        self.max_pending = int(max_pending)
        self.timeout_s = float(timeout_s)
        self.max_positions = int(max_positions)
        self.max_abs_m = float(max_abs_m)
        self.restart_uid = int(restart_uid)
        self.reorder_window = int(reorder_window)
        self.conflict_tol_m = float(conflict_tol_m)
        self.clock = clock
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything, counters included."""
        self.counts = {k: 0 for k in self.COUNT_KEYS}
        self.last_error = ""
        self._table: OrderedDict[int, Pos] = OrderedDict()
        self._pending: OrderedDict[int, tuple[Any, float]] = OrderedDict()
        # released uids: those within reorder_window of the highest (older ones can only be a restart),
        # and the scan-start uids (<= restart_uid) apart, so that a restart is seen however long the scan
        self._done: OrderedDict[int, None] = OrderedDict()
        self._started: set[int] = set()
        self._max_done = -math.inf
        self._released: deque[tuple[int, Any]] = deque()

    def new_scan(self) -> None:
        """A scan starts: drop the position table and the record of released uids.

        Frames still waiting stay waiting (their positions may come with the new table).
        """
        self._table.clear()
        self._done.clear()
        self._started.clear()
        self._max_done = -math.inf

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def n_positions(self) -> int:
        return len(self._table)

    def position(self, uid: int) -> Pos | None:
        return self._table.get(int(uid))

    def _error(self, msg: str) -> None:
        self.last_error = msg

    def _check(self, y: float, x: float, uid: int, where: str) -> bool:
        if not (math.isfinite(y) and math.isfinite(x)):
            self.counts["nan_positions"] += 1
            self._error(f"non-finite position for uid {uid} ({where})")
            return False
        if abs(y) > self.max_abs_m or abs(x) > self.max_abs_m:
            self.counts["out_of_range"] += 1
            self._error(f"position ({y:.4g}, {x:.4g}) m for uid {uid} beyond "
                        f"max_abs_m={self.max_abs_m:g} ({where})")
            return False
        return True

    def _mark_done(self, uid: int) -> None:
        if uid <= self.restart_uid:
            self._started.add(uid)
        else:
            self._done[uid] = None
        if uid > self._max_done:
            self._max_done = uid
        # bounded memory: a uid further back than reorder_window is a restart, never a duplicate
        oldest_kept = self._max_done - self.reorder_window
        while self._done and (len(self._done) > self.max_positions or next(iter(self._done)) < oldest_kept):
            self._done.popitem(last=False)

    def _release(self, uid: int, item: Any) -> None:
        """Queue an item released without a position (returned by the next expire())."""
        self.counts["unpositioned"] += 1
        self._mark_done(uid)
        self._released.append((uid, item))
        while len(self._released) > self.max_pending:
            self._released.popleft()
            self.counts["dropped_released"] += 1
            self._error("released-unpositioned queue overflow: call expire() regularly")

    # ------------------------------------------------------------------ frames
    def submit(self, uids, items: Sequence[Any] | None = None, positions=None,
               now: float | None = None) -> list[tuple[int, Any, Pos]]:
        """Offer frames; returns ``[(uid, item, (y, x)), ...]`` ready now, in input order.

        ``items``: one opaque object per uid (``None``: the items are ``None``).
        ``positions``: optional (n, 2) (y, x) metres carried by the frames themselves
        (e.g. NDAttributes); a NaN row means "not in the frame": the table is used.
        Frames with no position yet are held (see :meth:`expire`).
        """
        ul = _as_uids(uids)
        n = len(ul)
        if items is None:
            items = [None] * n
        elif len(items) != n:
            raise ValueError(f"{len(items)} items for {n} uids")
        fpos = None
        if positions is not None:
            fpos = np.asarray(positions, dtype=np.float64)
            if fpos.shape != (n, 2):
                raise ValueError(f"positions shape {fpos.shape} != ({n}, 2)")
            fpos = fpos.tolist()
        t = self.clock() if now is None else float(now)
        out: list[tuple[int, Any, Pos]] = []
        for k, uid in enumerate(ul):
            item = items[k]
            self.counts["frames"] += 1
            if uid in self._pending or uid in self._done or uid in self._started:
                if uid <= self.restart_uid or uid < self._max_done - self.reorder_window:
                    self.counts["frame_restarts"] += 1
                    self._error(f"frame uid went back to {uid}: detector restarted")
                    self._done.clear()
                    self._started.clear()
                    self._max_done = -math.inf
                    if uid in self._pending:  # an old frame of the same uid still waits
                        old, _ = self._pending.pop(uid)
                        self.counts["evicted"] += 1
                        self._release(uid, old)
                else:
                    self.counts["duplicate_frames"] += 1
                    self._error(f"duplicate frame uid {uid} dropped")
                    continue
            if fpos is not None:
                y, x = fpos[k]
                if not (math.isnan(y) and math.isnan(x)) and self._check(y, x, uid, "frame"):
                    self.counts["matched"] += 1
                    self.counts["matched_from_frame"] += 1
                    self._mark_done(uid)
                    out.append((uid, item, (y, x)))
                    continue
            p = self._table.get(uid)
            if p is not None:
                self.counts["matched"] += 1
                self._mark_done(uid)
                out.append((uid, item, p))
                continue
            if len(self._pending) >= self.max_pending:
                old_uid, (old_item, _) = self._pending.popitem(last=False)
                self.counts["evicted"] += 1
                self._error(f"holding area full ({self.max_pending}): frame {old_uid} "
                            "released without position")
                self._release(old_uid, old_item)
            self._pending[uid] = (item, t)
        return out

    def expire(self, now: float | None = None) -> list[tuple[int, Any]]:
        """Release frames that waited longer than ``timeout_s`` (and any evicted ones).

        Returns ``[(uid, item), ...]`` released without a position.
        """
        t = self.clock() if now is None else float(now)
        limit = t - self.timeout_s
        while self._pending:
            uid, (item, t0) = next(iter(self._pending.items()))
            if t0 > limit:
                break
            self._pending.popitem(last=False)
            self.counts["timed_out"] += 1
            self._error(f"frame {uid} waited over {self.timeout_s:g} s for its position")
            self._release(uid, item)
        out = list(self._released)
        self._released.clear()
        return out

    def flush(self) -> list[tuple[int, Any]]:
        """Release every waiting frame as unpositioned (end of scan / shutdown)."""
        while self._pending:
            uid, (item, _) = self._pending.popitem(last=False)
            self._release(uid, item)
        out = list(self._released)
        self._released.clear()
        return out

    # ------------------------------------------------------------------ positions
    def add_positions(self, uids, y_m, x_m) -> list[tuple[int, Any, Pos]]:
        """Store a chunk of positions; returns the waiting frames now ready.

        Returned as ``[(uid, item, (y, x)), ...]`` in the frames' arrival order.
        """
        ul = _as_uids(uids)
        ya = np.asarray(y_m, dtype=np.float64).reshape(-1)
        xa = np.asarray(x_m, dtype=np.float64).reshape(-1)
        if not (len(ul) == ya.size == xa.size):
            raise ValueError(f"lengths differ: {len(ul)} uids, {ya.size} y, {xa.size} x")
        ys, xs = ya.tolist(), xa.tolist()
        tol = self.conflict_tol_m
        # a conflicting position for a scan-start uid: the position stream restarted
        for uid, y, x in zip(ul, ys, xs):
            if uid <= self.restart_uid:
                old = self._table.get(uid)
                if (old is not None and math.isfinite(y) and math.isfinite(x)
                        and (abs(old[0] - y) > tol or abs(old[1] - x) > tol)):
                    self.counts["restarts"] += 1
                    self._error(f"position uid went back to {uid} with a new value: new scan")
                    self._table.clear()
                    break
        ready_uids: list[int] = []
        table = self._table
        for uid, y, x in zip(ul, ys, xs):
            if not self._check(y, x, uid, "position stream"):
                continue
            old = table.get(uid)
            if old is not None:
                if abs(old[0] - y) <= tol and abs(old[1] - x) <= tol:
                    self.counts["duplicate_positions"] += 1
                    continue
                self.counts["conflicting_positions"] += 1
                self._error(f"conflicting position for uid {uid}: ({old[0]:.6g}, {old[1]:.6g})"
                            f" replaced by ({y:.6g}, {x:.6g})")
                table.move_to_end(uid)
            self.counts["positions"] += 1
            table[uid] = (y, x)
            if uid in self._pending:
                ready_uids.append(uid)
        while len(table) > self.max_positions:
            table.popitem(last=False)
            self.counts["positions_evicted"] += 1
        out: list[tuple[int, Any, Pos]] = []
        if ready_uids:
            ready = set(ready_uids)
            for uid in [u for u in self._pending if u in ready]:
                p = table.get(uid)
                if p is None:  # evicted straight away (max_positions tiny)
                    continue
                item, _ = self._pending.pop(uid)
                self.counts["matched"] += 1
                self.counts["matched_late"] += 1
                self._mark_done(uid)
                out.append((uid, item, p))
        return out


class TimestampMatcher:
    """Motor readbacks matched to frames by timestamp.

    ``add_sample(t, y, x)`` stores samples (scalars or arrays) in a bounded ring of
    ``capacity``. ``lookup(t)`` returns (y, x) linearly interpolated between the samples that
    bracket ``t`` when both lie within ``tolerance_s`` of it (``mode="linear"``), otherwise the
    nearest sample within ``tolerance_s``, otherwise ``None``.
    """

    def __init__(self, capacity: int = 100_000, tolerance_s: float = 0.01,
                 mode: str = "linear") -> None:
        if mode not in ("linear", "nearest"):
            raise ValueError("mode must be 'linear' or 'nearest'")
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = int(capacity)
        self.tolerance_s = float(tolerance_s)
        self.mode = mode
        self._buf = np.full((self.capacity, 3), np.nan)
        self._n = 0  # samples stored (<= capacity)
        self._head = 0  # next write slot
        self._sorted: np.ndarray | None = None
        self.counts = {"samples": 0, "bad_samples": 0, "hits": 0, "misses": 0}
        self.last_error = ""

    def __len__(self) -> int:
        return self._n

    def add_sample(self, t, y, x) -> None:
        s = np.column_stack([np.asarray(t, np.float64).reshape(-1),
                             np.asarray(y, np.float64).reshape(-1),
                             np.asarray(x, np.float64).reshape(-1)])
        good = np.isfinite(s).all(axis=1)
        if not good.all():
            self.counts["bad_samples"] += int((~good).sum())
            self.last_error = "non-finite motor sample dropped"
            s = s[good]
        if len(s) > self.capacity:
            s = s[-self.capacity:]
        m = len(s)
        if m == 0:
            return
        i = np.arange(self._head, self._head + m) % self.capacity
        self._buf[i] = s
        self._head = (self._head + m) % self.capacity
        self._n = min(self.capacity, self._n + m)
        self.counts["samples"] += m
        self._sorted = None

    def _samples(self) -> np.ndarray:
        if self._sorted is None:
            if self._n < self.capacity:
                s = self._buf[:self._n]
            else:
                s = np.roll(self._buf, -self._head, axis=0)
            if len(s) > 1 and (np.diff(s[:, 0]) < 0).any():
                s = s[np.argsort(s[:, 0], kind="stable")]
            self._sorted = np.array(s)
        return self._sorted

    def lookup_many(self, t) -> np.ndarray:
        """(n, 2) positions for the times ``t``; NaN rows where nothing is within tolerance."""
        tq = np.asarray(t, np.float64).reshape(-1)
        out = np.full((tq.size, 2), np.nan)
        s = self._samples()
        if len(s) == 0 or tq.size == 0:
            self.counts["misses"] += tq.size
            return out
        ts = s[:, 0]
        tol = self.tolerance_s
        hi = np.searchsorted(ts, tq, side="left")  # first sample >= t
        lo = hi - 1                                 # last sample < t
        hi_c = np.clip(hi, 0, len(ts) - 1)
        lo_c = np.clip(lo, 0, len(ts) - 1)
        d_hi = np.where(hi < len(ts), ts[hi_c] - tq, np.inf)
        d_lo = np.where(lo >= 0, tq - ts[lo_c], np.inf)
        ok = np.isfinite(tq)
        # nearest
        use_hi = d_hi <= d_lo
        near = np.where(use_hi, hi_c, lo_c)
        d_near = np.minimum(d_hi, d_lo)
        hit = ok & (d_near <= tol)
        out[hit] = s[near[hit], 1:]
        if self.mode == "linear":
            both = ok & (d_hi <= tol) & (d_lo <= tol) & (d_hi > 0)
            if both.any():
                t0 = ts[lo_c[both]]
                t1 = ts[hi_c[both]]
                f = ((tq[both] - t0) / (t1 - t0))[:, None]
                out[both] = s[lo_c[both], 1:] * (1 - f) + s[hi_c[both], 1:] * f
        nh = int(hit.sum())
        self.counts["hits"] += nh
        self.counts["misses"] += tq.size - nh
        return out

    def lookup(self, t: float) -> Pos | None:
        """(y, x) for one time ``t``, or ``None`` when no sample is within tolerance."""
        p = self.lookup_many([t])[0]
        if np.isnan(p[0]):
            return None
        return (float(p[0]), float(p[1]))


class PatternPositions:
    """A known trajectory: frame ``uid`` sits at ``positions_m[uid - first_uid]`` ((y, x) m)."""

    def __init__(self, positions_m, first_uid: int = 1) -> None:
        p = np.asarray(positions_m, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"positions must be (N, 2) (y, x), got {p.shape}")
        self.positions_m = p
        self.first_uid = int(first_uid)

    def __len__(self) -> int:
        return len(self.positions_m)

    def lookup(self, uids) -> np.ndarray:
        """(n, 2) positions for ``uids``; NaN rows for uids outside the trajectory."""
        u = np.asarray(uids).reshape(-1)
        idx = u.astype(np.int64) - self.first_uid
        out = np.full((u.size, 2), np.nan)
        ok = (idx >= 0) & (idx < len(self.positions_m))
        out[ok] = self.positions_m[idx[ok]]
        return out


def trajectory_from_file(path: str | Path, *, first_uid: int = 1, y_name: str | None = None,
                         x_name: str | None = None, key: str | None = None,
                         order: str = "yx", scale: float = 1.0) -> PatternPositions:
    """Load a scan trajectory (metres, (y, x)) indexed by frame number.

    The file is read by :func:`ptychostream.files.positions.read_positions`:

    * HDF5 (``.h5``, ``.hdf5``, ``.hdf``, ``.nxs``, ``.cxi``): datasets ``y_name``/``x_name``
      (default ``probe_position_y_m``/``probe_position_x_m``, the Ptychodus names, searched at
      the root and then anywhere in the file), or an (N, 2) dataset ``key``
      (default ``position``), ordered by ``order``.
    * CSV (``.csv``, ``.txt``, ``.dat``, ``.tsv``): a header row naming the columns; y/x columns are
      ``y_name``/``x_name`` or the first of ``y, y_m, probe_position_y_m, ...``. Comma or
      whitespace separated.
    * NPZ: ``probe_position_y_m``/``probe_position_x_m`` arrays, else (N, 2) ``key``
      (default ``position``, PtychoNN training files), ordered by ``order``.
    * NPY: an (N, 2) array ordered by ``order``.

    ``scale`` multiplies the values (e.g. 1e-6 for files in micrometres).  NaN rows are kept:
    those frames come out unpositioned.
    """
    p = read_positions(path, y_name=y_name, x_name=x_name, key=key, order=order, allow_nan=True)
    return PatternPositions(p * float(scale), first_uid=first_uid)
