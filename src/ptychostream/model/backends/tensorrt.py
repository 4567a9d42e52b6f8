"""TensorRT 10 + pycuda backend.

The engine is built from the ONNX file once and cached beside it as
``model.onnx.<gpu>-sm<cc>-trt<version>-<precision>-b<batch>-<sha256[:16]>.engine``, so a
restart or a swap back to a known model deserialises in well under a second. A
ready ``.engine``/``.plan`` file may be given instead. Two sets of pinned host and
device buffers, each with its own stream and execution context, alternate between
chunks so copies of one chunk overlap compute of the other.

tensorrt and pycuda are imported lazily (:func:`ptychostream.model.gpu.import_tensorrt`): importing
this module never fails.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.model.backends import (
    BackendError,
    check_input,
    probe_reason,
    split_outputs,
)
from ptychostream.model.gpu import engine_io, import_tensorrt, trt_logger
from ptychostream.model.info import ModelInfo, load_model_file

__all__ = ["TensorRTBackend", "open", "unavailable_reason", "engine_key", "engine_cache_path"]

NAME = "TensorRT"
_log = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """None when TensorRT, pycuda and a GPU are there, else why not."""
    return probe_reason(import_tensorrt)


def engine_key(trt, cuda, precision: str, sha256: str, batch: int | None) -> str:
    dev = cuda.Device(0)
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", dev.name()).strip("-")
    major, minor = dev.compute_capability()
    b = f"b{batch}" if batch else "bfixed"
    return f"{gpu}-sm{major}{minor}-trt{trt.__version__}-{precision}-{b}-{sha256[:16]}"


def engine_cache_path(onnx_path: str, key: str) -> Path:
    """``<onnx>.<key>.engine`` beside the model, or in ~/.cache if that folder is read-only."""
    p = Path(onnx_path)
    if os.access(p.parent, os.W_OK):
        return p.with_name(f"{p.name}.{key}.engine")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ptychostream"
    cache.mkdir(parents=True, exist_ok=True)
    return cache / f"{p.name}.{key}.engine"


def _build(trt, onnx_path: str, precision: str, input_name: str, input_dims: tuple,
           batch: int | None) -> bytes:
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 1 << 30)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "tf32":
        config.set_flag(trt.BuilderFlag.TF32)
    else:
        config.clear_flag(trt.BuilderFlag.TF32)
    if batch:  # dynamic batch dim: one profile 1..batch
        rest = tuple(input_dims[1:])
        profile = builder.create_optimization_profile()
        profile.set_shape(input_name, (1, *rest), (batch, *rest), (batch, *rest))
        config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise BackendError(f"TensorRT could not build an engine from {onnx_path} (see the log)")
    return bytes(blob)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class TensorRTBackend:
    name = NAME

    def __init__(self, model: ModelInfo, batch_size: int = 64, precision: str = "fp16",
                 rebuild: bool = False, **_ignored: Any) -> None:
        trt, cuda = import_tensorrt()
        if precision not in ("fp16", "tf32", "fp32"):
            raise BackendError(f"precision must be fp16, tf32 or fp32, not {precision!r}")
        self._cuda = cuda
        self._ctx = cuda.Device(0).retain_primary_context()
        self._ctx.push()
        try:
            self.engine_path, self.built = self._engine(trt, cuda, model, precision, batch_size, rebuild)
            self._setup(trt, model, batch_size)
        finally:
            self._ctx.pop()
        self.precision = precision
        self.input_shape = tuple(model.input_shape)
        self.outputs = tuple(label for label, _, _ in model.output_map)
        self._map = model.output_map

    def _engine(self, trt, cuda, model, precision, batch_size, rebuild):
        """(engine path, whether it was built now); leaves self._engine_obj deserialised."""
        runtime = trt.Runtime(trt_logger(trt))
        self._runtime = runtime
        if model.kind == "engine":
            engine = runtime.deserialize_cuda_engine(Path(model.path).read_bytes())
            if engine is not None:
                self._engine_obj = engine
                return model.path, False
            if not model.onnx_path:
                raise BackendError(f"{model.path} was built for another GPU or TensorRT version "
                                   f"(this is TensorRT {trt.__version__}) and no ONNX file is beside "
                                   "it to rebuild from")
            _log.warning("%s does not fit this GPU/TensorRT; rebuilding from %s", model.path, model.onnx_path)
        onnx_info = model if model.kind == "onnx" else load_model_file(model.onnx_path)
        batch = None if onnx_info.fixed_batch else int(batch_size)
        key = engine_key(trt, cuda, precision, onnx_info.sha256, batch)
        path = engine_cache_path(onnx_info.path, key)
        if path.is_file() and not rebuild:
            engine = runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is not None:
                self._engine_obj = engine
                return str(path), False
            _log.warning("cached engine %s does not deserialise; rebuilding", path)
        dims = (onnx_info.fixed_batch or -1,) + ((1,) if onnx_info.input_rank == 4 else ()) \
            + tuple(onnx_info.input_shape)
        blob = _build(trt, onnx_info.path, precision, onnx_info.input_name, dims, batch)
        try:
            _write_atomic(path, blob)
        except OSError as exc:
            _log.warning("cannot cache the engine at %s: %s", path, exc)
        engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise BackendError("TensorRT built an engine it cannot deserialise")
        self._engine_obj = engine
        return str(path), True

    def _setup(self, trt, model, batch_size: int) -> None:
        cuda, engine = self._cuda, self._engine_obj
        io = engine_io(engine, trt)
        (self._in_name, in_dims, self._in_dtype), = io["inputs"]
        dynamic = in_dims[0] < 0
        if dynamic:
            _, _, mx = engine.get_tensor_profile_shape(self._in_name, 0)
            self._chunk = min(int(batch_size), int(mx[0]))
            self.fixed_batch = None
        else:
            self._chunk = self.fixed_batch = int(in_dims[0])
        self._in_rest = tuple(in_dims[1:])
        self._slots = []
        for _ in range(2):  # double buffering
            ctx = engine.create_execution_context()
            full = (self._chunk, *self._in_rest)
            if dynamic:
                ctx.set_input_shape(self._in_name, full)
            h_in = cuda.pagelocked_empty(full, self._in_dtype)
            h_in.fill(0)
            d_in = cuda.mem_alloc(h_in.nbytes)
            ctx.set_tensor_address(self._in_name, int(d_in))
            outs = {}
            for name, _, dtype in io["outputs"]:
                shape = tuple(ctx.get_tensor_shape(name))
                h = cuda.pagelocked_empty(shape, dtype)
                d = cuda.mem_alloc(h.nbytes)
                ctx.set_tensor_address(name, int(d))
                outs[name] = (h, d)
            self._slots.append({"ctx": ctx, "stream": cuda.Stream(), "h_in": h_in, "d_in": d_in,
                                "outs": outs, "rows": 0, "dst": None, "used": 0})
        self._turn = 0

    def _enqueue(self, slot, part: np.ndarray, dst: int) -> None:
        cuda, m = self._cuda, part.shape[0]
        h_in = slot["h_in"]
        h_in[:m] = part.reshape(m, *self._in_rest)
        if self.fixed_batch:
            if slot["used"] > m:
                h_in[m:slot["used"]] = 0  # padding rows: zeros, not stale frames
            slot["used"] = m
            rows = self.fixed_batch
        else:
            rows = m
            slot["ctx"].set_input_shape(self._in_name, (m, *self._in_rest))
        stream = slot["stream"]
        cuda.memcpy_htod_async(slot["d_in"], h_in[:rows], stream)
        if not slot["ctx"].execute_async_v3(stream.handle):
            raise BackendError("TensorRT execute_async_v3 failed")
        for h, d in slot["outs"].values():
            cuda.memcpy_dtoh_async(h[:rows], d, stream)
        slot["rows"], slot["dst"] = m, dst

    def _harvest(self, slot, result: dict[str, np.ndarray], n: int) -> None:
        if slot["dst"] is None:
            return
        slot["stream"].synchronize()
        m, start = slot["rows"], slot["dst"]
        got = split_outputs({k: h for k, (h, _) in slot["outs"].items()}, self._map, rows=m)
        for label, arr in got.items():
            if label not in result:
                result[label] = np.empty((n, *arr.shape[1:]), dtype=np.float32)
            result[label][start:start + m] = arr
        slot["dst"] = None

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = check_input(x, self.input_shape)
        if self._in_dtype != np.float32:
            x = x.astype(self._in_dtype)
        n = x.shape[0]
        result: dict[str, np.ndarray] = {}
        self._ctx.push()
        try:
            for start in range(0, n, self._chunk):
                slot = self._slots[self._turn]
                self._turn ^= 1
                self._harvest(slot, result, n)  # free the slot before refilling it
                self._enqueue(slot, x[start:start + self._chunk], start)
            for slot in self._slots:
                self._harvest(slot, result, n)
        finally:
            for slot in self._slots:
                slot["dst"] = None
            self._ctx.pop()
        return result

    def close(self) -> None:
        if not getattr(self, "_slots", None):  # never set up, or closed already
            return
        self._ctx.push()
        try:
            for slot in self._slots:
                slot["stream"].synchronize()
                slot["d_in"].free()
                for _, d in slot["outs"].values():
                    d.free()
            self._slots = []
            self._engine_obj = None
            self._runtime = None
        finally:
            self._ctx.pop()


def open(model: ModelInfo, batch_size: int = 64, **opts: Any) -> TensorRTBackend:
    return TensorRTBackend(model, batch_size=batch_size, **opts)
