"""Model files: validation, metadata, and a loaded model ready to serve.

A model file is an ONNX network with one input, (n, h, w) or (n, 1, h, w) with a
static frame size, and one or two outputs (phase; or amplitude and phase, as two
outputs or as two channels of one). A TensorRT ``.engine``/``.plan`` is accepted
too (its I/O comes from the ONNX beside it, or from TensorRT itself).

Metadata travels in the ONNX ``metadata_props`` under these keys:

=========================== ==========================================================
``ptychostream.name``       short model name for the status line (default: file stem)
``ptychostream.preprocess`` JSON of :class:`~ptychostream.model.preprocess.Preprocess`
``ptychostream.outputs``    JSON list naming the outputs in graph order, e.g.
                            ``["amplitude", "phase"]`` (for one 2-channel output: the
                            channels in order)
``ptychostream.pixel_m``    real-space pixel size of the output, metres
``ptychostream.probe_id``   identifier of the probe the model was trained with
``ptychostream.training``   JSON object describing the training run
=========================== ==========================================================

Without ``ptychostream.outputs`` the labels come from the output names ("amp",
"phase"/"ph"), else the PtychoNN convention: two outputs are [amplitude, phase],
one 2-channel output is [phase, amplitude] (as in the training NPZ), one
1-channel output is phase.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.model.preprocess import Preprocess

__all__ = [
    "ModelError", "ModelInfo", "ModelFile", "Model", "load_model_file", "open_model",
    "META_PREFIX", "META_KEYS",
]

META_PREFIX = "ptychostream."
META_KEYS = tuple(META_PREFIX + k for k in (
    "name", "preprocess", "outputs", "pixel_m", "probe_id", "training"))
LABELS = ("phase", "amplitude")
ENGINE_SUFFIXES = (".engine", ".plan")

_FLOAT_TYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT / FLOAT16


class ModelError(ValueError):
    """A model file is missing, unreadable or not a usable ptychography network."""


@dataclass
class ModelInfo:
    """What a model file is, as read from its graph and metadata (no inference)."""

    path: str
    sha256: str
    input_name: str
    input_shape: tuple[int, int]
    fixed_batch: int | None
    outputs: tuple[str, ...]
    preprocess: Preprocess = field(default_factory=Preprocess)
    pixel_m: float | None = None
    probe_id: str | None = None
    training: dict | None = None
    n_params: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    #: 3 for (n, h, w) input, 4 for (n, 1, h, w)
    input_rank: int = 4
    #: (label, graph output name, channel) per returned output
    output_map: tuple[tuple[str, str, int], ...] = ()
    #: label → (h', w') where the graph declares it
    output_shapes: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    #: "onnx" or "engine"
    kind: str = "onnx"
    #: the ONNX file (for an engine: the one beside it, if any)
    onnx_path: str | None = None
    opset: int | None = None

    @property
    def model_id(self) -> str:
        return self.sha256[:12]

    @property
    def name(self) -> str:
        name = self.metadata.get(META_PREFIX + "name")
        if name:
            return name
        stem = Path(self.path).name
        for suffix in (".onnx", *ENGINE_SUFFIXES):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        return stem.split(".onnx.")[0]

    def summary(self) -> str:
        """One short line for a status PV."""
        h, w = self.input_shape
        batch = str(self.fixed_batch) if self.fixed_batch else "dyn"
        params = f", {self.n_params / 1e6:.2f}M params" if self.n_params else ""
        kind = " engine" if self.kind == "engine" else ""
        return (f"{self.name} {h}x{w} {'+'.join(self.outputs)}{kind}, batch {batch}"
                f"{params}, id {self.model_id}")


#: the name the backends use for what they are given
ModelFile = ModelInfo


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _dims(value_info) -> list[int | None] | None:
    """Static dims of a graph input/output (None for symbolic ones); None if no shape."""
    tt = value_info.type.tensor_type if value_info.type.HasField("tensor_type") else None
    if tt is None or not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            for d in tt.shape.dim]


def _label_from_name(name: str) -> str | None:
    low = name.lower()
    if "amp" in low:
        return "amplitude"
    tokens = [t for t in re.split(r"[^a-z0-9]+", low) if t]
    if "phase" in low or "ph" in tokens or any(t.startswith("ph") for t in tokens):
        return "phase"
    return None


def _parse_outputs_meta(meta: dict[str, str]) -> list[str] | None:
    text = meta.get(META_PREFIX + "outputs")
    if text is None:
        return None
    try:
        labels = json.loads(text)
    except ValueError:
        raise ModelError(f"metadata {META_PREFIX}outputs is not JSON: {text!r}") from None
    if (not isinstance(labels, list) or not 1 <= len(labels) <= 2 or len(set(labels)) != len(labels)
            or not all(lbl in LABELS for lbl in labels)):
        raise ModelError(f"metadata {META_PREFIX}outputs must be a JSON list of distinct names from "
                         f"{list(LABELS)}, got {text!r}")
    return labels


def _resolve_outputs(outs: list[tuple[str, list[int | None] | None]], meta: dict[str, str]
                     ) -> tuple[tuple[tuple[str, str, int], ...], dict[str, tuple[int, int] | None]]:
    """output_map and output_shapes from the graph outputs and metadata."""
    labels_meta = _parse_outputs_meta(meta)
    names = [n for n, _ in outs]

    def channels(dims):
        if dims is None or len(dims) != 4:
            return 1 if dims is not None else None
        return dims[1]

    if len(outs) == 2:
        if labels_meta is not None:
            if len(labels_meta) != 2:
                raise ModelError(f"metadata {META_PREFIX}outputs lists {labels_meta} but the model has "
                                 f"2 outputs {names}")
            labels = labels_meta
        else:
            guess = [_label_from_name(n) for n in names]
            if guess[0] and guess[1] and guess[0] != guess[1]:
                labels = guess
            elif guess[0] and not guess[1]:
                labels = [guess[0], "amplitude" if guess[0] == "phase" else "phase"]
            elif guess[1] and not guess[0]:
                labels = ["amplitude" if guess[1] == "phase" else "phase", guess[1]]
            else:
                labels = ["amplitude", "phase"]  # PtychoNN's order
        for (n, dims) in outs:
            if channels(dims) not in (1, None):
                raise ModelError(f"output {n!r} has {channels(dims)} channels; with two outputs each "
                                 "must have one")
        omap = ((labels[0], names[0], 0), (labels[1], names[1], 0))
    else:
        name, dims = outs[0]
        ch = channels(dims)
        if ch not in (1, 2, None):
            raise ModelError(f"output {name!r} has {ch} channels; expected 1 (phase) or 2 "
                             "(phase and amplitude)")
        if ch == 2 or (ch is None and labels_meta is not None and len(labels_meta) == 2):
            labels = labels_meta if labels_meta is not None else ["phase", "amplitude"]
            if len(labels) != 2:
                raise ModelError(f"metadata {META_PREFIX}outputs lists {labels} but output {name!r} "
                                 "has 2 channels")
            omap = ((labels[0], name, 0), (labels[1], name, 1))
        else:
            if labels_meta is not None and len(labels_meta) != 1:
                raise ModelError(f"metadata {META_PREFIX}outputs lists {labels_meta} but the model "
                                 f"has one single-channel output {name!r}")
            label = labels_meta[0] if labels_meta else (
                "amplitude" if _label_from_name(name) == "amplitude" else "phase")
            omap = ((label, name, 0),)
    shapes: dict[str, tuple[int, int] | None] = {}
    dims_by_name = dict(outs)
    for label, name, _ in omap:
        dims = dims_by_name[name]
        hw = tuple(dims[-2:]) if dims is not None and len(dims) >= 3 else None
        shapes[label] = hw if hw is not None and None not in hw else None
    return omap, shapes


def _parse_metadata(meta: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"preprocess": Preprocess(), "pixel_m": None, "probe_id": None,
                           "training": None}
    text = meta.get(META_PREFIX + "preprocess")
    if text:
        try:
            out["preprocess"] = Preprocess.from_json(text)
        except ValueError as exc:
            raise ModelError(f"metadata {META_PREFIX}preprocess is invalid: {exc}") from None
    text = meta.get(META_PREFIX + "pixel_m")
    if text:
        try:
            value = float(text)
        except ValueError:
            raise ModelError(f"metadata {META_PREFIX}pixel_m is not a number: {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise ModelError(f"metadata {META_PREFIX}pixel_m must be > 0, got {text!r}")
        out["pixel_m"] = value
    out["probe_id"] = meta.get(META_PREFIX + "probe_id") or None
    text = meta.get(META_PREFIX + "training")
    if text:
        try:
            training = json.loads(text)
        except ValueError:
            raise ModelError(f"metadata {META_PREFIX}training is not JSON: {text[:80]!r}") from None
        if not isinstance(training, dict):
            raise ModelError(f"metadata {META_PREFIX}training must be a JSON object")
        out["training"] = training
    return out


def _info_from_onnx_bytes(path: Path, data: bytes, sha: str) -> ModelInfo:
    import onnx
    from google.protobuf.message import DecodeError

    from ptychostream.model.zoo import count_parameters

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path} is not an ONNX model (cannot be parsed: {exc})") from None
    graph = model.graph
    if model.ir_version <= 0 or not graph.node or not model.opset_import:
        raise ModelError(f"{path} is not an ONNX model (no IR version, opset or graph nodes found)")
    init_names = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelError(f"{path}: the model must have exactly one input (a stack of diffraction "
                         f"frames); it has {len(inputs)}: {[i.name for i in inputs]}")
    inp = inputs[0]
    if not inp.type.HasField("tensor_type"):
        raise ModelError(f"{path}: input {inp.name!r} is not a tensor")
    elem = inp.type.tensor_type.elem_type
    if elem not in _FLOAT_TYPES:
        raise ModelError(f"{path}: input {inp.name!r} has element type "
                         f"{onnx.TensorProto.DataType.Name(elem)}; float32 or float16 expected")
    dims = _dims(inp)
    if dims is None:
        raise ModelError(f"{path}: input {inp.name!r} declares no shape; expected (n, h, w) or (n, 1, h, w)")
    if len(dims) not in (3, 4):
        raise ModelError(f"{path}: input {inp.name!r} has rank {len(dims)} (shape {_fmt(dims)}); "
                         "expected rank 3 (n, h, w) or 4 (n, 1, h, w)")
    if len(dims) == 4 and dims[1] not in (1, None):
        raise ModelError(f"{path}: input {inp.name!r} has {dims[1]} channels (shape {_fmt(dims)}); "
                         "one diffraction frame per sample, (n, 1, h, w), is expected")
    h, w = dims[-2:]
    if h is None or w is None:
        raise ModelError(f"{path}: input {inp.name!r} has dynamic spatial dims (shape {_fmt(dims)}); "
                         "the model must declare a static frame size (h, w)")
    n_out = len(graph.output)
    if not 1 <= n_out <= 2:
        raise ModelError(f"{path}: the model has {n_out} outputs {[o.name for o in graph.output]}; "
                         "expected 1 (phase) or 2 (amplitude and phase)")
    outs = []
    for o in graph.output:
        odims = _dims(o)
        if odims is not None and len(odims) not in (3, 4):
            raise ModelError(f"{path}: output {o.name!r} has rank {len(odims)} (shape {_fmt(odims)}); "
                             "expected (n, h, w) or (n, c, h, w)")
        outs.append((o.name, odims))
    meta = {p.key: p.value for p in model.metadata_props}
    omap, oshapes = _resolve_outputs(outs, meta)
    parsed = _parse_metadata(meta)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return ModelInfo(
        path=str(path), sha256=sha, input_name=inp.name, input_shape=(int(h), int(w)),
        fixed_batch=dims[0], outputs=tuple(lbl for lbl, _, _ in omap),
        preprocess=parsed["preprocess"], pixel_m=parsed["pixel_m"], probe_id=parsed["probe_id"],
        training=parsed["training"], n_params=count_parameters(model), metadata=meta,
        input_rank=len(dims), output_map=omap, output_shapes=oshapes, kind="onnx",
        onnx_path=str(path), opset=opset,
    )


def _fmt(dims: list[int | None]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def _onnx_beside(engine: Path) -> Path | None:
    """model.onnx for model.onnx.<key>.engine or model.engine."""
    name = engine.name
    if ".onnx." in name:
        cand = engine.with_name(name.split(".onnx.")[0] + ".onnx")
        if cand.is_file():
            return cand
    cand = engine.with_suffix(".onnx")
    return cand if cand.is_file() else None


def _engine_info(path: Path, sha: str) -> ModelInfo:
    onnx_path = _onnx_beside(path)
    if onnx_path is not None:
        info = load_model_file(onnx_path)
        return replace(info, path=str(path), sha256=sha, kind="engine", onnx_path=str(onnx_path))
    from ptychostream.model.backends import BackendError
    from ptychostream.model.backends.tensorrt import inspect_engine

    try:
        io = inspect_engine(str(path))
    except BackendError as exc:
        raise ModelError(f"{path}: a TensorRT engine with no ONNX beside it can only be read with "
                         f"TensorRT: {exc}") from None
    meta: dict[str, str] = {}
    side = path.with_name(path.name + ".json")
    if side.is_file():
        try:
            meta = {str(k): v if isinstance(v, str) else json.dumps(v)
                    for k, v in json.loads(side.read_text()).items()}
        except (ValueError, AttributeError) as exc:
            raise ModelError(f"{side}: metadata is not a JSON object: {exc}") from None
    dims = io["input_shape"]
    if len(dims) not in (3, 4) or dims[-1] is None or dims[-2] is None:
        raise ModelError(f"{path}: engine input shape {_fmt(dims)} is not (n, h, w) or (n, 1, h, w)")
    if not 1 <= len(io["outputs"]) <= 2:
        raise ModelError(f"{path}: the engine has {len(io['outputs'])} outputs; expected 1 or 2")
    omap, oshapes = _resolve_outputs(io["outputs"], meta)
    parsed = _parse_metadata(meta)
    return ModelInfo(
        path=str(path), sha256=sha, input_name=io["input_name"], input_shape=(dims[-2], dims[-1]),
        fixed_batch=dims[0], outputs=tuple(lbl for lbl, _, _ in omap),
        preprocess=parsed["preprocess"], pixel_m=parsed["pixel_m"], probe_id=parsed["probe_id"],
        training=parsed["training"], n_params=None, metadata=meta, input_rank=len(dims),
        output_map=omap, output_shapes=oshapes, kind="engine", onnx_path=None,
    )


def load_model_file(path: str | Path) -> ModelInfo:
    """Read and validate a model file; raise :class:`ModelError` saying what is wrong."""
    p = Path(path).expanduser()
    if not str(path).strip():
        raise ModelError("no model file given (empty path)")
    if not p.exists():
        raise ModelError(f"model file not found: {p}")
    if not p.is_file():
        raise ModelError(f"model path is not a file: {p}")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {p}: {exc.strerror or exc}") from None
    if not data:
        raise ModelError(f"model file is empty: {p}")
    sha = hashlib.sha256(data).hexdigest()
    if p.suffix.lower() in ENGINE_SUFFIXES:
        return _engine_info(p, sha)
    return _info_from_onnx_bytes(p, data, sha)


def _selftest_raw_shape(pre: Preprocess, model_shape: tuple[int, int]) -> tuple[int, int]:
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

    def __init__(self, info: ModelInfo, backend, preprocess: Preprocess | None = None) -> None:
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
        raw_shape = tuple(raw_shape) if raw_shape is not None else _selftest_raw_shape(pre, (h, w))
        try:
            got = tuple(pre.output_shape(raw_shape))
        except ValueError as exc:
            raise ModelError(f"self-test: pre-processing cannot handle {raw_shape} frames: {exc}") from None
        if got != (h, w):
            raise ModelError(f"self-test: pre-processing turns {raw_shape} frames into {got}, but the "
                             f"model input is {(h, w)}; adjust crop/bin")
        rng = np.random.default_rng(seed)
        shapes: dict[str, tuple[int, ...]] = {}
        for n in (1, 3):
            raw = rng.poisson(4.0, (n, *raw_shape)).astype(np.uint16)
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
    from ptychostream.model.backends import open_backend

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
