"""A shared-memory ring of frame slots: one writer process, one reader thread in another process.

The writer (the receive process) copies each frame's pixels into the next free slot and its
metadata (uniqueId, time stamps, shape, dtype code, the NDAttributes) into per-slot arrays of the
same segment, then advances the write count. The reader takes every frame ready at once: one copy
per run of same-shaped frames into a fresh batch array, each frame a view of it, then advances the
read count. A full ring refuses the frame (the writer counts it as dropped). Both counts are int64
cells of the segment; x86 and ARM keep a slot's stores ahead of the count's store that follows.

Layout of one segment (one ``multiprocessing.shared_memory`` block)::

    header  int64[8]            write count, read count, frames refused, (unused), slots, slot bytes,
                                attribute bytes, (unused)
    uid     int64[slots]        uniqueId
    stamp   float64[slots]      timeStamp (s)
    dstamp  float64[slots]      dataTimeStamp (s, NaN: none)
    shape   int32[slots, 2]     (height, width)
    code    int32[slots]        index into :data:`DTYPES`
    alen    int32[slots]        bytes of pickled attributes
    attrs   uint8[slots, attr_bytes]
    data    uint8[slots, slot_bytes]
"""

from __future__ import annotations

import math
import pickle
import sys
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from ptychostream.core.frames import ImageFrame

__all__ = ["ATTR_BYTES", "DTYPES", "RING_BYTES", "FrameRing", "carries", "ring_slots"]

#: the pixel types a slot carries (the NTNDArray scalar types); a frame of another type does not fit
DTYPES = tuple(np.dtype(t) for t in (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                     np.uint64, np.float32, np.float64))
_CODES = {dt: i for i, dt in enumerate(DTYPES)}
#: pixel bytes a ring holds (its slot count follows from the slot size, see :func:`ring_slots`): a
#: ring that stays within the L3 cache is written and read about 3 x faster (1.3 us against 4-6 us
#: per 32 KiB frame on the 2-core box)
RING_BYTES = 32 * 2**20
#: bytes of pickled NDAttributes per slot (a frame with more does not fit)
ATTR_BYTES = 2048
MIN_SLOTS, MAX_SLOTS = 64, 4096
#: the reader's batch buffers: up to POOL_BUFFERS of POOL_CHUNK bytes are kept and reused once no frame
#: views them any more (a fresh mmapped block would page-fault on every batch: the IOC's glibc mmaps
#: every block from 256 KiB up, core/memory.py); a larger run gets a buffer of its own
POOL_BUFFERS, POOL_CHUNK = 16, 4 * 2**20
#: a pooled buffer's reference count when nothing but the pool holds it (the list, the loop, the call)
_FREE_REFS = 3
WRITE, READ, REFUSED = range(3)
_HEADER = 8


def carries(a: np.ndarray) -> bool:
    """Whether a ring slot can carry pixels like ``a`` at all (2-D, a type of :data:`DTYPES`), whatever
    their size."""
    return a.ndim == 2 and a.dtype in _CODES


