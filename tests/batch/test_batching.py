"""The batch path: readers, validity, one fill loop, prefetch, buffer pools, hand-off."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import xclay
from tests.helpers import random_cube
from xclay.batch.batching import (
    BatchPlan,
    Block,
    chip_validity,
    chip_windows,
    class_fractions,
    iter_batches,
    make_sampler,
    to_chip_batch,
)
from xclay.batch.chips import ChipGrid, ChipGridSpec, Edges
from xclay.batch.engines import open_batch_source
from xclay.batch.readers import ChunkSource, WindowSource, store_layouts
from xclay.datacube import Compression, datacube_geobox
from xclay.devices import ThreadBudget
from xclay.masks import PixelClass
from xclay.protocols import BatchSource
from xclay.quality import ChipQuality, QualityFilter

CPU = torch.device("cpu")


def _plan(
    cube: xr.Dataset,
    size: int = 32,
    *,
    batch: int = 3,
    quality: QualityFilter | None = None,
    edges: str = "drop",
    block: Block | None = None,
) -> BatchPlan:
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=size, edges=edges))  # type: ignore[arg-type]
    return BatchPlan(
        grid=grid,
        block=block or Block.whole(cube.sizes["time"], grid),
        batch_size=batch,
        quality=quality or QualityFilter(max_nodata=0.5),
    )


def _collect(source: Any, plan: BatchPlan, prefetch: int = 0) -> tuple[list[Any], ChipQuality]:
    quality = ChipQuality.empty(plan.block.shape, with_classes=source.has_quality)
    out = []
    for b in iter_batches(source, plan, quality, prefetch=prefetch):
        out.append(
            (np.asarray(b.pixels).copy(), np.asarray(b.valid).copy(), b.index.copy(), b.scanned)
        )
    return out, quality


def _read_one(source: Any, t: int, row: int, col: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.empty((1, source.shape[1], size, size), dtype=source.dtype)
    valid = np.empty((1, size, size), dtype=bool)
    source.read(np.array([[t, row, col]]), pixels, None)
    _, _, ny, nx = source.shape
    outside = (np.array([max(0, row + size - ny)]), np.array([max(0, col + size - nx)]))
    chip_validity(np, pixels, None, source.nodata, valid, outside)
    return pixels[0], valid[0]


def _quality_cube(shape: tuple[int, int, int, int] = (2, 3, 100, 90), seed: int = 3) -> xr.Dataset:
    """Random pixels with nodata holes and a quality layer of every class; the raster is
    not a multiple of the chip size, so padded edge chips exist."""
    cube = random_cube(shape, seed=seed)
    rng = np.random.default_rng(seed)
    values = cube["pixels"].values
    values[0, :, :40, :40] = 0  # a mostly-nodata corner
    values[-1, -1, rng.integers(0, shape[2], 300), rng.integers(0, shape[3], 300)] = 0
    classes = rng.choice([0, 1, 2, 3, 4, 5, 6, 7], size=shape[2:], p=[0.5] + [1 / 14] * 7)
    classes[60:, 60:] = 3  # a cloudy block
    return xclay.as_datacube(cube, quality=xr.DataArray(classes.astype(np.uint8), dims=("y", "x")))


class ArraySource:
    """A reader written for this test alone, straight from NumPy arrays: the protocol
    needs nothing from xclay's own readers."""

    xp = np
    name = "test arrays"

    def __init__(self, pixels: np.ndarray, classes: np.ndarray | None, nodata: float | None):
        self.pixels, self.classes, self._nodata = pixels, classes, nodata

    @property
    def shape(self) -> tuple[int, int, int, int]:
        t, b, y, x = self.pixels.shape
        return t, b, y, x

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.pixels.dtype

    @property
    def nodata(self) -> float | None:
        return self._nodata

    @property
    def has_quality(self) -> bool:
        return self.classes is not None

    def read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
        size = pixels.shape[-1]
        t_, b_, ny, nx = self.pixels.shape
        padded = np.full((t_, b_, ny + size, nx + size), self._nodata, dtype=self.pixels.dtype)
        padded[:, :, :ny, :nx] = self.pixels
        for k, (t, row, col) in enumerate(windows):
            pixels[k] = padded[t, :, row : row + size, col : col + size]
            if classes is not None and self.classes is not None:
                q = np.full((ny + size, nx + size), PixelClass.NODATA, dtype=np.uint8)
                q[:ny, :nx] = self.classes[t]
                classes[k] = q[row : row + size, col : col + size]

    def reading_stream(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


# --------------------------------------------------------------------------- readers


def test_readers_read_the_cube_slice(tmp_path: Path) -> None:
    cube = random_cube((2, 3, 96, 80))
    on_disk = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    layouts = store_layouts(on_disk)
    sources: list[Any] = [
        WindowSource(cube["pixels"]),
        WindowSource(on_disk["pixels"]),
        WindowSource(cube["pixels"].chunk({"y": 40, "x": 40})),
        ChunkSource(*layouts, nodata=0, threads=1),
        ChunkSource(*layouts, nodata=0, threads=3),
    ]
    for source in sources:
        assert isinstance(source, BatchSource)
        # 32 px at (32, 16): a window over two chunks of the stored cube.
        pixels, _ = _read_one(source, 1, 32, 16, 32)
        np.testing.assert_array_equal(pixels, cube["pixels"].values[1, :, 32:64, 16:48])
        source.close()


def test_padded_window_is_nodata_outside_the_raster() -> None:
    cube = random_cube((1, 2, 40, 40), nodata=0)
    pixels, valid = _read_one(WindowSource(cube["pixels"]), 0, 32, 32, 32)
    np.testing.assert_array_equal(pixels[:, :8, :8], cube["pixels"].values[0, :, 32:, 32:])
    assert (pixels[:, 8:, :] == 0).all() and (pixels[:, :, 8:] == 0).all()
    assert valid[:8, :8].all() and valid.sum() == 64


def test_padding_counts_as_nodata_even_without_a_nodata_value() -> None:
    cube = random_cube((1, 2, 40, 40), nodata=None)
    _, valid = _read_one(WindowSource(cube["pixels"]), 0, 32, 0, 32)
    assert valid.sum() == 8 * 32


def test_validity_any_band_nodata_or_nan() -> None:
    cube = random_cube((1, 3, 32, 32), dtype="float32", nodata=-1.0)
    pixels = cube["pixels"].values
    pixels[0, 1, 0, 0] = -1.0  # one band nodata: the pixel is invalid
    pixels[0, 2, 5, 5] = np.nan
    _, valid = _read_one(WindowSource(cube["pixels"]), 0, 0, 0, 32)
    assert not valid[0, 0] and not valid[5, 5] and valid.sum() == 32 * 32 - 2


def test_class_fractions_count_every_class_and_ignore_unknown_codes() -> None:
    classes = np.zeros((2, 4, 4), dtype=np.uint8)
    classes[0, 0, :2] = PixelClass.CLOUD
    classes[1] = 250  # not a class
    fractions = class_fractions(np, classes)
    assert fractions.shape == (2, len(PixelClass))
    assert fractions[0, PixelClass.CLOUD] == 2 / 16 and fractions[0, 0] == 14 / 16
    assert fractions[1].sum() == 0


# --------------------------------------------------------------------------- the fill loop


def test_batches_follow_grid_order_and_filter_nodata() -> None:
    cube = random_cube((2, 2, 96, 64))
    cube["pixels"].values[0, :, :32, :32] = 0  # chip (0, 0, 0) all nodata
    cube["pixels"].values[1, :, 32:64, 32:52] = 0  # chip (1, 1, 1): 20/32 = 62.5 % nodata
    batches, quality = _collect(WindowSource(cube["pixels"]), _plan(cube))
    index = np.concatenate([b[2] for b in batches])
    expected = [(t, i, j) for t in range(2) for i in range(3) for j in range(2)]
    expected.remove((0, 0, 0))
    expected.remove((1, 1, 1))
    assert [tuple(r) for r in index] == expected
    assert sum(b[3] for b in batches) == 12  # every chip scanned once
    frac = quality.nodata_fraction
    assert frac[0, 0, 0] == 1.0 and frac[1, 1, 1] == pytest.approx(0.625)
    assert np.isfinite(frac).all()
    for pixels, _, idx, _ in batches:
        for k, (t, i, j) in enumerate(idx):
            np.testing.assert_array_equal(
                pixels[k], cube["pixels"].values[t, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
            )


def test_batch_size_counts_accepted_chips_on_every_path(tmp_path: Path) -> None:
    cube = _quality_cube((1, 2, 160, 160))
    on_disk = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    plan = _plan(cube, batch=4, quality=QualityFilter(max_nodata=0.2))
    for source in (
        WindowSource(cube["pixels"], cube["quality"]),
        ChunkSource(*store_layouts(on_disk), nodata=0),
    ):
        batches, quality = _collect(source, plan)
        accepted = int((quality.nodata_fraction <= 0.2).sum())
        assert 0 < accepted < plan.total_chips
        sizes = [len(b[2]) for b in batches]
        assert sizes[:-1] == [4] * (len(sizes) - 1) and 0 < sizes[-1] <= 4
        assert sum(sizes) == accepted and sum(b[3] for b in batches) == plan.total_chips


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("shard", [None, 2])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_every_reader_gives_the_same_batches_bit_for_bit(
    tmp_path: Path, compression: Compression, shard: int | None, prefetch: int
) -> None:
    cube = _quality_cube()
    path = xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=32, compression=compression, shard_chips=shard
    )
    opened = xclay.open_datacube(path)
    plan = _plan(cube, batch=5, edges="pad", quality=QualityFilter(max_nodata=0.5, max_cloud=0.6))
    reference = ArraySource(cube["pixels"].values, cube["quality"].values, 0)
    expected, expected_quality = _collect(reference, plan)
    assert 0 < sum(len(b[2]) for b in expected) < plan.total_chips  # the filter bites
    sources: dict[str, BatchSource] = {
        "xarray, in memory": WindowSource(cube["pixels"], cube["quality"]),
        "xarray, dask": WindowSource(
            cube["pixels"].chunk({"x": 45}), cube["quality"].chunk({"x": 45})
        ),
        "xarray, store": WindowSource(opened["pixels"], opened["quality"]),
        "chunk files": ChunkSource(*store_layouts(opened), nodata=0, threads=1),
        "chunk files, threads": ChunkSource(*store_layouts(opened), nodata=0, threads=3),
    }
    for name, source in sources.items():
        got, quality = _collect(source, plan, prefetch)
        source.close()
        assert len(got) == len(expected), name
        for a, b in zip(got, expected, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y, err_msg=name)
        np.testing.assert_array_equal(quality.nodata_fraction, expected_quality.nodata_fraction)
        np.testing.assert_array_equal(quality.class_fraction, expected_quality.class_fraction)


def test_a_block_reads_like_its_part_of_the_whole() -> None:
    cube = _quality_cube((2, 2, 100, 90))
    source = WindowSource(cube["pixels"], cube["quality"])
    whole, whole_q = _collect(source, _plan(cube, edges="pad", batch=4))
    block = Block((1, 2), (1, 3), (1, 3))
    part, part_q = _collect(source, _plan(cube, edges="pad", batch=4, block=block))
    index = np.concatenate([b[2] for b in whole])
    inside = (
        (index[:, 0] == 1)
        & (index[:, 1] >= 1)
        & (index[:, 1] < 3)
        & (index[:, 2] >= 1)
        & (index[:, 2] < 3)
    )
    np.testing.assert_array_equal(np.concatenate([b[2] for b in part]), index[inside])
    np.testing.assert_array_equal(
        np.concatenate([b[0] for b in part]), np.concatenate([b[0] for b in whole])[inside]
    )
    np.testing.assert_array_equal(part_q.nodata_fraction, whole_q.nodata_fraction[1:2, 1:3, 1:3])


def test_prefetch_gives_the_same_batches_in_the_same_order(tmp_path: Path) -> None:
    cube = xclay.open_datacube(
        xclay.write_datacube(random_cube((2, 3, 128, 96)), tmp_path / "c.zarr", chip_size=32)
    )
    plan = _plan(cube, batch=5)
    source = ChunkSource(*store_layouts(cube), nodata=0)
    sync, q_sync = _collect(source, plan, prefetch=0)
    for depth in (1, 3):
        ahead, q_ahead = _collect(source, plan, prefetch=depth)
        assert len(ahead) == len(sync)
        for a, b in zip(ahead, sync, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(q_ahead.nodata_fraction, q_sync.nodata_fraction)


def test_buffers_are_reused_from_a_fixed_pool() -> None:
    cube = random_cube((1, 2, 256, 256))
    plan = _plan(cube, size=16, batch=4)  # 256 chips -> 64 batches
    for prefetch in (0, 2):
        quality = ChipQuality.empty(plan.block.shape, with_classes=False)
        buffers = {
            b.pixels.__array_interface__["data"][0]
            for b in iter_batches(WindowSource(cube["pixels"]), plan, quality, prefetch=prefetch)
        }
        assert len(buffers) <= prefetch + 2


def test_reader_errors_reach_the_consumer() -> None:
    cube = random_cube((1, 2, 128, 128))

    class Failing(WindowSource):
        def read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
            if (windows[:, 1] >= 64).any():
                raise OSError(f"corrupt chunk at row {windows[:, 1].max()}")
            super().read(windows, pixels, classes)

    plan = _plan(cube)
    quality = ChipQuality.empty(plan.block.shape, with_classes=False)
    with pytest.raises(OSError, match="corrupt chunk at row 64"):
        for _ in iter_batches(Failing(cube["pixels"]), plan, quality, prefetch=2):
            pass


def test_consumer_stopping_early_stops_the_prefetch_thread() -> None:
    cube = random_cube((1, 2, 256, 256))
    plan = _plan(cube, size=16, batch=2)
    quality = ChipQuality.empty(plan.block.shape, with_classes=False)
    batches = iter_batches(WindowSource(cube["pixels"]), plan, quality, prefetch=2)
    next(batches)
    batches.close()
    assert not any(t.name == "xclay-prefetch" for t in threading.enumerate())


def test_hand_off_to_torch_is_zero_copy_on_cpu() -> None:
    cube = random_cube((1, 2, 64, 64))
    plan = _plan(cube, batch=4)
    lon, lat = plan.grid.centres_lonlat()
    lonlat = np.stack([lon, lat], axis=-1)
    quality = ChipQuality.empty(plan.block.shape, with_classes=False)
    batch = next(iter_batches(WindowSource(cube["pixels"]), plan, quality, prefetch=0))
    chips = to_chip_batch(batch, lonlat, cube["time"].values, CPU)
    assert chips.pixels.data_ptr() == batch.pixels.__array_interface__["data"][0]
    assert chips.pixels.dtype == torch.uint16 and tuple(chips.pixels.shape) == (4, 2, 32, 32)
    np.testing.assert_allclose(chips.lonlat.numpy(), lonlat.reshape(-1, 2))
    assert (chips.time == cube["time"].values[0]).all()


def test_sampler_is_reproducible_and_skips_mostly_empty_chips() -> None:
    cube = random_cube((1, 2, 128, 128))
    cube["pixels"].values[0, :, :64, :] = 0  # top half nodata
    plan = _plan(cube)
    sample = make_sampler(WindowSource(cube["pixels"]), plan.grid, cube["time"].values)
    a, b = sample(5, 7), sample(5, 7)
    torch.testing.assert_close(a.pixels, b.pixels)
    assert len(a) == 5
    assert (a.valid.float().mean(dim=(1, 2)) >= 0.5).all()
    assert not torch.equal(sample(5, 8).pixels, a.pixels)
    # Each sample carries the centre of a chip of the grid, (lon, lat) in that order.
    lon, lat = plan.grid.centres_lonlat()
    centres = {(round(x, 9), round(y, 9)) for x, y in zip(lon.ravel(), lat.ravel(), strict=True)}
    assert {(round(x, 9), round(y, 9)) for x, y in a.lonlat.tolist()} <= centres


@pytest.mark.parametrize(
    ("shape", "size", "stride", "edges"),
    [
        ((96, 80), 32, None, "drop"),
        ((96, 80), 32, None, "pad"),
        ((100, 70), 32, 16, "drop"),
        ((100, 70), 32, 16, "pad"),
        ((100, 70), 16, 40, "pad"),  # gaps between chips
        ((64, 64), 64, None, "drop"),
    ],
)
def test_xbatcher_windows_are_the_chip_grid(
    shape: tuple[int, int], size: int, stride: int | None, edges: Edges
) -> None:
    cube = random_cube((1, 1, *shape))
    spec = ChipGridSpec(chip_size=size, stride=stride, edges=edges)
    grid = ChipGrid.from_geobox(datacube_geobox(cube), spec)
    rows, cols = chip_windows(grid)
    step = stride or size
    ny, nx = shape
    # Independent rule: origins every `step`; drop keeps windows inside, pad adds the
    # first window reaching past the edge.
    last = (lambda n: n - size) if edges == "drop" else (lambda n: max(0, n - size + step - 1))
    np.testing.assert_array_equal(rows, np.arange(0, last(ny) + 1, step))
    np.testing.assert_array_equal(cols, np.arange(0, last(nx) + 1, step))
    if edges == "pad":
        assert rows[-1] + size >= ny and cols[-1] + size >= nx
    else:
        assert rows[-1] + size <= ny and cols[-1] + size <= nx
    # A block's windows are its part of the whole, enumerated for the block alone.
    if grid.rows > 1 and grid.cols > 1:
        part = chip_windows(grid, Block((0, 1), (1, grid.rows), (1, grid.cols)))
        np.testing.assert_array_equal(part[0], rows[1:])
        np.testing.assert_array_equal(part[1], cols[1:])


def test_source_choice_on_the_cpu(tmp_path: Path) -> None:
    cube = random_cube((1, 2, 64, 64))
    budget = ThreadBudget.for_device(CPU, cores=4)
    on_disk = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    choice = open_batch_source(on_disk, chip_size=32, engine="auto", device=CPU, threads=budget)
    assert isinstance(choice.batches, ChunkSource) and choice.engine == "zarr"
    assert not choice.fallbacks
    choice = open_batch_source(cube, chip_size=32, engine="zarr", device=CPU, threads=budget)
    assert isinstance(choice.batches, WindowSource) and not choice.fallbacks
    # A selection is no longer the store: xarray reads it, as asked.
    choice = open_batch_source(
        on_disk.isel(x=slice(0, 48)), chip_size=32, engine="zarr", device=CPU, threads=budget
    )
    assert isinstance(choice.batches, WindowSource) and not choice.fallbacks
    # A store in a layout the direct reader does not know is read through zarr-python,
    # and the run says why.
    import zarr
    from zarr.codecs import TransposeCodec

    group = zarr.open_group(tmp_path / "c.zarr", mode="r+")
    stored = group["pixels"]
    assert isinstance(stored, zarr.Array)
    values = stored[...]
    assert isinstance(values, np.ndarray)
    attrs = dict(stored.attrs)
    del group["pixels"]
    group.create_array(
        "pixels", data=values, chunks=(1, 2, 32, 32), filters=[TransposeCodec(order=(0, 1, 3, 2))],
        dimension_names=("time", "band", "y", "x"), attributes=attrs, fill_value=0,
    )  # fmt: skip
    transposed = xclay.open_datacube(tmp_path / "c.zarr")
    with pytest.warns(xclay.errors.DataPathWarning, match="through xarray"):
        choice = open_batch_source(
            transposed, chip_size=32, engine="zarr", device=CPU, threads=budget
        )
    assert isinstance(choice.batches, WindowSource) and len(choice.fallbacks) == 1
    pixels, _ = _read_one(choice.batches, 0, 32, 0, 32)
    np.testing.assert_array_equal(pixels, cube["pixels"].values[0, :, 32:, :32])
    with pytest.raises(xclay.errors.XClayError, match="kvikio"):
        open_batch_source(on_disk, chip_size=32, engine="kvikio", device=CPU, threads=budget)


def test_thread_budget_fits_the_free_cores() -> None:
    for cores in (1, 2, 4, 16):
        for busy in (0.0, 1.0, float(cores)):
            free = max(1, cores - round(busy))
            cpu = ThreadBudget.for_device(CPU, cores=cores, busy=busy)
            assert cpu.torch == free and cpu.decode == 1
            gpu = ThreadBudget.for_device(torch.device("cuda"), cores=cores, busy=busy)
            assert gpu.torch == min(4, free) and gpu.decode == max(1, free - 1)
            assert gpu.io == free


def test_other_processes_load_is_counted() -> None:
    from xclay.devices import busy_from_ticks, other_busy_cores

    # Two CPUs over 200 ticks: 150 busy, 50 of them this process's own -> 1 core taken.
    assert busy_from_ticks((0, 0, 0), (200, 150, 50), 2) == 1.0
    assert busy_from_ticks((0, 0, 0), (200, 40, 40), 2) == 0.0  # all of it ours
    assert busy_from_ticks((5, 5, 5), (5, 5, 5), 2) == 0.0  # no time passed
    assert 0.0 <= other_busy_cores(window=0.05) <= len(os.sched_getaffinity(0))


def test_a_process_spinning_a_core_is_seen_since_the_last_reading() -> None:
    """A real process keeps one core busy for a second; the next budget, measured since the
    last reading (no wait of its own), sees about one core taken."""
    import subprocess
    import sys
    import time

    from xclay.devices import other_busy_cores

    other_busy_cores(window=0.05)  # the reading the next call measures from
    spin = "import time\nend = time.time() + 1.0\nwhile time.time() < end: pass"
    subprocess.run([sys.executable, "-c", spin], check=True, timeout=30)
    start = time.monotonic()
    busy = other_busy_cores(window=0.05)
    assert time.monotonic() - start < 0.05  # no wait: the last reading is old enough
    assert 0.6 <= busy <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("prefetch", [0, 2])
def test_buffers_are_reused_across_loops_and_never_shared(prefetch: int) -> None:
    from xclay.batch.batching import batch_buffers

    cube = random_cube((2, 3, 96, 96), seed=4)
    source, plan = WindowSource(cube["pixels"]), _plan(cube)
    expected, _ = _collect(source, plan, prefetch)
    buffers = batch_buffers(source, plan, prefetch)

    def loop() -> list[np.ndarray]:
        quality = ChipQuality.empty(plan.block.shape, with_classes=False)
        got = []
        for b in iter_batches(source, plan, quality, prefetch=prefetch, buffers=buffers):
            assert any(np.shares_memory(b.pixels, p) for p in buffers.pixels)  # reused
            got.append(np.asarray(b.pixels).copy())
        return got

    for _ in range(2):  # two blocks of a session, the same buffers
        got = loop()
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_array_equal(g, e[0])
    # A loop left open (after an error, say) still holds them: the next loop gets its own.
    quality = ChipQuality.empty(plan.block.shape, with_classes=False)
    left_open = iter_batches(source, plan, quality, prefetch=prefetch, buffers=buffers)
    first = next(left_open)
    other = iter_batches(source, plan, quality, prefetch=prefetch, buffers=buffers)
    second = next(other)
    assert not any(np.shares_memory(second.pixels, p) for p in buffers.pixels)
    np.testing.assert_array_equal(np.asarray(first.pixels), expected[0][0])
    np.testing.assert_array_equal(np.asarray(second.pixels), expected[0][0])
    left_open.close()
    other.close()
    assert loop()  # closed: the buffers serve the next loop again
