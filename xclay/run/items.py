"""The STAC items of a run, indexed once in one GeoParquet file, queried by area and day.

A run resolves its items once (an items file or folder, or an API search), read as a
stream (:mod:`xclay.ingest.itemfiles`), and keeps them in one sidecar,
``<outputs.dir>/items.parquet`` (referenced by its sha256 from the run state, the
datacube and the embeddings), not in every region's metadata. No process holds the
whole catalogue: the plan writes the sidecar a batch at a time (an external sort, its
memory a few buckets of items whatever the catalogue's size), and a task reads only the
row groups its region needs.

The sidecar is GeoParquet 1.1 with the column layout stac-geoparquet gives these fields,
one row per item::

    id           string
    collection   string
    datetime     timestamp[us, UTC]   the start of the item's range where it has one
    solar_day    date32               the acquisition day in local solar time at the
                                      item's centre (xclay.ingest.item_solar_day): the
                                      time steps of ``composite: none``
    geometry     binary               the footprint, WKB, EPSG:4326
    bbox         struct<xmin, ymin, xmax, ymax: double>   the footprint's bounds
                                      (GeoParquet 1.1's ``covering``)
    item         large_string         the item's JSON, asset hrefs absolute

Rows are sorted along a Hilbert curve over the centres of the items' bboxes (16 bits a
side), in row groups of :data:`GROUP_ROWS` items: the items of one place are in a few row
groups, whose statistics (``bbox.*`` and ``solar_day`` minimum and maximum) say which
row groups a query needs. :meth:`ItemIndex.query` reads the few columns it filters on
from those row groups only, and :meth:`ItemHits.items` builds pystac Items for its
hits only. The file's ``xclay`` metadata holds the count, extent, the sha256 of the ids
and one item per collection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import gc
import hashlib
import json
import math
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from xclay._hashing import sha256_file
from xclay.errors import IngestError
from xclay.ingest.items import (
    asset_band_names,
    bbox_centre_lon,
    parse_time_range,
    require_shared_bands,
    solar_day,
)
from xclay.storage import Location, Where, location

if TYPE_CHECKING:
    import pystac

__all__ = ["GROUP_ROWS", "ItemHits", "ItemIndex", "ItemSummary", "hilbert_keys", "index_items"]

GROUP_ROWS = 1024  # items a row group: a query reads a few of them
BUCKET_BYTES = 16 << 20  # items' JSON a bucket of the external sort holds in memory
MAX_BUCKETS = 256  # buckets open at once while sorting (files: well under ulimit -n)
CONVENTION = "xclay-items/2"
IDS_KEY = b"xclay_ids_sha256"  # the footer's: known once every row is written
_QUERY_COLUMNS = ["id", "datetime", "solar_day", "bbox", "geometry"]
_BOUNDS = ("xmin", "ymin", "xmax", "ymax")
_WORLD = (-180.0, -90.0, 180.0, 90.0)


# --------------------------------------------------------------------------- Hilbert curve


def hilbert_keys(lon: np.ndarray, lat: np.ndarray, order: int = 16) -> np.ndarray:
    """Positions along a Hilbert curve of the points ``(lon, lat)`` (degrees) on a grid of
    ``2**order`` cells a side over the globe: near points have near keys.

    Parameters
    ----------
    lon, lat
        ``[n]`` longitudes (-180 to 180) and latitudes (-90 to 90); values outside are
        clipped.
    order
        Bits a side (16: cells of ~0.0055 degrees).

    Returns
    -------
    numpy.ndarray
        ``[n]`` uint64 keys, from 0 to ``4**order - 1``.
    """
    n = 1 << order
    x = np.clip(((np.asarray(lon, np.float64) + 180.0) / 360.0 * n).astype(np.int64), 0, n - 1)
    y = np.clip(((np.asarray(lat, np.float64) + 90.0) / 180.0 * n).astype(np.int64), 0, n - 1)
    d = np.zeros(x.shape, dtype=np.uint64)
    s = n >> 1
    while s > 0:
        rx = (x & s) > 0
        ry = (y & s) > 0
        d += np.uint64(s) * np.uint64(s) * ((3 * rx.astype(np.uint64)) ^ ry.astype(np.uint64))
        flip = ~ry & rx
        x = np.where(flip, n - 1 - x, x)
        y = np.where(flip, n - 1 - y, y)
        x, y = np.where(~ry, y, x), np.where(~ry, x, y)
        s >>= 1
    return d


# --------------------------------------------------------------------------- what the plan needs


@dataclasses.dataclass
class ItemSummary:
    """What a plan needs of a catalogue, gathered while it is indexed (counts, extents,
    one item per collection), so nothing reads the catalogue again.

    Attributes
    ----------
    seen
        Items read, before ``input.bbox`` and ``input.datetime``.
    seen_bbox
        Their extent (west, south, east, north), or None.
    in_area, in_area_times
        Items in the bbox (before the datetime filter), and their earliest and latest
        known times.
    count
        Items kept.
    bbox
        The kept items' footprints' extent.
    head
        The first kept items' ids (at most 3), in the catalogue's order.
    platform
        The first kept item's platform (its ``platform`` property or collection) that the
        sensor table knows.
    days
        Solar day -> first acquisition of the kept items on that day.
    time_range
        The kept items' earliest and latest known times, or None.
    common_names
        Band names every kept item has (asset keys, ``eo:bands`` names and common names).
    codes
        The kept items' CRSs (``proj:code``, ``EPSG:<proj:epsg>``; None where absent).
    own_area, area_in_bbox
        Sums of the items' bbox areas (square degrees), whole and within ``input.bbox``.
    representatives
        Collection -> the JSON of its first kept item.
    grids
        (CRS, resolution, rotation, grid phase) -> the first item's transform, the union
        of the group's pixel windows, and their bbox (:meth:`grid_items`).
    """

    seen: int = 0
    seen_bbox: list[float] | None = None
    in_area: int = 0
    in_area_times: list[dt.datetime] = dataclasses.field(default_factory=list)
    count: int = 0
    bbox: list[float] | None = None
    head: list[str] = dataclasses.field(default_factory=list)
    platform: str | None = None
    days: dict[np.datetime64, np.datetime64] = dataclasses.field(default_factory=dict)
    time_range: tuple[np.datetime64, np.datetime64] | None = None
    common_names: set[str] | None = None
    codes: set[str | None] = dataclasses.field(default_factory=set)
    own_area: float = 0.0
    area_in_bbox: float = 0.0
    representatives: dict[str | None, str] = dataclasses.field(default_factory=dict)
    grids: dict[tuple[Any, ...], list[Any]] = dataclasses.field(default_factory=dict)

    def representative_items(self) -> list[pystac.Item]:
        """The first kept item of each collection, as pystac Items."""
        import pystac

        return [pystac.Item.from_dict(json.loads(text)) for text in self.representatives.values()]

    def grid_items(self) -> list[pystac.Item]:
        """Items standing for the kept ones in :func:`xclay.ingest.plan_grid`: one per
        CRS, resolution and grid phase, whose ``proj:transform`` and ``proj:shape`` cover
        the union of their items' pixel windows and whose bbox is theirs; the grid planned
        from them is the grid planned from every item."""
        import pystac
        from affine import Affine

        out = []
        for k, (key, (base, window, bbox)) in enumerate(self.grids.items()):
            epsg, code = key[0], key[1]
            properties: dict[str, Any] = {}
            if epsg is not None:
                properties["proj:epsg"] = epsg
            if code is not None:
                properties["proj:code"] = code
            if base is not None:
                r0, c0, r1, c1 = window
                t = base @ Affine.translation(c0, r0)
                properties["proj:transform"] = [t.a, t.b, t.c, t.d, t.e, t.f]
                properties["proj:shape"] = [r1 - r0, c1 - c0]
            when = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
            out.append(pystac.Item(f"grid-{k}", None, list(bbox), when, properties))
        return out

    def require_bands(self, bands: Sequence[str]) -> None:
        """Refuse bands not every item has, naming those the items share."""
        require_shared_bands(self.common_names or set(), bands)

    def item_pixels(self, bbox: Sequence[float], pixels: int, spec_bbox: bool) -> int:
        """Pixels the items bring into the area: each item's share of the bbox times the
        grids' pixels (what ingestion reads, before compositing)."""
        area = max((bbox[2] - bbox[0]) * (bbox[3] - bbox[1]), 1e-12)
        inside = self.area_in_bbox if spec_bbox else self.own_area
        return int(pixels * inside / area)


