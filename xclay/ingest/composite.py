"""Compositing over time: the median or first valid observation per pixel, the
composite's time range, and acquisitions grouped by solar day."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from xclay.errors import IngestError
from xclay.ingest.items import item_solar_day, parse_time_range
from xclay.masks import EXCLUDED_FROM_COMPOSITES, PixelClass

if TYPE_CHECKING:
    import pystac


Composite = Literal["median", "first-valid", "none"]


def composite_over_time(
    data: xr.Dataset, quality: xr.DataArray | None, nodata: float | None, how: str
) -> tuple[xr.Dataset, xr.DataArray | None]:
    """Composite over time, leaving out nodata and masked observations."""
    valid = xr.ones_like(
        quality if quality is not None else data[next(iter(data.data_vars))], dtype=bool
    )
    for name in data.data_vars:
        band = data[name]
        if nodata is not None and not (isinstance(nodata, float) and math.isnan(nodata)):
            valid = valid & (band != nodata)
        if band.dtype.kind == "f":
            valid = valid & band.notnull()
    if quality is not None:
        valid = valid & ~quality.isin([int(c) for c in EXCLUDED_FROM_COMPOSITES])
    fill = nodata if nodata is not None else 0
    out = {}
    if how == "median":
        for name in data.data_vars:
            band = data[name]
            # float32 holds every 8- and 16-bit value exactly: half the memory of float64.
            work = (
                np.float32 if band.dtype.itemsize <= 2 or band.dtype == np.float32 else np.float64
            )
            med = xr.apply_ufunc(
                _nanmedian,
                band.astype(work).where(valid),
                input_core_dims=[["time"]],
                dask="parallelized",
                output_dtypes=[work],
            )
            out[name] = (
                med.fillna(fill).round().astype(band.dtype)
                if band.dtype.kind in "iu"
                else med.fillna(fill).astype(band.dtype)
            )
        any_valid = valid.any("time")
        q = xr.where(any_valid, np.uint8(PixelClass.CLEAR), np.uint8(PixelClass.NODATA)).astype(
            np.uint8
        )
    else:  # first-valid: walk back from the last observation
        n = valid.sizes["time"]
        chosen_q = xr.full_like(valid.isel(time=0), np.uint8(PixelClass.NODATA), dtype=np.uint8)
        for name in data.data_vars:
            out[name] = xr.full_like(data[name].isel(time=0), fill)
        for t in reversed(range(n)):
            ok = valid.isel(time=t)
            for name in data.data_vars:
                out[name] = xr.where(ok, data[name].isel(time=t), out[name]).astype(
                    data[name].dtype
                )
            cls = quality.isel(time=t) if quality is not None else np.uint8(PixelClass.CLEAR)
            chosen_q = xr.where(ok, cls, chosen_q).astype(np.uint8)
        q = chosen_q
    composite = xr.Dataset(out)
    for name in data.data_vars:
        composite[name].attrs = dict(data[name].attrs)
    composite = composite.drop_vars("time", errors="ignore")
    return composite, (q.drop_vars("time", errors="ignore") if quality is not None else None)


def _nanmedian(values: np.ndarray) -> np.ndarray:
    """Median over the last axis ignoring NaN; NaN where every value is NaN: the same
    numbers as ``np.nanmedian``, 3-5x faster on a composite's short time axis.

    One sort along time puts each pixel's valid observations first (NaN sorts last); the
    median is the middle one, or the mean of the two middle ones, of the first ``n``
    (``n`` the pixel's valid count). ``np.nanmedian`` goes through ``numpy.ma`` for short
    axes (argsort, masked indexing, ``filled``): 40 % of an ingest's time. Measured on
    float32 with 30 % NaN (2-core machine, 2026-12-07): 12 dates x 262,144 px, 85 ms
    (np.nanmedian), 35 ms (bottleneck's quickselect), 20 ms (this); 73 dates x 65,536
    px, 126 / 55 / 27 ms. No warning for all-NaN pixels (warning filters are not
    thread-safe under dask).
    """
    ordered = np.sort(values, axis=-1)
    count = np.count_nonzero(~np.isnan(values), axis=-1)
    low = np.maximum(count - 1, 0) // 2
    high = count // 2 - (count == 0)
    a = np.take_along_axis(ordered, low[..., None], axis=-1)[..., 0]
    b = np.take_along_axis(ordered, np.maximum(high, 0)[..., None], axis=-1)[..., 0]
    # numpy's median averages the two middle values as mean() does: (a + b) / 2
    out = np.asarray((a + b) / values.dtype.type(2), dtype=values.dtype)
    out[count == 0] = np.nan
    return out


def composite_range(datetime: str | None, times: np.ndarray) -> tuple[np.datetime64, np.datetime64]:
    """The composite's time range: ``datetime``'s ends where given, else the first and
    last acquisition of ``times``."""
    start, end = parse_time_range(datetime)
    lo = np.datetime64(start.replace(tzinfo=None), "ns") if start else times.min()
    hi = np.datetime64(end.replace(tzinfo=None), "ns") if end else times.max()
    return lo, hi


def by_solar_day(item: pystac.Item, parsed: Any, idx: int) -> Any:
    """odc-stac ``groupby``: acquisitions of one solar day at each item's own centre."""
    day = item_solar_day(item)
    return day if day is not None else dt.date(1, 1, 1)


def day_times(
    items: Sequence[pystac.Item], loaded: np.ndarray, days: Mapping[np.datetime64, np.datetime64]
) -> np.ndarray:
    """The run's time coordinate for each loaded group (groups come sorted by solar day, as
    odc-stac makes them)."""
    groups = sorted(d for d in {item_solar_day(i) for i in items} if d is not None)
    if len(groups) != len(loaded):
        raise IngestError(
            f"{len(loaded)} time steps loaded for {len(groups)} solar days of the items."
        )
    out = []
    for day in groups:
        key = np.datetime64(day, "D")
        if key not in days:
            raise IngestError(f"items on {day} are outside the run's days.")
        out.append(days[key].astype("datetime64[ns]"))
    return np.asarray(out, dtype="datetime64[ns]")
