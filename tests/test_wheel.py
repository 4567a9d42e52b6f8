"""Issue #16: the wheel carries db/ (and the IOC files, screens and model), and the installed IOC works.

CI and the dev venv install in editable mode, where db/ is found in the source tree. Here the
package is built as an sdist from a copy of the checkout (what a fresh clone holds), the wheel is
built from that sdist, and it is installed with its dependencies into a fresh venv. From there,
with the working directory outside the checkout and no PTYCHOSTREAM_* variables, the reconstructor
and the simulated detector are started on the test network and used over PVA and CA.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from conftest import (
    ROOT,
    IOCProcess,
    next_slot,
    plain,
    put_in_background,
    pva_context,
    text,
    wait_for,
)

from ptychostream.core.pvdb import load_db
from ptychostream.testing import IOCProcess as Launched

pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]

R = "WHL:NN:"
S = "WHL:SIM:"
#: what the source tree could otherwise lend the installed package
LEAKS = ("PTYCHOSTREAM_DB_DIR", "PTYCHOSTREAM_MODELS", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
#: the files the installed IOC needs beside the package: share/ptychostream/<folder>/<name>
SHARED = {"db": ["reconstructor.db", "simdetector.db"],
          "ioc": ["reconstructor.toml", "simdetector.toml", "st.cmd", "st-simdet.cmd"],
          "opi": ["reconstructor.bob", "reconstructor.ui", "simdet.bob"]}
MODEL = "ptychostream/models/ptychonn_edge.onnx"
MODEL_READY, MODEL_ERROR = 2, 3  # ModelStatus_RBV: None, Loading, Ready, Error


@dataclass(frozen=True)
class Installed:
    """A fresh venv with the wheel installed, and where it came from."""

    wheel: Path
    sdist: Path
    venv: Path
    outside: Path  # a working directory outside the checkout
    timings: dict[str, float]

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def share(self) -> Path:
        return self.venv / "share" / "ptychostream"


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in LEAKS}


def run(cmd: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    """Run ``cmd``; its output, or an AssertionError with the output."""
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


def copy_checkout(dest: Path) -> None:
    """The tracked and untracked-but-not-ignored files of the checkout: what a fresh clone builds from."""
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # a tracked file deleted in the work tree is left out, as git would
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[Installed]:
    """sdist from a copy of the checkout, wheel from the sdist, fresh venv, wheel installed with its deps."""
    base = tmp_path_factory.mktemp("wheel")
    tree, dist, outside = base / "tree", base / "dist", base / "outside"
    for d in (tree, dist, outside):
        d.mkdir()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    copy_checkout(tree)
    # the PEP 517 hook a frontend calls (no `build` package in the venv), without build isolation
    sdist = dist / run([sys.executable, "-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"],
                       cwd=tree).strip().splitlines()[-1]
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, sdist], cwd=outside)
    wheel, = dist.glob("ptychostream-*.whl")
    timings["build"] = time.monotonic() - t0
    t0 = time.monotonic()
    venv = base / "venv"
    # this venv's pip installs into the fresh one (--python): no ensurepip there; --no-compile, since
    # byte-compiling scipy, matplotlib and skimage costs more CPU than the rest of the module
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=outside)
    run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile", wheel],
        cwd=outside)
    timings["install"] = time.monotonic() - t0
    print(f"\nwheel test: build {timings['build']:.1f} s, venv + install with deps {timings['install']:.1f} s")
    yield Installed(wheel, sdist, venv, outside, timings)
    shutil.rmtree(venv)  # 0.5 GB; pytest keeps the last three base temp folders


def test_wheel_and_sdist_carry_db_ioc_screens_and_model(installed):
    with zipfile.ZipFile(installed.wheel) as whl:
        names = set(whl.namelist())
        data = "-".join(installed.wheel.name.split("-")[:2]) + ".data/data/share/ptychostream"
        for folder, files in SHARED.items():
            for name in files:
                assert f"{data}/{folder}/{name}" in names, f"{folder}/{name} not in {installed.wheel.name}"
                assert whl.read(f"{data}/{folder}/{name}") == (ROOT / folder / name).read_bytes()
        assert MODEL in names
        assert whl.getinfo(f"{data}/ioc/st.cmd").external_attr >> 16 & 0o111, "st.cmd lost its executable bit"
    with tarfile.open(installed.sdist) as sd:
        top = installed.sdist.name.removesuffix(".tar.gz")
        members = set(sd.getnames())
    assert {f"{top}/{folder}/{name}" for folder, files in SHARED.items() for name in files} <= members
    assert f"{top}/src/{MODEL}" in members


def test_installed_db_dir_is_in_the_fresh_venv(installed):
    code = ("import json, ptychostream, ptychostream.core.pvdb as p; "
            "print(json.dumps({'db_dir': str(p.db_dir()), 'package': ptychostream.__file__, "
            "'pvs': len(p.load_db('reconstructor.db')), 'simdet_pvs': len(p.load_db('simdetector.db'))}))")
    got = json.loads(run([installed.python, "-c", code], cwd=installed.outside).strip().splitlines()[-1])
    print(f"\ninstalled ptychostream.core.pvdb.db_dir() = {got['db_dir']}\ninstalled package = {got['package']}")
    venv = installed.venv.resolve()
    assert Path(got["db_dir"]).resolve() == (installed.share / "db").resolve()
    assert Path(got["package"]).resolve().is_relative_to(venv)
    assert not Path(got["package"]).resolve().is_relative_to(ROOT)
    assert got["pvs"] == len(load_db("reconstructor.db")) and got["simdet_pvs"] == len(load_db("simdetector.db"))
    for folder, files in SHARED.items():
        for name in files:
            assert (installed.share / folder / name).read_bytes() == (ROOT / folder / name).read_bytes()
    assert os.access(installed.share / "ioc" / "st.cmd", os.X_OK)


@pytest.fixture(scope="module")
def installed_iocs(installed) -> Iterator[tuple[Launched, Launched]]:
    """The installed simdet and reconstructor, each with its installed ioc/*.toml, started from outside the checkout."""
    conf = installed.share / "ioc"
    with pytest.MonkeyPatch.context() as mp:
        for key in LEAKS:
            mp.delenv(key, raising=False)
        mp.chdir(installed.outside)  # the IOCs' working directory
        mp.setattr(sys, "executable", str(installed.python))  # IOCProcess runs `sys.executable -m ptychostream`
        t0 = time.monotonic()
        sim = IOCProcess(["simdet", "--prefix", S, "--config", str(conf / "simdetector.toml")], S, next_slot()).start()
        try:
            rec = IOCProcess(["ioc", "--prefix", R, "--config", str(conf / "reconstructor.toml")], R,
                             next_slot()).start()
        except BaseException:
            sim.stop()
            raise
    print(f"\ninstalled IOCs ready in {time.monotonic() - t0:.1f} s")
    try:
        yield sim, rec
    finally:
        codes = rec.stop(), sim.stop()
    assert codes == (0, 0), f"exit codes {codes}\n{rec.log()}\n{sim.log()}"


def test_installed_iocs_serve_pva_and_ca_and_reconstruct(installed, installed_iocs):
    import epics  # type: ignore[import-untyped]
    from caproto.sync.client import read as ca_get
    from caproto.sync.client import write as ca_put
    from p4p.client.thread import RemoteError

    with pva_context() as ctx:
        # the shipped model, loaded by the installed reconstructor.toml through ${PTYCHOSTREAM_MODELS}
        wait_for(lambda: int(ctx.get(R + "ModelStatus_RBV")) in (MODEL_READY, MODEL_ERROR), timeout=60,
                 message="ModelStatus_RBV Ready or Error")
        assert int(ctx.get(R + "ModelStatus_RBV")) == MODEL_READY, text(ctx.get(R + "Message_RBV"))
        model = Path(text(ctx.get(R + "ModelPath_RBV"))).resolve()
        assert model.is_relative_to(installed.venv.resolve()) and model.name == "ptychonn_edge.onnx"
        assert plain(ctx.get(R + "BatchSize_RBV")) == 64  # from the installed reconstructor.toml

        # PVA put, PVA and CA (caproto) readback
        ctx.put(R + "BatchSize", 16, wait=True)
        wait_for(lambda: plain(ctx.get(R + "BatchSize_RBV")) == 16, message="BatchSize_RBV 16 over PVA")
        assert ca_get(R + "BatchSize_RBV", repeater=False, timeout=5).data[0] == 16
        # CA put (caproto), PVA readback; on the detector CA put (pyepics), PVA and CA readback
        ca_put(R + "BacklogLimit", 5000, repeater=False, timeout=5, notify=True)
        wait_for(lambda: plain(ctx.get(R + "BacklogLimit_RBV")) == 5000, message="BacklogLimit_RBV 5000")
        assert epics.caput(S + "cam1:NumImages", 40, wait=True, timeout=5) == 1
        wait_for(lambda: plain(ctx.get(S + "cam1:NumImages_RBV")) == 40, message="cam1:NumImages_RBV 40")
        assert epics.caget(S + "cam1:NumImages_RBV", timeout=5, use_monitor=False) == 40
        # a bad put is refused with a message, and the IOC keeps serving
        with pytest.raises(RemoteError, match="limits"):
            ctx.put(R + "BatchSize", -3, wait=True)
        assert plain(ctx.get(R + "BatchSize_RBV")) == 16 and "limits" in text(ctx.get(R + "Message_RBV"))

        # frames from the installed detector through the installed model
        ctx.put(R + "InputPV", S + "Pva1:Image", wait=True)
        wait_for(lambda: plain(ctx.get(R + "InputConnected_RBV")) == 1, timeout=20, message="InputConnected_RBV")
        ctx.put(S + "cam1:ArrayCounter", 0, wait=True)
        put_in_background(ctx, S + "cam1:Acquire", 1)
        names = [R + n + "_RBV" for n in ("Received", "Processed", "Dropped", "Rejected", "Backlog")]

        def counters() -> list[int]:
            return [int(v) for v in ctx.get(names)]

        got = wait_for(lambda: (c := counters())[0] == 40 and c[0] == sum(c[1:]) and c[4] == 0 and c,
                       timeout=60, message="40 frames received, none left in the backlog")
        assert got == [40, 40, 0, 0, 0], f"Received, Processed, Dropped, Rejected, Backlog = {got}"