@dataclasses.dataclass
class _Rows:
    """One batch of kept items, as the index's columns."""

    ids: list[str]
    collections: list[str | None]
    times: list[dt.datetime | None]
    days: list[dt.date | None]
    geometries: Any
    items: list[str]


class _Gatherer:
    """Items in, batch by batch: filtered by the spec's bbox and datetime, checked,
    summarised, and turned into the index's rows."""

    def __init__(
        self,
        bbox: Sequence[float] | None,
        datetime: str | None,
        bands: Sequence[str] | None,
    ) -> None:
        from xclay.sensors import platform_named

        self.bbox = tuple(float(v) for v in bbox) if bbox is not None else None
        self.start, self.end = parse_time_range(datetime)
        self.bands = set(bands or ())
        self.summary = ItemSummary()
        # Items name few platforms and collections: each looked up in the sensors once.
        self.platform_named = functools.lru_cache(maxsize=256)(platform_named)

    def rows(self, batch: Sequence[Mapping[str, Any]]) -> _Rows | None:
        import shapely

        s = self.summary
        texts: list[str | None] | None = getattr(batch, "texts", None)
        kept = []
        for position, doc in enumerate(batch):
            box = doc.get("bbox")
            s.seen += 1
            if box:
                s.seen_bbox = _union(s.seen_bbox, box)
            if self.bbox is not None and box:
                w, so, e, n = _box4(box)
                if w > self.bbox[2] or e < self.bbox[0] or so > self.bbox[3] or n < self.bbox[1]:
                    continue
            when = _item_time(doc)
            s.in_area += 1
            if when is not None:
                s.in_area_times = _extend_range(s.in_area_times, when)
                if (self.start is not None and when < self.start) or (
                    self.end is not None and when > self.end
                ):
                    continue
            kept.append((doc, when, position))
        if not kept:
            return None
        geometries = np.array([_geometry(doc) for doc, _, _ in kept], dtype=object)
        bounds = shapely.bounds(geometries)
        rows = _Rows([], [], [], [], geometries, [])
        for k, (doc, when, position) in enumerate(kept):
            self._summarise(doc, when, bounds[k])
            rows.ids.append(str(doc["id"]))
            rows.collections.append(doc.get("collection"))
            rows.times.append(when)
            # The solar day at the bbox's centre, as xclay.ingest.item_solar_day has it.
            day = solar_day(when, bbox_centre_lon(doc.get("bbox"))) if when is not None else None
            rows.days.append(day)
            if when is not None and day is not None:
                key = np.datetime64(day, "D")
                stamp = np.datetime64(when.astimezone(dt.UTC).replace(tzinfo=None), "ns")
                self.summary.days[key] = min(self.summary.days.get(key, stamp), stamp)
            text = texts[position] if texts is not None else None
            rows.items.append(text if text is not None else json.dumps(doc, separators=(",", ":")))
        return rows

    def _summarise(self, doc: Mapping[str, Any], when: dt.datetime | None, bounds: Any) -> None:
        s = self.summary
        properties = doc.get("properties") or {}
        assets = doc.get("assets") or {}
        s.count += 1
        if len(s.head) < 3:
            s.head.append(str(doc["id"]))
        s.bbox = _union(s.bbox, bounds)
        if when is not None:
            stamp = np.datetime64(when.astimezone(dt.UTC).replace(tzinfo=None), "ns")
            lo, hi = s.time_range or (stamp, stamp)
            s.time_range = (min(lo, stamp), max(hi, stamp))
        box = _box4(doc.get("bbox") or list(bounds))
        w, so, e, n = box
        s.own_area += max(e - w, 0.0) * max(n - so, 0.0)
        if self.bbox is not None:
            ow = min(e, self.bbox[2]) - max(w, self.bbox[0])
            oh = min(n, self.bbox[3]) - max(so, self.bbox[1])
            s.area_in_bbox += max(ow, 0.0) * max(oh, 0.0)
        if s.platform is None:
            for candidate in (properties.get("platform"), doc.get("collection")):
                platform = self.platform_named(candidate) if isinstance(candidate, str) else None
                if platform is not None:
                    s.platform = platform
                    break
        collection = doc.get("collection")
        if collection not in s.representatives:
            s.representatives[collection] = json.dumps(doc)
        names = asset_band_names(assets)
        s.common_names = names if s.common_names is None else s.common_names & names
        code = properties.get("proj:code") or (
            f"EPSG:{properties['proj:epsg']}" if properties.get("proj:epsg") else None
        )
        s.codes.add(code)
        self._grid(properties, box)
        self._check_hrefs(doc, assets)

    def _grid(self, p: Mapping[str, Any], box: Sequence[float]) -> None:
        """The item's pixel window in its group (CRS, resolution, rotation and phase)."""
        from affine import Affine

        transform, shape = p.get("proj:transform"), p.get("proj:shape")
        grids = self.summary.grids
        if transform is None or shape is None:
            key: tuple[Any, ...] = (p.get("proj:epsg"), p.get("proj:code"), None)
            group = grids.setdefault(key, [None, None, list(box)])
            group[2] = _union(group[2], box)
            return
        t = Affine(*(float(v) for v in transform[:6]))
        phase = tuple(
            round(((v / step) % 1.0) * 1e6) % 1_000_000 if step else 0
            for v, step in ((t.c, t.a), (t.f, t.e))
        )
        key = (p.get("proj:epsg"), p.get("proj:code"), t.a, t.b, t.d, t.e, *phase)
        if key not in grids:
            grids[key] = [t, (0, 0, int(shape[0]), int(shape[1])), list(box)]
            return
        base, (r0, c0, r1, c1), union = grids[key]
        col, row = round((t.c - base.c) / base.a), round((t.f - base.f) / base.e)
        grids[key] = [
            base,
            (
                min(r0, row),
                min(c0, col),
                max(r1, row + int(shape[0])),
                max(c1, col + int(shape[1])),
            ),
            _union(union, box),
        ]

    def _check_hrefs(self, doc: Mapping[str, Any], assets: Mapping[str, Any]) -> None:
        """Refuse a local asset file of the run's bands that does not exist (remote ones
        are read by GDAL, which names a missing one)."""
        from urllib.parse import urlparse

        for key, asset in assets.items():
            if not isinstance(asset, dict):
                continue
            href = str(asset.get("href", ""))
            if href.startswith("/vsi") or ("://" in href and not href.startswith("file:")):
                continue  # GDAL's virtual paths and URLs: read (and named) by GDAL
            eo = {e.get("name") for e in asset.get("eo:bands") or [] if isinstance(e, dict)}
            if key not in self.bands and not eo & self.bands:
                continue
            parsed = urlparse(href)
            if parsed.scheme in ("", "file") and not Path(parsed.path).is_file():
                raise IngestError(
                    f"asset {key!r} of item {doc['id']!r} points to {href}, which does not "
                    "exist. Fix the item's href (or the catalog's location) before ingesting."
                )


