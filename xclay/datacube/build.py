"""Building a datacube from any xarray object (:func:`as_datacube`): the pixels
variable, band names and wavelengths, the grid, times, nodata and provenance."""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from odc.geo.xr import xr_coords
from xarray.backends import BackendArray
from xarray.core.indexing import (
    IndexingSupport,
    LazilyIndexedArray,
    explicit_indexing_adapter,
)

from xclay._hashing import sha256_file
from xclay._json import number
from xclay._version import __version__
from xclay.datacube.geometry import _geobox_from_source, _gsd_of
from xclay.datacube.validate import CONVENTION, DATACUBE_DIMS, _check_dtype, validate_datacube
from xclay.errors import DatacubeError
from xclay.sensors import get_sensor

log = logging.getLogger("xclay.datacube")

_BAND_DIM_NAMES = ("band", "bands", "variable", "channel", "spectral")
_SPATIAL_RENAMES = {"latitude": "y", "longitude": "x", "lat": "y", "lon": "x"}
TimeLike = str | dt.datetime | dt.date | np.datetime64


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
        Key of the sensor table (``xclay.sensors.list_platforms()``),
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
        # to the nearest second: a range given by dates ends at 23:59:59.999999 (inclusive,
        # as STAC ranges do), whose exact midpoint (2024-06-15T23:59:59.999999500 for June)
        # is no time anyone means
        mid = (start + (end - start) // 2 + np.timedelta64(500, "ms")).astype("datetime64[s]")
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
    date stays missing, it never becomes a real date in a model's input or an output.

    Parameters
    ----------
    times
        Acquisition times, any shape: datetime64 of any unit, or anything NumPy converts
        to one. Times before 1957-10-04, the first satellite's launch (placeholders such
        as 1900-01-01), become NaT; NaT stays NaT.

    Returns
    -------
    numpy.ndarray
        A new ``datetime64[ns]`` array of the same shape; ``times`` is not changed.
    """
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
