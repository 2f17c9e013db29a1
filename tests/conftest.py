"""Shared fixtures. Synthetic data is seeded; real data comes from ../shared/data."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import pytest
import xarray as xr

import xclay
from xclay.datasets import demo_composite
from xclay.protocols import Encoder

from .helpers import OLINDA_TIF
from .s3 import s3, s3_server  # noqa: F401  (fixtures: a real S3 server on 127.0.0.1)

os.environ.setdefault("MPLBACKEND", "Agg")  # plots render to files; no display needed


@functools.cache
def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any("gpu" in item.keywords for item in items) and not _cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_cube_256() -> xr.Dataset:
    """A 256 x 256 px demo composite (seed 1): 16 chips of 64 px."""
    return demo_composite(256, seed=1)


@pytest.fixture(scope="session")
def small_rcf_options() -> dict[str, int]:
    """rcf settings small enough for fast tests."""
    return {"num_filters": 32, "sample_chips": 8}


@pytest.fixture
def small_rcf(small_rcf_options: dict[str, Any]) -> Encoder:
    return xclay.models.get_model("rcf", **small_rcf_options)


@pytest.fixture(scope="session")
def olinda_tif() -> Path:
    if not OLINDA_TIF.is_file():
        pytest.skip(f"real test data not found at {OLINDA_TIF} (../shared/data is absent)")
    return OLINDA_TIF
