"""A true-colour preview per chip: in the embeddings Zarr and as PNG bytes in GeoParquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xarray as xr

import xclay
from xclay.batch.batching import Block
from xclay.embed import EmbedConfig, EmbedSession
from xclay.errors import ConfigError, DatacubeError
from xclay.outputs.thumbnails import ThumbnailStretch, decode_png, make_thumbnails, rgb_bands

STRETCH = ThumbnailStretch(("r", "g", "b"), (0.0, 0.0, 0.0), (100.0, 100.0, 100.0))


def test_cells_average_valid_pixels_and_nodata_is_transparent() -> None:
    pixels = np.zeros((1, 4, 8, 8), dtype=np.uint16)
    pixels[0, 0] = 100  # red at the top of the stretch
    pixels[0, 1, :, :4] = 50  # green: half way, left half only
    pixels[0, 2, :4, :4] = 200  # blue: above the stretch, clipped
    valid = np.ones((1, 8, 8), dtype=bool)
    valid[0, 4:, 4:] = False  # bottom-right quarter: nodata
    valid[0, 0, 0] = False  # one pixel of the top-left cell
    thumb = make_thumbnails(
        torch.from_numpy(pixels), torch.from_numpy(valid), [0, 1, 2], STRETCH, 2
    )
    assert thumb.shape == (1, 2, 2, 4) and thumb.dtype == np.uint8
    assert thumb[0, 0, 0].tolist() == [255, 128, 255, 239]  # 15 of 16 pixels valid
    assert thumb[0, 0, 1].tolist() == [255, 0, 0, 255]
    assert thumb[0, 1, 0].tolist() == [255, 128, 0, 255]
    assert thumb[0, 1, 1].tolist() == [0, 0, 0, 0]  # no valid pixel: transparent black


def test_sizes_that_do_not_divide_the_chip() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 100, size=(3, 3, 10, 10)).astype(np.float32)
    valid = np.ones((3, 10, 10), dtype=bool)
    thumb = make_thumbnails(
        torch.from_numpy(pixels), torch.from_numpy(valid), [0, 1, 2], STRETCH, 3
    )
    assert thumb.shape == (3, 3, 3, 4) and (thumb[..., 3] == 255).all()
    # cell k covers floor(k * 10 / 3) .. ceil((k + 1) * 10 / 3): cell (1, 2) rows 3..7, cols 6..10
    expected = np.rint(255 * pixels[:, :3, 3:7, 6:10].mean(axis=(2, 3)) / 100)
    np.testing.assert_array_equal(thumb[:, 1, 2, :3], expected)


def test_rgb_bands_from_the_sensor_table_or_the_wavelengths() -> None:
    s2 = ["blue", "green", "red", "nir"]
    assert rgb_bands(s2, [0.49, 0.56, 0.665, 0.842], "sentinel-2-l2a") == ["red", "green", "blue"]
    assert rgb_bands(["a", "b", "c", "d"], [0.48, 0.55, 0.67, 0.8], None) == ["c", "b", "a"]
    with pytest.raises(DatacubeError, match="at least three bands"):
        rgb_bands(["a", "b"], [0.5, 0.6], None)


@pytest.fixture(scope="module")
def emb(demo_cube_256: xr.Dataset) -> xr.Dataset:
    cube = demo_cube_256.copy(deep=True)
    cube["pixels"].values[0, :, :64, :64] = 0  # one chip all nodata: no vector, no preview
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=6)
    return xclay.embed(cube, model=model, chip_size=64, thumbnails=True, progress=False)


def test_embed_stores_a_preview_per_embedded_chip(emb: xr.Dataset) -> None:
    thumbs = emb["thumbnail"]
    assert thumbs.dims == ("time", "chip_y", "chip_x", "thumb_y", "thumb_x", "rgba")
    assert thumbs.shape == (1, 4, 4, 64, 64, 4) and thumbs.dtype == np.uint8
    embedded = emb["embedded"].values
    assert (thumbs.values[~embedded] == 0).all()
    alpha = thumbs.values[embedded][..., 3]
    assert (alpha.reshape(alpha.shape[0], -1).max(axis=1) == 255).all()
    colour = thumbs.values[embedded][..., :3].astype(float)
    assert colour.std() > 20  # the scene's forest, river and town are not one colour
    stretch = emb.attrs["config"]["thumbnail_stretch"]
    assert stretch["bands"] == ["red", "green", "blue"]
    assert all(lo < hi for lo, hi in zip(stretch["low"], stretch["high"], strict=True))


def test_preview_round_trips_through_zarr_and_geoparquet(tmp_path: Path, emb: xr.Dataset) -> None:
    back = xclay.open_embeddings(xclay.to_zarr(emb, tmp_path / "e.zarr"))
    np.testing.assert_array_equal(back["thumbnail"].values, emb["thumbnail"].values)
    table = pq.read_table(xclay.to_geoparquet(emb, tmp_path / "e.parquet"))
    assert table.schema.field("thumbnail").type == "binary"
    embedded = emb["embedded"].values
    pngs = table["thumbnail"].to_pylist()
    assert len(pngs) == int(embedded.sum()) and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    decoded = np.stack([decode_png(p) for p in pngs])
    np.testing.assert_array_equal(decoded, emb["thumbnail"].values[embedded])
    assert np.mean([len(p) for p in pngs]) < 64 * 64 * 4  # compressed


def test_one_stretch_for_every_block(demo_cube_256: xr.Dataset) -> None:
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=6)
    config = EmbedConfig(thumbnails=32, grid=xclay.ChipGridSpec(chip_size=64))
    session = EmbedSession(demo_cube_256, model, config)
    whole = session.embed_block(progress=False)
    left = session.embed_block(Block((0, 1), (0, 4), (0, 2)), progress=False)
    assert whole.thumbnails is not None and left.thumbnails is not None
    np.testing.assert_array_equal(left.thumbnails, whole.thumbnails[:, :, :2])
    # A session built from the stored config reuses the stretch rather than refitting it.
    stored = EmbedConfig.from_dict(session.config.to_dict())
    assert stored.thumbnail_stretch == session.config.thumbnail_stretch
    again = EmbedSession(demo_cube_256, model, stored)
    assert again.config.thumbnail_stretch == session.config.thumbnail_stretch


def test_thumbnails_never_upsample_and_bad_sizes_are_refused(demo_cube_256: xr.Dataset) -> None:
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=6)
    emb = xclay.embed(demo_cube_256, model=model, chip_size=32, thumbnails=128, progress=False)
    assert emb.sizes["thumb_y"] == 32
    with pytest.raises(ConfigError, match="thumbnails: must be at least 0, got -1"):
        xclay.embed(demo_cube_256, model=model, chip_size=64, thumbnails=-1, progress=False)
