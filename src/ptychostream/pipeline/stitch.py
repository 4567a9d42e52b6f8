"""Stitch stage: join every result to its scan position by uniqueId and build the live mosaic.

One thread owns the :class:`PositionJoiner` and the :class:`Stitcher`; everything else
(inference results, position chunks, motor samples, resets) reaches it through its inbox,
so the stitcher never blocks inference. Frames whose position has not arrived wait in the
joiner's bounded holding area and are counted as unpositioned after ``PositionTimeout``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ptychostream.core.device import DeviceState
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.mosaic.display import DisplayView
from ptychostream.mosaic.positions import (
    PatternPositions,
    PositionJoiner,
    TimestampMatcher,
    trajectory_from_file,
)
from ptychostream.mosaic.stitch import OFFSETS, MosaicImage, Stitcher, warm_up_splat_kernel

__all__ = ["MosaicStage", "SOURCES"]

_log = logging.getLogger(__name__)

#: order matches the PositionSource enum in db/
SOURCES = ("Attributes", "Table", "Motors", "Trajectory")
#: the inference outputs (bytes) waiting for the stitch thread before more are counted as lost:
#: the bound is on what the inbox holds, not on its number of batches (4096 batches of 32 frames
#: of 128x128 phase and amplitude were 17 GB); 256 MiB is 2,048 such frames, 1.6 s at 1,250 frames/s
INBOX_BYTES = 256 * 2**20
#: the most messages the inbox holds (position chunks, motor samples, batches)
INBOX_LIMIT = 65536
#: stand-in pixel data of the frames handed to the stitch thread, which needs only their metadata
_NO_PIXELS = np.zeros((0, 0), dtype=np.uint8)
#: messages one pass of the stitch thread takes before it checks timeouts and the publish time
MESSAGES_PER_PASS = 64


@dataclass
class MosaicSettings:
    source: str = "Attributes"
    attr_x: str = "PositionX"
    attr_y: str = "PositionY"
    scale: float = 1.0
    pixel_m: float = 0.0
    rate_hz: float = 5.0
    #: longest side of the published images (the mosaic is binned to fit); 0: the full canvas
    display_size: int = 1024
    offset: str = "mean"
    domain: str = "phase"
    extent_m: tuple[float, float, float, float] | None = None
    timeout_s: float = 10.0
    trajectory: PatternPositions | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Patch:
    phase: np.ndarray
    amplitude: np.ndarray | None
    t: float
    pixel_m: float | None
    #: the frame's physics-consistency figure (NaN: not sampled)
    consistency: float = float("nan")
    #: the batch output the phase (and amplitude) came from, and the frame's row in it: consecutive
    #: rows of one batch are handed to the stitcher as a view, not stacked again patch by patch
    src: tuple[np.ndarray, np.ndarray | None] | None = None
    row: int = -1


def _runs(patches: list["_Patch"]) -> list[tuple[int, int, np.ndarray, np.ndarray | None]]:
    """The patches, in order, as runs ``(start, end, phase, amplitude)``: consecutive rows of one
    batch's output are a view of it (no copy); other patches next to each other are stacked."""
    out: list[tuple[int, int, np.ndarray, np.ndarray | None]] = []
    start = 0
    for i in range(1, len(patches) + 1):
        a, b = patches[i - 1], patches[i] if i < len(patches) else None
        if b is not None and (b.src is None) == (a.src is None) and (
                a.src is None or (b.src is not None and b.src[0] is a.src[0] and b.row == a.row + 1)):
            continue
        first = patches[start]
        if first.src is not None:
            amp = first.src[1]
            out.append((start, i, first.src[0][first.row:a.row + 1],
                        None if amp is None else amp[first.row:a.row + 1]))
        else:
            loose = patches[start:i]
            out.append((start, i, np.stack([p.phase for p in loose]),
                        None if first.amplitude is None else np.stack([p.amplitude for p in loose])))  # type: ignore[misc]
        start = i
    return out


