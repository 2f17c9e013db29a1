"""Planning a run without reading pixels: items, zones, grids, time steps, chips, volume.

:func:`plan` resolves a :class:`~xclay.run.spec.RunSpec` from item metadata
and grid arithmetic alone (what ``xclay run --dry-run`` prints): the STAC
search, the item index, the zones and their grids (one CRS, or tiled by UTM
zone), the time steps, and the chips and bytes to expect. Nothing in it
scales with the pixels of the area, only with its items, and with the rows
plus columns of its grids.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.errors import IngestError, MissingDependencyError, XClayError
from xclay.run.items import ItemIndex, ItemSummary, index_items
from xclay.run.spec import RunSpec
from xclay.run.zones import Zone, single_zone, utm_cells, utm_zones
from xclay.storage import Location

__all__ = ["RunPlan", "plan"]


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, resolved without reading pixels.

    Attributes
    ----------
    source
        ``"stac"`` (items to ingest) or ``"datacube"`` (an existing datacube to embed).
    items
        The run's STAC items, indexed; ``None`` for an input datacube.
    bands
        Band names, in the datacube's order.
    platform
        Sensor-table key, or ``None`` when unknown.
    zones
        The grids (one datacube each): one, or one per UTM zone cell.
    resolution
        Pixel size in the grids' CRS units (metres for UTM).
    time_steps
        Time steps of the datacube (1 for a composite).
    chips
        Chips in the area over all zones and time steps (for zones tiled by UTM, an
        estimate from the cells' areas).
    area_km2
        The zones' area in square kilometres (NaN on a geographic CRS).
    bytes_estimate
        Bytes of pixels to read and write (ingestion's reads and the datacube's writes;
        for an input datacube, its pixels).
    bbox_lonlat
        The area (west, south, east, north) in degrees.
    dtype
        The pixels' dtype name (e.g. ``"uint16"``).
    days
        With ``composite: none``, solar day -> time coordinate of each time step;
        otherwise ``None``.
    time_range
        A composite's range (``input.datetime``, else the items' own range); ``None`` with
        ``composite: none``, for an input datacube, or when neither gives one.
    tiled
        Whether the zones are tiled by UTM zone.
    notes
        Remarks printed with the plan (e.g. that the area spans several UTM zones, or
        that ``edges: drop`` leaves pixels out).
    """

    source: str  # "stac" or "datacube"
    items: ItemIndex | None
    bands: tuple[str, ...]
    platform: str | None
    zones: tuple[Zone, ...]
    resolution: float
    time_steps: int
    chips: int
    area_km2: float
    bytes_estimate: int
    bbox_lonlat: tuple[float, float, float, float]
    dtype: str
    days: Mapping[np.datetime64, np.datetime64] | None = None
    time_range: tuple[np.datetime64, np.datetime64] | None = None
    tiled: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def crs(self) -> str:
        return ", ".join(dict.fromkeys(z.crs for z in self.zones))

    def to_dict(self) -> dict[str, Any]:
        """A summary for run records and outputs: counts, not lists that grow with the area."""
        return {
            "source": self.source,
            "items": len(self.items) if self.items is not None else 0,
            "bands": list(self.bands),
            "platform": self.platform,
            "crs": self.crs,
            "zones": [z.tag for z in self.zones],
            "tiled": self.tiled,
            "resolution": self.resolution,
            "time_steps": self.time_steps,
            "chips": self.chips,
            "area_km2": round(self.area_km2, 3),
            "bytes_estimate": self.bytes_estimate,
            "dtype": self.dtype,
            "bbox_lonlat": list(self.bbox_lonlat),
        }

    def describe(self) -> str:
        lines = []
        if self.items is not None:
            n = len(self.items)
            head = ", ".join(self.items.head) + (", ..." if n > 3 else "")
            lines.append(f"  items       {n:,} ({head})")
        platform = f"  (platform {self.platform})" if self.platform else ""
        lines.append(f"  bands       {', '.join(self.bands)}{platform}")
        bbox = [round(float(v), 4) for v in self.bbox_lonlat]
        lines.append(f"  area        {self.area_km2:,.1f} km2, bbox {bbox}")
        for zone in self.zones:
            ny, nx = zone.geobox.shape
            lines.append(
                f"  grid        {ny:,} x {nx:,} px at {self.resolution:g} in {_crs_label(zone.crs)}"
                + (f" (zone {zone.tag})" if self.tiled else "")
            )
        lines.append(f"  time steps  {self.time_steps}")
        approx = "~" if self.tiled else ""
        lines.append(f"  chips       {approx}{self.chips:,}")
        lines.append(
            f"  data        ~{_human_bytes(self.bytes_estimate)} of pixels to read and write "
            f"({self.dtype})"
        )
        lines += [f"  note        {n}" for n in self.notes]
        return "\n".join(lines)


