"""The composite's median: the same numbers as ``np.nanmedian`` (which it replaces for
speed), on random data with NaNs, all-NaN pixels and ties; integer bands round the same.
Its kernels (masking, the median of valid observations) give the same bits on the CuPy
stand-in as on NumPy."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import xarray as xr

from xclay.ingest.composite import (
    _nanmedian,
    _sorting_network,
    composite_over_time,
    excluded_observations,
    exclusion_table,
    median_of_valid,
    valid_observations,
)
from xclay.masks import EXCLUDED_FROM_COMPOSITES, decode_qa_pixel, decode_scl


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


# --------------------------------------------------------------------------- the kernels

SMALL_INTEGERS = (np.uint8, np.int8, np.uint16, np.int16)


def _expected_median(values: np.ndarray, valid: np.ndarray, fill: float) -> np.ndarray:
    """What composites gave before the integer kernel: np.nanmedian over float32 (float64
    for wider types), NaN filled, integers rounded half to even."""
    dtype = values.dtype
    work = np.float32 if dtype.itemsize <= 2 or dtype == np.float32 else np.float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's all-NaN slice warning
        med = np.nanmedian(np.where(valid, values.astype(work), np.nan), axis=0).astype(work)
    med = np.where(np.isnan(med), work(fill), med)
    return med.round().astype(dtype) if dtype.kind in "iu" else med.astype(dtype)


def _random_observations(seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    rng = np.random.default_rng(seed)
    dtype: np.dtype[Any] = np.dtype(
        (*SMALL_INTEGERS, np.int32, np.uint32, np.float32, np.float64)[seed % 8]
    )
    times, pixels = int(rng.integers(1, 80)), int(rng.integers(1, 3000))
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = (max(info.min, -3), min(info.max, 3)) if seed % 3 == 0 else (info.min, info.max)
        values = rng.integers(low, high, size=(times, pixels), endpoint=True).astype(dtype)
    else:
        values = ((rng.random((times, pixels)) - 0.5) * 2e6).astype(dtype)
        values[rng.random((times, pixels)) < 0.1] = 0.0  # ties, and zeros of both signs
    valid = rng.random((times, pixels)) > rng.random()
    valid[:, : pixels // 9] = False  # pixels with no valid observation
    return values, valid, (0, -1, 7)[seed % 3]


@pytest.mark.parametrize("seed", range(64))
def test_median_of_valid_is_numpys_median_of_the_valid_observations(seed: int) -> None:
    """8- and 16-bit integers (sorted by a network, rounded in integer arithmetic), wider
    integers and floats: the values composites had, with ties, negative values, all-NaN
    pixels, 1 to 79 dates."""
    values, valid, fill = _random_observations(seed)
    got = median_of_valid(values, valid, fill)
    assert got.dtype == values.dtype
    np.testing.assert_array_equal(got, _expected_median(values, valid, fill))


@pytest.mark.parametrize("size", range(1, 13))
def test_the_sorting_network_sorts_every_input(size: int) -> None:
    """A comparator network sorts every input if it sorts every input of 0s and 1s (Knuth's
    0-1 principle): all 2**size of them up to 12 values; random ones up to 80."""
    every = ((np.arange(1 << size)[:, None] >> np.arange(size)) & 1).astype(np.uint8).T
    rows: list[np.ndarray] = list(every.copy())
    for a, b in _sorting_network(size):
        rows[a], rows[b] = np.minimum(rows[a], rows[b]), np.maximum(rows[a], rows[b])
    np.testing.assert_array_equal(np.stack(rows), np.sort(every, axis=0))
    rng = np.random.default_rng(size)
    for n in rng.integers(13, 81, size=4):
        values = rng.integers(0, 5, size=(int(n), 50))
        rows = list(values.copy())
        for a, b in _sorting_network(int(n)):
            rows[a], rows[b] = np.minimum(rows[a], rows[b]), np.maximum(rows[a], rows[b])
        np.testing.assert_array_equal(np.stack(rows), np.sort(values, axis=0))


@pytest.mark.parametrize(
    ("decode", "dtype"), [(decode_scl, np.uint8), (decode_qa_pixel, np.uint16), (None, np.uint8)]
)
def test_the_exclusion_table_is_the_decoders_classes(decode: Any, dtype: Any) -> None:
    """One gather in the table says what decoding every value and looking its class up
    in EXCLUDED_FROM_COMPOSITES says."""
    values = np.arange(np.iinfo(dtype).max + 1).astype(dtype)
    classes = decode(xr.DataArray(values)).values if decode else values
    expected = np.isin(classes, [int(c) for c in EXCLUDED_FROM_COMPOSITES])
    table = exclusion_table(decode, dtype)
    assert table is not None
    np.testing.assert_array_equal(excluded_observations(values, table, decode), expected)
    # wider masks are decoded as they are
    wide = values.astype(np.int32)
    np.testing.assert_array_equal(excluded_observations(wide, None, decode), expected)
    assert exclusion_table(decode, np.int32) is None


def test_the_kernels_run_on_cupy_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU composite is these kernels with CuPy as their array module: on the CuPy
    stand-in (NumPy memory; writes queued on a stream, as on a GPU, so a kernel that wrote
    with ``[...] =`` and read back unsynchronised would differ) they give the CPU's bits,
    with no write the stream still holds."""
    from tests import cuda_standins

    cupy = cuda_standins.install(monkeypatch).cupy
    for seed in range(16):
        values, valid, fill = _random_observations(seed)
        scl = np.random.default_rng(seed).integers(0, 12, size=values.shape).astype(np.uint8)
        table = exclusion_table(decode_scl, np.uint8)
        assert table is not None
        on_device = [cupy.asarray(a) for a in (values, valid, scl, table)]
        excluded = excluded_observations(on_device[2], on_device[3], decode_scl, cupy)
        ok = valid_observations([on_device[0]], excluded, fill, cupy)
        got = median_of_valid(on_device[0], ok, fill, cupy)
        assert isinstance(got, cupy.ndarray)
        host_ok = valid_observations([values], excluded_observations(scl, table, None), fill)
        expected = median_of_valid(values, host_ok, fill)
        np.testing.assert_array_equal(cupy.asnumpy(ok), host_ok)
        assert cupy.asnumpy(got).tobytes() == expected.tobytes()
        assert cuda_standins.pending() == 0