class MosaicStage(threading.Thread):
    """Consumes :class:`BatchResult` s and publishes Mosaic, MosaicAmplitude, MosaicCoverage, Flashlight."""

    def __init__(self, device: DeviceState, message: Callable[[str, int], None]) -> None:
        super().__init__(name="ptychostream-stitch", daemon=True)
        self.device = device
        self.message = message
        self.settings = MosaicSettings()
        self.inbox: queue.Queue = queue.Queue(maxsize=INBOX_LIMIT)
        self._inbox_bytes = 0  # inference outputs in the inbox; += on the publisher's thread, -= here
        # frames handed to this stage and not yet in a settled count (see status()): += on the publisher's
        # thread, -= when the stitch thread settles its counts (_settle), both under _bytes_lock
        self._inbox_frames = 0
        self._taken = 0  # frames taken from the inbox since the last _settle (stitch thread)
        self._settled: dict[str, int] = {"Stitched_RBV": 0, "Unpositioned_RBV": 0, "PositionErrors_RBV": 0,
                                         "PositionWait_RBV": 0}
        self._bytes_lock = threading.Lock()
        self.joiner = PositionJoiner(timeout_s=self.settings.timeout_s)
        self.motors = TimestampMatcher(tolerance_s=0.02)
        self._motor_xy = [np.nan, np.nan]
        self.stitcher: Stitcher | None = None
        #: the consistency figures stitched like the mosaic (made at the first sampled frame)
        self.consistency: Stitcher | None = None
        self.view = DisplayView(self.settings.display_size)
        self.consistency_view = DisplayView(self.settings.display_size, nan_outside=True)
        self.lost = 0
        self.unpositioned = 0
        self.stitch_rejects = 0
        self._motor_wait: list[tuple[int, _Patch, float]] = []
        self._latest: tuple[_Patch, tuple[float, float]] | None = None
        self._dirty = False
        self._next_publish = 0.0
        self._count = 0
        self._errors_seen: tuple[str, str] = ("", "")
        self._stop_event = threading.Event()
        self._told_no_pixel = False
        if "MosaicBinning_RBV" in device.db:
            device.set("MosaicBinning_RBV", 1)
        warm_up_splat_kernel()  # ready before the first batch

    # -- any thread ---------------------------------------------------------------
    def on_result(self, result: BatchResult) -> None:
        """Publisher listener: hand a batch to the stitch thread (never blocks).

        The stitch thread gets the outputs and each frame's metadata, not the raw frames (which
        would otherwise stay alive as long as the mosaic is behind); the inbox is bounded in the
        bytes of those outputs (:data:`INBOX_BYTES`).
        """
        n = len(result.frames)
        size = sum(a.nbytes for a in result.outputs.values())
        with self._bytes_lock:
            full = self._inbox_bytes > 0 and self._inbox_bytes + size > INBOX_BYTES
            if not full:
                self._inbox_bytes += size
                self._inbox_frames += n
        if not full:
            light = BatchResult([ImageFrame(_NO_PIXELS, f.unique_id, f.timestamp, f.data_timestamp, f.attributes)
                                 for f in result.frames], result.outputs, result.latency_s, result.model_id,
                                result.pixel_m, result.consistency)
            try:
                self.inbox.put_nowait(("batch", light, size))
                return
            except queue.Full:
                with self._bytes_lock:
                    self._inbox_bytes -= size
                    self._inbox_frames -= n
        self.lost += n
        self.message(f"stitcher behind: {n} frame(s) not stitched", 1)

    def add_positions(self, uids, y_m, x_m) -> None:
        self.inbox.put(("positions", np.asarray(uids), np.asarray(y_m), np.asarray(x_m)))

    def add_motor(self, axis: int, t: float, value: float) -> None:
        self.inbox.put(("motor", axis, t, value))

    def configure(self, **changes: Any) -> None:
        """Change settings; geometry changes (pixel size, extent, offset, domain) restart the mosaic."""
        self.inbox.put(("configure", changes))

    def reset(self) -> None:
        self.inbox.put(("reset",))

    def snapshot(self, timeout: float = 10.0) -> MosaicImage | None:
        """The current mosaic as fresh arrays, taken on the stitch thread (None if empty)."""
        from concurrent.futures import Future

        fut: Future = Future()
        self.inbox.put(("snapshot", fut))
        return fut.result(timeout)

    def stop(self) -> None:
        self._stop_event.set()

    # -- stitch thread -------------------------------------------------------------
    def run(self) -> None:
        while not self._stop_event.is_set():
            # wake for the next publish only when there is something to publish: with a clean
            # mosaic and the publish time past, a zero timeout would spin the thread (and the GIL)
            wait = self._next_publish - time.monotonic() if self._dirty else 0.05
            timeout = max(0.0, min(0.05, wait))
            try:
                msg = self.inbox.get(timeout=timeout)
            except queue.Empty:
                msg = None
            try:
                if msg is not None:
                    self._drain(msg)
                self._expire()
                if self._dirty and time.monotonic() >= self._next_publish:
                    self.publish()
            except Exception as exc:  # the stage must survive anything a frame brings
                _log.exception("stitch stage error")
                self.message(f"stitch error: {exc}", 2)
            finally:
                self._settle()

    def _drain(self, msg: tuple, most: int = MESSAGES_PER_PASS) -> None:
        """Handle ``msg`` and what else is waiting (up to ``most`` in all), stitching the positioned
        patches of consecutive batches and position chunks in one go (one canvas update)."""
        ready: list[tuple[int, _Patch, tuple[float, float]]] = []
        try:
            for i in range(most):
                if i:
                    try:
                        msg = self.inbox.get_nowait()
                    except queue.Empty:
                        break
                if msg[0] in ("batch", "positions"):
                    ready += self._joined(msg)
                else:  # settings, resets and snapshots see every patch that came before them
                    ready, pending = [], ready
                    self._stitch(pending)
                    self._handle(msg)
        finally:
            self._stitch(ready)
            self._settle()

    def _joined(self, msg: tuple) -> list[tuple[int, _Patch, tuple[float, float]]]:
        """The patches a batch or a position chunk makes ready (joined with their positions)."""
        if msg[0] == "batch":
            with self._bytes_lock:
                self._inbox_bytes -= msg[2]
            self._taken += len(msg[1].frames)  # still counted in _inbox_frames until _settle
            return self._on_batch(msg[1])
        _, uids, y, x = msg
        s = self.settings.scale
        return self.joiner.add_positions(uids, y * s, x * s)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind in ("batch", "positions"):
            self._stitch(self._joined(msg))
        elif kind == "motor":
            _, axis, t, value = msg
            self._motor_xy[axis] = value * self.settings.scale
            self.motors.add_sample(t, self._motor_xy[1], self._motor_xy[0])  # axis 0 = x, 1 = y
        elif kind == "configure":
            self._configure(msg[1])
        elif kind == "reset":
            self._reset()
        elif kind == "snapshot":
            stitcher = self.stitcher
            msg[1].set_result(stitcher.mosaic() if stitcher is not None and stitcher.n_patches else None)

    def _configure(self, changes: dict[str, Any]) -> None:
        old = self.settings
        for key, value in changes.items():
            setattr(old, key, value)
        self.joiner.timeout_s = old.timeout_s
        self._told_no_pixel = False
        if "display_size" in changes:
            self.view.max_side = self.consistency_view.max_side = int(old.display_size)
            self._dirty = True
        if {"pixel_m", "extent_m", "offset", "domain"} & set(changes) and self.stitcher is not None:
            self._reset()
            self.message("mosaic geometry changed: mosaic cleared", 0)

    def _reset(self) -> None:
        self.stitcher = None
        self.consistency = None
        self.joiner.reset()
        self._motor_wait.clear()
        self._latest = None
        self.unpositioned = self.stitch_rejects = self.lost = 0
        self._errors_seen = ("", "")
        self._dirty = True

    def _frame_positions(self, result: BatchResult) -> np.ndarray | None:
        st = self.settings
        n = len(result.frames)
        if st.source == "Attributes":
            out = np.full((n, 2), np.nan)
            for i, f in enumerate(result.frames):
                a = f.attributes
                x, y = a.get(st.attr_x), a.get(st.attr_y)
                if x is not None and y is not None:
                    try:
                        out[i] = (float(y) * st.scale, float(x) * st.scale)
                    except (TypeError, ValueError):
                        pass  # not numeric: counted by the joiner as waiting/unpositioned
            return out
        if st.source == "Trajectory":
            if st.trajectory is None:
                return np.full((n, 2), np.nan)
            return st.trajectory.lookup([f.unique_id for f in result.frames])
        if st.source == "Motors":
            return self.motors.lookup_many([f.timestamp for f in result.frames])
        return None  # Table: positions arrive by uniqueId from PositionPV

    def _on_batch(self, result: BatchResult) -> list[tuple[int, _Patch, tuple[float, float]]]:
        phase = result.outputs.get("phase")
        if phase is None:
            return []
        amp = result.outputs.get("amplitude")
        figure = result.consistency
        src = (phase, amp)
        items = [_Patch(phase[i], None if amp is None else amp[i], f.timestamp, result.pixel_m,
                        float("nan") if figure is None else float(figure[i]), src, i)
                 for i, f in enumerate(result.frames)]
        uids = [f.unique_id for f in result.frames]
        positions = self._frame_positions(result)
        if self.settings.source == "Motors" and positions is not None:
            missing = np.isnan(positions).any(axis=1)
            deadline = time.monotonic() + self.settings.timeout_s
            for i in np.flatnonzero(missing):  # a later motor sample may still bracket them
                self._motor_wait.append((uids[i], items[i], deadline))
            keep = np.flatnonzero(~missing)
            uids = [uids[i] for i in keep]
            items = [items[i] for i in keep]
            positions = positions[keep]
        return self.joiner.submit(uids, items, positions)

    def _expire(self) -> None:
        if self._motor_wait:
            now = time.monotonic()
            t = np.array([p.t for _, p, _ in self._motor_wait])
            pos = self.motors.lookup_many(t)
            ready, still, late = [], [], []
            for (uid, patch, deadline), p in zip(self._motor_wait, pos):
                if not np.isnan(p).any():
                    ready.append((uid, patch, p))
                elif now > deadline:
                    late.append(uid)
                else:
                    still.append((uid, patch, deadline))
            self._motor_wait = still
            if late:  # one report a pass, not one a frame
                self.unpositioned += len(late)
                self.message(f"{len(late)} frame(s) unpositioned: no motor sample within the tolerance "
                             f"(last: frame {late[-1]})", 1)
            if ready:
                self._stitch(self.joiner.submit([u for u, _, _ in ready], [p for _, p, _ in ready],
                                                np.array([q for _, _, q in ready])))
        timed_out = self.joiner.counts["timed_out"]
        self.joiner.expire()  # released frames are counted by the joiner
        waited = self.joiner.counts["timed_out"] - timed_out
        errs = (self.joiner.last_error, self.stitcher.last_error if self.stitcher else "")
        if waited:  # one report a pass; the message log keeps it as one reason, counted
            self.message(f"{waited} frame(s) unpositioned: {errs[0]}", 1)
        for i, (new, old) in enumerate(zip(errs, self._errors_seen)):
            if new and new != old and not (i == 0 and waited):
                self.message(new, 1)
        self._errors_seen = errs

    def _stitch(self, ready: list[tuple[int, _Patch, tuple[float, float]]]) -> None:
        """Place the patches, in runs of one patch shape and pixel size (a swap may change either)."""
        start = 0
        for i in range(1, len(ready) + 1):
            if i == len(ready) or not self._same_kind(ready[i][1], ready[start][1]):
                self._stitch_run(ready[start:i])
                start = i

    @staticmethod
    def _same_kind(a: _Patch, b: _Patch) -> bool:
        return a.phase.shape == b.phase.shape and a.pixel_m == b.pixel_m and (a.amplitude is None) == (b.amplitude is None)

    def _stitch_run(self, ready: list[tuple[int, _Patch, tuple[float, float]]]) -> None:
        if not ready:
            return
        st = self.settings
        first = ready[0][1]
        pixel = st.pixel_m or first.pixel_m
        if not pixel:
            self.unpositioned += len(ready)
            if not self._told_no_pixel:  # once per configuration, not once per batch
                self._told_no_pixel = True
                self.message("no object pixel size: set PixelSize (the model carries none)", 1)
            return
        shape = first.phase.shape
        if self.stitcher is None or self.stitcher.patch_shape != shape or self.stitcher.pixel_m != pixel:
            self.stitcher = Stitcher(pixel, shape, extent_m=st.extent_m, offset=st.offset, domain=st.domain,
                                     max_canvas_px=8192)
            self.consistency = None
        pos = np.array([q for _, _, q in ready], dtype=np.float64)
        accepted = 0
        for i0, i1, phase, amp in _runs([p for _, p, _ in ready]):  # views of the batches, in order
            accepted += self.stitcher.add(phase, pos[i0:i1], amp)
        self.stitch_rejects += len(ready) - accepted
        self._stitch_consistency(np.array([p.consistency for _, p, _ in ready], dtype=np.float32), pos)
        self._latest = (ready[-1][1], ready[-1][2])
        self._dirty = True

    def _stitch_consistency(self, figure: np.ndarray, pos: np.ndarray) -> None:
        """Spread each sampled frame's figure over its patch window (weight-averaged where patches
        overlap), on a canvas of the mosaic's geometry; frames not sampled (NaN) add nothing."""
        sampled = np.isfinite(figure)
        if not sampled.any() or self.stitcher is None:
            return
        mosaic = self.stitcher
        if self.consistency is None:
            self.consistency = Stitcher(mosaic.pixel_m, mosaic.patch_shape, extent_m=self.settings.extent_m,
                                        window=mosaic.window, offset="none", max_canvas_px=mosaic.max_canvas_px)
        self.consistency.add_values(figure[sampled], pos[sampled])

    def publish(self) -> None:
        """Post the mosaic images (at most MosaicRate per second)."""
        self._dirty = False
        self._next_publish = time.monotonic() + 1.0 / max(self.settings.rate_hz, 0.1)
        if self.stitcher is None or self.stitcher.n_patches == 0:
            return
        # display-sized images, updated where patches landed: the cost follows DisplaySize, not the canvas
        m: MosaicImage = self.view.image(self.stitcher)
        self._count += 1
        now = time.time()
        oy, ox = m.origin_m
        attrs = {"PixelSizeX": m.pixel_m, "PixelSizeY": m.pixel_m, "OriginX": ox, "OriginY": oy,
                 "Patches": m.n_patches, "Units": "m", "Binning": m.binning}
        d = self.device
        if "MosaicBinning_RBV" in d.db:  # before the images, so that a client seeing one reads its binning
            d.set("MosaicBinning_RBV", m.binning)
        d.post_image("Mosaic", ImageFrame(m.phase, self._count, now, now, attrs))
        if m.amplitude is not None:
            d.post_image("MosaicAmplitude", ImageFrame(m.amplitude, self._count, now, now, attrs))
        d.post_image("MosaicCoverage", ImageFrame(m.coverage, self._count, now, now, attrs))
        if self._latest is not None:
            patch, pos = self._latest
            try:
                light = self.view.flashlight(self.stitcher, patch.phase, pos)
                d.post_image("Flashlight", ImageFrame(light, self._count, now, now, attrs))
            except ValueError:
                pass
        if self.consistency is not None and "ConsistencyMap" in d.db:
            c = self.consistency_view.image(self.consistency, box=self.stitcher.exposed_box)
            d.post_image("ConsistencyMap", ImageFrame(c.phase, self._count, now, now, attrs))
        st = self.stitcher
        y0, y1, x0, x1 = st.exposed_box
        ymin, ymax, xmin, xmax = (y0 * st.pixel_m, (y1 - 1) * st.pixel_m, x0 * st.pixel_m, (x1 - 1) * st.pixel_m)
        shown = f", shown {m.shape[1]}x{m.shape[0]}" if m.binning > 1 else ""
        d.set("MosaicExtent_RBV", f"x {xmin * 1e6:.3f}..{xmax * 1e6:.3f} um, y {ymin * 1e6:.3f}..{ymax * 1e6:.3f} um "
                                  f"({x1 - x0}x{y1 - y0} px{shown})")
        d.set("MosaicCoverage_RBV", round(100.0 * float(m.mask.mean()), 1))

    def _settle(self) -> None:
        """Stitch thread, between passes (no patch in hand): take the counts, and move the frames taken
        from the inbox since the last call out of the inbox count, in one step, so that a frame is always
        in exactly one of the counts :meth:`status` gives."""
        c = self.joiner.counts
        settled = {
            "Stitched_RBV": self.stitcher.n_patches if self.stitcher else 0,
            "Unpositioned_RBV": c["unpositioned"] + self.unpositioned,
            "PositionErrors_RBV": (c["nan_positions"] + c["out_of_range"] + c["duplicate_frames"]
                                   + c["conflicting_positions"] + self.stitch_rejects),
            "PositionWait_RBV": self.joiner.n_pending + len(self._motor_wait),
        }
        with self._bytes_lock:
            self._inbox_frames -= self._taken
            self._taken = 0
            self._settled = settled

    # -- status (IOC scan task) ---------------------------------------------------------
    def status(self) -> dict[str, int]:
        """The stage's counters, from any thread: Stitched, Unpositioned (with the frames the inbox could
        not take), PositionErrors, PositionWait and StitchBacklog (frames handed to this stage, not yet
        stitched or counted: in the inbox, in hand, waiting for a position in the joiner or for a motor
        sample). Once every processed frame has reached this stage, ``Processed = Stitched + Unpositioned
        + PositionErrors + StitchBacklog`` (until a MosaicReset; a bad entry of the position stream also
        counts as a position error)."""
        with self._bytes_lock:
            out = dict(self._settled)
            inbox = self._inbox_frames
        out["Unpositioned_RBV"] += self.lost
        out["StitchBacklog_RBV"] = max(0, inbox) + out["PositionWait_RBV"]
        return out


def load_trajectory(path: str, scale: float) -> PatternPositions:
    """A trajectory file for PositionSource=Trajectory (raises ValueError/OSError with the reason)."""
    return trajectory_from_file(path, scale=scale)


__all__ += ["load_trajectory", "OFFSETS"]