def _item_time(doc: Mapping[str, Any]) -> dt.datetime | None:
    """An item's time (its datetime, else its start), UTC; None when it has none or says
    it is unknown (``xclay:datetime_unknown``)."""
    properties = doc.get("properties") or {}
    if properties.get("xclay:datetime_unknown"):
        return None
    text = properties.get("datetime") or properties.get("start_datetime")
    if not text:
        return None
    try:
        when = dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        from pystac.utils import str_to_datetime

        try:
            when = str_to_datetime(str(text))
        except ValueError as err:
            raise IngestError(
                f"item {doc.get('id')!r} has a datetime xclay cannot read: {text!r}."
            ) from err
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _geometry(doc: Mapping[str, Any]) -> Any:
    """An item's footprint: its geometry, else its bbox, else the whole world."""
    import shapely
    import shapely.geometry

    if doc.get("geometry"):
        try:
            return shapely.geometry.shape(doc["geometry"])
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise IngestError(
                f"item {doc.get('id')!r} has a geometry that is not GeoJSON ({err})."
            ) from err
    box = doc.get("bbox")
    if box:
        return shapely.box(*_box4(box))
    return shapely.box(*_WORLD)  # unknown: everywhere


def _box4(box: Sequence[Any]) -> list[float]:
    """A bbox as (west, south, east, north), from 4 values or 6 (with heights)."""
    values = [box[0], box[1], box[3], box[4]] if len(box) == 6 else list(box[:4])
    return [float(v) for v in values]


