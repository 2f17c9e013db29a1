"""The STAC items of a run, indexed once: footprints, dates, and the items themselves.

A run resolves its items once (a search, or a file) and keeps them in one
sidecar, ``<outputs.dir>/items.parquet`` (referenced by its sha256 from the
run state, the datacube and the embeddings), not in every region's metadata.
:class:`ItemIndex` answers the questions regions ask of it, at the cost of
the answer: which items intersect this block (and this day), and which items
each chip's footprint touches (a row's ``source_ids``). A region's task gets
only its items: the rest never reach it.

The sidecar is GeoParquet (``geometry``: item footprints, WKB, EPSG:4326) with
one row per item: ``id``, ``collection``, ``datetime`` (UTC; the start of the
item's range where it has one), ``solar_day`` (the acquisition day in local
solar time at the item's centre, :func:`xclay.ingest.item_solar_day`, which
groups acquisitions into time steps),
``west/south/east/north``, and ``item`` (the item's JSON, asset hrefs
absolute).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from xclay._hashing import sha256_file
from xclay.ingest import item_solar_day
from xclay.storage import Where, location

if TYPE_CHECKING:
    import pystac

__all__ = ["ItemIndex"]

_GEO = {
    "version": "1.1.0",
    "primary_column": "geometry",
    "columns": {"geometry": {"encoding": "WKB", "geometry_types": []}},
}


class ItemIndex:
    """STAC items with their footprints and dates, queryable by area and day.

    Build one with :meth:`from_items` or :meth:`load`.

    Parameters
    ----------
    table
        A pyarrow Table with one row per item and the sidecar's columns (``id``,
        ``collection``, ``datetime``, ``solar_day``, ``west``/``south``/``east``/``north``,
        ``geometry`` as WKB in EPSG:4326, ``item`` JSON), as :meth:`from_items` builds it.
    """

    def __init__(self, table: Any) -> None:
        import shapely

        self.table = table
        self.ids = np.asarray(table["id"].to_pylist(), dtype=object)
        self.bounds = np.stack(
            [np.asarray(table[c].to_numpy(), dtype=np.float64) for c in _BOUNDS], axis=1
        )
        self.days = np.asarray(table["solar_day"].to_numpy(), dtype="datetime64[D]")
        self.times = np.asarray(
            table["datetime"].to_numpy(zero_copy_only=False), dtype="datetime64[ns]"
        )
        self.geometries = shapely.from_wkb(np.asarray(table["geometry"].to_pylist(), dtype=object))
        self._tree: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    # -- building, saving, loading ---------------------------------------------

    @classmethod
    def from_items(cls, items: Sequence[pystac.Item]) -> ItemIndex:
        """Index pystac Items (their asset hrefs made absolute)."""
        import pyarrow as pa
        import shapely

        rows: dict[str, list[Any]] = {name: [] for name in _COLUMNS}
        for original in items:
            item = original.clone()
            item.make_asset_hrefs_absolute()
            geometry = shapely.geometry.shape(item.geometry) if item.geometry else None
            if geometry is None and item.bbox:
                geometry = shapely.box(*item.bbox[:4])
            if geometry is None:
                geometry = shapely.box(-180.0, -90.0, 180.0, 90.0)  # unknown: everywhere
            west, south, east, north = shapely.bounds(geometry)
            when = item.datetime or item.common_metadata.start_datetime
            if when is None or item.properties.get("xclay:datetime_unknown"):
                when = None
            rows["id"].append(item.id)
            rows["collection"].append(item.collection_id)
            rows["datetime"].append(
                when.astimezone(dt.UTC).replace(tzinfo=None) if when is not None else None
            )
            rows["solar_day"].append(item_solar_day(item) if when else None)
            for name, value in zip(_BOUNDS, (west, south, east, north), strict=True):
                rows[name].append(float(value))
            rows["geometry"].append(shapely.to_wkb(geometry))
            rows["item"].append(json.dumps(item.to_dict(), separators=(",", ":")))
        table = pa.table(
            {
                "id": pa.array(rows["id"], pa.string()),
                "collection": pa.array(rows["collection"], pa.string()),
                "datetime": pa.array(rows["datetime"], pa.timestamp("us", tz="UTC")),
                "solar_day": pa.array(rows["solar_day"], pa.date32()),
                **{name: pa.array(rows[name], pa.float64()) for name in _BOUNDS},
                "geometry": pa.array(rows["geometry"], pa.binary()),
                "item": pa.array(rows["item"], pa.large_string()),
            }
        )
        return cls(table)

    def save(self, path: Where) -> str:
        """Write the index as GeoParquet (whole or not at all: a path or a URL); returns
        the file's sha256."""
        import pyarrow.parquet as pq

        geo = json.loads(json.dumps(_GEO))
        geo["columns"]["geometry"]["bbox"] = (
            [
                float(self.bounds[:, 0].min()),
                float(self.bounds[:, 1].min()),
                float(self.bounds[:, 2].max()),
                float(self.bounds[:, 3].max()),
            ]
            if len(self)
            else []
        )
        table = self.table.replace_schema_metadata({"geo": json.dumps(geo)})
        with location(path).staged(overwrite=True) as tmp:
            pq.write_table(table, tmp, compression="zstd")
            return sha256_file(tmp)

    @classmethod
    def load(cls, path: Where) -> ItemIndex:
        """The index saved at ``path`` (a path or URL) by :meth:`save`."""
        import pyarrow.parquet as pq

        fs, where = location(path).arrow()
        return cls(pq.read_table(where, filesystem=fs))

    # -- questions -------------------------------------------------------------

    @property
    def tree(self) -> Any:
        """An STR-tree over the footprints, built on first use."""
        if self._tree is None:
            import shapely

            self._tree = shapely.STRtree(self.geometries)
        return self._tree

    def query(
        self,
        area: Any,
        *,
        day: np.datetime64 | None = None,
        time_range: tuple[np.datetime64, np.datetime64] | None = None,
    ) -> np.ndarray:
        """Indices of the items whose footprint intersects ``area`` (a shapely geometry in
        lon/lat), acquired on solar ``day`` or within ``time_range`` when given."""
        hits = np.sort(self.tree.query(area, predicate="intersects"))
        if day is not None:
            hits = hits[self.days[hits] == np.asarray(day).astype("datetime64[D]")]
        if time_range is not None:
            t = self.times[hits]
            hits = hits[np.isnat(t) | ((t >= time_range[0]) & (t <= time_range[1]))]
        return hits

    def touching(self, footprints: Any, candidates: np.ndarray | None = None) -> list[np.ndarray]:
        """For each footprint (lon/lat geometries), the indices of the items it intersects,
        among ``candidates`` (default: all items)."""
        pairs = self.tree.query(footprints, predicate="intersects")
        out: list[list[int]] = [[] for _ in range(len(footprints))]
        allowed = None if candidates is None else set(candidates.tolist())
        for g, i in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
            if allowed is None or i in allowed:
                out[g].append(i)
        return [np.asarray(sorted(hits), dtype=np.int64) for hits in out]

    def items(self, indices: Sequence[int] | np.ndarray) -> list[pystac.Item]:
        """The pystac Items at ``indices`` (parsed only now, for these rows only)."""
        import pystac

        column = self.table["item"]
        return [pystac.Item.from_dict(json.loads(column[int(i)].as_py())) for i in indices]

    def solar_days(self) -> np.ndarray:
        """The distinct solar days of the items (NaT where unknown), sorted."""
        days = np.unique(self.days[~np.isnat(self.days)])
        return days

    def time_range(self) -> tuple[np.datetime64, np.datetime64] | None:
        known = self.times[~np.isnat(self.times)]
        if known.size == 0:
            return None
        return known.min(), known.max()


_BOUNDS = ("west", "south", "east", "north")
_COLUMNS = ("id", "collection", "datetime", "solar_day", *_BOUNDS, "geometry", "item")
