"""STAC items -> composite datacube (odc-stac).

:func:`from_stac` loads the requested bands of the items onto one pixel grid
(reprojecting and resampling items of other CRSs and resolutions), decodes
the sensor's mask into quality classes, composites over time, and returns a
datacube (``xclay`` convention) that stays lazy (dask) until it is written
with :func:`xclay.write_datacube`, block by block. :func:`datacube_template` is
the same cube's metadata without loading anything (a run's plan).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlparse

import numpy as np
import xarray as xr

from xclay._hashing import sha256_file
from xclay.datacube import as_datacube
from xclay.errors import IngestError
from xclay.ingest.composite import (
    Composite,
    by_solar_day,
    composite_over_time,
    composite_range,
    day_times,
    exclusion_table,
)
from xclay.ingest.gpu_composite import CompositeDevice, resolve_composite_device
from xclay.ingest.grid import MAX_PIXELS, GridPlan, plan_grid
from xclay.ingest.items import (
    band_metadata,
    check_local_hrefs,
    filter_items,
    item_solar_day,
    item_wavelengths,
    load_items,
    platform_of,
    require_bands,
    require_io,
    union_bbox,
)
from xclay.ingest.median import MaskPlan, median_composite, reads_in_flight
from xclay.masks import MASK_KINDS, MaskKind, PixelClass
from xclay.sensors import mask_of
from xclay.storage import StorageOptions
from xclay.storage.gdal import GdalOptions, gdal_settings, odc_driver

if TYPE_CHECKING:
    import pystac
    from odc.geo.geobox import GeoBox


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
    gdal_options: GdalOptions | None = None,
    storage_options: StorageOptions | None = None,
    device: CompositeDevice = "auto",
) -> xr.Dataset:
    """A composite datacube from STAC items, lazily (dask) until written.

    Parameters
    ----------
    items
        Items, an ItemCollection, a pystac-client ItemSearch, or the path or URL of an
        item collection or catalog JSON. Asset hrefs may be paths or URLs (``https://``,
        ``s3://``, ``gs://``, ``az://``): remote Cloud-Optimized GeoTIFFs are read as
        they are, by GDAL.
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
        composite holds all observations of one chunk at once (a median of 8- or 16-bit
        bands in their own dtype, every band and the mask; other composites one band at a
        time as float32): smaller chunks bound the memory of long time series.
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
    gdal_options
        GDAL configuration options for reading the assets, over xclay's settings for
        cloud reads and the environment's (:func:`xclay.storage.gdal.gdal_settings`):
        e.g. ``{"GDAL_HTTP_MAX_RETRY": 3}``, or ``{"AWS_NO_SIGN_REQUEST": "YES"}`` for a
        public bucket. They hold wherever the lazy cube is computed (Dask workers too).
    storage_options
        Settings for object storage beyond the environment (``endpoint``,
        ``skip_signature``, ``region``, ...): for an items file given as a URL, and
        given to GDAL for ``s3://`` assets.
    device
        Where a median composite's masking and median run: ``"auto"`` (a CUDA GPU when
        CuPy is installed and one is usable, else the CPU), ``"cpu"`` or ``"cuda"``. The
        results are the same, bit for bit. Reading and decoding stay on the host.

    Notes
    -----
    A median composite reads each chunk's observations (every band and the mask, every
    date) with many reads in flight: the cores' number for local files, 32 for remote
    ones (hiding their latency), whatever Dask scheduler computes the cube; then masks
    them and takes each band's median in its own dtype (:mod:`xclay.ingest.median`).
    """
    require_io()
    import odc.stac

    if composite not in ("median", "first-valid", "none"):
        raise IngestError(
            f"composite must be 'median', 'first-valid' or 'none', got {composite!r}."
        )
    all_items = load_items(items, storage_options=storage_options)
    if not all_items:
        raise IngestError("no STAC items: the search or file matched nothing.")
    selected = filter_items(all_items, bbox=bbox, datetime=datetime)
    if not selected:
        raise IngestError(
            f"none of the {len(all_items)} STAC items intersect bbox={list(bbox) if bbox else None} "
            f"within datetime={datetime!r}: the search is empty."
        )
    platform = platform or platform_of(selected)
    bands = list(bands)
    available = require_bands(selected, bands)
    check_local_hrefs(selected, bands)
    mask_kind = quality_mask(mask, platform, available)
    if geobox is not None:
        w, so, e, n = (float(v) for v in (bbox or union_bbox(selected)))
        grid = GridPlan(
            geobox=geobox, items=tuple(i.id for i in selected), bbox_lonlat=(w, so, e, n)
        )
    else:
        grid = plan_grid(selected, resolution=resolution, crs=crs, bbox=bbox, max_pixels=max_pixels)

    load_bands = bands + ([mask_kind[1]] if mask_kind else [])
    # A median reads one task per date (run on a read pool, chunk by chunk); the other
    # composites walk the dates of a chunk in order.
    time_chunk = 1 if composite in ("none", "median") else -1
    on = resolve_composite_device(device) if composite == "median" else "cpu"
    loaded = odc.stac.load(
        selected,
        bands=load_bands,
        geobox=grid.geobox,
        groupby=by_solar_day,
        chunks={"time": time_chunk, "y": chunk_size, "x": chunk_size},
        resampling={"*": resampling, **({mask_kind[1]: "nearest"} if mask_kind else {})},
        fail_on_error=True,
        # Remote assets (https://, s3://, ...) are read where they lie, through GDAL's
        # virtual file systems, under settings for cloud reads carried in the graph.
        driver=odc_driver(gdal_settings(gdal_options, storage_options)),
    )
    ds = loaded.sortby("time")
    if composite == "none" and days is not None:
        ds = ds.assign_coords(time=day_times(selected, ds["time"].values, days))
    nodata = _common_nodata(ds[bands])
    times = np.asarray(ds["time"].values, dtype="datetime64[ns]")
    if time_range is None:
        time_range = composite_range(datetime, times)
    unknown_time = all(i.properties.get("xclay:datetime_unknown") for i in selected)
    data: xr.Dataset | xr.DataArray
    quality: xr.DataArray | None
    if composite == "median":
        # the load as odc-stac made it: a median needs no order of dates, and sorting a
        # lazy load copies every block
        data, quality = _median(loaded, selected, bands, mask_kind, nodata, grid, on)
    else:
        observed = ds[bands]
        quality = mask_kind[0].decode(ds[mask_kind[1]]) if mask_kind else None
        if quality is None and nodata is None:
            # Nothing else tells "no item here" from a pixel of value 0 (odc-stac's fill):
            # quality classes from the items' footprints say which pixels were observed.
            quality = _coverage(selected, observed, grid.geobox)
        data = observed
        if composite == "first-valid":
            data, quality = composite_over_time(observed, quality, nodata, composite)
        elif unknown_time:
            unknown = np.full(data.sizes["time"], np.datetime64("NaT"), dtype="datetime64[ns]")
            data = data.assign_coords(time=unknown)
            quality = quality.assign_coords(time=unknown) if quality is not None else None
    waves = wavelengths if wavelengths is not None else item_wavelengths(selected, bands, platform)
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

    Parameters
    ----------
    items
        The STAC items the datacube would be made of (already selected: they are not
        filtered); at least one.
    bands
        Band names as the items name them (asset keys, ``eo:bands`` names or common
        names); they name the cube's bands.
    geobox
        The datacube's pixel grid.
    composite
        ``"median"`` or ``"first-valid"`` (one composite, no time dimension) or
        ``"none"`` (one time step per acquisition day), as in :func:`from_stac`.
    mask
        ``"auto"``, ``None`` or ``"none"``, or a mask kind, as in :func:`from_stac`: it
        decides whether the datacube has quality classes.
    platform
        Sensor-table key; default from the items' collection id or ``platform``.
    wavelengths
        Band wavelengths in micrometres when neither the platform nor the items'
        ``eo:bands`` give them.
    time_range
        With a composite: its time range, as in :func:`from_stac` (a run passes its
        own); default an unknown time (NaT).
    days
        With ``composite="none"``: the run's time steps, solar day -> time coordinate,
        as in :func:`from_stac` (a run passes its own); default one time step of
        unknown time (NaT).
    provenance
        Provenance to record (``attrs["provenance"]``); default none.
    """
    require_io()
    import dask.array as dask_array
    from odc.geo.xr import xr_coords

    selected = list(items)
    if not selected:
        raise IngestError("no STAC items: the search or file matched nothing.")
    platform = platform or platform_of(selected)
    available = require_bands(selected, bands)
    mask_kind = quality_mask(mask, platform, available)
    dtype, nodata = band_metadata(selected, bands)
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
    waves = wavelengths if wavelengths is not None else item_wavelengths(selected, bands, platform)
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


