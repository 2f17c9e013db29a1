"""xclay.training: batches of a datacube's chips for a training loop, deterministic, sharded
without overlap across DataLoader workers and ranks, filtered and sampled as asked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

import xclay
from xclay.errors import ConfigError, LabelError
from xclay.training import IGNORE_INDEX, ChipDataset, TrainingConfig

SIZE, CHIP = 256, 32


@pytest.fixture(scope="module")
def cube_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cube = xclay.datasets.demo_composite(SIZE)
    return Path(
        xclay.write_datacube(cube, tmp_path_factory.mktemp("train") / "cube.zarr", chip_size=CHIP)
    )


@pytest.fixture(scope="module")
def land(cube_path: Path) -> xr.DataArray:
    """The demo's land cover as a georeferenced raster (255: gap)."""
    pytest.importorskip("rioxarray", reason="needs xclay[io]")
    cube = xclay.open_datacube(cube_path)
    truth = xclay.datasets.demo_land_cover(SIZE)
    da = xr.DataArray(truth, dims=("y", "x"), coords={"y": cube["y"].values, "x": cube["x"].values})
    out: xr.DataArray = da.rio.write_crs(cube["spatial_ref"].attrs["crs_wkt"]).rio.write_nodata(255)
    return out


def _indices(batches: list) -> list[tuple[int, int, int]]:
    return [(int(t), int(i), int(j)) for b in batches for t, i, j in b.index.tolist()]


def test_batches_are_the_cube_s_chips(cube_path: Path) -> None:
    ds = ChipDataset(
        cube_path, chip_size=CHIP, config=TrainingConfig(batch_size=5, sampling="sequential")
    )
    cube = xclay.open_datacube(cube_path)
    batch = next(iter(ds))
    assert batch.pixels.shape == (5, 10, CHIP, CHIP) and batch.pixels.dtype == torch.uint16
    pixels = cube["pixels"].values
    for k, (t, i, j) in enumerate(batch.index.tolist()):
        window = pixels[t, :, i * CHIP : (i + 1) * CHIP, j * CHIP : (j + 1) * CHIP]
        np.testing.assert_array_equal(batch.pixels[k].numpy(), window)
        np.testing.assert_array_equal(batch.valid[k].numpy(), (window != 0).all(axis=0))
    lon, lat = ds.grid.lonlat_of(batch.index[:, 1].numpy(), batch.index[:, 2].numpy())
    np.testing.assert_allclose(batch.lonlat.numpy(), np.stack([lon, lat], axis=-1))
    assert batch.target is None
    assert batch.chip_batch().pixels is batch.pixels


def test_the_quality_filter_drops_chips_with_too_much_nodata(cube_path: Path) -> None:
    cube = xclay.open_datacube(cube_path)
    pixels = cube["pixels"].values[0]
    nodata = (pixels == 0).any(axis=0).reshape(8, CHIP, 8, CHIP).mean(axis=(1, 3))
    strict = ChipDataset(
        cube_path, chip_size=CHIP, config=TrainingConfig(quality={"max_nodata": 0.0})
    )
    kept = {(int(i), int(j)) for _, i, j in strict.chips}
    assert kept == {(i, j) for i in range(8) for j in range(8) if nodata[i, j] == 0}
    assert len(kept) < 64  # the demo has gaps
    with pytest.raises(ConfigError, match="quality"):
        ChipDataset(cube_path, chip_size=CHIP, config=TrainingConfig(quality={"max_cloud": 0.1}))


def test_deterministic_by_seed_and_epoch(cube_path: Path) -> None:
    ds = ChipDataset(cube_path, chip_size=CHIP, config=TrainingConfig(batch_size=8, seed=3))
    first = _indices(list(ds))
    assert _indices(list(ds)) == first
    ds.set_epoch(1)
    second = _indices(list(ds))
    assert second != first and sorted(second) == sorted(first)
    other = ChipDataset(cube_path, chip_size=CHIP, config=TrainingConfig(batch_size=8, seed=4))
    assert _indices(list(other)) != first


