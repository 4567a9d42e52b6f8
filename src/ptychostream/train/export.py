"""Export a trained network as a ptychostream ONNX model, checked before it replaces the target."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ptychostream.model.infer import open_model
from ptychostream.model.info import META_PREFIX, PROBE_SUFFIX, ModelError, count_parameters
from ptychostream.train.config import TrainError, torch_module

__all__ = ["fuse_batchnorm", "export_onnx", "probe_sidecar_path"]


def fuse_batchnorm(net: Any) -> Any:
    """A copy of ``net`` in eval mode with every Conv2d→BatchNorm2d pair folded into one Conv2d."""
    import copy

    torch = torch_module()
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()

    def walk(module: Any) -> None:
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Sequential):
                items, out = list(child), []
                i = 0
                while i < len(items):
                    if (isinstance(items[i], torch.nn.Conv2d) and i + 1 < len(items)
                            and isinstance(items[i + 1], torch.nn.BatchNorm2d)):
                        out.append(fuse_conv_bn_eval(items[i], items[i + 1]))
                        i += 2
                    else:
                        walk(items[i])
                        out.append(items[i])
                        i += 1
                setattr(module, name, torch.nn.Sequential(*out))
            else:
                walk(child)

    walk(net)
    return net


def _file_mode(path: Path) -> int:
    """The mode a new file gets (0666 less the umask), or the existing file's mode."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def probe_sidecar_path(path: str | Path) -> Path:
    """The probe file written beside a model: ``<stem>.probe.npy`` (what ``model.info.probe_sidecar`` finds)."""
    p = Path(path)
    return p.with_name(p.stem + PROBE_SUFFIX)


def _probe_array(probe: np.ndarray) -> np.ndarray:
    """The probe as stored: complex64, (S, S) for one mode, else (K, S, S); TrainError if it is not one."""
    arr = np.asarray(probe)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim not in (2, 3) or arr.shape[-1] != arr.shape[-2] or arr.shape[-1] < 2:
        raise TrainError(f"the probe to write beside the model must be (S, S) or (K, S, S), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or not np.any(arr):
        raise TrainError("the probe to write beside the model is all zeros or holds NaN/inf")
    return np.ascontiguousarray(arr, dtype=np.complex64)


def export_onnx(net: Any, path: str | Path, metadata: dict[str, Any], opset: int = 17, check: bool = True,
                tolerance: float = 1e-4, probe: np.ndarray | None = None) -> dict[str, Any]:
    """Export ``net`` to ``path`` (dynamic batch), add ``metadata``, verify, and rename into place.

    Verification: onnxruntime vs torch on a random batch of 3 (max |Δ| ≤ ``tolerance`` times the
    largest output magnitude, at least 1: a phase head gives up to π, where float32 kernels that
    differ by the order of their sums land 1e-4 apart; an export bug is off by far more) and
    ``ptychostream.model.infer.open_model(...).selftest()``.  The file is written to a temporary
    name in the target folder and ``os.replace``\\ d over ``path`` only when all checks pass, so
    an existing model is never left half-written.

    ``probe`` (the complex probe the model was trained with, (S, S) or modes (K, S, S)) is written as
    ``<stem>.probe.npy`` beside the model and named in ``ptychostream.probe``, so the device's consistency
    figure finds it (``model.info.probe_sidecar``); it is renamed into place just before the model.  With
    no probe, a ``<stem>.probe.npy`` left by an earlier model of that name is removed (it would be taken
    as this model's).  Returns {max_abs_diff, params, bytes, probe (the sidecar's path or None)}.
    """
    torch = torch_module()
    import onnx

    # the zoo imports onnx at the top (a second): only when exporting, not with ptychostream.train
    from ptychostream.model.zoo import ir_version_for

    path = Path(path)
    folder = path.resolve().parent
    if not folder.is_dir():
        raise TrainError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TrainError(f"cannot write {path}: folder {folder} is not writable")
    if path.exists() and path.is_dir():
        raise TrainError(f"cannot write {path}: it is a folder")
    cfg = net.config
    heads = list(cfg["heads"])
    size = int(cfg["size"])
    net = fuse_batchnorm(net.to("cpu")).to(memory_format=torch.contiguous_format)
    sidecar = probe_sidecar_path(path)
    probe_arr = None if probe is None else _probe_array(probe)
    metadata = {k: v for k, v in metadata.items() if k != META_PREFIX + "probe"}
    if probe_arr is not None:
        metadata[META_PREFIX + "probe"] = sidecar.name
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".onnx.tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    probe_tmp: Path | None = None
    try:
        if probe_arr is not None:
            fd, probe_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".probe.npy.tmp", dir=folder)
            probe_tmp = Path(probe_name)
            with os.fdopen(fd, "wb") as fh:
                np.save(fh, probe_arr)
        dummy = torch.zeros(2, 1, size, size)
        dyn = {"input": {0: "N"}, **{h: {0: "N"} for h in heads}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw: dict[str, Any] = dict(input_names=["input"], output_names=heads, dynamic_axes=dyn,
                                      opset_version=opset, do_constant_folding=True)
            try:
                torch.onnx.export(net, (dummy,), str(tmp), dynamo=False, **kw)
            except TypeError:  # torch without the dynamo switch
                torch.onnx.export(net, (dummy,), str(tmp), **kw)
        model = onnx.load(str(tmp))
        model.ir_version = min(model.ir_version, ir_version_for(opset))
        model.producer_name = "ptychostream.train"
        del model.metadata_props[:]
        for k, v in metadata.items():
            e = model.metadata_props.add()
            e.key = str(k)
            e.value = v if isinstance(v, str) else json.dumps(v)
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        diff = 0.0
        if check:
            import onnxruntime as ort

            x = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 1, size, size)).astype(np.float32))
            with torch.no_grad():
                want = [t.numpy() for t in net(x)]
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"])
            got = sess.run(heads, {"input": x.numpy()})
            diff = max(float(np.max(np.abs(a - b))) for a, b in zip(want, got))
            scale = max([1.0, *(float(np.max(np.abs(a))) for a in want)])
            if not diff <= tolerance * scale:
                raise TrainError(f"the ONNX export differs from torch by {diff:.3g} (> {tolerance:g} x the "
                                 f"largest output, {scale:.3g})")
            try:
                with open_model(tmp, backend="ONNXRuntime-CPU", threads=2) as m:
                    m.selftest()
            except ModelError as exc:
                raise TrainError(f"the exported model fails its self-test: {exc}") from None
        params = count_parameters(model)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes 0600; a model is a normal file
        if probe_tmp is not None:
            os.chmod(probe_tmp, _file_mode(sidecar))
            os.replace(probe_tmp, sidecar)
        os.replace(tmp, path)
        if probe_arr is None and sidecar.is_file():
            sidecar.unlink()
    except OSError as exc:
        raise TrainError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        for left in (tmp, probe_tmp):
            if left is not None and left.exists():
                try:
                    left.unlink()
                except OSError:
                    pass
    return {"max_abs_diff": diff, "params": params, "bytes": path.stat().st_size,
            "probe": None if probe_arr is None else str(sidecar)}
