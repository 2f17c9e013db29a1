"""Deprecated: the chunk reads moved to :mod:`xclay.datacube.chunks` (the store reads
itself); names are still found here with a :class:`DeprecationWarning`."""

from xclay._moved import moved

__getattr__ = moved(__name__, "xclay.datacube.chunks")
