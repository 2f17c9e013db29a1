"""The work of one region, as run on a Dask worker (or in the driving process).

Tasks take only plain values (the output folder and a region as a dict), read
what they need from the run's state folder, and cache heavy objects once per
process (the item index, the prepared encoder with its model, the open
datacubes), so a worker loads the model once, not once per task. Nothing a
task computes scales with the whole grid: a region's windows, chip ids,
footprints and items come from its own extent. A task records its region as
done only after the region's data is written; an error is recorded as the
region's failure (with its reason) instead of crashing the run.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

import numpy as np

from xclay.run.record import RunRecord
from xclay.run.state import Region, RunState
from xclay.storage import Location, location

__all__ = ["embed_region", "ingest_region"]

log = logging.getLogger(__name__)

# Chips done inside a region, as they are done: set by the driver when tasks run in its
# own process (a Dask worker reports per region only).
_ON_CHIPS: ContextVar[Callable[[int], None] | None] = ContextVar("xclay_on_chips", default=None)


@contextlib.contextmanager
def reporting_chips(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, tasks run in this process call ``callback(n)`` as each batch of
    ``n`` chips of their region is done."""
    token = _ON_CHIPS.set(callback)
    try:
        yield
    finally:
        _ON_CHIPS.reset(token)


_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()
COMPOSITE_MEMORY = 64 << 20  # bytes of float32 observations one dask chunk of a band may hold


def _cached(outdir: str, kind: str, build: Any) -> Any:
    with _LOCK:
        key = (outdir, kind)
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def _threads(record: RunRecord) -> None:
    n = record.torch_threads
    if n:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(int(n))


def _outdir(outdir: str | Mapping[str, Any]) -> Location:
    """A task's output folder: a path or URL, or a location as plain values (with the
    run's storage options)."""
    return Location.from_dict(outdir) if isinstance(outdir, Mapping) else location(outdir)


def _run_task(
    outdir_given: str | Mapping[str, Any], region_data: dict[str, Any], work: Any
) -> dict[str, Any]:
    region = Region.from_dict(region_data)
    outdir = _outdir(outdir_given).url
    state = RunState(_outdir(outdir_given))
    start = time.perf_counter()
    try:
        record = state.record()
        _threads(record)
        info = work(outdir, record, region)
    except Exception as err:  # recorded for the report and the next run, not raised
        reason = f"{type(err).__name__}: {err}"
        log.warning("region %s failed: %s", region.name, reason)
        state.mark_failed(region, reason + "\n" + traceback.format_exc(limit=8))
        return {"region": region.name, "status": "failed", "reason": reason}
    info["seconds"] = round(time.perf_counter() - start, 3)
    state.mark_done(region, info)  # last: the region counts only once its data is written
    return {"region": region.name, "status": "done", **info}


def _zone(record: RunRecord, region: Region) -> Any:

    return record.zones[region.zone]


def _items(outdir: str, record: RunRecord) -> Any:
    from xclay.run.items import ItemIndex

    items = record.paths.items
    assert items is not None  # a STAC run's
    return _cached(outdir, "items", lambda: ItemIndex.open(record.at(items)))


def _lonlat_area(geobox: Any) -> Any:
    """A geobox's footprint in lon/lat (a shapely polygon), for item queries."""
    import shapely

    return shapely.geometry.shape(geobox.extent.to_crs("EPSG:4326").json)


# --------------------------------------------------------------------------- ingest


def ingest_region(outdir: str | Mapping[str, Any], region: dict[str, Any]) -> dict[str, Any]:
    """Load, mask and composite one block of a zone from the STAC items that intersect it;
    write it into the zone's datacube.

    Parameters
    ----------
    outdir
        The run's output folder (``outputs.dir``): its path or URL, or
        :meth:`~xclay.storage.Location.to_dict` of it (with the run's storage options);
        the task reads the run's record, items and zones from its ``_xclay`` state folder.
    region
        The ``"ingest"`` region to do, as a dict (:meth:`~xclay.run.state.Region.to_dict`).

    Returns
    -------
    dict
        ``region`` (its name) and ``status``: ``"done"`` with ``any_valid``, ``items``
        and ``seconds``, or ``"failed"`` with ``reason``. A failure is recorded in the
        run's state, not raised; a block no item covers is written as nodata.
    """
    return _run_task(outdir, region, _ingest)