def _union(a: Sequence[float] | None, b: Sequence[float]) -> list[float]:
    b4 = _box4(b)
    if a is None:
        return b4
    return [min(a[0], b4[0]), min(a[1], b4[1]), max(a[2], b4[2]), max(a[3], b4[3])]


def _extend_range(span: list[dt.datetime], when: dt.datetime) -> list[dt.datetime]:
    if not span:
        return [when, when]
    return [min(span[0], when), max(span[1], when)]


# --------------------------------------------------------------------------- writing the index


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("collection", pa.string()),
            ("datetime", pa.timestamp("us", tz="UTC")),
            ("solar_day", pa.date32()),
            ("geometry", pa.binary()),
            ("bbox", pa.struct([(name, pa.float64()) for name in _BOUNDS])),
            ("item", pa.large_string()),
        ]
    )


def _table(rows: _Rows) -> tuple[Any, np.ndarray]:
    """A batch's rows as a table, and their Hilbert keys (the centres of their bounds)."""
    import pyarrow as pa
    import shapely

    bounds = shapely.bounds(rows.geometries)
    table = pa.table(
        {
            "id": pa.array(rows.ids, pa.string()),
            "collection": pa.array(rows.collections, pa.string()),
            "datetime": pa.array(
                [t.astimezone(dt.UTC).replace(tzinfo=None) if t else None for t in rows.times],
                pa.timestamp("us", tz="UTC"),
            ),
            "solar_day": pa.array(rows.days, pa.date32()),
            "geometry": pa.array(shapely.to_wkb(rows.geometries).tolist(), pa.binary()),
            "bbox": pa.StructArray.from_arrays(
                [pa.array(bounds[:, k], pa.float64()) for k in range(4)], names=list(_BOUNDS)
            ),
            "item": pa.array(rows.items, pa.large_string()),
        },
        schema=_schema(),
    )
    keys = hilbert_keys((bounds[:, 0] + bounds[:, 2]) / 2, (bounds[:, 1] + bounds[:, 3]) / 2)
    return table, keys


