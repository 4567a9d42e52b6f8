"""PyTorch on CUDA: the ONNX file as a torch module, fp16, CUDA graphs.

A model written by ``ptychostream train`` records its layout, so the module is rebuilt from the
one network definition (:func:`ptychostream.model.network.net_from_onnx`) with the file's
weights; any other ONNX file is converted with onnx2torch.

One CUDA graph is captured per batch bucket (powers of two up to the batch size,
or the fixed ONNX batch); a chunk is padded up to its bucket. onnx2torch's Resize
module calls ``scales.tolist()`` on every forward, which syncs with the host and
breaks graph capture, so Resize modules whose scales/sizes are constants are
replaced by a frozen ``F.interpolate`` after conversion.

torch and onnx2torch are imported lazily: importing this module never fails, and a machine
without an NVIDIA driver is told so without importing torch (which takes seconds).
"""

from __future__ import annotations

import operator
import warnings
from typing import Any

import numpy as np

from ptychostream.model.backends import (
    BackendError,
    check_input,
    cuda_driver_reason,
    probe_reason,
    split_outputs,
)
from ptychostream.model.info import ModelInfo
from ptychostream.model.network import NetworkError, net_from_onnx

__all__ = ["TorchCudaBackend", "open", "unavailable_reason", "freeze_resize"]

NAME = "PyTorch-CUDA"


def _import(cuda: bool = True) -> Any:
    """torch, checked to see a CUDA GPU when ``cuda``; BackendError why not."""
    if cuda:
        reason = cuda_driver_reason()
        if reason:
            raise BackendError(reason)
    try:
        import torch
    except ImportError as exc:
        raise BackendError(f"PyTorch is not installed: {exc}") from None
    if cuda and not torch.cuda.is_available():
        raise BackendError("no CUDA GPU (torch.cuda.is_available() is False)")
    return torch


def unavailable_reason() -> str | None:
    """None when torch sees a CUDA GPU, else why not."""
    return probe_reason(_import)


def to_module(model: ModelInfo) -> tuple[Any, str]:
    """(torch module, converter name) for an ONNX model: the network definition's own module
    when the file records its layout, else onnx2torch."""
    layout = (model.training or {}).get("net")
    if isinstance(layout, dict):
        try:
            return net_from_onnx(model.path, layout), "ptychostream"
        except NetworkError:
            pass  # edited or foreign weights: let onnx2torch read the graph as it is
    try:
        import onnx2torch
    except ImportError as exc:
        raise BackendError(f"{model.path} was not written by ptychostream train; converting it needs "
                           f"onnx2torch (pip install onnx2torch): {exc}") from None
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return onnx2torch.convert(onnx.load(model.path)), "onnx2torch"


def _constant_of(gm, node):
    """The tensor a graph argument always holds, or None if it is not a constant."""
    import torch

    if not hasattr(node, "op"):
        return node if isinstance(node, torch.Tensor) else None
    if node.op == "get_attr":
        return operator.attrgetter(node.target)(gm)
    if node.op == "call_module" and not node.args and not node.kwargs:
        value = getattr(gm.get_submodule(node.target), "value", None)  # onnx2torch OnnxConstant
        return value if isinstance(value, torch.Tensor) else None
    return None


def freeze_resize(gm) -> int:
    """Replace onnx2torch Resize modules having constant scales/sizes; returns how many."""
    import torch
    import torch.nn.functional as F

    class FrozenResize(torch.nn.Module):
        def __init__(self, scale_factor, size, mode, align_corners):
            super().__init__()
            self.scale_factor, self.size = scale_factor, size
            self.mode, self.align_corners = mode, align_corners

        def forward(self, x, *_args, **_kwargs):
            return F.interpolate(x, size=self.size, scale_factor=self.scale_factor,
                                 mode=self.mode, align_corners=self.align_corners)

    modes = {("nearest", 2): "nearest", ("linear", 1): "linear", ("linear", 2): "bilinear",
             ("linear", 3): "trilinear", ("cubic", 2): "bicubic"}
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        inner = getattr(mod, "_resize", mod)  # OnnxResizeV10 wraps an OnnxResize
        if type(inner).__name__ != "OnnxResize":
            continue
        names = ("roi", "scales", "sizes") if inner is mod else ("scales",)
        args = dict(zip(names, node.args[1:]))
        args.update({k: v for k, v in node.kwargs.items() if k in names})
        consts = {k: _constant_of(gm, v) for k, v in args.items() if v is not None}
        if any(v is None for v in consts.values()):
            continue  # computed at run time: leave it alone
        scales, sizes = consts.get("scales"), consts.get("sizes")
        scale_factor: tuple[float, ...] | None = None
        size: tuple[int, ...] | None = None
        if sizes is not None and sizes.numel():
            size = tuple(int(s) for s in sizes.tolist()[2:])
            rank = len(size)
        elif scales is not None and scales.numel():
            vals = [float(s) for s in scales.tolist()]
            if vals[:2] != [1.0, 1.0]:
                continue
            scale_factor = tuple(vals[2:])
            rank = len(scale_factor)
        else:
            continue
        mode = modes.get((inner.onnx_mode, rank))
        if mode is None:
            continue
        align = inner.align_corners if mode != "nearest" else None
        parent, _, leaf = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, leaf,
                FrozenResize(scale_factor, size, mode, align))
        count += 1
    return count


