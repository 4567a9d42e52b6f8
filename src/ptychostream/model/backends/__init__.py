"""Inference backends behind one small interface.

A backend runs one model file on one device::

    be = open_backend("Auto", "model.onnx", batch_size=64)
    out = be.infer(x)          # x float32 (n, h, w) → {"phase": (n, h', w'), ...}
    be.close()

``Auto`` tries TensorRT, then PyTorch-CUDA, then ONNXRuntime-CPU, and records why
each faster one was skipped in ``be.fallback_reasons``. Naming a backend that
cannot run here raises :class:`BackendError` with the reason ("TensorRT is not
installed: …", "no CUDA GPU").

Every backend accepts any n >= 1: partial batches are padded to a fixed ONNX batch
and larger ones are split into chunks; only the real rows come back, as new
float32 arrays the caller may keep.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from ptychostream.model.gpu import BackendError, cuda_driver_reason
from ptychostream.model.info import ModelInfo, load_model_file

__all__ = [
    "Backend", "BackendError", "BACKEND_CHOICES", "AUTO_ORDER", "available_backends", "canonical_name",
    "open_backend", "backend_unavailable_reason", "cuda_driver_reason", "probe_reason", "split_outputs",
    "check_input",
]

BACKEND_CHOICES = ("Auto", "ONNXRuntime-CPU", "TensorRT", "PyTorch-CUDA")
#: the order ``Auto`` tries
AUTO_ORDER = ("TensorRT", "PyTorch-CUDA", "ONNXRuntime-CPU")

_MODULES = {
    "ONNXRuntime-CPU": ".onnxrt",
    "TensorRT": ".tensorrt",
    "PyTorch-CUDA": ".torch_cuda",
}
_ALIASES = {
    "auto": "Auto", "onnxruntime": "ONNXRuntime-CPU", "onnxruntime-cpu": "ONNXRuntime-CPU",
    "ort": "ONNXRuntime-CPU", "cpu": "ONNXRuntime-CPU", "tensorrt": "TensorRT", "trt": "TensorRT",
    "pytorch-cuda": "PyTorch-CUDA", "torch": "PyTorch-CUDA", "pytorch": "PyTorch-CUDA",
    "torch-cuda": "PyTorch-CUDA",
}


@runtime_checkable
class Backend(Protocol):
    name: str                      # one of BACKEND_CHOICES[1:]
    input_shape: tuple[int, int]   # (h, w) the model wants
    fixed_batch: int | None        # when the model's batch dim is a fixed number
    outputs: tuple[str, ...]       # subset of ("phase", "amplitude"), in returned order
    fallback_reasons: list[str]    # set by open_backend: why Auto skipped faster backends

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


def canonical_name(name: str) -> str:
    """The BACKEND_CHOICES spelling of ``name`` (case-insensitive; a few aliases)."""
    if name in BACKEND_CHOICES:
        return name
    key = str(name).strip().lower().replace("_", "-").replace(" ", "-")
    if key in _ALIASES:
        return _ALIASES[key]
    raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_CHOICES)}")


def _module(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name], __name__)


def probe_reason(probe: Callable[[], object]) -> str | None:
    """None when ``probe()`` runs, else the message of the :class:`BackendError` it raised
    (a backend module's ``unavailable_reason``)."""
    try:
        probe()
    except BackendError as exc:
        return str(exc)
    return None


def backend_unavailable_reason(name: str) -> str | None:
    """None when ``name`` can run here, else a short reason."""
    name = canonical_name(name)
    if name == "Auto":
        return None if available_backends() else "no backend can run here"
    try:
        return _module(name).unavailable_reason()
    except Exception as exc:  # a probe must never take the caller down
        return f"{name} probe failed: {exc}"


def available_backends() -> list[str]:
    """Backends that can import and find their device here, in Auto order."""
    return [n for n in AUTO_ORDER if backend_unavailable_reason(n) is None]


def _open_one(name: str, model: ModelInfo, batch_size: int, opts: dict[str, Any]) -> Backend:
    reason = backend_unavailable_reason(name)
    if reason is not None:
        raise BackendError(reason)
    try:
        backend: Backend = _module(name).open(model, batch_size=batch_size, **opts)
        return backend
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"{name} could not load {model.path}: {type(exc).__name__}: {exc}") from exc


def open_backend(name: str, model: ModelInfo | str | os.PathLike[str], batch_size: int = 64,
                 **opts: Any) -> Backend:
    """Open ``model`` (a ModelInfo or a path) on backend ``name`` (one of BACKEND_CHOICES).

    The returned backend has a ``fallback_reasons`` list: empty unless Auto skipped
    faster backends, then one "Backend: reason" per skipped one.
    """
    if not isinstance(model, ModelInfo):
        model = load_model_file(os.fspath(model))
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise BackendError(f"batch_size must be an integer >= 1, not {batch_size!r}")
    name = canonical_name(name)
    if name != "Auto":
        be = _open_one(name, model, int(batch_size), opts)
        be.fallback_reasons = []
        return be
    order = ("TensorRT",) if model.kind == "engine" else AUTO_ORDER
    reasons: list[str] = []
    last: BackendError | None = None
    for cand in order:
        try:
            be = _open_one(cand, model, int(batch_size), opts)
        except BackendError as exc:
            reasons.append(f"{cand}: {exc}")
            last = exc
            continue
        be.fallback_reasons = reasons
        return be
    raise BackendError("no backend can run this model: " + "; ".join(reasons)) from last


# -- helpers shared by the backends ------------------------------------------------------

def check_input(x: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """x as a C-contiguous float32 (n, h, w) array; ValueError if the frame size is wrong."""
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or tuple(x.shape[1:]) != tuple(input_shape) or x.shape[0] < 1:
        raise ValueError(f"input must be (n, {input_shape[0]}, {input_shape[1]}) with n >= 1, "
                         f"got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def split_outputs(raw: dict[str, np.ndarray], output_map: Sequence[tuple[str, str, int]],
                  rows: int | None = None) -> dict[str, np.ndarray]:
    """Turn graph outputs into {label: float32 (n, h', w')} following ``output_map``.

    ``output_map`` is a sequence of (label, graph output name, channel). Rank-4
    outputs give their ``channel``; rank-3 outputs are taken as they are. Only the
    first ``rows`` rows are kept (padding rows are dropped). The arrays are views
    when possible; copy them if the source buffer is reused.
    """
    out: dict[str, np.ndarray] = {}
    for label, gname, ch in output_map:
        arr = raw[gname]
        if rows is not None:
            arr = arr[:rows]
        if arr.ndim == 4:
            if ch >= arr.shape[1]:
                raise BackendError(f"output {gname!r} has {arr.shape[1]} channel(s); "
                                   f"channel {ch} ({label}) does not exist")
            arr = arr[:, ch]
        elif arr.ndim != 3:
            raise BackendError(f"output {gname!r} has shape {arr.shape}; expected (n, h, w) or (n, c, h, w)")
        out[label] = arr if arr.dtype == np.float32 else arr.astype(np.float32)
    return out
