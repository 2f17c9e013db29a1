"""A datacube's grid: its GeoBox (CRS, exact geotransform) from coords or attrs,
the sanity checks on it, and native coordinates to WGS84 (``to_lonlat``, the one
transform every footprint and centre goes through)."""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from typing import Any

import numpy as np
import xarray as xr
from affine import Affine
from odc.geo import CRS
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from xclay.errors import DatacubeError

log = logging.getLogger("xclay.datacube")


def datacube_geobox(cube: xr.Dataset | xr.DataArray) -> GeoBox:
    """The pixel grid of a datacube (CRS, exact affine transform, shape).

    The transform comes from the GDAL ``GeoTransform`` of the grid mapping where it
    agrees with the ``x``/``y`` coordinates, else from the coordinates. A grid that is not
    plausibly georeferenced is a :class:`~xclay.errors.DatacubeError`: no CRS, a rotated
    transform, coordinates that are pixel indices (steps of 1 over 0..N, in any direction
    or half-pixel offset) or count from a CRS origin that lies outside the CRS's area of
    use, corners that are not real longitudes and latitudes, or a grid more than
    ``FAR_OUTSIDE_DEGREES`` (10) degrees of arc outside the area of use (pyproj's; a UTM
    zone's spans both hemispheres).

    Parameters
    ----------
    cube
        A datacube (its ``pixels`` variable is read) or a DataArray on the same grid,
        with ``y`` and ``x`` dims, its CRS recorded (a grid-mapping coordinate such as
        ``spatial_ref``, or a ``crs`` attribute) and its georeferencing (a
        ``GeoTransform`` or regular 1-D ``x``/``y`` coordinates). Pixel values are not read.
    """
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
    geobox = GeoBox((ny, nx), transform, crs_obj)
    _refuse_pixel_indices(geobox)
    check_lonlat_extent(geobox)
    _refuse_outside_area_of_use(geobox)
    return geobox


# How far outside its CRS's area of use a grid may lie, in degrees of arc (~1,100 km). Real
# tiles overhang their UTM zone by a tile at most (Sentinel-2's 110 km, Landsat's 185 km
# scenes: a few degrees of longitude near the poles, under 2 degrees of arc); a grid
# further out has coordinates in another CRS than the one it names.
FAR_OUTSIDE_DEGREES = 10.0

_HOW_TO_FIX = (
    "Give it its real transform (da.rio.write_transform(...), or x/y coordinates of its "
    "pixel centres in its CRS) and the CRS those are in (da.rio.write_crs('EPSG:...'), or "
    "as_datacube(crs=...) when it carries none), or open a georeferenced file."
)


def _refuse_pixel_indices(geobox: GeoBox) -> None:
    """Refuse coordinates that are pixel indices: steps of 1 spanning 0..N (within a pixel:
    centres at 0.., 0.5.. or 1..), in either direction. rasterio gives such coordinates to
    a file with no geotransform (an identity transform, NotGeoreferencedWarning)."""
    ny, nx = geobox.shape
    t = geobox.affine
    x = sorted((t.c, t.c + t.a * nx))
    y = sorted((t.f, t.f + t.e * ny))
    unit = math.isclose(abs(t.a), 1.0, rel_tol=1e-9) and math.isclose(abs(t.e), 1.0, rel_tol=1e-9)
    if unit and x[0] >= -1 and x[1] <= nx + 1 and y[0] >= -1 and y[1] <= ny + 1:
        raise DatacubeError(
            f"the imagery has no georeferencing: its coordinates are pixel indices (x "
            f"{x[0]:g}..{x[1]:g}, y {y[0]:g}..{y[1]:g} in steps of 1 for {nx} x {ny} pixels), "
            f"not positions in {_crs_name(geobox.crs)}. " + _HOW_TO_FIX
        )


def _refuse_outside_area_of_use(geobox: GeoBox) -> None:
    """Refuse a grid far outside the area its CRS is made for (pyproj's area of use), and a
    grid counted from its CRS's origin where that origin lies outside the area (pixel
    indices scaled to metres: for UTM, the origin is 500 km west of the zone's meridian)."""
    crs = geobox.crs
    area = _area_of_use(crs) if crs is not None else None
    if crs is None or area is None:  # a custom CRS: nothing to compare with
        return
    ny, nx = geobox.shape
    t = geobox.affine
    x = sorted((t.c, t.c + t.a * nx))
    y = sorted((t.f, t.f + t.e * ny))
    at_origin = min(abs(x[0]), abs(x[1])) <= abs(t.a) and min(abs(y[0]), abs(y[1])) <= abs(t.e)
    name = _crs_name(crs)
    if at_origin and _degrees_outside(*_lonlat_or_none(crs, 0.0, 0.0), area) > 0.01:
        raise DatacubeError(
            f"the grid starts at the origin (0, 0) of {name}, which lies outside the area "
            f"{name} is used in ({_area_text(area)}): its coordinates count from the image's "
            f"corner (x {x[0]:g}..{x[1]:g}, y {y[0]:g}..{y[1]:g}), they are not positions in "
            f"{name}. " + _HOW_TO_FIX
        )
    edge = np.linspace(0.0, 1.0, 9)
    cols = np.concatenate([edge * nx, np.full(9, nx), edge[::-1] * nx, np.zeros(9), [nx / 2]])
    rows = np.concatenate([np.zeros(9), edge * ny, np.full(9, ny), edge[::-1] * ny, [ny / 2]])
    lon, lat = _lonlat_or_none(crs, t.c + t.a * cols + t.b * rows, t.f + t.d * cols + t.e * rows)
    far = _degrees_outside(lon, lat, area)
    if far > FAR_OUTSIDE_DEGREES:
        raise DatacubeError(
            f"the grid lies about {far:.0f} degrees outside the area {name} is used in "
            f"({_area_text(area)}): its corners are at longitudes {np.nanmin(lon):.2f}.."
            f"{np.nanmax(lon):.2f}, latitudes {np.nanmin(lat):.2f}..{np.nanmax(lat):.2f}, so its coordinates "
            f"are not in {name}. " + _HOW_TO_FIX
        )