def _ingest(outdir: str, record: RunRecord, region: Region) -> dict[str, Any]:
    import dask

    from xclay.datacube import write_datacube_block, write_empty_block
    from xclay.ingest import from_stac

    spec = record.spec
    zone = _zone(record, region)
    (y0, y1), (x0, x1) = region.rows, region.cols
    geobox = zone.geobox[y0:y1, x0:x1]
    index = _items(outdir, record)
    days = record.solar_days()
    day = sorted(days)[region.time] if days is not None else None
    hits = index.query(_lonlat_area(geobox), day=day)
    if not len(hits):  # nothing covers this block: it is written as nodata
        path = record.at(record.paths.datacubes[region.zone])
        write_empty_block(path, region.time, region.rows, region.cols)
        return {"any_valid": False, "items": 0}
    items = hits.items()  # pystac Items for this region's items only
    observations = hits.observations() if days is None else 1
    cube = from_stac(
        items,
        bands=list(record.plan.bands),
        resolution=record.plan.resolution,
        datetime=spec.input.datetime,
        composite=spec.input.composite,
        mask=spec.input.mask,
        platform=record.plan.platform,
        wavelengths=spec.input.wavelengths,
        chunk_size=composite_tile(observations, max(geobox.shape)),
        geobox=geobox,
        provenance=False,
        time_range=record.composite_range(),
        days=days,
        gdal_options=dict(spec.gdal),
        storage_options=dict(spec.storage),
    )
    # The region's graph is small: compute it here, in this task's threads, not by sending
    # it back through the cluster's scheduler (which a nested compute in a task would do).
    with dask.config.set(scheduler="threads"):
        any_valid = write_datacube_block(
            cube,
            record.at(record.paths.datacubes[region.zone]),
            0,
            (0, y1 - y0),
            (0, x1 - x0),
            at=(region.time, y0, x0),
        )
    return {"any_valid": bool(any_valid), "items": len(hits)}


def composite_tile(observations: int, block: int) -> int:
    """The edge of a dask chunk of a composite: a power of two (at least 256 px, at most
    the block) whose float32 observations of one band stay within COMPOSITE_MEMORY."""
    fits = math.sqrt(COMPOSITE_MEMORY / (4 * max(1, observations)))
    tile = 2 ** math.floor(math.log2(max(fits, 1.0)))
    return int(min(max(tile, 256), max(block, 1)))


# --------------------------------------------------------------------------- embed


def embed_region(outdir: str | Mapping[str, Any], region: dict[str, Any]) -> dict[str, Any]:
    """Embed one block of chips of a zone; write it into the zone's embeddings Zarr and a
    GeoParquet part.

    Parameters
    ----------
    outdir
        The run's output folder (``outputs.dir``): its path or URL, or
        :meth:`~xclay.storage.Location.to_dict` of it (with the run's storage options);
        the task reads the run's record, model card and zones from its ``_xclay`` state
        folder.
    region
        The ``"embed"`` region to do, as a dict (:meth:`~xclay.run.state.Region.to_dict`).

    Returns
    -------
    dict
        ``region`` (its name) and ``status``: ``"done"`` with ``counts`` (chips in all,
        embedded, skipped by reason, failed), ``data_path`` (how chips were read) and
        ``seconds``, or ``"failed"`` with ``reason``. A failure is recorded in the run's
        state, not raised; a block with no chip embedded has no GeoParquet part.
    """
    return _run_task(outdir, region, _embed)


def _session(outdir: str, record: RunRecord, zone: int) -> Any:
    from xclay.datacube import open_datacube
    from xclay.embed import EmbedSession
    from xclay.models.registry import encoder_from_card

    def build() -> Any:
        given = record.paths.checkpoint
        checkpoint = record.at(given) if given else None  # with the run's storage options
        assert record.card is not None and record.embed_config is not None  # prepared
        encoder = encoder_from_card(record.card.to_dict(), checkpoint=checkpoint)
        config = record.embed_config
        cube = open_datacube(record.at(record.paths.datacubes[zone]))
        return EmbedSession(cube, encoder, config)

    return _cached(outdir, f"session-{zone}", build)


