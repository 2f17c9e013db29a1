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
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr
from affine import Affine
from odc.geo import CRS
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords
from xarray.backends import BackendArray
from xarray.core.indexing import (
    IndexingSupport,
    LazilyIndexedArray,
    explicit_indexing_adapter,
)

from xclay._atomic import atomic_output
from xclay._hashing import sha256_file
from xclay._json import jsonable, number
from xclay._progress import progress_bar
from xclay._version import __version__
from xclay.errors import ChunkingError, DatacubeError, DataIntegrityError, DataIntegrityWarning
from xclay.models.sensors import get_sensor

__all__ = [
    "DATACUBE_DIMS",
    "as_datacube",
    "create_datacube_store",
    "datacube_geobox",
    "is_complete",
    "mark_complete",
    "nodata_value",
    "open_datacube",
    "validate_datacube",
    "write_datacube",
    "write_datacube_block",
    "write_empty_block",
]

log = logging.getLogger(__name__)

DATACUBE_DIMS = ("time", "band", "y", "x")
CONVENTION = "xclay-datacube/1"
Engine = Literal["auto", "zarr", "kvikio"]
Compression = Literal["zstd", "lz4", "none"]

_BAND_DIM_NAMES = ("band", "bands", "variable", "channel", "spectral")
_SPATIAL_RENAMES = {"latitude": "y", "longitude": "x", "lat": "y", "lon": "x"}
TimeLike = str | dt.datetime | dt.date | np.datetime64


# --------------------------------------------------------------------------- build


def as_datacube(
    obj: xr.DataArray | xr.Dataset,
    *,
    platform: str | None = None,
    bands: Sequence[str] | None = None,
    wavelengths: Sequence[float] | Mapping[str, float] | None = None,
    time: TimeLike | tuple[TimeLike, TimeLike] | None = None,
    nodata: float | None = None,
    gsd: float | None = None,
    crs: str | int | None = None,
    provenance: Mapping[str, Any] | None = None,
    quality: xr.DataArray | None = None,
) -> xr.Dataset:
    """Turn imagery you already have into a datacube following xclay's convention.

    Parameters
    ----------
    obj
        A DataArray with a band dim (``rioxarray.open_rasterio``), a Dataset
        with one variable per band (``odc.stac.load``), or a Dataset that
        already has a ``pixels`` variable. Lazy (dask or file-backed) data
        stays lazy.
    platform
        Key of the sensor table (``xclay.models.sensors.list_platforms()``),
        e.g. ``"sentinel-2-l2a"``. Fills in wavelengths from the band names.
    bands
        Band names, in the order of the band dim (needed when the source has
        no names, e.g. a GeoTIFF's bands 1..N). Also selects and orders the
        variables of a one-variable-per-band Dataset.
    wavelengths
        Central wavelength of each band in micrometres (a sequence in band
        order, or a mapping name -> wavelength). Needed when no platform is
        given.
    time
        Acquisition time, when the source has no time dim: an instant, or a
        ``(start, end)`` pair for a composite (stored as the midpoint, with
        ``time_start``/``time_end`` coords). ``None``: unknown (NaT).
    nodata
        Nodata value; default from the source's ``nodata`` or ``_FillValue``.
    gsd
        Ground sample distance in metres; default the pixel size of a
        projected CRS (required for a geographic CRS).
    crs
        CRS to assume when the source carries none (e.g. ``"EPSG:32720"``).
    provenance
        Extra provenance to record (merged into ``attrs["provenance"]``).
    quality
        Per-pixel quality classes (``xclay.masks.PixelClass``), dims
        ``(time, y, x)`` or ``(y, x)``, on the imagery's grid; stored as the
        ``quality`` variable (a Dataset's own ``quality`` variable is kept).

    Returns
    -------
    xarray.Dataset
        ``pixels(time, band, y, x)`` with the coords and attrs of the convention.
    """
    sources, has_band = _sources(obj, bands)
    first = sources[0]
    # A cube (or its pixels) passed again keeps its platform.
    platform = platform or obj.attrs.get("platform") or first.attrs.get("platform") or None
    names = _band_names(sources, has_band, bands, platform)
    waves = _wavelengths(first if has_band else None, names, platform, wavelengths)
    dtype = np.result_type(*(s.dtype for s in sources))
    _check_dtype(dtype)
    geobox = _geobox_from_source(first, crs)
    for other in sources[1:]:
        if other.sizes["y"] != first.sizes["y"] or other.sizes["x"] != first.sizes["x"]:
            raise DatacubeError("the band variables are on different grids; resample them to one.")
    time_coords = _time_coords(first, time)
    fill = _nodata_of(obj, first) if nodata is None else nodata
    pixel_gsd = _gsd_of(geobox) if gsd is None else float(gsd)

    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    # odc-geo names a geographic grid's axes latitude/longitude; the cube's dims are y/x.
    y_name, x_name = (str(d) for d in geobox.dimensions)
    y = xr.Variable("y", coords[y_name].values, coords[y_name].attrs)
    x = xr.Variable("x", coords[x_name].values, coords[x_name].attrs)
    variable = _pixels_variable(sources, has_band, dtype)
    data = xr.DataArray(
        variable,
        coords={"band": np.array(names, dtype=object), "y": y, "x": x},
        attrs={"grid_mapping": "spatial_ref", "platform": platform or ""},
    )
    if fill is not None:
        data.attrs["nodata"] = fill
    cube = xr.Dataset({"pixels": data})
    if quality is None and isinstance(obj, xr.Dataset) and "quality" in obj.data_vars:
        quality = obj["quality"]
    if quality is not None:
        cube["quality"] = _quality_variable(quality, data)
    cube = cube.assign_coords(
        {
            **time_coords,
            "wavelength": ("band", np.asarray(waves, dtype="float64"), {"units": "micrometre"}),
            "spatial_ref": coords["spatial_ref"],
        }
    )
    cube.attrs = {
        "convention": CONVENTION,
        "platform": platform or "",
        "gsd": pixel_gsd,
        "provenance": _provenance(obj, provenance),
    }
    validate_datacube(cube)
    return cube