def _crs_label(crs: str) -> str:
    """A CRS as people name it (``EPSG:31985``), not its whole WKT."""
    from pyproj import CRS
    from pyproj.exceptions import CRSError

    try:
        parsed = CRS.from_user_input(crs)
    except CRSError:
        return crs
    epsg = parsed.to_epsg()
    return f"EPSG:{epsg}" if epsg else str(parsed.name)


def plan(spec: RunSpec) -> RunPlan:
    """Resolve a spec: items, zones, grids, chips and data volume, without reading pixels.

    Parameters
    ----------
    spec
        The validated run spec (:func:`~xclay.run.spec.load_spec`). With ``input.stac``,
        its items are read or searched for and kept within ``input.bbox`` and
        ``input.datetime``; with ``input.datacube``, the datacube's metadata is read.

    Returns
    -------
    RunPlan
        What the run will do: its items, zones, time steps, chips and data volume. An
        empty search, or grids of more than ``grid.max_pixels`` pixels, raise
        :class:`~xclay.errors.IngestError`.
    """
    if spec.input.datacube is not None:
        return _plan_datacube(spec)
    return _plan_stac(spec)


def _plan_datacube(spec: RunSpec) -> RunPlan:
    from xclay.datacube import datacube_geobox, open_datacube

    cube = open_datacube(spec.datacube_path)
    geobox = datacube_geobox(cube)
    grid = ChipGrid.from_geobox(geobox, _grid_spec(spec))
    ny, nx = geobox.shape
    res = abs(float(geobox.resolution.x))
    steps = cube.sizes["time"]
    geographic = geobox.crs is not None and geobox.crs.geographic
    return RunPlan(
        source="datacube",
        items=None,
        bands=tuple(str(b) for b in cube["band"].values),
        platform=cube.attrs.get("platform") or None,
        zones=tuple(single_zone(geobox)),
        resolution=res,
        time_steps=steps,
        chips=grid.rows * grid.cols * steps,
        area_km2=float("nan") if geographic else ny * nx * res * res / 1e6,
        bytes_estimate=int(ny * nx * cube.sizes["band"] * cube["pixels"].dtype.itemsize * steps),
        bbox_lonlat=tuple(float(v) for v in geobox.extent.to_crs("EPSG:4326").boundingbox),  # type: ignore[arg-type]
        dtype=str(cube["pixels"].dtype),
        notes=tuple(n for n in [grid.describe_left_out()] if n),
    )