class _ExternalSort:
    """Rows sorted by Hilbert key with bounded memory: batches spilled as they come
    (Arrow IPC, zstd), then split into buckets of key ranges, each sorted in memory and
    appended to the index in row groups of :data:`GROUP_ROWS`."""

    def __init__(self, folder: Path, bucket_bytes: int, group_rows: int) -> None:
        self.folder = folder
        self.bucket_bytes = bucket_bytes
        self.group_rows = group_rows
        self.keys: list[np.ndarray] = []
        self.bytes = 0
        self._spill: Any = None
        self._sink: Any = None

    def add(self, table: Any, keys: np.ndarray) -> None:
        import pyarrow as pa

        if self._spill is None:
            self._sink = pa.OSFile(str(self.folder / "spill.arrow"), "wb")
            self._spill = pa.ipc.new_stream(self._sink, table.schema, options=_ipc_options())
        self._spill.write_table(table)
        self.keys.append(keys)
        self.bytes += table.nbytes

    def write(self, target: Path, metadata: dict[bytes, bytes]) -> tuple[int, str]:
        """Write the sorted index to ``target``; the rows written and the sha256 of their
        ids in order."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        ids = hashlib.sha256()
        schema = _schema().with_metadata(metadata)
        rows = 0
        with pq.ParquetWriter(target, schema, compression="zstd") as writer:
            carry: Any = None
            for bucket in self._sorted_buckets():
                table = bucket if carry is None else pa.concat_tables([carry, bucket])
                whole = table.num_rows - table.num_rows % self.group_rows
                if whole:
                    part = table.slice(0, whole)
                    writer.write_table(part, row_group_size=self.group_rows)
                    _hash_ids(ids, part)
                    rows += whole
                carry = table.slice(whole) if whole < table.num_rows else None
            if carry is not None:
                writer.write_table(carry, row_group_size=self.group_rows)
                _hash_ids(ids, carry)
                rows += carry.num_rows
            if rows == 0:
                writer.write_table(_schema().empty_table())
            digest = ids.hexdigest()
            writer.add_key_value_metadata({IDS_KEY: digest.encode()})
        return rows, digest

    def _sorted_buckets(self) -> Iterator[Any]:
        import pyarrow as pa

        if self._spill is None:
            return
        self._spill.close()
        self._sink.close()
        keys = np.concatenate(self.keys)
        self.keys = []
        n = keys.size
        buckets = int(min(MAX_BUCKETS, max(1, math.ceil(self.bytes / self.bucket_bytes))))
        order = np.sort(keys)
        cuts = order[np.linspace(0, n, buckets + 1).astype(np.int64)[1:-1]]
        del order
        which = np.searchsorted(cuts, keys, side="right")
        if buckets == 1:
            yield _sort(_read_all(self.folder / "spill.arrow"), keys)
            return
        paths = [self.folder / f"bucket-{b:03d}.arrow" for b in range(buckets)]
        sinks = [pa.OSFile(str(p), "wb") for p in paths]
        schema = _schema()
        writers = [pa.ipc.new_stream(s, schema, options=_ipc_options()) for s in sinks]
        try:
            offset = 0
            for batch in _batches(self.folder / "spill.arrow"):
                own = which[offset : offset + batch.num_rows]
                order = np.argsort(own, kind="stable")
                grouped = batch.take(pa.array(order))
                edges = np.searchsorted(own[order], np.arange(buckets + 1))
                for b in np.nonzero(np.diff(edges))[0]:
                    writers[b].write_batch(grouped.slice(edges[b], edges[b + 1] - edges[b]))
                offset += batch.num_rows
        finally:
            for w, s in zip(writers, sinks, strict=True):
                w.close()
                s.close()
        (self.folder / "spill.arrow").unlink()
        for k, path in enumerate(paths):
            _release_unused()
            table = _read_all(path)
            path.unlink()
            yield _sort(table, keys[which == k])


def _release_unused() -> None:
    """Give Arrow's freed memory back to the system between buckets: its allocator keeps
    what a bucket freed, and the next bucket's tables, of other sizes, rarely fit it (the
    driver's memory grew a bucket at a time without it)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _batches(path: Path) -> Iterator[Any]:
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as f, pa.ipc.open_stream(f) as reader:
        yield from reader


def _read_all(path: Path) -> Any:
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as f, pa.ipc.open_stream(f) as reader:
        return reader.read_all()


def _ipc_options() -> Any:
    import pyarrow as pa

    return pa.ipc.IpcWriteOptions(compression="zstd")


def _sort(table: Any, keys: np.ndarray) -> Any:
    """Rows in Hilbert order, ties by id (the same items give the same file)."""
    import pyarrow as pa

    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    order = np.lexsort((ids, keys))
    return table.take(pa.array(order))