def _lonlat_or_none(crs: CRS, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`to_lonlat`, with NaN for points outside the projection's domain."""
    x, y = (
        np.atleast_1d(np.asarray(x, dtype=np.float64)),
        np.atleast_1d(np.asarray(y, dtype=np.float64)),
    )
    try:
        return to_lonlat(crs, x, y)
    except Exception:  # pyproj raises for points outside a projection's domain
        return np.full(x.shape, np.nan), np.full(x.shape, np.nan)


def _area_of_use(crs: CRS) -> tuple[float, float, float, float] | None:
    """``(west, south, east, north)`` degrees where ``crs`` is meant to be used; a UTM
    zone's reaches both hemispheres (USGS's Landsat products put southern scenes in
    northern zones, with negative northings)."""
    import pyproj

    proj = crs.proj
    area = proj.area_of_use
    if area is None and crs.epsg is not None:  # WKT1 (GDAL's) carries no area of use
        area = pyproj.CRS.from_epsg(crs.epsg).area_of_use
    if area is None:
        return None
    if proj.utm_zone is not None:
        return (area.west, -80.0, area.east, 84.0)
    return (area.west, area.south, area.east, area.north)


def _degrees_outside(
    lon: np.ndarray, lat: np.ndarray, area: tuple[float, float, float, float]
) -> float:
    """How far the points' bounding box lies outside ``area``, in degrees of arc (roughly:
    longitudes count at the cosine of the points' latitude nearest a pole); 0 where they
    overlap; infinite where no point has a longitude and latitude."""
    lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    finite = np.isfinite(lon) & np.isfinite(lat)
    if not finite.any():
        return math.inf
    lon, lat = lon[finite], lat[finite]
    west, south, east, north = area
    if east < west:  # the area crosses the antimeridian
        east += 360.0
    centre, half = (west + east) / 2, (east - west) / 2
    relative = (lon - centre + 180.0) % 360.0 - 180.0
    lon_gap = max(0.0, float(relative.min()) - half, -half - float(relative.max()))
    lat_gap = max(0.0, south - float(lat.max()), float(lat.min()) - north)
    cos = math.cos(math.radians(min(90.0, float(np.abs(lat).max()))))
    return math.hypot(lat_gap, lon_gap * cos)


def _crs_name(crs: CRS | None) -> str:
    """``EPSG:32720``, or the CRS's name: short enough for a one-line message."""
    if crs is None:
        return "no CRS"
    return f"EPSG:{crs.epsg}" if crs.epsg is not None else str(crs.proj.name)


def _area_text(area: tuple[float, float, float, float]) -> str:
    west, south, east, north = area
    return f"longitudes {west:g}..{east:g}, latitudes {south:g}..{north:g}"


def check_lonlat_extent(geobox: GeoBox) -> None:
    """Refuse a grid whose corners do not map to real longitudes and latitudes: coordinates
    in other units than its CRS's (degrees labelled as metres, or the reverse).

    Raises :class:`~xclay.errors.DatacubeError` when one of the four outer corners does
    not transform to WGS84, or lands on a non-finite longitude or latitude or beyond the
    poles; returns nothing otherwise.

    Parameters
    ----------
    geobox
        The pixel grid to check: its shape, affine transform and CRS.
    """
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
            f"{_crs_name(geobox.crs)}) do not map to valid longitudes and latitudes: the coordinates are "
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
    exact = Affine.from_gdal(*(float(v) for v in str(gt).split()))
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


def crs_tag(crs: CRS) -> str:
    """A short, stable name for a CRS: ``EPSG32720``, or a hash of its WKT."""
    epsg = crs.epsg
    if epsg is not None:
        return f"EPSG{epsg}"
    return "CRS" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:10]


def to_lonlat(crs: Any, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Native coordinates of ``crs`` (an odc-geo or pyproj CRS, or WKT) to WGS84
    ``(lon, lat)`` degrees, longitude first."""
    wkt = crs if isinstance(crs, str) else crs.to_wkt()
    lon, lat = _lonlat_transformer(wkt).transform(
        np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    )
    return np.asarray(lon), np.asarray(lat)


_TRANSFORMERS = threading.local()


def _lonlat_transformer(wkt: str) -> Transformer:
    """One transformer per CRS and thread (building one costs milliseconds; regions of a
    run ask for the same CRS thousands of times; pyproj transformers are not thread-safe)."""
    cache: dict[str, Transformer] = _TRANSFORMERS.__dict__.setdefault("cache", {})
    transformer = cache.get(wkt)
    if transformer is None:
        transformer = cache[wkt] = Transformer.from_crs(wkt, "EPSG:4326", always_xy=True)
    return transformer
