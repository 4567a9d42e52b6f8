"""Joining results to scan positions and stitching patches into a mosaic (no threads, no I/O)."""
