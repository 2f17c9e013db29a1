"""The median composite on a GPU: where it runs (``device``), the same cube as on the CPU
through from_stac on the CuPy stand-in (tests/cuda_standins.py), and, on a CUDA GPU, the
real CuPy kernels bit for bit against NumPy's. Collects with only the core and ``gpu``
dependencies: what needs odc-stac skips itself."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import cuda_standins
from xclay.errors import ConfigError, DeviceError, MissingDependencyError
from xclay.ingest.composite import (
    excluded_observations,
    exclusion_table,
    median_of_valid,
    valid_observations,
)
from xclay.ingest.gpu_composite import resolve_composite_device
from xclay.masks import decode_scl


def test_the_device_a_composite_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"device must be one of \['auto', 'cpu', 'cuda'\]"):
        resolve_composite_device("gpu")
    assert resolve_composite_device("cpu") == "cpu"
    with monkeypatch.context() as m:  # no CuPy: auto is the CPU, cuda says what to install
        m.setitem(sys.modules, "cupy", None)
        assert resolve_composite_device("auto") == "cpu"
        with pytest.raises(MissingDependencyError, match=r'pip install "xclay\[gpu\]"'):
            resolve_composite_device("cuda")
    import torch

    cuda_standins.install(monkeypatch)  # CuPy and a GPU...
    assert resolve_composite_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # ...then no GPU
    assert resolve_composite_device("auto") == "cpu"
    with pytest.raises(DeviceError, match="no CUDA device or driver"):
        resolve_composite_device("cuda")


def _s2_items(folder: Path) -> tuple[list[Any], list[str]]:
    """Four dates of 4 uint16 bands (nodata 0) and an SCL, 96 x 80 px at 10 m."""
    import rasterio
    from affine import Affine

    from xclay.ingest import stac_item

    rng = np.random.default_rng(5)
    bands = ["blue", "green", "red", "nir"]
    profile = {"driver": "GTiff", "width": 80, "height": 96, "count": 1, "crs": "EPSG:32720",
               "transform": Affine(10, 0, 500000, 0, -10, 9650000)}  # fmt: skip
    items = []
    for d in range(4):
        day = f"2024-0{d + 1}-10"
        assets = {}
        for band in [*bands, "scl"]:
            if band == "scl":
                data = rng.choice(np.array([4, 5, 6, 8, 9, 3, 10, 0, 11], np.uint8), (96, 80))
            else:
                data = rng.integers(0, 4, (96, 80)).astype(np.uint16)  # ties, nodata
            path = folder / f"{day}_{band}.tif"
            with rasterio.open(path, "w", dtype=data.dtype, nodata=0, **profile) as dst:
                dst.write(data, 1)
            assets[band] = path
        items.append(
            stac_item(assets, datetime=f"{day}T14:00:00Z", id=day, collection="sentinel-2-l2a")
        )
    return items, bands


def test_from_stac_on_the_gpu_makes_the_cpus_cube(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """device='cuda' (and 'auto' where CuPy and a GPU are) composites in device memory:
    every chunk's bands and quality come back from the device (one copy each), and the cube
    is the CPU's, bit for bit."""
    pytest.importorskip("odc.stac", reason="needs odc-stac (xclay[io])")
    from xclay.ingest import from_stac

    items, bands = _s2_items(tmp_path)
    cpu = from_stac(items, bands=bands, resolution=10, chunk_size=32, device="cpu").compute()
    cupy = cuda_standins.install(monkeypatch).cupy
    copies: list[Any] = []

    def asnumpy(a: Any, stream: Any = None) -> np.ndarray:
        copies.append(type(a))
        return cuda_standins._CupyModule.asnumpy(a, stream)

    monkeypatch.setattr(cupy, "asnumpy", asnumpy)
    for device in ("cuda", "auto"):
        copies.clear()
        gpu = from_stac(items, bands=bands, resolution=10, chunk_size=32, device=device)
        gpu = gpu.compute()
        chunks = 3 * 3  # 96 x 80 px in 32 px chunks
        assert len(copies) == chunks * (len(bands) + 1), device
        assert set(copies) == {cupy.ndarray}
        for name in ("pixels", "quality"):
            assert gpu[name].values.tobytes() == cpu[name].values.tobytes(), (device, name)
    assert cuda_standins.pending() == 0


# --------------------------------------------------------------------------- on a GPU


DTYPES: tuple[Any, ...] = (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32)
DTYPES += (np.float32, np.float64)


def _observations(seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    rng = np.random.default_rng(seed)
    dtype: np.dtype[Any] = np.dtype(DTYPES[seed % 8])
    times, shape = int(rng.integers(1, 80)), (int(rng.integers(1, 300)), 257)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        low, high = (max(info.min, -3), min(info.max, 3)) if seed % 3 == 0 else (info.min, info.max)
        values = rng.integers(low, high, size=(times, *shape), endpoint=True).astype(dtype)
    else:
        values = ((rng.random((times, *shape)) - 0.5) * 2e6).astype(dtype)
        values[rng.random(values.shape) < 0.1] = 0.0
        values[rng.random(values.shape) < 0.05] = -0.0
        values[rng.random(values.shape) < 0.05] = np.nan
    scl = rng.integers(0, 12, size=values.shape).astype(np.uint8)
    fill = (0, 7, 1)[seed % 3] if dtype.kind == "u" else (0, -1, 7)[seed % 3]
    values = np.where(rng.random(values.shape) < 0.1, dtype.type(fill), values)  # nodata
    return values, scl, fill


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(24))
def test_cupy_composites_equal_numpys_bit_for_bit(seed: int) -> None:
    """The real CuPy runs the kernels the CPU runs: mask decoding by table, validity
    (nodata and NaN in any band), and the median of valid observations, for 8- to 64-bit
    integers and floats, 1 to 79 dates, ties, signed zeros, NaN and empty pixels."""
    import cupy

    values, scl, fill = _observations(seed)
    table = exclusion_table(decode_scl, np.uint8)
    assert table is not None

    def composite(xp: Any) -> tuple[np.ndarray, np.ndarray]:
        v, s, t = (xp.asarray(a) for a in (values, scl, table))
        valid = valid_observations([v], excluded_observations(s, t, decode_scl, xp), fill, xp)
        median = median_of_valid(v, valid, fill, xp)
        if xp is cupy:
            return cupy.asnumpy(valid), cupy.asnumpy(median)
        return valid, median

    cpu_valid, cpu_median = composite(np)
    gpu_valid, gpu_median = composite(cupy)
    np.testing.assert_array_equal(gpu_valid, cpu_valid)
    assert gpu_median.dtype == cpu_median.dtype
    assert gpu_median.tobytes() == cpu_median.tobytes()


@pytest.mark.gpu
def test_from_stac_on_a_cuda_gpu_makes_the_cpus_cube(tmp_path: Path) -> None:
    pytest.importorskip("odc.stac", reason="needs odc-stac (xclay[io])")
    from xclay.ingest import from_stac

    items, bands = _s2_items(tmp_path)
    cpu = from_stac(items, bands=bands, resolution=10, chunk_size=32, device="cpu").compute()
    gpu = from_stac(items, bands=bands, resolution=10, chunk_size=32, device="cuda").compute()
    for name in ("pixels", "quality"):
        assert gpu[name].values.tobytes() == cpu[name].values.tobytes(), name