def _hash_ids(digest: Any, table: Any) -> None:
    for value in table.column("id").to_pylist():
        digest.update(value.encode())
        digest.update(b"\n")


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cycle collector off while items are parsed: a batch is some 400,000 dicts
    and lists (none in a cycle), and collecting as they are made scans the live ones again
    and again, two thirds of the reading time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def index_items(
    batches: Iterable[Sequence[Mapping[str, Any]]],
    target: Path,
    *,
    bbox: Sequence[float] | None = None,
    datetime: str | None = None,
    bands: Sequence[str] | None = None,
    group_rows: int = GROUP_ROWS,
    bucket_bytes: int = BUCKET_BYTES,
) -> tuple[ItemIndex, ItemSummary]:
    """Index a catalogue read as a stream: the kept items written to ``target`` as the run's
    item index, and what the plan needs of them.

    Parameters
    ----------
    batches
        Lists of STAC Item dicts, asset hrefs absolute (:func:`xclay.ingest.itemfiles.
        item_batches`, or an API search's pages).
    target
        The index file to write (a local path; its folder holds the sort's temporary
        files while it is written).
    bbox
        Keep the items whose bbox intersects this area (west, south, east, north, in
        degrees); None: all.
    datetime
        Keep the items within this range (``"start/end"``, as ``input.datetime``); items
        without a known time are kept.
    bands
        The run's bands: the local files of these bands' assets must exist.
    group_rows
        Items a row group.
    bucket_bytes
        Bytes of rows the sort holds in memory at once (about); more items are sorted in
        buckets of key ranges, each in turn.

    Returns
    -------
    tuple
        The index (:class:`ItemIndex`) and the catalogue's :class:`ItemSummary`. Memory:
        a batch, and a bucket of the sort (:data:`BUCKET_BYTES` of items), whatever the
        catalogue's size.
    """
    from pyproj import CRS

    gatherer = _Gatherer(bbox, datetime, bands)
    folder = Path(tempfile.mkdtemp(prefix=".xclay-sort-", dir=target.parent))
    try:
        sort = _ExternalSort(folder, bucket_bytes, group_rows)
        with _no_cycle_collection():
            for batch in batches:
                rows = gatherer.rows(batch)
                if rows is not None:
                    sort.add(*_table(rows))
        summary = gatherer.summary
        info = {
            "convention": CONVENTION,
            "count": summary.count,
            "bbox": summary.bbox,
            "head": summary.head,
            "sort": "Hilbert curve over the centres of the items' bboxes, 16 bits a side",
            "row_group_rows": group_rows,
            "representatives": list(summary.representatives.values()),
        }
        geo = {
            "version": "1.1.0",
            "primary_column": "geometry",
            "columns": {
                "geometry": {
                    "encoding": "WKB",
                    "geometry_types": [],
                    "crs": CRS.from_epsg(4326).to_json_dict(),
                    "bbox": summary.bbox or [],
                    "covering": {"bbox": {b: ["bbox", b] for b in _BOUNDS}},
                }
            },
        }
        metadata = {b"geo": json.dumps(geo).encode(), b"xclay": json.dumps(info).encode()}
        count, ids = sort.write(target, metadata)
        assert count == summary.count, (count, summary.count)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # The ids' digest goes into the file's own metadata only through the index object:
    # rewriting the footer would cost another pass over the file.
    return ItemIndex(location(target), ids_sha256=ids), summary


# --------------------------------------------------------------------------- reading it


