"""GPU probes that import no GPU framework until they are called.

What the model files (:mod:`ptychostream.model.info`) and the backends share below the
backends: the error a backend raises, the CUDA driver probe, TensorRT's import and the I/O of
a serialised TensorRT engine (read for an engine file that has no ONNX beside it).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BackendError", "cuda_driver_reason", "import_tensorrt", "trt_logger", "engine_io", "inspect_engine"]


class BackendError(Exception):
    """A backend cannot be opened or run here; the message says why."""


@functools.lru_cache(maxsize=1)
def cuda_driver_reason() -> str | None:
    """Why no CUDA GPU can be used here, found without importing a GPU framework; None if a
    driver library is present (the GPU backends then check the device themselves)."""
    import ctypes
    import ctypes.util

    for lib in ("libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not lib:
            continue
        try:
            ctypes.CDLL(lib)
            return None
        except OSError:
            continue
    return "no CUDA GPU (no NVIDIA driver library libcuda found)"


def import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, pycuda.driver) with pycuda initialised on a machine with a GPU; BackendError why not."""
    reason = cuda_driver_reason()
    if reason and importlib.util.find_spec("tensorrt") is not None:
        raise BackendError(reason)
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(f"TensorRT is not installed: {exc}") from None
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        raise BackendError(f"TensorRT needs pycuda, which is not installed: {exc}") from None
    try:
        cuda.init()
        count = cuda.Device.count()
    except Exception as exc:  # pycuda.driver.Error and friends
        raise BackendError(f"no CUDA GPU: {exc}") from None
    if count < 1:
        raise BackendError("no CUDA GPU")
    return trt, cuda


def trt_logger(trt: Any) -> Any:
    """A TensorRT logger that reports warnings and errors."""
    return trt.Logger(trt.Logger.WARNING)


def engine_io(engine: Any, trt: Any) -> dict[str, Any]:
    """{"inputs": [(name, dims, dtype)], "outputs": [...]} of a deserialised engine (one input)."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dims = tuple(int(d) for d in engine.get_tensor_shape(name))
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append((name, dims, dtype))
        else:
            outputs.append((name, dims, dtype))
    if len(inputs) != 1:
        raise BackendError(f"the engine has {len(inputs)} inputs; expected 1")
    return {"inputs": inputs, "outputs": outputs}


def inspect_engine(path: str) -> dict[str, Any]:
    """Input name/shape and output names/shapes of a serialised engine (None = dynamic)."""
    trt, cuda = import_tensorrt()
    ctx = cuda.Device(0).retain_primary_context()
    ctx.push()
    try:
        engine = trt.Runtime(trt_logger(trt)).deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise BackendError(f"{path} was built for another GPU or TensorRT version "
                               f"(this is TensorRT {trt.__version__})")
        io = engine_io(engine, trt)
        (name, dims, _), = io["inputs"]

        def fix(ds: tuple[int, ...]) -> list[int | None]:
            return [d if d > 0 else None for d in ds]

        return {"input_name": name, "input_shape": fix(dims),
                "outputs": [(n, fix(d)) for n, d, _ in io["outputs"]]}
    finally:
        ctx.pop()
