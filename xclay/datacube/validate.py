"""The datacube convention and its check (:func:`validate_datacube`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import xarray as xr

from xclay._json import number
from xclay.datacube.geometry import _crs_of
from xclay.errors import DatacubeError
from xclay.sensors import get_sensor

DATACUBE_DIMS = ("time", "band", "y", "x")
CONVENTION = "xclay-datacube/1"


def nodata_value(pixels: xr.DataArray) -> float | None:
    """The pixels' nodata value (``attrs["nodata"]``) as a float, or None.

    Parameters
    ----------
    pixels
        A datacube's ``pixels``. Its ``nodata`` attribute may be a number or a JSON
        spelling of a non-finite one (``"NaN"``, ``"Infinity"``); None when it has none.
    """
    return number(pixels.attrs.get("nodata"))


def _check_nodata(nodata: float | None, dtype: np.dtype[Any]) -> None:
    if nodata is None or dtype.kind == "f":
        return
    info = np.iinfo(dtype)
    if not (math.isfinite(nodata) and nodata == int(nodata) and info.min <= nodata <= info.max):
        raise DatacubeError(
            f"nodata {nodata:g} can never occur in {dtype} pixels (range {info.min}..{info.max}); "
            "pass the nodata value the imagery really uses (nodata=...)."
        )


def validate_datacube(cube: xr.Dataset) -> None:
    """Raise :class:`DatacubeError` naming the first way ``cube`` breaks the convention.

    Parameters
    ----------
    cube
        The Dataset to check: ``pixels(time, band, y, x)`` of a numeric dtype, a
        ``wavelength(band)`` coordinate in micrometres, a CRS, a positive ``gsd``
        attribute, datetime64 times, unique band names, a nodata value the dtype can
        hold, and, if present, ``quality(time, y, x)`` uint8.
    """
    if not isinstance(cube, xr.Dataset):
        raise DatacubeError(
            f"expected a datacube Dataset, got {type(cube).__name__}; build one with "
            "xclay.as_datacube(...)."
        )
    if "pixels" not in cube.data_vars:
        raise DatacubeError(
            "the Dataset has no 'pixels' variable; build a datacube with xclay.as_datacube(...)."
        )
    pixels = cube["pixels"]
    if pixels.dims != DATACUBE_DIMS:
        raise DatacubeError(
            f"pixels have dims {pixels.dims}, expected {DATACUBE_DIMS}; build the datacube with "
            "xclay.as_datacube(...), which adds the band dim and orders the dims."
        )
    _check_dtype(pixels.dtype)
    if "wavelength" not in cube.coords or cube["wavelength"].dims != ("band",):
        raise DatacubeError(
            "the datacube has no wavelength(band) coordinate; pass platform= or wavelengths= "
            "to xclay.as_datacube."
        )
    waves = np.asarray(cube["wavelength"].values, dtype="float64")
    if not (np.isfinite(waves).all() and (waves > 0).all()):
        raise DatacubeError(f"wavelengths must be positive (micrometres), got {waves.tolist()}.")
    _check_wavelengths(cube, waves)
    if _crs_of(pixels) is None:
        raise DatacubeError(
            "the datacube has no CRS (no spatial_ref grid mapping); build it with "
            "xclay.as_datacube(..., crs='EPSG:...')."
        )
    gsd = cube.attrs.get("gsd")
    if not isinstance(gsd, int | float) or not gsd > 0:
        raise DatacubeError(f"the datacube's gsd attribute must be a positive number, got {gsd!r}.")
    if cube["time"].dtype.kind != "M":
        raise DatacubeError("the time coordinate must be datetime64.")
    names = [str(b) for b in cube["band"].values]
    duplicates = sorted({b for b in names if names.count(b) > 1})
    if duplicates:
        raise DatacubeError(f"band names must be unique; {duplicates} appear more than once.")
    _check_nodata(nodata_value(pixels), pixels.dtype)
    if "quality" in cube.data_vars:
        q = cube["quality"]
        if q.dims != ("time", "y", "x") or q.dtype != np.uint8:
            raise DatacubeError(
                f"quality must be uint8 with dims (time, y, x), got {q.dtype} {q.dims}; build the "
                "datacube with xclay.as_datacube(..., quality=...)."
            )


OPTICAL_RANGE_UM = (0.3, 15.0)  # ultraviolet to thermal infrared, in micrometres


def _check_wavelengths(cube: xr.Dataset, waves: np.ndarray) -> None:
    """Wavelengths are micrometres of the optical and thermal range, except a known
    platform's own (radar bands, in the sensor table)."""
    platform = cube.attrs.get("platform") or None
    table: dict[str, float] = {}
    if platform:
        try:
            table = {b.name: b.wavelength for b in get_sensor(platform).bands}
        except DatacubeError:
            table = {}
    lo, hi = OPTICAL_RANGE_UM
    for name, wave in zip((str(b) for b in cube["band"].values), waves, strict=True):
        if lo <= wave <= hi or math.isclose(table.get(name, -1.0), wave, rel_tol=1e-6):
            continue
        hint = f" ({wave:g} nm is {wave / 1000:g} µm)" if 300 <= wave <= 15000 else ""
        raise DatacubeError(
            f"band {name!r} has wavelength {wave:g}, outside {lo}-{hi} µm: wavelengths are "
            f"micrometres{hint}. Give them in µm (wavelengths=), or a platform= whose bands "
            "the sensor table knows."
        )


def _check_dtype(dtype: np.dtype[Any]) -> None:
    if dtype.kind not in "uif":
        raise DatacubeError(
            f"pixels have dtype {dtype}, which is not numeric; a datacube holds integer or "
            "floating-point digital numbers. Convert with .astype('uint16') or 'float32'."
        )
