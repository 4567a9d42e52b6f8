"""Joining frames to positions: by uniqueId, by timestamp, from trajectory files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ptychostream.mosaic.positions import (
    PatternPositions,
    PositionJoiner,
    TimestampMatcher,
    trajectory_from_file,
)

N = 200


def table(n=N, seed=0, first=1):
    rng = np.random.default_rng(seed)
    uids = np.arange(first, first + n)
    pos = rng.uniform(-5e-6, 5e-6, (n, 2))
    return uids, pos


def chunks(uids, pos, size, rng, dup_every=0):
    idx = rng.permutation(len(uids))
    out = []
    for s in range(0, len(idx), size):
        sel = np.sort(idx[s:s + size])
        out.append((uids[sel], pos[sel, 0], pos[sel, 1]))
        if dup_every and (s // size) % dup_every == 0:
            out.append((uids[sel], pos[sel, 0], pos[sel, 1]))  # retransmitted chunk
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def check_all(ready, uids, pos, items=None):
    got = {u: (it, p) for u, it, p in ready}
    assert sorted(got) == sorted(int(u) for u in uids)
    for u, p in zip(uids, pos):
        it, q = got[int(u)]
        assert q == (p[0], p[1])
        if items is not None:
            assert it == items[int(u)]


def test_frames_before_positions_late_shuffled_duplicated():
    uids, pos = table()
    j = PositionJoiner(timeout_s=10.0)
    items = {int(u): f"patch-{u}" for u in uids}
    ready = []
    for s in range(0, N, 16):  # frames arrive in order, in batches, without positions
        ready += j.submit(uids[s:s + 16], [items[int(u)] for u in uids[s:s + 16]], now=0.0)
    assert ready == [] and j.n_pending == N
    rng = np.random.default_rng(1)
    for cu, cy, cx in chunks(uids, pos, 7, rng, dup_every=3):
        ready += j.add_positions(cu, cy, cx)
    check_all(ready, uids, pos, items)
    assert j.n_pending == 0
    assert j.counts["matched"] == N and j.counts["matched_late"] == N
    assert j.counts["duplicate_positions"] > 0 and j.counts["conflicting_positions"] == 0
    assert j.expire(now=100.0) == []


def test_positions_before_frames():
    uids, pos = table()
    j = PositionJoiner()
    assert j.add_positions(uids, pos[:, 0], pos[:, 1]) == []
    ready = j.submit(uids, list(range(N)), now=0.0)
    assert [r[0] for r in ready] == list(uids)  # input order kept
    check_all(ready, uids, pos)
    assert j.n_pending == 0 and j.counts["matched"] == N and j.counts["matched_late"] == 0


def test_interleaved_streams():
    uids, pos = table(seed=3)
    rng = np.random.default_rng(4)
    pos_chunks = chunks(uids, pos, 13, rng)
    j = PositionJoiner()
    ready = []
    fi = 0
    for k in range(60):  # frames and position chunks interleave; positions lag behind
        if fi < N:
            ready += j.submit(uids[fi:fi + 5], [None] * len(uids[fi:fi + 5]), now=float(k))
            fi += 5
        if k % 3 == 2 and pos_chunks:
            ready += j.add_positions(*pos_chunks.pop())
    while pos_chunks:
        ready += j.add_positions(*pos_chunks.pop())
    ready += j.submit(uids[fi:], [None] * len(uids[fi:]), now=60.0)
    check_all(ready, uids, pos)


def test_timeout_releases_unpositioned():
    j = PositionJoiner(timeout_s=2.0)
    j.submit([1, 2, 3], ["a", "b", "c"], now=0.0)
    j.submit([4], ["d"], now=1.5)
    assert j.expire(now=1.0) == []
    assert j.expire(now=2.5) == [(1, "a"), (2, "b"), (3, "c")]
    assert j.counts["unpositioned"] == 3 and j.counts["timed_out"] == 3
    assert j.n_pending == 1
    # a late position for a released frame does not resurrect it
    assert j.add_positions([1], [0.0], [0.0]) == []
    assert j.add_positions([4], [1e-6], [2e-6]) == [(4, "d", (1e-6, 2e-6))]
    assert "waited" in j.last_error


def test_holding_area_bounded():
    j = PositionJoiner(max_pending=10, timeout_s=100.0)
    j.submit(np.arange(1, 16), list(range(1, 16)), now=0.0)
    assert j.n_pending == 10
    assert j.counts["evicted"] == 5 and j.counts["unpositioned"] == 5
    assert j.expire(now=0.0) == [(k, k) for k in range(1, 6)]
    got = j.add_positions(np.arange(1, 16), np.zeros(15), np.zeros(15))
    assert [u for u, _, _ in got] == list(range(6, 16))


def test_position_table_bounded():
    j = PositionJoiner(max_positions=50)
    uids, pos = table(n=120)
    j.add_positions(uids, pos[:, 0], pos[:, 1])
    assert j.n_positions == 50 and j.counts["positions_evicted"] == 70
    assert j.position(1) is None and j.position(120) == (pos[-1, 0], pos[-1, 1])


def test_duplicates_conflicts_and_bad_values():
    j = PositionJoiner(max_abs_m=1e-3)
    j.add_positions([5, 6, 7, 8, 9], [0, np.nan, 1.0, 2e-6, 3e-6], [0, 0, 0, np.inf, 3e-6])
    assert j.counts["nan_positions"] == 2 and j.counts["out_of_range"] == 1
    assert j.n_positions == 2
    j.add_positions([5], [0.0], [0.0])
    assert j.counts["duplicate_positions"] == 1
    j.add_positions([9], [4e-6], [4e-6])  # conflicting: latest wins
    assert j.counts["conflicting_positions"] == 1 and j.position(9) == (4e-6, 4e-6)
    assert j.submit([5], ["first"], now=0.0) == [(5, "first", (0.0, 0.0))]
    assert j.submit([5], ["again"], now=0.0) == []
    assert j.counts["duplicate_frames"] == 1 and "duplicate" in j.last_error
    j.submit([20], ["w"], now=0.0)
    assert j.submit([20], ["w2"], now=0.0) == []  # duplicate of a waiting frame
    assert j.counts["duplicate_frames"] == 2 and j.n_pending == 1


def test_positions_in_the_frame():
    j = PositionJoiner()
    j.add_positions([2], [5e-6], [5e-6])
    fp = np.array([[1e-6, 2e-6], [np.nan, np.nan], [np.nan, np.nan], [0.5, 0.0]])
    ready = j.submit([1, 2, 3, 4], ["a", "b", "c", "d"], positions=fp, now=0.0)
    assert ready == [(1, "a", (1e-6, 2e-6)), (2, "b", (5e-6, 5e-6))]
    assert j.counts["matched_from_frame"] == 1 and j.counts["out_of_range"] == 1
    assert j.n_pending == 2  # 3 (no position anywhere) and 4 (bad attribute) wait


def test_position_stream_restart():
    uids, pos = table(n=50, seed=1)
    _, pos2 = table(n=50, seed=2)
    j = PositionJoiner()
    j.add_positions(uids, pos[:, 0], pos[:, 1])
    j.submit(uids, [None] * 50, now=0.0)
    # the same chunk again is a duplicate, not a restart
    j.add_positions(uids[:10], pos[:10, 0], pos[:10, 1])
    assert j.counts["restarts"] == 0
    # uid 1 comes back with a new value: new scan, old table dropped
    j.add_positions(uids[:20], pos2[:20, 0], pos2[:20, 1])
    assert j.counts["restarts"] == 1
    assert j.n_positions == 20 and j.position(30) is None
    # detector restarts too: frame uid 1 again is a new scan, not a duplicate
    ready = j.submit(uids[:30], list(range(30)), now=1.0)
    assert j.counts["frame_restarts"] == 1 and j.counts["duplicate_frames"] == 0
    check_all(ready, uids[:20], pos2[:20])
    ready = j.add_positions(uids[20:], pos2[20:, 0], pos2[20:, 1])
    check_all(ready, uids[20:30], pos2[20:30])


def test_shuffled_first_chunk_is_not_a_restart():
    uids, pos = table(n=40)
    j = PositionJoiner()
    j.add_positions(uids[20:], pos[20:, 0], pos[20:, 1])  # later chunk first
    j.add_positions(uids[:20], pos[:20, 0], pos[:20, 1])
    assert j.counts["restarts"] == 0 and j.n_positions == 40


def test_new_scan_clears():
    j = PositionJoiner()
    j.add_positions([1, 2], [0, 0], [0, 0])
    j.submit([1], [None], now=0.0)
    j.new_scan()
    assert j.n_positions == 0
    assert j.submit([1], ["new"], now=0.0) == []  # waits for the new scan's position
    assert j.counts["duplicate_frames"] == 0


def test_timestamp_matcher():
    m = TimestampMatcher(capacity=100, tolerance_s=0.6)
    t = np.arange(0.0, 5.0)
    m.add_sample(t, t * 1e-6, 2 * t * 1e-6)
    assert m.lookup(0.5) == pytest.approx((0.5e-6, 1.0e-6))
    assert m.lookup(2.0) == pytest.approx((2e-6, 4e-6))
    assert m.lookup(4.5) == pytest.approx((4e-6, 8e-6))  # nearest past the end
    assert m.lookup(5.7) is None and m.lookup(-1.0) is None
    tight = TimestampMatcher(tolerance_s=0.4)
    tight.add_sample(t, t * 1e-6, 2 * t * 1e-6)
    assert tight.lookup(0.5) is None  # both neighbours too far
    assert tight.lookup(0.3) == pytest.approx((0.0, 0.0))  # nearest within tolerance
    near = TimestampMatcher(tolerance_s=0.6, mode="nearest")
    near.add_sample(t, t, t)
    assert near.lookup(1.4) == (1.0, 1.0)
    many = m.lookup_many([0.45, 0.25, 10.0])
    assert many[0] == pytest.approx([0.45e-6, 0.9e-6])  # both neighbours within 0.6 s
    assert many[1] == pytest.approx([0.0, 0.0])  # 1.0 is 0.75 s away: nearest only
    assert np.isnan(many[2]).all()


def test_timestamp_matcher_ring_and_order():
    m = TimestampMatcher(capacity=4, tolerance_s=0.6)
    for k in [3, 1, 2, 0, 5, 4]:  # out of order; capacity keeps the last 4 written
        m.add_sample(float(k), float(k), -float(k))
    assert len(m) == 4  # 3 and 1 were overwritten: 0, 2, 4, 5 remain
    assert m.lookup(4.5) == pytest.approx((4.5, -4.5))
    assert m.lookup(3.5) == pytest.approx((4.0, -4.0))  # 2 is too far to interpolate
    assert m.lookup(1.0) is None
    assert m.lookup(0.0) == (0.0, -0.0)
    m.add_sample(np.nan, 0, 0)
    assert m.counts["bad_samples"] == 1


def test_pattern_positions():
    p = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]) * 1e-6
    pp = PatternPositions(p, first_uid=1)
    out = pp.lookup([1, 3, 0, 4])
    np.testing.assert_array_equal(out[:2], p[[0, 2]])
    assert np.isnan(out[2:]).all()


def test_trajectory_files(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.uniform(-1e-6, 1e-6, (25, 2))  # (y, x)
    h5 = tmp_path / "product.h5"
    with h5py.File(h5, "w") as f:
        f["probe_position_x_m"] = p[:, 1]
        f["probe_position_y_m"] = p[:, 0]
    nested = tmp_path / "nested.hdf5"
    with h5py.File(nested, "w") as f:
        f["entry/scan/probe_position_x_m"] = p[:, 1]
        f["entry/scan/probe_position_y_m"] = p[:, 0]
    csvf = tmp_path / "traj.csv"
    with open(csvf, "w") as fh:
        fh.write("x,y\n")  # x first: the loader must pick columns by name
        for y, x in p:
            fh.write(f"{float(x)!r},{float(y)!r}\n")
    npz = tmp_path / "train.npz"
    np.savez(npz, position=p, reciprocal=np.zeros((25, 4, 4)))
    npz_xy = tmp_path / "xy.npz"
    np.savez(npz_xy, position=p[:, ::-1])
    for path, kw in [(h5, {}), (nested, {}), (csvf, {}), (npz, {}), (npz_xy, {"order": "xy"})]:
        traj = trajectory_from_file(path, **kw)
        assert len(traj) == 25
        np.testing.assert_array_equal(traj.lookup(np.arange(1, 26)), p)
    t0 = trajectory_from_file(csvf, first_uid=0)
    np.testing.assert_array_equal(t0.lookup([0]), p[:1])
    um = tmp_path / "um.csv"
    um.write_text("y_um x_um\n1.5 2.5\n")
    t = trajectory_from_file(um, y_name="y_um", x_name="x_um", scale=1e-6)
    np.testing.assert_allclose(t.lookup([1]), [[1.5e-6, 2.5e-6]])
    bad = tmp_path / "noheader.csv"
    bad.write_text("1,2\n3,4\n")
    with pytest.raises(ValueError, match="header"):
        trajectory_from_file(bad)


def test_released_uids_are_remembered_within_the_reorder_window_only():
    """A long scan does not grow the joiner: only the last ``reorder_window`` released uids are kept
    (a repeat further back is a restart anyway), and a restart to uid 1 is still seen at the end."""
    n, window = 30_000, 500
    j = PositionJoiner(reorder_window=window)
    uids = np.arange(1, n + 1)
    zeros = np.zeros(n)
    released = j.submit(uids, [None] * n, positions=np.stack([zeros, zeros], axis=1), now=0.0)
    assert len(released) == n and j.counts["matched"] == n
    assert len(j._done) <= window + 1  # noqa: SLF001 - the bound under test
    # a repeat inside the window is a duplicate
    j.submit([n - 10], [None], positions=[[0.0, 0.0]], now=0.0)
    assert j.counts["duplicate_frames"] == 1 and j.counts["frame_restarts"] == 0
    # the detector restarts at uid 1 after 30,000 frames: a restart, not a duplicate nor a new frame
    j.submit([1], [None], positions=[[0.0, 0.0]], now=0.0)
    assert j.counts["frame_restarts"] == 1 and j.counts["duplicate_frames"] == 1
