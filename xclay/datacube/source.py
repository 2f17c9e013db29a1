"""Where a datacube variable's data lives, and the engines that may read it:
in memory, a Zarr array read unchanged (direct chunk reads), or only through xarray."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import xarray as xr

from xclay.storage import Location, location

Engine = Literal["auto", "zarr", "kvikio"]


STORE_ENCODING = "xclay_store"


def store_source(da: xr.DataArray) -> str | None:
    """The Zarr array a lazily opened variable still reads unchanged (same shape, same
    coordinates, no selection applied), or None: then only xarray knows how to read it.

    Parameters
    ----------
    da
        A variable of a datacube: ``pixels`` or ``quality``. Only one that
        :func:`~xclay.datacube.open_datacube` opened (it records the store in the
        encoding), not loaded into memory nor chunked with dask, and with the dims, shape
        and coordinates it was opened with, has a store to read from.

    Returns
    -------
    str or None
        The path (or, on object storage, the URL) of the variable's Zarr array (a
        directory of the store), or None.
    """
    where = store_location(da)
    return str(where) if where is not None else None


def store_location(da: xr.DataArray) -> Location | None:
    """As :func:`store_source`: the variable's Zarr array as a
    :class:`~xclay.storage.Location` (a local path or a place on object storage, with the
    storage options it was opened with), or None."""
    info = da.encoding.get(STORE_ENCODING)
    if not info or in_memory(da) or da.chunks is not None:
        return None
    if info.get("coords") != _coords_fingerprint(da):
        return None
    if info.get("location"):
        return Location.from_dict(info["location"])
    return location(str(info["path"]))


def _coords_fingerprint(da: xr.DataArray) -> dict[str, Any]:
    """Shape, dims and each dim's first, last and count of coordinate values: a selection,
    reordering or transpose of the variable changes it."""
    out: dict[str, Any] = {"dims": list(da.dims), "shape": list(da.shape)}
    for dim in da.dims:
        if dim in da.coords:
            values = np.asarray(da[dim].values)
            out[str(dim)] = [
                str(values[0]),
                str(values[-1]),
                str(values.tolist()) if values.size < 64 else "",
            ]
    return out


def in_memory(pixels: xr.DataArray) -> bool:
    """True when the pixels are a NumPy array already (``.data`` would load lazy arrays).

    Parameters
    ----------
    pixels
        Any DataArray (a datacube's ``pixels``, usually); nothing of it is loaded. Lazily
        opened, dask and CuPy data are not in memory in this sense.
    """
    return isinstance(pixels.variable._data, np.ndarray)
