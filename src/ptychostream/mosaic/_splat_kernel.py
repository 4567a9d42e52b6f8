"""The compiled kernel of :mod:`ptychostream.mosaic._splat` (imports numba; imported only when used).

Module-level functions, so that numba's on-disk cache finds them again in the next process.
"""

import numba
import numpy as np


# reassociation and contraction only: the inputs are finite (the stitcher rejects the rest)
jit = numba.njit(nogil=True, cache=True, error_model="numpy", fastmath={"reassoc", "contract"})


@jit
def fold_row(out, p1, p0, c00, c01, c10, c11):  # pragma: no cover - compiled
    """``out[c] +=`` the bilinear mix of padded rows ``p1`` (this one) and ``p0`` (the one above)."""
    for c in range(out.shape[0]):
        out[c] += c00 * p1[c + 1] + c01 * p1[c] + c10 * p0[c + 1] + c11 * p0[c]


@jit
def _add_row(out, row):  # pragma: no cover - compiled
    """``out += row``."""
    for c in range(out.shape[0]):
        out[c] += row[c]


@jit
def _prepare(k, phase, amp, win, pad, win_sum, sub_mean, sines, cplx, has_amp):  # pragma: no cover - compiled
    """Patch ``k`` into the interior of ``pad``: [0] windowed phase (complex: its cosine), [2] windowed
    amplitude, [3] windowed sine; with ``sub_mean`` less its window-weighted mean (complex: turned by
    its mean angle). ``pad[1]`` holds the window and every border is zero."""
    h, w = phase.shape[1], phase.shape[2]
    if cplx:
        for i in range(h):
            cr = phase[k, i]
            sr_ = sines[k, i]
            wr = win[i]
            dc = pad[0, i + 1]
            ds = pad[3, i + 1]
            for j in range(w):
                dc[j + 1] = cr[j] * wr[j]
                ds[j + 1] = sr_[j] * wr[j]
        if sub_mean:  # turn by the circular mean: multiply by conj(s) / |s|
            sr = 0.0
            si = 0.0
            for i in range(1, h + 1):
                for j in range(1, w + 1):
                    sr += pad[0, i, j]
                    si += pad[3, i, j]
            r = np.sqrt(sr * sr + si * si)
            if r > 0:
                tc = np.float32(sr / r)
                ts = np.float32(si / r)
                for i in range(1, h + 1):
                    dc = pad[0, i]
                    ds = pad[3, i]
                    for j in range(1, w + 1):
                        c = dc[j]
                        dc[j] = c * tc + ds[j] * ts
                        ds[j] = ds[j] * tc - c * ts
    else:
        mean = np.float32(0.0)
        if sub_mean:
            s = np.float32(0.0)
            for i in range(h):
                pr = phase[k, i]
                wr = win[i]
                for j in range(w):
                    s += pr[j] * wr[j]
            mean = np.float32(s / win_sum)
        for i in range(h):
            pr = phase[k, i]
            wr = win[i]
            d = pad[0, i + 1]
            for j in range(w):
                d[j + 1] = (pr[j] - mean) * wr[j]
    if has_amp:
        for i in range(h):
            ar = amp[k, i]
            wr = win[i]
            d = pad[2, i + 1]
            for j in range(w):
                d[j + 1] = ar[j] * wr[j]


@jit
def _reconcile(b, y0, x0, num, wt, num_im, overlap_min, cplx):  # pragma: no cover - compiled
    """offset "overlap" on one folded block ``b`` (planes as ``pad``'s, (h+1, w+1)) at canvas row
    ``y0``, column ``x0``: shift it (complex: turn it) to agree with the canvas under it, as
    :meth:`Stitcher._reconcile` / ``_reconcile_complex`` do; too little overlap leaves it as it is."""
    h1, w1 = b.shape[1], b.shape[2]
    den = 0.0
    tot = 0.0
    zr = 0.0
    zi = 0.0
    for r in range(h1):
        q = b[0, r]
        wb = b[1, r]
        cw = wt[y0 + r, x0:x0 + w1]
        cn = num[y0 + r, x0:x0 + w1]
        if cplx:
            qs = b[3, r]
            ci = num_im[y0 + r, x0:x0 + w1]
            for c in range(w1):
                den += wb[c] * cw[c]
                tot += wb[c]
                zr += cn[c] * q[c] + ci[c] * qs[c]
                zi += cn[c] * qs[c] - ci[c] * q[c]
        else:
            for c in range(w1):
                den += wb[c] * cw[c]
                tot += wb[c]
                zr += cw[c] * q[c] - wb[c] * cn[c]
    if den <= overlap_min * tot:
        return
    if cplx:
        rr = np.sqrt(zr * zr + zi * zi)
        if rr <= 0:
            return
        tc = np.float32(zr / rr)
        ts = np.float32(zi / rr)
        for r in range(h1):
            q = b[0, r]
            qs = b[3, r]
            for c in range(w1):
                v = q[c]
                q[c] = tc * v + ts * qs[c]
                qs[c] = tc * qs[c] - ts * v
    else:
        o = np.float32(zr / den)
        for r in range(h1):
            q = b[0, r]
            wb = b[1, r]
            for c in range(w1):
                q[c] -= o * wb[c]


