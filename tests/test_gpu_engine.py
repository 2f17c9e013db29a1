"""The kvikio engine on a CUDA GPU: chunks read into GPU memory equal host reads bit for bit
(uncompressed, zstd decoded by nvCOMP and on the host, sharded), and embeddings from the GPU
path equal CPU ones. Skipped without CUDA (see conftest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.batching import ArrayWindowReader, BatchPlan, Block, iter_batches
from xclay.chips import ChipGrid, ChipGridSpec
from xclay.chunk_batches import iter_chunk_batches, open_chunk_source
from xclay.datacube import datacube_geobox
from xclay.quality import ChipQuality, QualityFilter

from .helpers import random_cube

pytestmark = pytest.mark.gpu


def _cube() -> xr.Dataset:
    cube = random_cube((2, 4, 160, 150), seed=11)
    cube["pixels"].values[0, :, :50, :50] = 0
    rng = np.random.default_rng(11)
    classes = rng.integers(0, 8, size=(160, 150)).astype(np.uint8)
    return xclay.as_datacube(cube, quality=xr.DataArray(classes, dims=("y", "x")))


@pytest.mark.parametrize(
    ("compression", "decode"),
    [("none", "auto"), ("zstd", "nvcomp"), ("zstd", "host"), ("lz4", "auto")],
)
@pytest.mark.parametrize("shard", [None, 2])
def test_gpu_reads_equal_host_reads_bit_for_bit(
    tmp_path: Path, compression: str, decode: str, shard: int | None
) -> None:
    import torch

    cube = _cube()
    path = xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=32, compression=compression, shard_chips=shard
    )
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=32, edges="pad"))
    plan = BatchPlan(grid, Block.whole(2, grid), 7, QualityFilter(max_nodata=0.5))
    host_q = ChipQuality.empty(plan.block.shape, with_classes=True)
    expected = {}
    for b in iter_batches(ArrayWindowReader.of(cube), plan, host_q, prefetch=0):
        for k, key in enumerate(map(tuple, b.index.tolist())):
            expected[key] = (b.pixels[k].copy(), b.valid[k].copy())
    opened = xclay.open_datacube(path, engine="kvikio")
    source = open_chunk_source(opened, 32, torch.device("cuda"), reads="kvikio", decode=decode)
    assert source is not None
    gpu_q = ChipQuality.empty(plan.block.shape, with_classes=True)
    seen = []
    for b in iter_chunk_batches(source, plan, gpu_q, prefetch=2):
        assert b.pixels.is_cuda
        pixels, valid = b.pixels.cpu().numpy(), b.valid.cpu().numpy()
        for k, key in enumerate(map(tuple, b.index.tolist())):
            seen.append(key)
            np.testing.assert_array_equal(valid[k], expected[key][1])
            np.testing.assert_array_equal(pixels[k][:, valid[k]], expected[key][0][:, valid[k]])
    assert seen == list(expected)
    np.testing.assert_array_equal(gpu_q.nodata_fraction, host_q.nodata_fraction)
    np.testing.assert_allclose(gpu_q.class_fraction, host_q.class_fraction)


def test_kvikio_engine_gives_cupy_arrays_equal_to_the_store(tmp_path: Path) -> None:
    import cupy

    cube = _cube()
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32, compression="zstd")
    opened = xclay.open_datacube(path, engine="kvikio")
    window = opened["pixels"].isel(time=1, y=slice(10, 70), x=slice(32, 96)).data
    assert isinstance(window, cupy.ndarray)
    np.testing.assert_array_equal(window.get(), cube["pixels"].values[1, :, 10:70, 32:96])
    assert (
        xclay.open_datacube(path, engine="auto")["pixels"].encoding["xclay_store"]["engine"]
        == "kvikio"
    )


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_gpu_path_embeddings_equal_cpu(tmp_path: Path, compression: str) -> None:
    cube = _cube()
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32, compression=compression)

    def run(engine: str, device: str) -> xr.Dataset:
        model = xclay.models.get_model("rcf", num_filters=16, sample_chips=6)
        return xclay.open_datacube(path, engine=engine).clay.embed(
            model=model, chip_size=32, device=device, precision="fp32", batch_size=5
        )

    cpu, gpu = run("zarr", "cpu"), run("kvikio", "cuda")
    np.testing.assert_array_equal(gpu["embedded"].values, cpu["embedded"].values)
    np.testing.assert_allclose(
        gpu["embedding"].values, cpu["embedding"].values, rtol=1e-3, atol=1e-4
    )
