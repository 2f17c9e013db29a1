"""Deprecated: the GPU reader moved to :mod:`xclay.datacube.gpuchunks` (one GPU read route,
for batches and xarray alike).

Names are still found here, each with a :class:`DeprecationWarning`; this module goes in
a later release.
"""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from xclay.datacube import gpuchunks

    value = getattr(gpuchunks, name)  # an AttributeError for names it never had
    warnings.warn(
        f"xclay.batch.gpu.{name} moved to xclay.datacube.gpuchunks.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
