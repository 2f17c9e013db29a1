"""engine="kvikio" on a datacube in a bucket, on a CUDA GPU: chunks fetched by kvikIO's
``RemoteFile`` (libcurl, S3 requests signed by kvikIO itself) from the local S3 server of
tests/s3.py into GPU memory, then decoded as local ones, equal the host reader's batches
bit for bit; embedding such a cube reads it so. Skipped without CUDA (see conftest), and
without obstore or moto (the server; tests/s3.py imports it only when a test asks for it).
Needs only the core and ``gpu`` dependencies to be collected."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from tests.helpers import random_cube
from tests.s3 import S3Server
from xclay.batch.batching import BatchPlan, Block, iter_batches
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.batch.readers import ChunkSource, store_layouts
from xclay.datacube import Compression, datacube_geobox
from xclay.protocols import BatchSource
from xclay.quality import ChipQuality, QualityFilter

pytestmark = [pytest.mark.gpu]

CHIP = 32


def _cube() -> xr.Dataset:
    cube = random_cube((2, 4, 160, 150), seed=11)
    classes = np.random.default_rng(11).integers(0, 8, size=(160, 150)).astype(np.uint8)
    return xclay.as_datacube(cube, quality=xr.DataArray(classes, dims=("y", "x")))


def _batches(source: BatchSource, plan: BatchPlan) -> list[tuple[np.ndarray, ...]]:
    quality = ChipQuality.empty(plan.block.shape, with_classes=True)
    out: list[tuple[np.ndarray, ...]] = []
    for b in iter_batches(source, plan, quality, prefetch=2, cuda_events=source.xp is not np):
        pixels = b.pixels.get() if hasattr(b.pixels, "get") else np.asarray(b.pixels)
        valid = b.valid.get() if hasattr(b.valid, "get") else np.asarray(b.valid)
        out.append((pixels.copy(), valid.copy(), b.index.copy()))
    return out


def _remote_files() -> None:
    kvikio = pytest.importorskip("kvikio")
    if not kvikio.is_remote_file_available():
        pytest.skip("this kvikIO was built without remote files (libcurl)")


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("shard", [None, 2])
def test_kvikio_reads_a_cube_in_a_bucket_into_gpu_memory(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch, compression: Compression, shard: int | None
) -> None:
    import cupy
    import torch

    from xclay.datacube.gpuchunks import KvikioChunkSource
    from xclay.devices import ThreadBudget

    _remote_files()
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)  # xclay gives kvikIO the region
    cube = _cube()
    url = xclay.write_datacube(
        cube,
        f"s3://{s3.bucket()}/c.zarr",
        chip_size=CHIP,
        compression=compression,
        shard_chips=shard,
    )
    layouts = store_layouts(xclay.open_datacube(url))
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=CHIP, edges="pad"))
    plan = BatchPlan(grid, Block.whole(2, grid), 7, QualityFilter(max_nodata=0.5, max_cloud=0.9))
    host = ChunkSource(*layouts, nodata=0, threads=2)
    expected = _batches(host, plan)
    budget = ThreadBudget.for_device(torch.device("cuda"))
    gpu = KvikioChunkSource(*layouts, chip_size=CHIP, nodata=0, threads=budget, host=host)
    assert gpu.xp is cupy and not gpu.fallbacks
    got = _batches(gpu, plan)
    gpu.close()
    host.close()
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_embedding_a_cube_in_a_bucket_on_the_gpu_reads_it_with_kvikio(s3: S3Server) -> None:
    _remote_files()
    cube = _cube()
    url = xclay.write_datacube(cube, f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP)

    def embed(engine: str, device: str) -> Any:
        model = xclay.models.get_model("rcf", num_filters=16, sample_chips=6)
        return xclay.open_datacube(url).clay.embed(
            model=model, chip_size=CHIP, device=device, engine=engine, precision="fp32",
            batch_size=5, progress=False,
        )  # fmt: skip

    cpu, gpu = embed("zarr", "cpu"), embed("kvikio", "cuda")
    assert gpu.attrs["data_path"]["reader"].startswith("kvikIO")
    assert gpu.attrs["data_path"]["fallbacks"] == []
    np.testing.assert_array_equal(gpu["embedded"].values, cpu["embedded"].values)
    np.testing.assert_allclose(
        gpu["embedding"].values, cpu["embedding"].values, rtol=1e-3, atol=1e-4
    )
