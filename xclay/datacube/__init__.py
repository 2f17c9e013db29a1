"""The datacube convention: build, validate, write (Zarr v3) and open.

A datacube is an ``xarray.Dataset`` with one variable ``pixels`` with dims
``(time, band, y, x)``; coords ``band`` (names), ``wavelength(band)``
(micrometres), ``time``, ``y``/``x`` (pixel centres) and a CF
``spatial_ref`` grid mapping with ``crs_wkt`` and an exact GDAL
``GeoTransform``, readable by odc-geo and rioxarray. Dataset attrs name the
``platform`` (a key of the sensor table, if known), the ``gsd`` (metres) and
the ``provenance``; ``pixels.attrs["nodata"]`` holds the nodata value, if any.

On disk (Zarr v3) ``pixels`` is chunked so that one chip window (all bands)
is one chunk, optionally grouped into shards so that a continent does not
become millions of files.

Modules, each importing only those above it in this list:

- ``validate``: the convention's names and its check (:func:`validate_datacube`).
- ``geometry``: the grid (GeoBox, exact geotransform) of a cube.
- ``build``: :func:`as_datacube`, from any xarray object.
- ``chunks``: a Zarr v3 array's chunk layout (from zarr-python's metadata) and its chunks
  read directly into buffers the caller owns, checksums checked.
- ``source``: where a variable's data lives (memory, its store, only xarray): the lazily
  indexed :class:`StoreArray` that carries its layout.
- ``gpu``: whether this machine can read into GPU memory; ``gpuchunks``: the one GPU read
  route (kvikIO into device buffers, nvCOMP decode), for batches and for xarray alike.
- ``store``: writing Zarr v3 stores (whole, or created empty and filled by blocks).
- ``open``: :func:`open_datacube` and the xarray backend (``engine="xclay"``).

Completion markers, shared with the embeddings store, are in :mod:`xclay.completion`.
"""

from xclay.completion import COMPLETE_ATTR, consolidate, is_complete, mark_complete, read_metadata
from xclay.datacube.build import TimeLike, as_datacube, unknown_as_nat
from xclay.datacube.geometry import check_lonlat_extent, datacube_geobox
from xclay.datacube.open import DatacubeBackend, open_datacube
from xclay.datacube.source import Engine, StoreArray, in_memory, store_array, store_source
from xclay.datacube.store import (
    GDAL_CRS_ATTR,
    Compression,
    create_datacube_store,
    gdal_crs,
    write_datacube,
    write_datacube_block,
    write_empty_block,
)
from xclay.datacube.validate import CONVENTION, DATACUBE_DIMS, nodata_value, validate_datacube

__all__ = [
    "COMPLETE_ATTR",
    "CONVENTION",
    "DATACUBE_DIMS",
    "GDAL_CRS_ATTR",
    "Compression",
    "DatacubeBackend",
    "Engine",
    "StoreArray",
    "TimeLike",
    "as_datacube",
    "check_lonlat_extent",
    "consolidate",
    "create_datacube_store",
    "datacube_geobox",
    "gdal_crs",
    "in_memory",
    "is_complete",
    "mark_complete",
    "nodata_value",
    "open_datacube",
    "read_metadata",
    "store_array",
    "store_source",
    "unknown_as_nat",
    "validate_datacube",
    "write_datacube",
    "write_datacube_block",
    "write_empty_block",
]
