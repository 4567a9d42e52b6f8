"""Physics consistency: does the network's patch explain the frame it was inferred from?

For a frame and its predicted patch the far-field intensity is simulated again, in the network's
input geometry, and compared with the measured counts:

1. the object window is the probe's (``N × N`` object pixels, the model's sampling); its central
   ``m × m`` pixels are the prediction ``A·exp(iφ)`` (amplitude 1 when the model has no amplitude
   head). **Outside the predicted patch** the network says nothing; the object there is taken to
   be the probe-weighted mean of the predicted patch (a flat continuation), so the probe's tails
   (3 % of the shipped probe's intensity) light a plausible object rather than vacuum or nothing;
2. exit wave ``P·O``, orthonormal FFT, ``|·|²``, zero frequency at the centre (the canonical
   frame of :mod:`ptychostream.sim.forward`), then the centre ``h × w`` of it, the network's input
   size (a crop of ``c`` raw pixels binned by ``b`` is ``h = c / b`` pixels of the binned
   detector, which the model's object pixel ``λz / (N·b·p)`` samples);
3. the measured frame goes through the device's own pre-processing (dark, bad pixels, threshold,
   fftshift, crop, bin, orientation) *without* the scaling and normalisation, so it is counts in
   the same canonical geometry; bad pixels of ``Preprocess.mask`` are left out;
4. the simulated intensity is scaled to the measured photon count on the compared pixels, and the
   figure is the **Poisson deviance per pixel**, ``2/n Σ [I log(I/μ) − (I − μ)]``: about 1 when
   the prediction explains the frame to within its shot noise (less where counts are below a few
   photons), growing with the photon count for a systematic misfit. The simulated intensity is
   floored at 1e-9 of the mean count, so a photon where the prediction has none costs a bounded
   amount.

:class:`ForwardCheck` holds the per-probe work (the probe with the fftshift folded in); the
function :func:`consistency` is the one-call form. :class:`ConsistencyMonitor` is the device side:
the probe in use (the model's sidecar or the instrument's ``ProbeFile``), the sampled share of frames, the
windowed median and 90th percentile, and the alarm after ``frames`` consecutive sampled frames
above the limit. It is the inference thread's :attr:`Batcher.after_infer` hook.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import scipy.special

from ptychostream.model.info import ModelInfo, probe_sidecar
from ptychostream.model.preprocess import Preprocess
from ptychostream.sim.probes import load_probe

__all__ = ["ForwardCheck", "ConsistencyMonitor", "ProbeError", "consistency", "counts_preprocess",
           "CONSISTENCY_WINDOW", "STATE_OFF", "STATE_UNAVAILABLE", "STATE_WAITING", "STATE_OK", "STATE_HIGH",
           "PIXEL_TOLERANCE"]

#: Consistency_RBV and ConsistencyP90_RBV are over the last CONSISTENCY_WINDOW sampled frames
CONSISTENCY_WINDOW = 100
#: ConsistencyStatus_RBV states, in the order of db/
STATE_OFF, STATE_UNAVAILABLE, STATE_WAITING, STATE_OK, STATE_HIGH = range(5)
#: a probe file's pixel may differ from the model's by this fraction
PIXEL_TOLERANCE = 0.02

_log = logging.getLogger(__name__)


class ProbeError(ValueError):
    """A probe that cannot be used with the serving model (its size or sampling is not the model's)."""


def counts_preprocess(pre: Preprocess) -> Preprocess:
    """``pre`` with no scaling and no normalisation: raw frames to counts in the network's geometry."""
    return replace(pre, scale="none", normalise="none", norm_value=1.0)


@dataclass
class _Geometry:
    """The compared window: the centre (h, w) of the N×N far field, the m×m predicted patch."""

    n: int
    h: int
    w: int
    m: int


class ForwardCheck:
    """The forward model for one probe: predicted patches → far-field intensity → deviance per frame.

    ``probe``: one mode (N, N), or the modes of a partially coherent probe (K, N, N), whose powers are
    their weights: the simulated intensity is the incoherent sum over the modes, Σ_k |F{P_k·O}|².
    """

    def __init__(self, probe: np.ndarray) -> None:
        p = np.asarray(probe)
        if p.ndim == 2:
            p = p[None]
        if p.ndim != 3 or p.shape[1] != p.shape[2] or p.shape[1] < 2 or p.shape[0] < 1:
            raise ProbeError(f"a probe must be one square 2-D array or a stack of square modes, got shape "
                             f"{np.shape(probe)}")
        if not np.all(np.isfinite(p)) or not np.any(p):
            raise ProbeError("the probe is all zeros or holds NaN/inf")
        #: the array it was made from (as given), and its modes (K, N, N)
        self.probe = probe
        self.modes = np.ascontiguousarray(p, dtype=np.complex64)
        n = self.size
        # zero frequency at (n//2, n//2) with no fftshift: FFT{(-1)^(y+x) ψ} = fftshift(FFT{ψ}) for even n
        if n % 2 == 0:
            sign = np.where(np.add.outer(np.arange(n), np.arange(n)) % 2 == 0, 1, -1).astype(np.float32)
            self._probe_fft = (self.modes * sign).astype(np.complex64)
        else:
            self._probe_fft = self.modes
        self._intensity = np.sum(np.abs(self.modes) ** 2, axis=0)
        self._valid_cache: tuple[Any, np.ndarray | None] = (None, None)
        self._counts: tuple[Preprocess | None, Preprocess] = (None, Preprocess())
        self._flat_cache: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, float]] = {}

    @property
    def size(self) -> int:
        """The probe's side N (object pixels)."""
        return int(self.modes.shape[-1])

    def geometry(self, input_shape: tuple[int, int], output_shape: tuple[int, int]) -> _Geometry:
        """Check that the model's input (h, w) and output (m, m) fit in this probe's window."""
        n = self.size
        h, w = (int(s) for s in input_shape)
        m, m2 = (int(s) for s in output_shape)
        if m != m2:
            raise ProbeError(f"the predicted patch {m}x{m2} is not square")
        if h > n or w > n:
            raise ProbeError(f"the probe is {n}x{n} but the model input is {h}x{w}: the probe must sample at "
                             "least the input's frequencies")
        if m > n:
            raise ProbeError(f"the probe is {n}x{n} but the predicted patch is {m}x{m}")
        if n % 2:
            raise ProbeError(f"the probe is {n}x{n}: an even size is needed")
        return _Geometry(n, h, w, m)

    def simulate(self, amplitude: np.ndarray | None, phase: np.ndarray, input_shape: tuple[int, int]
                 ) -> np.ndarray:
        """Unscaled far-field intensities (k, h, w) float32 of the predicted patches (k, m, m).

        By linearity the exit wave is ``fill·P`` (the probe over the flat object, whose centred
        spectrum is computed once per geometry) plus ``P·(O − fill)`` on the m×m patch; the latter's
        centre h×w frequencies of the N-point transform are two zero-padded 1-D FFTs (m columns,
        then h rows), half the work of the full 2-D FFT. The spectrum's phase ramp of the patch's
        offset is moved onto the flat term, which leaves the intensity unchanged. With several
        modes this is done for each and the intensities add.
        """
        phase = np.asarray(phase, dtype=np.float32)
        m = phase.shape[-1]
        g = self.geometry(input_shape, (phase.shape[-2], m))
        n, o0 = g.n, g.n // 2 - m // 2
        inner = np.empty(phase.shape, dtype=np.complex64)
        np.cos(phase, out=inner.real)
        np.sin(phase, out=inner.imag)
        if amplitude is not None:
            inner *= np.asarray(amplitude, dtype=np.float32).reshape(inner.shape)
        flat_spec, weight, total = self._flat(g)
        # the object outside the patch: the probe-weighted mean of the predicted patch
        fill = np.einsum("kij,ij->k", inner, weight) / np.float32(total if total > 0 else 1.0)
        inner -= fill[:, None, None]
        fill_c = fill.astype(np.complex64)[:, None, None]
        r0, c0 = n // 2 - g.h // 2, n // 2 - g.w // 2
        out: np.ndarray | None = None
        for mode, flat in zip(self._probe_fft, flat_spec):
            wave = inner * mode[o0:o0 + m, o0:o0 + m]
            cols = scipy.fft.fft(wave, n=n, axis=-2, norm="ortho", overwrite_x=True)[:, r0:r0 + g.h]
            spec = scipy.fft.fft(cols, n=n, axis=-1, norm="ortho", overwrite_x=True)[:, :, c0:c0 + g.w]
            spec += fill_c * flat
            if out is None:
                out = np.square(spec.real)
            else:
                out += np.square(spec.real)
            out += np.square(spec.imag)
        assert out is not None
        return out.astype(np.float32, copy=False)

    def _flat(self, g: _Geometry) -> tuple[np.ndarray, np.ndarray, float]:
        """For a geometry: each mode's centred spectrum window (K, h, w) with the patch offset's ramp
        undone, the probe intensity (all modes) on the patch (m, m) and its sum (cached)."""
        key = (g.h, g.w, g.m)
        hit = self._flat_cache.get(key)
        if hit is not None:
            return hit
        n, m = g.n, g.m
        o0 = n // 2 - m // 2
        r0, c0 = n // 2 - g.h // 2, n // 2 - g.w // 2
        full = np.fft.fft2(self._probe_fft.astype(np.complex128), norm="ortho")[:, r0:r0 + g.h, c0:c0 + g.w]
        ky, kx = np.arange(r0, r0 + g.h), np.arange(c0, c0 + g.w)
        ramp = np.exp(2j * np.pi * o0 * (ky[:, None] + kx[None, :]) / n)  # undo the offset's e^{-2πi k o0/N}
        weight = self._intensity[o0:o0 + m, o0:o0 + m].astype(np.float32)
        hit = ((full * ramp).astype(np.complex64), weight, float(weight.sum()))
        self._flat_cache = {key: hit}
        return hit

    def valid_pixels(self, pre: Preprocess, raw_shape: tuple[int, int]) -> np.ndarray | None:
        """The compared pixels (h, w) bool in the network's geometry (None: all of them).

        Left out: the bad pixels of ``pre.mask``, and with a flip the first row (``flip_y``) or
        column (``flip_x``) of the network's input: a flip of a crop reverses k → −k around the
        crop's centre, and the crop's first row wraps onto itself where the frame's k = +h/2 is
        outside the crop, so that row is not the mirrored frequency it should be.
        """
        if pre.mask is None and not (pre.flip_y or pre.flip_x):
            return None
        key = (id(pre.mask), tuple(raw_shape), pre.fftshift, pre.flip_y, pre.flip_x, pre.transpose, pre.crop_size,
               pre.crop_center, pre.bin)
        if self._valid_cache[0] == key:
            return self._valid_cache[1]
        geo = replace(counts_preprocess(pre), dark=None, mask=None, threshold=0.0)
        if pre.mask is not None:
            valid = ~(geo.apply(np.asarray(pre.mask, dtype=np.float32)[None] != 0)[0] > 0)
        else:
            valid = np.ones(geo.output_shape(tuple(raw_shape)), dtype=bool)
        if pre.flip_y:
            valid[0, :] = False
        if pre.flip_x:
            valid[:, 0] = False
        self._valid_cache = (key, valid)
        return valid

    def deviance(self, pre: Preprocess, raw: np.ndarray, amplitude: np.ndarray | None, phase: np.ndarray
                 ) -> np.ndarray:
        """Poisson deviance per compared pixel (k,) float32; NaN for a frame with no counts."""
        raw = np.asarray(raw)
        if self._counts[0] is not pre:  # one counts Preprocess per setting, so its index plan is kept
            self._counts = (pre, counts_preprocess(pre))
        measured = self._counts[1].apply(raw)
        if measured.ndim == 2:
            measured = measured[None]
        model = self.simulate(amplitude, phase, measured.shape[-2:])
        valid = self.valid_pixels(pre, raw.shape[-2:])
        k = measured.shape[0]
        if valid is not None:
            measured, model = measured[:, valid], model[:, valid]
        measured, model = measured.reshape(k, -1), model.reshape(k, -1)
        n = measured.shape[1]
        total = measured.sum(axis=1, dtype=np.float64)
        sim_total = model.sum(axis=1, dtype=np.float64)
        ok = (total > 0) & (sim_total > 0)
        scale = np.divide(total, sim_total, out=np.zeros_like(total), where=ok)
        mu = model
        mu *= scale.astype(np.float32)[:, None]
        np.maximum(mu, np.float32(1e-9) * np.maximum(total, 1.0).astype(np.float32)[:, None] / n, out=mu)
        # 2/n Σ [I log(I/μ) − (I − μ)], with I log(I/μ) = 0 where I = 0 (xlogy)
        term = scipy.special.xlogy(measured, measured / mu)
        dev = 2.0 * (term.sum(axis=1, dtype=np.float64) - total + mu.sum(axis=1, dtype=np.float64)) / n
        dev[~ok] = np.nan
        return dev.astype(np.float32)


