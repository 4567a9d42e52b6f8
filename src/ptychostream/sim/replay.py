"""Measured or saved frames for replay, and ground-truth files of simulated scans.

Conventions: frames are (N, H, W) arrays; simulated frames are fftshift-centred (zero frequency
at (H // 2, W // 2)).  Measured data stored with zero frequency at the corner can be converted
with :func:`ptychostream.sim.forward.centred`; :func:`unshifted` (``np.fft.ifftshift`` over the
last two axes) goes the other way.  Positions are (N, 2) metres ordered (y, x).

Ground-truth files follow the layout of a Ptychodus product:
``object`` (1×H×W complex64; attributes ``pixel_width_m``, ``pixel_height_m``, ``center_x_m``,
``center_y_m`` — the object's centre pixel (H // 2, W // 2) is at position (0, 0)),
``probe`` (1×1×N×N complex64; ``pixel_width_m``, ``pixel_height_m``), ``probe_position_x_m``,
``probe_position_y_m``, ``probe_position_indexes``, plus ``patches`` (n×N×N complex64, the true
object patches) with ``patch_indexes``, and the geometry and detector settings as file attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.files.paths import split_dataset_path
from ptychostream.sim.forward import Geometry, Simulator, _index, centred, unshifted

__all__ = ["FRAME_PATHS", "ReplayData", "centred", "load_frames", "read_truth_h5", "unshifted",
           "write_truth_h5"]

#: HDF5 datasets tried, in order, when no dataset is given
FRAME_PATHS: tuple[str, ...] = ("/entry/data/data", "/exchange/data", "/dp")
_POS_Y, _POS_X = "probe_position_y_m", "probe_position_x_m"
_NPZ_FRAMES, _NPZ_POS = "reciprocal", "position"


@dataclass
class ReplayData:
    """Frames (N, H, W), positions (N, 2) in metres (y, x) or None, and a description of the source."""

    frames: np.ndarray
    positions_m: np.ndarray | None
    source: str


def _datasets(h5: Any) -> list[str]:
    import h5py

    found: list[str] = []
    h5.visititems(lambda n, o: found.append("/" + n) if isinstance(o, h5py.Dataset) else None)
    return found


def _as_frames(arr: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim > 3:
        arr = arr.reshape(-1, *arr.shape[-2:])
    elif arr.ndim < 2:
        raise ValueError(f"{where}: frames must be 2-D or more, got shape {arr.shape}")
    return arr


def _h5_positions(h5: Any) -> np.ndarray | None:
    """(y, x) positions from ``probe_position_{y,x}_m`` at the root or anywhere in the file."""
    import h5py

    hits: dict[str, str] = {}
    for name in (_POS_Y, _POS_X):
        if name in h5:
            hits[name] = name
    if len(hits) < 2:
        def visit(n: str, o: Any) -> None:
            base = n.rsplit("/", 1)[-1]
            if base in (_POS_Y, _POS_X) and base not in hits and isinstance(o, h5py.Dataset):
                hits[base] = n
        h5.visititems(visit)
    if len(hits) < 2:
        return None
    y = np.asarray(h5[hits[_POS_Y]][()], dtype=np.float64).ravel()
    x = np.asarray(h5[hits[_POS_X]][()], dtype=np.float64).ravel()
    if y.shape != x.shape:
        raise ValueError(f"{_POS_Y} and {_POS_X} differ in length ({y.size} vs {x.size})")
    return np.stack([y, x], axis=1)


def _positions_from(spec: Any) -> tuple[np.ndarray, str]:
    """Positions from a Ptychodus product / NPZ path or an (N, 2) array."""
    if isinstance(spec, (str, Path)):
        file = Path(spec)
        if not file.is_file():
            raise FileNotFoundError(f"positions file not found: {file}")
        if file.suffix.lower() == ".npz":
            with np.load(file) as z:
                if _NPZ_POS not in z:
                    raise ValueError(f"{file}: no {_NPZ_POS!r} array (keys: {', '.join(z.files)})")
                return np.asarray(z[_NPZ_POS], dtype=np.float64), str(file)
        import h5py

        with h5py.File(file, "r") as h5:
            pos = _h5_positions(h5)
        if pos is None:
            raise ValueError(f"{file}: no positions: looked for datasets {_POS_Y!r} and {_POS_X!r}")
        return pos, str(file)
    return np.asarray(spec, dtype=np.float64), "array"


def load_frames(path: str | Path, dataset: str | None = None, positions: Any = None) -> ReplayData:
    """Load frames (and positions) to replay from HDF5, a PtychoNN NPZ or ``.npy``.

    HDF5: ``dataset`` (or ``path::dataset``), else the first of :data:`FRAME_PATHS` present;
    positions from ``probe_position_y_m`` / ``probe_position_x_m`` in the same file.  NPZ:
    ``reciprocal`` frames and ``position`` (N, 2) (y, x); positions larger than 1 cm are taken
    as pixels and multiplied by ``pixelsize`` when the file has one.  ``positions`` overrides
    the file's positions: a Ptychodus product / NPZ path or an (N, 2) array in metres.
    Frames of more than three dimensions are flattened to (N, H, W).
    """
    file, dataset = split_dataset_path(path, dataset, "replay")
    pos: np.ndarray | None = None
    suffix = file.suffix.lower()
    if suffix == ".npz":
        with np.load(file) as z:
            key = dataset or _NPZ_FRAMES
            if key not in z:
                raise ValueError(f"{file}: no {key!r} array for the frames (keys: {', '.join(z.files)})")
            frames = _as_frames(z[key], str(file))
            if _NPZ_POS in z:
                pos = np.asarray(z[_NPZ_POS], dtype=np.float64)
                if pos.ndim == 2 and pos.shape[1] > 2:
                    pos = pos[:, :2]
                if pos.size and np.abs(pos).max() > 1e-2 and "pixelsize" in z:
                    pos = pos * float(np.asarray(z["pixelsize"]).ravel()[0])
        source = f"{file}:{key}"
    elif suffix == ".npy":
        frames = _as_frames(np.load(file), str(file))
        source = str(file)
    else:
        import h5py

        if not h5py.is_hdf5(file):
            raise ValueError(f"{file}: not an HDF5, .npz or .npy file")
        with h5py.File(file, "r") as h5:
            tried = [dataset] if dataset else list(FRAME_PATHS)
            name = next((p for p in tried if p in h5 and isinstance(h5[p], h5py.Dataset)), None)
            if name is None:
                raise ValueError(f"{file}: no frames: looked for {', '.join(tried)}; datasets present: "
                                 f"{', '.join(_datasets(h5)) or 'none'} (pass dataset= or path::dataset)")
            frames = _as_frames(h5[name][()], f"{file}:{name}")
            pos = _h5_positions(h5)
        source = f"{file}:{name}"
    if positions is not None:
        pos, _ = _positions_from(positions)
    if pos is not None:
        if pos.ndim != 2 or pos.shape[1] != 2:
            raise ValueError(f"positions must have shape (N, 2) ordered (y, x), got {pos.shape}")
        if len(pos) != len(frames):
            raise ValueError(f"{len(pos)} positions for {len(frames)} frames in {source}")
    return ReplayData(frames, pos, source)


def write_truth_h5(path: str | Path, sim: Simulator, idx: Any = None, chunk: int = 256) -> None:
    """Write a simulation's ground truth (Ptychodus-like layout; see the module docstring).

    ``idx`` selects the frames whose true patches are stored (default: all), written in chunks.
    """
    import h5py

    ii, _ = _index(slice(None) if idx is None else idx, sim.n)
    ii = np.atleast_1d(ii)
    g = sim.geometry
    px = sim.object_pixel_m
    n_px = g.size
    with h5py.File(path, "w") as h5:
        obj = h5.create_dataset("object", data=sim.obj[None])
        obj.attrs.update(pixel_width_m=px, pixel_height_m=px, center_x_m=0.0, center_y_m=0.0)
        probe = h5.create_dataset("probe", data=sim.probe[None, None])
        probe.attrs.update(pixel_width_m=px, pixel_height_m=px)
        h5.create_dataset(_POS_X, data=sim.positions_m[:, 1])
        h5.create_dataset(_POS_Y, data=sim.positions_m[:, 0])
        h5.create_dataset("probe_position_indexes", data=np.arange(sim.n, dtype=np.int64))
        h5.create_dataset("patch_indexes", data=ii)
        patches = h5.create_dataset("patches", shape=(len(ii), n_px, n_px), dtype=np.complex64,
                                    chunks=(1, n_px, n_px) if len(ii) else None)
        for s in range(0, len(ii), chunk):
            patches[s:s + chunk] = sim.patches(ii[s:s + chunk])
        h5.create_dataset("hot_pixel_indexes", data=sim.hot_index)
        h5.attrs.update(
            energy_keV=g.energy_keV, distance_m=g.distance_m, detector_pixel_m=g.detector_pixel_m,
            size=g.size, wavelength_m=g.wavelength_m, object_pixel_m=px, photons=sim.photons,
            seed=sim.seed, bin=sim.bin, crop=np.asarray(sim.crop or (0, 0)), dtype=sim.dtype.name,
            beamstop_px=sim.beamstop_px, hot_pixels=sim.hot_pixels, normalize=sim.normalize,
            frame_shape=np.asarray(sim.frame_shape),
            conventions="positions (y, x) metres relative to object pixel (H//2, W//2); "
                        "frames |FFT_ortho(P*O)|^2 fftshift-centred",
        )


def read_truth_h5(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`write_truth_h5` into a dict.

    Keys: ``object`` (H×W), ``object_pixel_m``, ``object_center_m`` (y, x), ``probe`` (N×N),
    ``probe_pixel_m``, ``positions_m`` (N, 2) (y, x), ``position_indexes``, ``patches``,
    ``patch_indexes``, ``hot_pixel_indexes``, ``geometry`` (a :class:`Geometry`), ``attrs``.
    """
    import h5py

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"truth file not found: {file}")
    with h5py.File(file, "r") as h5:
        missing = [k for k in ("object", "probe", _POS_X, _POS_Y) if k not in h5]
        if missing:
            raise ValueError(f"{file}: not a ground-truth file, missing {', '.join(missing)}")
        obj, probe = h5["object"], h5["probe"]
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in h5.attrs.items()}
        out: dict[str, Any] = {
            "object": obj[0],
            "object_pixel_m": float(obj.attrs["pixel_width_m"]),
            "object_center_m": (float(obj.attrs["center_y_m"]), float(obj.attrs["center_x_m"])),
            "probe": probe[0, 0],
            "probe_pixel_m": float(probe.attrs["pixel_width_m"]),
            "positions_m": np.stack([h5[_POS_Y][()], h5[_POS_X][()]], axis=1),
            "position_indexes": h5["probe_position_indexes"][()] if "probe_position_indexes" in h5 else None,
            "patches": h5["patches"][()] if "patches" in h5 else None,
            "patch_indexes": h5["patch_indexes"][()] if "patch_indexes" in h5 else None,
            "hot_pixel_indexes": h5["hot_pixel_indexes"][()] if "hot_pixel_indexes" in h5 else None,
            "attrs": attrs,
        }
    if all(k in attrs for k in ("energy_keV", "distance_m", "detector_pixel_m", "size")):
        out["geometry"] = Geometry(attrs["energy_keV"], attrs["distance_m"], attrs["detector_pixel_m"],
                                   int(attrs["size"]))
    else:
        out["geometry"] = None
    return out