@jit
def kernel(phase, amp, win, pad, win_sum, sub_mean, ay, ax, ry, rx,
           num, wt, num_amp, wt_amp, num_im, sines, chunk, overlap_min, blocks):  # pragma: no cover - compiled
    """See :func:`ptychostream.mosaic._splat.splat`; empty ``amp`` / ``wt_amp``: none; a non-empty
    ``num_im``: the complex domain, ``phase`` then holding the cosines of the phases and ``sines`` their
    sines (numpy's vectorised cos and sin are faster than a scalar loop's); ``num`` takes the cosines.
    ``chunk`` > 0: offset "overlap", steps of ``chunk`` patches folded into ``blocks`` (chunk, 4, h+1,
    w+1), each matched to the canvas the steps before made, then added; 0: folded into the canvas."""
    n, h, w = phase.shape
    has_amp = amp.shape[0] > 0
    has_wamp = wt_amp.shape[0] > 0
    cplx = num_im.shape[0] > 0
    step = chunk if chunk > 0 else n
    for s0 in range(0, n, step):
        s1 = min(s0 + step, n)
        for k in range(s0, s1):
            c00 = np.float32((1.0 - ay[k]) * (1.0 - ax[k]))
            c01 = np.float32((1.0 - ay[k]) * ax[k])
            c10 = np.float32(ay[k] * (1.0 - ax[k]))
            c11 = np.float32(ay[k] * ax[k])
            _prepare(k, phase, amp, win, pad, win_sum, sub_mean, sines, cplx, has_amp)
            y0 = ry[k]
            x0 = rx[k]
            x1 = x0 + w + 1
            if chunk > 0:  # into this step's blocks, added once the step is matched to the canvas
                b = blocks[k - s0]
                b[:] = 0
                for r in range(h + 1):
                    fold_row(b[0, r], pad[0, r + 1], pad[0, r], c00, c01, c10, c11)
                    fold_row(b[1, r], pad[1, r + 1], pad[1, r], c00, c01, c10, c11)
                    if cplx:
                        fold_row(b[3, r], pad[3, r + 1], pad[3, r], c00, c01, c10, c11)
                    if has_amp:
                        fold_row(b[2, r], pad[2, r + 1], pad[2, r], c00, c01, c10, c11)
                continue
            for r in range(h + 1):
                fold_row(num[y0 + r, x0:x1], pad[0, r + 1], pad[0, r], c00, c01, c10, c11)
                fold_row(wt[y0 + r, x0:x1], pad[1, r + 1], pad[1, r], c00, c01, c10, c11)
                if cplx:
                    fold_row(num_im[y0 + r, x0:x1], pad[3, r + 1], pad[3, r], c00, c01, c10, c11)
                if has_amp:
                    fold_row(num_amp[y0 + r, x0:x1], pad[2, r + 1], pad[2, r], c00, c01, c10, c11)
                    if has_wamp:
                        fold_row(wt_amp[y0 + r, x0:x1], pad[1, r + 1], pad[1, r], c00, c01, c10, c11)
        if chunk <= 0:
            continue
        for k in range(s0, s1):
            _reconcile(blocks[k - s0], ry[k], rx[k], num, wt, num_im, overlap_min, cplx)
        for k in range(s0, s1):
            b = blocks[k - s0]
            y0 = ry[k]
            x0 = rx[k]
            x1 = x0 + w + 1
            for r in range(h + 1):
                _add_row(num[y0 + r, x0:x1], b[0, r])
                _add_row(wt[y0 + r, x0:x1], b[1, r])
                if cplx:
                    _add_row(num_im[y0 + r, x0:x1], b[3, r])
                if has_amp:
                    _add_row(num_amp[y0 + r, x0:x1], b[2, r])
                    if has_wamp:
                        _add_row(wt_amp[y0 + r, x0:x1], b[1, r])
