"""Quality classes from sensor masks, and chips' class fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr

import xclay
from xclay.masks import PixelClass, decode_qa_pixel, decode_scl
from xclay.quality import ChipQuality, QualityFilter

from .helpers import random_cube

C, N, CL, SH, HZ, SN = (int(c) for c in PixelClass)


def test_sentinel2_scl_classes() -> None:
    scl = xr.DataArray(np.arange(12, dtype=np.uint8))
    expected = [N, N, C, SH, C, C, C, C, CL, CL, HZ, SN]
    assert decode_scl(scl).values.tolist() == expected


def test_landsat_qa_pixel_bits_and_precedence() -> None:
    bit = {
        name: 1 << n
        for name, n in (
            ("fill", 0),
            ("dilated", 1),
            ("cirrus", 2),
            ("cloud", 3),
            ("shadow", 4),
            ("snow", 5),
            ("clear", 6),
            ("water", 7),
        )
    }
    values = [
        bit["clear"],  # clear
        bit["clear"] | bit["water"],  # clear water
        bit["fill"],  # nodata
        bit["cloud"] | bit["shadow"],  # cloud wins over its shadow
        bit["dilated"],  # cloud
        bit["shadow"],  # shadow
        bit["cirrus"],  # haze
        bit["snow"],  # snow
        bit["fill"] | bit["cloud"],  # nodata wins
        21824,  # a typical Landsat 8 clear-land value
        22280,  # a typical high-confidence cloud value (bit 3 set)
    ]
    qa = xr.DataArray(np.array(values, dtype=np.uint16))
    assert decode_qa_pixel(qa).values.tolist() == [C, C, N, CL, CL, SH, HZ, SN, N, C, CL]


def test_decoders_stay_lazy_with_dask() -> None:
    import dask.array as dsa

    scl = xr.DataArray(dsa.from_array(np.array([[8, 4], [0, 11]], dtype=np.uint8), chunks=1))
    q = decode_scl(scl)
    assert q.chunks is not None
    assert q.values.tolist() == [[CL, C], [N, SN]]


def _cube_with_quality() -> xr.Dataset:
    cube = random_cube((1, 3, 64, 64))
    q = np.zeros((64, 64), dtype=np.uint8)
    q[:32, :32] = CL  # chip (0, 0): all cloud
    q[:32, 32:48] = SH  # chip (0, 1): half shadow
    q[32:, :16] = N  # chip (1, 0): half nodata (by the mask only)
    q[32:40, 32:] = SN  # chip (1, 1): a quarter snow
    return xclay.as_datacube(cube, quality=xr.DataArray(q, dims=("y", "x")))


def test_quality_round_trips_through_zarr(tmp_path: Path) -> None:
    cube = _cube_with_quality()
    opened = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    assert opened["quality"].dims == ("time", "y", "x") and opened["quality"].dtype == np.uint8
    np.testing.assert_array_equal(opened["quality"].values, cube["quality"].values)
    assert opened["quality"].attrs["flag_meanings"] == "clear nodata cloud cloud_shadow haze snow"


def test_chip_class_fractions_and_cloud_filter(tmp_path: Path) -> None:
    cube = _cube_with_quality()
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=2)
    emb = xclay.embed(cube, model=model, chip_size=32, quality={"max_cloud": 0.5}, progress=False)
    np.testing.assert_allclose(emb["cloud_fraction"].values[0], [[1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(emb["cloud_shadow_fraction"].values[0], [[0.0, 0.5], [0.0, 0.0]])
    np.testing.assert_allclose(emb["snow_fraction"].values[0], [[0.0, 0.0], [0.0, 0.25]])
    np.testing.assert_allclose(emb["clear_fraction"].values[0], [[0.0, 0.5], [0.5, 0.75]])
    np.testing.assert_allclose(emb["nodata_fraction"].values[0], [[0.0, 0.0], [0.5, 0.0]])
    assert emb["embedded"].values[0].tolist() == [[False, True], [True, True]]
    assert emb.attrs["run"]["chips_skipped_cloud"] == 1
    table = pq.read_table(xclay.to_geoparquet(emb, tmp_path / "e.parquet")).to_pandas()
    assert list(table["cloud_shadow_fraction"]) == pytest.approx([0.5, 0.0, 0.0])
    assert list(table["snow_fraction"]) == pytest.approx([0.0, 0.0, 0.25])


def test_without_quality_the_fractions_are_unknown(tmp_path: Path) -> None:
    cube = random_cube((1, 3, 64, 64))
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=2)
    emb = xclay.embed(cube, model=model, chip_size=32, progress=False)
    assert (
        np.isnan(emb["cloud_fraction"].values).all()
        and np.isnan(emb["clear_fraction"].values).all()
    )
    assert emb["embedded"].values.all()
    table = pq.read_table(xclay.to_geoparquet(emb, tmp_path / "e.parquet"))
    assert table["cloud_fraction"].null_count == table.num_rows


@pytest.mark.parametrize("threshold", [{"max_cloud": 0.0}, {"min_clear": 0.5}])
def test_class_filters_on_a_cube_without_classes_are_refused(threshold: dict) -> None:
    cube = random_cube((1, 3, 64, 64))
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=2)
    with pytest.raises(xclay.errors.DatacubeError, match="need a datacube with a 'quality'"):
        xclay.embed(cube, model=model, chip_size=32, quality=threshold, progress=False)


@pytest.mark.parametrize(
    ("threshold", "embedded", "reason"),
    [
        ({"max_cloud_shadow": 0.4}, [[False, False], [True, True]], "cloud_shadow"),
        ({"max_snow": 0.2}, [[False, True], [True, False]], "snow"),
        ({"min_clear": 0.6}, [[False, False], [False, True]], "clear"),
        ({"max_haze": 0.0}, [[False, True], [True, True]], None),
    ],
)
def test_each_class_filter_skips_and_counts_its_chips(
    threshold: dict, embedded: list, reason: str | None
) -> None:
    # chip (0, 0) is all cloud: skipped by max_cloud (checked first) in every case.
    cube = _cube_with_quality()
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=2)
    quality = {"max_cloud": 0.9, **threshold}
    emb = xclay.embed(cube, model=model, chip_size=32, quality=quality, progress=False)
    assert emb["embedded"].values[0].tolist() == embedded
    run = emb.attrs["run"]
    assert run["chips_skipped_cloud"] == 1
    skipped = sum(v for k, v in run.items() if k.startswith("chips_skipped_"))
    assert skipped == 4 - run["chips_embedded"]
    if reason is not None:
        assert run[f"chips_skipped_{reason}"] == 4 - run["chips_embedded"] - 1
    assert emb.attrs["config"]["quality"]["max_cloud"] == 0.9


def test_filter_reason_per_chip_agrees_with_the_block_reasons() -> None:
    rng = np.random.default_rng(3)
    shape = (2, 5, 7)
    quality = ChipQuality.empty(shape, with_classes=True)
    assert quality.class_fraction is not None
    raw = rng.dirichlet(np.ones(len(PixelClass)), size=shape).astype(np.float32)
    quality.class_fraction[:] = raw
    quality.nodata_fraction[:] = raw[..., PixelClass.NODATA]
    quality.nodata_fraction[0, 0, 0] = np.nan  # not scanned
    f = QualityFilter(
        max_nodata=0.3,
        max_cloud=0.3,
        max_cloud_shadow=0.3,
        max_haze=0.3,
        max_snow=0.3,
        min_clear=0.05,
    )
    reasons = f.reasons(quality)
    assert reasons[0, 0, 0] == -1
    for at in np.ndindex(shape):
        if at != (0, 0, 0):
            assert reasons[at] == f.reason(
                float(quality.nodata_fraction[at]), quality.class_fraction[at]
            )
    assert len(set(reasons.ravel().tolist())) > 3  # the draw exercises several reasons


def test_a_region_with_no_valid_pixel_writes_nothing(tmp_path: Path) -> None:
    cube = random_cube((1, 2, 64, 64))
    q = xr.DataArray(np.full((64, 64), N, dtype=np.uint8), dims=("y", "x"))
    empty = xclay.as_datacube(cube, quality=q)
    with pytest.raises(xclay.errors.DatacubeError, match="no valid pixel"):
        xclay.write_datacube(empty, tmp_path / "c.zarr", chip_size=32, require_data=True)
    assert list(tmp_path.iterdir()) == []
