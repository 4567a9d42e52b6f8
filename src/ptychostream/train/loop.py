"""The training loop: optimiser, schedule, checkpoints, validation and the export at the end."""

from __future__ import annotations

import hashlib
import math
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ptychostream.model.info import ModelError, ModelInfo, load_model_file
from ptychostream.model.network import (
    HEADS,
    NetworkError,
    build_net,
    load_conv_weights,
    read_onnx,
)
from ptychostream.model.preprocess import Preprocess
from ptychostream.train.config import (
    CHECKPOINT_NAME,
    PRECISIONS,
    SELECT_FIGURES,
    TrainConfig,
    TrainError,
    amplitude_scale_for,
    auto_output_size,
    probe_weight,
    torch_module,
)
from ptychostream.train.data import (
    ArraySource,
    Batch,
    SimSource,
    fit_labels,
    load_pairs,
)
from ptychostream.train.export import export_onnx, probe_sidecar_path

__all__ = ["train", "warm_start", "make_source", "scale_amplitude"]


def _array_sha(arr: np.ndarray) -> str:
    """The first 12 hex digits of the sha256 of an array's bytes (probe ids)."""
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:12]


def _resolve_probe(cfg: TrainConfig, geometry: Any) -> tuple[np.ndarray, str]:
    from ptychostream.sim.probes import PROBE_KINDS, load_probe, make_probe

    if cfg.probe in PROBE_KINDS:
        probe = make_probe(cfg.probe, geometry.size, geometry.pixel_m, geometry=geometry)
        return probe, f"sim-{cfg.probe}-{geometry.size}-{_array_sha(probe)}"
    path = Path(cfg.probe)
    try:
        probe, px = load_probe(path)
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot use probe {cfg.probe!r}: {exc} (or name one of {', '.join(PROBE_KINDS)})") from None
    if probe.shape != (geometry.size, geometry.size):
        raise TrainError(f"probe {path} is {probe.shape}, the frames are {geometry.size}x{geometry.size}")
    if px is not None and abs(px / geometry.pixel_m - 1) > 0.01:
        raise TrainError(f"probe {path} has a pixel of {px:.4g} m but the geometry gives {geometry.pixel_m:.4g} m; "
                         "adjust --energy-kev/--distance-m/--detector-pixel-m")
    return probe, f"{path.stem}-{_array_sha(probe)}"