def _plan_stac(spec: RunSpec) -> RunPlan:
    from xclay.ingest.items import band_metadata
    from xclay.sensors import get_sensor

    # input.bands, else the platform's (the spec requires one of them)
    bands = tuple(spec.input.bands or get_sensor(str(spec.input.platform)).band_names)
    index, summary = _search(spec, bands)
    platform = spec.input.platform or summary.platform
    representatives = summary.representative_items()
    summary.require_bands(bands)
    dtype, _ = band_metadata(representatives, bands)
    _require_wavelengths(spec, representatives, bands, platform)
    assert spec.grid.resolution is not None
    resolution = float(spec.grid.resolution)
    step = spec.grid.stride or spec.grid.chip_size
    assert summary.bbox is not None  # items were kept
    given = spec.input.bbox
    bbox: tuple[float, float, float, float] = (
        (float(given[0]), float(given[1]), float(given[2]), float(given[3]))
        if given
        else (summary.bbox[0], summary.bbox[1], summary.bbox[2], summary.bbox[3])
    )
    zones, tiled, notes = _zones(spec, summary, bbox, resolution, step)
    notes += _mask_notes(spec, summary, platform)
    pixels = sum(int(np.prod(z.geobox.shape)) for z in zones)
    if pixels > spec.grid.max_pixels:
        raise IngestError(
            f"the requested grids hold {pixels:.2e} pixels at resolution {resolution}: more than "
            f"grid.max_pixels={spec.grid.max_pixels:.1e}. Check the resolution and its units, or "
            "split the area into runs."
        )
    days, time_range = _time_steps(spec, summary)
    steps = len(days) if days is not None else 1
    chips = sum(_zone_chips(z, spec) for z in zones) * steps
    area = sum(_zone_area_km2(z) for z in zones)
    itemsize = np.dtype(dtype).itemsize
    read = summary.item_pixels(bbox, pixels, spec_bbox=given is not None)
    bytes_estimate = int((read + pixels * steps) * len(bands) * itemsize)
    return RunPlan(
        source="stac",
        items=index,
        bands=tuple(bands),
        platform=platform,
        zones=tuple(zones),
        resolution=resolution,
        time_steps=steps,
        chips=chips,
        area_km2=area,
        bytes_estimate=bytes_estimate,
        bbox_lonlat=bbox,
        dtype=str(np.dtype(dtype)),
        days=days,
        time_range=time_range,
        tiled=tiled,
        notes=tuple(notes),
    )


def _mask_notes(spec: RunSpec, summary: ItemSummary, platform: str | None) -> list[str]:
    """A note when ``mask: auto`` finds no quality classes the platform usually has."""
    from xclay.ingest.stac import quality_mask
    from xclay.sensors import mask_of

    kind = mask_of(platform)
    if spec.input.mask != "auto" or kind is None:
        return []
    if quality_mask("auto", platform, {"every item": summary.common_names or set()}) is not None:
        return []
    return [
        f"mask 'auto': not every item has a {'/'.join(kind.assets)} asset, so no "
        "pixel is masked by class and "
        "chips have no cloud or clear fractions (quality filters on them do nothing)"
    ]


def _require_wavelengths(
    spec: RunSpec, items: list[Any], bands: Sequence[str], platform: str | None
) -> None:
    """Every band's wavelength comes from somewhere (the spec, the sensor table, the items'
    ``eo:bands``, as each collection's first item gives them): found now, not when the
    first region builds its datacube."""
    from xclay.ingest.items import item_wavelengths
    from xclay.sensors import get_sensor, list_platforms

    given = spec.input.wavelengths or {}
    known = set(given)
    if platform in list_platforms():
        known |= set(get_sensor(str(platform)).band_names)
    missing = [b for b in bands if b not in known]
    if not missing or item_wavelengths(items, missing, None) is not None:
        return
    raise IngestError(
        f"bands {missing} have no known wavelength: the items' eo:bands give none"
        + (f" and platform {platform!r} is not in the sensor table" if platform else "")
        + ". Set input.wavelengths (band: micrometres), or input.platform to a sensor-table key "
        f"({', '.join(list_platforms())})."
    )


def _grid_spec(spec: RunSpec) -> ChipGridSpec:
    return ChipGridSpec(
        chip_size=spec.grid.chip_size, stride=spec.grid.stride, edges=spec.grid.edges
    )


def _zones(
    spec: RunSpec,
    summary: ItemSummary,
    bbox: tuple[float, float, float, float],
    resolution: float,
    step: int,
) -> tuple[list[Zone], bool, list[str]]:
    """The run's grids: ``grid.crs: utm`` tiles by UTM zone; no ``grid.crs`` takes the items'
    own grid when they share a CRS, tiles by UTM zone when the area spans several 6-degree
    zones, else the UTM zone of its centre; any other ``grid.crs`` is one grid."""
    from xclay.ingest import plan_grid

    crs = spec.grid.crs
    try:
        if crs == "utm":
            return utm_zones(bbox, resolution, step), True, []
        shared = _shared_crs(summary)
        longitudes = {code[-2:] for code, _ in utm_cells(bbox)}
        if crs is None and shared is None and len(longitudes) > 1:
            note = (
                f"the area spans {len(longitudes)} UTM zones: one datacube per zone "
                "(grid.crs: utm); set grid.crs to force one CRS"
            )
            return utm_zones(bbox, resolution, step), True, [note]
    except ValueError as err:  # outside UTM's latitudes
        raise IngestError(str(err)) from err
    grid = plan_grid(
        summary.grid_items(),  # one item for each CRS, resolution and grid phase
        resolution=resolution,
        crs=crs,
        bbox=spec.input.bbox,
        max_pixels=spec.grid.max_pixels,
    )
    return single_zone(grid.geobox), False, []


