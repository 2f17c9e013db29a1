"""Embeddings of the demo composite and labels drawn from its land-cover truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.datacube import datacube_geobox

SIZE = 256  # px of the demo composite
CHIP = 16  # px: a 16 x 16 chip grid


@pytest.fixture(scope="session")
def demo_cube() -> xr.Dataset:
    return xclay.datasets.demo_composite(SIZE)


@pytest.fixture(scope="session")
def demo_emb(demo_cube: xr.Dataset) -> xr.Dataset:
    """rcf embeddings (32-d) of the demo composite, 16 px chips."""
    encoder = xclay.models.get_model("rcf", num_filters=32, sample_chips=8)
    return xclay.embed(demo_cube, model=encoder, chip_size=CHIP, progress=False)


@pytest.fixture(scope="session")
def truth() -> np.ndarray:
    """``[y, x]`` land-cover class indices of the demo composite (255: gap)."""
    return xclay.datasets.demo_land_cover(SIZE)


def points_of(cube: xr.Dataset, rows: np.ndarray, cols: np.ndarray, values: Any) -> Any:
    """A GeoDataFrame of points at pixel centres ``(rows, cols)`` of the cube, in its CRS."""
    gpd = pytest.importorskip("geopandas")
    box = datacube_geobox(cube)
    transform: Any = box.affine
    x, y = transform @ (np.asarray(cols) + 0.5, np.asarray(rows) + 0.5)
    return gpd.GeoDataFrame(
        {"landcover": values}, geometry=gpd.points_from_xy(x, y), crs=str(box.crs)
    )


def synthetic(
    emb: xr.Dataset, classes: np.ndarray, seed: int = 0, noise: float = 0.3
) -> xr.Dataset:
    """``emb`` with vectors that encode a per-chip class map ``[chip_y, chip_x]`` (a class's
    own direction plus seeded noise): a model can learn it exactly."""
    rng = np.random.default_rng(seed)
    dim = emb.sizes["feature"]
    directions = rng.normal(size=(int(classes.max()) + 1, dim))
    vectors = directions[classes] + noise * rng.normal(size=(*classes.shape, dim))
    out = emb.copy()
    out["embedding"] = (emb["embedding"].dims, vectors[None].astype(np.float32))
    return out
