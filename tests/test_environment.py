"""Machine description saved with benchmarks and shown by `xclay info`."""

from __future__ import annotations

from xclay.environment import describe


def test_describe_without_gpu_probe() -> None:
    info = describe(gpu=False)
    assert "gpu" not in info
    assert info["cpu"]["cores"] >= 1
    assert {"numpy", "xarray", "zarr", "torch"} <= set(info["packages"])
    assert info["optional"]["dask"] is True  # installed with the dev extra
