"""`import xclay` stays light and registers the accessor."""

from __future__ import annotations

import json
import subprocess
import sys

import xarray as xr

import xclay


def test_import_loads_no_heavy_gpu_or_torch_modules() -> None:
    code = (
        "import sys, json, xclay, xarray as xr;"
        "heavy = [m for m in ('torch', 'cupy', 'kvikio', 'distributed', 'rioxarray') "
        "if m in sys.modules];"
        "print(json.dumps({'heavy': heavy, 'accessor': hasattr(xr.Dataset(), 'clay')}))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    result = json.loads(out.stdout)
    assert result == {"heavy": [], "accessor": True}


def test_accessor_registered_on_dataset_and_dataarray() -> None:
    assert type(xr.Dataset().clay).__name__ == "ClayDatasetAccessor"
    assert type(xr.DataArray([1]).clay).__name__ == "ClayDataArrayAccessor"


def test_public_api_is_explicit() -> None:
    for name in xclay.__all__:
        assert hasattr(xclay, name), name
    assert "embed" in xclay.__all__ and "as_datacube" in xclay.__all__
