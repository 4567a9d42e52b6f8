"""A model file opened on a backend, ready to serve: :func:`open_model` and :class:`Model`.

What a model file is (its validation and metadata) is :mod:`ptychostream.model.info`; the names
of that module used together with a Model (:class:`ModelInfo`, :class:`ModelError`,
:func:`load_model_file`, the metadata keys) are importable from here too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.model.backends import Backend, open_backend
from ptychostream.model.info import (
    META_KEYS,
    META_PREFIX,
    ModelError,
    ModelInfo,
    load_model_file,
)
from ptychostream.model.preprocess import Preprocess

__all__ = ["Model", "open_model", "ModelError", "ModelInfo", "load_model_file", "META_PREFIX", "META_KEYS"]


def _selftest_raw_shape(pre: Preprocess, model_shape: tuple[int, int]) -> tuple[int, ...]:
    """A raw frame size the pre-processing is meant for, to exercise it in a self-test."""
    if pre.dark is not None:
        return tuple(np.shape(pre.dark))
    if pre.crop_size:
        c = int(pre.crop_size)
        if pre.crop_center is None:
            return (c, c)
        cy, cx = (int(v) for v in pre.crop_center)
        return (max(c, cy + c - c // 2), max(c, cx + c - c // 2))
    b = int(pre.bin)
    return (model_shape[0] * b, model_shape[1] * b)


class Model:
    """A model file opened on a backend: :meth:`run` = pre-process + infer."""

    def __init__(self, info: ModelInfo, backend: Backend, preprocess: Preprocess | None = None) -> None:
        self.info = info
        self.backend = backend
        self.preprocess = preprocess if preprocess is not None else info.preprocess
        self.fallback_reasons: list[str] = list(getattr(backend, "fallback_reasons", []) or [])

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.backend.outputs)

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Run already pre-processed float32 (n, h, w) input."""
        return self.backend.infer(x)

    def run(self, frames_raw: np.ndarray, preprocess: Preprocess | None = None) -> dict[str, np.ndarray]:
        """Pre-process raw frames (n, H, W) (or one (H, W)) and infer."""
        frames_raw = np.asarray(frames_raw)
        if frames_raw.ndim == 2:
            frames_raw = frames_raw[None]
        x = (preprocess or self.preprocess).apply(frames_raw)
        return self.backend.infer(x)

    def selftest(self, raw_shape: tuple[int, int] | None = None, seed: int = 0) -> dict[str, tuple[int, ...]]:
        """Run a small random batch end to end; raise ModelError if anything is off.

        Checks that the pre-processing turns ``raw_shape`` frames (default: a size
        it is meant for) into the model input, and that every output comes back as
        finite float32 (n, h', w'). Returns {output: shape}.
        """
        pre = self.preprocess
        h, w = self.info.input_shape
        shape = tuple(raw_shape) if raw_shape is not None else _selftest_raw_shape(pre, (h, w))
        misfit = self.misfit(shape, pre)
        if misfit:
            raise ModelError(f"self-test: {misfit}; adjust crop/bin")
        rng = np.random.default_rng(seed)
        shapes: dict[str, tuple[int, ...]] = {}
        for n in (1, 3):
            raw = rng.poisson(4.0, (n, *shape)).astype(np.uint16)
            try:
                outs = self.run(raw)
            except Exception as exc:
                raise ModelError(f"self-test: inference on {self.backend.name} failed: "
                                 f"{type(exc).__name__}: {exc}") from exc
            if tuple(outs) != tuple(self.backend.outputs):
                raise ModelError(f"self-test: outputs {tuple(outs)} differ from the declared "
                                 f"{tuple(self.backend.outputs)}")
            for label, arr in outs.items():
                if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 3 \
                        or arr.shape[0] != n:
                    raise ModelError(f"self-test: output {label} came back as "
                                     f"{getattr(arr, 'dtype', type(arr))} {getattr(arr, 'shape', '')}; "
                                     f"expected float32 ({n}, h, w)")
                want = self.info.output_shapes.get(label)
                if want is not None and tuple(arr.shape[1:]) != tuple(want):
                    raise ModelError(f"self-test: output {label} is {arr.shape[1:]}, the graph "
                                     f"declares {want}")
                if not np.isfinite(arr).all():
                    raise ModelError(f"self-test: output {label} holds NaN or inf")
                shapes[label] = arr.shape
        return shapes

    def misfit(self, raw_shape: tuple[int, ...], preprocess: Preprocess | None = None) -> str | None:
        """Why ``preprocess`` (default: the model's) cannot turn ``raw_shape`` frames into the model
        input, or None when it can."""
        pre = preprocess if preprocess is not None else self.preprocess
        shape = tuple(int(s) for s in raw_shape)
        want = tuple(self.info.input_shape)
        try:
            got = tuple(pre.output_shape(shape))
        except ValueError as exc:
            return f"pre-processing cannot handle {shape} frames: {exc}"
        if len(shape) == 2 and got == want:
            return None
        return f"pre-processing turns {shape} frames into {got}, but the model input is {want}"

    def check_frames(self, raw: np.ndarray, preprocess: Preprocess | None = None) -> None:
        """Raise ModelError unless this model serves the real frames ``raw`` ((H, W) or (n, H, W)).

        Their shape must fit the model input through ``preprocess`` (default: the model's), and
        every output must be finite: a self-test on random counts cannot see a model that
        overflows on the intensities of a real detector.
        """
        raw = np.asarray(raw)
        if raw.ndim == 2:
            raw = raw[None]
        pre = preprocess if preprocess is not None else self.preprocess
        desc = f"{tuple(raw.shape[1:])} {raw.dtype}"
        misfit = self.misfit(raw.shape[1:], pre)
        if misfit:
            try:  # what would fit, as a hint for the model's ptychostream.preprocess
                fit = pre.fit_to(raw.shape[1:], self.info.input_shape)
                hint = f" (crop {fit.crop_size or 'none'}, bin {fit.bin} would fit)"
            except ValueError:
                hint = ""
            raise ModelError(f"the frames now streaming are {desc}: its {misfit}{hint}")
        try:
            outs = self.run(raw, pre)
        except Exception as exc:
            raise ModelError(f"inference on the frames now streaming ({desc}) failed: "
                             f"{type(exc).__name__}: {exc}") from exc
        bad = [label for label, arr in outs.items() if not np.isfinite(arr).all()]
        if bad:
            raise ModelError(f"its {' and '.join(bad)} output holds NaN or inf on the frames now "
                             f"streaming ({desc})")

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Model {self.info.summary()} on {self.backend.name}>"


def open_model(path: str | Path, backend: str = "Auto", batch_size: int = 64,
               preprocess_override: Preprocess | dict | str | None = None, **opts: Any) -> Model:
    """Load, validate and open a model file on ``backend`` (one of BACKEND_CHOICES).

    ``preprocess_override`` (a Preprocess, dict or JSON) replaces the pre-processing
    stored in the file, also in ``model.info.preprocess``. Extra keyword arguments
    go to the backend (threads=, precision=, half=, cuda_graphs=…).
    """
    info = load_model_file(path)
    if preprocess_override is not None:
        pre = preprocess_override
        if not isinstance(pre, Preprocess):
            try:
                pre = Preprocess.from_json(pre)
            except ValueError as exc:
                raise ModelError(f"pre-processing override is invalid: {exc}") from None
        try:
            pre.validate()
        except ValueError as exc:
            raise ModelError(f"pre-processing override is invalid: {exc}") from None
        info = replace(info, preprocess=pre)
    be = open_backend(backend, info, batch_size, **opts)
    return Model(info, be)