def make_source(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The data source and the facts the export needs (pre-processing, pixel, probe id, sizes).

    With the physics loss (``cfg.scan`` and a physics or overlap weight) the scan's frames join the
    labelled data, or are the only data when the supervised weight is 0 (``facts["physics"]`` is the loss).
    """
    if cfg.scan is None:
        if cfg.uses_physics():
            raise TrainError("--physics-weight/--overlap-weight need --scan FILE: the measured frames (and probe) "
                             "the physics loss explains")
        return _labelled_source(cfg)
    if not cfg.uses_physics():
        raise TrainError("--scan feeds the physics loss: set --physics-weight (and/or --overlap-weight) above 0")
    from ptychostream.train.physics import check_weights, scan_physics_source

    check_weights(cfg)
    if cfg.supervised_weight == 0:
        pre = Preprocess(scale=cfg.scale, normalise=cfg.normalise, crop_size=cfg.crop, bin=int(cfg.bin))
        return scan_physics_source(cfg, pre, cfg.output_size)
    labelled = _labelled_source(cfg)
    return scan_physics_source(cfg, labelled[1]["pre"], labelled[1]["out"], labelled=labelled)


def _labelled_source(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """The labelled data of ``cfg.data``: simulated pairs or pairs from files."""
    from ptychostream.sim.forward import Geometry

    pre = Preprocess(scale=cfg.scale, normalise=cfg.normalise, crop_size=cfg.crop, bin=int(cfg.bin))
    try:
        pre.validate()
        n_in = int(pre.output_shape((cfg.size, cfg.size))[-1])
    except ValueError as exc:
        raise TrainError(f"pre-processing: {exc}") from None
    if list(cfg.data) == ["sim"]:
        try:
            g = Geometry(cfg.energy_keV, cfg.distance_m, cfg.detector_pixel_m, cfg.size)
        except ValueError as exc:
            raise TrainError(str(exc)) from None
        probe, probe_id = _resolve_probe(cfg, g)
        out = auto_output_size(probe, n_in, cfg.depth) if cfg.output_size == "auto" else int(cfg.output_size)
        weight = probe_weight(probe, cfg.size, out, cfg.loss_floor)
        src = SimSource(cfg, probe, g, pre, out, weight)
        facts = {"pre": pre, "pixel_m": g.pixel_m, "probe_id": probe_id, "out": out, "input": n_in, "probe": probe,
                 "geometry": {"energy_keV": g.energy_keV, "distance_m": g.distance_m,
                              "detector_pixel_m": g.detector_pixel_m, "size": g.size}}
        return src, facts
    if "sim" in cfg.data:
        raise TrainError("--data sim cannot be mixed with training files")
    pairs = load_pairs(cfg.data, cfg.frames)
    frames = pairs["frames"]
    H, W = frames.shape[1:]
    try:
        if cfg.crop or cfg.bin > 1:
            n_in = int(pre.output_shape((H, W))[-1])
        else:
            pre = pre.fit_to((H, W), (cfg.size, cfg.size))
            n_in = cfg.size
    except ValueError as exc:
        raise TrainError(f"the frames ({H}x{W}) cannot feed a {cfg.size}x{cfg.size} model: {exc}") from None
    if "amplitude" in cfg.heads and pairs["amp"] is None:
        raise TrainError("the files hold phase labels only; train with --heads phase")
    file_probe: np.ndarray | None = pairs["probe"]
    if file_probe is not None and file_probe.shape != (cfg.size, cfg.size):
        file_probe = None
    out = auto_output_size(file_probe, n_in, cfg.depth) if cfg.output_size == "auto" else int(cfg.output_size)
    weight = probe_weight(file_probe, cfg.size, out, cfg.loss_floor)
    # labels of any size: resampled to the model's pixel (when both pixels are known), then the central
    # output patch is kept
    label_px, pixel = pairs["pixel_m"], cfg.pixel_m or pairs["pixel_m"]
    zoom = label_px / pixel if label_px and pixel else 1.0
    amp = pairs["amp"] if "amplitude" in cfg.heads else None
    try:
        phase, amp = fit_labels(pairs["phase"], amp, out, zoom)
    except ValueError as exc:
        lh, lw = pairs["phase"].shape[1:]
        raise TrainError(f"the {lh}x{lw} labels cannot feed {out}x{out} outputs: {exc}; pass --output-size "
                         f"{min(lh, lw) if zoom == 1 else 'smaller'} or labels that cover the output") from None
    arrays = ArraySource(cfg, frames, phase, amp, pre, out, weight,
                         {"source": "files", "files": pairs["desc"], "pairs": int(len(frames)),
                          "label_zoom": round(float(zoom), 6)})
    probe_id = f"files-{_array_sha(file_probe)}" if file_probe is not None else "unknown"
    return arrays, {"pre": pre, "pixel_m": pixel, "probe_id": probe_id, "out": out, "input": n_in,
                    "geometry": None, "amp_scale": amplitude_scale_for(amp), "probe": file_probe}


def _scheduler(torch: Any, opt: Any, cfg: TrainConfig, total: int) -> Any:
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(total, 10),
                                                   pct_start=0.25, div_factor=20.0, final_div_factor=200.0)
    if cfg.schedule == "cyclic":
        half = max(1, total // 8)
        return torch.optim.lr_scheduler.CyclicLR(opt, base_lr=cfg.lr / 10, max_lr=cfg.lr, step_size_up=half,
                                                 mode="triangular2", cycle_momentum=False)
    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    raise TrainError(f"--schedule must be onecycle, cyclic or constant, got {cfg.schedule!r}")


class _ClockSchedule:
    """One-cycle learning rate (cosine up over the first 25 %, cosine down) on a progress clock 0..1."""

    def __init__(self, opt: Any, max_lr: float, progress: Any, pct: float = 0.25, div: float = 20.0,
                 final_div: float = 200.0) -> None:
        self.opt, self.hi, self.progress, self.pct = opt, max_lr, progress, pct
        self.lo, self.end = max_lr / div, max_lr / div / final_div
        self.step()

    def lr(self, p: float) -> float:
        p = min(max(p, 0.0), 1.0)
        if p < self.pct:
            return self.lo + (self.hi - self.lo) * (1 - math.cos(math.pi * p / self.pct)) / 2
        q = (p - self.pct) / (1 - self.pct)
        return self.hi + (self.end - self.hi) * (1 - math.cos(math.pi * q)) / 2

    def step(self) -> None:
        self.last = self.lr(self.progress())
        for group in self.opt.param_groups:
            group["lr"] = self.last

    def get_last_lr(self) -> list[float]:
        return [self.last]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _save_checkpoint(torch: Any, folder: Path, state: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".last.", suffix=".pt.tmp", dir=folder)
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, folder / CHECKPOINT_NAME)
    except OSError as exc:
        raise TrainError(f"cannot write the checkpoint in {folder}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _check_init(init: str, facts: dict[str, Any], retarget: bool = False, check_pixel: bool = True) -> ModelInfo:
    """The --init model must take the same input as this run (pre-processing, pixel); returns its ModelInfo.

    With ``retarget`` only the network input size must agree: the model is moved to another instrument.
    """
    try:
        info = load_model_file(init)
    except ModelError as exc:
        raise TrainError(f"--init: {exc}") from None
    if info.kind != "onnx":
        raise TrainError(f"--init {init}: training continues from an ONNX model, not an engine")
    if retarget:
        n = int(facts["input"])
        if tuple(info.input_shape) != (n, n):
            raise TrainError(f"--init {init}: its input is {info.input_shape[0]}x{info.input_shape[1]}, "
                             f"this run feeds {n}x{n}")
        return info
    want, have = facts["pre"].to_dict(), info.preprocess.to_dict()
    bad = [f"{k} {have.get(k)!r} (this run: {want.get(k)!r})" for k in sorted(want) if have.get(k) != want.get(k)]
    if bad:
        raise TrainError(f"--init {init}: its pre-processing differs: {'; '.join(bad)}; pass the options "
                         "it was trained with (--crop, --bin, --scale, --normalise)")
    if check_pixel and info.pixel_m and facts["pixel_m"] and abs(info.pixel_m / facts["pixel_m"] - 1) > 1e-3:
        raise TrainError(f"--init {init}: its object pixel is {info.pixel_m:.4g} m, this run's is "
                         f"{facts['pixel_m']:.4g} m")
    return info


def _check_output_path(path: Path) -> None:
    folder = path.resolve().parent
    if path.suffix.lower() != ".onnx":
        raise TrainError(f"the output must be an .onnx file, got {path}")
    if not folder.is_dir():
        raise TrainError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TrainError(f"cannot write {path}: folder {folder} is not writable")
    if path.is_dir():
        raise TrainError(f"cannot write {path}: it is a folder")


def _loss(torch: Any, outs: tuple, batch: Any, heads: Sequence[str], weight: Any, amp_weight: float,
          grad_weight: float = 0.0):
    """Probe-weighted L1 per head (the reported parts), plus ``grad_weight`` × the L1 of the
    difference of the finite differences along y and x (it penalises blurred edges)."""
    total = 0.0
    parts = {}
    wsum = weight.sum()
    for head, pred in zip(heads, outs):
        pred = pred.float()
        target = batch["phase"] if head == "phase" else batch["amplitude"]
        diff = pred - target
        err = (diff.abs() * weight).sum(dim=(-2, -1)).mean() / wsum
        parts[head] = err
        term = err
        if grad_weight:
            gy = (diff[..., 1:, :] - diff[..., :-1, :]).abs() * torch.minimum(weight[1:, :], weight[:-1, :])
            gx = (diff[..., :, 1:] - diff[..., :, :-1]).abs() * torch.minimum(weight[:, 1:], weight[:, :-1])
            term = term + grad_weight * (gy.sum(dim=(-2, -1)) + gx.sum(dim=(-2, -1))).mean() / (2 * wsum)
        total = total + (term if head == "phase" else amp_weight * term)
    return total, parts


def _step_loss(torch: Any, cfg: TrainConfig, physics: Any, outs: tuple, b: dict[str, Any], heads: Sequence[str],
               weight: Any, grad_weight: float = 0.0) -> tuple[Any, dict[str, Any]]:
    """The weighted sum of the supervised loss (labelled rows), the Poisson deviance and the overlap term
    (rows with measured counts); (total, parts)."""
    total: Any = 0.0
    parts: dict[str, Any] = {}
    lab = b.get("labelled")
    if cfg.supervised_weight > 0 and (lab is None or bool(lab.any())):
        sel = outs if lab is None else tuple(o[lab] for o in outs)
        tb = b if lab is None else {k: b[k][lab] for k in ("phase", "amplitude") if k in b}
        sup, parts = _loss(torch, sel, tb, heads, weight, cfg.amp_weight, grad_weight)
        total = cfg.supervised_weight * sup
    if physics is not None and "counts" in b:
        rows = b["measured"]
        if bool(rows.any()):
            patches = physics.patches(tuple(o[rows] for o in outs), tuple(heads))
            if cfg.physics_weight > 0:
                ctx = b["context"][rows] if "context" in b else None
                parts["poisson"] = physics.deviance(patches, b["counts"][rows], context=ctx)
                total = total + cfg.physics_weight * parts["poisson"]
            if cfg.overlap_weight > 0 and "positions_m" in b:
                parts["overlap"] = physics.overlap(patches, b["positions_m"][rows])
                total = total + cfg.overlap_weight * parts["overlap"]
            if cfg.phase_anchor > 0:
                parts["anchor"] = physics.anchor(outs[list(heads).index("phase")].float()[rows][:, 0])
                total = total + cfg.phase_anchor * parts["anchor"]
            if cfg.wrap_weight > 0:
                parts["wrap"] = physics.wraps(outs[list(heads).index("phase")].float()[rows][:, 0])
                total = total + cfg.wrap_weight * parts["wrap"]
    return total, parts


def _describe_loss(cfg: TrainConfig, heads: Sequence[str], physics: Any) -> str:
    """The loss of a run in words (recorded in the model's training summary)."""
    words = []
    if physics is None or cfg.supervised_weight > 0:
        sup = "L1, probe-weighted" + (f", + {cfg.grad_weight:g} x L1 of the gradient error" if cfg.grad_weight
                                      else "") + (f", + {cfg.amp_weight:g} x amplitude" if "amplitude" in heads
                                                  else "")
        words.append(sup if physics is None else f"{cfg.supervised_weight:g} x ({sup})")
    if physics is not None and cfg.physics_weight > 0:
        words.append(f"{cfg.physics_weight:g} x Poisson deviance of the measured frames under the known probe")
    if physics is not None and cfg.overlap_weight > 0:
        words.append(f"{cfg.overlap_weight:g} x overlap agreement of neighbouring patches"
                     + (" (power-normalised)" if cfg.overlap_norm == "power" else ""))
    if physics is not None and cfg.phase_anchor > 0:
        words.append(f"{cfg.phase_anchor:g} x squared probe-weighted mean phase of each patch")
    if physics is not None and cfg.wrap_weight > 0:
        words.append(f"{cfg.wrap_weight:g} x squared phase jumps between neighbouring pixels above pi/2")
    return " + ".join(words)


def _export_probe(facts: dict[str, Any], parent: ModelInfo | None, retarget: bool) -> np.ndarray | None:
    """The probe written beside the model: the run's (``facts["probe"]``: the simulated, the files' or the
    scan's), else the --init model's sidecar when the run stays on its instrument, else None."""
    probe = facts.get("probe")
    if probe is not None:
        return np.asarray(probe)
    if parent is None or retarget:
        return None
    from ptychostream.model.info import probe_sidecar
    from ptychostream.sim.probes import load_probe

    path = probe_sidecar(parent)
    if path is None:
        return None
    try:
        return np.load(path) if path.suffix.lower() == ".npy" else load_probe(path, normalize=False)[0]
    except (OSError, ValueError, KeyError) as exc:
        raise TrainError(f"--init {parent.path}: cannot read its probe {path}: {exc}") from None


def _check_select(cfg: TrainConfig, physics: Any) -> None:
    """TrainError for a --select the run cannot make (unknown, no validation frames, no physics loss)."""
    if cfg.select not in SELECT_FIGURES:
        raise TrainError(f"--select must be one of {', '.join(SELECT_FIGURES)}, got {cfg.select!r}")
    if cfg.select == "none":
        return
    if cfg.val <= 0:
        raise TrainError("--select needs validation samples (--val above 0)")
    if cfg.select in ("poisson", "overlap") and physics is None:
        raise TrainError(f"--select {cfg.select} needs the physics loss (--scan with --physics-weight)")
    if cfg.select == "overlap" and cfg.overlap_weight <= 0:
        raise TrainError("--select overlap needs the overlap term (--overlap-weight above 0)")
    if physics is not None and int(cfg.select_frames) < 1:
        raise TrainError(f"--select-frames must be at least 1, got {cfg.select_frames!r}")


def _select_figure(cfg: TrainConfig, v: dict[str, float]) -> float:
    """The --select figure of a validation result (lower is better): one part, or the run's weighted loss."""
    if cfg.select != "loss":
        return float(v.get(cfg.select, math.nan))
    total = 0.0
    for k, x in v.items():
        w = {"poisson": cfg.physics_weight, "overlap": cfg.overlap_weight, "anchor": cfg.phase_anchor,
             "wrap": cfg.wrap_weight,
             "amplitude": cfg.supervised_weight * cfg.amp_weight}.get(k, cfg.supervised_weight)
        total += w * float(x)
    return total


def warm_start(net: Any, path: str | Path, x: Any) -> float:
    """Load an exported model's weights into ``net`` (same layout) to continue training from it.

    The export folds each BatchNorm into its convolution, so the convolutions take the file's
    weights and each BatchNorm is set to the identity on the batch ``x`` (data-dependent
    initialisation: γ = σ, β = μ, running statistics = μ, σ²).  Returns the largest difference
    between the initialised ``net`` (eval mode) and the file run by onnxruntime on ``x``.
    """
    torch = torch_module()
    try:
        model = read_onnx(path, "--init")
    except NetworkError as exc:
        raise TrainError(str(exc)) from None
    try:
        load_conv_weights(net, model, f"--init {path}")
    except NetworkError as exc:
        raise TrainError(f"{exc}; pass the same --base-channels, --depth, --heads and --output-size as its "
                         "training") from None
    with torch.no_grad():
        stats: dict[Any, tuple[Any, Any]] = {}

        def identity(bn: Any, inputs: tuple) -> None:
            y = inputs[0].float()
            mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
            bn.weight.copy_(torch.sqrt(var + bn.eps))
            bn.bias.copy_(mean)
            stats[bn] = (mean.clone(), var.clone())

        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        hooks = [bn.register_forward_pre_hook(identity) for bn in bns]
        was_training = net.training
        try:
            net.train()
            net(x)
        finally:
            for h in hooks:
                h.remove()
        for bn, (mean, var) in stats.items():  # the pass above also moved the running statistics
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
        net.eval()
        want = [t.float().cpu().numpy() for t in net(x)]
        net.train(was_training)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.float().cpu().contiguous().numpy()})
    if len(got) != len(want):
        raise TrainError(f"--init {path}: it has {len(got)} outputs, the network to train has {len(want)} heads")
    return max(float(np.max(np.abs(a - b))) for a, b in zip(want, got))


