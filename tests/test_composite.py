"""The composite's median: the same numbers as ``np.nanmedian`` (which it replaces for
speed), on random data with NaNs, all-NaN pixels and ties; integer bands round the same."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import xarray as xr

from xclay.ingest.composite import _nanmedian, composite_over_time


@pytest.mark.parametrize("seed", range(60))
def test_the_median_is_numpys_on_random_data(seed: int) -> None:
    rng = np.random.default_rng(seed)
    times, pixels = int(rng.integers(1, 40)), int(rng.integers(1, 300))
    dtype: type[np.floating[Any]] = (np.float32, np.float64)[seed % 2]
    high = (3, 100, 65535, 1_000_000)[seed % 4]  # 3: many ties
    values = rng.integers(0, high, size=(pixels, times)).astype(dtype)
    if seed % 3 == 0:
        values = (rng.random((pixels, times)) * high).astype(dtype)
    values[rng.random((pixels, times)) < rng.random()] = np.nan
    values[: pixels // 7] = np.nan  # pixels with no valid observation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's all-NaN slice warning
        expected = np.nanmedian(values, axis=-1).astype(dtype)
    got = _nanmedian(values)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, expected)


def test_integer_bands_round_as_before() -> None:
    """uint16 observations whose median falls between two values (x.5) round as numpy
    rounds (half to even), and masked observations are left out."""
    rng = np.random.default_rng(7)
    values = rng.integers(1, 9, size=(6, 5, 4)).astype(np.uint16)  # time, y, x
    values[2, 0, 0] = 0  # nodata
    data = xr.Dataset({"red": (("time", "y", "x"), values)})
    out, _ = composite_over_time(data, None, 0, "median")
    floats = np.where(values == 0, np.nan, values.astype(np.float64))
    expected = np.round(np.nanmedian(floats, axis=0)).astype(np.uint16)
    np.testing.assert_array_equal(out["red"].values, expected)