def consistency(probe: np.ndarray, pre: Preprocess, raw: np.ndarray, phase: np.ndarray,
                amplitude: np.ndarray | None = None) -> np.ndarray:
    """Poisson deviance per pixel (n,) of the predicted patches against the raw frames (see the module)."""
    return ForwardCheck(probe).deviance(pre, raw, amplitude, phase)


def _probe_from_file(path: Path) -> tuple[np.ndarray, float | None]:
    """Every mode of the probe in ``path`` (K, N, N), and its pixel."""
    try:
        return load_probe(path, modes=True)
    except (OSError, KeyError) as exc:
        raise ProbeError(f"cannot read the probe file {path}: {exc}") from None
    except ValueError as exc:
        raise ProbeError(str(exc)) from None


class ConsistencyMonitor:
    """The device side: which probe, which frames, the windowed figures and the alarm.

    Call it as the inference thread's ``after_infer(model, pre, raw, inputs, outputs)``: it returns
    the figure (n,) float32, NaN for the frames not sampled, or None when no figure can be made.
    ``on_alarm(severity, text)`` is called when the alarm rises (1, MINOR) or clears (0).
    """

    def __init__(self, share: float = 0.25, limit: float = 100.0, frames: int = 10,
                 window: int = CONSISTENCY_WINDOW) -> None:
        self._lock = threading.RLock()
        self.share = min(1.0, max(0.0, float(share)))
        self.limit = float(limit)
        self.frames = int(frames)
        self.on_alarm: Callable[[int, str], None] = lambda severity, text: None
        self._values: deque[float] = deque(maxlen=int(window))
        self._carry = 1.0 - self.share  # the first frame is sampled
        self._above = 0
        self._below = 0
        self.severity = 0
        self.sampled = 0
        self._model_key: tuple[str, str] | None = None
        self._model_probe: tuple[np.ndarray, str] | None = None
        self._model_note = ""
        self._file_probe: tuple[np.ndarray, str] | None = None
        self._check: ForwardCheck | None = None
        self._model_name = ""
        self._model_info: ModelInfo | None = None
        self._error = ""
        self._generation = 0

    # -- settings (any thread) -----------------------------------------------------------
    def set_share(self, share: float) -> float:
        """Sample a share of the frames, evenly spaced (0.25: every 4th; 0: off). Returns the share in use."""
        with self._lock:
            self.share = min(1.0, max(0.0, float(share)))
            self._carry = 1.0 - self.share  # the next frame is sampled
            return self.share

    def used_share(self) -> float:
        """The share of frames sampled (0 when off)."""
        return self.share

    def _pick(self, n: int) -> np.ndarray:
        """Which of the next ``n`` frames are sampled: frame j when ``carry + (j+1)·share`` crosses an
        integer, so the share holds across batches of any size (under the lock)."""
        s = self.share
        steps = self._carry + s * np.arange(n + 1)
        whole = np.floor(steps + 1e-9)
        self._carry = float(steps[-1] - whole[-1])
        return np.flatnonzero(np.diff(whole) > 0)

    def set_limit(self, limit: float, frames: int) -> None:
        """The alarm: ``frames`` consecutive sampled frames above ``limit``."""
        with self._lock:
            self.limit, self.frames = float(limit), max(1, int(frames))
            self._above = self._below = 0

    def set_model(self, info: ModelInfo | None) -> str:
        """Read the probe a model carries (its sidecar, see :func:`probe_sidecar`); returns a note for
        the operator ("" when all is well). A sidecar that does not fit the model is not used."""
        probe: tuple[np.ndarray, str] | None = None
        note = ""
        if info is not None:
            path = probe_sidecar(info)
            if path is not None:
                try:
                    arr, pixel = _probe_from_file(path)
                    self._fits_model(arr, pixel, info, f"the model's probe {path.name}")
                    probe = (arr, f"model probe {path.name}")
                except ProbeError as exc:
                    note = f"model {info.name}: its probe is not used: {exc}"
        with self._lock:
            self._model_key = None if info is None else (info.path, info.sha256)
            self._model_probe = probe
            self._model_note = note
            self._model_name = "" if info is None else info.name
            self._model_info = info
            self._reset_figures()
            file_probe = self._file_probe
        if file_probe is not None and info is not None:  # the instrument's probe must fit the new model too
            try:
                self._fits_model(file_probe[0], None, info, file_probe[1])
            except ProbeError as exc:
                with self._lock:
                    self._error = str(exc)
                note = f"{note}; " if note else ""
                note += f"the consistency figure is unavailable: {exc}"
        return note

    def set_probe_file(self, path: str, frame_shape: tuple[int, ...] | None = None, bin: int = 1) -> str:
        """Use the instrument's probe file (wins over the model's); "" unloads it. Raises
        :class:`ProbeError` naming both sizes when it does not fit the serving model (the model's own
        probe, else the object window of the ``frame_shape`` frames streaming, binned by ``bin``); the
        previous probe stays. Returns what is now in use (:meth:`source`)."""
        if not path:
            with self._lock:
                self._file_probe = None
                self._reset_figures()
            return self.source()
        p = Path(path).expanduser()
        if not p.is_file():
            raise ProbeError(f"probe file not found: {p}")
        arr, pixel = _probe_from_file(p)
        with self._lock:
            model_probe, info = self._model_probe, self._model_info
        if model_probe is not None and arr.shape[-2:] != model_probe[0].shape[-2:]:
            raise ProbeError(f"the probe {p.name} is {arr.shape[-2]}x{arr.shape[-1]} but the model's probe is "
                             f"{model_probe[0].shape[-2]}x{model_probe[0].shape[-1]} (its object-pixel window)")
        if model_probe is None and frame_shape is not None and len(frame_shape) == 2:
            n = int(frame_shape[0]) // max(1, int(bin))
            if arr.shape[-2:] != (n, n) and int(frame_shape[0]) == int(frame_shape[1]):
                raise ProbeError(f"the probe {p.name} is {arr.shape[-2]}x{arr.shape[-1]} but the frames streaming "
                                 f"sample a {n}x{n} object window ({frame_shape[0]}x{frame_shape[1]} px, bin {bin})")
        if info is not None:
            self._fits_model(arr, pixel, info, f"the probe {p.name}")
        with self._lock:
            self._file_probe = (arr, f"ProbeFile {p.name}")
            self._reset_figures()
        return self.source()

    @staticmethod
    def _fits_model(arr: np.ndarray, pixel: float | None, info: ModelInfo, what: str) -> None:
        h, w = info.input_shape
        shapes = [s for s in info.output_shapes.values() if s]
        m = shapes[0][0] if shapes else h
        n = arr.shape[-1]
        if arr.ndim not in (2, 3) or arr.shape[-2] != arr.shape[-1]:
            raise ProbeError(f"{what} is {'x'.join(map(str, arr.shape))}: a square probe is needed")
        if n % 2:
            raise ProbeError(f"{what} is {n}x{n}: an even size is needed")
        if n < max(h, w, m):
            raise ProbeError(f"{what} is {n}x{n} but the model {info.name} takes {h}x{w} frames and predicts "
                             f"{m}x{m} patches: the probe must be at least {max(h, w, m)}x{max(h, w, m)}")
        if pixel is not None and info.pixel_m and abs(pixel / info.pixel_m - 1) > PIXEL_TOLERANCE:
            raise ProbeError(f"{what} has a {pixel:.4g} m pixel but the model {info.name} samples "
                             f"{info.pixel_m:.4g} m")

    def _probe(self) -> tuple[np.ndarray, str] | None:
        return self._file_probe if self._file_probe is not None else self._model_probe

    def source(self) -> str:
        """What the figure is made with, or why there is none (for ConsistencyInfo_RBV)."""
        with self._lock:
            if self._error:
                return f"unavailable: {self._error}"
            probe = self._probe()
            if probe is None:
                why = self._model_note or "no probe known: the model carries none and ProbeFile is empty"
                return f"unavailable: {why}"
            n = probe[0].shape[-1]
            k = probe[0].shape[0] if probe[0].ndim == 3 else 1
            return f"{probe[1]} {n}x{n}" + (f", {k} modes" if k > 1 else "")

    def state(self) -> int:
        """ConsistencyStatus_RBV: Off, Unavailable, Waiting, OK or High."""
        with self._lock:
            if self.share <= 0:
                return STATE_OFF
            if self._probe() is None or self._error:
                return STATE_UNAVAILABLE
            if not self._values:
                return STATE_WAITING
            return STATE_HIGH if self.severity else STATE_OK

    def figures(self) -> tuple[float, float]:
        """(median, 90th percentile) of the last window of sampled frames; NaN with none."""
        with self._lock:
            if not self._values:
                return float("nan"), float("nan")
            vals = np.fromiter(self._values, dtype=np.float64)
        return float(np.median(vals)), float(np.percentile(vals, 90))

    def _reset_figures(self) -> None:
        """A new probe or model: the window starts again and the alarm is cleared (under the lock)."""
        self._values.clear()
        self._above = self._below = 0
        self.sampled = 0
        self._generation += 1  # figures of frames in flight now are not added
        self._check = None
        self._error = ""
        if self.severity:
            self.severity = 0
            self._tell(0, "")

    def _tell(self, severity: int, text: str) -> None:
        try:
            self.on_alarm(severity, text)
        except Exception:  # a report must not stop the stream
            _log.exception("reporting the consistency alarm failed")

    # -- the hook (the inference thread) --------------------------------------------------
    def __call__(self, model: Any, pre: Preprocess, raw: np.ndarray, inputs: np.ndarray,
                 outputs: dict[str, np.ndarray]) -> np.ndarray | None:
        n = len(raw)
        info: ModelInfo = model.info
        with self._lock:
            probe = self._probe()
            if (info.path, info.sha256) != self._model_key and self._file_probe is None:
                probe = None  # the model's probe is not known yet (set_model runs on the load thread)
            check = self._check
            if self.share <= 0 or probe is None:
                return None
            generation = self._generation
            sel = self._pick(n)
            if check is None or check.probe is not probe[0]:
                check = self._check = ForwardCheck(probe[0])
        if sel.size == 0:
            return np.full(n, np.nan, dtype=np.float32)
        phase = outputs["phase"][sel]
        phase = phase.reshape(len(sel), *phase.shape[-2:])
        amp = outputs.get("amplitude")
        if amp is not None:
            amp = amp[sel].reshape(phase.shape)
        try:
            values = check.deviance(pre, raw[sel], amp, phase)
        except ProbeError as exc:
            with self._lock:
                if not self._error:
                    self._error = str(exc)
            return None
        out = np.full(n, np.nan, dtype=np.float32)
        out[sel] = values
        self._add(values, generation)
        return out

    def _add(self, values: np.ndarray, generation: int) -> None:
        rise = clear = ""
        with self._lock:
            if generation != self._generation:  # a new probe or model meanwhile
                return
            for v in values:
                if not np.isfinite(v):
                    continue
                self._values.append(float(v))
                self.sampled += 1
                if v > self.limit:
                    self._above += 1
                    self._below = 0
                else:
                    self._below += 1
                    self._above = 0
                if not self.severity and self._above >= self.frames:
                    self.severity = 1
                    med = float(np.median(np.fromiter(self._values, dtype=np.float64)))
                    rise = (f"model {self._model_name} does not explain the frames: consistency {med:.3g} "
                            f"(Poisson deviance per pixel, median) above ConsistencyLimit {self.limit:g} on "
                            f"{self._above} sampled frames in a row; retrain it for this instrument (Retrain, "
                            "ptychostream adapt), or check ProbeFile and the pre-processing")
                elif self.severity and self._below >= self.frames:
                    self.severity = 0
                    clear = (f"model {self._model_name} explains the frames again: consistency below "
                             f"{self.limit:g} on {self._below} sampled frames in a row")
        if rise:
            self._tell(1, rise)
        if clear:
            self._tell(0, clear)
