"""Deprecated: the chunk reads moved to :mod:`xclay.datacube.chunks` (the store reads itself).

Names are still found here, each with a :class:`DeprecationWarning`; this module goes in
a later release.
"""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from xclay.datacube import chunks

    value = getattr(chunks, name)  # an AttributeError for names it never had
    warnings.warn(
        f"xclay.batch.chunkio.{name} moved to xclay.datacube.chunks.{name}",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
