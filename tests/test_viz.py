"""Preview pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr
from PIL import Image

import xclay
from xclay.explore.viz import pca_colour, save_preview, true_colour


def test_true_colour_stretch_and_transparent_nodata(demo_cube_256: xr.Dataset) -> None:
    rgb = true_colour(demo_cube_256)
    assert rgb.shape == (256, 256, 4) and rgb.dtype == np.uint8
    gaps = (demo_cube_256["pixels"].values[0] == 0).all(axis=0)
    assert (rgb[..., 3][gaps] == 0).all() and (rgb[..., 3][~gaps] == 255).all()
    assert rgb[..., :3][~gaps].min() == 0 and rgb[..., :3][~gaps].max() == 255
    small = true_colour(demo_cube_256, max_size=64)
    assert small.shape == (64, 64, 4)


def test_pca_colour_and_preview(tmp_path: Path, demo_cube_256: xr.Dataset) -> None:
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    emb = xclay.embed(demo_cube_256, model=model, chip_size=64, progress=False)
    pca = pca_colour(emb)
    assert pca.shape == (4, 4, 4)
    embedded = emb["embedded"].values[0]
    assert (pca[..., 3][embedded] == 255).all() and (pca[..., 3][~embedded] == 0).all()
    assert len({tuple(p) for p in pca[embedded][:, :3]}) > 1
    path = save_preview(demo_cube_256, emb, tmp_path / "p.png", height=128)
    with Image.open(path) as img:
        assert img.size == (128 * 2 + 8, 128)
