"""Issue #17, finding 1: a capture record survives a crash of its writer (HDF5 SWMR, bounded flushes).

A recorder in a child process, and a real reconstructor IOC, are SIGKILLed while writing: the file
still opens with h5py, holds every frame up to the last flush, and ``ptychostream record check``
calls it cut at that frame; a clean stop still gives the complete record with the mosaic.
"""

from __future__ import annotations

import io
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, IOCProcess, next_slot, pva_context, text, wait_for

from ptychostream.cli.record import check
from ptychostream.core.frames import BatchResult, ImageFrame
from ptychostream.files.record import FLUSHED, check_record, read_record
from ptychostream.pipeline.record import Recorder

pytestmark = pytest.mark.faults

FRAME, PATCH, PER_BATCH = 32, 16, 5


def batch(k: int, n: int = PER_BATCH, patch: int = PATCH) -> BatchResult:
    """Batch ``k`` of a deterministic stream: uniqueIds 1 + k*n ..., frames and phases that encode them."""
    uid = np.arange(k * n, (k + 1) * n) + 1
    frames = [ImageFrame((np.arange(FRAME * FRAME).reshape(FRAME, FRAME) + u).astype(np.uint16), int(u), 1000.0 + u,
                         attributes={"PositionX": 1e-8 * u, "PositionY": -1e-8 * u}) for u in uid]
    phase = np.broadcast_to(uid[:, None, None] / 1000.0, (n, patch, patch)).astype(np.float32)
    return BatchResult(frames, {"phase": phase, "amplitude": phase + 1}, np.full(n, 2e-3), "model-k")


def expected(n: int) -> BatchResult:
    """The first ``n`` frames of the stream as one batch."""
    return batch(0, n)


# The child: a Recorder fed `batches` batches with flush_frames=`every` and a flush period too long
# to matter; it reports its counters once the writer has taken every batch, then waits to be killed.
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from test_faults_record import batch
from ptychostream.pipeline.record import Recorder
path, batches, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rec = Recorder(path, frames=True, flush_period=600.0, flush_frames=every)
for k in range(batches):
    rec.submit(batch(k))
deadline = time.monotonic() + 60
while rec.written + rec.dropped < batches * {per} and time.monotonic() < deadline:
    time.sleep(0.005)
