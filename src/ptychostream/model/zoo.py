"""Real PtychoNN-class ONNX networks built with ``onnx.helper`` and numpy (no torch).

Used by tests, benchmarks and demos. The graph is the layout of
:class:`ptychostream.model.network.NetLayout` as a PyTorch export of it looks (BatchNorm
folded): an encoder of ``depth`` blocks [Conv3×3+ReLU ×2, MaxPool 2] with base·2^k channels,
optionally a Slice to the central bottleneck cells, then one decoder per head of ``depth``
blocks [Conv3×3+ReLU ×2, bilinear Resize ×2] and a Conv3×3 to one channel; the phase head
ends in tanh·π, the amplitude head in a sigmoid. Weights are He-initialised from ``seed``,
so the outputs are deterministic but meaningless.

``build_ptychonn_onnx(path, size=128, heads=("phase",), base_channels=16, depth=4)``
is the "PtychoNN 2.0" edge network (733,921 parameters); with
``fixed_batch=8, input_name="input.1"`` it mimics the third-party edge export.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ptychostream.model.info import count_parameters
from ptychostream.model.network import NetLayout

__all__ = ["build_ptychonn_onnx", "build_bounded_onnx", "param_count", "ir_version_for"]

def param_count(path: str | Path) -> int:
    """Number of learned parameters in the ONNX file at ``path`` (see :func:`ptychostream.model.info.count_parameters`)."""
    return count_parameters(onnx.load(str(path), load_external_data=False))


class _GraphBuilder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def init(self, prefix: str, arr: np.ndarray) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: Sequence[str], prefix: str | None = None,
             output: str | None = None, **attrs: Any) -> str:
        out = output or self.name(prefix or op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.name(op), **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, gain: float = 1.0) -> str:
        std = gain * math.sqrt(2.0 / (cin * 9))
        w = (self.rng.standard_normal((cout, cin, 3, 3)) * std).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        return self.node("Conv", [x, self.init("W", w), self.init("B", b)], "conv",
                         kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])

    def conv_relu(self, x: str, cin: int, cout: int) -> str:
        return self.node("Relu", [self.conv(x, cin, cout)], "relu")


def ir_version_for(opset: int) -> int:
    """The oldest ONNX IR version that carries ``opset``, so that older runtimes and parsers load the file."""
    if opset <= 15:
        return 8 if opset >= 15 else 7
    if opset <= 17:
        return 8
    if opset <= 19:
        return 9
    return min(onnx.IR_VERSION, 10)


def build_ptychonn_onnx(
    path: str | Path,
    size: int = 128,
    heads: Sequence[str] = ("phase",),
    base_channels: int = 16,
    depth: int = 4,
    fixed_batch: int | None = None,
    input_name: str = "input",
    input_rank: int = 4,
    seed: int = 0,
    metadata: dict[str, Any] | None = None,
    opset: int = 17,
    output_names: Sequence[str] | None = None,
    concat_heads: bool = False,
    output_rank: int = 4,
    name: str = "ptychonn",
    output_size: int | None = None,
) -> str:
    """Write a PtychoNN-class ONNX model to ``path`` and return the path as a string.

    The layout is :class:`~ptychostream.model.network.NetLayout` ``(size, base_channels, depth,
    heads, output_size)`` (``output_size`` < ``size``: the decoders start from the central cells
    of the bottleneck and give the central output_size² pixels).
    ``heads``: any of "phase"/"amplitude" in graph-output order. ``output_names``
    renames the graph outputs (default: the head names). ``concat_heads`` puts the
    heads into one (n, len(heads), h, w) output named "output" instead.
    ``output_rank`` 3 squeezes the channel axis of each (single-channel) output.
    ``metadata`` goes to ``metadata_props``; non-string values are JSON-encoded.
    """
    layout = NetLayout(size, base_channels, depth, tuple(heads), output_size, batchnorm=False)
    heads, out = layout.heads, layout.out_size
    if input_rank not in (3, 4):
        raise ValueError(f"input_rank must be 3 or 4, got {input_rank}")
    if output_rank not in (3, 4):
        raise ValueError(f"output_rank must be 3 or 4, got {output_rank}")
    if concat_heads and output_rank != 4:
        raise ValueError("concat_heads needs output_rank 4")
    n_out = 1 if concat_heads else len(heads)
    if output_names is None:
        output_names = ("output",) if concat_heads else heads
    output_names = tuple(output_names)
    if len(output_names) != n_out:
        raise ValueError(f"need {n_out} output name(s), got {output_names}")

    g = _GraphBuilder(np.random.default_rng(seed))
    batch: int | str = int(fixed_batch) if fixed_batch else "N"
    in_shape = [batch, 1, size, size] if input_rank == 4 else [batch, size, size]
    x = input_name
    if input_rank == 3:
        x = g.node("Unsqueeze", [x, g.init("axes", np.array([1], dtype=np.int64))], "unsq")

    for cin, c in layout.encoder_blocks:
        x = g.conv_relu(x, cin, c)
        x = g.conv_relu(x, c, c)
        x = g.node("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    if layout.skip:
        lo, hi = layout.skip, layout.skip + layout.cells
        x = g.node("Slice", [x, g.init("starts", np.array([lo, lo], dtype=np.int64)),
                             g.init("ends", np.array([hi, hi], dtype=np.int64)),
                             g.init("axes", np.array([2, 3], dtype=np.int64))], "crop")
    encoded = x

    scales = g.init("scales", np.array([1.0, 1.0, 2.0, 2.0], dtype=np.float32))
    pi = g.node("Constant", [], "pi", value=numpy_helper.from_array(np.array(np.pi, dtype=np.float32)))
    activations = {"tanh_pi": lambda y: g.node("Mul", [g.node("Tanh", [y], "tanh"), pi], "phase"),
                   "sigmoid": lambda y: g.node("Sigmoid", [y], "amp")}
    head_out: list[str] = []
    for head in heads:
        x = encoded
        for cin, c in layout.decoder_blocks:
            x = g.conv_relu(x, cin, c)
            x = g.conv_relu(x, c, c)
            x = g.node("Resize", [x, "", scales], "up", mode="linear",
                       coordinate_transformation_mode="half_pixel")
        x = g.conv(x, layout.channels[0], 1, gain=0.3)
        head_out.append(activations[layout.activation(head)](x))

    if concat_heads:
        g.node("Concat", head_out, output=output_names[0], axis=1)
        out_shapes = [[batch, len(heads), out, out]]
    else:
        out_shapes = []
        for x, oname in zip(head_out, output_names):
            if output_rank == 3:
                g.node("Squeeze", [x, g.init("axes", np.array([1], dtype=np.int64))], output=oname)
                out_shapes.append([batch, out, out])
            else:
                g.node("Identity", [x], output=oname)
                out_shapes.append([batch, 1, out, out])

    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(output_names, out_shapes)],
        initializer=g.inits,
    )
    return _save(graph, path, opset, metadata)


def build_bounded_onnx(path: str | Path, size: int = 128, limit: float = 100.0, opset: int = 17,
                       metadata: dict[str, Any] | None = None) -> str:
    """Write a model that is only defined for inputs up to ``limit``: phase = sqrt(limit − x).

    Its output is finite where every input pixel is at most ``limit`` and NaN wherever one is
    above, as a network whose activations overflow outside its training range would do. With
    the default limit it passes the self-test (Poisson(4) counts) and gives NaN on real
    diffraction frames, whose central speckle holds thousands of photons: the fault tests use it.
    """
    g = _GraphBuilder(np.random.default_rng(0))
    c = g.init("limit", np.array(limit, dtype=np.float32))
    g.node("Sqrt", [g.node("Sub", [c, "input"], "headroom")], output="phase")
    shape: list[int | str] = ["N", int(size), int(size)]
    graph = helper.make_graph(g.nodes, "bounded", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("phase", TensorProto.FLOAT, shape)],
                              initializer=g.inits)
    return _save(graph, path, opset, {"ptychostream.name": "bounded", **(metadata or {})})


def _save(graph: onnx.GraphProto, path: str | Path, opset: int, metadata: dict[str, Any] | None) -> str:
    """Check ``graph`` as a model of ``opset`` with ``metadata`` and write it to ``path``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="ptychostream.modelzoo")
    model.ir_version = ir_version_for(opset)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key = str(key)
        entry.value = value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="write a PtychoNN-class ONNX model")
    ap.add_argument("path")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--heads", default="phase", help="comma list of phase,amplitude")
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--output-size", type=int, default=None, help="central output patch (default: --size)")
    ap.add_argument("--fixed-batch", type=int, default=None)
    ap.add_argument("--input-name", default="input")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    p = build_ptychonn_onnx(a.path, size=a.size, heads=tuple(a.heads.split(",")),
                            base_channels=a.base_channels, depth=a.depth,
                            fixed_batch=a.fixed_batch, input_name=a.input_name, seed=a.seed,
                            output_size=a.output_size)
    print(f"{p}: {param_count(p):,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
