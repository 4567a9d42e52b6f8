"""The one PtychoNN-class network definition.

:class:`NetLayout` holds the architecture once: an encoder of ``depth`` blocks [conv3×3(+BN)+ReLU ×2,
max-pool 2] with base·2^k channels; optionally the central cells of the bottleneck
(``output_size`` < ``size``); one decoder per head of ``depth`` blocks [conv3×3(+BN)+ReLU ×2,
bilinear ×2] and a conv3×3 to one channel; phase = tanh·π, amplitude = sigmoid.

:func:`build_net` makes the PyTorch module of a layout (training, and the PyTorch backend through
:func:`net_from_onnx`), :func:`ptychostream.model.zoo.build_ptychonn_onnx` writes the same graph
with ``onnx.helper``.  torch and onnx are imported on first use: importing this module is cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    "HEADS", "HEAD_ACTIVATIONS", "NetworkError", "NetLayout", "import_torch", "build_net", "torch_net",
    "read_onnx", "load_conv_weights", "net_from_onnx",
]

#: the heads a network may have, in the graph order of the exports (PtychoNN's)
HEADS: tuple[str, ...] = ("amplitude", "phase")

#: the activation that ends each head: "tanh_pi" = tanh·π (phase in (−π, π)), "sigmoid" (amplitude in (0, 1))
HEAD_ACTIVATIONS: dict[str, str] = {"amplitude": "sigmoid", "phase": "tanh_pi"}


class NetworkError(ValueError):
    """A network layout, or weights that do not fit it; the message says what is wrong."""


@dataclass(frozen=True)
class NetLayout:
    """The architecture of a PtychoNN-class network (see the module docstring), validated.

    ``output_size`` None means ``size``; it is stored resolved, so :attr:`out_size` is always set.
    ``batchnorm`` puts a BatchNorm after every conv3×3 but the last ones (training only: the
    export folds it into the convs, and the ONNX graph has the plain conv/ReLU layout either way).
    """

    size: int = 128
    base_channels: int = 16
    depth: int = 4
    heads: tuple[str, ...] = HEADS
    output_size: int | None = None
    batchnorm: bool = True
    #: the amplitude head's sigmoid times this (amplitudes up to it; > 1 for samples that amplify
    #: or for iterative labels not normalised to 1); the export writes the same Mul
    amplitude_scale: float = 1.0

    def __post_init__(self) -> None:
        heads = tuple(self.heads)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "output_size", self.size if self.output_size is None else int(self.output_size))
        if not heads or len(set(heads)) != len(heads) or not set(heads) <= set(HEADS):
            raise NetworkError(f"heads must be distinct names from {HEADS}, got {heads}")
        if self.base_channels < 1:
            raise NetworkError(f"base_channels must be at least 1, got {self.base_channels}")
        if not (math.isfinite(self.amplitude_scale) and self.amplitude_scale > 0):
            raise NetworkError(f"amplitude_scale must be a positive number, got {self.amplitude_scale}")
        if self.depth < 1 or self.size % self.cell:
            raise NetworkError(f"input size {self.size} must be divisible by 2**depth = {2 ** self.depth}")
        out, cell = self.out_size, self.cell
        if out < cell or out > self.size or out % cell or (self.size - out) % (2 * cell):
            raise NetworkError(f"output size {out} must be a multiple of {cell} (2**depth) between {cell} and "
                               f"{self.size}, centred (input − output a multiple of {2 * cell})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], batchnorm: bool | None = None) -> NetLayout:
        """The layout a :meth:`config` dict describes (the ``net`` entry of a model's training
        metadata); ``batchnorm`` overrides the recorded one.  NetworkError if it is unusable."""
        try:
            layout = cls(int(config["size"]), int(config["base_channels"]), int(config["depth"]),
                         tuple(config["heads"]), int(config["output_size"]), bool(config.get("batchnorm", True)),
                         float(config.get("amplitude_scale", 1.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise NetworkError(f"unusable network layout {dict(config)!r} ({exc})") from None
        return layout if batchnorm is None else replace(layout, batchnorm=batchnorm)

    def config(self) -> dict[str, Any]:
        """The layout as plain JSON types (recorded in the model metadata; :meth:`from_config` reads it)."""
        out = {"size": self.size, "base_channels": self.base_channels, "depth": self.depth,
               "heads": list(self.heads), "output_size": self.out_size, "batchnorm": bool(self.batchnorm)}
        if self.amplitude_scale != 1.0:
            out["amplitude_scale"] = float(self.amplitude_scale)
        return out

    @property
    def out_size(self) -> int:
        """Side of each output patch in pixels."""
        return self.size if self.output_size is None else self.output_size

    @property
    def cell(self) -> int:
        """Input pixels per bottleneck cell: 2**depth."""
        return 2 ** self.depth

    @property
    def channels(self) -> tuple[int, ...]:
        """Channels of the encoder blocks, base·2^k for k < depth (the decoders run them backwards)."""
        return tuple(self.base_channels * 2 ** k for k in range(self.depth))

    @property
    def encoder_blocks(self) -> list[tuple[int, int]]:
        """(input, output) channels of each encoder block, in order."""
        return list(zip((1, *self.channels[:-1]), self.channels))

    @property
    def decoder_blocks(self) -> list[tuple[int, int]]:
        """(input, output) channels of each decoder block, in order; the conv to one channel follows."""
        back = self.channels[::-1]
        return list(zip((back[0], *back[:-1]), back))

    @property
    def cells(self) -> int:
        """Side of the bottleneck the decoders start from, in cells."""
        return self.out_size // self.cell

    @property
    def skip(self) -> int:
        """Bottleneck cells dropped on each side (0: the whole bottleneck)."""
        return (self.size // self.cell - self.cells) // 2

    def activation(self, head: str) -> str:
        """The activation ending ``head``: one of the values of :data:`HEAD_ACTIVATIONS`."""
        return HEAD_ACTIVATIONS[head]


def import_torch() -> Any:
    """The ``torch`` module, imported on first use; NetworkError saying how to install it."""
    try:
        import torch
    except ImportError:
        raise NetworkError("the PyTorch network needs torch: pip install 'ptychostream[train]' "
                           "(or torch>=2.2)") from None
    return torch


def build_net(size: int = 128, base_channels: int = 16, depth: int = 4, heads: Sequence[str] = HEADS,
              output_size: int | None = None, batchnorm: bool = True) -> Any:
    """The torch module of ``NetLayout(size, base_channels, depth, heads, output_size, batchnorm)``
    (see :func:`torch_net`)."""
    return torch_net(NetLayout(size, base_channels, depth, tuple(heads), output_size, batchnorm))


def torch_net(layout: NetLayout) -> Any:
    """The PtychoNN-class torch module of ``layout``; an ``nn.Module``.

    ``forward(x)`` takes (n, 1, size, size) and returns a tuple of (n, 1, o, o) tensors in
    ``heads`` order, o = ``output_size``.  Its ``layout`` is ``layout``, its ``config`` the
    layout's :meth:`~NetLayout.config`.  Convs are He-initialised, the last conv of each head
    with a small std (a calm start for tanh / sigmoid).
    """
    torch = import_torch()
    nn: Any = torch.nn
    interpolate = torch.nn.functional.interpolate
    activations = {"tanh_pi": lambda y: torch.tanh(y) * math.pi, "sigmoid": torch.sigmoid}

    def pair(cin: int, c: int) -> list[Any]:
        layers: list[Any] = []
        for a in (cin, c):
            layers += [nn.Conv2d(a, c, 3, padding=1)] + ([nn.BatchNorm2d(c)] if layout.batchnorm else [])
            layers.append(nn.ReLU(inplace=True))
        return layers

    class Up(nn.Module):
        """Bilinear ×2 (ONNX Resize, half-pixel)."""

        def forward(self, x: Any) -> Any:
            return interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    class PtychoNN(nn.Module):
        """The network of ``layout``."""

        def __init__(self) -> None:
            super().__init__()
            self.layout = layout
            self.config = layout.config()
            self.heads = layout.heads
            self.cells, self.skip = layout.cells, layout.skip
            layers: list[Any] = []
            for cin, c in layout.encoder_blocks:
                layers += pair(cin, c) + [nn.MaxPool2d(2)]
            self.encoder = nn.Sequential(*layers)
            self.decoders = nn.ModuleList()
            for _ in layout.heads:
                layers = []
                for cin, c in layout.decoder_blocks:
                    layers += pair(cin, c) + [Up()]
                layers.append(nn.Conv2d(layout.channels[0], 1, 3, padding=1))
                self.decoders.append(nn.Sequential(*layers))
            self.activations = [activations[layout.activation(h)] for h in layout.heads]
            if layout.amplitude_scale != 1.0 and "amplitude" in layout.heads:
                k, scale = layout.heads.index("amplitude"), layout.amplitude_scale
                self.activations[k] = lambda y: torch.sigmoid(y) * scale
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
            for dec in self.decoders:
                nn.init.normal_(dec[-1].weight, std=1e-3)

        def forward(self, x: Any) -> tuple[Any, ...]:
            z = self.encoder(x)
            if self.skip:
                z = z[:, :, self.skip:self.skip + self.cells, self.skip:self.skip + self.cells]
            return tuple(act(dec(z)) for act, dec in zip(self.activations, self.decoders))

    return PtychoNN()


def read_onnx(path: str | Path, what: str = "model") -> Any:
    """The ``onnx.ModelProto`` at ``path`` with its weights; NetworkError if it cannot be read."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # missing, truncated or not ONNX
        raise NetworkError(f"{what} {path}: cannot read it as ONNX ({exc})") from None


