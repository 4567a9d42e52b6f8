"""Readers and writers of the file formats the device meets, one module per format.

``paths`` (``file.h5::/dataset`` arguments), ``hdf5`` (dataset look-ups), ``arrays`` (shapes),
``errors`` (:class:`~ptychostream.files.errors.FileFormatError`), ``positions`` (position tables:
CSV, NPY, NPZ, HDF5), ``frames`` (diffraction frame stacks), ``pairs`` (PtychoNN training NPZ),
``product`` (Ptychodus products), ``truth`` (simulated ground truth), ``record`` (the capture
record, read back), ``mosaic`` (mosaic images for scoring).  Only numpy and h5py below this.
"""
