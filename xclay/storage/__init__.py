"""Where data lives: local paths and object storage behind one :class:`Location`.

Everything xclay reads and writes (datacubes, embeddings Zarr, GeoParquet, COGs, STAC
items and catalogs, checkpoints, a run's state and markers) goes through a location
resolved once from what the user gave (a path, ``file://``, ``s3://``, ``gs://``,
``az://``, ``http(s)://``). This package is ground: it imports nothing of xclay but its
errors, and no module above it knows which kind of location it was handed.
"""

from xclay.storage.location import (
    REMOTE_SCHEMES,
    Location,
    StorageOptions,
    Where,
    is_url,
    location,
    use_storage_options,
)

__all__ = [
    "REMOTE_SCHEMES",
    "Location",
    "StorageOptions",
    "Where",
    "is_url",
    "location",
    "use_storage_options",
]