def ring_slots(slot_bytes: int, budget: int = RING_BYTES) -> int:
    """Slots of ``slot_bytes`` that fit ``budget`` bytes, within [MIN_SLOTS, MAX_SLOTS]."""
    return max(MIN_SLOTS, min(MAX_SLOTS, budget // max(slot_bytes, 1)))


class FrameRing:
    """A fixed layout of ``slots`` slots of ``slot_bytes`` pixel bytes; create or attach by name."""

    def __init__(self, name: str, slots: int = 0, slot_bytes: int = 0, attr_bytes: int = ATTR_BYTES,
                 create: bool = False) -> None:
        if create:
            if slots < 1 or slot_bytes < 1:
                raise ValueError("a ring needs at least one slot of at least one byte")
            size = self.size_of(slots, slot_bytes, attr_bytes)
            self.shm = SharedMemory(name=name, create=True, size=size)
        else:
            self.shm = SharedMemory(name=name)
        buf = self.shm.buf
        self.header = np.ndarray((_HEADER,), np.int64, buf, 0)
        if create:
            self.header[:] = 0
            self.header[4:7] = (slots, slot_bytes, attr_bytes)
        slots, slot_bytes, attr_bytes = (int(v) for v in self.header[4:7])
        self.name, self.slots, self.slot_bytes, self.attr_bytes = name, slots, slot_bytes, attr_bytes
        off = _HEADER * 8
        arrays: dict[str, np.ndarray] = {}
        for key, dtype, shape in (("uid", np.int64, (slots,)), ("stamp", np.float64, (slots,)),
                                  ("dstamp", np.float64, (slots,)), ("shape", np.int32, (slots, 2)),
                                  ("code", np.int32, (slots,)), ("alen", np.int32, (slots,)),
                                  ("attrs", np.uint8, (slots, attr_bytes)), ("data", np.uint8, (slots, slot_bytes))):
            arrays[key] = np.ndarray(shape, dtype, buf, off)
            off += arrays[key].nbytes
            off = (off + 63) // 64 * 64
        self.uid, self.stamp, self.dstamp = arrays["uid"], arrays["stamp"], arrays["dstamp"]
        self.shape, self.code, self.alen = arrays["shape"], arrays["code"], arrays["alen"]
        self.attrs, self.data = arrays["attrs"], arrays["data"]
        self._pool: list[np.ndarray] = []

    @staticmethod
    def size_of(slots: int, slot_bytes: int, attr_bytes: int = ATTR_BYTES) -> int:
        """Bytes of a segment with this layout (each array starts on 64 bytes)."""
        size = _HEADER * 8
        for n in (8 * slots, 8 * slots, 8 * slots, 8 * slots, 4 * slots, 4 * slots, slots * attr_bytes,
                  slots * slot_bytes):
            size = (size + n + 63) // 64 * 64
        return size

    # -- the writer ---------------------------------------------------------------
    def fits(self, frame: ImageFrame) -> bool:
        """The frame's pixels fit a slot and their type has a code."""
        a = frame.array
        return carries(a) and a.nbytes <= self.slot_bytes

    def free(self) -> int:
        """Slots the writer may fill now."""
        return self.slots - int(self.header[WRITE] - self.header[READ])

    def write(self, frame: ImageFrame, attrs: bytes | None = None) -> bool:
        """Copy ``frame`` into the next slot. False: the ring is full (the frame is not taken; the
        refusal is counted in the header). ``attrs``: the attributes pickled already (else pickled here).
        The frame must :meth:`fits` and its pickled attributes fit ``attr_bytes`` (ValueError)."""
        header = self.header
        w = int(header[WRITE])
        if w - int(header[READ]) >= self.slots:
            header[REFUSED] += 1
            return False
        blob = attrs if attrs is not None else (pickle.dumps(frame.attributes, 5) if frame.attributes else b"")
        if len(blob) > self.attr_bytes:
            raise ValueError(f"attributes of {len(blob)} bytes do not fit a slot's {self.attr_bytes}")
        a = frame.array
        i = w % self.slots
        n = a.nbytes
        row = self.data[i]
        row[:n] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        self.uid[i] = frame.unique_id
        self.stamp[i] = frame.timestamp
        self.dstamp[i] = math.nan if frame.data_timestamp is None else frame.data_timestamp
        self.shape[i] = a.shape
        self.code[i] = _CODES[a.dtype]
        self.alen[i] = len(blob)
        if blob:
            self.attrs[i, :len(blob)] = np.frombuffer(blob, np.uint8)
        header[WRITE] = w + 1  # last: the slot is complete before the reader can see it
        return True

    # -- the reader ---------------------------------------------------------------
    def ready(self) -> int:
        """Frames written and not read yet."""
        return int(self.header[WRITE] - self.header[READ])

    def _buffer(self, nbytes: int) -> np.ndarray:
        """``nbytes`` of a batch buffer that no frame views any more (reference counts), else a new one."""
        for buf in self._pool:
            if buf.nbytes >= nbytes and sys.getrefcount(buf) <= _FREE_REFS:
                return buf[:nbytes]
        if nbytes > POOL_CHUNK or len(self._pool) >= POOL_BUFFERS:
            return np.empty(nbytes, np.uint8)
        buf = np.empty(POOL_CHUNK, np.uint8)
        self._pool.append(buf)
        return buf[:nbytes]

    def read(self, upto: int | None = None, limit: int | None = None) -> list[ImageFrame]:
        """Take every frame ready (or those before write count ``upto``; at most ``limit``), oldest
        first, and free their slots. Each run of frames of one shape and type is one copy into a
        (n, h, w) array that nothing else uses; the frames are its views."""
        r = int(self.header[READ])
        w = int(self.header[WRITE]) if upto is None else min(int(upto), int(self.header[WRITE]))
        if limit is not None:
            w = min(w, r + limit)
        if w <= r:
            return []
        idx = np.arange(r, w) % self.slots
        shapes, codes, alens = self.shape[idx], self.code[idx], self.alen[idx]
        uids, stamps, dstamps = self.uid[idx].tolist(), self.stamp[idx].tolist(), self.dstamp[idx].tolist()
        # the attributes of all in one copy (as wide as the widest), cut into each frame's bytes
        wide = int(alens.max())
        flat = self.attrs[idx, :wide].tobytes() if wide else b""
        blobs = [flat[j * wide:j * wide + k] for j, k in enumerate(alens.tolist())]
        # runs of one (h, w, code): where any of them changes
        key = np.column_stack((shapes, codes))
        cuts = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
        frames: list[ImageFrame] = []
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(idx)]):
            h, wd = (int(v) for v in shapes[lo])
            dtype = DTYPES[int(codes[lo])]
            nbytes = h * wd * dtype.itemsize
            rows = idx[lo:hi]
            out = self._buffer((hi - lo) * nbytes).reshape(hi - lo, nbytes)
            first, last = int(rows[0]), int(rows[-1])
            if last >= first:  # one contiguous range of slots
                out[:] = self.data[first:last + 1, :nbytes]
            else:  # wraps: two ranges
                k = self.slots - first
                out[:k] = self.data[first:, :nbytes]
                out[k:] = self.data[:last + 1, :nbytes]
            batch = out.view(dtype).reshape(hi - lo, h, wd)
            for j in range(lo, hi):
                ds = dstamps[j]
                frames.append(ImageFrame(batch[j - lo], uids[j], stamps[j], None if math.isnan(ds) else ds,
                                         pickle.loads(blobs[j]) if blobs[j] else {}))
        self.header[READ] = w  # after the copies: the writer may reuse the slots now
        return frames

    # -- both -------------------------------------------------------------------
    def close(self) -> None:
        """Unmap this process's view (the numpy views first: a mapped buffer cannot close under them)."""
        for key in ("header", "uid", "stamp", "dstamp", "shape", "code", "alen", "attrs", "data"):
            setattr(self, key, None)
        self._pool = []
        try:
            self.shm.close()
        except BufferError:  # a view is still held somewhere; the mapping goes with the process
            pass

    def unlink(self) -> None:
        """Remove the block's name (mappings stay valid until closed); a second call does nothing.

    Creating and attaching register the name with multiprocessing's resource tracker, which a
    spawned child shares with its parent: a block that no process unlinks (its writer killed before
    the reader attached) is removed when the tracker ends with the parent."""
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass
