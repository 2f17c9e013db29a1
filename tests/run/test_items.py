"""The run's item index: one GeoParquet file sorted along a Hilbert curve, queried per region
and day from the row groups a query needs; the same answers as a scan of every item."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
import shapely.geometry

from xclay.ingest import item_solar_day
from xclay.run.items import ItemIndex, hilbert_keys, index_items

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")

DAYS = 12


def _catalogue(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` items: tiles clustered in a few places (as real catalogues are), some large,
    some across the antimeridian (a MultiPolygon), some with an unknown time, over
    ``DAYS`` days at several hours (so solar days differ from UTC days)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-170, -60], [170, 60], size=(6, 2))
    out = []
    for k in range(n):
        kind = rng.random()
        if kind < 0.03:  # across the antimeridian
            w, s = 179.5, float(rng.uniform(-50, 50))
            parts = [
                [[[w, s], [180, s], [180, s + 1], [w, s + 1], [w, s]]],
                [[[-180, s], [-179.5, s], [-179.5, s + 1], [-180, s + 1], [-180, s]]],
            ]
            geometry = {"type": "MultiPolygon", "coordinates": parts}
            bbox = [w, s, -179.5, s + 1]  # RFC 7946: west > east
        else:
            cx, cy = centres[rng.integers(len(centres))] + rng.normal(0, 3, size=2)
            size = 0.2 if kind < 0.95 else 6.0  # a few large footprints
            w, s, e, n_ = cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2
            geometry = {
                "type": "Polygon",
                "coordinates": [[[w, s], [e, s], [e, n_], [w, n_], [w, s]]],
            }
            bbox = [w, s, e, n_]
        properties: dict[str, Any] = {}
        if rng.random() < 0.02:
            properties["datetime"] = "1900-01-01T00:00:00Z"
            properties["xclay:datetime_unknown"] = True
        else:
            when = dt.datetime(2024, 3, 1, tzinfo=dt.UTC) + dt.timedelta(
                days=int(rng.integers(DAYS)), hours=float(rng.uniform(0, 24))
            )
            properties["datetime"] = when.isoformat().replace("+00:00", "Z")
        out.append({"type": "Feature", "stac_version": "1.0.0", "id": f"item-{k:05d}",
                    "collection": "c", "geometry": geometry, "bbox": bbox,
                    "properties": properties, "links": [],
                    "assets": {"b": {"href": f"https://example.com/{k}.tif"}}})  # fmt: skip
    return out


def _solar_days(items: list[dict[str, Any]]) -> list[Any]:
    days: list[Any] = []
    for doc in items:
        item = pystac.Item.from_dict(doc)
        day = None if doc["properties"].get("xclay:datetime_unknown") else item_solar_day(item)
        days.append(np.datetime64(day, "D") if day else np.datetime64("NaT", "D"))
    return days


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """3,000 items indexed in row groups of 64, sorted in buckets of ~100 KB (dozens of
    buckets: the external sort's every path)."""
    items = _catalogue(3000, seed=7)
    path = tmp_path_factory.mktemp("index") / "items.parquet"
    batches = [items[k : k + 250] for k in range(0, len(items), 250)]
    index_items(batches, path, group_rows=64, bucket_bytes=100_000)
    return items, path


def test_the_index_answers_what_a_scan_of_every_item_answers(
    catalogue: tuple[list[dict[str, Any]], Path],
) -> None:
    """Random regions (small and large, some across the antimeridian's neighbourhood) and
    random days, against shapely over every footprint and each item's solar day."""
    items, path = catalogue
    index = ItemIndex.open(path)
    footprints = np.array([shapely.geometry.shape(i["geometry"]) for i in items], dtype=object)
    days = np.array(_solar_days(items))
    ids = np.array([i["id"] for i in items], dtype=object)
    rng = np.random.default_rng(11)
    read = []
    for trial in range(300):
        w = rng.uniform(-180, 175)
        s = rng.uniform(-70, 65)
        size = rng.choice([0.05, 0.5, 3.0, 20.0])
        area = shapely.box(w, s, min(180.0, w + size), min(85.0, s + size))
        day = None
        if trial % 3 == 1:
            day = np.datetime64("2024-03-01") + np.timedelta64(int(rng.integers(-1, DAYS + 1)), "D")
        expected = shapely.intersects(footprints, area)
        if day is not None:
            expected &= days == day
        hits = index.query(area, day=day)
        assert sorted(hits.ids.tolist()) == sorted(ids[expected].tolist()), (trial, area, day)
        assert len(set(hits.ids.tolist())) == len(hits)
        read.append(len(index.groups_for(area, day)))
    # Small regions read a few of the 47 row groups; the whole world reads them all.
    assert index.row_groups == 47
    assert np.median(read) < 0.25 * index.row_groups, np.median(read)
    assert len(index.groups_for(shapely.box(-180, -90, 180, 90))) == index.row_groups


def test_a_day_is_filtered_in_the_query_not_after_it(
    catalogue: tuple[list[dict[str, Any]], Path],
) -> None:
    """The hits of a region and day are that day's items only (a task of one time step
    never sees the others), and the days of all its hits are the days of the region."""
    items, path = catalogue
    index = ItemIndex.open(path)
    area = shapely.box(-180, -90, 180, 90)
    every = index.query(area)
    assert len(every) == len(items)
    for day in np.unique(every.days[~np.isnat(every.days)])[:4]:
        hits = index.query(area, day=day)
        assert (hits.days == day).all() and len(hits) == int((every.days == day).sum())


def test_rows_lie_along_a_hilbert_curve_in_geoparquet_readers_know(
    catalogue: tuple[list[dict[str, Any]], Path],
) -> None:
    import geopandas

    items, path = catalogue
    table = pq.read_table(path)
    box = table.column("bbox").combine_chunks()
    b = [box.field(k).to_numpy() for k in ("xmin", "ymin", "xmax", "ymax")]
    keys = hilbert_keys((b[0] + b[2]) / 2, (b[1] + b[3]) / 2)
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    geo = json.loads(pq.read_schema(path).metadata[b"geo"])
    assert geo["version"] == "1.1.0"
    assert geo["columns"]["geometry"]["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    frame = geopandas.read_parquet(path)
    assert len(frame) == len(items) and frame.crs.to_epsg() == 4326
    by_id = {i["id"]: i for i in items}
    for row in frame.head(20).itertuples():
        assert json.loads(row.item)["id"] == row.id
        expected = shapely.geometry.shape(by_id[row.id]["geometry"])
        assert row.geometry.equals(expected)


def test_duckdb_reads_the_index_with_its_bbox_covering(
    catalogue: tuple[list[dict[str, Any]], Path],
) -> None:
    duckdb = pytest.importorskip("duckdb", reason="an outside reader of the index")
    _, path = catalogue
    index = ItemIndex.open(path)
    area = shapely.box(-20.0, -10.0, 25.0, 30.0)
    found = duckdb.sql(
        f"SELECT id FROM read_parquet('{path}') WHERE bbox.xmin <= 25 AND bbox.xmax >= -20 "
        "AND bbox.ymin <= 30 AND bbox.ymax >= -10"
    ).fetchall()
    # The covering is the footprints' bounds: a superset of the footprints that intersect.
    assert set(index.query(area).ids.tolist()) <= {r[0] for r in found}


def test_the_same_items_give_the_same_file_in_any_order(tmp_path: Path) -> None:
    items = _catalogue(400, seed=3)
    a, _ = index_items([items], tmp_path / "a.parquet", group_rows=50, bucket_bytes=20_000)
    shuffled = [items[k] for k in np.random.default_rng(0).permutation(len(items))]
    b, _ = index_items([shuffled[:150], shuffled[150:]], tmp_path / "b.parquet", group_rows=50)
    assert a.ids_sha256 == b.ids_sha256 == ItemIndex.open(tmp_path / "a.parquet").ids_sha256
    assert pq.read_table(tmp_path / "a.parquet").equals(pq.read_table(tmp_path / "b.parquet"))


def test_items_are_built_for_the_hits_only_and_matched_to_chips_among_them(
    catalogue: tuple[list[dict[str, Any]], Path],
) -> None:
    items, path = catalogue
    index = ItemIndex.open(path)
    area = shapely.box(*shapely.bounds(shapely.geometry.shape(items[0]["geometry"])))
    hits = index.query(area)
    built = hits.items()
    assert [i.id for i in built] == hits.ids.tolist() and 0 < len(built) < len(items)
    assert all(isinstance(i, pystac.Item) for i in built)
    west, south, east, north = area.bounds
    chips = [shapely.box(west, south, east - 0.1, north - 0.1), shapely.box(0, 0, 0.1, 0.1)]
    touching = hits.touching(chips)
    expected = shapely.intersects(hits.geometries, chips[0])
    assert sorted(hits.ids[touching[0]].tolist()) == sorted(hits.ids[expected].tolist())
    assert all(
        len(t) == 0 or shapely.intersects(hits.geometries[t], chips[1]).all() for t in touching[1:]
    )


def test_the_summary_is_what_the_plan_needs_of_every_item(tmp_path: Path) -> None:
    items = _catalogue(500, seed=5)
    index, summary = index_items([items], tmp_path / "i.parquet", datetime="2024-03-03/2024-03-06")
    kept = [
        i
        for i in items
        if i["properties"].get("xclay:datetime_unknown")
        or "2024-03-03" <= i["properties"]["datetime"][:10] <= "2024-03-06"
    ]
    assert summary.seen == 500 and summary.count == len(kept) == len(index)
    assert summary.head == [i["id"] for i in kept[:3]] == index.head
    known = [np.datetime64(d) for d in _solar_days(kept) if not np.isnat(d)]
    assert sorted(summary.days) == sorted(set(known))
    assert [i.id for i in index.representatives()] == [kept[0]["id"]]
