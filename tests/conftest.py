"""Test fixtures: an isolated loopback EPICS 'network' and IOC subprocesses on free ports.

Every server and client in the tests is pinned to 127.0.0.1 (as ../shared/epics-loopback.env
does). Each IOC gets its own slot of PVA/CA ports; clients search all slots by unicast.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

from ptychostream.testing import EpicsNet, Slot
from ptychostream.testing import IOCProcess as _IOCProcess

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


def IOCProcess(args: list[str], prefix: str, slot: Slot) -> _IOCProcess:
    """An IOC subprocess on the test network."""
    return _IOCProcess(list(args), prefix, slot, NET)


def next_slot() -> Slot:
    return SLOTS[next(_slot_cycle)]


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {message} (last: {last!r})")


def text(value) -> str:
    """The string of a p4p NTScalar string (``str()`` of it adds the time stamp)."""
    return value.raw["value"]


def put_in_background(ctx, name: str, value, timeout: float = 300.0):
    """Start a put that completes later (a busy Acquire) without waiting for it."""
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            ctx.put(name, value, timeout=timeout)
        except BaseException as exc:  # reported by the caller if it cares
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.errors = errors
    return thread