def scale_amplitude(net: Any, scale: float) -> Any:
    """``net`` with its amplitude head multiplied by ``scale`` (amplitudes up to ``scale``); ``net``
    itself when the scale is 1 or there is no amplitude head.

    The wrapper keeps ``config`` (with ``amplitude_scale``), ``heads`` and ``layout``; the export
    writes a Mul after the head's sigmoid, so any ONNX runtime serves the scaled amplitude.
    """
    torch = torch_module()
    heads = tuple(net.heads)
    if "amplitude" not in heads or abs(float(scale) - 1.0) < 1e-9:
        return net
    k = heads.index("amplitude")
    nn: Any = torch.nn

    class ScaledAmplitude(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.heads, self.layout = net.heads, net.layout
            self.config = {**net.config, "amplitude_scale": float(scale)}
            self.register_buffer("scale", torch.tensor(float(scale)))

        def forward(self, x: Any) -> tuple[Any, ...]:
            outs = list(self.net(x))
            outs[k] = outs[k] * self.scale
            return tuple(outs)

    return ScaledAmplitude()


def train(cfg: TrainConfig, progress: bool = True, log: Any = None, source: tuple[Any, dict[str, Any]] | None = None,
          on_progress: Any = None) -> dict[str, Any]:
    """Train as configured, export ``cfg.output`` and return a summary (also stored in the model).

    ``source``: a prepared (data source, facts) pair (as :func:`make_source` returns; the adapt
    command builds its own from a scan) instead of ``cfg.data``.  ``on_progress(fraction)`` is
    called after every step with the fraction of the run done (steps or the budget's clock).
    """
    torch = torch_module()
    out_path = Path(cfg.output)
    _check_output_path(out_path)
    for name in ("epochs", "samples", "batch"):
        if int(getattr(cfg, name)) < 1:
            raise TrainError(f"--{name} must be at least 1")
    if not cfg.heads or not set(cfg.heads) <= set(HEADS):
        raise TrainError(f"--heads must be from {HEADS}, got {cfg.heads}")
    heads = tuple(h for h in HEADS if h in cfg.heads)  # graph order: amplitude, phase (PtychoNN)
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise TrainError(f"--device must be cpu, cuda or auto, got {cfg.device!r}")
    if cfg.precision not in PRECISIONS:
        raise TrainError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.grad_weight < 0 or not math.isfinite(cfg.grad_weight):
        raise TrainError(f"--grad-weight must be a number >= 0, got {cfg.grad_weight!r}")
    torch.set_num_threads(max(1, int(cfg.threads)))
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)

    say = log or (lambda text: print(text, file=sys.stderr, flush=True))
    src, facts = source if source is not None else make_source(cfg)
    out = facts["out"]
    physics = facts.get("physics")
    if physics is not None and source is not None:
        from ptychostream.train.physics import check_weights

        check_weights(cfg)
    frames_only = physics is not None and cfg.supervised_weight == 0
    _check_select(cfg, physics)
    # a run on a scan's frames alone takes the scan's object pixel (the model is moved to its instrument)
    parent = _check_init(cfg.init, facts, cfg.retarget, check_pixel=not frames_only) if cfg.init else None
    # channels-last convolutions run about 1.7x faster on CPUs (oneDNN) and suit tensor cores
    try:
        net = build_net(facts["input"], cfg.base_channels, cfg.depth, heads, out)
    except NetworkError as exc:
        raise TrainError(str(exc)) from None
    amp_scale = init_scale = 1.0
    if "amplitude" in heads:
        if parent is not None:
            init_scale = float(((parent.training or {}).get("net") or {}).get("amplitude_scale", 1.0))
        if cfg.amp_scale is not None:
            if not (math.isfinite(cfg.amp_scale) and cfg.amp_scale >= 1.0):
                raise TrainError(f"--amp-scale must be a number >= 1, got {cfg.amp_scale!r}")
            amp_scale = float(cfg.amp_scale)
        else:
            amp_scale = max(float(facts.get("amp_scale", 1.0)), init_scale)
    base_net = net
    net = scale_amplitude(net, amp_scale).to(device, memory_format=torch.channels_last)
    # the --init file is reproduced with its own amplitude scale (the weights are shared)
    init_net = net if init_scale == amp_scale else scale_amplitude(base_net, init_scale)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    steps_per_epoch = src.steps_per_epoch(cfg.batch)
    total = steps_per_epoch * cfg.epochs
    weight = torch.from_numpy(src.weight).to(device)
    state = None

    start_step, history, elapsed0 = 0, [], 0.0
    ckpt_dir = Path(cfg.checkpoint) if cfg.checkpoint else None
    if ckpt_dir is not None:
        try:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainError(f"cannot use checkpoint folder {ckpt_dir}: {exc.strerror or exc}") from None
        ck = ckpt_dir / CHECKPOINT_NAME
        if ck.is_file():
            try:
                state = torch.load(ck, map_location=device, weights_only=False)
            except Exception as exc:  # a torn or foreign file
                raise TrainError(f"cannot resume from {ck}: {exc}") from None
            if state.get("key") != cfg.key() or (not cfg.budget_s and state.get("total") != total):
                raise TrainError(f"{ck} was written by a run with other settings; use another --checkpoint "
                                 "folder or delete it")
            total = int(state["total"])
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            start_step, history, elapsed0 = int(state["step"]), list(state["history"]), float(state["elapsed"])
            torch.set_rng_state(state["torch_rng"])
            say(f"resuming from {ck} at step {start_step}/{total}")

    val = src.validation(cfg.val) if cfg.val > 0 else None

    def to_dev(b: Batch) -> dict[str, Any]:
        d = {"x": torch.from_numpy(b.x).to(device).contiguous(memory_format=torch.channels_last),
             "phase": torch.from_numpy(b.phase).to(device)}
        if b.amplitude is not None:
            d["amplitude"] = torch.from_numpy(b.amplitude).to(device)
        if b.labelled is not None:
            d["labelled"] = torch.from_numpy(np.asarray(b.labelled, dtype=bool)).to(device)
        if b.counts is not None and physics is not None:
            d["counts"] = torch.from_numpy(b.counts).to(device)
            d["measured"] = torch.from_numpy(np.isfinite(b.counts[:, 0, 0])).to(device)
        if b.positions_m is not None:
            d["positions_m"] = torch.from_numpy(np.asarray(b.positions_m, dtype=np.float64)).to(device)
        if b.context is not None and physics is not None:
            d["context"] = torch.from_numpy(np.asarray(b.context, dtype=np.complex64)).to(device)
        return d

    init_info = None
    if cfg.init and parent is not None and state is None:
        diff = warm_start(init_net, cfg.init, to_dev(val if val is not None else src.batch(0, cfg.batch))["x"])
        if not diff <= 1e-3:
            raise TrainError(f"--init {cfg.init}: the network does not reproduce the file (max |diff| {diff:.3g})")
        init_info = {"file": Path(cfg.init).name, "sha256": parent.sha256, "max_abs_diff": diff}
        say(f"starting from {cfg.init} (reproduced to {diff:.2g})")
    elif state is not None:
        init_info = state.get("init")

    def forward(x: Any) -> tuple:
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return net(x)

    def evaluate() -> dict[str, float] | None:
        if val is None:
            return None
        net.eval()
        sums: dict[str, float] = {}
        rows: dict[str, int] = {}
        with torch.no_grad():
            for s in range(0, len(val.x), 64):
                chunk = val.rows(slice(s, s + 64))
                b = to_dev(chunk)
                _, parts = _step_loss(torch, cfg, physics, forward(b["x"]), b, heads, weight)
                n_lab = len(chunk.x) if chunk.labelled is None else int(np.sum(chunk.labelled))
                n_phys = 0 if chunk.counts is None else int(np.isfinite(chunk.counts[:, 0, 0]).sum())
                for k, v in parts.items():
                    k_rows = n_phys if k in ("poisson", "overlap", "anchor", "wrap") else n_lab
                    sums[k] = sums.get(k, 0.0) + float(v) * k_rows
                    rows[k] = rows.get(k, 0) + k_rows
        net.train()
        return {k: v / max(rows[k], 1) for k, v in sums.items()}

    if cfg.budget_clock not in ("wall", "cpu"):
        raise TrainError(f"--budget-clock must be wall or cpu, got {cfg.budget_clock!r}")
    # the budget runs on the wall clock, or on this process's CPU time (all threads: a shared box)
    now = time.monotonic if cfg.budget_clock == "wall" else time.process_time
    initial_val = evaluate() if cfg.init or physics is not None or cfg.select != "none" else None
    # the best checkpoint by the validation figure (--select): (figure, step, weights)
    best: tuple[float, int, dict[str, Any]] | None = None
    if state is not None and state.get("best") is not None:
        best = state["best"]

    def consider(v: dict[str, float] | None, at: int) -> None:
        nonlocal best
        if cfg.select == "none" or not v:
            return
        fig = _select_figure(cfg, v)
        if math.isfinite(fig) and (best is None or fig < best[0]):
            best = (fig, at, {k: t.detach().clone() for k, t in net.state_dict().items()})

    t0 = time.monotonic()
    c0 = now()
    step = start_step
    running: dict[str, float] = {}
    stopped = ""
    bar = None

    # the next batch is simulated on a worker thread while this one trains (numpy's FFTs and the
    # Poisson draws release the GIL); a batch is a pure function of its step, so order is kept
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="train-data")
    ahead: dict[int, Any] = {}

    def fetch(k: int) -> Batch:
        fut = ahead.pop(k, None) or pool.submit(src.batch, k, cfg.batch)
        ahead[k + 1] = pool.submit(src.batch, k + 1, cfg.batch)
        return fut.result()

    def predict_patches(x: np.ndarray) -> np.ndarray:
        """The network's complex patches for pre-processed frames (eval mode, no gradient)."""
        assert physics is not None
        net.eval()
        with torch.no_grad():
            xt = torch.from_numpy(np.ascontiguousarray(x)).to(device).contiguous(memory_format=torch.channels_last)
            p = physics.patches(forward(xt), heads)
        net.train()
        return np.asarray(p.cpu().numpy(), dtype=np.complex64)

    use_context = physics is not None and cfg.physics_context == "mosaic" and hasattr(src, "refresh_context")
    if physics is not None and cfg.physics_context not in ("border", "mosaic"):
        raise TrainError(f"--physics-context must be border or mosaic, got {cfg.physics_context!r}")

    if state is None and not use_context:
        consider(initial_val, start_step)

    def one_step(k: int) -> None:
        nonlocal val
        if use_context and k % max(1, int(cfg.context_every)) == 0:
            for fut in ahead.values():  # batches made before the refresh carry the old surround
                fut.cancel()
            ahead.clear()
            src.refresh_context(predict_patches)
            if cfg.select != "none" and val is not None:
                # the selection figure is made in the current surround too (the starting model's as well)
                val = src.validation(cfg.val)
                if k == start_step and state is None:
                    consider(evaluate(), k)
        b = to_dev(fetch(k))
        loss, parts = _step_loss(torch, cfg, physics, forward(b["x"]), b, heads, weight, cfg.grad_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for name, v in parts.items():
            fv = float(v.detach())
            running[name] = 0.98 * running.get(name, fv) + 0.02 * fv

    def clock() -> float:
        """Training seconds so far (wall or CPU, ``cfg.budget_clock``), across resumes."""
        return elapsed0 + now() - c0

    budget = None
    if cfg.budget_s:
        # a one-cycle schedule on the clock instead of the step count: it fills the budget whatever
        # the machine's speed (the number of steps done is recorded in the model)
        # leave time for the last evaluation and export
        budget = max(min(10.0, float(cfg.budget_s)), float(cfg.budget_s) - float(cfg.budget_reserve_s))
        sched = _ClockSchedule(opt, cfg.lr, lambda: clock() / budget)
        total = 0
    else:
        sched = _scheduler(torch, opt, cfg, total)
        if state is not None:
            sched.load_state_dict(state["sched"])
            opt.load_state_dict(state["opt"])  # a new scheduler resets lr/betas in the groups: restore them
    if progress:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("[bold blue]train"), BarColumn(), MofNCompleteColumn(),
                       TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                       transient=False)
        task = bar.add_task("train", total=total or budget, info="")
        bar.update(task, completed=step if budget is None else clock())  # add_task is annotated int only
        bar.start()
    net.train()
    try:
        while (step < total) if budget is None else (clock() < budget):
            one_step(step)
            sched.step()
            step += 1
            if on_progress is not None:
                on_progress(min(1.0, step / total if budget is None else clock() / budget))
            done = step >= total if budget is None else clock() >= budget
            if bar is not None:
                bar.update(task, completed=step if budget is None else clock(), info=" ".join(f"{k[:3]} {v:.4f}" for k, v in running.items())
                           + f" lr {sched.get_last_lr()[0]:.2e}")
            end_epoch = step % steps_per_epoch == 0 or done
            over_time = cfg.time_limit_s is not None and elapsed0 + time.monotonic() - t0 > cfg.time_limit_s
            if end_epoch or over_time:
                v = evaluate() if end_epoch else None
                consider(v, step)
                history.append({"step": step, "epoch": step / steps_per_epoch, "train": dict(running),
                                "val": v, "time_s": round(elapsed0 + time.monotonic() - t0, 1)})
                msg = (f"epoch {step / steps_per_epoch:.2f} step {step}/{total or '?'} "
                       f"({clock() / 60:.1f} min, lr {sched.get_last_lr()[0]:.2e}): train "
                       + " ".join(f"{k} {x:.4f}" for k, x in running.items()))
                if v:
                    msg += "  val " + " ".join(f"{k} {x:.4f}" for k, x in v.items())
                if bar is not None:
                    bar.console.print(msg)
                else:
                    say(msg)
                if ckpt_dir is not None:
                    _save_checkpoint(torch, ckpt_dir, {
                        "key": cfg.key(), "total": total, "step": step, "net": net.state_dict(), "init": init_info,
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "history": history,
                        "elapsed": elapsed0 + time.monotonic() - t0, "torch_rng": torch.get_rng_state(),
                        "best": best})
            if over_time and not done:
                stopped = f"time limit {cfg.time_limit_s:g} s reached at step {step}"
                say(stopped)
                break
    finally:
        if bar is not None:
            bar.stop()
        for fut in ahead.values():
            fut.cancel()
        pool.shutdown(wait=True)
    elapsed = elapsed0 + time.monotonic() - t0
    selection = None
    if cfg.select != "none":
        last_val = evaluate()
        consider(last_val, step)
        selection = {"figure": cfg.select, "frames": len(val.x) if val is not None else 0,
                     "last_step": step, "last_value": None if not last_val else round(_select_figure(cfg, last_val), 5)}
        if best is not None:
            net.load_state_dict(best[2])
            selection.update(best_step=best[1], best_value=round(best[0], 5))
            say(f"exporting the checkpoint of step {best[1]} ({cfg.select} {best[0]:.4g} on the validation "
                f"frames; the last step's: {selection['last_value']})")
    final_val = evaluate()
    summary = {
        "framework": f"torch {torch.__version__}", "device": device, "seed": cfg.seed,
        "epochs": round(step / steps_per_epoch, 3), "steps": step, "planned_steps": total or None,
        "batch": cfg.batch, "samples_seen": step * cfg.batch, "lr": cfg.lr, "schedule": cfg.schedule,
        "budget_s": cfg.budget_s,
        "optimizer": "Adam", "precision": cfg.precision, "init": init_info,
        "loss": _describe_loss(cfg, heads, physics),
        "final_train_loss": {k: round(v, 5) for k, v in running.items()},
        "final_val_loss": None if final_val is None else {k: round(v, 5) for k, v in final_val.items()},
        "initial_val_loss": None if initial_val is None else {k: round(v, 5) for k, v in initial_val.items()},
        "cpu_s": round(time.process_time(), 1), "budget_clock": cfg.budget_clock,
        "data": src.describe(), "net": net.config, "time_s": round(elapsed, 1),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stopped_early": stopped or None,
        "checkpoint_selection": selection,
        "phase_target": "object phase minus its probe-weighted mean, central output_size px",
    }
    if facts["geometry"]:
        summary["geometry"] = facts["geometry"]
    # the probe written beside the model (its sidecar, named in its metadata)
    probe = _export_probe(facts, parent, cfg.retarget)
    summary["probe_file"] = None if probe is None else probe_sidecar_path(out_path).name
    if physics is not None:
        summary["physics"] = dict(physics.describe(), supervised_weight=cfg.supervised_weight,
                                  physics_weight=cfg.physics_weight, overlap_weight=cfg.overlap_weight,
                                  phase_anchor=cfg.phase_anchor, wrap_weight=cfg.wrap_weight)
    meta = {
        "ptychostream.name": cfg.name or out_path.stem,
        "ptychostream.preprocess": facts["pre"].to_json(),
        "ptychostream.outputs": list(heads),
        "ptychostream.probe_id": facts["probe_id"],
        "ptychostream.training": summary,
        # a hint for the live mosaic: patches this small stitch better with offset "overlap", and phases
        # known only modulo 2 pi need the complex domain
        "ptychostream.stitch": {"offset": cfg.stitch_offset, "window": "hann", "domain": cfg.hinted_domain()},
    }
    if facts["pixel_m"]:
        meta["ptychostream.pixel_m"] = repr(float(facts["pixel_m"]))
    exp = export_onnx(net, out_path, meta, probe=probe)
    summary.update(output=str(out_path), params=exp["params"], onnx_bytes=exp["bytes"],
                   onnx_max_abs_diff=exp["max_abs_diff"])
    return summary
