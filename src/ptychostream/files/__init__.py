"""Readers and writers of the file formats the device meets, one module per format.

``paths`` (``file.h5::/dataset`` arguments), ``hdf5`` (dataset look-ups), ``arrays`` (shapes),
``errors`` (:class:`~ptychostream.files.errors.FileFormatError`), ``positions`` (position tables:
CSV, NPY, NPZ, HDF5), ``frames`` (diffraction frame stacks), ``pairs`` (PtychoNN training NPZ),
``product`` (Ptychodus products), ``truth`` (simulated ground truth), ``record`` (the capture
record, read back), ``mosaic`` (mosaic images for scoring), ``scan`` (:func:`~ptychostream.files.scan.read_scan`:
a whole scan, frames, positions in metres and geometry, from any layout below), ``scandata`` (its
:class:`~ptychostream.files.scan.Scan` and the checks every layout shares), ``npz`` (PtychoNN and
Tike NPZ scans), ``cxi`` (CXI files, read and written).  Only numpy and h5py below this (and,
optionally, the Ptychodus package's beamline readers through ``read_scan(..., reader=NAME)``).
"""
