"""Converters from public dataset formats to the mpidd HDF5 layout."""