def _median(
    load: xr.Dataset,
    items: Sequence[pystac.Item],
    bands: Sequence[str],
    mask_kind: tuple[MaskKind, str] | None,
    nodata: float | None,
    grid: GridPlan,
    device: Literal["cpu", "cuda"],
) -> tuple[xr.DataArray, xr.DataArray | None]:
    """The median composite of a lazy load (one chunk per date) and its quality."""
    classes = None
    if mask_kind is None and nodata is None:  # as for the other composites: footprints
        classes = np.asarray(_coverage(items, load[list(bands)], grid.geobox).values)
    mask = mask_kind[1] if mask_kind else None
    decode = mask_kind[0].decode if mask_kind else None
    table = exclusion_table(decode, load[mask].dtype) if mask is not None else None
    plan = MaskPlan(nodata=nodata, decode=decode, table=table, device=device)
    threads = reads_in_flight(_remote(items, [*bands, *([mask] if mask else [])]))
    return median_composite(load, bands, mask, classes, plan, threads)


def _remote(items: Sequence[pystac.Item], names: Sequence[str]) -> bool:
    """Whether any asset of ``names`` is read over the network (a URL, or a GDAL
    virtual file system path)."""
    for item in items:
        for key, asset in item.assets.items():
            eo_names = {e.get("name") for e in asset.extra_fields.get("eo:bands") or []}
            if key not in names and not eo_names & set(names):
                continue
            href = asset.get_absolute_href() or asset.href
            if href.startswith("/vsi") or urlparse(href).scheme not in ("", "file"):
                return True
    return False


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


