"""Model files: validation and metadata (what a file is, before any backend opens it).

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
``ptychostream.probe``      the probe file (``.npy`` or HDF5), relative to the model file's folder
``ptychostream.training``   JSON object describing the training run
=========================== ==========================================================

A model carries its probe (complex, on its object-pixel grid) as a file beside it: the one
``ptychostream.probe`` names, else ``<stem>.probe.npy`` next to the model (``ptychonn_edge.onnx``
→ ``ptychonn_edge.probe.npy``; for an engine, next to its ONNX file too), found by
:func:`probe_sidecar`. The physics-consistency check (:mod:`ptychostream.model.consistency`) uses it.

Of ``ptychostream.preprocess`` a serving IOC takes only the model's settings (crop size, bin,
scale, normalisation: :data:`~ptychostream.model.preprocess.MODEL_FIELDS`); the instrument's
(fftshift, orientation, crop centre, threshold, dark, mask) stay the device's, and any the model
names otherwise are reported, not applied (:meth:`~ptychostream.model.preprocess.Preprocess.for_model`).

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

from ptychostream.model.gpu import BackendError, inspect_engine
from ptychostream.model.preprocess import Preprocess

__all__ = ["ModelError", "ModelInfo", "load_model_file", "count_parameters", "probe_sidecar", "META_PREFIX",
           "META_KEYS", "PROBE_SUFFIX"]

META_PREFIX = "ptychostream."
META_KEYS = tuple(META_PREFIX + k for k in (
    "name", "preprocess", "outputs", "pixel_m", "probe_id", "probe", "training"))
#: the probe file beside a model found by name: ``<stem>.probe.npy``
PROBE_SUFFIX = ".probe.npy"
LABELS = ("phase", "amplitude")
ENGINE_SUFFIXES = (".engine", ".plan")

_FLOAT_TYPES = {1: "float32", 10: "float16"}  # onnx.TensorProto.FLOAT / FLOAT16
#: element types of learned weights: onnx.TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
_WEIGHT_TYPES = frozenset({1, 10, 11, 16})
#: ops whose constant inputs are shapes/scales/indices, not learned weights
_NON_WEIGHT_OPS = frozenset({
    "Resize", "Upsample", "Reshape", "Expand", "Slice", "Pad", "Tile", "ConstantOfShape",
    "Squeeze", "Unsqueeze", "Range", "Shape", "Transpose", "Split", "ReduceMean", "ReduceSum",
})


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
    def stitch_domain(self) -> str:
        """The mosaic domain its ``ptychostream.stitch`` hint names: "phase" or "complex" ("phase" where it
        names none or cannot be read)."""
        import json

        hint = self.metadata.get(META_PREFIX + "stitch")
        try:
            value = json.loads(hint).get("domain", "phase") if hint else "phase"
        except (ValueError, AttributeError):
            return "phase"
        return value if value in ("phase", "complex") else "phase"

    @property
    def model_id(self) -> str:
        """The first 12 hex digits of the file's sha256."""
        return self.sha256[:12]

    @property
    def name(self) -> str:
        """The metadata's model name, else the file name without its suffixes."""
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


def count_parameters(model: Any) -> int:
    """Learned parameters of an ``onnx.ModelProto``: elements of floating initializers that feed
    weight-bearing ops.

    Initializers used only as shape/scale arguments (Resize scales, Reshape shapes…)
    are not counted. Works on models loaded without their external data.
    """
    graph = model.graph
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, set()).add(node.op_type)
    total = 0
    for init in graph.initializer:
        if init.data_type not in _WEIGHT_TYPES:
            continue
        ops = consumers.get(init.name, set())
        if ops and ops <= _NON_WEIGHT_OPS:
            continue
        total += math.prod(int(d) for d in init.dims)
    return total


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

    def channels(dims: list[int | None] | None) -> int | None:
        if dims is None or len(dims) != 4:
            return 1 if dims is not None else None
        return dims[1]

    labels: list[str]
    omap: tuple[tuple[str, str, int], ...]
    if len(outs) == 2:
        if labels_meta is not None:
            if len(labels_meta) != 2:
                raise ModelError(f"metadata {META_PREFIX}outputs lists {labels_meta} but the model has "
                                 f"2 outputs {names}")
            labels = labels_meta
        else:
            g0, g1 = (_label_from_name(n) for n in names)
            if g0 and g1 and g0 != g1:
                labels = [g0, g1]
            elif g0 and not g1:
                labels = [g0, "amplitude" if g0 == "phase" else "phase"]
            elif g1 and not g0:
                labels = ["amplitude" if g1 == "phase" else "phase", g1]
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
        h, w = (dims[-2], dims[-1]) if dims is not None and len(dims) >= 3 else (None, None)
        shapes[label] = (h, w) if h is not None and w is not None else None
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


def probe_sidecar(info: ModelInfo) -> Path | None:
    """The probe file a model carries, or None: ``ptychostream.probe`` (relative to the model's folder),
    else ``<stem>.probe.npy`` beside the model file or, for an engine, beside its ONNX file."""
    named = info.metadata.get(META_PREFIX + "probe")
    models = [Path(info.path)] + ([Path(info.onnx_path)] if info.onnx_path else [])
    for model in models:
        if named:
            cand = Path(named).expanduser()
            cand = cand if cand.is_absolute() else model.parent / cand
            if cand.is_file():
                return cand
            continue
        stem = model.name
        for suffix in (".onnx", *ENGINE_SUFFIXES):
            if stem.lower().endswith(suffix):
                stem = stem[: -len(suffix)]
        cand = model.with_name(stem.split(".onnx.")[0] + PROBE_SUFFIX)
        if cand.is_file():
            return cand
    return None
