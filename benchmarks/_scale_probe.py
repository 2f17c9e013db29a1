"""Region-task and worker set-up costs against the size of the whole grid (null encoder,
empty datacube). Uses only APIs that exist in every version since regional runs, so the
same probe measures the code before and after a change.

    python benchmarks/_scale_probe.py --chips 1e4 1e5 1e6 [--json out.json]
    python benchmarks/_scale_probe.py --smoke      # 256 and 1,024 chips
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import dask.array as da
import numpy as np
import torch
import xarray as xr
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

import xclay
from xclay.batch.batching import Block
from xclay.batch.chips import ChipGridSpec
from xclay.datacube import create_datacube_store, mark_complete
from xclay.embed import EmbedConfig, EmbedSession
from xclay.model_card import ModelCard
from xclay.outputs.export import create_embeddings_store, to_geoparquet, write_embeddings_region
from xclay.quality import QualityFilter

CHIP = 8  # pixels: the pixel work per chip is negligible; what is left is the machinery
REGION = 16  # chips a side: 256-chip regions


class NullEncoder:
    """Does no work: a 16-d zero vector per chip."""

    preferred_precision = "fp32"

    @property
    def card(self) -> ModelCard:
        return ModelCard(
            name="null", version="0", family="none", description="no-op", dim=16, output="pooled"
        )

    def prepare(self, spec, sample, *, device, precision) -> None:
        pass

    def encode(self, batch):
        return torch.zeros(len(batch), 16)


def empty_cube(path: Path, chips: int) -> Path:
    side = math.isqrt(int(chips))
    n = side * CHIP
    geobox = GeoBox((n, n), Affine(10.0, 0, 300000.0, 0, -10.0, 9000000.0), "EPSG:32720")
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    pixels = xr.DataArray(
        da.zeros((1, 1, n, n), dtype="uint16", chunks=(1, 1, 4096, 4096)),
        dims=("time", "band", "y", "x"),
        coords={"time": np.array(["2024-07-01"], dtype="datetime64[ns]"), "band": ["b1"],
                "y": coords["y"], "x": coords["x"], "spatial_ref": coords["spatial_ref"]},
    )  # fmt: skip
    cube = xclay.as_datacube(pixels, wavelengths=[0.65])
    create_datacube_store(cube, path, chip_size=CHIP, shard_chips=REGION)
    chunks_left_unwritten(path)
    mark_complete(path)
    return path


def chunks_left_unwritten(path: Path) -> None:
    """Say in the store that its unwritten chunks read as the fill value: xclay's stores
    write every chunk (a missing one is damage), but here no chunk is written, so that
    reading costs the machinery and not pixels. (The same in scale.py: the probe runs
    against older checkouts, so it imports nothing of the benchmarks.)"""
    meta_path = path / "pixels" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    integrity = meta.get("attributes", {}).get("xclay_integrity")
    if integrity:
        integrity["every_chunk_written"] = False
        meta_path.write_text(json.dumps(meta))


def measure(chips: int, tmp: Path) -> dict[str, float]:
    cube_path = empty_cube(tmp / f"cube{chips}.zarr", chips)
    cube = xclay.open_datacube(cube_path)
    config = EmbedConfig(
        grid=ChipGridSpec(chip_size=CHIP), batch_size=256, quality=QualityFilter(max_nodata=1.0),
        device="cpu", prefetch=0,
    )  # fmt: skip
    tracemalloc.start()
    start = time.perf_counter()
    session = EmbedSession(cube, NullEncoder(), config)
    setup_s = time.perf_counter() - start
    setup_mb = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    emb_path = tmp / f"emb{chips}.zarr"
    start = time.perf_counter()
    create_embeddings_store(session.layout(), emb_path, region_chips=REGION)
    layout_s = time.perf_counter() - start
    rows, cols = session.grid.shape
    tasks = []
    rng = np.random.default_rng(0)
    for _ in range(3):  # three regions at random places of the grid
        r = int(rng.integers(0, rows // REGION)) * REGION
        c = int(rng.integers(0, cols // REGION)) * REGION
        block = Block((0, 1), (r, r + REGION), (c, c + REGION))
        tracemalloc.start()
        start = time.perf_counter()
        result = session.embed_block(block, progress=False)
        ds = session.dataset(result)
        write_embeddings_region(emb_path, ds, (0, r, c))
        to_geoparquet(ds, tmp / f"part-{chips}-{r}-{c}.parquet", overwrite=True)
        tasks.append((time.perf_counter() - start, tracemalloc.get_traced_memory()[1] / 1e6))
        tracemalloc.stop()
    return {
        "chips": rows * cols,
        "session_setup_s": round(setup_s, 4),
        "session_setup_peak_mb": round(setup_mb, 1),
        "embeddings_store_create_s": round(layout_s, 4),
        "region_task_s": round(float(np.median([t for t, _ in tasks])), 4),
        "region_task_peak_mb": round(float(np.median([m for _, m in tasks])), 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chips", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check that the probe runs")
    args = p.parse_args()
    if args.smoke:  # no _common here: the probe runs against older checkouts too
        args.chips = [256, 1024]
        args.json = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.chips:
            row = measure(int(n), Path(tmp))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
