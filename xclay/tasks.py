"""The work of one region, as run on a Dask worker (or in the driving process).

Tasks take only plain values (the output folder and a region as a dict), read
what they need from the run's state folder, and cache heavy objects (the STAC
items, the prepared encoder with its model) once per process, so a worker
loads the model once, not once per task. A task records its region as done
only after the region's data is written; an error is recorded as the
region's failure (with its reason) instead of crashing the run.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from xclay.regions import Region, RunState

__all__ = ["embed_region", "ingest_region"]

log = logging.getLogger(__name__)

_CACHE: dict[tuple[str, str], Any] = {}
_LOCK = threading.Lock()


def _cached(outdir: str, kind: str, build: Any) -> Any:
    with _LOCK:
        key = (outdir, kind)
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def _threads(record: dict[str, Any]) -> None:
    n = record.get("torch_threads")
    if n:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(int(n))


def _run_task(outdir: str, region_data: dict[str, Any], work: Any) -> dict[str, Any]:
    region = Region.from_dict(region_data)
    state = RunState(outdir)
    start = time.perf_counter()
    try:
        record = state.record()
        _threads(record)
        info = work(outdir, record, region)
    except Exception as err:  # recorded for the report and the next run, not raised
        reason = f"{type(err).__name__}: {err}"
        log.warning("region %s failed: %s", region.name, reason)
        state.mark_failed(region, reason + "\n" + traceback.format_exc(limit=8))
        return {"region": region.name, "status": "failed", "reason": reason}
    info["seconds"] = round(time.perf_counter() - start, 3)
    state.mark_done(region, info)  # last: the region counts only once its data is written
    return {"region": region.name, "status": "done", **info}


# --------------------------------------------------------------------------- ingest


def ingest_region(outdir: str, region: dict[str, Any]) -> dict[str, Any]:
    """Load, mask and composite one block of the grid from STAC; write it into the datacube."""
    return _run_task(outdir, region, _ingest)


def _ingest(outdir: str, record: dict[str, Any], region: Region) -> dict[str, Any]:
    from xclay.datacube import write_datacube_block
    from xclay.ingest import from_stac, load_items

    spec = record["spec"]
    items = _cached(outdir, "items", lambda: load_items(Path(outdir) / "_xclay" / "items.json"))
    geobox = _region_geobox(record, region)
    cube = from_stac(
        items,
        bands=record["plan"]["bands"],
        resolution=record["plan"]["resolution"],
        datetime=spec["input"]["datetime"],
        composite=spec["input"]["composite"],
        mask=spec["input"]["mask"],
        platform=record["plan"]["platform"],
        wavelengths=spec["input"]["wavelengths"],
        chunk_size=max(geobox.shape),
        geobox=geobox,
        provenance=False,
    )
    (y0, y1), (x0, x1) = region.rows, region.cols
    import dask

    # The region's graph is small: compute it here, in this task's threads, not by sending
    # it back through the cluster's scheduler (which a nested compute in a task would do).
    with dask.config.set(scheduler="threads"):
        any_valid = write_datacube_block(
            cube,
            record["paths"]["datacube"],
            region.time,
            (0, y1 - y0),
            (0, x1 - x0),
            at=(region.time, y0, x0),
        )
    return {"any_valid": bool(any_valid)}


def _region_geobox(record: dict[str, Any], region: Region) -> Any:
    from affine import Affine
    from odc.geo.geobox import GeoBox

    grid = record["grid"]
    full = GeoBox(tuple(grid["shape"]), Affine(*grid["affine"][:6]), grid["crs"])
    (y0, y1), (x0, x1) = region.rows, region.cols
    return full[y0:y1, x0:x1]


# --------------------------------------------------------------------------- embed


def embed_region(outdir: str, region: dict[str, Any]) -> dict[str, Any]:
    """Embed one block of chips; write it into the embeddings Zarr and a GeoParquet part."""
    return _run_task(outdir, region, _embed)


def _session(outdir: str, record: dict[str, Any]) -> Any:
    from xclay.datacube import open_datacube
    from xclay.embed import EmbedConfig, EmbedSession
    from xclay.models.registry import encoder_from_card

    def build() -> Any:
        checkpoint = record["paths"].get("checkpoint")
        encoder = encoder_from_card(record["card"], checkpoint=checkpoint)
        config = EmbedConfig.from_dict(record["embed_config"])
        cube = open_datacube(record["paths"]["datacube"])
        return EmbedSession(cube, encoder, config)

    return _cached(outdir, "session", build)


def _embed(outdir: str, record: dict[str, Any], region: Region) -> dict[str, Any]:
    from xclay.batching import Block
    from xclay.export import to_geoparquet, write_embeddings_region
    from xclay.quantize import quantize_embeddings

    session = _session(outdir, record)
    block = Block((region.time, region.time + 1), region.rows, region.cols)
    result = session.embed_block(block, progress=False)
    ds = session.dataset(result)
    ds.attrs["run_spec"] = record["spec"]
    ds.attrs["run_plan"] = record["plan"]
    quantize = record["spec"]["outputs"].get("quantize")
    stored = quantize_embeddings(ds, quantize) if quantize else ds
    write_embeddings_region(
        record["paths"]["embeddings"], stored, (region.time, region.rows[0], region.cols[0])
    )
    part = Path(record["paths"]["geoparquet"]) / f"part-{region.index:06d}.parquet"
    if result.counts["chips_embedded"]:
        to_geoparquet(ds, part, quantize=quantize, overwrite=True)
    else:
        part.unlink(missing_ok=True)
    return {"counts": result.counts}
