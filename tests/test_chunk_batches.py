"""Chunk-batch assembly (the kvikio engine's hot path), run on CPU tensors with host reads:
the same chips, pixels, validity and quality as the per-chip path, in the same order."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import xclay
from xclay.batching import ArrayWindowReader, BatchPlan, Block, iter_batches, to_chip_batch
from xclay.chips import ChipGrid, ChipGridSpec
from xclay.chunk_batches import iter_chunk_batches, open_chunk_source
from xclay.datacube import datacube_geobox
from xclay.quality import ChipQuality, QualityFilter

from .helpers import random_cube

CPU = torch.device("cpu")


def _cube_with_quality(shape=(2, 3, 100, 90), seed: int = 3) -> xr.Dataset:
    """Random pixels with nodata holes and a quality layer of every class; the raster is
    not a multiple of the chip size, so padded edge chips exist."""
    cube = random_cube(shape, seed=seed)
    rng = np.random.default_rng(seed)
    values = cube["pixels"].values
    values[0, :, :40, :40] = 0  # a mostly-nodata corner
    values[-1, -1, rng.integers(0, shape[2], 300), rng.integers(0, shape[3], 300)] = 0
    classes = rng.choice([0, 1, 2, 3, 4, 5, 6, 7], size=shape[2:], p=[0.5] + [1 / 14] * 7)
    classes[60:, 60:] = 3  # a cloudy block
    q = xr.DataArray(classes.astype(np.uint8), dims=("y", "x"))
    return xclay.as_datacube(cube, quality=q)


def _plan(cube: xr.Dataset, quality: QualityFilter, *, batch: int = 5) -> BatchPlan:
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=32, edges="pad"))
    return BatchPlan(grid, Block.whole(cube.sizes["time"], grid), batch, quality)


def _per_chip(batches) -> dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]]:
    out = {}
    order = []
    for b in batches:
        pixels = np.asarray(b.pixels[: len(b)]).copy()
        valid = np.asarray(b.valid[: len(b)]).copy()
        for k, key in enumerate(map(tuple, b.index.tolist())):
            out[key] = (pixels[k], valid[k])
            order.append(key)
    return out, order


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("shard", [None, 2])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_chunk_batches_equal_the_per_chip_path(
    tmp_path: Path, compression: str, shard: int | None, prefetch: int
) -> None:
    cube = _cube_with_quality()
    path = xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=32, compression=compression, shard_chips=shard
    )
    opened = xclay.open_datacube(path)
    filt = QualityFilter(max_nodata=0.5, max_cloud=0.6)
    plan = _plan(cube, filt)

    expected_quality = ChipQuality.empty(plan.block.shape, with_classes=True)
    reference = iter_batches(ArrayWindowReader.of(cube), plan, expected_quality, prefetch=0)
    expected, expected_order = _per_chip(reference)

    source = open_chunk_source(opened, 32, CPU, reads="host")
    assert source is not None
    quality = ChipQuality.empty(plan.block.shape, with_classes=True)
    got, order = _per_chip(iter_chunk_batches(source, plan, quality, prefetch=prefetch))
    source.close()

    assert 0 < len(order) < plan.total_chips  # the filter dropped some chips, kept others
    assert order == expected_order
    for key, (pixels, valid) in expected.items():
        np.testing.assert_array_equal(got[key][1], valid, err_msg=str(key))
        # Pixels must agree wherever they are valid (padding is masked out either way).
        np.testing.assert_array_equal(got[key][0][:, valid], pixels[:, valid], err_msg=str(key))
    np.testing.assert_allclose(quality.nodata_fraction, expected_quality.nodata_fraction)
    assert quality.class_fraction is not None and expected_quality.class_fraction is not None
    np.testing.assert_allclose(quality.class_fraction, expected_quality.class_fraction)


def test_batches_hold_the_accepted_chips_of_batch_size_scanned(tmp_path: Path) -> None:
    cube = _cube_with_quality((1, 2, 96, 96))
    opened = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    plan = _plan(cube, QualityFilter(max_nodata=0.2), batch=4)
    source = open_chunk_source(opened, 32, CPU, reads="host")
    assert source is not None
    quality = ChipQuality.empty(plan.block.shape, with_classes=True)
    batches = list(iter_chunk_batches(source, plan, quality, prefetch=0))
    assert [b.scanned for b in batches] == [4, 4, 1]
    assert sum(len(b) for b in batches) == int((quality.nodata_fraction <= 0.2).sum())
    assert all(len(b) <= b.scanned for b in batches)


def test_device_batches_go_to_torch_as_they_are(tmp_path: Path) -> None:
    cube = random_cube((1, 2, 64, 64))
    opened = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    plan = _plan(cube, QualityFilter(max_nodata=1.0), batch=4)
    source = open_chunk_source(opened, 32, CPU, reads="host")
    assert source is not None
    quality = ChipQuality.empty(plan.block.shape, with_classes=False)
    batch = next(iter_chunk_batches(source, plan, quality, prefetch=0))
    lon, lat = plan.grid.centres_lonlat()
    chip = to_chip_batch(batch, np.stack([lon, lat], -1), cube["time"].values, CPU)
    assert chip.pixels.data_ptr() == batch.pixels.data_ptr()
    assert chip.pixels.dtype == torch.uint16 and tuple(chip.pixels.shape) == (4, 2, 32, 32)


def test_layouts_without_one_chip_per_chunk_stay_on_the_per_chip_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cube = random_cube((1, 2, 128, 128))
    opened = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    with caplog.at_level(logging.WARNING, logger="xclay.chunk_batches"):
        assert open_chunk_source(opened, 64, CPU, reads="host") is None
    assert "chunks of (32, 32) px for chips of 64 px" in caplog.text
    # A selection is no longer the store: read through xarray.
    assert open_chunk_source(opened.isel(x=slice(0, 96)), 32, CPU, reads="host") is None
    # In-memory cubes have no chunks to read.
    assert open_chunk_source(cube, 32, CPU, reads="host") is None
