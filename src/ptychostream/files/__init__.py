"""Readers and writers of the file formats the device meets (HDF5 datasets, scans, products, records)."""