def _quality_variable(quality: xr.DataArray, pixels: xr.DataArray) -> xr.DataArray:
    from xclay.masks import quality_attrs

    q = _standard_spatial_dims(quality)
    if set(q.dims) - {"time", "y", "x"} or not {"y", "x"} <= set(q.dims):
        raise DatacubeError(f"quality must have dims (time, y, x) or (y, x), got {q.dims}.")
    if q.sizes["y"] != pixels.sizes["y"] or q.sizes["x"] != pixels.sizes["x"]:
        raise DatacubeError("quality is not on the imagery's grid (its y/x sizes differ).")
    var = q.variable
    if "time" not in var.dims:
        var = var.set_dims({"time": pixels.sizes["time"], **var.sizes})
    elif var.sizes["time"] != pixels.sizes["time"]:
        raise DatacubeError("quality has a different number of time steps than the imagery.")
    var = var.transpose("time", "y", "x")
    if var.dtype != np.uint8:
        var = var.astype(np.uint8)
    return xr.DataArray(var, coords={"y": pixels["y"], "x": pixels["x"]}, attrs=quality_attrs())


def _sources(
    obj: xr.DataArray | xr.Dataset, bands: Sequence[str] | None
) -> tuple[list[xr.DataArray], bool]:
    """The band data, spatial dims named y/x: one array with a band dim, or one array per band."""
    if isinstance(obj, xr.DataArray):
        da = _standard_spatial_dims(obj)
        if "band" not in da.dims:
            spatial = {"time", "y", "x"}
            others = [str(d) for d in da.dims if d not in spatial]
            if others:
                raise DatacubeError(
                    f"imagery dims are {tuple(map(str, obj.dims))}: no band dim. Name the band "
                    f"dim 'band' (e.g. da.rename({{{others[0]!r}: 'band'}})), or pass a Dataset "
                    "with one variable per band."
                )
        _check_dims(da, band="band" in da.dims)
        return [da], "band" in da.dims
    if not isinstance(obj, xr.Dataset):
        raise DatacubeError(
            f"as_datacube needs an xarray DataArray or Dataset, got {type(obj).__name__}; "
            "open rasters with rioxarray.open_rasterio or odc.stac.load first."
        )
    if "pixels" in obj.data_vars:
        return _sources(obj["pixels"], bands)
    names = list(bands) if bands is not None else [str(v) for v in obj.data_vars]
    if not names:
        raise DatacubeError("the Dataset has no data variables; there are no bands to use.")
    missing = [n for n in names if n not in obj.data_vars]
    if missing:
        raise DatacubeError(
            f"bands {missing} are not variables of the Dataset (it has "
            f"{', '.join(map(str, obj.data_vars))}); pass bands= with existing names."
        )
    arrays = [_standard_spatial_dims(obj[n]) for n in names]
    if len({a.dims for a in arrays}) != 1:
        raise DatacubeError(
            f"the band variables have different dims {sorted({a.dims for a in arrays})}; select "
            "variables on one grid."
        )
    for a in arrays:
        _check_dims(a, band=False)
    return [a.rename(n) for a, n in zip(arrays, names, strict=True)], False


def _standard_spatial_dims(da: xr.DataArray) -> xr.DataArray:
    renames = {d: _SPATIAL_RENAMES[str(d)] for d in da.dims if str(d) in _SPATIAL_RENAMES}
    da = da.rename(renames) if renames else da
    band_dims = [d for d in da.dims if d in _BAND_DIM_NAMES]
    if len(band_dims) > 1:
        raise DatacubeError(f"more than one band-like dim {band_dims}; keep one band dim.")
    if band_dims and band_dims[0] != "band":
        da = da.rename({band_dims[0]: "band"})
    return da


def _check_dims(da: xr.DataArray, *, band: bool) -> None:
    missing = [d for d in ("y", "x") if d not in da.dims]
    if missing:
        raise DatacubeError(
            f"imagery dims are {tuple(map(str, da.dims))}, missing {missing}: a datacube needs "
            "spatial dims y, x (or latitude, longitude)."
        )
    allowed = DATACUBE_DIMS if band else ("time", "y", "x")
    extra = [str(d) for d in da.dims if d not in allowed]
    if extra:
        raise DatacubeError(
            f"unexpected dims {extra}: a datacube has only (time, band, y, x); select or reduce "
            "the extra dims first (e.g. .isel(...) or a composite over them)."
        )


