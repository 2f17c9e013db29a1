"""Attributes and footers are JSON: convert NumPy values, and spell non-finite numbers."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["jsonable", "number", "plain"]


def jsonable(value: Any) -> Any:
    """Deep-convert NumPy scalars/arrays and tuples to JSON types.

    JSON has no NaN or Infinity: they become ``"NaN"``, ``"Infinity"`` and
    ``"-Infinity"``, as Zarr v3 spells non-finite fill values.
    """
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def plain(value: Any) -> Any:
    """``value`` as it comes back from JSON: :func:`jsonable`, with anything JSON has no
    type for (paths, enums, objects) as its ``str``; compares equal to a stored copy."""
    return json.loads(json.dumps(jsonable(value), sort_keys=True, default=str))


def number(value: Any) -> float | None:
    """A number stored by :func:`jsonable` (or given directly) as a float; None stays None."""
    if value is None:
        return None
    return float(value)  # float("NaN"), float("Infinity") parse the JSON spellings
