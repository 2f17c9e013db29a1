"""Linear probes: cross-validated ridge, chip targets from rasters, and the Olinda elevation check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.errors import DatacubeError
from xclay.explore.probe import chip_blocks, chip_means, ridge_cv

from .helpers import OLINDA_BANDS, OLINDA_DEM, OLINDA_WAVELENGTHS, random_cube, raster


def test_ridge_recovers_a_linear_signal_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40))
    y = x @ rng.normal(size=40) + 0.1 * rng.normal(size=300)
    fit = ridge_cv(x, y)
    assert fit.r2 > 0.98 and len(fit.fold_r2) == 5 and len(fit.alphas) == 5
    assert np.isfinite(fit.predicted).all()
    noise = ridge_cv(x, rng.normal(size=300))
    assert noise.r2 < 0.05


def test_groups_stop_neighbours_from_leaking() -> None:
    """Chips of one block share a value and a fingerprint: a random split memorises the block,
    a grouped split cannot."""
    rng = np.random.default_rng(1)
    blocks = np.repeat(np.arange(60), 5)
    fingerprint = rng.normal(size=(60, 100))[blocks] + 0.01 * rng.normal(size=(300, 100))
    y = rng.normal(size=60)[blocks]
    assert ridge_cv(fingerprint, y).r2 > 0.5
    assert ridge_cv(fingerprint, y, groups=blocks).r2 < 0.1


def test_rows_with_missing_values_are_left_out() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 5))
    y = x[:, 0] * 2
    y[:10] = np.nan
    fit = ridge_cv(x, y)
    assert np.isnan(fit.predicted[:10]).all() and np.isfinite(fit.predicted[10:]).all()
    with pytest.raises(DatacubeError, match="needs at least 5 chips"):
        ridge_cv(x[:4], y[10:14])


def test_chip_blocks_are_square_groups() -> None:
    rows, cols = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    labels = chip_blocks(rows.ravel(), cols.ravel(), 2).reshape(4, 6)
    assert len(np.unique(labels)) == 6
    assert labels[0, 0] == labels[1, 1] != labels[0, 2] == labels[1, 3]


def test_chip_means_of_a_raster_on_the_cube_grid() -> None:
    cube = random_cube((1, 3, 64, 96))
    model = xclay.models.get_model("rcf", num_filters=4, sample_chips=4)
    emb = xclay.embed(cube, model=model, chip_size=32, progress=False)
    ramp = xr.DataArray(
        np.arange(64 * 96, dtype=np.float64).reshape(64, 96),
        dims=("y", "x"),
        coords={"y": cube["y"], "x": cube["x"], "spatial_ref": cube["spatial_ref"]},
    )
    ramp.values[:32, :32] = -9  # nodata over chip (0, 0)
    means = chip_means(ramp, emb, nodata=-9)
    assert means.shape == (2, 3) and np.isnan(means[0, 0])
    expected = ramp.values[32:64, 64:96].mean()
    assert means[1, 2] == pytest.approx(expected)


def test_olinda_embeddings_predict_elevation_better_than_band_means(olinda_tif: Path) -> None:
    import rioxarray

    cube = xclay.as_datacube(
        raster(rioxarray.open_rasterio(olinda_tif)),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    model = xclay.models.get_model("rcf", num_filters=256)
    emb = xclay.embed(cube, model=model, chip_size=16, progress=False)
    elevation = chip_means(raster(rioxarray.open_rasterio(OLINDA_DEM)), emb, nodata=-1)
    rows, cols = np.nonzero(emb["embedded"].values[0] & np.isfinite(elevation))
    assert rows.size > 400 and np.nanmin(elevation) >= 0 and np.nanmax(elevation) < 100
    y, groups = elevation[rows, cols], chip_blocks(rows, cols, 2)
    pixels = cube["pixels"].values[0].astype(np.float64)
    r_off, c_off = emb["row_off"].values[rows], emb["col_off"].values[cols]
    means = np.stack(
        [
            pixels[:, r : r + 16, c : c + 16].mean(axis=(1, 2))
            for r, c in zip(r_off, c_off, strict=True)
        ]
    )
    learned = ridge_cv(emb["embedding"].values[0][rows, cols], y, groups=groups)
    baseline = ridge_cv(means, y, groups=groups)
    assert baseline.r2 > 0.3  # the pixels alone say something about elevation
    assert learned.r2 > baseline.r2 + 0.05
