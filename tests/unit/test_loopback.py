"""The loopback test network's ports: free for TCP and UDP, and never ones the kernel hands to clients."""

from __future__ import annotations

import socket

from ptychostream.testing.loopback import EpicsNet, ephemeral_range, free_port


def test_free_ports_lie_outside_the_ephemeral_range_and_bind_both_ways():
    low, high = ephemeral_range()
    ports = [free_port() for _ in range(50)]
    assert all(not (low <= p <= high) for p in ports), (low, high, ports)
    assert len(set(ports)) > 40  # random, not one port over and over
    for p in ports[:10]:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("127.0.0.1", p))


def test_network_slots_are_distinct_and_outside_the_ephemeral_range():
    """A client's outgoing socket takes its local port from the ephemeral range; a slot there could be
    taken before its server binds it (seen in CI as "Address already in use" minutes into the run)."""
    low, high = ephemeral_range()
    net = EpicsNet(8)
    slot_ports = [p for s in net.slots for p in (s.pva_tcp, s.pva_udp, s.ca)] + [net.ca_repeater]
    assert len(set(slot_ports)) == 8 * 3 + 1
    assert all(not (low <= p <= high) for p in slot_ports), (low, high, slot_ports)
