"""Simulated far-field ptychography: objects, probes, scans, the forward model and replay files.

Conventions: positions are metres, (N, 2) ordered (y, x), relative to the object's centre pixel
(H // 2, W // 2), x along columns and y along rows; objects are complex64 transmissions
A·exp(iφ) with A ≤ 1 on the geometry's real-space pixel λz/(Np); frames are |F{P·O}|² with an
orthonormal FFT, fftshift-centred.  See :mod:`.forward` for details.  :mod:`.foreign` simulates an
instrument unlike the default (multi-mode KB probe, corner-origin flipped frames, positions in
pixels): the tests' stand-in for measured data.
"""

from ptychostream.sim.foreign import (
    ForeignInstrument,
    ForeignTruth,
    simulate_foreign,
    write_foreign,
    write_tike_npz,
)
from ptychostream.sim.forward import (
    DTYPES,
    Geometry,
    Simulator,
    centred,
    extract_patches,
    far_field,
    unshifted,
)
from ptychostream.sim.objects import OBJECT_KINDS, fit_object, load_object, make_object
from ptychostream.sim.probes import (
    PROBE_KINDS,
    kb_mirror_probe,
    load_probe,
    make_probe,
    mode_weights,
)
from ptychostream.sim.replay import (
    ReplayData,
    load_frames,
    read_truth_h5,
    write_truth_h5,
)
from ptychostream.sim.scans import SCAN_PATTERNS, scan_extent_px, scan_positions

__all__ = [
    "DTYPES", "OBJECT_KINDS", "PROBE_KINDS", "SCAN_PATTERNS", "ForeignInstrument", "ForeignTruth", "Geometry",
    "ReplayData", "Simulator", "centred", "extract_patches", "far_field", "fit_object", "kb_mirror_probe",
    "load_frames", "load_object", "load_probe", "make_object", "make_probe", "mode_weights", "read_truth_h5",
    "scan_extent_px", "scan_positions", "simulate_foreign", "unshifted", "write_foreign", "write_tike_npz",
    "write_truth_h5",
]