def zone_chips(cell_native: Any, grid: Any, rows: tuple[int, int], cols: tuple[int, int]) -> Any:
    """Which chips of a block a zone embeds: those whose window intersects the zone's cell
    (in the zone's CRS; None: all of them, when the zone owns its whole grid)."""
    if cell_native is None:
        return None
    import shapely

    corners = grid.corners_native(rows, cols)  # (rows, cols, 5, 2)
    squares = shapely.polygons(corners.reshape(-1, 5, 2))
    inside = shapely.intersects(squares, cell_native)
    return np.asarray(inside, dtype=bool).reshape(corners.shape[:2])


def _embed(outdir: str, record: RunRecord, region: Region) -> dict[str, Any]:
    from xclay.batch.batching import Block
    from xclay.outputs.export import write_embeddings_region
    from xclay.outputs.quantize import quantize_embeddings

    session = _session(outdir, record, region.zone)
    zone = _zone(record, region)
    block = Block((region.time, region.time + 1), region.rows, region.cols)
    cell = _cached(outdir, f"cell-{region.zone}", zone.cell_native)
    mask = zone_chips(cell, session.grid, region.rows, region.cols)
    chips = mask[None] if mask is not None else None
    result = session.embed_block(block, chips=chips, progress=False, on_chips=_ON_CHIPS.get())
    ds = session.dataset(result)
    quantize = record.spec.outputs.quantize
    stored = quantize_embeddings(ds, quantize) if quantize else ds
    write_embeddings_region(
        record.at(record.paths.embeddings[region.zone]),
        stored,
        (region.time, region.rows[0], region.cols[0]),
    )
    if result.counts["chips_embedded"]:
        write_part(outdir, record, region, ds, result.counts)
    else:
        part_path(record, region).remove()
    return {"counts": result.counts, "data_path": session.data_path}


def part_path(record: RunRecord, region: Region) -> Location:
    """The GeoParquet part of a region: ``part-<zone>-<time step>-<region>.parquet``."""
    tag = record.zones[region.zone].tag
    folder = record.at(record.paths.geoparquet)
    return folder / f"part-{tag}-{region.time:03d}-{region.index:07d}.parquet"


def write_part(
    outdir: str,
    record: RunRecord,
    region: Region,
    ds: Any,
    counts: dict[str, int] | None,
) -> Location:
    """Write a region's GeoParquet part: its rows (each with its own sources) and a footer
    that refers to the run's metadata instead of repeating it."""
    from xclay.outputs.export import chip_footprints, to_geoparquet

    sources = None
    _, i, j = np.nonzero(np.asarray(ds["embedded"].values, dtype=bool))  # the rows' order
    if record.paths.items:
        _, footprints = chip_footprints(ds, i, j)
        sources = _row_sources(outdir, record, region, footprints)
    lon, lat = np.asarray(ds["lon"].values)[i, j], np.asarray(ds["lat"].values)[i, j]
    own = record.zones[region.zone].owns(lon, lat)
    part: dict[str, Any] = {"zone": record.zones[region.zone].tag, "region": region.index,
                            "time": region.time}  # fmt: skip
    if counts is not None:
        part["counts"] = counts
    meta = {"run_metadata": record.run_metadata, "part": part}
    quantize = record.spec.outputs.quantize
    path = part_path(record, region)
    to_geoparquet(ds, path, quantize=quantize, overwrite=True, sources=sources, run_metadata=meta,
                  centre_in_zone=own.tolist())  # fmt: skip
    return path


def _row_sources(
    outdir: str, record: RunRecord, region: Region, footprints: Any
) -> list[list[str]]:
    """Each row's own sources: the run's items whose footprint intersects the chip's (and,
    with one time step per day, acquired on that day): the region's items of its day are
    queried once, then matched to the chips among themselves."""
    index = _items(outdir, record)
    days = record.solar_days()
    day = sorted(days)[region.time] if days is not None else None
    hits = index.query(_union(footprints), day=day)
    return [hits.ids[touching].tolist() for touching in hits.touching(footprints)]


def _union(footprints: Any) -> Any:
    import shapely

    return shapely.box(*shapely.total_bounds(footprints))
