"""STAC items -> composite datacube (odc-stac), and STAC items from local GeoTIFFs.

:func:`from_stac` loads the requested bands of the items onto one pixel grid
(reprojecting and resampling items of other CRSs and resolutions), decodes
the sensor's mask into quality classes, composites over time, and returns a
datacube (``xclay`` convention) that stays lazy (dask) until it is written
with :func:`xclay.write_datacube`, block by block.

:func:`stac_item` makes an Item from local GeoTIFFs (one multi-band file, or
one file per band) with rio-stac, so users with files but no catalog can start.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import numpy as np
import xarray as xr

from xclay._hashing import sha256_file
from xclay.datacube import as_datacube
from xclay.errors import IngestError, MissingDependencyError
from xclay.masks import EXCLUDED_FROM_COMPOSITES, MASK_KINDS, PLATFORM_MASKS, MaskKind, PixelClass
from xclay.sensors import get_sensor, list_platforms

if TYPE_CHECKING:
    import pystac
    from odc.geo.geobox import GeoBox

__all__ = [
    "IngestError",
    "datacube_template",
    "from_stac",
    "item_solar_day",
    "load_items",
    "plan_grid",
    "solar_day",
    "stac_item",
]

log = logging.getLogger(__name__)

Composite = Literal["median", "first-valid", "none"]
MAX_PIXELS = 250_000_000_000  # ~ Africa at 10 m; beyond this a request is a units mistake
# STAC collection ids (Earth Search, Planetary Computer) -> sensor-table keys.
COLLECTION_PLATFORMS = {
    "sentinel-2-l2a": "sentinel-2-l2a",
    "sentinel-2-c1-l2a": "sentinel-2-l2a",
    "landsat-c2-l2": "landsat-c2l2-sr",
    "landsat-c2-l1": "landsat-c2l1",
    "naip": "naip",
    "sentinel-1-rtc": "sentinel-1-rtc",
}


def _require_io() -> None:
    try:
        import odc.stac  # noqa: F401
        import pystac  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            'STAC ingestion needs odc-stac and pystac: pip install "xclay[io]"'
        ) from err


# --------------------------------------------------------------------------- items


def load_items(source: Any) -> list[pystac.Item]:
    """Items from a list of Items, an ItemCollection, an ItemSearch, or a path to an
    ItemCollection/FeatureCollection JSON, a catalog.json, or an Item JSON."""
    _require_io()
    import pystac

    if isinstance(source, pystac.Item):
        return [source]
    if isinstance(source, pystac.ItemCollection):
        return list(source)
    if hasattr(source, "items") and callable(source.items) and not isinstance(source, Mapping):
        return list(source.items())  # pystac_client.ItemSearch, or a catalog object
    if isinstance(source, str | os.PathLike):
        return _items_from_file(Path(source))
    if isinstance(source, Iterable):
        items = list(source)
        bad = [type(i).__name__ for i in items if not isinstance(i, pystac.Item)]
        if bad:
            raise IngestError(f"expected pystac Items, got {sorted(set(bad))}.")
        return items
    raise IngestError(
        f"cannot read STAC items from {type(source).__name__}; pass Items, an ItemCollection, an "
        "ItemSearch, or the path of an item collection or catalog JSON file."
    )


def _items_from_file(path: Path) -> list[pystac.Item]:
    import pystac

    if not path.is_file():
        raise IngestError(f"STAC file {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IngestError(f"{path} is not readable JSON ({err}).") from err
    kind = data.get("type")
    if kind == "FeatureCollection":
        return list(pystac.ItemCollection.from_file(str(path)))
    if kind == "Feature":
        return [pystac.Item.from_file(str(path))]
    if kind in ("Catalog", "Collection"):
        return list(pystac.read_file(str(path)).get_items(recursive=True))  # type: ignore[attr-defined]
    raise IngestError(f"{path} is a STAC {kind!r}, not an item collection, item or catalog.")


def stac_item(
    assets: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    *,
    bands: Sequence[str] | None = None,
    wavelengths: Sequence[float] | Mapping[str, float] | None = None,
    datetime: str | dt.datetime | None = None,
    id: str | None = None,
    platform: str | None = None,
    collection: str | None = None,
) -> pystac.Item:
    """A STAC Item for local GeoTIFFs (rio-stac), with band names, wavelengths and checksums.

    Parameters
    ----------
    assets
        One multi-band GeoTIFF, or a mapping band name -> single-band GeoTIFF.
    bands
        Names of the bands of a multi-band file, in order (default ``b1..bN``).
    wavelengths
        Central wavelengths (micrometres), recorded as ``eo:bands`` ``center_wavelength``.
    datetime
        Acquisition time (ISO string or datetime); default: unknown (the
        file's modification time is not an acquisition time), recorded as
        1900-01-01 (before any Earth observation satellite) with
        ``xclay:datetime_unknown``: datacubes made from it, by xclay or by
        ``odc.stac.load`` then :func:`xclay.as_datacube`, have an unknown time
        (NaT), never a real date.
    id, platform, collection
        Item id (default: the first file's stem), ``platform`` property (a
        sensor-table key), collection id.
    """
    try:
        from rio_stac import create_stac_item
    except ImportError as err:
        raise MissingDependencyError(
            'making STAC items from GeoTIFFs needs rio-stac: pip install "xclay[io]"'
        ) from err

    when, unknown = _parse_datetime(datetime)
    files = (
        {"data": Path(assets)}
        if not isinstance(assets, Mapping)
        else {k: Path(v) for k, v in assets.items()}
    )
    for name, path in files.items():
        if not path.is_file():
            raise IngestError(f"GeoTIFF for {name!r} does not exist: {path}.")
    first = next(iter(files.values()))
    item_id = id or first.stem
    item: pystac.Item | None = None
    for asset_name, path in files.items():
        part = create_stac_item(
            str(path),
            input_datetime=when,
            id=item_id,
            asset_name=asset_name,
            asset_roles=["data"],
            with_proj=True,
            with_raster=True,
            with_eo=True,
        )
        if item is None:
            item = part
        else:
            item.add_asset(asset_name, part.assets[asset_name])
    assert item is not None
    for asset_name, asset in item.assets.items():
        names = [asset_name] if isinstance(assets, Mapping) else list(bands or [])
        eo = asset.extra_fields.get("eo:bands") or []
        if not isinstance(assets, Mapping):
            if bands is not None and len(bands) != len(eo):
                raise IngestError(f"bands= names {len(bands)} bands, {first.name} has {len(eo)}.")
            names = list(bands) if bands is not None else [f"b{i + 1}" for i in range(len(eo))]
        for k, entry in enumerate(eo):
            entry["name"] = names[k]
            entry.pop("description", None)
            wave = _wavelength_for(names[k], k, wavelengths)
            if wave is not None:
                entry["center_wavelength"] = wave
        asset.extra_fields["file:checksum"] = "1220" + sha256_file(Path(asset.href))
    if collection:
        item.collection_id = collection  # an id, without a link rio-stac would leave relative
    if platform:
        item.properties["platform"] = platform
    if unknown:
        item.properties["xclay:datetime_unknown"] = True
    return item


def _wavelength_for(
    name: str, index: int, wavelengths: Sequence[float] | Mapping[str, float] | None
) -> float | None:
    if wavelengths is None:
        return None
    if isinstance(wavelengths, Mapping):
        return float(wavelengths[name]) if name in wavelengths else None
    return float(wavelengths[index]) if index < len(wavelengths) else None


# What an item with an unknown acquisition date says (STAC requires a datetime): a time
# before any Earth observation satellite, read back as unknown (NaT) by as_datacube.
UNKNOWN_DATETIME = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)


def _parse_datetime(value: str | dt.datetime | None) -> tuple[dt.datetime, bool]:
    if value is None:
        return UNKNOWN_DATETIME, True
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value, False


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class GridPlan:
    """The pixel grid a request resolves to, before any pixel is read."""

    geobox: GeoBox
    items: tuple[str, ...]
    bbox_lonlat: tuple[float, float, float, float]

    @property
    def pixels(self) -> int:
        ny, nx = self.geobox.shape
        return int(ny) * int(nx)


def plan_grid(
    items: Sequence[pystac.Item],
    *,
    resolution: float,
    crs: str | int | None = None,
    bbox: Sequence[float] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> GridPlan:
    """The grid of a request: CRS (given, the items' common one, or the UTM zone of the
    area's centre), extent (``bbox`` in lon/lat, else the items' union), resolution."""
    from odc.geo import CRS
    from odc.geo.geobox import GeoBox
    from odc.geo.geom import BoundingBox

    if not items:
        raise IngestError("no STAC items: the search or file matched nothing.")
    area = tuple(float(v) for v in bbox) if bbox is not None else _union_bbox(items)
    if len(area) != 4 or not (area[0] < area[2] and area[1] < area[3]):
        raise IngestError(f"bbox must be [west, south, east, north] in degrees, got {list(area)}.")
    if crs is not None:
        target = CRS(crs)
    else:
        epsgs = {i.properties.get("proj:epsg") for i in items}
        codes = {i.properties.get("proj:code") for i in items} - {None}
        if len(epsgs) == 1 and None not in epsgs:
            target = CRS(f"EPSG:{epsgs.pop()}")
        elif len(codes) == 1:
            target = CRS(codes.pop())
        else:
            target = CRS.utm((area[0] + area[2]) / 2, (area[1] + area[3]) / 2)
    if not (isinstance(resolution, int | float) and math.isfinite(resolution) and resolution > 0):
        raise IngestError(f"resolution must be a positive number, got {resolution!r}.")
    if target.geographic and resolution >= 1:
        raise IngestError(
            f"resolution {resolution} in the geographic CRS {target} means {resolution}-degree "
            "pixels; give the resolution in degrees (e.g. 0.0001) or choose a projected CRS."
        )
    if not target.geographic and resolution < 0.01:
        raise IngestError(
            f"resolution {resolution} m in {target} is below a centimetre; is it in degrees? "
            "Give metres for a projected CRS."
        )
    native = _native_geobox(items, target)
    if native is not None and math.isclose(abs(native.resolution.x), resolution, rel_tol=1e-9):
        # Same CRS and resolution as the items: their own pixel grid, exactly (no resampling).
        geobox = (
            native
            if bbox is None
            else _crop(native, BoundingBox(*area, crs="EPSG:4326").to_crs(target))
        )
    else:
        extent = BoundingBox(*area, crs="EPSG:4326").to_crs(target)
        geobox = GeoBox.from_bbox(extent, crs=target, resolution=resolution)
    ny, nx = geobox.shape
    if ny * nx > max_pixels:
        raise IngestError(
            f"the requested grid is {ny:,} x {nx:,} px ({ny * nx:.2e} pixels) at resolution "
            f"{resolution} in {target}: more than max_pixels={max_pixels:.1e}. Check the "
            "resolution and its units, or split the area into regions."
        )
    west, south, east, north = area
    return GridPlan(
        geobox=geobox, items=tuple(i.id for i in items), bbox_lonlat=(west, south, east, north)
    )


def _native_geobox(items: Sequence[pystac.Item], target: Any) -> GeoBox | None:
    """The union of the items' own pixel grids, exactly, when they share ``target``'s CRS
    and one grid (``proj:transform``, ``proj:shape``); else None."""
    from affine import Affine
    from odc.geo import CRS
    from odc.geo.geobox import GeoBox

    base: Affine | None = None
    windows = []
    for item in items:
        p = item.properties
        code = p.get("proj:code") or (f"EPSG:{p['proj:epsg']}" if p.get("proj:epsg") else None)
        transform, shape = p.get("proj:transform"), p.get("proj:shape")
        if code is None or transform is None or shape is None or CRS(code) != target:
            return None
        t = Affine(*(float(v) for v in transform[:6]))
        if base is None:
            base = t
        if (t.a, t.b, t.d, t.e) != (base.a, base.b, base.d, base.e):
            return None  # another resolution or rotation
        col, row = (t.c - base.c) / base.a, (t.f - base.f) / base.e
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None  # another grid phase
        windows.append((round(row), round(col), int(shape[0]), int(shape[1])))
    assert base is not None
    r0 = min(w[0] for w in windows)
    c0 = min(w[1] for w in windows)
    r1 = max(w[0] + w[2] for w in windows)
    c1 = max(w[1] + w[3] for w in windows)
    return GeoBox((r1 - r0, c1 - c0), base @ Affine.translation(c0, r0), target)


def _crop(geobox: GeoBox, extent: Any) -> GeoBox:
    """The whole pixels of ``geobox`` that cover ``extent`` (in its CRS)."""
    inverse = ~geobox.affine
    cols, rows = zip(
        *(
            inverse @ (x, y)
            for x in (extent.left, extent.right)
            for y in (extent.bottom, extent.top)
        ),
        strict=True,
    )
    ny, nx = geobox.shape
    r0, r1 = max(0, math.floor(min(rows))), min(ny, math.ceil(max(rows)))
    c0, c1 = max(0, math.floor(min(cols))), min(nx, math.ceil(max(cols)))
    if r1 <= r0 or c1 <= c0:
        raise IngestError("the bbox does not overlap the items' pixels.")
    return geobox[r0:r1, c0:c1]


def _union_bbox(items: Sequence[pystac.Item]) -> tuple[float, float, float, float]:
    boxes = np.array([i.bbox for i in items if i.bbox], dtype=float)
    if boxes.size == 0:
        raise IngestError("the items have no bbox; pass bbox= (west, south, east, north).")
    return (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())


def filter_items(
    items: Sequence[pystac.Item], *, bbox: Sequence[float] | None, datetime: str | None
) -> list[pystac.Item]:
    """Items intersecting ``bbox`` (lon/lat) and within ``datetime`` ("start/end", open ends "..")."""
    start, end = _time_range(datetime)
    out = []
    for item in items:
        if bbox is not None and item.bbox is not None:
            w, s, e, n = item.bbox
            if w > bbox[2] or e < bbox[0] or s > bbox[3] or n < bbox[1]:
                continue
        when = item.datetime or item.common_metadata.start_datetime
        if item.properties.get("xclay:datetime_unknown"):
            when = None  # an unknown date is not outside any range
        if when is not None and (
            (start is not None and when < start) or (end is not None and when > end)
        ):
            continue
        out.append(item)
    return out


def _time_range(value: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    if not value:
        return None, None
    parts = value.split("/") if "/" in value else [value, value]
    if len(parts) != 2:
        raise IngestError(
            f"datetime must be 'start/end' (ISO dates, '..' for open), got {value!r}."
        )

    def parse(text: str, end: bool) -> dt.datetime | None:
        if text in ("", ".."):
            return None
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as err:
            raise IngestError(
                f"cannot read {text!r} in datetime {value!r}; use ISO dates."
            ) from err
        if len(text) == 10 and end:  # a date alone ends at the end of that day
            when = when + dt.timedelta(days=1) - dt.timedelta(microseconds=1)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    return parse(parts[0], False), parse(parts[1], True)


# --------------------------------------------------------------------------- load


def from_stac(
    items: Any,
    *,
    bands: Sequence[str],
    resolution: float,
    crs: str | int | None = None,
    bbox: Sequence[float] | None = None,
    datetime: str | None = None,
    composite: Composite = "median",
    mask: str | None = "auto",
    platform: str | None = None,
    wavelengths: Sequence[float] | Mapping[str, float] | None = None,
    resampling: str = "nearest",
    chunk_size: int = 2048,
    max_pixels: int = MAX_PIXELS,
    geobox: GeoBox | None = None,
    provenance: bool = True,
    time_range: tuple[np.datetime64, np.datetime64] | None = None,
    days: Mapping[np.datetime64, np.datetime64] | None = None,
) -> xr.Dataset:
    """A composite datacube from STAC items, lazily (dask) until written.

    Parameters
    ----------
    items
        Items, an ItemCollection, a pystac-client ItemSearch, or a path to an
        item collection or catalog JSON.
    bands
        Band names as the items name them (asset keys, ``eo:bands`` names or
        common names); they name the cube's bands.
    resolution
        Pixel size in the target CRS's units (metres for UTM).
    crs
        Target CRS; default the items' common CRS, else the UTM zone of the area.
    bbox
        Area (west, south, east, north) in degrees; default the items' union.
    datetime
        Keep items within ``"start/end"`` (ISO; ``..`` open); also the
        composite's time range.
    composite
        ``"median"`` of valid observations, ``"first-valid"`` (earliest valid
        observation), or ``"none"`` (one time step per acquisition day).
    mask
        ``"auto"`` (the platform's mask asset, if the items have it: Sentinel-2
        SCL, Landsat QA_PIXEL), ``None`` or ``"none"``, or a mask kind
        (``"sentinel-2-scl"``, ``"landsat-qa-pixel"``). Observations masked as
        nodata, cloud, cloud shadow or haze are left out of composites.
    platform
        Sensor-table key; default from the items' collection id or ``platform``.
    wavelengths
        Band wavelengths in micrometres when neither the platform nor the
        items' ``eo:bands`` give them.
    resampling
        Resampling of the bands onto the grid (the mask always uses nearest).
    chunk_size
        Dask chunk edge in pixels; make it a multiple of the chip (and shard) size. A
        composite holds all observations of one chunk at once (as float32): smaller
        chunks bound the memory of long time series.
    max_pixels
        Refuse grids larger than this (a units mistake, not a request).
    geobox
        Load exactly this pixel grid (e.g. one region of a run's grid) instead of
        planning one from ``resolution``, ``crs`` and ``bbox``.
    provenance
        Record the items' provenance (hashing local assets); regions of a run skip it.
    time_range
        The composite's time range (default: ``datetime``, else the items' own range);
        regions of a run pass the run's, so every region has the same time coordinate.
    days
        With ``composite="none"``: the run's time steps, solar day -> time coordinate
        (the day's first acquisition over all the run's items). The items'
        acquisitions are grouped by solar day (:func:`solar_day` at each item's
        centre) and each group gets its day's time, so every region of a run has the
        same time steps whatever items it sees. Default: each group's own first time.
    """
    _require_io()
    import odc.stac

    if composite not in ("median", "first-valid", "none"):
        raise IngestError(
            f"composite must be 'median', 'first-valid' or 'none', got {composite!r}."
        )
    all_items = load_items(items)
    if not all_items:
        raise IngestError("no STAC items: the search or file matched nothing.")
    selected = filter_items(all_items, bbox=bbox, datetime=datetime)
    if not selected:
        raise IngestError(
            f"none of the {len(all_items)} STAC items intersect bbox={list(bbox) if bbox else None} "
            f"within datetime={datetime!r}: the search is empty."
        )
    platform = platform or _platform_of(selected)
    bands = list(bands)
    available = _band_names(selected)
    missing = [b for b in bands if not all(b in names for names in available.values())]
    if missing:
        common = set.intersection(*available.values())
        raise IngestError(
            f"bands {missing} are not in every item; the items have {sorted(common)}."
        )
    _check_local_hrefs(selected, bands)
    mask_kind = _mask_kind(mask, platform, available)
    if geobox is not None:
        w, so, e, n = (float(v) for v in (bbox or _union_bbox(selected)))
        grid = GridPlan(
            geobox=geobox, items=tuple(i.id for i in selected), bbox_lonlat=(w, so, e, n)
        )
    else:
        grid = plan_grid(selected, resolution=resolution, crs=crs, bbox=bbox, max_pixels=max_pixels)

    load_bands = bands + ([mask_kind[1]] if mask_kind else [])
    time_chunk = 1 if composite == "none" else -1
    ds = odc.stac.load(
        selected,
        bands=load_bands,
        geobox=grid.geobox,
        groupby=_by_solar_day,
        chunks={"time": time_chunk, "y": chunk_size, "x": chunk_size},
        resampling={"*": resampling, **({mask_kind[1]: "nearest"} if mask_kind else {})},
        fail_on_error=True,
    )
    ds = ds.sortby("time")
    if composite == "none" and days is not None:
        ds = ds.assign_coords(time=_day_times(selected, ds["time"].values, days))
    quality = mask_kind[0].decode(ds[mask_kind[1]]) if mask_kind else None
    data = ds[bands]
    nodata = _common_nodata(data)
    if quality is None and nodata is None:
        # Nothing else tells "no item here" from a pixel of value 0 (odc-stac's fill):
        # quality classes from the items' footprints say which pixels were observed.
        quality = _coverage(selected, data, grid.geobox)
    times = np.asarray(ds["time"].values, dtype="datetime64[ns]")
    if time_range is None:
        time_range = _composite_range(datetime, times)
    unknown_time = all(i.properties.get("xclay:datetime_unknown") for i in selected)
    if composite != "none":
        data, quality = _composite(data, quality, nodata, composite)
    elif all(i.properties.get("xclay:datetime_unknown") for i in selected):
        unknown = np.full(data.sizes["time"], np.datetime64("NaT"), dtype="datetime64[ns]")
        data = data.assign_coords(time=unknown)
        quality = quality.assign_coords(time=unknown) if quality is not None else None
    waves = wavelengths if wavelengths is not None else _item_wavelengths(selected, bands, platform)
    cube = as_datacube(
        data,
        bands=bands,
        platform=platform,
        wavelengths=waves,
        nodata=nodata,
        time=time_range if composite != "none" and not unknown_time else None,
        provenance=_provenance(selected, bands, composite, time_range, grid, datetime)
        if provenance
        else {},
        quality=quality,
    )
    return cube


def datacube_template(
    items: Sequence[pystac.Item],
    *,
    bands: Sequence[str],
    geobox: GeoBox,
    composite: Composite = "median",
    mask: str | None = "auto",
    platform: str | None = None,
    wavelengths: Sequence[float] | Mapping[str, float] | None = None,
    time_range: tuple[np.datetime64, np.datetime64] | None = None,
    days: Mapping[np.datetime64, np.datetime64] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """The datacube :func:`from_stac` would make of ``items`` on ``geobox``, without
    loading or even planning a load: bands, dtype and nodata from the items' metadata
    (one item per collection), wavelengths, quality, time steps and the grid from
    arithmetic. Its pixels are lazy zeros: it describes a datacube store to create
    (:func:`xclay.datacube.create_datacube_store`) before regions fill it.

    ``days`` (``composite="none"``) and ``time_range`` (composites) are as in
    :func:`from_stac`; a run passes its own.
    """
    _require_io()
    import dask.array as dask_array
    from odc.geo.xr import xr_coords

    selected = list(items)
    if not selected:
        raise IngestError("no STAC items: the search or file matched nothing.")
    platform = platform or _platform_of(selected)
    available = _band_names(selected)
    missing = [b for b in bands if not all(b in names for names in available.values())]
    if missing:
        common = set.intersection(*available.values())
        raise IngestError(
            f"bands {missing} are not in every item; the items have {sorted(common)}."
        )
    mask_kind = _mask_kind(mask, platform, available)
    dtype, nodata = _band_metadata(selected, bands)
    unknown_time = all(i.properties.get("xclay:datetime_unknown") for i in selected)
    if composite == "none":
        if unknown_time or not days:
            times = np.array([np.datetime64("NaT")], dtype="datetime64[ns]")
        else:
            times = np.asarray([days[d] for d in sorted(days)], dtype="datetime64[ns]")
        when = None
    else:
        times = np.zeros(1, dtype="datetime64[ns]")  # replaced by as_datacube's midpoint
        when = time_range if not unknown_time else None
    ny, nx = geobox.shape
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    chunks = (1, len(bands), min(ny, 4096), min(nx, 4096))
    pixels = xr.DataArray(
        dask_array.zeros((len(times), len(bands), ny, nx), dtype=dtype, chunks=chunks),
        dims=("time", "band", "y", "x"),
        coords={"band": list(bands), "y": coords["y"], "x": coords["x"],
                "spatial_ref": coords["spatial_ref"]},
    )  # fmt: skip
    if composite == "none":
        pixels = pixels.assign_coords(time=times)
    else:
        pixels = pixels.isel(time=0, drop=True)
    quality = None
    if mask_kind is not None or nodata is None:  # from_stac adds coverage classes then
        quality = xr.DataArray(
            dask_array.zeros((len(times), ny, nx), dtype=np.uint8, chunks=(1, *chunks[2:])),
            dims=("time", "y", "x"),
        )
        if composite != "none":
            quality = quality.isel(time=0, drop=True)
    waves = wavelengths if wavelengths is not None else _item_wavelengths(selected, bands, platform)
    return as_datacube(
        pixels,
        bands=list(bands),
        platform=platform,
        wavelengths=waves,
        nodata=nodata,
        time=when,
        provenance=dict(provenance or {}),
        quality=quality,
    )


def _band_metadata(items: Sequence[pystac.Item], bands: Sequence[str]) -> tuple[Any, float | None]:
    """The dtype and nodata value odc-stac will load ``bands`` with (from one item per
    collection); different nodata values across bands or collections are an error."""
    import odc.stac

    available = _band_names(items)
    missing = [b for b in bands if not all(b in names for names in available.values())]
    if missing:
        common = set.intersection(*available.values())
        raise IngestError(
            f"bands {missing} are not in every item; the items have {sorted(common)}."
        )
    seen: dict[str | None, pystac.Item] = {}
    for item in items:
        seen.setdefault(item.collection_id, item)
    dtypes, nodatas = [], set()
    for item in seen.values():
        meta = odc.stac.extract_collection_metadata(item).resolve_bands(list(bands))
        for band in bands:
            band_meta = meta[band]
            dtypes.append(np.dtype(getattr(band_meta, "data_type", None) or "float32"))
            value = getattr(band_meta, "nodata", None)
            if value is not None:
                nodatas.add(float(value))
    if len(nodatas) > 1:
        raise IngestError(f"the bands declare different nodata values {sorted(nodatas)}; pass one.")
    return np.result_type(*dtypes), (nodatas.pop() if nodatas else None)


def solar_day(when: dt.datetime, lon: float) -> dt.date:
    """The day of an acquisition in local solar time at longitude ``lon`` (UTC shifted by
    ``lon / 15`` hours): one orbit's passes over an area fall on one solar day."""
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return (when + dt.timedelta(hours=lon / 15.0)).date()


def item_solar_day(item: pystac.Item) -> dt.date | None:
    """An item's solar day, at its own centre (so every region groups it the same way)."""
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        return None
    if item.bbox:
        lon = (float(item.bbox[0]) + float(item.bbox[2])) / 2
    else:
        lon = 0.0
    return solar_day(when, lon)


def _by_solar_day(item: pystac.Item, parsed: Any, idx: int) -> Any:
    """odc-stac ``groupby``: acquisitions of one solar day at each item's own centre."""
    day = item_solar_day(item)
    return day if day is not None else dt.date(1, 1, 1)


def _day_times(
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


def _coverage(items: Sequence[pystac.Item], data: xr.Dataset, geobox: GeoBox) -> xr.DataArray:
    """Quality classes ``(time, y, x)`` of a load: clear where an item of that time step's
    solar day covers the pixel (its footprint), nodata elsewhere."""
    import shapely
    from odc.geo.geom import Geometry
    from odc.geo.xr import rasterize

    by_day: dict[Any, list[Any]] = {}
    for item in items:
        geometry = item.geometry or (
            shapely.geometry.mapping(shapely.box(*item.bbox)) if item.bbox else None
        )
        if geometry is not None:
            by_day.setdefault(item_solar_day(item), []).append(shapely.geometry.shape(geometry))
    steps = data.sizes["time"]
    days = sorted(d for d in by_day if d is not None) if steps > 1 else list(by_day)
    everything = [shape for shapes in by_day.values() for shape in shapes]
    layers = []
    for t in range(steps):
        shapes = by_day[days[t]] if steps > 1 and t < len(days) else everything
        if not shapes:
            layers.append(np.zeros(geobox.shape, dtype=bool))
            continue
        assert geobox.crs is not None
        footprint = Geometry(shapely.union_all(shapes), crs="EPSG:4326").to_crs(geobox.crs)
        layers.append(np.asarray(rasterize(footprint, geobox, all_touched=True).values))
    covered = np.stack(layers)
    classes = np.where(covered, np.uint8(PixelClass.CLEAR), np.uint8(PixelClass.NODATA))
    return xr.DataArray(
        classes,
        dims=("time", "y", "x"),
        coords={"time": data["time"], "y": data["y"], "x": data["x"]},
    )


def _platform_of(items: Sequence[pystac.Item]) -> str | None:
    known = set(list_platforms())
    for item in items:
        for candidate in (item.properties.get("platform"), item.collection_id):
            if candidate in known:
                return str(candidate)
            if candidate in COLLECTION_PLATFORMS:
                return COLLECTION_PLATFORMS[candidate]
    return None


def _band_names(items: Sequence[pystac.Item]) -> dict[str, set[str]]:
    """Per item, the names a band can be asked by: asset keys, eo:bands names and common names."""
    out = {}
    for item in items:
        names: set[str] = set()
        for key, asset in item.assets.items():
            eo = asset.extra_fields.get("eo:bands") or []
            if len(eo) <= 1:
                names.add(key)
            for entry in eo:
                names.update(v for v in (entry.get("name"), entry.get("common_name")) if v)
        out[item.id] = names
    return out


def _mask_kind(
    mask: str | None, platform: str | None, available: Mapping[str, set[str]]
) -> tuple[MaskKind, str] | None:
    if mask in (None, "none"):
        return None
    if mask == "auto":
        kind_name = PLATFORM_MASKS.get(platform or "")
        if kind_name is None:
            return None
    elif mask in MASK_KINDS:
        kind_name = mask
    else:
        raise IngestError(
            f"mask must be 'auto', 'none' or one of {sorted(MASK_KINDS)}, got {mask!r}."
        )
    kind = MASK_KINDS[kind_name]
    common = set.intersection(*available.values())
    asset = next((a for a in kind.assets if a in common), None)
    if asset is None:
        if mask == "auto":
            log.info("mask='auto': the items have no %s asset; no quality classes", kind.name)
            return None
        raise IngestError(
            f"mask {mask!r} needs an asset named one of {list(kind.assets)} in every item."
        )
    return kind, asset


def _check_local_hrefs(items: Sequence[pystac.Item], bands: Sequence[str]) -> None:
    for item in items:
        for key, asset in item.assets.items():
            eo_names = {e.get("name") for e in asset.extra_fields.get("eo:bands") or []}
            if key not in bands and not eo_names & set(bands):
                continue
            href = asset.get_absolute_href() or asset.href
            parsed = urlparse(href)
            if parsed.scheme in ("", "file") and not Path(parsed.path).is_file():
                raise IngestError(
                    f"asset {key!r} of item {item.id!r} points to {href}, which does not exist. "
                    "Fix the item's href (or the catalog's location) before ingesting."
                )


def _common_nodata(data: xr.Dataset) -> float | None:
    values = {
        float(v) for v in (data[b].attrs.get("nodata") for b in data.data_vars) if v is not None
    }
    if len(values) > 1:
        raise IngestError(f"the bands declare different nodata values {sorted(values)}; pass one.")
    return values.pop() if values else None


def _composite(
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
    """Median over the last axis ignoring NaN; NaN where every value is NaN.

    All-NaN pixels are filled before ``np.nanmedian`` (which would warn about
    them) rather than silenced: warning filters are not thread-safe under dask.
    """
    empty = np.isnan(values).all(axis=-1)
    out = np.nanmedian(np.where(empty[..., None], 0.0, values), axis=-1)
    out[empty] = np.nan
    return out


def _composite_range(
    datetime: str | None, times: np.ndarray
) -> tuple[np.datetime64, np.datetime64]:
    start, end = _time_range(datetime)
    lo = np.datetime64(start.replace(tzinfo=None), "ns") if start else times.min()
    hi = np.datetime64(end.replace(tzinfo=None), "ns") if end else times.max()
    return lo, hi


def _item_wavelengths(
    items: Sequence[pystac.Item], bands: Sequence[str], platform: str | None
) -> list[float] | None:
    if platform:
        sensor = get_sensor(platform)
        if all(b in sensor.band_names for b in bands):
            return None  # as_datacube takes them from the sensor table
    waves: dict[str, float] = {}
    for item in items:
        for key, asset in item.assets.items():
            eo = asset.extra_fields.get("eo:bands") or []
            for entry in eo:
                wave = entry.get("center_wavelength")
                if wave is None:
                    continue
                names = {entry.get("name"), entry.get("common_name")} | (
                    {key} if len(eo) == 1 else set()
                )
                for name in names - {None}:
                    waves.setdefault(str(name), float(wave))
    if all(b in waves for b in bands):
        return [waves[b] for b in bands]
    return None  # as_datacube will ask for them by name


def _provenance(
    items: Sequence[pystac.Item],
    bands: Sequence[str],
    composite: str,
    time_range: tuple[np.datetime64, np.datetime64],
    grid: GridPlan,
    datetime: str | None,
) -> dict[str, Any]:
    sources = []
    for item in items:
        assets = {}
        for key, asset in item.assets.items():
            href = asset.get_absolute_href() or asset.href
            entry: dict[str, Any] = {"href": href}
            checksum = asset.extra_fields.get("file:checksum")
            if isinstance(checksum, str) and checksum.startswith("1220"):
                entry["sha256"] = checksum[4:]
            elif urlparse(href).scheme in ("", "file") and Path(urlparse(href).path).is_file():
                entry["sha256"] = sha256_file(Path(urlparse(href).path))
            assets[key] = entry
        sources.append(
            {
                "id": item.id,
                "collection": item.collection_id,
                "datetime": item.datetime.isoformat() if item.datetime else None,
                "assets": assets,
            }
        )
    return {
        "sources": sources,
        "stac": {
            "bands": list(bands),
            "composite": composite,
            "datetime": datetime,
            "start_datetime": str(time_range[0]),
            "end_datetime": str(time_range[1]),
            "bbox": list(grid.bbox_lonlat),
            "crs": str(grid.geobox.crs),
            "resolution": abs(float(grid.geobox.resolution.x)),
        },
    }
