"""Test fixtures: an isolated loopback EPICS 'network' and IOC subprocesses on free ports.

Every server and client in the tests is pinned to 127.0.0.1 (as ../shared/epics-loopback.env
does). Each IOC gets its own slot of PVA/CA ports; clients search all slots by unicast.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

import pytest

# One libca in this process: pyepics takes epicscorelibs' copy, the one aioca (ophyd-async over CA)
# loads, as ophyd arranges when it is imported first. Without this, pyepics loads its own bundled
# copy beside it, and ophyd imported after pyepics warns (an error here) that it came too late.
try:
    import epicscorelibs.path.pyepics  # noqa: F401
except ImportError:
    pass

from ptychostream.testing import EpicsNet, Slot
from ptychostream.testing import IOCProcess as _IOCProcess

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
N_SLOTS = 8

NET = EpicsNet(N_SLOTS)
SLOTS = NET.slots
_slot_cycle = itertools.cycle(range(N_SLOTS))

#: what every client in this test session uses (pyepics and caproto read os.environ)
CLIENT_ENV = NET.client_env()
os.environ.update(CLIENT_ENV)


def server_env(slot: Slot) -> dict[str, str]:
    env = dict(os.environ)
    env.update(NET.server_env(slot))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def pva_client_conf() -> dict[str, str]:
    return NET.pva_conf()


def pva_context(**kw):
    """A p4p client Context on the test network (``nt=False`` for raw Values)."""
    from p4p.client.thread import Context

    return Context("pva", conf=pva_client_conf(), useenv=False, **kw)


@pytest.fixture(scope="module")
def ctx():
    """One p4p client Context per test module."""
    with pva_context() as c:
        yield c


#: every IOC subprocess started in this session; a failed test's report shows the logs of those running
_IOCS: list[_IOCProcess] = []
LOG_TAIL_LINES = 40


def IOCProcess(args: list[str], prefix: str, slot: Slot) -> _IOCProcess:
    """An IOC subprocess on the test network."""
    proc = _IOCProcess(list(args), prefix, slot, NET)
    _IOCS[:] = [p for p in _IOCS if p.proc is None or p.proc.poll() is None]  # the stopped ones' logs go
    _IOCS.append(proc)
    return proc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """A failed test's report ends with the last lines that each running IOC printed (a CI log is
    often all there is to go on)."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for proc in _IOCS:
        if proc.proc is not None and proc.proc.poll() is None:
            tail = "\n".join(proc.output[-LOG_TAIL_LINES:])
            report.sections.append((f"IOC {' '.join(proc.args)} (slot CA {proc.slot.ca}): last "
                                    f"{LOG_TAIL_LINES} lines", tail))


def next_slot() -> Slot:
    return SLOTS[next(_slot_cycle)]


@contextmanager
def detector_and_reconstructor(sim_prefix: str, rec_prefix: str, *,
                               rec_ca: bool = False) -> Iterator[tuple[_IOCProcess, _IOCProcess]]:
    """A simdet IOC and a reconstructor IOC on the test network, stopped on exit; PVA only, but for
    the reconstructor's CA with ``rec_ca``."""
    sim = IOCProcess(["simdet", "--prefix", sim_prefix, "--no-ca"], sim_prefix, next_slot()).start()
    try:
        rec_args = ["ioc", "--prefix", rec_prefix] + ([] if rec_ca else ["--no-ca"])
        rec = IOCProcess(rec_args, rec_prefix, next_slot()).start()
        try:
            yield sim, rec
        finally:
            rec.stop()
    finally:
        sim.stop()


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition", state: Callable[[], object] | None = None) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    This is how the tests synchronise: on a counter, a readback or a monitor's updates,
    never on a fixed sleep. On timeout the AssertionError shows the last value and, if
    given, what ``state()`` reports then.
    """
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() + interval > deadline:  # every poll starts within the timeout
            seen = f"; state: {state()!r}" if state is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {message} (last: {last!r}{seen})")
        time.sleep(interval)


def text(value) -> str:
    """The string of a p4p NTScalar string (``str()`` of it adds the time stamp)."""
    return value.raw["value"]


def plain(value) -> Any:
    """The value of a p4p NTScalar or NTEnum as a plain number or string (an enum gives its index)."""
    raw = value.raw
    return raw["value.index"] if raw.getID().startswith("epics:nt/NTEnum") else raw["value"]


def settings(ctx, prefix: str, names: list[str]) -> dict[str, Any]:
    """The current values of the setpoints ``names`` (read in one request)."""
    return {name: plain(v) for name, v in zip(names, ctx.get([prefix + n for n in names]))}


def restore(ctx, prefix: str, saved: Mapping[str, Any]) -> list[str]:
    """Put back, in order, every setpoint that differs from ``saved``; returns the names put.

    Fixtures call it before each test, so that no test sees the settings an earlier one left.
    """
    now = settings(ctx, prefix, list(saved))
    changed = [name for name, value in saved.items() if now[name] != value]
    for name in changed:
        ctx.put(prefix + name, saved[name], wait=True)
    return changed


def live_monitor(ctx, name: str, callback: Callable[[Any], None], timeout: float = 10.0, **kw):
    """``ctx.monitor(name, callback, **kw)``, returned once the subscription is live.

    A PVA monitor's first update is the PV's current value (an earlier test's last image,
    say), not a new one: it is waited for and not passed on, so ``callback`` sees only
    what is posted after this returns.
    """
    connected = threading.Event()

    def on_update(value) -> None:
        if connected.is_set():
            callback(value)
        else:
            connected.set()

    sub = ctx.monitor(name, on_update, **kw)
    if not connected.wait(timeout):
        sub.close()
        raise AssertionError(f"no first update from {name} within {timeout} s")
    return sub


def put_in_background(ctx, name: str, value, timeout: float = 300.0) -> threading.Thread:
    """Start a put that completes later (a busy Acquire) without waiting for it."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ctx.put(name, value, timeout=timeout)
        except BaseException as exc:  # reported by the caller if it cares
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.errors = errors  # type: ignore[attr-defined]  # the caller's handle on a failed put
    return thread


_session_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _session_status
    _session_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's own exit status, without the interpreter's teardown.

    After every test has passed and been reported, the process has been seen to die with a
    segmentation fault while the interpreter tore down the native client libraries it loaded
    (pyepics' libca, p4p/pvxs, onnxruntime and their threads; once in the clean-clone run of
    2026-12-02, after "376 passed"), turning a green run red. Nothing is left to report or clean up
    here: the IOC subprocesses are stopped by their fixtures and every report is written.
    """
    if _session_status is not None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_session_status)
