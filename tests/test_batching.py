"""Reading windows, assembling batches, prefetching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import xclay
from xclay.batching import (
    ArrayWindowReader,
    BatchPlan,
    Block,
    iter_batches,
    make_sampler,
    to_chip_batch,
)
from xclay.chips import ChipGrid, ChipGridSpec
from xclay.datacube import datacube_geobox
from xclay.quality import ChipQuality, QualityFilter

from .helpers import random_cube


def _plan(
    cube, size: int = 32, *, batch: int = 3, max_nodata: float = 0.5, edges: str = "drop"
) -> BatchPlan:
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=size, edges=edges))  # type: ignore[arg-type]
    return BatchPlan(
        grid=grid,
        block=Block.whole(cube.sizes["time"], grid),
        batch_size=batch,
        quality=QualityFilter(max_nodata=max_nodata),
    )


def _quality(plan: BatchPlan, *, classes: bool = False) -> ChipQuality:
    return ChipQuality.empty(plan.block.shape, with_classes=classes)


def _collect(reader, plan, prefetch: int):
    quality = _quality(plan)
    frac = quality.nodata_fraction
    out = []
    for b in iter_batches(reader, plan, quality, prefetch=prefetch):
        out.append((b.pixels[: len(b)].copy(), b.valid[: len(b)].copy(), b.index.copy(), b.scanned))
    return out, frac


def test_reader_window_equals_the_cube_slice(tmp_path: Path) -> None:
    cube = random_cube((2, 3, 96, 80))
    on_disk = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    for source in (cube, on_disk):
        reader = ArrayWindowReader(source["pixels"])
        out = np.empty((3, 32, 32), dtype=np.uint16)
        reader.read(1, 32, 16, 32, out)
        np.testing.assert_array_equal(out, cube["pixels"].values[1, :, 32:64, 16:48])


def test_padded_window_is_nodata_outside_the_raster() -> None:
    cube = random_cube((1, 2, 40, 40), nodata=0)
    reader = ArrayWindowReader(cube["pixels"])
    out = np.empty((2, 32, 32), dtype=np.uint16)
    valid = np.empty((32, 32), dtype=bool)
    reader.read(0, 32, 32, 32, out)
    reader.valid(0, 32, 32, 32, out, valid)
    np.testing.assert_array_equal(out[:, :8, :8], cube["pixels"].values[0, :, 32:, 32:])
    assert (out[:, 8:, :] == 0).all() and (out[:, :, 8:] == 0).all()
    assert valid[:8, :8].all() and valid.sum() == 64


def test_padding_counts_as_nodata_even_without_a_nodata_value() -> None:
    cube = random_cube((1, 2, 40, 40), nodata=None)
    reader = ArrayWindowReader(cube["pixels"])
    out = np.empty((2, 32, 32), dtype=np.uint16)
    valid = np.empty((32, 32), dtype=bool)
    reader.read(0, 32, 0, 32, out)
    reader.valid(0, 32, 0, 32, out, valid)
    assert valid.sum() == 8 * 32


def test_validity_any_band_nodata_or_nan() -> None:
    cube = random_cube((1, 3, 32, 32), dtype="float32", nodata=-1.0)
    pixels = cube["pixels"].values
    pixels[0, 1, 0, 0] = -1.0  # one band nodata: the pixel is invalid
    pixels[0, 2, 5, 5] = np.nan
    reader = ArrayWindowReader(cube["pixels"])
    out = np.empty((3, 32, 32), dtype=np.float32)
    valid = np.empty((32, 32), dtype=bool)
    reader.read(0, 0, 0, 32, out)
    reader.valid(0, 0, 0, 32, out, valid)
    assert not valid[0, 0] and not valid[5, 5] and valid.sum() == 32 * 32 - 2


def test_batches_follow_grid_order_and_filter_nodata() -> None:
    cube = random_cube((2, 2, 96, 64))
    cube["pixels"].values[0, :, :32, :32] = 0  # chip (0, 0, 0) all nodata
    cube["pixels"].values[1, :, 32:64, 32:52] = 0  # chip (1, 1, 1): 20/32 = 62.5 % nodata
    plan = _plan(cube)
    batches, frac = _collect(ArrayWindowReader(cube["pixels"]), plan, prefetch=0)
    index = np.concatenate([b[2] for b in batches])
    expected = [(t, i, j) for t in range(2) for i in range(3) for j in range(2)]
    expected.remove((0, 0, 0))
    expected.remove((1, 1, 1))
    assert [tuple(r) for r in index] == expected
    assert sum(b[3] for b in batches) == 12  # every chip scanned once
    assert frac[0, 0, 0] == 1.0 and frac[1, 1, 1] == pytest.approx(0.625)
    assert np.isfinite(frac).all()
    for pixels, _, idx, _ in batches:
        for k, (t, i, j) in enumerate(idx):
            np.testing.assert_array_equal(
                pixels[k], cube["pixels"].values[t, :, 32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
            )


def test_prefetch_gives_the_same_batches_in_the_same_order(tmp_path: Path) -> None:
    cube = xclay.open_datacube(
        xclay.write_datacube(random_cube((2, 3, 128, 96)), tmp_path / "c.zarr", chip_size=32)
    )
    plan = _plan(cube, batch=5)
    reader = ArrayWindowReader(cube["pixels"])
    sync, frac_sync = _collect(reader, plan, prefetch=0)
    for depth in (1, 3):
        ahead, frac_ahead = _collect(reader, plan, prefetch=depth)
        assert len(ahead) == len(sync)
        for a, b in zip(ahead, sync, strict=True):
            for x, y in zip(a, b, strict=True):
                np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(frac_ahead, frac_sync)


def test_buffers_are_reused_from_a_fixed_pool() -> None:
    cube = random_cube((1, 2, 256, 256))
    plan = _plan(cube, size=16, batch=4)  # 256 chips -> 64 batches
    frac = _quality(plan)
    for prefetch in (0, 2):
        buffers = {
            b.pixels.__array_interface__["data"][0]
            for b in iter_batches(ArrayWindowReader(cube["pixels"]), plan, frac, prefetch=prefetch)
        }
        assert len(buffers) <= prefetch + 2


def test_reader_errors_reach_the_consumer() -> None:
    cube = random_cube((1, 2, 128, 128))

    class Failing(ArrayWindowReader):
        def read(self, t: int, row: int, col: int, size: int, out: np.ndarray) -> None:
            if row >= 64:
                raise OSError(f"corrupt chunk at row {row}")
            super().read(t, row, col, size, out)

    plan = _plan(cube)
    frac = _quality(plan)
    with pytest.raises(OSError, match="corrupt chunk at row 64"):
        for _ in iter_batches(Failing(cube["pixels"]), plan, frac, prefetch=2):
            pass


def test_consumer_stopping_early_stops_the_prefetch_thread() -> None:
    import threading

    cube = random_cube((1, 2, 256, 256))
    plan = _plan(cube, size=16, batch=2)
    frac = _quality(plan)
    batches = iter_batches(ArrayWindowReader(cube["pixels"]), plan, frac, prefetch=2)
    next(batches)
    batches.close()
    assert not any(t.name == "xclay-prefetch" for t in threading.enumerate())


def test_hand_off_to_torch_is_zero_copy_on_cpu() -> None:
    cube = random_cube((1, 2, 64, 64))
    plan = _plan(cube, batch=4)
    grid = plan.grid
    lon, lat = grid.centres_lonlat()
    lonlat = np.stack([lon, lat], axis=-1)
    frac = _quality(plan)
    host = next(iter_batches(ArrayWindowReader(cube["pixels"]), plan, frac, prefetch=0))
    batch = to_chip_batch(host, lonlat, cube["time"].values, torch.device("cpu"))
    assert batch.pixels.data_ptr() == host.pixels.__array_interface__["data"][0]
    assert batch.pixels.dtype == torch.uint16 and tuple(batch.pixels.shape) == (4, 2, 32, 32)
    np.testing.assert_allclose(batch.lonlat.numpy(), lonlat.reshape(-1, 2))
    assert (batch.time == cube["time"].values[0]).all()


def test_sampler_is_reproducible_and_skips_mostly_empty_chips() -> None:
    cube = random_cube((1, 2, 128, 128))
    cube["pixels"].values[0, :, :64, :] = 0  # top half nodata
    plan = _plan(cube)
    lon, lat = plan.grid.centres_lonlat()
    sample = make_sampler(
        ArrayWindowReader(cube["pixels"]), plan.grid, np.stack([lon, lat], -1), cube["time"].values
    )
    a, b = sample(5, 7), sample(5, 7)
    torch.testing.assert_close(a.pixels, b.pixels)
    assert len(a) == 5
    assert (a.valid.float().mean(dim=(1, 2)) >= 0.5).all()
    assert not torch.equal(sample(5, 8).pixels, a.pixels)


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
def test_xbatcher_windows_are_the_chip_grid(shape, size, stride, edges) -> None:
    from xclay.batching import chip_windows

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
