"""Shared by the benchmarks: save results with the context that produced them."""

from __future__ import annotations

import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xclay.environment import describe

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall-clock seconds of ``repeats`` calls (after the caller's warm-up), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def save(
    name: str,
    params: dict[str, Any],
    results: dict[str, Any],
    *,
    device: str = "cpu",
    variant: str = "",
) -> Path:
    """Write ``results/<name>_<device>[_<variant>]_<date>.json`` with the machine and versions."""
    today = dt.date.today().isoformat()
    payload = {
        "benchmark": name,
        "date": today,
        "command": "python " + " ".join(sys.argv),
        "machine": describe(),
        "params": params,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{device}{'_' + variant if variant else ''}_{today}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
