"""A model over a whole embeddings store, block by block, and the map's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from tests.apply.conftest import points_of, synthetic
from tests.helpers import stac_validator, validate_stac
from xclay.apply import CheckingWarning, fit, load_model, predict, write_map
from xclay.errors import ModelError
from xclay.outputs.export import chip_grid_transform

pytest.importorskip("geopandas", reason="needs xclay[explore]")
rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")


@pytest.fixture(scope="module")
def store(demo_emb: xr.Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic embeddings (vectors encoding 4 x 4-chip patches of 3 classes), two
    chips not embedded, in a Zarr store."""
    patches = np.random.default_rng(0).integers(0, 3, (4, 4))
    emb = synthetic(demo_emb, np.repeat(np.repeat(patches, 4, axis=0), 4, axis=1))
    vectors = emb["embedding"].values.copy()
    vectors[0, 0, 0] = np.nan
    vectors[0, 15, 15] = np.nan
    emb["embedding"] = (emb["embedding"].dims, vectors)
    emb["embedded"] = (emb["embedded"].dims, np.isfinite(vectors).all(axis=-1))
    return Path(xclay.to_zarr(emb, tmp_path_factory.mktemp("predict") / "emb.zarr"))


@pytest.fixture(scope="module")
def model_file(
    store: Path, demo_cube: xr.Dataset, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    emb = xclay.open_embeddings(store)
    rng = np.random.default_rng(2)
    rows, cols = rng.integers(0, 256, 120), rng.integers(0, 256, 120)
    vectors = emb["embedding"].values[0, rows // 16, cols // 16]
    labelled = np.isfinite(vectors).all(axis=1)
    # The class of a chip is the patch it is in: read it back from the synthetic recipe.
    patches = np.random.default_rng(0).integers(0, 3, (4, 4))
    names = np.array(["water", "forest", "town"])[patches[rows // 64, cols // 64]]
    frame = points_of(demo_cube, rows[labelled], cols[labelled], names[labelled])
    model = fit(emb, frame, column="landcover", params={"alpha": 0.01})
    return Path(model.save(tmp_path_factory.mktemp("model") / "model.json"))


def test_predict_reads_in_blocks_and_equals_the_model_on_every_vector(
    store: Path, model_file: Path
) -> None:
    model = load_model(model_file)
    whole = predict(store, model, device="cpu")
    emb = xclay.open_embeddings(store)
    vectors = emb["embedding"].values[0]
    want = model.predict_vectors(vectors.reshape(-1, vectors.shape[-1])).reshape(16, 16, -1)
    np.testing.assert_allclose(
        np.moveaxis(whole["probability"].values, 0, -1), want, rtol=1e-5, atol=1e-6
    )
    assert whole["class"].values[0, 0] == -1 and whole["class"].values[15, 15] == -1
    assert np.isnan(whole["probability"].values[:, 0, 0]).all()
    assert model.classes is not None
    assert list(whole["label"].values) == list(model.classes)
    # Blocks of one stored chunk row at a time (the store's chunks are the whole grid here:
    # a block is capped at one chunk row, so only the budget's floor is exercised).
    tiny = predict(emb, model_file, block_mb=1)
    xr.testing.assert_identical(tiny, whole)
    patches = np.random.default_rng(0).integers(0, 3, (4, 4))
    truth = np.array(["water", "forest", "town"])[np.repeat(np.repeat(patches, 4, 0), 4, 1)]
    called = np.asarray(model.classes)[np.maximum(whole["class"].values, 0)]
    assert (called == truth)[whole["class"].values >= 0].mean() > 0.95
    assert whole.attrs["map_model"]["scores"]["accuracy"] > 0.9


def test_predict_blocks_of_many_chunks(store: Path, model_file: Path, tmp_path: Path) -> None:
    emb = xclay.open_embeddings(store)
    rechunked = tmp_path / "small-chunks.zarr"
    copy = emb.copy()
    for name in copy.variables:
        copy[name].encoding = {}
    encoding = {"embedding": {"chunks": (1, 4, 4, emb.sizes["feature"])}}
    copy.to_zarr(rechunked, zarr_format=3, consolidated=False, encoding=encoding)
    small = xr.open_zarr(rechunked, chunks=None, zarr_format=3, consolidated=False)
    from xclay.apply.predict import _blocks

    per_chunk_row = 4 * 16 * emb.sizes["feature"] * 4
    blocks = list(_blocks(small, per_chunk_row))
    assert blocks[0] == (0, 4, 0, 16) and len(blocks) == 4
    assert next(iter(_blocks(small, per_chunk_row // 2))) == (0, 4, 0, 8)
    np.testing.assert_array_equal(
        predict(small, model_file, block_mb=1)["class"].values,
        predict(emb, model_file)["class"].values,
    )


def test_the_map_files(store: Path, model_file: Path, tmp_path: Path) -> None:
    emb = xclay.open_embeddings(store)
    prediction = emb.clay.predict(model_file)
    files = write_map(prediction, tmp_path / "map.tif", model=model_file)
    with rasterio.open(files.map) as src:
        assert src.crs.to_epsg() == 32720
        assert src.transform == chip_grid_transform(emb)
        assert src.dtypes == ("uint8",) and src.nodata == 255
        values = src.read(1)
        assert src.colormap(1)[0][:3] == (31, 119, 180)
        assert json.loads(src.tags()["XCLAY_MAP_MODEL"])["classes"] == ["forest", "town", "water"]
    np.testing.assert_array_equal(
        values, np.where(prediction["class"].values < 0, 255, prediction["class"].values)
    )
    with rasterio.open(files.probability) as src:
        assert src.count == 3 and src.descriptions[0] == "probability of forest"
        np.testing.assert_allclose(src.read(), prediction["probability"].values)
    assert Path(files.preview).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    item = json.loads(Path(files.stac).read_text())
    assert item["properties"]["xclay:scores"]["accuracy"] > 0.9
    assert item["assets"]["model"][
        "href"
    ] == "../" + model_file.parent.name + "/model.json" or item["assets"]["model"]["href"].endswith(
        "model.json"
    )
    assert [c["name"] for c in item["assets"]["map"]["classification:classes"][:3]] == [
        "forest",
        "town",
        "water",
    ]
    schemas = validate_stac(Path(files.stac), stac_validator())
    assert any("classification" in s for s in schemas)
    with pytest.raises(FileExistsError):
        write_map(prediction, tmp_path / "map.tif")


def test_predict_refuses_embeddings_of_another_encoder(
    demo_cube: xr.Dataset, model_file: Path
) -> None:
    other = xclay.embed(
        demo_cube,
        model=xclay.models.get_model("rcf", num_filters=16, sample_chips=8),
        chip_size=16,
        progress=False,
    )
    with pytest.raises(ModelError, match="fitted on embeddings of 'rcf' \\(64-d"):
        predict(other, model_file)


def test_a_value_map(store: Path, demo_cube: xr.Dataset, tmp_path: Path) -> None:
    emb = xclay.open_embeddings(store)
    rng = np.random.default_rng(5)
    rows, cols = rng.integers(16, 240, 150), rng.integers(16, 240, 150)
    frame = points_of(demo_cube, rows, cols, rows.astype(float))
    with pytest.warns(CheckingWarning, match="optimistic"):  # rows: alike across the scene
        model = fit(emb, frame, column="landcover", model="knn", params={"k": 5})
    files = write_map(predict(emb, model), tmp_path / "value.tif")
    assert files.probability is None
    with rasterio.open(files.map) as src:
        assert src.dtypes == ("float32",) and np.isnan(src.read(1)[0, 0])


def test_predict_from_object_storage(
    store: Path, model_file: Path, s3: Any, tmp_path: Path
) -> None:
    """A store and a model in a bucket: the blocks are fetched by ranged GETs and mapped
    as the local store is; the map's files go to the bucket too."""
    bucket = s3.bucket()
    emb = xclay.open_embeddings(store)
    url = xclay.to_zarr(emb, f"s3://{bucket}/emb.zarr")
    model = load_model(model_file)
    model.save(f"s3://{bucket}/model.json")
    from concurrent.futures import ThreadPoolExecutor

    from xclay.apply.predict import _chunk_reader

    with ThreadPoolExecutor(2) as pool:  # the chunks themselves are read, not through zarr
        opened = xclay.open_embeddings(url)
        read = _chunk_reader(xclay.storage.location(url), opened, 0, pool)
        assert read is not None
        np.testing.assert_array_equal(read((0, 16, 0, 16)), opened["embedding"].values[0])
    remote = predict(url, f"s3://{bucket}/model.json", block_mb=1)
    local = predict(store, model)
    xr.testing.assert_identical(remote, local)
    files = write_map(remote, f"s3://{bucket}/map.tif")
    assert str(files.map) == f"s3://{bucket}/map.tif"
    assert (xclay.storage.location(f"s3://{bucket}/map.json")).is_file()