class ItemIndex:
    """The run's items, indexed: queried by area and day, reading only the row groups a
    query needs.

    Build one with :func:`index_items` (or :meth:`from_items`); open a saved one with
    :meth:`open`. It holds the file's metadata (a few bytes a row group), never its rows.

    Parameters
    ----------
    where
        The index file (GeoParquet, as this module's docstring lays out).
    ids_sha256
        The sha256 of the ids in the file's order (computed while writing it); default:
        read from the file when asked.
    """

    def __init__(self, where: Location, *, ids_sha256: str | None = None) -> None:
        import pyarrow.parquet as pq

        self.location = where
        self._ids_sha256 = ids_sha256
        fs, path = where.arrow()
        self._fs, self._path = fs, path
        try:
            meta = pq.read_metadata(path, filesystem=fs)
        except FileNotFoundError:
            raise
        except Exception as err:  # pyarrow raises ArrowInvalid and OSError alike
            raise IngestError(f"{where} is not an item index ({err}).") from err
        self._metadata = meta
        info = json.loads((meta.metadata or {}).get(b"xclay", b"{}"))
        if info.get("convention") != CONVENTION:
            raise IngestError(
                f"{where} is not an item index of this xclay (convention "
                f"{info.get('convention')!r}, expected {CONVENTION!r}); rerun the plan with "
                "outputs.overwrite: true to index the items again."
            )
        self.info = info
        digest = (meta.metadata or {}).get(IDS_KEY)
        if self._ids_sha256 is None and digest is not None:
            self._ids_sha256 = digest.decode()
        self._lock = threading.Lock()
        self._stats()

    def _stats(self) -> None:
        """Per row group: its first row, bounds of its items' bboxes, and its days."""
        meta = self._metadata
        groups = meta.num_row_groups
        names = [meta.schema.column(j).path for j in range(meta.num_columns)]
        col = {name: j for j, name in enumerate(names)}
        lows = np.full((groups, 4), -np.inf)
        highs = np.full((groups, 4), np.inf)
        day_lo = np.full(groups, np.iinfo(np.int64).min, dtype=np.int64)
        day_hi = np.full(groups, np.iinfo(np.int64).max, dtype=np.int64)
        starts = np.zeros(groups + 1, dtype=np.int64)
        for g in range(groups):
            group = meta.row_group(g)
            starts[g + 1] = starts[g] + group.num_rows
            for k, bound in enumerate(_BOUNDS):
                stats = group.column(col[f"bbox.{bound}"]).statistics
                if stats is not None and stats.has_min_max:
                    lows[g, k], highs[g, k] = float(stats.min), float(stats.max)
            stats = group.column(col["solar_day"]).statistics
            if stats is not None and stats.has_min_max and stats.null_count == 0:
                day_lo[g] = np.datetime64(stats.min, "D").astype(np.int64)
                day_hi[g] = np.datetime64(stats.max, "D").astype(np.int64)
        # A group can hold a query's items unless they all lie beyond one of its edges.
        self._xmin_lo, self._ymin_lo = lows[:, 0], lows[:, 1]  # smallest west, south
        self._xmax_hi, self._ymax_hi = highs[:, 2], highs[:, 3]  # largest east, north
        self._day_lo, self._day_hi = day_lo, day_hi
        self._starts = starts

    # -- building, saving, opening ------------------------------------------------

    @classmethod
    def open(cls, path: Where) -> ItemIndex:
        """The index saved at ``path`` (a path or URL).

        Parameters
        ----------
        path
            An index file written by :func:`index_items` (a run's ``items.parquet``).
        """
        return cls(location(path))

    @classmethod
    def from_items(cls, items: Sequence[pystac.Item]) -> ItemIndex:
        """Index pystac Items (their asset hrefs made absolute), in a temporary file that
        lives as long as the index.

        Parameters
        ----------
        items
            The items to index; all of them are kept.
        """
        dicts = []
        for original in items:
            item = original.clone()
            item.make_asset_hrefs_absolute()
            dicts.append(item.to_dict())
        folder = Path(tempfile.mkdtemp(prefix="xclay-items-"))
        try:
            index, _ = index_items([dicts], folder / "items.parquet")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        index.remove_with(folder)
        return index

    def remove_with(self, folder: Path) -> None:
        """Remove ``folder`` (a temporary one holding the file) when the index goes.

        Parameters
        ----------
        folder
            A local folder, removed with everything in it.
        """
        weakref.finalize(self, shutil.rmtree, folder, True)

    def save(self, path: Where) -> str:
        """Copy the index to ``path`` (whole or not at all: a path or a URL); returns the
        file's sha256.

        Parameters
        ----------
        path
            Where the run keeps it (``<outputs.dir>/items.parquet``).
        """
        with self.location.local_copy() as local:
            location(path).upload(local)
            return sha256_file(local)

    # -- what it holds ---------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.info["count"])

    @property
    def head(self) -> list[str]:
        """The first items' ids (at most 3), in the catalogue's order."""
        return list(self.info.get("head") or [])

    @property
    def bbox(self) -> tuple[float, float, float, float] | None:
        """The extent of the items' footprints (west, south, east, north)."""
        b = self.info.get("bbox")
        return (float(b[0]), float(b[1]), float(b[2]), float(b[3])) if b else None

    @property
    def row_groups(self) -> int:
        return int(self._metadata.num_row_groups)

    @property
    def ids_sha256(self) -> str:
        """The sha256 of the ids, one a line, in the index's order (the same items, the
        same digest: rows are sorted by place, then id)."""
        if self._ids_sha256 is None:
            import pyarrow.parquet as pq

            digest = hashlib.sha256()
            with self._lock:
                reader = pq.ParquetFile(self._path, metadata=self._metadata, filesystem=self._fs)
                for g in range(self.row_groups):
                    _hash_ids(digest, reader.read_row_group(g, columns=["id"]))
            self._ids_sha256 = digest.hexdigest()
        return self._ids_sha256

    def representatives(self) -> list[pystac.Item]:
        """The first item of each collection (in the catalogue's order), as pystac Items."""
        import pystac

        return [pystac.Item.from_dict(json.loads(t)) for t in self.info["representatives"]]

    # -- questions -------------------------------------------------------------------

    def groups_for(self, area: Any, day: np.datetime64 | None = None) -> np.ndarray:
        """The row groups that may hold items intersecting ``area`` (on ``day``), from
        their statistics alone.

        Parameters
        ----------
        area
            A shapely geometry in lon/lat.
        day
            A solar day, or None for every day.
        """
        import shapely

        x0, y0, x1, y1 = shapely.bounds(area)
        ok = ~(
            (self._xmin_lo > x1)
            | (self._xmax_hi < x0)
            | (self._ymin_lo > y1)
            | (self._ymax_hi < y0)
        )
        if day is not None:
            d = np.asarray(day, dtype="datetime64[D]").astype(np.int64)
            ok &= (self._day_lo <= d) & (self._day_hi >= d)
        return np.nonzero(ok)[0]

    def query(self, area: Any, *, day: np.datetime64 | None = None) -> ItemHits:
        """The items whose footprint intersects ``area`` (a shapely geometry in lon/lat),
        acquired on solar ``day`` when given: only the row groups that may hold them are
        read, and only the columns the query filters on.

        Parameters
        ----------
        area
            The region, in lon/lat (EPSG:4326), longitude first.
        day
            A solar day (``numpy.datetime64``), or None for every day.
        """
        import pyarrow as pa
        import shapely

        groups = self.groups_for(area, day)
        if groups.size == 0:
            return ItemHits.empty(self)
        table = self._read(groups, _QUERY_COLUMNS)
        x0, y0, x1, y1 = shapely.bounds(area)
        box = table.column("bbox").combine_chunks()
        b = [np.asarray(box.field(name).to_numpy(zero_copy_only=False)) for name in _BOUNDS]
        keep = ~((b[0] > x1) | (b[2] < x0) | (b[1] > y1) | (b[3] < y0))
        days = np.asarray(
            table.column("solar_day").to_numpy(zero_copy_only=False), dtype="datetime64[D]"
        )
        if day is not None:
            keep &= days == np.asarray(day, dtype="datetime64[D]")
        picks = np.nonzero(keep)[0]
        rows = np.concatenate([np.arange(self._starts[g], self._starts[g + 1]) for g in groups])[
            picks
        ]
        geometries = shapely.from_wkb(
            np.asarray(table.column("geometry").take(pa.array(picks)).to_pylist(), dtype=object)
        )
        inside = np.asarray(shapely.intersects(geometries, area), dtype=bool)
        picks = picks[inside]
        times = np.asarray(
            table.column("datetime").to_numpy(zero_copy_only=False), dtype="datetime64[ns]"
        )
        return ItemHits(
            self,
            ids=np.asarray(table.column("id").take(pa.array(picks)).to_pylist(), dtype=object),
            times=times[picks],
            days=days[picks],
            geometries=geometries[inside],
            rows=rows[inside],
        )

    def _read(self, groups: Sequence[int] | np.ndarray, columns: list[str]) -> Any:
        import pyarrow.parquet as pq

        with self._lock:  # one reader at a time: a worker's threads share the index
            reader = pq.ParquetFile(self._path, metadata=self._metadata, filesystem=self._fs)
            return reader.read_row_groups([int(g) for g in groups], columns=columns)

    def group_of(self, rows: np.ndarray) -> np.ndarray:
        """The row group of each of ``rows`` (row numbers in the file)."""
        return np.searchsorted(self._starts, rows, side="right") - 1

    def items_at(self, rows: np.ndarray) -> list[pystac.Item]:
        """The pystac Items at file rows ``rows`` (parsed now, for these rows only).

        Parameters
        ----------
        rows
            Row numbers in the file (:attr:`ItemHits.rows`).
        """
        import pyarrow as pa
        import pystac

        if len(rows) == 0:
            return []
        rows = np.asarray(rows, dtype=np.int64)
        groups = np.unique(self.group_of(rows))
        table = self._read(groups, ["item"])
        offsets = {int(g): int(k) for g, k in zip(groups, np.cumsum(
            [0] + [int(self._starts[g + 1] - self._starts[g]) for g in groups[:-1]]
        ), strict=True)}  # fmt: skip
        local = [offsets[int(g)] + int(r - self._starts[g]) for r, g in
                 zip(rows, self.group_of(rows), strict=True)]  # fmt: skip
        texts = table.column("item").take(pa.array(local)).to_pylist()
        return [pystac.Item.from_dict(json.loads(t)) for t in texts]


