"""Iterative phase retrieval for training labels: pty-chi's engines on a scan (``ptychostream reconstruct``).

:mod:`~ptychostream.iterative.engine` (``reconstruct``, ``write_reconstruction``) wraps pty-chi,
:mod:`~ptychostream.iterative.probe` makes the starting probe, :mod:`~ptychostream.iterative.cli` is the
command.  pty-chi and torch are imported only when a reconstruction runs (the ``iterative`` extra).
"""
