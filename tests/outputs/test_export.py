"""Embeddings Zarr and GeoParquet, read back with the tools users have."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr

import xclay
from tests.helpers import random_cube
from xclay.errors import OutputExistsError
from xclay.outputs.export import read_footer


@pytest.fixture(scope="module")
def emb(demo_cube_256: xr.Dataset) -> xr.Dataset:
    cube = demo_cube_256.copy(deep=True)
    cube["pixels"].values[0, :, :64, :64] = 0  # one chip all nodata: not embedded, not exported
    model = xclay.models.get_model("rcf", num_filters=16, sample_chips=6)
    return xclay.embed(cube, model=model, chip_size=64, progress=False)


def test_zarr_round_trip(tmp_path: Path, emb: xr.Dataset) -> None:
    path = emb.clay.to_zarr(tmp_path / "emb.zarr")
    back = xclay.open_embeddings(path)
    xr.testing.assert_equal(back.load(), emb)
    assert back.attrs["model"] == emb.attrs["model"]
    assert back.attrs["datacube"]["provenance"] == emb.attrs["datacube"]["provenance"]
    assert back["chip_id"].values[1, 2] == emb["chip_id"].values[1, 2]


def test_embeddings_zarr_is_a_raster_gis_tools_can_place(tmp_path: Path, emb: xr.Dataset) -> None:
    import odc.geo.xr  # noqa: F401
    import rioxarray  # noqa: F401

    path = xclay.to_zarr(emb, tmp_path / "emb.zarr")
    ds = xr.open_zarr(path, consolidated=False)
    vectors = ds["embedding"].isel(time=0, feature=0)
    assert vectors.rio.crs.to_epsg() == 32720
    t = vectors.rio.transform()
    assert (t.a, t.e) == (640.0, -640.0)  # one cell per 64 px chip of 10 m
    cube_t = xclay.datacube.datacube_geobox(emb_source_cube(emb)).affine
    assert (t.c, t.f) == (cube_t.c, cube_t.f)  # chips start at the cube's corner
    assert vectors.odc.geobox.shape == (4, 4)


def emb_source_cube(emb: xr.Dataset) -> xr.Dataset:
    """A stand-in cube with the source grid recorded in the embeddings' attrs."""
    from affine import Affine

    c, a, b, f, d, e = emb.attrs["datacube"]["geotransform"]
    ny, nx = emb.attrs["datacube"]["shape"]
    da = xr.DataArray(
        np.zeros((1, ny, nx), dtype="uint8"),
        dims=("band", "y", "x"),
        coords={"x": c + a * (np.arange(nx) + 0.5), "y": f + e * (np.arange(ny) + 0.5)},
    )
    cube = xclay.as_datacube(da, wavelengths=[0.5], crs=emb.attrs["datacube"]["crs_wkt"])
    assert Affine(a, b, c, d, e, f) == xclay.datacube.datacube_geobox(cube).affine
    return cube


def test_outputs_are_never_silently_overwritten(tmp_path: Path, emb: xr.Dataset) -> None:
    xclay.to_zarr(emb, tmp_path / "e.zarr")
    xclay.to_geoparquet(emb, tmp_path / "e.parquet")
    with pytest.raises(OutputExistsError):
        xclay.to_zarr(emb, tmp_path / "e.zarr")
    with pytest.raises(OutputExistsError):
        xclay.to_geoparquet(emb, tmp_path / "e.parquet")
    xclay.to_geoparquet(emb, tmp_path / "e.parquet", overwrite=True)