@dataclasses.dataclass(eq=False)
class ItemHits:
    """The answer of :meth:`ItemIndex.query`: the items of a region (and day).

    Attributes
    ----------
    index
        The index they came from.
    ids
        ``[n]`` item ids.
    times
        ``[n]`` times (``datetime64[ns]``, NaT where unknown).
    days
        ``[n]`` solar days (``datetime64[D]``, NaT where unknown).
    geometries
        ``[n]`` footprints (shapely, lon/lat).
    rows
        ``[n]`` their rows in the index file.
    """

    index: ItemIndex
    ids: np.ndarray
    times: np.ndarray
    days: np.ndarray
    geometries: np.ndarray
    rows: np.ndarray

    @classmethod
    def empty(cls, index: ItemIndex) -> ItemHits:
        return cls(
            index,
            ids=np.empty(0, dtype=object),
            times=np.empty(0, dtype="datetime64[ns]"),
            days=np.empty(0, dtype="datetime64[D]"),
            geometries=np.empty(0, dtype=object),
            rows=np.empty(0, dtype=np.int64),
        )

    def __len__(self) -> int:
        return int(self.ids.size)

    def items(self) -> list[pystac.Item]:
        """The hits as pystac Items, in the index's order (parsed only now)."""
        return self.index.items_at(self.rows)

    def observations(self) -> int:
        """Distinct solar days among the hits (the time series a composite reduces)."""
        return int(np.unique(self.days).size)

    def touching(self, footprints: Any) -> list[np.ndarray]:
        """For each footprint (lon/lat geometries), the positions of the hits it intersects
        (a tree over the hits alone: the cost is the region's, not the catalogue's).

        Parameters
        ----------
        footprints
            ``[m]`` shapely geometries in lon/lat.
        """
        import shapely

        out: list[list[int]] = [[] for _ in range(len(footprints))]
        if len(self):
            pairs = shapely.STRtree(self.geometries).query(footprints, predicate="intersects")
            for g, i in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
                out[g].append(i)
        return [np.asarray(sorted(hits), dtype=np.int64) for hits in out]
