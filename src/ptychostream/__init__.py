"""ptychostream: live neural-network ptychography served as an EPICS soft IOC."""

__version__ = "0.1.0"