def test_geoparquet_read_with_geopandas(tmp_path: Path, emb: xr.Dataset) -> None:
    import geopandas as gpd
    import shapely

    path = emb.clay.to_geoparquet(tmp_path / "emb.parquet")
    gdf = gpd.read_parquet(path)
    assert gdf.crs.to_epsg() == 4326
    assert len(gdf) == int(emb["embedded"].sum()) == 15
    assert gdf.geometry.is_valid.all() and (gdf.geom_type == "Polygon").all()
    assert gdf["id"].is_unique and gdf["chip_id"].is_unique
    # Rows in (time, chip_y, chip_x) order; vectors exactly as embedded.
    t, i, j = np.nonzero(emb["embedded"].values)
    np.testing.assert_array_equal(
        np.stack(gdf["embedding"].to_numpy()), emb["embedding"].values[t, i, j]
    )
    np.testing.assert_array_equal(gdf["chip_id"], emb["chip_id"].values[i, j])
    # Centres lie inside their footprints; latitude is south, longitude west.
    centres = shapely.points(gdf["centre_lon"], gdf["centre_lat"])
    assert shapely.contains(gdf.geometry.values, centres).all()
    assert (gdf["centre_lat"] < 0).all() and (gdf["centre_lon"] < 0).all()
    # The bbox covering column (geopandas reads it as metadata) is each geometry's bounds.
    bbox = pq.read_table(path, columns=["bbox"])["bbox"].combine_chunks()
    bounds = gdf.geometry.bounds
    for field, column in zip(
        ("xmin", "ymin", "xmax", "ymax"), ("minx", "miny", "maxx", "maxy"), strict=True
    ):
        np.testing.assert_allclose(bbox.field(field).to_numpy(), bounds[column])
    # Native footprint: a 640 m square in UTM 20S whose corner is the pixel window's.
    native = shapely.from_wkb(gdf["native_footprint"])
    np.testing.assert_allclose(shapely.area(native), 640.0**2)
    assert (gdf["native_crs"] == "EPSG:32720").all()
    assert (gdf["chip_size"] == 64).all()
    assert set(gdf["row_off"]) == {0, 64, 128, 192}
    assert gdf["time"].dt.tz is not None and (gdf["time"] == "2024-07-02T00:00:00Z").all()
    assert (gdf["start_datetime"] == "2024-01-01T00:00:00Z").all()
    assert (gdf["end_datetime"] == "2025-01-01T00:00:00Z").all()
    assert gdf["cloud_fraction"].isna().all()  # the demo cube has no cloud mask
    assert (gdf["platform"] == "sentinel-2-l2a").all()
    assert gdf["source_ids"].iloc[0].tolist() == [
        "xclay.datasets.demo_composite(size=256, seed=1, year=2024)"
    ]


