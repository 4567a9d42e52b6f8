"""EPICS settings that keep every server and client on 127.0.0.1, with free ports.

Tests, the demo and the benchmarks use these; the ``ioc`` commands themselves simply
honour whatever EPICS_* variables they are given, as a beamline expects.
"""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass

__all__ = ["LOOPBACK_ENV", "free_port", "ephemeral_range", "loopback_env", "apply_loopback", "Slot", "EpicsNet"]

LOOPBACK_ENV = {
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_PVAS_AUTO_BEACON_ADDR_LIST": "NO",
    "EPICS_CA_ADDR_LIST": "127.0.0.1",
    "EPICS_CA_AUTO_ADDR_LIST": "NO",
    "EPICS_CAS_INTF_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_BEACON_ADDR_LIST": "127.0.0.1",
    "EPICS_CAS_AUTO_BEACON_ADDR_LIST": "NO",
}


_RANDOM = random.SystemRandom()
_WINDOW_LOW = 20000  # above the registered services tests might meet (EPICS 5064-5076, databases, ...)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned local ports (Linux; IANA's 49152-65535 elsewhere)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(v) for v in fh.read().split())
        return low, high
    except (OSError, ValueError):
        return 49152, 65535


def _bindable(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP on 127.0.0.1, outside the ephemeral range.

    A port the kernel handed out (bind to port 0) lies in the ephemeral range, where it can be
    handed again, as the local port of any client's outgoing connection, before the server that
    was meant to bind it does: "Address already in use" minutes later in a long run. Ports below
    that range are only ever taken by an explicit bind. ``kind`` is kept for callers that name it.
    """
    low, high = ephemeral_range()
    window = (_WINDOW_LOW, low) if low - _WINDOW_LOW >= 1000 else (high + 1, 65536)
    if window[1] - window[0] >= 1000:
        for _ in range(200):
            port = _RANDOM.randrange(*window)
            if _bindable(port):
                return port
    while True:  # no room outside the ephemeral range: let the kernel choose
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if _bindable(port):
            return port


def loopback_env() -> dict[str, str]:
    """Loopback settings plus fresh server/broadcast ports for one isolated EPICS 'network'."""
    env = dict(LOOPBACK_ENV)
    pva, pva_bcast, ca, ca_rep = (free_port() for _ in range(4))
    env.update({
        "EPICS_PVA_SERVER_PORT": str(pva),
        "EPICS_PVAS_SERVER_PORT": str(pva),
        "EPICS_PVA_BROADCAST_PORT": str(pva_bcast),
        "EPICS_PVAS_BROADCAST_PORT": str(pva_bcast),
        "EPICS_CA_SERVER_PORT": str(ca),
        "EPICS_CAS_SERVER_PORT": str(ca),
        "EPICS_CA_REPEATER_PORT": str(ca_rep),
    })
    return env


def apply_loopback(env: dict[str, str] | None = None) -> dict[str, str]:
    """Put loopback settings (and ports) into os.environ; returns what was set."""
    env = env or loopback_env()
    os.environ.update(env)
    return env


@dataclass(frozen=True)
class Slot:
    """The ports of one server process: PVA TCP, PVA UDP (search), CA (TCP and UDP)."""

    pva_tcp: int
    pva_udp: int
    ca: int


class EpicsNet:
    """A private loopback EPICS network of ``n`` server slots.

    Servers sharing a UDP port on 127.0.0.1 would steal each other's unicast searches,
    so each server gets its own slot and clients search every slot.
    """

    def __init__(self, n: int = 4) -> None:
        used: set[int] = set()
        slots: list[Slot] = []
        while len(slots) < n:
            trio = [free_port() for _ in range(3)]
            if len(set(trio) | used) == len(used) + 3:
                used.update(trio)
                slots.append(Slot(*trio))
        self.slots = slots
        self.ca_repeater = free_port()

    def client_env(self) -> dict[str, str]:
        env = dict(LOOPBACK_ENV)
        env.update({
            "EPICS_PVA_ADDR_LIST": " ".join(f"127.0.0.1:{s.pva_udp}" for s in self.slots),
            "EPICS_CA_ADDR_LIST": " ".join(f"127.0.0.1:{s.ca}" for s in self.slots),
            "EPICS_PVA_BROADCAST_PORT": str(self.slots[0].pva_udp),
            "EPICS_CA_REPEATER_PORT": str(self.ca_repeater),
            "EPICS_CAS_BEACON_PORT": str(self.ca_repeater),
            "EPICS_CA_MAX_ARRAY_BYTES": "100000000",
        })
        return env

    def server_env(self, slot: Slot) -> dict[str, str]:
        env = self.client_env()
        env.update({
            "EPICS_PVAS_SERVER_PORT": str(slot.pva_tcp),
            "EPICS_PVA_SERVER_PORT": str(slot.pva_tcp),
            "EPICS_PVAS_BROADCAST_PORT": str(slot.pva_udp),
            "EPICS_CAS_SERVER_PORT": str(slot.ca),
            "EPICS_CA_SERVER_PORT": str(slot.ca),
        })
        return env

    def pva_conf(self) -> dict[str, str]:
        """p4p client ``conf=`` for this network."""
        return {k: v for k, v in self.client_env().items() if k.startswith("EPICS_PVA")}
