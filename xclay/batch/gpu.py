"""Deprecated: the GPU reader moved to :mod:`xclay.datacube.gpuchunks` (one GPU read route,
for batches and xarray alike); names are still found here with a
:class:`DeprecationWarning`."""

from xclay._moved import moved

__getattr__ = moved(__name__, "xclay.datacube.gpuchunks")
