"""A median composite of an odc-stac load, chunk by chunk, with many reads in flight.

odc-stac's lazy load is one Dask task per band, date and chunk. Computed by Dask's
scheduler, they run as many at a time as it has threads (the cores), and each waits out
its requests' latency in turn: over object storage (tens of ms a request) the cores idle.
Here each spatial chunk is one task that runs those very load tasks (every band and the
mask, every date) on a read pool sized for latency (:func:`reads_in_flight` threads, one
pool per process; GDAL reads and decodes outside the GIL, under the settings the load
captured); then one task masks the chunk's observations and one task per band takes its
median, with the kernels of :mod:`xclay.ingest.composite`, on the CPU or a GPU
(:mod:`xclay.ingest.gpu_composite`). The bands' medians run in parallel on Dask's threads;
observations stay in their own dtype (no float copies), and a chunk's quality classes come
from the same masking.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr

from xclay.ingest.composite import (
    excluded_observations,
    median_of_valid,
    valid_observations,
)
from xclay.ingest.gpu_composite import array_module, to_device, to_host
from xclay.masks import PixelClass

__all__ = ["MaskPlan", "median_composite", "reads_in_flight"]

# Reads in flight for remote assets: at 20-50 ms a request, 32 concurrent ones keep a few
# cores decoding (benchmarks/ingest.py: 16 hide most of 20 ms, 48 no more than 32).
REMOTE_READS_IN_FLIGHT = 32


def reads_in_flight(remote: bool) -> int:
    """Threads of the read pool: :data:`REMOTE_READS_IN_FLIGHT` for assets behind HTTP or
    object storage (hiding latency), the process's cores for local files (decoding is the
    work).

    Parameters
    ----------
    remote
        Whether any asset is read over the network.
    """
    from xclay.devices import available_cores

    cores = available_cores()
    return max(REMOTE_READS_IN_FLIGHT, cores) if remote else cores


@dataclass(frozen=True)
class MaskPlan:
    """How a chunk's observations are masked and where they are composited.

    Attributes
    ----------
    nodata
        The bands' nodata value (None: none).
    decode
        The mask's decoder (raw values -> pixel classes); None when the mask holds pixel
        classes already (footprint coverage) or there is no mask.
    table
        :func:`~xclay.ingest.composite.exclusion_table` of the mask, or None (decoded on
        the host).
    device
        ``"cpu"`` or ``"cuda"``.
    """

    nodata: float | None
    decode: Callable[[xr.DataArray], xr.DataArray] | None
    table: np.ndarray | None
    device: Literal["cpu", "cuda"]


def median_composite(
    load: xr.Dataset,
    bands: Sequence[str],
    mask: str | None,
    classes: np.ndarray | None,
    plan: MaskPlan,
    threads: int,
) -> tuple[xr.DataArray, xr.DataArray | None]:
    """The median composite of a lazy odc-stac load, and its quality classes.

    Parameters
    ----------
    load
        ``odc.stac.load(..., chunks={"time": 1, ...})``: the bands (and the mask) as
        Dask arrays ``(time, y, x)``, one chunk per date.
    bands
        The bands to composite, in order.
    mask
        The variable of ``load`` holding the mask (raw values), or None.
    classes
        Pixel classes ``(time, y, x)`` (footprint coverage) when there is no mask, or None.
    plan
        How observations are masked and where they are composited.
    threads
        The read pool's threads (:func:`reads_in_flight`).

    Returns
    -------
    tuple
        The composite ``(band, y, x)`` in the bands' dtype, and its quality ``(y, x)``
        uint8 (:class:`~xclay.masks.PixelClass` clear or nodata), or None when there is
        neither a mask nor classes. Both lazy (Dask); computed together, they share their
        reads.
    """
    import dask.array as da
    import dask.optimization
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    # dask ships these untyped
    cull: Callable[..., tuple[dict[Any, Any], Any]] = dask.optimization.cull
    lazy_array: Callable[..., Any] = da.Array

    names = [*bands, *([mask] if mask else [])]
    arrays = [load[n].data for n in names]
    graph: dict[Any, Any] = {}
    for array in arrays:
        graph.update(array.__dask_graph__())
    keys = [array.__dask_keys__() for array in arrays]
    steps = len(keys[0])
    rows, cols = arrays[0].chunks[1], arrays[0].chunks[2]
    offsets_y, offsets_x = np.cumsum((0, *rows)), np.cumsum((0, *cols))
    token = tokenize([a.name for a in arrays], classes, plan.nodata, plan.device, threads)
    read, masked = f"xclay-read-{token}", f"xclay-mask-{token}"
    median, quality = f"xclay-median-{token}", f"xclay-quality-{token}"
    layers: dict[str, dict[Any, Any]] = {read: {}, masked: {}, median: {}, quality: {}}
    dtype = np.dtype(arrays[0].dtype)
    fill = plan.nodata if plan.nodata is not None else 0
    for iy in range(len(rows)):
        for ix in range(len(cols)):
            wanted = [[keys[k][t][iy][ix] for t in range(steps)] for k in range(len(names))]
            tasks, _ = cull(graph, [key for row in wanted for key in row])
            layers[read][(read, iy, ix)] = (_read, _Loads(tasks, wanted), threads)
            window = (
                None
                if classes is None
                else classes[
                    :, offsets_y[iy] : offsets_y[iy + 1], offsets_x[ix] : offsets_x[ix + 1]
                ]
            )
            layers[masked][(masked, iy, ix)] = (
                _mask, (read, iy, ix), len(bands), window, _Plan(plan)
            )  # fmt: skip
            for b in range(len(bands)):
                layers[median][(median, b, iy, ix)] = (_median, (masked, iy, ix), b, fill)
            layers[quality][(quality, iy, ix)] = (_quality, (masked, iy, ix))
    depends = {read: set(), masked: {read}, median: {masked}, quality: {masked}}

    def graph_of(name: str) -> HighLevelGraph:
        names = (read, masked, name)
        return HighLevelGraph({k: layers[k] for k in names}, {k: depends[k] for k in names})

    pixels = lazy_array(
        graph_of(median),
        median,
        chunks=((1,) * len(bands), rows, cols),
        dtype=dtype,
    )
    coords = {"y": load["y"], "x": load["x"]}
    if "spatial_ref" in load.coords:
        coords["spatial_ref"] = load["spatial_ref"]
    out = xr.DataArray(pixels, dims=("band", "y", "x"), coords={"band": list(bands), **coords})
    if mask is None and classes is None:
        return out, None
    q = lazy_array(
        graph_of(quality),
        quality,
        chunks=(rows, cols),
        dtype=np.uint8,
    )
    return out, xr.DataArray(q, dims=("y", "x"), coords=coords)


class _Loads:
    """The load tasks of one chunk (a graph and its keys per variable and date), opaque to
    Dask: they run in the read pool, not as tasks of the composite's graph."""

    def __init__(self, graph: dict[Any, Any], keys: list[list[Any]]) -> None:
        self.graph = graph
        self.keys = keys


