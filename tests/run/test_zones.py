"""Runs across UTM zones: one datacube per zone on a lattice-anchored grid, one GeoParquet
dataset, exact seams (every point covered, no chip twice), and items that reach only the
regions they cover."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")

import shapely
import yaml
from affine import Affine
from pyproj import Transformer

import xclay
from tests.helpers import stac_validator, validate_stac
from xclay.ingest import stac_item
from xclay.run import load_spec, plan, run
from xclay.run.zones import utm_cells, utm_zones

SEAM = -66.0  # between UTM zones 19 and 20
BBOX = (-66.06, -10.05, -65.94, -9.95)
RES = 30.0


def _scene(folder: Path, name: str, epsg: int, west: float, east: float, date: str) -> Path:
    """A 4-band GeoTIFF in a UTM zone over [west, east] x the bbox's latitudes (plus a
    margin), whose pixels are a smooth function of lon/lat: both zones see one landscape."""
    to_utm = Transformer.from_crs("EPSG:4326", f"EPSG:{epsg}", always_xy=True)
    xs, ys = to_utm.transform(
        [west, east, west, east], [BBOX[1] - 0.01, BBOX[1] - 0.01, BBOX[3] + 0.01, BBOX[3] + 0.01]
    )
    x0, x1 = np.floor(min(xs) / RES) * RES, np.ceil(max(xs) / RES) * RES
    y0, y1 = np.floor(min(ys) / RES) * RES, np.ceil(max(ys) / RES) * RES
    width, height = int((x1 - x0) / RES), int((y1 - y0) / RES)
    transform = Affine(RES, 0, x0, 0, -RES, y1)
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x = transform.c + transform.a * cols
    y = transform.f + transform.e * rows
    lon, lat = Transformer.from_crs(f"EPSG:{epsg}", "EPSG:4326", always_xy=True).transform(x, y)
    bands = [
        1000 + 4000 * (0.5 + 0.5 * np.sin(40 * lon + k) * np.cos(35 * lat - k)) for k in range(4)
    ]
    path = folder / f"{name}.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=4, dtype="uint16",
        crs=f"EPSG:{epsg}", transform=transform, nodata=0,
    ) as dst:  # fmt: skip
        dst.write(np.stack(bands).astype(np.uint16))
    return path


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run over the seam of UTM zones 19 and 20 (south), and its finished outputs."""
    folder = tmp_path_factory.mktemp("zones")
    bands = ["blue", "green", "red", "nir08"]
    waves = [0.48, 0.56, 0.66, 0.84]
    items = [
        stac_item(_scene(folder, "west", 32719, BBOX[0] - 0.02, SEAM + 0.02, "2024-07-01"),
                  bands=bands, wavelengths=waves, id="west", datetime="2024-07-01T14:00:00Z"),
        stac_item(_scene(folder, "east", 32720, SEAM - 0.02, BBOX[2] + 0.02, "2024-07-01"),
                  bands=bands, wavelengths=waves, id="east", datetime="2024-07-01T14:00:00Z"),
    ]  # fmt: skip
    pystac.ItemCollection(items).save_object(dest_href=str(folder / "items.json"))
    spec = {
        "input": {"stac": {"items": "items.json"}, "bands": bands, "bbox": list(BBOX)},
        "grid": {"resolution": RES, "chip_size": 32},
        "model": {"name": "rcf", "options": {"num_filters": 16, "sample_chips": 8}},
        "compute": {"region_chips": 4, "device": "cpu"},
        "quality": {"max_nodata": 0.9},
        "outputs": {"dir": "out"},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    report = run(load_spec(folder / "spec.yaml"), progress=False)
    assert report.status == "complete", report.failed
    return folder


def test_the_area_is_tiled_by_utm_zone_on_a_lattice() -> None:
    cells = utm_cells(BBOX)
    assert [code for code, _ in cells] == ["EPSG:32719", "EPSG:32720"]
    zones = utm_zones(BBOX, RES, 32)
    for zone in zones:
        t = zone.geobox.affine
        # Anchored on the chip lattice: the same chips whatever the run's bbox.
        assert t.c % (32 * RES) == 0 and t.f % (32 * RES) == 0
        assert zone.cell_native().within(shapely.box(*zone.geobox.extent.boundingbox))
    wider = utm_zones((BBOX[0] - 0.3, BBOX[1] - 0.2, BBOX[2], BBOX[3]), RES, 32)
    for a, b in zip(zones, wider, strict=True):
        dx = (a.geobox.affine.c - b.geobox.affine.c) / (32 * RES)
        dy = (a.geobox.affine.f - b.geobox.affine.f) / (32 * RES)
        assert dx == int(dx) and dy == int(dy)  # one lattice: chip windows coincide


def test_a_run_over_two_zones_has_a_datacube_per_zone_and_one_dataset(two_zones: Path) -> None:
    out = two_zones / "out"
    resolved = plan(load_spec(two_zones / "spec.yaml"))
    assert resolved.tiled and [z.tag for z in resolved.zones] == ["EPSG32719", "EPSG32720"]
    for tag in ("EPSG32719", "EPSG32720"):
        cube = xclay.open_datacube(out / f"cube-{tag}.zarr")
        assert (
            cube["spatial_ref"].attrs["crs_wkt"]
            and f"{tag[4:]}" in cube.attrs["provenance"]["stac"]["crs"]
        )
        emb = xclay.open_embeddings(out / f"embeddings-{tag}.zarr")
        assert emb["embedded"].values.any()
    table = pq.read_table(out / "embeddings.parquet")
    assert set(table["native_crs"].to_pylist()) == {"EPSG:32719", "EPSG:32720"}
    ids = table["chip_id"].to_pylist()
    assert len(ids) == len(set(ids))  # no chip twice


def test_the_seam_is_covered_and_each_zone_keeps_to_its_cell(two_zones: Path) -> None:
    table = pq.read_table(two_zones / "out" / "embeddings.parquet")
    footprints = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    crs = np.asarray(table["native_crs"].to_pylist())
    west_band = shapely.box(BBOX[0], BBOX[1], SEAM, BBOX[3])
    east_band = shapely.box(SEAM, BBOX[1], BBOX[2], BBOX[3])
    # Each zone embeds only chips that reach into its own cell...
    assert shapely.intersects(footprints[crs == "EPSG:32719"], west_band).all()
    assert shapely.intersects(footprints[crs == "EPSG:32720"], east_band).all()
    # ... and every point of the area lies in an embedded chip: nothing is missed.
    lon, lat = np.meshgrid(np.linspace(BBOX[0], BBOX[2], 61), np.linspace(BBOX[1], BBOX[3], 41))
    points = shapely.points(lon.ravel(), lat.ravel())
    tree = shapely.STRtree(footprints)
    covered = np.zeros(points.size, dtype=bool)
    covered[np.unique(tree.query(points, predicate="within")[0])] = True
    assert covered.all(), f"{(~covered).sum()} points of the area are in no chip"
    # Where the zones meet, their chips overlap by at most one chip's width (~0.0087 deg).
    west_edge = shapely.bounds(footprints[crs == "EPSG:32719"])[:, 2].max()
    east_edge = shapely.bounds(footprints[crs == "EPSG:32720"])[:, 0].min()
    assert west_edge - SEAM < 32 * RES / 1e5 * 1.1 and SEAM - east_edge < 32 * RES / 1e5 * 1.1


def test_none_of_a_zones_chips_is_missed(two_zones: Path) -> None:
    from xclay.batch.chips import ChipGrid, ChipGridSpec

    table = pq.read_table(two_zones / "out" / "embeddings.parquet")
    spec = load_spec(two_zones / "spec.yaml")
    for zone in plan(spec).zones:
        grid = ChipGrid.from_geobox(zone.geobox, ChipGridSpec(chip_size=32))
        squares = shapely.polygons(grid.corners_native().reshape(-1, 5, 2))
        expected = set(grid.chip_ids().ravel()[shapely.intersects(squares, zone.cell_native())])
        got = {c for c, z in zip(table["chip_id"].to_pylist(), table["native_crs"].to_pylist(), strict=True)
               if z.replace(":", "") == zone.tag}  # fmt: skip
        assert got == expected, zone.tag


def test_each_row_lists_its_own_sources(two_zones: Path) -> None:
    table = pq.read_table(
        two_zones / "out" / "embeddings.parquet", columns=["geometry", "source_ids"]
    )
    footprints = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    west_item = shapely.box(BBOX[0] - 0.02, BBOX[1] - 0.01, SEAM + 0.02, BBOX[3] + 0.01)
    for geom, ids in zip(footprints, table["source_ids"].to_pylist(), strict=True):
        assert ("west" in ids) == bool(shapely.intersects(geom, west_item)), ids
        assert ids and set(ids) <= {"west", "east"}


def test_items_outside_a_region_never_reach_its_task(two_zones: Path) -> None:
    out = two_zones / "out"
    record = json.loads((out / "_xclay" / "run.json").read_text())
    west_only, east_only = 0, 0
    for marker in (out / "_xclay" / "done" / "ingest").rglob("*.json"):
        done = json.loads(marker.read_text())
        region = done["region"]
        zone = record["zones"][region["zone"]]
        t = Affine(*zone["affine"][:6])
        (y0, y1), (x0, x1) = region["rows"], region["cols"]
        xs = [t.c + t.a * x0, t.c + t.a * x1]
        ys = [t.f + t.e * y0, t.f + t.e * y1]
        lon, _ = Transformer.from_crs(zone["crs"], "EPSG:4326", always_xy=True).transform(
            [xs[0], xs[1], xs[0], xs[1]], [ys[0], ys[0], ys[1], ys[1]]
        )
        # Items: west reaches SEAM + 0.02, east starts at SEAM - 0.02.
        expected = int(min(lon) <= SEAM + 0.02) + int(max(lon) >= SEAM - 0.02)
        assert done["items"] == expected, region
        west_only += max(lon) < SEAM - 0.02
        east_only += min(lon) > SEAM + 0.02
    assert west_only and east_only  # regions that saw one item only exist


def test_one_stac_collection_describes_both_zones(two_zones: Path) -> None:
    """The run's STAC: one collection over both zones, an item per zone, its
    emb:source-data the item index (stac-geoparquet); all valid."""
    pytest.importorskip("pystac", reason="needs xclay[io]")
    out = two_zones / "out"
    validator = stac_validator()
    collection = json.loads((out / "stac" / "collection.json").read_text())
    source = next(link for link in collection["links"] if link["rel"] == "emb:source-data")
    assert source["href"].endswith("items.parquet") and (out / "stac" / source["href"]).is_file()
    assert collection["summaries"]["proj:code"] == ["EPSG:32719", "EPSG:32720"]
    items = sorted((out / "stac" / "items").glob("*.json"))
    assert [json.loads(i.read_text())["properties"]["proj:code"] for i in items] == [
        "EPSG:32719",
        "EPSG:32720",
    ]
    for path in sorted((out / "stac").rglob("*.json")):
        validate_stac(path, validator)


def test_each_stac_item_covers_every_chip_of_its_zone(two_zones: Path) -> None:
    """An item's geometry and bbox hold all of its chips' footprints: a zone embeds the
    chips meeting its cell whole, so they reach past the cell (and past the seam)."""
    out = two_zones / "out"
    table = pq.read_table(out / "embeddings.parquet", columns=["geometry", "native_crs"])
    footprints = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    crs = np.asarray(table["native_crs"].to_pylist())
    for path in sorted((out / "stac" / "items").glob("*.json")):
        item = json.loads(path.read_text())
        chips = footprints[crs == item["properties"]["proj:code"]]
        assert chips.size
        geometry = shapely.geometry.shape(item["geometry"])
        west, south, east, north = shapely.bounds(shapely.union_all(chips))
        tolerance = 1e-7  # degrees: a centimetre
        assert item["bbox"][0] <= west + tolerance and item["bbox"][2] >= east - tolerance
        assert item["bbox"][1] <= south + tolerance and item["bbox"][3] >= north - tolerance
        assert shapely.covers(geometry.buffer(tolerance), chips).all(), path.name
        # ... and not much more than them: the chips fill the item's footprint
        assert shapely.union_all(chips).area > 0.95 * geometry.area


def test_centre_in_zone_keeps_one_zones_chips_on_each_side_of_the_seam(two_zones: Path) -> None:
    """Both zones have chips in a strip along the seam up to two chips wide; the rows whose
    centre lies in their own zone hold each side's chips once: west of the seam zone 19's,
    east of it zone 20's, no chip kept from across, and the area still covered but for
    slivers along the seam where the two grids' squares do not meet."""
    table = pq.read_table(two_zones / "out" / "embeddings.parquet")
    footprints = shapely.from_wkb(table["geometry"].to_numpy(zero_copy_only=False))
    crs = np.asarray(table["native_crs"].to_pylist())
    lon = table["centre_lon"].to_numpy()
    own = table["centre_in_zone"].to_numpy(zero_copy_only=False)
    chip_deg = 32 * RES / 111_320 / np.cos(np.radians(10.0))  # a chip's width at 10 S
    west_edge = shapely.bounds(footprints[crs == "EPSG:32719"])[:, 2].max()
    east_edge = shapely.bounds(footprints[crs == "EPSG:32720"])[:, 0].min()
    strip = west_edge - east_edge
    assert 0 < strip <= 2.1 * chip_deg, strip / chip_deg  # each zone reaches past by < a chip
    assert (own == ((crs == "EPSG:32719") == (lon < SEAM))).all()
    assert ((lon < SEAM) & own).sum() and ((lon >= SEAM) & own).sum()
    kept = footprints[own]
    lons, lats = np.meshgrid(np.linspace(BBOX[0], BBOX[2], 121), np.linspace(BBOX[1], BBOX[3], 81))
    points = shapely.points(lons.ravel(), lats.ravel())
    hit = np.zeros(points.size, dtype=bool)
    hit[np.unique(shapely.STRtree(kept).query(points, predicate="intersects")[0])] = True
    missed = lons.ravel()[~hit]
    # The slivers: a few of the 121 columns of points, all within half a chip of the seam.
    assert hit.mean() > 0.97 and (np.abs(missed - SEAM) < chip_deg / 2).all()
