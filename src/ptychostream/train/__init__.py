"""Train a PtychoNN-class network (PyTorch) and export it as a ptychostream ONNX model.

``ptychostream train OUT.onnx`` trains on

* **simulated pairs** (the default, ``--data sim``): random positions over random synthetic
  objects (families ``etched``, ``circuit``, ``dead_leaves``, ``blurred_noise``, ``procedural``;
  ``digits`` and ``siemens`` are held out for the demo), a simulated zone-plate or Gaussian probe or a
  measured one (``--probe FILE``: Ptychodus product HDF5 or ``.npy``), far-field frames with
  Poisson noise at ``--photons``;  the data stream is a pure function of (seed, step), so a
  resumed run sees the same batches;
* **pairs from files** (``--data FILE``, repeatable): PtychoNN NPZ (``reciprocal`` (N, H, W)
  intensities; ``real`` complex (N, h, w) patches or (N, C, h, w) with C0 = phase,
  C1 = amplitude), or a Ptychodus product HDF5 (``object``, ``probe_position_x_m``/``_y_m``)
  together with its diffraction file (``--frames FILE``): the patches are cut at the positions.

The network (:func:`build_net`) is the one definition of :mod:`ptychostream.model.network`
(the model zoo writes the same graph): an encoder of ``depth`` blocks [conv3×3+BN+ReLU ×2,
maxpool 2] with base·2^k channels, one decoder per head of ``depth`` blocks [conv3×3+BN+ReLU ×2,
bilinear ×2] and a conv3×3 to one channel; phase = tanh·π, amplitude = sigmoid.  With ``--output-size`` smaller than the input the decoders start from the central
cells of the bottleneck and give the central ``output-size``² of the patch: only the area the
probe lights can be learned, and a patch that holds just that area stitches into a sharper
mosaic (see docs/quality.md).  ``auto`` picks the square around 97 % of the probe's intensity.

Targets: the phase has its (probe-weighted) mean removed — a far-field intensity does not
know the absolute phase — and the loss is an L1 weighted by the probe intensity (smoothed,
saturated at 20 % of its peak, with a floor ``--loss-floor`` elsewhere), on the phase plus
``--amp-weight`` × the amplitude.  Adam with a one-cycle (or cyclic) learning rate, fixed seeds,
a rich progress bar, resumable checkpoints (``--checkpoint DIR``) and ``--device cpu|cuda``;
``--precision bf16`` (autocast) and channels-last convolutions for speed, an optional L1 loss on
the error's finite differences (``--grad-weight``) for sharper edges, and ``--init MODEL.onnx``
to continue from an exported model (the seed's retraining after each scan).

**Physics-informed (unsupervised) training** (``--scan FILE --physics-weight W``, :mod:`.physics`): the
predicted patch times the scan's known probe (every mode) → FFT → |·|² in the network's input geometry,
scaled to each frame's count, and the Poisson deviance of the measured counts; ``--overlap-weight``
adds the agreement of neighbouring patches where they overlap.  With ``--supervised-weight 0`` the
scan's frames alone train the network (no labels); otherwise they are mixed into the batches.

The export has a dynamic batch dimension (opset 17), the pre-processing (``Preprocess``) and
the rest of the metadata ``ptychostream.*`` (see :mod:`ptychostream.model.info`), is checked against
torch with onnxruntime (1e-4) and with ``open_model(...).selftest()``, and is written to a
temporary file beside the target and renamed over it only when all checks pass."""

from ptychostream.model.network import build_net, load_conv_weights, net_from_onnx
from ptychostream.train.cli import add_train_parser
from ptychostream.train.config import TRAIN_KINDS, TrainConfig, TrainError, probe_weight
from ptychostream.train.data import ArraySource, SimSource, load_pairs
from ptychostream.train.export import export_onnx
from ptychostream.train.loop import train, warm_start

__all__ = [
    "TRAIN_KINDS", "TrainConfig", "TrainError", "ArraySource", "SimSource", "build_net", "export_onnx",
    "load_conv_weights", "load_pairs", "net_from_onnx", "probe_weight", "train", "warm_start", "add_train_parser",
]