def test_geoparquet_schema_and_footer_with_pyarrow(tmp_path: Path, emb: xr.Dataset) -> None:
    path = xclay.to_geoparquet(emb, tmp_path / "emb.parquet")
    schema = pq.read_schema(path)
    assert schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert schema.field("geometry").type == pa.binary()
    assert schema.field("bbox").type == pa.struct(
        [(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")]
    )
    geo = json.loads(schema.metadata[b"geo"])
    assert geo["version"] == "1.1.0" and geo["primary_column"] == "geometry"
    column = geo["columns"]["geometry"]
    assert column["encoding"] == "WKB" and column["geometry_types"] == ["Polygon"]
    assert column["crs"]["id"] == {"authority": "EPSG", "code": 4326}
    assert column["covering"]["bbox"]["xmin"] == ["bbox", "xmin"]
    lon_min, lat_min, lon_max, lat_max = column["bbox"]
    assert -65 < lon_min < lon_max < -60 and -5 < lat_min < lat_max < 0
    meta = read_footer(path)
    assert meta["model"] == json.loads(json.dumps(emb.attrs["model"]))
    # Stored once: in the file's key-value metadata, not again inside the Arrow schema.
    footer = pq.read_metadata(path).metadata
    assert b"xclay" not in schema.metadata and b"rcf" not in footer[b"ARROW:schema"]
    assert meta["embedding"] == {
        "dim": 32,
        "dtype": "float32",
        "quantization": None,
        "output": "pooled",
        "per_chip": "as stored",
    }
    assert meta["run"]["chips_embedded"] == 15 and meta["xclay_version"] == xclay.__version__
    assert meta["config"]["grid"]["chip_size"] == 64


def test_geoparquet_queried_with_duckdb(tmp_path: Path, emb: xr.Dataset) -> None:
    import duckdb

    path = xclay.to_geoparquet(emb, tmp_path / "emb.parquet")
    con = duckdb.connect()
    (total,) = con.execute(f"SELECT count(*) FROM read_parquet('{path}')").fetchall()[0]
    lat = float(emb["lat"].values[1, 1])
    inside = con.execute(
        f"SELECT chip_id FROM read_parquet('{path}') WHERE bbox.ymin <= {lat} AND bbox.ymax >= {lat}"
    ).fetchall()
    (dims,) = con.execute(f"SELECT len(embedding) FROM read_parquet('{path}') LIMIT 1").fetchall()[
        0
    ]
    assert total == 15 and dims == 32
    assert str(emb["chip_id"].values[1, 1]) in {r[0] for r in inside}


def test_footprints_across_the_antimeridian_are_split(tmp_path: Path) -> None:
    import geopandas as gpd
    from pyproj import Transformer

    # UTM zone 1N around 65 N, 180 E: the chip grid straddles the antimeridian.
    x180, y65 = Transformer.from_crs("EPSG:4326", "EPSG:32601", always_xy=True).transform(
        180.0, 65.0
    )
    origin = (round(x180 - 1500), round(y65))  # chip column 1 spans x180 - 540 .. x180 + 420
    cube = random_cube((1, 2, 128, 128), crs="EPSG:32601", origin=origin, res=30.0)
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    emb = xclay.embed(cube, model=model, chip_size=32, progress=False)
    gdf = gpd.read_parquet(xclay.to_geoparquet(emb, tmp_path / "e.parquet"))
    assert set(gdf.geom_type) == {"Polygon", "MultiPolygon"}
    split = gdf[gdf.geom_type == "MultiPolygon"]
    assert len(split) == 4  # one column of chips crosses 180 E
    for geom in split.geometry:
        xmin, _, xmax, _ = geom.bounds
        assert xmin == pytest.approx(-180) and xmax == pytest.approx(180)
        east, west = sorted(geom.geoms, key=lambda g: -g.bounds[0])
        assert east.bounds[2] == pytest.approx(180.0) and west.bounds[0] == pytest.approx(-180.0)
    assert gdf.geometry.is_valid.all()
    assert (
        (gdf.geometry.bounds.maxx - gdf.geometry.bounds.minx)[gdf.geom_type == "Polygon"] < 1
    ).all()


def test_failed_parquet_write_leaves_nothing(
    tmp_path: Path, emb: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pq.ParquetWriter.write_table

    def disk_full(self: pq.ParquetWriter, table: pa.Table, **kw: object) -> None:
        real(self, table.slice(0, 3), **kw)  # part of the file is on disk...
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", disk_full)
    with pytest.raises(OSError, match="No space left"):
        xclay.to_geoparquet(emb, tmp_path / "e.parquet")
    assert list(tmp_path.iterdir()) == []


def test_float_nodata_survives_the_json_attrs(tmp_path: Path) -> None:
    cube = random_cube((1, 2, 64, 64), dtype="float32", nodata=float("nan"))
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=2)
    emb = xclay.embed(cube, model=model, chip_size=32, progress=False)
    back = xclay.open_embeddings(xclay.to_zarr(emb, tmp_path / "e.zarr"))
    assert back.attrs["datacube"]["nodata"] == "NaN"
    meta = read_footer(xclay.to_geoparquet(emb, tmp_path / "e.parquet"))
    assert meta["datacube"]["nodata"] == "NaN"


def test_geoparquet_from_a_reopened_embeddings_zarr(tmp_path: Path, emb: xr.Dataset) -> None:
    reopened = xclay.open_embeddings(xclay.to_zarr(emb, tmp_path / "e.zarr"))
    a = pq.read_table(xclay.to_geoparquet(reopened, tmp_path / "a.parquet"))
    b = pq.read_table(xclay.to_geoparquet(emb, tmp_path / "b.parquet"))
    assert a.equals(b)


def test_regional_store_of_patch_grids_thumbnails_and_int8_equals_the_whole(
    tmp_path: Path, demo_cube_256: xr.Dataset
) -> None:
    """What a run does region by region gives what one embed of the whole cube gives."""
    import torch

    from xclay.batch.batching import Block
    from xclay.datacube import mark_complete
    from xclay.embed import EmbedConfig, EmbedSession
    from xclay.models.clay_encoder import ClayEncoder
    from xclay.outputs.export import create_embeddings_store, write_embeddings_region
    from xclay.outputs.quantize import quantize_embeddings
    from xclay.run.state import embed_regions

    torch.manual_seed(0)
    torch.save(ClayEncoder.from_size("tiny").state_dict(), tmp_path / "tiny.pt")
    model = xclay.models.get_model("clay-v1.5", checkpoint=tmp_path / "tiny.pt", output="patches")
    config = EmbedConfig(grid=xclay.ChipGridSpec(chip_size=64), thumbnails=16, precision="fp32")
    session = EmbedSession(demo_cube_256, model, config)
    store = create_embeddings_store(
        session.layout().quantized("int8"), tmp_path / "regions.zarr", region_chips=2
    )
    for region in embed_regions(0, 1, session.grid.shape, 2):
        block = Block((region.time, region.time + 1), region.rows, region.cols)
        part = quantize_embeddings(session.dataset(session.embed_block(block, progress=False)))
        write_embeddings_region(store, part, (region.time, region.rows[0], region.cols[0]))
    mark_complete(store)
    whole = session.dataset(session.embed_block(progress=False))
    regional = xclay.open_embeddings(store).load()
    reference = xclay.open_embeddings(xclay.to_zarr(whole, tmp_path / "w.zarr", quantize="int8"))
    assert regional["embedding"].shape == (1, 4, 4, 8, 8, 192)
    assert regional["thumbnail"].shape == (1, 4, 4, 16, 16, 4)
    for name in ("embedding", "thumbnail", "embedded", "nodata_fraction"):
        np.testing.assert_array_equal(regional[name].values, reference[name].values)