def _pixels_variable(
    sources: list[xr.DataArray], has_band: bool, dtype: np.dtype[Any]
) -> xr.Variable:
    """The pixels as one (time, band, y, x) variable, without loading lazy sources."""
    variables = [s.variable for s in sources]
    if any(not _eager(v) for v in variables):
        return xr.Variable(
            DATACUBE_DIMS, LazilyIndexedArray(_StackedBands(variables, has_band, dtype))
        )
    if has_band:
        var = variables[0]
    else:
        var = xr.Variable.concat(
            [v.set_dims({"band": 1, **v.sizes}) for v in variables], dim="band"
        )
    if "time" not in var.dims:
        var = var.set_dims({"time": 1, **var.sizes})
    return var.transpose(*DATACUBE_DIMS).astype(dtype, copy=False)


def _eager(variable: xr.Variable) -> bool:
    """NumPy or dask: reshaping them costs nothing (views, or graph edits)."""
    return isinstance(variable._data, np.ndarray) or variable.chunks is not None


class _StackedBands(BackendArray):
    """Lazily indexed sources (files) seen as one (time, band, y, x) array.

    xarray would load such arrays to add a dim or transpose them; this view
    reads only the windows asked for, so a raster bigger than RAM stays on disk.
    """

    def __init__(self, variables: list[xr.Variable], has_band: bool, dtype: np.dtype[Any]) -> None:
        first = variables[0]
        n_band = first.sizes["band"] if has_band else len(variables)
        n_time = first.sizes.get("time", 1)
        self.shape = (n_time, n_band, first.sizes["y"], first.sizes["x"])
        self.dtype = np.dtype(dtype)
        self._variables = variables
        self._has_band = has_band

    def __getitem__(self, key: Any) -> Any:
        return explicit_indexing_adapter(key, self.shape, IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        want = dict(zip(DATACUBE_DIMS, key, strict=True))
        if self._has_band:
            return self._read_one(self._variables[0], want)
        picks = range(self.shape[1])[want["band"]]
        if isinstance(picks, int):
            return self._read_one(self._variables[picks], {**want, "band": 0})
        # One source per band: read each (a length-1 band axis) and stack them.
        parts = [self._read_one(self._variables[i], {**want, "band": slice(0, 1)}) for i in picks]
        if parts:
            band_axis = 0 if isinstance(want["time"], int | np.integer) else 1
            return np.concatenate(parts, axis=band_axis)
        out_shape = [
            len(range(n)[want[d]])
            for d, n in zip(DATACUBE_DIMS, self.shape, strict=True)
            if not isinstance(want[d], int | np.integer)
        ]
        return np.empty(out_shape, dtype=self.dtype)

    def _read_one(self, var: xr.Variable, want: dict[str, Any]) -> np.ndarray:
        """Read ``want`` (int/slice per datacube dim) from a source holding some of the dims."""
        src_key = tuple(want[str(d)] for d in var.dims)
        arr = np.asarray(var[src_key].values).astype(self.dtype, copy=False)
        kept = [str(d) for d in var.dims if not isinstance(want[str(d)], int | np.integer)]
        out_dims = [d for d in DATACUBE_DIMS if not isinstance(want[d], int | np.integer)]
        arr = arr.transpose([kept.index(d) for d in out_dims if d in kept])
        for axis, d in enumerate(out_dims):
            if d not in kept:  # a dim the source lacks (time, or band of a one-band source)
                arr = np.expand_dims(arr, axis)
                if len(range(1)[want[d]]) == 0:
                    arr = arr.take([], axis=axis)
        return arr


def _band_names(
    sources: list[xr.DataArray], has_band: bool, bands: Sequence[str] | None, platform: str | None
) -> list[str]:
    n = sources[0].sizes["band"] if has_band else len(sources)
    if bands is not None:
        if len(bands) != n:
            raise DatacubeError(f"bands= has {len(bands)} names but the imagery has {n} bands.")
        return [str(b) for b in bands]
    if not has_band:
        return [
            str(s.name) if s.name is not None else f"band_{i + 1}" for i, s in enumerate(sources)
        ]
    da = sources[0]
    values = da["band"].values if "band" in da.coords else np.arange(1, n + 1)
    if all(isinstance(v, str) for v in values.tolist()):
        return [str(v) for v in values.tolist()]
    long_name = da.attrs.get("long_name")
    if isinstance(long_name, list | tuple) and len(long_name) == n and all(long_name):
        return [str(v) for v in long_name]
    if platform is not None:
        known = ", ".join(get_sensor(platform).band_names)
        raise DatacubeError(
            f"the {n} bands have no names, so it is unknown which {platform!r} bands they are; "
            f"pass bands=[...] in band order, using names from: {known}."
        )
    return [f"band_{int(v)}" for v in values.tolist()]


def _wavelengths(
    da: xr.DataArray | None,
    names: list[str],
    platform: str | None,
    wavelengths: Sequence[float] | Mapping[str, float] | None,
) -> list[float]:
    if wavelengths is not None:
        if isinstance(wavelengths, Mapping):
            missing = [n for n in names if n not in wavelengths]
            if missing:
                raise DatacubeError(f"wavelengths= has no entry for bands {missing}.")
            waves = [float(wavelengths[n]) for n in names]
        else:
            waves = [float(w) for w in wavelengths]
            if len(waves) != len(names):
                raise DatacubeError(
                    f"wavelengths= has {len(waves)} values but the imagery has {len(names)} bands."
                )
    elif platform is not None:
        sensor = get_sensor(platform)
        waves = [sensor.band(n).wavelength for n in names]
    elif da is not None and "wavelength" in da.coords and da["wavelength"].dims == ("band",):
        waves = [float(w) for w in da["wavelength"].values]
    else:
        raise DatacubeError(
            "wavelengths missing: pass platform= (a sensor-table key such as 'sentinel-2-l2a') "
            "or wavelengths=[...] with each band's central wavelength in micrometres."
        )
    if not all(math.isfinite(w) and w > 0 for w in waves):
        raise DatacubeError(f"wavelengths must be positive numbers (micrometres), got {waves}.")
    return waves


def _check_dtype(dtype: np.dtype[Any]) -> None:
    if dtype.kind not in "uif":
        raise DatacubeError(
            f"pixels have dtype {dtype}, which is not numeric; a datacube holds integer or "
            "floating-point digital numbers. Convert with .astype('uint16') or 'float32'."
        )


# --------------------------------------------------------------------------- geometry


def datacube_geobox(cube: xr.Dataset | xr.DataArray) -> GeoBox:
    """The pixel grid of a datacube (CRS, exact affine transform, shape)."""
    da = cube["pixels"] if isinstance(cube, xr.Dataset) else cube
    return _geobox_from_source(da, None)


def _geobox_from_source(da: xr.DataArray, crs: str | int | None) -> GeoBox:
    crs_obj = _crs_of(da)
    if crs_obj is None:
        if crs is None:
            raise DatacubeError(
                "the imagery has no CRS. Write one (da.rio.write_crs('EPSG:32720') with "
                "rioxarray, or odc.geo.xr.assign_crs) or pass crs='EPSG:...' to as_datacube."
            )
        crs_obj = CRS(crs)
    ny, nx = da.sizes["y"], da.sizes["x"]
    if ny < 1 or nx < 1:
        raise DatacubeError(f"the imagery is empty ({ny} x {nx} pixels).")
    transform = _transform_of(da)
    if not transform.is_rectilinear or transform.a == 0 or transform.e == 0:
        raise DatacubeError(
            f"the pixel grid is rotated or degenerate ({transform!r}); reproject it to a "
            "north-up grid first (e.g. odc.geo.xr.xr_reproject)."
        )
    if transform.almost_equals(Affine.identity()):
        raise DatacubeError(
            "the imagery has no georeferencing: its coordinates are pixel indices (an identity "
            "geotransform; rasterio warns NotGeoreferencedWarning). Give it its real transform "
            "(da.rio.write_transform(...)) or open a georeferenced file."
        )
    geobox = GeoBox((ny, nx), transform, crs_obj)
    check_lonlat_extent(geobox)
    return geobox


def check_lonlat_extent(geobox: GeoBox) -> None:
    """Refuse a grid whose corners do not map to real longitudes and latitudes: coordinates
    in other units than its CRS's (degrees labelled as metres, or the reverse)."""
    from xclay.chips import to_lonlat

    ny, nx = geobox.shape
    t = geobox.affine
    cols = np.array([0, nx, 0, nx], dtype=np.float64)
    rows = np.array([0, 0, ny, ny], dtype=np.float64)
    x = t.c + t.a * cols + t.b * rows
    y = t.f + t.d * cols + t.e * rows
    try:
        lon, lat = to_lonlat(geobox.crs, x, y)
    except Exception as err:  # pyproj raises for points outside a projection's domain
        lon, lat = np.full(4, np.inf), np.full(4, np.inf)
        log.info("corners do not transform: %s", err)
    if not (
        np.isfinite(lon).all() and np.isfinite(lat).all() and (np.abs(lat) <= 90.0 + 1e-6).all()
    ):
        raise DatacubeError(
            f"the grid's corners ({x.min():g}..{x.max():g}, {y.min():g}..{y.max():g} in "
            f"{geobox.crs}) do not map to valid longitudes and latitudes: the coordinates are "
            "not in that CRS's units. Check the CRS (degrees belong to EPSG:4326, metres to a "
            "projected CRS such as UTM)."
        )


def _crs_of(da: xr.DataArray) -> CRS | None:
    gm_name = da.attrs.get("grid_mapping") or da.encoding.get("grid_mapping") or "spatial_ref"
    for name in (gm_name, "spatial_ref", "crs"):
        if name in da.coords:
            attrs = da[name].attrs
            wkt = attrs.get("crs_wkt") or attrs.get("spatial_ref")
            if wkt:
                return CRS(wkt)
    value = da.attrs.get("crs")
    return CRS(value) if value else None


def _transform_of(da: xr.DataArray) -> Affine:
    """Exact transform from the GDAL GeoTransform when it matches the coords, else from coords."""
    from_coords = _transform_from_coords(da)
    gm = da.attrs.get("grid_mapping") or "spatial_ref"
    gt = da[gm].attrs.get("GeoTransform") if gm in da.coords else None
    if gt is None:
        if from_coords is None:
            raise DatacubeError(
                "cannot tell the pixel grid: the imagery has neither a GeoTransform nor regular "
                "1-D x/y coordinates. Open it with rioxarray or odc-stac, which record both."
            )
        return from_coords
    c, a, b, f, d, e = (float(v) for v in str(gt).split())
    exact = Affine(a, b, c, d, e, f)
    if from_coords is None:
        return exact
    # A subset (isel) keeps the old GeoTransform: shift it by whole pixels to
    # the coords' origin so the transform stays exact.
    col = (from_coords.c - exact.c) / exact.a
    row = (from_coords.f - exact.f) / exact.e
    if (
        abs(col - round(col)) < 1e-3
        and abs(row - round(row)) < 1e-3
        and math.isclose(from_coords.a, exact.a, rel_tol=1e-6)
        and math.isclose(from_coords.e, exact.e, rel_tol=1e-6)
    ):
        return exact @ Affine.translation(round(col), round(row))
    return from_coords


def _transform_from_coords(da: xr.DataArray) -> Affine | None:
    x, y = (
        da["x"].values if "x" in da.coords else None,
        da["y"].values if "y" in da.coords else None,
    )
    if x is None or y is None or x.ndim != 1 or y.ndim != 1:
        return None
    res_x, res_y = da["x"].attrs.get("resolution"), da["y"].attrs.get("resolution")
    if x.size > 1:
        dx = float(np.diff(x).mean())
    elif res_x is not None:
        dx = float(res_x)
    else:
        return None
    if y.size > 1:
        dy = float(np.diff(y).mean())
    elif res_y is not None:
        dy = -abs(float(res_y))
    else:
        return None
    if x.size > 2 and not np.allclose(np.diff(x), dx, rtol=1e-6, atol=0):
        raise DatacubeError("x coordinates are not regularly spaced; resample to a regular grid.")
    if y.size > 2 and not np.allclose(np.diff(y), dy, rtol=1e-6, atol=0):
        raise DatacubeError("y coordinates are not regularly spaced; resample to a regular grid.")
    return Affine(dx, 0.0, float(x[0]) - dx / 2, 0.0, dy, float(y[0]) - dy / 2)


def _gsd_of(geobox: GeoBox) -> float:
    crs = geobox.crs
    if crs is None or crs.geographic:
        raise DatacubeError(
            "the CRS is geographic (degrees), so the ground sample distance is unknown; pass "
            "gsd= in metres, or reproject to a projected CRS (UTM) first."
        )
    units = crs.units[0] if crs.units else "metre"
    if units not in ("metre", "m", "meter"):
        raise DatacubeError(f"the CRS unit is {units!r}, not metres; pass gsd= in metres.")
    res = geobox.resolution
    return float(math.sqrt(abs(res.x * res.y)))


# --------------------------------------------------------------------------- time, nodata, provenance


def _to_datetime64(value: TimeLike) -> np.datetime64:
    try:
        as_array = np.array(value, dtype="datetime64[ns]")
    except (ValueError, TypeError) as err:
        raise DatacubeError(
            f"cannot read time {value!r}; use an ISO date like '2024-07-01'."
        ) from err
    if as_array.ndim != 0:
        raise DatacubeError(f"time must be one instant or a (start, end) pair, got {value!r}.")
    out: np.datetime64 = as_array.reshape(1)[0]
    return out


def _time_coords(
    da: xr.DataArray, time: TimeLike | tuple[TimeLike, TimeLike] | None
) -> dict[str, Any]:
    """Coords of the time dim: from the source's time dim, or one step from ``time``."""
    if "time" in da.dims:
        if time is not None:
            raise DatacubeError("the imagery already has a time dim; do not pass time= as well.")
        times = np.asarray(da["time"].values) if "time" in da.coords else None
        if times is None or times.dtype.kind != "M":
            raise DatacubeError("the time dim needs datetime64 coordinates.")
        coords: dict[str, Any] = {"time": unknown_as_nat(times.astype("datetime64[ns]"))}
        for bound in ("time_start", "time_end"):  # a composite's range, if the source has it
            if bound in da.coords and da[bound].dims == ("time",):
                coords[bound] = ("time", np.asarray(da[bound].values, dtype="datetime64[ns]"))
        return coords
    if time is None:
        return {"time": np.array(["NaT"], dtype="datetime64[ns]")}
    if isinstance(time, tuple):
        start, end = (_to_datetime64(t) for t in time)
        if end < start:
            raise DatacubeError(f"time range ends ({end}) before it starts ({start}).")
        mid = start + (end - start) // 2
        return {
            "time": np.array([mid], dtype="datetime64[ns]"),
            "time_start": ("time", np.array([start], dtype="datetime64[ns]")),
            "time_end": ("time", np.array([end], dtype="datetime64[ns]")),
        }
    return {"time": np.array([_to_datetime64(time)], dtype="datetime64[ns]")}


# No Earth observation satellite flew before Sputnik: an earlier time is a placeholder for
# an unknown date (STAC requires a datetime; xclay.ingest.stac_item writes 1900-01-01).
FIRST_SATELLITE = np.datetime64("1957-10-04", "ns")


def unknown_as_nat(times: np.ndarray) -> np.ndarray:
    """Acquisition times with placeholders (before the first satellite) as NaT: an unknown
    date stays missing, it never becomes a real date in a model's input or an output."""
    out = np.asarray(times, dtype="datetime64[ns]").copy()
    out[~np.isnat(out) & (out < FIRST_SATELLITE)] = np.datetime64("NaT")
    return out


def _nodata_of(obj: xr.DataArray | xr.Dataset, pixels: xr.DataArray) -> float | None:
    sources: list[Mapping[str, Any]] = [pixels.attrs, pixels.encoding]
    if isinstance(obj, xr.Dataset):
        sources += [obj[v].attrs for v in obj.data_vars] + [obj[v].encoding for v in obj.data_vars]
    for src in sources:
        for key in ("nodata", "_FillValue", "missing_value"):
            value = src.get(key)
            if value is not None and np.ndim(value) == 0:
                nodata = number(value)
                assert nodata is not None
                integral = (
                    pixels.dtype.kind != "f" and math.isfinite(nodata) and nodata.is_integer()
                )
                return int(nodata) if integral else nodata
    return None


def _provenance(obj: xr.DataArray | xr.Dataset, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    prov: dict[str, Any] = (
        dict(obj.attrs.get("provenance", {})) if "provenance" in obj.attrs else {}
    )
    source = obj.encoding.get("source")
    if source and Path(source).is_file():
        prov.setdefault("sources", []).append(
            {"href": str(Path(source).resolve()), "sha256": sha256_file(Path(source))}
        )
    prov.setdefault("created_by", f"xclay {__version__} as_datacube")
    if extra:
        prov.update(extra)
    return prov


# --------------------------------------------------------------------------- validate


def nodata_value(pixels: xr.DataArray) -> float | None:
    """The pixels' nodata value (``attrs["nodata"]``) as a float, or None."""
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
    """Raise :class:`DatacubeError` naming the first way ``cube`` breaks the convention."""
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


def in_memory(pixels: xr.DataArray) -> bool:
    """True when the pixels are a NumPy array already (``.data`` would load lazy arrays)."""
    return isinstance(pixels.variable._data, np.ndarray)


# --------------------------------------------------------------------------- write


def write_datacube(
    cube: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    chip_size: int = 256,
    shard_chips: int | None = None,
    compression: Compression = "zstd",
    overwrite: bool = False,
    require_data: bool = False,
    progress: bool | None = False,
) -> Path:
    """Write a datacube as Zarr v3 with chunks aligned to the chip grid.

    Parameters
    ----------
    cube
        A datacube (see :func:`as_datacube`); numpy, dask or lazily opened.
    path
        Output directory (``.zarr``). Written under a temporary name and
        renamed into place when complete, so a failure never leaves a store
        that looks whole.
    chip_size
        Chip edge in pixels; ``pixels`` is chunked ``(1, n_bands, chip_size, chip_size)``.
    shard_chips
        Group ``shard_chips x shard_chips`` chunks into one shard file
        (Zarr v3 sharding). ``None``: one file per chunk.
    compression
        ``"zstd"`` (default, level 3), ``"lz4"`` or ``"none"`` (fastest to
        read, largest on disk).
    overwrite
        Replace an existing store at ``path``.
    require_data
        Refuse (and write nothing) when no pixel of the cube is valid.
    progress
        Show a progress bar over the blocks (``None``: on an interactive terminal).

    Returns
    -------
    pathlib.Path
        The written store.

    Memory stays bounded by one shard (or chunk) row block, whatever the cube's size.
    """

    validate_datacube(cube)
    if chip_size < 1:
        raise ChunkingError(f"chip_size must be a positive number of pixels, got {chip_size}.")
    if shard_chips is not None and shard_chips < 1:
        raise ChunkingError(f"shard_chips must be >= 1, got {shard_chips}.")
    pixels = cube["pixels"]
    nt, nb, ny, nx = pixels.shape
    block = chip_size * (shard_chips or 1)

    with atomic_output(Path(path), overwrite=overwrite) as tmp:
        create_datacube_store(
            cube, tmp, chip_size=chip_size, shard_chips=shard_chips, compression=compression
        )
        any_valid = False
        step = _write_step(pixels, block)
        blocks = [
            (t, y0, x0) for t in range(nt) for y0 in range(0, ny, step) for x0 in range(0, nx, step)
        ]
        with progress_bar(len(blocks), progress, desc="write datacube", unit="block") as bar:
            for t, y0, x0 in blocks:
                valid = write_datacube_block(
                    cube, tmp, t, (y0, min(ny, y0 + step)), (x0, min(nx, x0 + step))
                )
                any_valid = any_valid or valid
                bar.update(1)
        if require_data and not any_valid:
            raise DatacubeError(
                "the region has no valid pixel (every pixel is nodata, or masked as nodata); "
                "nothing was written. Check the area, the time range and the masks."
            )
        mark_complete(tmp)
    log.info("wrote datacube %s (%d x %d x %d x %d)", path, nt, nb, ny, nx)
    return Path(path)


COMPLETE_ATTR = "xclay_complete"


def create_datacube_store(
    cube: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    chip_size: int,
    shard_chips: int | None = None,
    compression: Compression = "zstd",
) -> Path:
    """Create a datacube store with its coords and attributes and empty (nodata) arrays,
    chunked for ``chip_size``; marked incomplete until :func:`mark_complete`.

    Blocks are then written with :func:`write_datacube_block`, in any order and
    by several processes at once when each writes whole shards (or chunks).
    """
    import zarr

    pixels = cube["pixels"]
    nb = pixels.shape[1]
    block = chip_size * (shard_chips or 1)
    has_quality = "quality" in cube.data_vars
    meta = cube.drop_vars(["pixels", "quality"] if has_quality else ["pixels"])
    meta.attrs = {**cube.attrs, "xclay_version": __version__, COMPLETE_ATTR: False}
    meta.to_zarr(path, mode="w", zarr_format=3, consolidated=False)
    group = zarr.open_group(path, mode="r+", zarr_format=3)
    coordinates = " ".join(sorted(str(c) for c in cube.coords if c not in DATACUBE_DIMS))
    crs = datacube_geobox(cube).crs
    fill = nodata_value(pixels)
    group.create_array(
        "pixels",
        shape=pixels.shape,
        dtype=pixels.dtype,
        chunks=(1, nb, chip_size, chip_size),
        shards=(1, nb, block, block) if shard_chips else None,
        compressors=_compressors(compression),
        fill_value=fill if fill is not None else 0,
        dimension_names=DATACUBE_DIMS,
        attributes={
            **_variable_attrs(pixels, coordinates, crs),
            INTEGRITY_ATTR: dict(INTEGRITY),
        },
        config={"write_empty_chunks": True},
    )
    if has_quality:
        from xclay.masks import PixelClass

        group.create_array(
            "quality",
            shape=cube["quality"].shape,
            dtype=np.uint8,
            chunks=(1, chip_size, chip_size),
            shards=(1, block, block) if shard_chips else None,
            compressors=_compressors(compression),
            fill_value=int(PixelClass.NODATA),
            dimension_names=("time", "y", "x"),
            attributes={
                **_variable_attrs(cube["quality"], coordinates, crs),
                INTEGRITY_ATTR: dict(INTEGRITY),
            },
            config={"write_empty_chunks": True},
        )
    return Path(path)


def write_datacube_block(
    cube: xr.Dataset,
    path: str | os.PathLike[str],
    t: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    at: tuple[int, int, int] | None = None,
) -> bool:
    """Compute one block (all bands) of ``cube`` and write it into the store at ``path``.

    ``at``: where the block goes in the store (time, row, column), when ``cube``
    is itself only a part of the store's grid (default: the same place).
    Returns whether the block has a valid pixel.
    """
    (y0, y1), (x0, x1) = rows, cols
    st, sy, sx = at if at is not None else (t, y0, x0)
    h, w = y1 - y0, x1 - x0
    pixels = cube["pixels"]
    values = np.asarray(pixels.variable[t, :, y0:y1, x0:x1].values)
    _array(path, "pixels")[st, :, sy : sy + h, sx : sx + w] = values
    quality = None
    if "quality" in cube.data_vars:
        quality = np.asarray(cube["quality"].variable[t, y0:y1, x0:x1].values)
        _array(path, "quality")[st, sy : sy + h, sx : sx + w] = quality
    return _any_valid(values, nodata_value(pixels), quality)


def _array(path: str | os.PathLike[str], name: str) -> Any:
    """An array of a datacube store, opened to write every chunk (zarr leaves out chunks
    equal to the fill value by default, which would make them indistinguishable from
    lost ones)."""
    import zarr

    array = zarr.open_array(path, path=name, mode="r+", zarr_format=3)
    return array.with_config({"write_empty_chunks": True})


def write_empty_block(
    path: str | os.PathLike[str], t: int, rows: tuple[int, int], cols: tuple[int, int]
) -> None:
    """Write a block of a datacube store as "no data": pixels at their fill value (the
    nodata value) and quality class nodata. A block no item covers is written like any
    other, so that every chunk of a complete store exists (a missing chunk is damage)."""
    (y0, y1), (x0, x1) = rows, cols
    pixels = _array(path, "pixels")
    pixels[t, :, y0:y1, x0:x1] = pixels.fill_value
    if (Path(path) / "quality" / "zarr.json").is_file():
        quality = _array(path, "quality")
        quality[t, y0:y1, x0:x1] = quality.fill_value


def mark_complete(path: str | os.PathLike[str], **attrs: Any) -> None:
    """Flag a store (datacube or embeddings) as complete, with final attributes, and
    consolidate its metadata (``xr.open_zarr`` then opens it without a warning, and
    without listing every array on object storage)."""
    import zarr

    group = zarr.open_group(path, mode="r+", zarr_format=3)
    group.attrs.update(jsonable({**attrs, COMPLETE_ATTR: True}))
    consolidate(path)


def consolidate(path: str | os.PathLike[str]) -> None:
    """Write a Zarr v3 store's consolidated metadata (zarr-python's extension, which
    readers without it ignore)."""
    import warnings

    import zarr

    with warnings.catch_warnings():  # "not part of the Zarr v3 specification (yet)"
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def read_metadata(store: str | os.PathLike[str]) -> dict[str, Any]:
    """A store's root ``zarr.json``; a damaged one is a :class:`DataIntegrityError` naming it."""
    import json

    meta = Path(store) / "zarr.json"
    try:
        data: dict[str, Any] = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataIntegrityError(
            f"{meta} is not valid JSON ({err}); the store's metadata is damaged. Rewrite it."
        ) from err
    return data


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether a store exists and was marked complete; a store without the mark (for
    instance one whose creation was cut short) is not."""
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    import json

    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get(COMPLETE_ATTR) is True


def _write_step(pixels: xr.DataArray, block: int) -> int:
    """Pixels per written block edge: a whole number of stored blocks that also covers a
    whole dask chunk, so no chunk of a lazy (e.g. STAC) cube is computed twice."""
    if pixels.chunks is None:
        return block
    chunk = max(int(pixels.chunksizes["y"][0]), int(pixels.chunksizes["x"][0]))
    return block * max(1, -(-chunk // block))


def _variable_attrs(var: xr.DataArray, coordinates: str, crs: Any) -> dict[str, Any]:
    kept = {k: v for k, v in var.attrs.items() if k not in ("coordinates", GDAL_CRS_ATTR)}
    attrs: dict[str, Any] = jsonable(kept)
    attrs["coordinates"] = coordinates
    attrs.update(gdal_crs(crs))
    return attrs


# GDAL's own Zarr attribute for an array's CRS. GDAL (>= 3.11 for Zarr v3) does not follow
# CF's grid_mapping once a store has consolidated metadata, so stored arrays carry both;
# opened datasets drop it (it would go stale when a user reprojects).
GDAL_CRS_ATTR = "_CRS"


def gdal_crs(crs: Any) -> dict[str, Any]:
    """``{"_CRS": {"wkt": ...}}`` for a stored, georeferenced array (nothing without a CRS)."""
    return {GDAL_CRS_ATTR: {"wkt": crs.to_wkt()}} if crs is not None else {}


def _any_valid(values: np.ndarray, nodata: float | None, quality: np.ndarray | None) -> bool:
    """Whether a block (band, y, x) has a pixel with data in every band."""
    from xclay.masks import PixelClass

    ok = np.ones(values.shape[1:], dtype=bool)
    if nodata is not None and math.isfinite(nodata):
        ok &= (values != nodata).all(axis=0)
    if values.dtype.kind == "f":
        ok &= np.isfinite(values).all(axis=0)
    if quality is not None:
        ok &= quality != PixelClass.NODATA
    return bool(ok.any())


def _compressors(compression: Compression) -> Any:
    """The chunk codecs after ``bytes``: the compressor, then a CRC32C of the stored bytes
    (Zarr v3's ``crc32c`` codec), which every read path checks."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise DatacubeError(f"compression must be 'zstd', 'lz4' or 'none', got {compression!r}.")


# Every chunk of a datacube array is written (zarr would otherwise leave out chunks that
# equal the fill value) and checksummed: a chunk missing from a complete store is damage,
# never a fill value, and a damaged chunk is an error naming it.
INTEGRITY_ATTR = "xclay_integrity"
INTEGRITY: dict[str, Any] = {"checksum": "crc32c", "every_chunk_written": True}


# --------------------------------------------------------------------------- open


def open_datacube(path: str | os.PathLike[str], *, engine: Engine = "zarr") -> xr.Dataset:
    """Open a datacube Zarr lazily: nothing is read until pixels are used.

    Parameters
    ----------
    path
        A store written by :func:`write_datacube`.
    engine
        ``"zarr"``: host (NumPy) arrays. ``"kvikio"``: ``pixels`` and
        ``quality`` read into GPU memory through kvikIO (GPUDirect Storage
        where the system has it) as CuPy arrays, basic slices only; embedding
        such a cube on a CUDA device reads whole batches of chip chunks
        straight into GPU memory and decodes zstd there (:mod:`xclay.gpu`).
        Needs CUDA and ``xclay[gpu]``. ``"auto"``: kvikio where it can run,
        else zarr.
    """
    resolved = _resolve_engine(engine)
    store = Path(path)
    if not (store / "zarr.json").is_file():
        raise FileNotFoundError(
            f"no datacube at {store}: expected a Zarr v3 store written by xclay.write_datacube."
        )
    read_metadata(store)
    if not is_complete(store):
        raise DatacubeError(
            f"the datacube at {store} is incomplete (a run was interrupted while writing it); "
            "resume the run (xclay run SPEC) or rewrite it."
        )
    # Never mask pixels into floats: nodata stays a value, named in pixels.attrs["nodata"].
    try:
        cube = xr.open_zarr(
            store, chunks=None, consolidated=False, zarr_format=3, mask_and_scale={"pixels": False}
        )
    except (ValueError, KeyError, TypeError) as err:  # a damaged zarr.json, in any of its forms
        raise DataIntegrityError(
            f"the datacube at {store} cannot be opened ({type(err).__name__}: {err}); its "
            "metadata (zarr.json) is damaged. Rewrite the datacube."
        ) from err
    validate_datacube(cube)
    unchecked = []
    for name in ("pixels", "quality"):
        if name not in cube.data_vars:
            continue
        cube[name].attrs.pop(GDAL_CRS_ATTR, None)
        integrity = cube[name].attrs.pop(INTEGRITY_ATTR, None)
        cube[name].encoding[INTEGRITY_ATTR] = integrity
        if not integrity:
            unchecked.append(name)
        if resolved == "kvikio":
            from xclay.gpu import gpu_variable

            cube[name] = cube[name].copy(data=gpu_variable(store, name, cube[name]))
        # Where its chunks are, for direct reads (xclay.chunkio) and the GPU path.
        cube[name].encoding[STORE_ENCODING] = {
            "path": str(store / name),
            "coords": _coords_fingerprint(cube[name]),
        }
    if unchecked:
        warnings.warn(
            f"the datacube at {store} was written without chunk checksums (by an earlier xclay "
            f"or another tool): damage to {' and '.join(unchecked)} cannot be detected, and a lost chunk "
            "reads as its fill value. Rewrite it with xclay.write_datacube to check every read.",
            DataIntegrityWarning,
            stacklevel=2,
        )
    return cube


STORE_ENCODING = "xclay_store"


def store_source(da: xr.DataArray) -> str | None:
    """The Zarr array a lazily opened variable still reads unchanged (same shape, same
    coordinates, no selection applied), or None: then only xarray knows how to read it."""
    info = da.encoding.get(STORE_ENCODING)
    if not info or in_memory(da) or da.chunks is not None:
        return None
    if info.get("coords") != _coords_fingerprint(da):
        return None
    return str(info["path"])


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


def _resolve_engine(engine: str) -> str:
    if engine not in ("auto", "zarr", "kvikio"):
        raise DatacubeError(f"engine must be 'auto', 'zarr' or 'kvikio', got {engine!r}.")
    from xclay import gpu

    if engine == "auto":
        return "kvikio" if gpu.kvikio_usable() else "zarr"
    if engine == "kvikio":
        gpu.require_kvikio()
    return engine
