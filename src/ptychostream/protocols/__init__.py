"""The protocol front ends: the NTNDArray codec, the p4p PVA server, the caproto CA server, ``serve``."""
