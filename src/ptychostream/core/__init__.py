"""The protocol-free core: PV specs parsed from ``db/``, the device state, frame and batch types, counters.

Imports nothing else of the package, and neither p4p nor caproto."""