print("written", rec.written, "flushed", rec.flushed, "dropped", rec.dropped, flush=True)
sys.stdin.read()
"""


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the child's stdout, or an AssertionError after ``timeout`` s (the child is waited on, not slept on)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no line from the child within {timeout} s"
    return proc.stdout.readline().strip()


def record_check(path: Path) -> tuple[int, str]:
    """``ptychostream record check PATH`` as a command: (exit status, output)."""
    done = subprocess.run([sys.executable, "-m", "ptychostream", "record", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


def killed_child(path: Path, batches: int, every: int) -> dict[str, int]:
    """Run the child recorder to its report, SIGKILL it, and return its counters."""
    code = CHILD.format(tests=str(ROOT / "tests"), per=PER_BATCH)
    with subprocess.Popen([sys.executable, "-c", code, str(path), str(batches), str(every)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            words = read_line(proc, timeout=60).split()
            counts = {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}
            # while it runs, the record already reads back up to its last flush (a SWMR reader)
            live = read_record(path)
            assert live["n_frames"] == counts["flushed"] and not live["complete"]
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    return counts


def test_recorder_killed_after_a_flush_keeps_every_flushed_frame(tmp_path):
    path = tmp_path / "killed.h5"
    counts = killed_child(path, batches=7, every=20)  # flushes at 20 frames; 15 more wait unflushed
    assert counts == {"written": 35, "flushed": 20, "dropped": 0}
    # the file opens with h5py (as a SWMR reader: the superblock still says "open for writing")
    with h5py.File(path, "r", swmr=True) as fh:
        assert int(fh[FLUSHED][0]) == 20
        np.testing.assert_array_equal(fh["entry/data/unique_id"][:20], np.arange(1, 21))
        np.testing.assert_array_equal(fh["entry/instrument/detector/data"][:20],
                                      np.stack([f.array for f in expected(20).frames]))
        assert not fh["entry"].attrs["complete"] and "end_time" not in fh["entry"].attrs
    rec = read_record(path)
    want = expected(20)
    assert rec["n_frames"] == 20 and rec["complete"] is False
    np.testing.assert_array_equal(rec["data"]["phase"], want.outputs["phase"])
    np.testing.assert_array_equal(rec["data"]["amplitude"], want.outputs["amplitude"])
    np.testing.assert_array_equal(rec["data"]["position_x_m"], 1e-8 * np.arange(1, 21))
    np.testing.assert_array_equal(rec["data"]["timestamp"], 1000.0 + np.arange(1, 21))
    np.testing.assert_array_equal(rec["frames"], np.stack([f.array for f in want.frames]))
    assert "mosaic" not in rec
    rc, out = record_check(path)
    assert rc == 1, out
    assert f"{path}: ptychostream record, model model-k" in out
    assert "frames: 20 (phase, amplitude)" in out and "positions: 20 of 20" in out
    assert "diffraction frames: 20 x 32 x 32" in out and "mosaic: none" in out
    assert "cut at frame 20: the writer did not close the record" in out


def test_recorder_killed_before_its_first_frame_leaves_an_empty_valid_record(tmp_path):
    path = tmp_path / "empty.h5"
    assert killed_child(path, batches=0, every=20) == {"written": 0, "flushed": 0, "dropped": 0}
    with h5py.File(path, "r") as fh:  # never in SWMR mode: a plain, closed file
        assert fh["entry"].attrs["complete"] == False  # noqa: E712  (a numpy bool)
    out = io.StringIO()
    assert check(str(path), out=out) == 1
    assert "frames: 0 (no outputs)" in out.getvalue() and "cut at frame 0" in out.getvalue()


def test_flush_is_bounded_by_period_and_by_frames(tmp_path):
    """A batch is on disk within flush_period (nothing else arriving), or at once after flush_frames frames."""
    timed = Recorder(str(tmp_path / "timed.h5"), flush_period=0.3, flush_frames=1000)
    counted = Recorder(str(tmp_path / "counted.h5"), flush_period=600.0, flush_frames=10)
    try:
        t0 = time.monotonic()
        timed.submit(batch(0))
        wait_for(lambda: timed.flushed == PER_BATCH, timeout=0.3 + 5, message="the timed flush")
        assert time.monotonic() - t0 >= 0.3 - 0.05  # not flushed before its period was up (5 < 1000 frames)
        assert read_record(timed.path)["n_frames"] == PER_BATCH  # read live, by a SWMR reader
        for k in range(3):
            counted.submit(batch(k))
        wait_for(lambda: counted.written == 15, timeout=10, message="15 written")
        assert counted.flushed == 10 and check_record(counted.path).frames == 10
    finally:
        timed.close()
        counted.close()
    assert check_record(counted.path).frames == 15 and check_record(counted.path).complete


class Mosaic:
    """The parts of a MosaicImage the recorder writes."""

    phase = np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8)
    amplitude = np.ones((6, 8), np.float32)
    coverage = np.full((6, 8), 2.0, np.float32)
    pixel_m, origin_m, n_patches = 1e-8, (-2e-8, 3e-8), 15


def test_clean_close_writes_mosaic_end_time_and_complete(tmp_path):
    path = tmp_path / "clean.h5"
    rec = Recorder(str(path), frames=True, flush_period=600.0, flush_frames=1000)
    for k in range(3):
        rec.submit(batch(k))
    rec.close(Mosaic())
    assert (rec.written, rec.flushed, rec.dropped, rec.error) == (15, 15, 0, "")
    with h5py.File(path, "r") as fh:  # closed cleanly: a plain reader opens it
        attrs = dict(fh["entry"].attrs)
        assert attrs["complete"] and attrs["end_time"] and attrs["frames_written"] == 15
        assert int(fh[FLUSHED][0]) == 15
    r = read_record(path)
    assert r["complete"] and r["n_frames"] == 15
    np.testing.assert_array_equal(r["mosaic"]["phase"], Mosaic.phase)
    assert r["mosaic"]["n_patches"] == 15
    rc, out = record_check(path)
    assert rc == 0, out
    assert "mosaic: 6 x 8, 15 patches" in out and "written 15, dropped 0" in out
    assert f"complete: closed {text_attr(attrs['end_time'])}" in out


def text_attr(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_a_batch_that_does_not_fit_stops_the_record_with_a_message_and_counts(tmp_path):
    path = tmp_path / "changed.h5"
    errors: list[str] = []
    rec = Recorder(str(path), flush_period=600.0, flush_frames=1000, on_error=errors.append)
    rec.submit(batch(0))
    rec.submit(batch(1, patch=2 * PATCH))  # a model with another output size was swapped in
    rec.submit(batch(2))
    rec.close()
    assert (rec.written, rec.dropped) == (5, 10)
    assert errors == [rec.error]
    assert rec.error == (f"record {path}: stopped at frame 5: entry/data/phase: rows of float32 (32, 32) do not "
                         "fit the record's float32 (16, 16)")
    out = io.StringIO()
    assert check(str(path), out=out) == 0
    assert f"written 5, dropped 10; error: {rec.error}" in out.getvalue()
    np.testing.assert_array_equal(read_record(path)["data"]["unique_id"], np.arange(1, 6))


def test_record_check_names_an_unreadable_file(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as fh:
        fh["x"] = 1
    for path, why in ((garbage, "not readable as HDF5"), (other, "not a ptychostream record"),
                      (tmp_path / "missing.h5", "record file not found")):
        err = io.StringIO()
        assert check(str(path), out=io.StringIO(), err=err) == 2
        assert err.getvalue().startswith("ptychostream record check: ") and str(path) in err.getvalue()
        assert why in err.getvalue()
    rc, out = record_check(garbage)
    assert rc == 2 and f"{garbage}: not readable as HDF5" in out


# --------------------------------------------------------------------------- the IOC, killed while capturing
R = "TST:RECKILL:"
FLUSH_PERIOD = 1.0  # the Recorder's default, which the IOC uses
MARGIN = 4.0  # scheduling slack on a loaded machine


@pytest.fixture
def ioc(tmp_path):
    from ptychostream.model.zoo import build_ptychonn_onnx

    model = build_ptychonn_onnx(str(tmp_path / "m.onnx"), size=64, heads=("amplitude", "phase"), base_channels=4,
                                depth=2)
    proc = IOCProcess(["ioc", "--prefix", R, "--no-ca"], R, next_slot()).start()
    ctx = pva_context()
    try:
        for k, v in {"ModelPath": model, "Enable": 1, "PixelSize": 1e-8, "PublishRate": 0, "MosaicRate": 50}.items():
            ctx.put(R + k, v, wait=True)
        wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) == 2, timeout=30, message="model")
        yield proc, ctx
    finally:
        ctx.close()
        proc.stop()


POOL = np.random.default_rng(7).poisson(4, (4000, 64, 64)).astype(np.uint16)


class Streamer(threading.Thread):
    """Puts frames 1, 2, ... of ``POOL`` to Input (with positions) until stopped or the IOC is gone."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from ptychostream.protocols.ntnd import encode

        with pva_context(nt=False) as raw:
            for i in range(len(POOL)):
                if self.stop_event.is_set():
                    return
                frame = ImageFrame(POOL[i], i + 1, time.time(), None, {"PositionX": 2e-8 * (i % 7),
                                                                     "PositionY": 2e-8 * (i // 7)})
                try:
                    raw.put(R + "Input", encode(frame), wait=True, timeout=5)
                except Exception:  # the IOC was killed under the put
                    return
                self.sent = i + 1


def start_capture(ctx, path: Path) -> None:
    ctx.put(R + "MosaicReset", 1, wait=True)
    ctx.put(R + "CaptureFile", str(path), wait=True)
    ctx.put(R + "CaptureFrames", 1, wait=True)
    ctx.put(R + "Capture", 1, wait=True)
    assert int(ctx.get(R + "Capture_RBV")) == 1


def flushed_on_disk(path: Path) -> int:
    """``frames_flushed`` of a record being written, read by a SWMR reader (0 until the first batch)."""
    try:
        with h5py.File(path, "r", swmr=True) as fh:
            return int(fh[FLUSHED][0]) if FLUSHED in fh else 0
    except OSError:  # still the empty record of the start, which a SWMR reader refuses
        return 0


@pytest.mark.system
def test_ioc_killed_while_capturing_keeps_the_flushed_frames(ioc, tmp_path):
    proc, ctx = ioc
    path = tmp_path / "crash.h5"
    start_capture(ctx, path)
    streamer = Streamer()
    streamer.start()
    try:
        wait_for(lambda: int(ctx.get(R + "CaptureWritten_RBV")) >= 200, timeout=60, message="200 frames written")
        written = int(ctx.get(R + "CaptureWritten_RBV"))
        # every frame written now is on disk within the flush period (while frames keep coming)
        t0 = time.monotonic()
        seen = wait_for(lambda: (n := flushed_on_disk(path)) >= written and n, timeout=FLUSH_PERIOD + MARGIN,
                        interval=0.1, message=f"the {written} written frames flushed")
        flush_s = time.monotonic() - t0
        before_kill = int(ctx.get(R + "CaptureWritten_RBV"))
        assert streamer.is_alive(), "the stream ended before the kill"
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(30)
    finally:
        streamer.stop_event.set()
        streamer.join(30)
    assert proc.proc.returncode == -signal.SIGKILL
    with h5py.File(path, "r", swmr=True) as fh:
        n = int(fh[FLUSHED][0])
        assert n >= seen >= written, (n, seen, written)
        uid = fh["entry/data/unique_id"][:n]
        frames = fh["entry/instrument/detector/data"][:n]
        phase = fh["entry/data/phase"][:n]
    # the frames on disk are the frames sent, in order (a full input queue may have dropped some)
    assert (np.diff(uid) > 0).all() and 1 <= uid[0] and uid[-1] <= streamer.sent
    np.testing.assert_array_equal(frames, POOL[uid - 1])
    assert phase.shape == (n, 64, 64) and np.isfinite(phase).all()
    rc, out = record_check(path)
    assert rc == 1, out
    assert f"frames: {n} (phase, amplitude)" in out and f"cut at frame {n}:" in out
    print(f"\nkilled: {before_kill} written before the kill, {n} on disk after it "
          f"(>= {written} written {flush_s:.2f} s before they were seen flushed), {streamer.sent} sent")


@pytest.mark.system
def test_ioc_clean_stop_gives_a_complete_record(ioc, tmp_path):
    proc, ctx = ioc
    path = tmp_path / "clean.h5"
    start_capture(ctx, path)
    from ptychostream.protocols.ntnd import encode

    with pva_context(nt=False) as raw:
        for i in range(12):
            raw.put(R + "Input", encode(ImageFrame(POOL[i], i + 1, time.time(), None,
                                                   {"PositionX": 2e-8 * (i % 4), "PositionY": 2e-8 * (i // 4)})),
                    wait=True)
    wait_for(lambda: int(ctx.get(R + "CaptureWritten_RBV")) == 12, timeout=15, message="12 written")
    wait_for(lambda: int(ctx.get(R + "Stitched_RBV")) == 12, timeout=15, message="12 stitched")
    ctx.put(R + "Capture", 0, wait=True)
    wait_for(lambda: int(ctx.get(R + "Capture_RBV")) == 0, timeout=15, message="record closed")
    assert "closed: 12 frames, 0 dropped" in text(ctx.get(R + "Message_RBV"))
    with h5py.File(path, "r") as fh:  # a plain reader: the writer closed it
        assert fh["entry"].attrs["complete"] and fh["entry"].attrs["end_time"]
        assert int(fh[FLUSHED][0]) == 12 and fh["entry/mosaic/phase"].ndim == 2
    rc, out = record_check(path)
    assert rc == 0, out
    assert "frames: 12 (phase, amplitude)" in out and "positions: 12 of 12" in out
    assert "diffraction frames: 12 x 64 x 64" in out and "12 patches" in out and "complete: closed" in out