class _Plan:
    """A :class:`MaskPlan` opaque to Dask (its table is an argument, not a task)."""

    def __init__(self, plan: MaskPlan) -> None:
        self.plan = plan


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="xclay-read")
        return _pools[threads]


def _read(loads: _Loads, threads: int) -> list[np.ndarray]:
    """Every variable's observations of one chunk, ``(time, y, x)`` each, read with
    ``threads`` reads in flight."""
    import dask.threaded

    flat = [key for row in loads.keys for key in row]
    blocks = dask.threaded.get(loads.graph, flat, pool=_pool(threads))
    out, at = [], 0
    for row in loads.keys:
        out.append(np.concatenate(blocks[at : at + len(row)], axis=0))
        at += len(row)
    return out


@dataclass
class _Masked:
    """A chunk's band observations, which of them count, and whether any does, on the
    composite's device."""

    bands: list[Any]
    valid: Any
    any_valid: Any
    xp: Any


def _mask(
    observations: list[np.ndarray], nbands: int, classes: np.ndarray | None, plan: _Plan
) -> _Masked:
    settings = plan.plan
    xp = array_module(settings.device)
    bands = to_device(observations[:nbands], xp)
    excluded = None
    if len(observations) > nbands:  # the mask's raw values
        (raw,) = to_device(observations[nbands:], xp)
        (table,) = to_device([settings.table], xp) if settings.table is not None else (None,)
        excluded = excluded_observations(raw, table, settings.decode, xp)
    elif classes is not None:  # pixel classes already
        (raw,) = to_device([classes], xp)
        (table,) = to_device([_CLASS_TABLE], xp)
        excluded = excluded_observations(raw, table, None, xp)
    valid = valid_observations(bands, excluded, settings.nodata, xp)
    return _Masked(bands, valid, xp.any(valid, axis=0), xp)


def _median(masked: _Masked, band: int, fill: float) -> np.ndarray:
    xp = masked.xp
    return to_host(median_of_valid(masked.bands[band], masked.valid, fill, xp), xp)[None]


def _quality(masked: _Masked) -> np.ndarray:
    xp = masked.xp
    classes = xp.where(
        masked.any_valid, np.uint8(PixelClass.CLEAR), np.uint8(PixelClass.NODATA)
    ).astype(np.uint8)
    return to_host(classes, xp)


def _class_table() -> np.ndarray:
    from xclay.ingest.composite import exclusion_table

    table = exclusion_table(None, np.uint8)
    assert table is not None
    return table


_CLASS_TABLE = _class_table()