@pytest.mark.parametrize("world", [1, 3])
def test_ranks_and_workers_share_an_epoch_without_overlap(cube_path: Path, world: int) -> None:
    seen: list[tuple[int, int, int]] = []
    lengths = []
    for rank in range(world):
        config = TrainingConfig(batch_size=4, seed=1, rank=rank, world_size=world)
        ds = ChipDataset(cube_path, chip_size=CHIP, config=config)
        ds.set_epoch(2)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        mine = _indices(list(loader))
        assert len(loader) == len(ds) == -(-len(mine) // 4)
        lengths.append(len(mine))
        seen += mine
    chips = {tuple(int(v) for v in c) for c in ds.chips}
    assert len(set(lengths)) == 1  # every rank as many chips (padded by wrapping round)
    assert set(seen) == chips
    assert len(seen) - len(chips) < world  # only the padding repeats
    if world == 1:
        assert sorted(seen) == sorted(chips)


def test_chip_labels_and_balanced_sampling(cube_path: Path, land: xr.DataArray) -> None:
    ds = ChipDataset(cube_path, land, chip_size=CHIP, config=TrainingConfig(batch_size=16))
    assert ds.classes is not None and ds.targets.chip is not None
    truth = xclay.datasets.demo_land_cover(SIZE)
    for batch in ds:
        assert batch.target is not None
        for (_, i, j), label in zip(batch.index.tolist(), batch.target.tolist(), strict=True):
            window = truth[i * CHIP : (i + 1) * CHIP, j * CHIP : (j + 1) * CHIP]
            assert ds.classes[label] == str(np.bincount(window[window < 255]).argmax())
    counts = np.bincount(ds.targets.chip, minlength=len(ds.classes))
    present = counts > 0
    assert counts[present].max() > 5 * counts[present].min()  # forest dominates
    balanced = ChipDataset(
        cube_path,
        land,
        chip_size=CHIP,
        config=TrainingConfig(sampling="balanced", epoch_length=3000),
    )
    drawn = np.bincount(
        np.concatenate([b.target.numpy() for b in balanced if b.target is not None]),
        minlength=len(ds.classes),
    )
    share = drawn[present] / drawn.sum()
    assert share.min() > 0.5 / present.sum() and share.max() < 2 / present.sum()


def test_per_pixel_labels_for_segmentation(
    cube_path: Path, land: xr.DataArray, tmp_path: Path
) -> None:
    land.rio.to_raster(tmp_path / "land.tif")
    ds = ChipDataset(
        cube_path,
        tmp_path / "land.tif",
        chip_size=CHIP,
        per_pixel=True,
        config=TrainingConfig(batch_size=4),
    )
    truth = xclay.datasets.demo_land_cover(SIZE)
    batch = next(iter(ds))
    assert batch.target is not None and batch.target.shape == (4, CHIP, CHIP)
    assert ds.classes is not None
    names = np.array([int(c) for c in ds.classes])
    for k, (_, i, j) in enumerate(batch.index.tolist()):
        window = truth[i * CHIP : (i + 1) * CHIP, j * CHIP : (j + 1) * CHIP]
        got = batch.target[k].numpy()
        np.testing.assert_array_equal(got == IGNORE_INDEX, window == 255)
        np.testing.assert_array_equal(names[got[got >= 0]], window[window < 255])


def test_points_as_labels_and_errors(cube_path: Path) -> None:
    gpd = pytest.importorskip("geopandas", reason="needs xclay[explore]")
    cube = xclay.open_datacube(cube_path)
    from xclay.datacube import datacube_geobox

    box = datacube_geobox(cube)
    transform: Any = box.affine
    x, y = transform @ (np.array([5.5, 100.5]), np.array([5.5, 200.5]))
    points = gpd.GeoDataFrame(
        {"v": [1.5, 2.5]}, geometry=gpd.points_from_xy(x, y), crs=str(box.crs)
    )
    ds = ChipDataset(
        cube_path, points, chip_size=CHIP, column="v", config=TrainingConfig(sampling="sequential")
    )
    batch = next(iter(ds))
    assert batch.target is not None and batch.target.dtype == torch.float32
    assert sorted(batch.target.tolist()) == [1.5, 2.5]
    with pytest.raises(ConfigError, match="balanced"):
        list(
            ChipDataset(
                cube_path,
                points,
                chip_size=CHIP,
                column="v",
                config=TrainingConfig(sampling="balanced"),
            )
        )
    with pytest.raises(ConfigError, match="batch_size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(ConfigError, match="rank"):
        TrainingConfig(rank=2, world_size=2)
    cube_pixels = cube["pixels"].values[0, :, :CHIP, :CHIP]
    assert (cube_pixels == 0).any()  # the first chip has a gap: max_nodata 0 refuses it
    with pytest.raises(LabelError, match="no chip passes"):
        ChipDataset(
            cube_path,
            points.iloc[:1],
            chip_size=CHIP,
            column="v",
            config=TrainingConfig(quality={"max_nodata": 0.0}),
        )


def _epoch(ds: ChipDataset, epoch: int, workers: int) -> list[Any]:
    ds.set_epoch(epoch)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    return [(b.index.clone(), b.pixels.clone(), b.valid.clone()) for b in loader]


def _same(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            assert torch.equal(u, v)


def test_decoded_chips_are_kept_across_epochs_and_workers(cube_path: Path, tmp_path: Path) -> None:
    """The first epoch's DataLoader workers fill the cache; it outlives them, and the next
    epoch's workers read from it, not from the store (here damaged after the first epoch:
    read, it would fail)."""
    import shutil

    from xclay.errors import DataIntegrityError

    copy = Path(shutil.copytree(cube_path, tmp_path / "cube.zarr"))
    config = TrainingConfig(batch_size=6, seed=2)
    cached = ChipDataset(copy, chip_size=CHIP, config=config)
    plain = ChipDataset(cube_path, chip_size=CHIP, config=replace(config, cache_bytes=0))
    assert plain.cache is None and cached.cache is not None
    assert cached.cache.capacity == len(cached.chips)
    _same(_epoch(cached, 0, workers=2), _epoch(plain, 0, workers=2))
    assert int(cached.cache.ready.sum()) == len(cached.chips)  # filled by the workers
    for chunk in (copy / "pixels" / "c").rglob("*"):
        if chunk.is_file():
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0xFF
            chunk.write_bytes(bytes(data))
    _same(_epoch(cached, 1, workers=2), _epoch(plain, 1, workers=0))
    with pytest.raises(DataIntegrityError):  # read again, the store is damage
        ChipDataset(copy, chip_size=CHIP, config=replace(config, cache_bytes=0))


def test_the_cache_keeps_what_fits(cube_path: Path) -> None:
    chip_bytes = CHIP * CHIP * (10 * 2 + 1)  # the demo: 10 bands of uint16, and validity
    config = TrainingConfig(batch_size=7, seed=5, cache_bytes=5 * chip_bytes + 1)
    small = ChipDataset(cube_path, chip_size=CHIP, config=config)
    plain = ChipDataset(cube_path, chip_size=CHIP, config=replace(config, cache_bytes=0))
    assert small.cache is not None and small.cache.capacity == 5
    for epoch in range(2):
        _same(_epoch(small, epoch, workers=0), _epoch(plain, epoch, workers=0))
    assert int(small.cache.ready.sum()) == 5
    too_small = ChipDataset(cube_path, chip_size=CHIP, config=replace(config, cache_bytes=100))
    assert too_small.cache is None
    with pytest.raises(ConfigError, match="cache_bytes"):
        TrainingConfig(cache_bytes=-1)


# --------------------------------------------------------------------------- the handover


def _fields(batch: Any) -> list[Any]:
    out = [batch.pixels, batch.valid, batch.index, batch.lonlat, batch.time]
    return out + ([] if batch.target is None else [batch.target])


def _equal(got: Any, want: Any) -> None:
    for u, v in zip(_fields(got), _fields(want), strict=True):
        if isinstance(u, np.ndarray):
            np.testing.assert_array_equal(u, v)
        else:
            assert u.dtype == v.dtype and torch.equal(u, v)


@pytest.mark.parametrize("persistent", [False, True])
def test_batches_handed_over_in_workers_rings_are_those_read_in_process(
    cube_path: Path, land: xr.DataArray, tmp_path: Path, persistent: bool
) -> None:
    """Batches from DataLoader workers' shared-memory slots (chip and pixel targets, a
    short last batch, epochs with new or the same workers) equal the batches read in
    the main process, while the loop keeps them or lets them go."""
    land.rio.to_raster(tmp_path / "land.tif")
    config = TrainingConfig(batch_size=7, seed=3)
    for ds in (
        ChipDataset(cube_path, land, chip_size=CHIP, config=config),
        ChipDataset(
            cube_path, tmp_path / "land.tif", chip_size=CHIP, per_pixel=True, config=config
        ),
    ):
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, num_workers=2, persistent_workers=persistent
        )
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            want = list(ds)
            assert len(want[-1]) < 7
            if epoch == 0:  # batches let go as the loop goes: slots used again
                for k, got in enumerate(loader):
                    _equal(got, want[k])
            else:  # every batch kept: later batches do not overwrite earlier ones
                kept = list(loader)
                for got, expected in zip(kept, want, strict=True):
                    _equal(got, expected)


def test_a_kept_batch_keeps_its_slot_until_freed(cube_path: Path) -> None:
    import gc

    from xclay import batchring

    ds = ChipDataset(cube_path, chip_size=CHIP, config=TrainingConfig(batch_size=4, seed=5))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=1, persistent_workers=True
    )
    batches = iter(loader)
    first = next(batches)
    view = first.pixels[1:2]  # a view of the batch keeps the slot too
    del first
    (worker,) = batches._workers  # type: ignore[attr-defined]
    ring = next(r for r in batchring._received.values() if r.pid == worker.pid)
    state = ring.state.numpy()
    held = int((state == batchring.HELD).sum())
    assert held >= 1
    rest = [b.pixels.clone() for b in batches]  # slots used again as batches go
    assert len(rest) == len(ds) - 1
    assert int((state == batchring.HELD).sum()) == 1  # only the view's
    del view
    gc.collect()
    assert int((state == batchring.HELD).sum()) == 0


def test_spawned_workers_hand_over_the_same_batches(cube_path: Path) -> None:
    """Workers started with ``spawn`` (macOS's and Windows' default) get the dataset
    pickled, make their rings there and send them."""
    ds = ChipDataset(cube_path, chip_size=CHIP, config=TrainingConfig(batch_size=16, seed=6))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=1, multiprocessing_context="spawn"
    )
    for got, want in zip(loader, list(ds), strict=True):
        _equal(got, want)


def test_a_ring_gives_slots_until_every_one_is_out() -> None:
    from xclay.batchring import FREE, BatchRing

    ring = BatchRing({"x": (torch.int16, (3, 5)), "y": (torch.bool, (3,))}, slots=2)
    a, b = ring.claim(), ring.claim()
    assert {a, b} == {0, 1} and ring.claim() is None
    assert b is not None
    ring.unclaim(b)  # a batch that failed in the worker gives its slot back
    assert ring.claim() == b
    views = ring.views(0, 2)
    assert views["x"].shape == (2, 5) and views["y"].shape == (2,)
    with pytest.raises(ValueError, match="does not fit"):
        ring.views(0, 4)
    assert BatchRing.fitting({"x": (torch.uint8, (1 << 40,))}) is None  # no room for two
    assert (ring.state.numpy() != FREE).all()