class TorchCudaBackend:
    name = NAME

    def __init__(self, model: ModelInfo, batch_size: int = 64, half: bool = True,
                 cuda_graphs: bool = True, device: str = "cuda", **_ignored: Any) -> None:
        cuda = not str(device).startswith("cpu")  # device="cpu" (fp32, no graphs) checks the module
        torch = _import(cuda)
        if model.kind != "onnx":
            raise BackendError(f"{NAME} converts ONNX files, not {model.path}")
        self._torch = torch
        self.device = torch.device(device)
        self.half = bool(half)
        self._dtype = torch.float16 if self.half else torch.float32
        net, self.converter = to_module(model)
        self.frozen_resizes = freeze_resize(net) if self.converter == "onnx2torch" else 0
        self._net = net.eval().to(self.device, self._dtype)
        self.input_shape = tuple(model.input_shape)
        self.fixed_batch = model.fixed_batch
        self.outputs = tuple(label for label, _, _ in model.output_map)
        self._map = model.output_map
        self._names = [o for o in _graph_output_names(model)]
        self._in_rest = ((1,) if model.input_rank == 4 else ()) + self.input_shape
        if self.fixed_batch:
            self._buckets = [self.fixed_batch]
        else:
            top = max(1, int(batch_size))
            self._buckets = sorted({min(1 << k, top) for k in range(top.bit_length() + 1)})
        self._chunk = self._buckets[-1]
        self._host = torch.empty((self._chunk, *self._in_rest), dtype=torch.float32)
        if cuda:
            self._host = self._host.pin_memory()
        self._graphs: dict[int, tuple] = {}
        self.cuda_graphs = bool(cuda_graphs) and cuda
        with torch.inference_mode():
            for b in self._buckets:
                self._prepare(b)

    def _forward(self, x):
        out = self._net(x)
        if isinstance(out, dict):
            out = [out[k] for k in self._names]
        elif not isinstance(out, (list, tuple)):
            out = [out]
        return [o.float() for o in out]

    def _prepare(self, b: int) -> None:
        torch = self._torch
        static_in = torch.zeros((b, *self._in_rest), device=self.device, dtype=self._dtype)
        if not self.cuda_graphs:
            self._forward(static_in)
            self._graphs[b] = (None, static_in, None)
            return
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm up (cuDNN autotune, allocator) outside the capture
                self._forward(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._forward(static_in)
        self._graphs[b] = (graph, static_in, static_out)

    def _run_chunk(self, part: np.ndarray) -> dict[str, np.ndarray]:
        m = part.shape[0]
        b = next(k for k in self._buckets if k >= m)
        graph, static_in, static_out = self._graphs[b]
        host = self._host[:m]
        host.numpy()[...] = part.reshape(m, *self._in_rest)
        static_in[:m].copy_(host, non_blocking=True)
        if m < b:
            static_in[m:].zero_()
        if graph is not None:
            graph.replay()
            outs = static_out
        else:
            outs = self._forward(static_in)
        raw = {name: o[:m].cpu().numpy() for name, o in zip(self._names, outs)}
        return split_outputs(raw, self._map)

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = check_input(x, self.input_shape)
        n = x.shape[0]
        result: dict[str, np.ndarray] = {}
        with self._torch.inference_mode():
            for start in range(0, n, self._chunk):
                got = self._run_chunk(x[start:start + self._chunk])
                if n <= self._chunk:
                    return {k: np.ascontiguousarray(v) for k, v in got.items()}
                for label, arr in got.items():
                    if label not in result:
                        result[label] = np.empty((n, *arr.shape[1:]), dtype=np.float32)
                    result[label][start:start + arr.shape[0]] = arr
        return result

    def close(self) -> None:
        self._graphs.clear()
        self._net = None
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()


def _graph_output_names(model: ModelInfo) -> list[str]:
    """Graph output names in graph order (onnx2torch returns outputs in that order)."""
    import onnx

    m = onnx.load(model.path, load_external_data=False)
    return [o.name for o in m.graph.output]


def open(model: ModelInfo, batch_size: int = 64, **opts: Any) -> TorchCudaBackend:
    return TorchCudaBackend(model, batch_size=batch_size, **opts)
