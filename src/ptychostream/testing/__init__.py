"""Test support: an isolated loopback EPICS network and IOC subprocesses on it."""

from ptychostream.testing.launch import IOCProcess
from ptychostream.testing.loopback import EpicsNet, Slot

__all__ = ["EpicsNet", "IOCProcess", "Slot"]