def quality_mask(
    mask: str | None, platform: str | None, available: Mapping[str, set[str]]
) -> tuple[MaskKind, str] | None:
    """The pixel classes a load takes from the items (Sentinel-2 SCL, Landsat QA_PIXEL).

    Parameters
    ----------
    mask
        ``"auto"`` (the platform's classes where every item has their asset, else none),
        ``"none"``/``None``, or a mask kind of :data:`xclay.masks.MASK_KINDS` (required).
    platform
        The items' sensor-table key (``"auto"`` picks its mask kind).
    available
        Per item, the names its bands can be asked by (:func:`~xclay.ingest.items.band_names`).

    Returns
    -------
    tuple or None
        The mask kind and the asset it is read from; None when no classes are loaded.
    """
    if mask in (None, "none"):
        return None
    if mask == "auto":
        auto = mask_of(platform)
        if auto is None:
            return None
        kind = auto
    elif mask in MASK_KINDS:
        kind = MASK_KINDS[mask]
    else:
        raise IngestError(
            f"mask must be 'auto', 'none' or one of {sorted(MASK_KINDS)}, got {mask!r}."
        )
    common = set.intersection(*available.values())
    asset = next((a for a in kind.assets if a in common), None)
    if asset is None:
        if mask == "auto":  # said once, in the run's plan (a note), not per region
            return None
        raise IngestError(
            f"mask {mask!r} needs an asset named one of {list(kind.assets)} in every item."
        )
    return kind, asset


def _common_nodata(data: xr.Dataset) -> float | None:
    values = {
        float(v) for v in (data[b].attrs.get("nodata") for b in data.data_vars) if v is not None
    }
    if len(values) > 1:
        raise IngestError(f"the bands declare different nodata values {sorted(values)}; pass one.")
    return values.pop() if values else None


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


log = logging.getLogger(__name__)
