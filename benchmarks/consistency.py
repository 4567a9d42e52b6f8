#!/usr/bin/env python3
"""The physics-consistency figure: its cost next to the shipped model's inference, and its values.

  python benchmarks/consistency.py            # 640 frames of the demo scan
  python benchmarks/consistency.py --quick    # seconds: checks the script, not speed

Both costs are measured in the same run on the same frames, batches of 64, one thread each way
as the IOC's inference thread runs them: the model's pre-processing + inference (the ceiling),
and the figure for every frame of a batch. The largest share that keeps the device at >= 90 % of
its rate without the figure is ``(1/0.9 - 1) · t_infer / t_figure``; ``ConsistencyShare``'s
default (db/reconstructor.db) must stay below it. Then the figure itself on the demo scan
(simdet's defaults, digits, spiral, 1000 points of 100 nm): the shipped model's patches, the
truth object's central 64×64 patches through the same forward model (the floor of this figure),
the full 128×128 truth patches (the shot-noise floor), an iterative reconstruction of the same
1000 frames (the plain numpy ePIE of ``quality/baselines.py``, the known probe, 30 iterations; its
object cut at each position, central 64×64 and full 128×128: the iterative floor) and two wrong
predictions.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def _timed(fn, repeat: int) -> float:
    fn()  # warm (plans, caches)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few frames, one repeat")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5, help="timed repeats (the best is kept)")
    ap.add_argument("--backend", default="ONNXRuntime-CPU")
    ap.add_argument("--iterations", type=int, default=30, help="ePIE iterations of the iterative floor (0: skip)")
    args = ap.parse_args(argv)

    from ptychostream.cli.demo import SHIPPED
    from ptychostream.devices.simdet import SimDetector
    from ptychostream.model.consistency import ForwardCheck
    from ptychostream.model.infer import open_model
    from ptychostream.model.info import probe_sidecar
    from ptychostream.sim.probes import load_probe

    sd = SimDetector()
    points = 200 if args.quick else 1000
    for name, value in {"cam1:Object": 2, "cam1:ScanPoints": points, "cam1:ScanStep": 1e-7,
                        "cam1:ScanPattern": 0}.items():
        sd.device.set(name, value)
    sim = sd.simulator()
    n_frames = args.batch if args.quick else 10 * args.batch
    idx = np.linspace(0, points - 1, n_frames).astype(int)
    raw = sim.frames(idx)
    model = open_model(str(SHIPPED), backend=args.backend, batch_size=args.batch, spinning=False)
    pre = model.info.preprocess.for_model(model.info.preprocess)[0]
    side = probe_sidecar(model.info)
    if side is None:
        raise SystemExit("the shipped model has no probe sidecar")
    probe, _ = load_probe(side, modes=True)  # every mode, as the device reads a sidecar
    check = ForwardCheck(probe)
    repeat = 1 if args.quick else args.repeat
    b = args.batch
    batches = [slice(s, s + b) for s in range(0, n_frames, b)]
    outs = [model.infer(pre.apply(raw[s])) for s in batches]

    def infer_all() -> None:
        for s in batches:
            model.infer(pre.apply(raw[s]))

    def figure_all() -> None:
        for s, out in zip(batches, outs):
            check.deviance(pre, raw[s], out.get("amplitude"), out["phase"])

    t_inf = _timed(infer_all, repeat) / n_frames
    t_fig = _timed(figure_all, repeat) / n_frames
    share_max = (1 / 0.9 - 1) * t_inf / t_fig
    print(f"machine: {os.cpu_count()} CPUs, backend {model.backend.name}, batch {b}, {n_frames} frames, "
          f"best of {repeat}")
    print(f"inference (pre-processing + model): {t_inf * 1e3:.3f} ms/frame = {1 / t_inf:.0f} frames/s")
    print(f"consistency figure, every frame:    {t_fig * 1e3:.3f} ms/frame "
          f"({100 * t_fig / t_inf:.0f} % of inference)")
    print(f"largest share keeping >= 90 % of the rate: {min(share_max, 1.0):.3f}"
          + (" (every frame)" if share_max >= 1 else "")
          + f"; ConsistencyShare 0.25 keeps {100 / (1 + 0.25 * t_fig / t_inf):.1f} %")

    dev = np.concatenate([check.deviance(pre, raw[s], o.get("amplitude"), o["phase"]) for s, o in zip(batches, outs)])
    truth = sim.patches(idx)
    c = slice(32, 96)
    floor = check.deviance(pre, raw, np.abs(truth[:, c, c]), np.angle(truth[:, c, c]))
    full = check.deviance(pre, raw, np.abs(truth), np.angle(truth))
    perm = np.random.default_rng(0).permutation(n_frames)
    amp = np.concatenate([o["amplitude"] for o in outs])
    phase = np.concatenate([o["phase"] for o in outs])
    shuffled = check.deviance(pre, raw, amp[perm], phase[perm])
    flat = check.deviance(pre, raw, None, np.zeros_like(phase))
    rows = [("shipped model", dev), ("truth, central 64x64 (this figure's floor)", floor)]
    if args.iterations and not args.quick:
        from ptychostream.quality.baselines import epie
        from ptychostream.sim.forward import extract_patches

        t0 = time.perf_counter()
        obj = epie(sim.frames(np.arange(sim.n)), sim.positions_m, sim.probe, sim.geometry.pixel_m, sim.obj.shape,
                   iterations=args.iterations)
        t_epie = time.perf_counter() - t0
        it = extract_patches(obj, sim.positions_m[idx], sim.geometry.pixel_m, probe.shape[0])
        rows += [(f"ePIE {args.iterations} it. ({t_epie:.0f} s), central 64x64", check.deviance(
                     pre, raw, np.abs(it[:, c, c]), np.angle(it[:, c, c]))),
                 (f"ePIE {args.iterations} it., full 128x128", check.deviance(pre, raw, np.abs(it), np.angle(it)))]
    print("\nPoisson deviance per pixel on the demo scan (median / 90th percentile):")
    for name, v in (*rows,
                    ("truth, full 128x128 (shot noise)", full), ("shipped model, patches shuffled", shuffled),
                    ("flat object", flat)):
        print(f"  {name:44s} {np.median(v):9.3f} / {np.percentile(v, 90):9.3f}")
    print(f"  shipped model / floor: {np.median(dev) / np.median(floor):.2f}x")
    if not args.quick:  # the foreign-instrument stand-in, its origin and orientation set right on the device
        from dataclasses import replace

        from ptychostream.sim.foreign import simulate_foreign

        scan, _ = simulate_foreign(seed=0)
        f_pre = replace(pre, fftshift=scan.origin == "corner", flip_y=scan.flip_y, flip_x=scan.flip_x,
                        transpose=scan.transpose)
        f_raw = np.asarray(scan.frames)
        f_out = model.infer(f_pre.apply(f_raw))
        foreign = check.deviance(f_pre, f_raw, f_out.get("amplitude"), f_out["phase"])
        print(f"  {'foreign stand-in (sim-foreign), shipped model':44s} {np.median(foreign):9.3f} / "
              f"{np.percentile(foreign, 90):9.3f}  (min {foreign.min():.1f}; {np.median(foreign) / np.median(dev):.0f}x "
              "the demo's)")
    model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
