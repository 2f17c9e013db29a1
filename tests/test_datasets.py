"""The built-in demo composite."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from xclay.datacube import datacube_geobox
from xclay.datasets import DEMO_BANDS, LAND_COVER_CLASSES, demo_composite, demo_land_cover


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a, b, c = demo_composite(128, seed=5), demo_composite(128, seed=5), demo_composite(128, seed=6)
    np.testing.assert_array_equal(a["pixels"].values, b["pixels"].values)
    assert not np.array_equal(a["pixels"].values, c["pixels"].values)


def test_is_a_sentinel2_l2a_datacube_in_the_amazon() -> None:
    cube = demo_composite(256, seed=0)
    assert cube["pixels"].dtype == np.uint16 and cube["pixels"].shape == (1, 10, 256, 256)
    assert tuple(cube["band"].values) == DEMO_BANDS
    assert cube.attrs["platform"] == "sentinel-2-l2a" and cube.attrs["gsd"] == 10.0
    assert gb_epsg(cube) == 32720
    gb = datacube_geobox(cube)
    assert gb.affine.c % 2560 == 0 and gb.affine.f % 2560 == 0  # chip-aligned origin
    from pyproj import Transformer

    cx, cy = gb.affine @ (gb.width / 2, gb.height / 2)
    lon, lat = Transformer.from_crs("EPSG:32720", "EPSG:4326", always_xy=True).transform(cx, cy)
    assert -61 < lon < -60 and -3.5 < lat < -3
    assert cube.attrs["provenance"]["synthetic"] is True


def test_gaps_are_nodata_in_every_band() -> None:
    cube = demo_composite(256, seed=0, gap_fraction=0.1)
    px = cube["pixels"].values[0]
    gaps = (px == 0).all(axis=0)
    assert gaps.mean() == pytest.approx(0.1, abs=0.01)
    assert not ((px == 0).any(axis=0) & ~gaps).any()  # no partial zeros
    assert (demo_land_cover(256, seed=0, gap_fraction=0.1) == 255).mean() == pytest.approx(
        gaps.mean()
    )


def test_spectra_are_plausible_per_class() -> None:
    cube = demo_composite(512, seed=2)
    classes = demo_land_cover(512, seed=2)
    px = cube["pixels"].values[0].astype(float)
    red, nir, swir = px[2], px[6], px[8]
    ndvi = (nir - red) / (nir + red + 1e-9)
    forest = classes == LAND_COVER_CLASSES.index("forest")
    water = classes == LAND_COVER_CLASSES.index("river")
    pasture = classes == LAND_COVER_CLASSES.index("pasture")
    assert forest.mean() > 0.3 and water.any() and pasture.any()
    assert np.median(ndvi[forest]) > 0.8
    assert np.median(ndvi[water]) < 0
    assert 0.3 < np.median(ndvi[pasture]) < np.median(ndvi[forest])
    assert np.median(swir[water]) < 300


def gb_epsg(cube: xr.Dataset) -> int | None:
    crs = datacube_geobox(cube).crs
    return crs.epsg if crs is not None else None


def test_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        demo_composite(8)
