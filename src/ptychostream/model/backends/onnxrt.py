"""ONNX Runtime on the CPU: the backend that runs everywhere.

Handles fixed and dynamic batch dims (partial batches are zero-padded into one
reused buffer, larger ones split into chunks), any input name, input rank 3 or 4,
and one or two outputs of rank 3 or 4 (see :func:`ptychostream.model.backends.split_outputs`).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ptychostream.model.backends import BackendError, check_input, split_outputs
from ptychostream.model.info import ModelInfo

__all__ = ["OnnxRuntimeBackend", "open", "unavailable_reason"]

NAME = "ONNXRuntime-CPU"


def unavailable_reason() -> str | None:
    """None when onnxruntime can be imported, else why not."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed: {exc}"
    return None


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeBackend:
    name = NAME

    def __init__(self, model: ModelInfo, batch_size: int = 64, threads: int | None = None,
                 spinning: bool | None = None, **_ignored: Any) -> None:
        """``threads``: intra-op threads (default: every core this process may use).
        ``spinning``: let idle worker threads spin-wait (ONNX Runtime's default, None);
        False frees the cores for other threads of a busy server between batches."""
        import onnxruntime as ort

        if model.kind != "onnx":
            raise BackendError(f"{NAME} runs ONNX files, not {model.path}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads) if threads else _default_threads()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if spinning is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self._sess = ort.InferenceSession(model.path, sess_options=so, providers=["CPUExecutionProvider"])
        inputs = self._sess.get_inputs()
        if len(inputs) != 1:
            raise BackendError(f"{model.path}: ONNX Runtime sees {len(inputs)} inputs, expected 1")
        self._in_name = inputs[0].name
        self._in_dtype = np.float16 if "float16" in inputs[0].type else np.float32
        self.threads = so.intra_op_num_threads
        self.input_shape = tuple(model.input_shape)
        self.fixed_batch = model.fixed_batch
        self.outputs = tuple(label for label, _, _ in model.output_map)
        self._map = model.output_map
        self._names = list(dict.fromkeys(g for _, g, _ in model.output_map))
        self._rank4 = model.input_rank == 4
        self._chunk = self.fixed_batch or max(1, int(batch_size))
        self._pad: np.ndarray | None = None
        self._pad_used = 0

    def _run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if self._rank4:
            x = x.reshape(x.shape[0], 1, *x.shape[1:])
        res = self._sess.run(self._names, {self._in_name: x})
        return dict(zip(self._names, res))

    def _padded(self, part: np.ndarray, batch: int) -> np.ndarray:
        """``part`` in the first rows of the reused fixed-batch buffer of ``batch`` rows, zeros after."""
        m = part.shape[0]
        if self._pad is None:
            self._pad = np.zeros((batch, *self.input_shape), dtype=self._in_dtype)
        self._pad[:m] = part
        if self._pad_used > m:
            self._pad[m:self._pad_used] = 0
        self._pad_used = m
        return self._pad

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = check_input(x, self.input_shape)
        if self._in_dtype != np.float32:
            x = x.astype(self._in_dtype)
        n = x.shape[0]
        fixed = self.fixed_batch
        if n == fixed or (fixed is None and n <= self._chunk):
            return {k: np.ascontiguousarray(v) for k, v in split_outputs(self._run(x), self._map).items()}
        result: dict[str, np.ndarray] = {}
        for start in range(0, n, self._chunk):
            part = x[start:start + self._chunk]
            m = part.shape[0]
            feed = self._padded(part, fixed) if fixed and m < fixed else part
            got = split_outputs(self._run(feed), self._map, rows=m)
            for label, arr in got.items():
                if label not in result:
                    result[label] = np.empty((n, *arr.shape[1:]), dtype=np.float32)
                result[label][start:start + m] = arr
        return result

    def close(self) -> None:
        self._sess = None
        self._pad = None


def open(model: ModelInfo, batch_size: int = 64, **opts: Any) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(model, batch_size=batch_size, **opts)
