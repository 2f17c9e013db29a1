"""Embeddings every GIS opens: the embeddings Zarr with xarray, rioxarray and odc-geo
as they come (no set-up, no warning), rasters written from it with rioxarray, and the
Cloud-Optimized GeoTIFF export read back with rasterio."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.datacube import datacube_geobox
from xclay.protocols import Encoder
from xclay.run import RunSpec, run

from .helpers import random_cube

CHIP = 16


def _model() -> Encoder:
    return xclay.models.get_model("rcf", num_filters=8, sample_chips=4)


@pytest.fixture(scope="module")
def utm_cube() -> xr.Dataset:
    cube = random_cube((2, 3, 100, 90), crs="EPSG:32720", origin=(300000.0, 9600000.0), seed=5)
    cube["pixels"].values[0, :, :20, :30] = 0  # some chips not embedded
    return cube


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, utm_cube: xr.Dataset) -> Path:
    """An embeddings Zarr from to_zarr (the Python API's writer)."""
    emb = xclay.embed(utm_cube, model=_model(), chip_size=CHIP, device="cpu", progress=False)
    return xclay.to_zarr(emb, tmp_path_factory.mktemp("api") / "emb.zarr")


@pytest.fixture(scope="module")
def from_run(tmp_path_factory: pytest.TempPathFactory, utm_cube: xr.Dataset) -> Path:
    """An embeddings Zarr written region by region by a run (4 x 4 chip regions)."""
    folder = tmp_path_factory.mktemp("run")
    cube = xclay.write_datacube(utm_cube, folder / "cube.zarr", chip_size=CHIP)
    spec = RunSpec.from_dict(
        {
            "input": {"datacube": str(cube)},
            "grid": {"chip_size": CHIP},
            "model": {"name": "rcf", "options": {"num_filters": 8, "sample_chips": 4}},
            "compute": {"region_chips": 4},
            "outputs": {"dir": str(folder / "out")},
        }
    )
    run(spec, progress=False)
    return folder / "out" / "embeddings.zarr"


def _chip_geobox(cube: xr.Dataset) -> object:
    return ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=CHIP)).geobox()


