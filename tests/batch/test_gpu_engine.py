"""The GPU batch path on a CUDA GPU: batches read into GPU memory with kvikIO equal host
reads bit for bit (uncompressed, zstd decoded by nvCOMP and on the host, Blosc, sharded),
through the same fill loop; embeddings from the GPU path equal CPU ones. Skipped without
CUDA (see conftest). Needs only the core and ``gpu`` dependencies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from tests.helpers import random_cube
from xclay.batch.batching import BatchPlan, Block, iter_batches
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.batch.readers import ChunkSource, store_layouts
from xclay.datacube import Compression, datacube_geobox
from xclay.datacube.gpuchunks import Decode
from xclay.protocols import BatchSource
from xclay.quality import ChipQuality, QualityFilter

pytestmark = [
    pytest.mark.gpu,
    # Machines without GPUDirect Storage read through bounce buffers: said, not an error.
    pytest.mark.filterwarnings(
        "ignore:GPUDirect Storage is not in use:xclay.errors.DataPathWarning"
    ),
]


def _cube() -> xr.Dataset:
    cube = random_cube((2, 4, 160, 150), seed=11)
    cube["pixels"].values[0, :, :50, :50] = 0
    rng = np.random.default_rng(11)
    classes = rng.integers(0, 8, size=(160, 150)).astype(np.uint8)
    return xclay.as_datacube(cube, quality=xr.DataArray(classes, dims=("y", "x")))


def _batches(source: BatchSource, plan: BatchPlan, **kw: Any) -> tuple[list, ChipQuality]:
    quality = ChipQuality.empty(plan.block.shape, with_classes=True)
    out = []
    for b in iter_batches(source, plan, quality, **kw):
        pixels = b.pixels.get() if hasattr(b.pixels, "get") else np.asarray(b.pixels)
        valid = b.valid.get() if hasattr(b.valid, "get") else np.asarray(b.valid)
        out.append((pixels.copy(), valid.copy(), b.index.copy(), b.scanned))
    return out, quality


@pytest.mark.parametrize(
    ("compression", "decode"),
    [("none", "auto"), ("zstd", "nvcomp"), ("zstd", "host"), ("lz4", "auto")],
)
@pytest.mark.parametrize("shard", [None, 2])
def test_gpu_batches_equal_host_batches_bit_for_bit(
    tmp_path: Path, compression: Compression, decode: Decode, shard: int | None
) -> None:
    import cupy

    from xclay.datacube.gpuchunks import KvikioChunkSource
    from xclay.devices import ThreadBudget

    cube = _cube()
    path = xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=32, compression=compression, shard_chips=shard
    )
    opened = xclay.open_datacube(path)
    layouts = store_layouts(opened)
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=32, edges="pad"))
    plan = BatchPlan(grid, Block.whole(2, grid), 7, QualityFilter(max_nodata=0.5, max_cloud=0.9))
    host = ChunkSource(*layouts, nodata=0, threads=2)
    expected, expected_q = _batches(host, plan, prefetch=0)
    import torch

    budget = ThreadBudget.for_device(torch.device("cuda"))
    gpu = KvikioChunkSource(
        *layouts, chip_size=32, nodata=0, threads=budget, host=host, decode=decode
    )
    assert gpu.xp is cupy
    if compression == "lz4":  # Blosc: nvCOMP does not decode it; said so
        assert any("decoded on the host" in f for f in gpu.fallbacks)
    got, got_q = _batches(gpu, plan, prefetch=2, cuda_events=True)
    gpu.close()
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(got_q.nodata_fraction, expected_q.nodata_fraction)
    np.testing.assert_array_equal(got_q.class_fraction, expected_q.class_fraction)


def test_kvikio_engine_gives_cupy_arrays_equal_to_the_store(tmp_path: Path) -> None:
    import cupy

    cube = _cube()
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32, compression="zstd")
    opened = xclay.open_datacube(path, engine="kvikio")
    window = opened["pixels"].isel(time=1, y=slice(10, 70), x=slice(32, 96)).data
    assert isinstance(window, cupy.ndarray)
    np.testing.assert_array_equal(window.get(), cube["pixels"].values[1, :, 10:70, 32:96])


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_gpu_path_embeddings_equal_cpu(tmp_path: Path, compression: Compression) -> None:
    cube = _cube()
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32, compression=compression)

    def run(engine: str, device: str) -> xr.Dataset:
        model = xclay.models.get_model("rcf", num_filters=16, sample_chips=6)
        return xclay.open_datacube(path).clay.embed(
            model=model, chip_size=32, device=device, engine=engine, precision="fp32",
            batch_size=5, progress=False,
        )  # fmt: skip

    cpu, gpu = run("zarr", "cpu"), run("auto", "cuda")
    assert gpu.attrs["data_path"]["engine"] == "kvikio"
    assert gpu.attrs["data_path"]["reader"].startswith("kvikIO")
    np.testing.assert_array_equal(gpu["embedded"].values, cpu["embedded"].values)
    np.testing.assert_allclose(
        gpu["embedding"].values, cpu["embedding"].values, rtol=1e-3, atol=1e-4
    )
