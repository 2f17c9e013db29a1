"""int8 vectors with a scale per vector: in Zarr and GeoParquet, read back as float32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr
import zarr

import xclay
from xclay.errors import DatacubeError
from xclay.outputs.export import read_footer
from xclay.outputs.quantize import MISSING_INT8, dequantize_int8, quantize_int8


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def emb(demo_cube_256: xr.Dataset) -> xr.Dataset:
    cube = demo_cube_256.copy(deep=True)
    cube["pixels"].values[0, :, :64, :64] = 0  # one chip all nodata: not embedded
    model = xclay.models.get_model("rcf", num_filters=16, sample_chips=6)
    return xclay.embed(cube, model=model, chip_size=64, progress=False)


def test_int8_round_trip_error_is_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 3, 64)).astype(np.float32) * rng.uniform(0.01, 100, (50, 3, 1))
    v[0, 0] = np.nan  # not embedded
    v[0, 1] = 0.0
    q, scale = quantize_int8(v)
    assert q.dtype == np.int8 and scale.shape == (50, 3) and scale.dtype == np.float32
    assert (q[0, 0] == MISSING_INT8).all() and np.isnan(scale[0, 0])
    assert (q[0, 1] == 0).all() and scale[0, 1] == 0
    ok = np.isfinite(v).all(-1)
    assert np.abs(q[ok]).max() == 127 and (q[ok] != MISSING_INT8).all()
    back = dequantize_int8(q, scale)
    assert np.isnan(back[0, 0]).all() and (back[0, 1] == 0).all()
    err = np.abs(back - v)[ok]
    assert (err <= scale[ok][:, None] / 2 * (1 + 1e-5)).all()
    nonzero = ok & (np.abs(v).max(-1) > 0)
    assert _cosine(back[nonzero], v[nonzero]).min() > 0.999


def test_zarr_stores_int8_and_reads_back_float32(tmp_path: Path, emb: xr.Dataset) -> None:
    plain = xclay.to_zarr(emb, tmp_path / "f32.zarr")
    path = emb.clay.to_zarr(tmp_path / "i8.zarr", quantize="int8")
    group = zarr.open_group(path, mode="r")
    stored, scale = group["embedding"], group["embedding_scale"]
    assert isinstance(stored, zarr.Array) and isinstance(scale, zarr.Array)
    assert stored.dtype == np.int8
    assert scale.shape == emb["embedding"].shape[:-1]
    quantization = group.attrs["quantization"]
    assert isinstance(quantization, dict)
    assert quantization["method"] == "int8-absmax-per-vector"

    back = xclay.open_embeddings(path)
    assert back["embedding"].dtype == np.float32 and "embedding_scale" not in back
    vectors, original = back["embedding"].values, emb["embedding"].values
    embedded = emb["embedded"].values
    assert np.isnan(vectors[~embedded]).all() and np.isfinite(vectors[embedded]).all()
    step = np.abs(original[embedded]).max(-1, keepdims=True) / 127
    assert (np.abs(vectors[embedded] - original[embedded]) <= step / 2 * (1 + 1e-5)).all()
    assert _cosine(vectors[embedded], original[embedded]).min() > 0.999
    # Lazily opened: a selection reads (and dequantises) only itself, with the same values.
    one = xclay.open_embeddings(path)["embedding"].isel(time=0, chip_y=2, chip_x=slice(1, 3))
    np.testing.assert_array_equal(one.values, vectors[0, 2, 1:3])
    feature = xclay.open_embeddings(path)["embedding"].isel(time=0, chip_y=1, feature=5)
    np.testing.assert_array_equal(feature.values, vectors[0, 1, :, 5])

    raw = xclay.open_embeddings(path, dequantize=False)
    assert raw["embedding"].dtype == np.int8 and raw["embedding_scale"].dtype == np.float32
    assert (raw["embedding"].values[~embedded] == MISSING_INT8).all()

    def chunk_bytes(store: Path, names: tuple[str, ...]) -> int:
        files = [f for n in names for f in (store / n / "c").rglob("*") if f.is_file()]
        return sum(f.stat().st_size for f in files)

    int8_bytes = chunk_bytes(path, ("embedding", "embedding_scale"))
    assert int8_bytes < chunk_bytes(plain, ("embedding",)) / 2


def test_dask_chunked_dequantisation_stays_lazy(tmp_path: Path, emb: xr.Dataset) -> None:
    from xclay.outputs.quantize import dequantize_embeddings

    path = xclay.to_zarr(emb, tmp_path / "i8.zarr", quantize="int8")
    chunked = xr.open_zarr(path, consolidated=False)
    restored = dequantize_embeddings(chunked)
    assert restored["embedding"].chunks is not None
    np.testing.assert_array_equal(
        restored["embedding"].values, xclay.open_embeddings(path)["embedding"].values
    )


def test_geoparquet_int8_column_and_reader(tmp_path: Path, emb: xr.Dataset) -> None:
    import duckdb
    import geopandas as gpd

    path = emb.clay.to_geoparquet(tmp_path / "e.parquet", quantize="int8")
    table = pq.read_table(path)
    dim = emb.sizes["feature"]
    assert str(table.schema.field("embedding").type) == f"fixed_size_list<element: int8>[{dim}]"
    assert table.schema.field("embedding_scale").type == "float"
    meta = read_footer(path)
    assert meta["embedding"]["dtype"] == "int8"
    assert meta["embedding"]["quantization"]["scale"] == "embedding_scale"

    restored = xclay.read_geoparquet(path)
    assert "embedding_scale" not in restored.column_names
    n = restored.num_rows
    vectors = np.asarray(restored["embedding"].combine_chunks().values).reshape(n, -1)
    embedded = emb["embedded"].values
    original = emb["embedding"].values[embedded]
    assert vectors.dtype == np.float32
    assert _cosine(vectors, original).min() > 0.999
    float_rows = pq.read_table(xclay.to_geoparquet(emb, tmp_path / "f.parquet"))
    assert restored["id"].to_pylist() == float_rows["id"].to_pylist()

    subset = xclay.read_geoparquet(path, columns=["id", "embedding"], filters=[("row_off", "=", 0)])
    assert subset.column_names == ["id", "embedding"] and 0 < subset.num_rows < n
    gdf = xclay.read_geoparquet(path, geodataframe=True)
    assert isinstance(gdf, gpd.GeoDataFrame) and gdf.crs.to_epsg() == 4326
    np.testing.assert_array_equal(np.stack(gdf["embedding"].to_numpy()), vectors)
    # SQL engines see int8 lists and the scale, and can rebuild a vector element.
    con = duckdb.connect()
    row = con.execute(
        f"SELECT embedding[1] * embedding_scale FROM read_parquet('{path}') ORDER BY id LIMIT 1"
    ).fetchone()
    first = sorted(zip(restored["id"].to_pylist(), vectors[:, 0], strict=True))[0][1]
    assert row is not None and row[0] == pytest.approx(first, rel=1e-6)


def test_bad_quantize_is_refused(tmp_path: Path, emb: xr.Dataset) -> None:
    with pytest.raises(DatacubeError, match=r"quantize must be None .* or one of int8"):
        xclay.to_zarr(emb, tmp_path / "x.zarr", quantize="int4")
    with pytest.raises(DatacubeError, match="quantize must be"):
        xclay.to_geoparquet(emb, tmp_path / "x.parquet", quantize="fp16")
    assert not list(tmp_path.iterdir())