def _shared_crs(summary: ItemSummary) -> str | None:
    codes = set(summary.codes)
    return codes.pop() if len(codes) == 1 and None not in codes else None


def _zone_chips(zone: Zone, spec: RunSpec) -> int:
    """Chips of a zone: its whole grid, or (tiled) about its cell's share of it."""
    from xclay.errors import DatacubeError

    try:
        grid = ChipGrid.from_geobox(zone.geobox, _grid_spec(spec))
    except DatacubeError:
        return 0
    total = grid.rows * grid.cols
    if zone.cell is None:
        return total
    cell = zone.cell_native()
    ny, nx = zone.geobox.shape
    res = abs(float(zone.geobox.resolution.x))
    share = cell.area / (ny * nx * res * res)
    result: int = round(total * min(1.0, share))
    return result


def _zone_area_km2(zone: Zone) -> float:
    if zone.geobox.crs is not None and zone.geobox.crs.geographic:
        return float("nan")
    if zone.cell is not None:
        return float(zone.cell_native().area) / 1e6
    ny, nx = zone.geobox.shape
    res = abs(float(zone.geobox.resolution.x))
    return ny * nx * res * res / 1e6


def _time_steps(
    spec: RunSpec, summary: ItemSummary
) -> tuple[dict[np.datetime64, np.datetime64] | None, tuple[np.datetime64, np.datetime64] | None]:
    """The run's time steps: with ``composite: none`` one per solar day (its first
    acquisition over all items), else the composite's range (the spec's datetime, or the
    items' own range)."""
    from xclay.ingest.items import parse_time_range

    if spec.input.composite == "none":
        return dict(sorted(summary.days.items())), None
    start, end = parse_time_range(spec.input.datetime)
    own = summary.time_range
    lo = np.datetime64(start.replace(tzinfo=None), "ns") if start else (own[0] if own else None)
    hi = np.datetime64(end.replace(tzinfo=None), "ns") if end else (own[1] if own else None)
    return None, ((lo, hi) if lo is not None and hi is not None else None)


def _search(spec: RunSpec, bands: Sequence[str]) -> tuple[ItemIndex, ItemSummary]:
    """The run's items, read as a stream (an items file or folder, or an API search's
    pages), kept within the spec's bbox and datetime, and indexed in a temporary file (the
    run copies it to its outputs). None kept is an :class:`IngestError` saying why."""
    source = spec.input.stac
    assert source is not None
    folder = Path(tempfile.mkdtemp(prefix="xclay-items-"))
    try:
        index, summary = _index(spec, bands, folder / "items.parquet")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    index.remove_with(folder)  # the temporary file lives as long as the plan
    return index, summary


def _index(spec: RunSpec, bands: Sequence[str], target: Path) -> tuple[ItemIndex, ItemSummary]:
    source = spec.input.stac
    assert source is not None
    if source.items:
        path = spec.path(source.items)
        index, summary = index_items(
            _file_batches(path),
            target,
            bbox=spec.input.bbox,
            datetime=spec.input.datetime,
            bands=bands,
        )
        if not summary.seen:
            raise IngestError(
                f"{path} holds no STAC items; write the items into it (docs/run-spec.md: "
                "items from local GeoTIFFs) or search a STAC API (input.stac.api)."
            )
        if not summary.count:
            raise IngestError(_none_kept(spec, summary, f"item of {path} ({summary.seen} in all)"))
    else:
        index, summary = index_items(
            _api_batches(spec), target, datetime=spec.input.datetime, bands=bands
        )
        if not summary.count:
            hint = _axis_hint(spec.input.bbox, None)
            raise IngestError(
                f"the STAC search at {source.api} is empty: no items of "
                f"{', '.join(source.collections) or 'any collection'} for "
                f"bbox={list(spec.input.bbox) if spec.input.bbox else None}, "
                f"datetime={spec.input.datetime!r}. "
                f"{hint or 'Widen the area or the time range.'}"
            )
    return index, summary


