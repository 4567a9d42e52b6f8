"""EPICS settings that keep every server and client on 127.0.0.1, with free ports.

Tests, the demo and the benchmarks use these; the ``ioc`` commands themselves simply
honour whatever EPICS_* variables they are given, as a beamline expects.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

__all__ = ["LOOPBACK_ENV", "free_port", "loopback_env", "apply_loopback", "Slot", "EpicsNet"]

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


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port that is free for both TCP and UDP on 127.0.0.1."""
    while True:
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        try:
            with socket.socket(socket.AF_INET, other) as s:
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
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
