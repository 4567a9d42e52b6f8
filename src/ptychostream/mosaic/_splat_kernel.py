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
def kernel(phase, amp, win, pad, win_sum, sub_mean, ay, ax, ry, rx,
           num, wt, num_amp, wt_amp, num_im, sines):  # pragma: no cover - compiled
    """See :func:`ptychostream.mosaic._splat.splat`; empty ``amp`` / ``wt_amp``: none; a non-empty
    ``num_im``: the complex domain, ``phase`` then holding the cosines of the phases and ``sines`` their
    sines (numpy's vectorised cos and sin are faster than a scalar loop's); ``num`` takes the cosines."""
    n, h, w = phase.shape
    has_amp = amp.shape[0] > 0
    has_wamp = wt_amp.shape[0] > 0
    cplx = num_im.shape[0] > 0
    for k in range(n):
        c00 = np.float32((1.0 - ay[k]) * (1.0 - ax[k]))
        c01 = np.float32((1.0 - ay[k]) * ax[k])
        c10 = np.float32(ay[k] * (1.0 - ax[k]))
        c11 = np.float32(ay[k] * ax[k])
        # pad[0]: windowed phase (complex: its cosine), pad[1]: the window, pad[2]: windowed amplitude,
        # pad[3]: the windowed sine; a zero border
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
        y0 = ry[k]
        x0 = rx[k]
        x1 = x0 + w + 1
        for r in range(h + 1):
            fold_row(num[y0 + r, x0:x1], pad[0, r + 1], pad[0, r], c00, c01, c10, c11)
            fold_row(wt[y0 + r, x0:x1], pad[1, r + 1], pad[1, r], c00, c01, c10, c11)
            if cplx:
                fold_row(num_im[y0 + r, x0:x1], pad[3, r + 1], pad[3, r], c00, c01, c10, c11)
            if has_amp:
                fold_row(num_amp[y0 + r, x0:x1], pad[2, r + 1], pad[2, r], c00, c01, c10, c11)
                if has_wamp:
                    fold_row(wt_amp[y0 + r, x0:x1], pad[1, r + 1], pad[1, r], c00, c01, c10, c11)