def _file_batches(path: Location) -> Iterator[list[dict[str, Any]]]:
    """An items file's items, a batch at a time: newline-delimited JSON and stac-geoparquet
    as streams, a JSON document (an ItemCollection, a catalog) read whole."""
    from xclay.ingest import load_items
    from xclay.ingest.itemfiles import BATCH, item_batches, items_format

    if items_format(path) != "json":
        yield from item_batches(path)
        return
    items = load_items(path)
    for start in range(0, len(items), BATCH):
        yield [item.to_dict() for item in items[start : start + BATCH]]


def _api_batches(spec: RunSpec) -> Iterator[list[dict[str, Any]]]:
    """A STAC API search's items, page by page (pystac-client)."""
    from xclay.ingest.itemfiles import BATCH, checked_item

    source = spec.input.stac
    assert source is not None
    try:
        from pystac_client import Client
    except ImportError as err:
        raise MissingDependencyError(
            'STAC API search needs pystac-client: pip install "xclay[io]"'
        ) from err
    try:
        search = Client.open(str(source.api)).search(
            collections=list(source.collections),
            bbox=list(spec.input.bbox) if spec.input.bbox else None,
            datetime=spec.input.datetime,
            query=source.query,
            max_items=source.max_items,
        )
        batch: list[dict[str, Any]] = []
        for k, doc in enumerate(search.items_as_dicts()):
            batch.append(checked_item(doc, f"item {k} of the search", str(source.api)))
            if len(batch) >= BATCH:
                yield batch
                batch = []
        if batch:
            yield batch
    except XClayError:
        raise
    except Exception as err:  # network and API errors come in many types
        raise IngestError(
            f"STAC API search at {source.api} failed: {type(err).__name__}: {err}"
        ) from err


def _none_kept(spec: RunSpec, summary: ItemSummary, what: str) -> str:
    """Why no item is left after the spec's bbox and datetime: which filter emptied it, what
    the items cover, and a hint when the bbox looks like latitude and longitude swapped."""
    if spec.input.bbox is not None and not summary.in_area:
        if summary.seen_bbox is None:
            return f"no {what} has a bbox; leave input.bbox out to take the items as they are."
        covered = [round(float(v), 4) for v in summary.seen_bbox]
        hint = _axis_hint(spec.input.bbox, covered)
        return (
            f"no {what} intersects input.bbox {list(spec.input.bbox)}; the items cover "
            f"{covered} ([west, south, east, north] in degrees). "
            + (hint or "Move input.bbox over the items, or leave it out to take their extent.")
        )
    times = summary.in_area_times
    span = f"{times[0].date()} to {times[-1].date()}" if times else "no known time"
    return (
        f"no {what} is within input.datetime {spec.input.datetime!r}; the items in the area "
        f"were acquired {span}. Widen input.datetime, or leave it out."
    )


def _axis_hint(bbox: tuple[float, ...] | None, covered: list[float] | None) -> str:
    """A hint on axis order when ``bbox`` swapped (latitude first) would make sense: over
    the items (``covered``), or, for an API search, whenever both orders are valid."""
    if bbox is None:
        return ""
    swapped = [bbox[1], bbox[0], bbox[3], bbox[2]]
    plausible = -90 <= swapped[1] < swapped[3] <= 90 and -180 <= swapped[0] < swapped[2] <= 180
    if not plausible:
        return ""
    if covered is not None:
        w, s, e, n = covered
        if swapped[0] > e or swapped[2] < w or swapped[1] > n or swapped[3] < s:
            return ""
    return (
        f"bbox is [west, south, east, north], longitude first: with the axes swapped it "
        f"would be {swapped}{', which covers the items' if covered is not None else ''}."
    )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