@pytest.mark.parametrize("store", ["written", "from_run"])
def test_xarray_opens_the_embeddings_without_a_warning(
    store: str, request: pytest.FixtureRequest
) -> None:
    path: Path = request.getfixturevalue(store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the consolidated-metadata warning included
        ds = xr.open_zarr(path)
    assert ds.attrs["xclay_complete"] is True
    np.testing.assert_array_equal(
        ds["embedding"].values, xclay.open_embeddings(path)["embedding"].values
    )


@pytest.mark.parametrize("store", ["written", "from_run"])
def test_rioxarray_and_odc_geo_place_the_chips_without_set_up(
    store: str, request: pytest.FixtureRequest, utm_cube: xr.Dataset, tmp_path: Path
) -> None:
    import odc.geo.xr  # noqa: F401  (registers .odc)
    import rasterio

    pytest.importorskip("rioxarray", reason="needs xclay[io]")
    path: Path = request.getfixturevalue(store)
    ds = xr.open_zarr(path)
    cells = _chip_geobox(utm_cube)
    # The chip grid as a raster: one cell per chip, 16 px x 10 m = 160 m, from the cube's corner.
    assert (ds.rio.x_dim, ds.rio.y_dim) == ("chip_x", "chip_y")
    assert ds.rio.crs.to_epsg() == 32720
    assert tuple(ds.rio.transform())[:6] == (160.0, 0.0, 300000.0, 0.0, -160.0, 9600000.0)
    assert ds.odc.geobox == cells
    # Rasters from it: a per-chip score, and the vectors with the features as bands.
    first = ds.isel(time=0)
    first["nodata_fraction"].rio.to_raster(tmp_path / "nodata.tif")
    first["embedding"].transpose("feature", "chip_y", "chip_x").rio.to_raster(tmp_path / "e.tif")
    for name in ("nodata.tif", "e.tif"):
        with rasterio.open(tmp_path / name) as src:
            assert src.crs.to_epsg() == 32720
            assert tuple(src.transform)[:6] == tuple(cells.affine)[:6]  # type: ignore[attr-defined]
            assert (src.height, src.width) == (ds.sizes["chip_y"], ds.sizes["chip_x"])
    with rasterio.open(tmp_path / "e.tif") as src:
        np.testing.assert_array_equal(src.read(5), first["embedding"].values[..., 4])


def test_geographic_grids_get_degree_axes(tmp_path: Path) -> None:
    pytest.importorskip("rioxarray", reason="needs xclay[io]")
    cube = random_cube((1, 3, 64, 64), crs="EPSG:4326", origin=(-35.0, -8.0), res=0.0001)
    emb = xclay.embed(cube, model=_model(), chip_size=CHIP, device="cpu", progress=False)
    ds = xr.open_zarr(xclay.to_zarr(emb, tmp_path / "e.zarr"))
    assert ds["chip_x"].attrs["standard_name"] == "longitude"
    assert ds["chip_x"].attrs["units"] == "degrees_east"
    assert ds["chip_y"].attrs["units"] == "degrees_north"
    assert ds.rio.crs.to_epsg() == 4326
    assert ds.rio.resolution() == pytest.approx((0.0016, -0.0016))


# --------------------------------------------------------------------------- COG


def _cog_tags(path: Path) -> dict[str, str]:
    import rasterio

    with rasterio.open(path) as src:
        return {**src.tags(), **{f"IS_{k}": v for k, v in src.tags(ns="IMAGE_STRUCTURE").items()}}


def test_cog_of_every_feature_places_each_chip_and_keeps_its_vector(
    written: Path, utm_cube: xr.Dataset, tmp_path: Path
) -> None:
    import json

    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    from xclay.outputs.cog import to_cog

    emb = xclay.open_embeddings(written)
    files = to_cog(written, tmp_path / "emb.tif")
    days = [str(np.datetime64(t, "D")) for t in emb["time"].values]
    assert files == [tmp_path / f"emb_{day}.tif" for day in days]  # one file per time step
    cells = _chip_geobox(utm_cube)
    for t, path in enumerate(files):
        with rasterio.open(path) as src:
            assert src.count == emb.sizes["feature"] and src.dtypes[0] == "float32"
            assert src.crs.to_epsg() == 32720
            assert tuple(src.transform)[:6] == tuple(cells.affine)[:6]  # type: ignore[attr-defined]
            assert src.descriptions[3] == "feature 3" and np.isnan(src.nodata)
            got = np.moveaxis(src.read(), 0, -1)
        np.testing.assert_array_equal(got, emb["embedding"].values[t])  # NaN where not embedded
        assert np.isnan(got[~emb["embedded"].values[t]]).all()
        tags = _cog_tags(path)
        assert tags["IS_LAYOUT"] == "COG" and tags["IS_COMPRESSION"] == "DEFLATE"
        assert tags["XCLAY_TIME"] == days[t] and tags["XCLAY_VALUES"] == "features"
        card = json.loads(tags["XCLAY_MODEL_CARD"])
        assert card["name"] == "rcf" and card["dim"] == emb.sizes["feature"]
        # Large params (rcf's filters at full size) stay in the embeddings Zarr; the card
        # keeps their hash.
        full = emb.attrs["model"]["params"]
        big = len(json.dumps(full["filters"])) > 4096
        assert ("filters" in card.get("omitted_params", [])) == big
        assert ("filters" in card["params"]) != big
        assert card["params"]["filters_sha256"] == full["filters_sha256"]


def test_cog_int8_has_a_gdal_scale_per_band(written: Path, tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    from xclay.outputs.cog import MISSING_INT8, to_cog

    emb = xclay.open_embeddings(written)
    (path,) = to_cog(written, tmp_path / "q.tif", dtype="int8", time=1)
    with rasterio.open(path) as src:
        assert src.dtypes[0] == "int8" and src.nodata == MISSING_INT8
        raw = np.moveaxis(src.read(), 0, -1).astype(np.float32)
        scales = np.asarray(src.scales, dtype=np.float32)
    want = emb["embedding"].values[1]
    embedded = emb["embedded"].values[1]
    assert (raw[~embedded] == MISSING_INT8).all()
    np.testing.assert_allclose(scales, np.abs(want[embedded]).max(axis=0) / 127, rtol=1e-6)
    err = np.abs(raw[embedded] * scales - want[embedded])
    assert (err <= scales / 2 + 1e-6).all()


def test_cog_pca_equals_the_principal_components_of_the_vectors(
    written: Path, tmp_path: Path
) -> None:
    import json

    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    from xclay.outputs.cog import to_cog

    emb = xclay.open_embeddings(written)
    (path,) = to_cog(written, tmp_path / "pca.tif", pca=3, time=0)
    vectors = emb["embedding"].values[0]
    embedded = emb["embedded"].values[0]
    x = vectors[embedded].astype(np.float64)
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    want = centred @ vt[:3].T
    with rasterio.open(path) as src:
        got = np.moveaxis(src.read(), 0, -1)[embedded]
        names = src.descriptions
    for k in range(3):  # each component up to its sign
        sign = np.sign(np.dot(got[:, k], want[:, k]))
        np.testing.assert_allclose(sign * got[:, k], want[:, k], rtol=1e-3, atol=1e-4)
    share = s[0] ** 2 / (s**2).sum()
    assert names[0] == f"PC1 ({100 * share:.1f} % of variance)"
    pca = json.loads(_cog_tags(path)["XCLAY_PCA"])
    assert len(pca["components"]) == 3 and len(pca["mean"]) == emb.sizes["feature"]


def test_cog_tiles_and_overviews(tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    from xclay.outputs.cog import to_cog

    cube = random_cube((1, 3, 400, 320), crs="EPSG:32720", origin=(300000.0, 9600000.0))
    emb = xclay.embed(cube, model=_model(), chip_size=8, device="cpu", progress=False)
    (path,) = to_cog(emb, tmp_path / "big.tif", pca=3, blocksize=16)
    with rasterio.open(path) as src:
        assert (src.height, src.width) == (50, 40)
        assert src.block_shapes[0] == (16, 16)
        assert src.overviews(1) == [2, 4]  # down to one tile
        assert src.read(1, out_shape=(25, 20)).shape == (25, 20)


def test_cog_cells_of_overlapping_chips_are_the_stride(
    utm_cube: xr.Dataset, tmp_path: Path
) -> None:
    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    from xclay.outputs.cog import to_cog

    emb = xclay.embed(
        utm_cube,
        model=_model(),
        chip_size=16,
        stride=8,
        device="cpu",
        progress=False,
    )
    (path,) = to_cog(emb, tmp_path / "s.tif", time=0, pca=2)
    with rasterio.open(path) as src:
        assert tuple(src.transform)[:6] == (80.0, 0.0, 300000.0, 0.0, -80.0, 9600000.0)
        assert (src.height, src.width) == (emb.sizes["chip_y"], emb.sizes["chip_x"])


def test_cog_from_the_command_line(written: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    pytest.importorskip("rasterio", reason="needs xclay[io]")

    def xclay_cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "xclay.cli", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    out = tmp_path / "cli.tif"
    ok = xclay_cli(
        "export",
        str(written),
        "--format",
        "cog",
        "--pca",
        "3",
        "--dtype",
        "int8",
        "--out",
        str(out),
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count("  cog ") == 2
    wrong = xclay_cli("export", str(written), "--pca", "3")
    assert wrong.returncode == 2 and "--format cog" in wrong.stderr


def test_compact_model_card_leaves_out_only_large_params() -> None:
    from xclay.model_card import ModelCard

    card = ModelCard(
        name="rcf",
        version="1",
        family="random-convolutional-features",
        description="",
        dim=4,
        output="pooled",
        params={"filters": np.ones(2000).tolist(), "filters_sha256": "ab" * 32, "seed": 1},
    )
    compact = card.compact()
    assert compact["omitted_params"] == ["filters"]
    assert compact["params"] == {"filters_sha256": "ab" * 32, "seed": 1}
    assert card.to_dict()["params"]["filters"]  # the card itself is unchanged
