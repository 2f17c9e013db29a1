"""A sensor is one entry: the sensor table's platforms carry their STAC collections and
mask, and a sensor of another package (declared under the ``xclay.sensors`` entry-point
group) is known to the datacube convention, the models' normalisation and the STAC side
alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import xclay
from tests.packages import installed
from xclay.errors import DatacubeError
from xclay.masks import MASK_KINDS
from xclay.sensors import get_sensor, list_platforms, mask_of, platform_named
from xclay.testing import synthetic_cube

PACKAGE = """
from xclay.sensors import Band, Sensor

PLANETSCOPE = Sensor(
    platform="planetscope",
    gsd=3.0,
    bands=tuple(
        Band(name, wavelength, mean, std, wavelength)
        for name, wavelength, mean, std in [
            ("blue", 0.49, 600.0, 300.0),
            ("green", 0.565, 900.0, 400.0),
            ("red", 0.665, 1000.0, 500.0),
            ("nir", 0.865, 2500.0, 900.0),
        ]
    ),
    rgb_bands=("red", "green", "blue"),
    collections=("planetscope-sr",),
)
"""


@pytest.fixture
def planetscope(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    points = {"xclay.sensors": {"planetscope": "xclay_planet:PLANETSCOPE"}}
    with installed(tmp_path / "site", "xclay_planet", PACKAGE, points, monkeypatch):
        yield


def test_the_tables_platforms_carry_their_collections_and_masks() -> None:
    assert platform_named("sentinel-2-c1-l2a") == "sentinel-2-l2a"
    assert platform_named("landsat-c2-l2") == "landsat-c2l2-sr"
    assert platform_named("naip") == "naip" and platform_named("my-collection") is None
    assert mask_of("sentinel-2-l2a") is MASK_KINDS["sentinel-2-scl"]
    assert mask_of("landsat-c2l1") is MASK_KINDS["landsat-qa-pixel"]
    assert mask_of("naip") is None and mask_of(None) is None
    with pytest.raises(DatacubeError, match="unknown platform 'planetscope'"):
        get_sensor("planetscope")


def test_an_installed_sensor_is_known_everywhere(planetscope: None) -> None:
    assert "planetscope" in list_platforms()
    assert platform_named("planetscope-sr") == "planetscope"
    cube = synthetic_cube((1, 4, 64, 64), seed=3)
    cube = cube.assign_coords(band=["blue", "green", "red", "nir"])
    made = xclay.as_datacube(cube["pixels"].drop_vars("wavelength"), platform="planetscope")
    np.testing.assert_allclose(made["wavelength"].values, [0.49, 0.565, 0.665, 0.865])
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    emb = xclay.embed(made, model=model, chip_size=16, progress=False)
    assert emb.attrs["model"]["normalization"]["red"] == {"mean": 1000.0, "std": 500.0}
    assert int(emb["embedded"].sum()) == 16