def load_conv_weights(net: Any, model: Any, what: str = "model") -> None:
    """Copy the Conv weights of the ONNX graph ``model`` (a ``ModelProto``) into the torch ``net``.

    Convolutions pair up in graph order with the ``Conv2d`` modules of ``net`` (the order in
    which an export traces them, and the order the model zoo writes them); any difference in
    count or shape raises NetworkError.
    """
    torch = import_torch()
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # the exporter shares equal tensors through Identity nodes
        if node.op_type == "Identity" and node.input[0] in inits:
            inits[node.output[0]] = inits[node.input[0]]
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            inits[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    mods = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    if len(convs) != len(mods):
        raise NetworkError(f"{what} has {len(convs)} convolutions, the network has {len(mods)}")
    with torch.no_grad():
        for k, (node, mod) in enumerate(zip(convs, mods)):
            w = inits.get(node.input[1])
            b = inits.get(node.input[2]) if len(node.input) > 2 else np.zeros(mod.out_channels, np.float32)
            if w is None or b is None or tuple(w.shape) != tuple(mod.weight.shape):
                got = "a computed weight" if w is None or b is None else f"weights {tuple(w.shape)}"
                raise NetworkError(f"{what}: convolution {k} has {got}, the network needs "
                                   f"{tuple(mod.weight.shape)}")
            mod.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            mod.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)))


def net_from_onnx(path: str | Path, config: Mapping[str, Any]) -> Any:
    """The torch module (eval mode) of the ONNX file at ``path``, whose layout is ``config``.

    ``config`` is a :meth:`NetLayout.config` dict (the ``net`` entry of a trained model's
    ``ptychostream.training`` metadata, as ``ModelInfo.training`` holds it).  The module has no
    BatchNorm (an export folds it) and the file's weights.  Used by the PyTorch backend.
    """
    try:
        layout = NetLayout.from_config(config, batchnorm=False)
    except NetworkError as exc:
        raise NetworkError(f"{path}: {exc}") from None
    net = torch_net(layout)
    load_conv_weights(net, read_onnx(path), str(path))
    return net.eval()
