"""The GPU batch path's hand-overs between CUDA streams, run on the CPU.

The GPU reader (:class:`~xclay.datacube.gpuchunks.KvikioChunkSource`) and the fill loop run here
over real datacube stores with stand-ins for CuPy, kvikIO and nvCOMP
(:mod:`tests.cuda_standins`) in which work queued on a stream runs only once something
waits for it. Each test reads the same chips as the host reader and must get the same
bytes: a hand-over without its wait (a pinned buffer refilled under a queued copy, a batch
handed to the consumer's stream while its compaction is still queued) gives other bytes,
and a read that hands nVCOMP the null stream fails as nvCOMP 6 does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from tests import cuda_standins
from tests.helpers import random_cube
from xclay.batch.batching import BatchPlan, Block, iter_batches
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.batch.readers import ChunkSource, store_layouts
from xclay.datacube import Compression, datacube_geobox
from xclay.datacube.gpuchunks import Decode, KvikioChunkSource
from xclay.devices import ThreadBudget
from xclay.protocols import BatchSource
from xclay.quality import ChipQuality, QualityFilter

CHIP = 32
THREADS = ThreadBudget(cores=2, torch=1, decode=1, io=2)


def _cube() -> xr.Dataset:
    """2 times of 5 x 5 chips (the last column padded), with quality; chips that are all
    nodata are spread over the block, so reads keep some chips and drop others before
    them, and the block's last read moves kept chips down its slot (compaction)."""
    cube = random_cube((2, 4, 5 * CHIP, 4 * CHIP + 22), seed=11)
    values = cube["pixels"].values
    for t, row, col in [(0, 0, 0), (0, 1, 1), (0, 2, 3), (1, 0, 2), (1, 3, 0), (1, 4, 2)]:
        values[t, :, row * CHIP : (row + 1) * CHIP, col * CHIP : (col + 1) * CHIP] = 0
    classes = np.random.default_rng(11).integers(0, 8, size=values.shape[-2:]).astype(np.uint8)
    return xclay.as_datacube(cube, quality=xr.DataArray(classes, dims=("y", "x")))


def _store(tmp_path: Path, compression: Compression) -> tuple[xr.Dataset, Path]:
    cube = _cube()
    return cube, xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=CHIP, compression=compression
    )


def _sources(path: Path, decode: Decode = "auto") -> tuple[ChunkSource, KvikioChunkSource]:
    layouts = store_layouts(xclay.open_datacube(path))
    host = ChunkSource(*layouts, nodata=0)
    return host, KvikioChunkSource(
        *layouts, chip_size=CHIP, nodata=0, threads=THREADS, host=host, decode=decode
    )


def _batches(source: BatchSource, plan: BatchPlan, prefetch: int) -> list[tuple[Any, ...]]:
    """Every batch as the consumer sees it: read on the consumer's own stream."""
    quality = ChipQuality.empty(plan.block.shape, with_classes=True)
    out = []
    for b in iter_batches(source, plan, quality, prefetch=prefetch):
        pixels = b.pixels.get() if hasattr(b.pixels, "get") else np.array(b.pixels)
        valid = b.valid.get() if hasattr(b.valid, "get") else np.array(b.valid)
        out.append((pixels, valid, b.index.copy(), b.scanned))
    return out


def _plan(cube: xr.Dataset) -> BatchPlan:
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=CHIP, edges="pad"))
    return BatchPlan(grid, Block.whole(2, grid), 7, QualityFilter(max_nodata=0.5, max_cloud=1.0))


def _assert_same(got: list[tuple[Any, ...]], expected: list[tuple[Any, ...]]) -> None:
    assert len(got) == len(expected)
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"batch {i}")


def test_checked_chunks_reach_the_gpu_before_the_pinned_buffer_is_refilled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Uncompressed checksummed chunks go through pinned host memory, checked there, then
    # copied up asynchronously; the quality chunks of the same read are read into the same
    # pinned buffer right after.
    cuda = cuda_standins.install(monkeypatch)
    _, path = _store(tmp_path, "none")
    host, gpu = _sources(path)
    windows = np.array([(1, r * CHIP, c * CHIP) for r in range(5) for c in range(5)])
    expected = np.empty((len(windows), 4, CHIP, CHIP), np.uint16)
    expected_classes = np.empty((len(windows), CHIP, CHIP), np.uint8)
    host.read(windows, expected, expected_classes)
    pixels = cuda.cupy.empty(expected.shape, np.uint16)
    classes = cuda.cupy.empty(expected_classes.shape, np.uint8)
    with gpu.reading_stream():
        gpu.read(windows, pixels, classes)
    np.testing.assert_array_equal(pixels.get(), expected)
    np.testing.assert_array_equal(classes.get(), expected_classes)
    assert cuda_standins.pending() == 0  # read() returns with its work done


def test_batches_read_without_a_background_thread_give_nvcomp_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # prefetch=0 reads in the consumer's thread, on its current stream: CuPy's null stream
    # unless it chose another. nvCOMP refuses stream 0.
    cuda_standins.install(monkeypatch)
    cube, path = _store(tmp_path, "zstd")
    host, gpu = _sources(path, decode="nvcomp")
    plan = _plan(cube)
    _assert_same(_batches(gpu, plan, prefetch=0), _batches(host, plan, prefetch=0))


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_batch_reaches_the_consumer_with_its_compaction_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: Compression
) -> None:
    # The background reader drops filtered chips by moving kept ones down the slot, on its
    # side stream; the consumer reads the batch on its own stream. The block's last batch
    # is the one a later read of the reader cannot happen to flush.
    cuda_standins.install(monkeypatch)
    cube, path = _store(tmp_path, compression)
    host, gpu = _sources(path)
    plan = _plan(cube)
    _assert_same(_batches(gpu, plan, prefetch=2), _batches(host, plan, prefetch=0))
