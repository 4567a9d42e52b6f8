"""The one PtychoNN-class network definition (PyTorch), used by training, export and the PyTorch backend."""

from __future__ import annotations

import math
from typing import Sequence

from ptychostream.train.config import HEADS, TrainError, torch_module


def build_net(size: int = 128, base_channels: int = 16, depth: int = 4, heads: Sequence[str] = HEADS,
              output_size: int | None = None, batchnorm: bool = True):
    """The PtychoNN-class torch module (see the module docstring); returns an ``nn.Module``.

    ``forward(x)`` takes (n, 1, size, size) and returns a tuple of (n, 1, o, o) tensors in
    ``heads`` order, o = ``output_size`` (default ``size``).  ``batchnorm`` puts a BatchNorm
    after every 3×3 conv but the last (it trains much faster); the export folds it into the
    convs, so the ONNX graph has the plain conv/ReLU layout either way.  Convs are
    He-initialised.
    """
    torch = torch_module()
    nn = torch.nn
    F = torch.nn.functional
    heads = tuple(heads)
    if not heads or len(set(heads)) != len(heads) or not set(heads) <= set(HEADS):
        raise TrainError(f"heads must be distinct names from {HEADS}, got {heads}")
    if depth < 1 or size % (2 ** depth):
        raise TrainError(f"input size {size} must be divisible by 2**depth = {2 ** depth}")
    out = size if output_size is None else int(output_size)
    cell = 2 ** depth
    if out < cell or out > size or out % cell or (size - out) % (2 * cell):
        raise TrainError(f"output size {out} must be a multiple of {cell} (2**depth) between {cell} and {size}, "
                         f"centred (input − output a multiple of {2 * cell})")

    def conv(cin: int, c: int) -> list:
        if batchnorm:
            return [nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        return [nn.Conv2d(cin, c, 3, padding=1), nn.ReLU(inplace=True)]

    def pair(cin: int, c: int) -> list:
        return conv(cin, c) + conv(c, c)

    class Up(nn.Module):
        def forward(self, x):  # noqa: D401 - bilinear ×2 (ONNX Resize, half-pixel)
            return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)

    class PtychoNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            chans = [base_channels * 2 ** k for k in range(depth)]
            layers: list = []
            cin = 1
            for c in chans:
                layers += pair(cin, c) + [nn.MaxPool2d(2)]
                cin = c
            self.encoder = nn.Sequential(*layers)
            self.heads = heads
            self.cells = out // cell
            self.skip = (size // cell - self.cells) // 2
            self.decoders = nn.ModuleList()
            for _ in heads:
                layers, ci = [], cin
                for c in reversed(chans):
                    layers += pair(ci, c) + [Up()]
                    ci = c
                layers.append(nn.Conv2d(ci, 1, 3, padding=1))
                self.decoders.append(nn.Sequential(*layers))
            self.config = {"size": size, "base_channels": base_channels, "depth": depth, "heads": list(heads),
                           "output_size": out, "batchnorm": bool(batchnorm)}
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
            for dec in self.decoders:  # a calm start for tanh / sigmoid
                nn.init.normal_(dec[-1].weight, std=1e-3)

        def forward(self, x):
            z = self.encoder(x)
            if self.skip:
                z = z[:, :, self.skip:self.skip + self.cells, self.skip:self.skip + self.cells]
            outs = []
            for head, dec in zip(self.heads, self.decoders):
                y = dec(z)
                outs.append(torch.tanh(y) * math.pi if head == "phase" else torch.sigmoid(y))
            return tuple(outs)

    return PtychoNN()
