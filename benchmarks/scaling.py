"""Chips/s of a whole run (ingest + embed) with 1 and 2 Dask workers; parallel efficiency.

The demo composite is written as a GeoTIFF, made into a STAC item, and run
with ``rcf`` through ``xclay.run.run``: in this process (torch on all cores),
then on a LocalCluster of 1 worker and of 2 workers, each worker with one core
(one torch thread). Parallel efficiency = rate(2 workers) / (2 x rate(1 worker)).

    python benchmarks/scaling.py [--size 2048] [--chip-size 128] [--region-chips 4]
    python benchmarks/scaling.py --smoke      # 256 px, 64 px chips, 16 filters, workers only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pystac
import rasterio
import yaml
from _common import parse, save

import xclay
from xclay.datacube import datacube_geobox
from xclay.ingest import stac_item
from xclay.run import client_for, load_spec, run, warm_workers


def write_scene(folder: Path, size: int) -> Path:
    cube = xclay.datasets.demo_composite(size)
    gb = datacube_geobox(cube)
    pixels = cube["pixels"].values[0]
    tif = folder / "demo.tif"
    with rasterio.open(
        tif, "w", driver="GTiff", width=size, height=size, count=pixels.shape[0], dtype=pixels.dtype,
        crs=str(gb.crs), transform=gb.affine, nodata=0, tiled=True, blockxsize=256, blockysize=256,
    ) as dst:  # fmt: skip
        dst.write(pixels)
    item = stac_item(
        tif,
        bands=[str(b) for b in cube["band"].values],
        datetime="2024-07-02",
        platform="sentinel-2-l2a",
        id="demo",
    )
    items = folder / "items.json"
    pystac.ItemCollection([item]).save_object(dest_href=str(items))
    return items


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--chip-size", type=int, default=128)
    p.add_argument("--region-chips", type=int, default=4)
    p.add_argument("--filters", type=int, default=256)
    p.add_argument(
        "--no-in-process", dest="in_process", action="store_false",
        help="leave out the run in this process (the workers' runs make the figures)",
    )  # fmt: skip
    args = parse(
        p, {"size": 256, "chip_size": 64, "region_chips": 2, "filters": 16, "in_process": False}
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        items = write_scene(Path(tmp), args.size)
        variants = [("in process", None)] if args.in_process else []
        for label, cluster in [*variants, ("1 worker", "local:1"), ("2 workers", "local:2")]:
            folder = Path(tmp) / label.replace(" ", "_")
            folder.mkdir()
            spec_path = folder / "spec.yaml"
            spec_path.write_text(yaml.safe_dump({
                "input": {"stac": {"items": str(items)}, "platform": "sentinel-2-l2a"},
                "grid": {"resolution": 10, "chip_size": args.chip_size},
                "model": {"name": "rcf", "options": {"num_filters": args.filters}},
                "compute": {"region_chips": args.region_chips},
                "outputs": {"dir": "out"},
            }))  # fmt: skip
            spec = load_spec(spec_path)
            # One core per worker: the 2-worker run has twice the 1-worker run's resources.
            client, threads = client_for(cluster, None, "cpu", threads=1)
            try:
                if client is not None:
                    warm_workers(client)  # cluster start-up is not throughput
                start = time.perf_counter()
                report = run(spec, client=client, progress=False, torch_threads=threads)
                wall = time.perf_counter() - start
            finally:
                if client is not None:
                    client.close()
            chips = report.run["chips_embedded"]
            rows[label] = {
                "chips": chips,
                "wall_seconds": round(wall, 2),
                "seconds": {k: round(v, 2) for k, v in report.seconds.items()},
                "chips_per_s": round(chips / wall, 2),
                "embed_chips_per_s": round(chips / report.seconds["embed"], 2),
                "torch_threads_per_task": threads,
            }
            emb = xclay.open_embeddings(spec.embeddings_path)
            rows[label]["checksum"] = float(np.nansum(emb["embedding"].values))
    r1, r2 = rows["1 worker"]["chips_per_s"], rows["2 workers"]["chips_per_s"]
    e1, e2 = rows["1 worker"]["embed_chips_per_s"], rows["2 workers"]["embed_chips_per_s"]
    results = {
        "rows": rows,
        "parallel_efficiency_2_workers": round(r2 / (2 * r1), 3),
        "embed_phase_parallel_efficiency_2_workers": round(e2 / (2 * e1), 3),
        "speedup_2_over_1": round(r2 / r1, 3),
        "cores": os.cpu_count(),
    }
    out = save("scaling", vars(args), results)
    for label, r in rows.items():
        print(
            f"{label:12s} {r['chips_per_s']:8.2f} chips/s (embed {r['embed_chips_per_s']:.2f}), {r['wall_seconds']} s"
        )
    print(
        f"2 workers / 1 worker: {results['speedup_2_over_1']}x; parallel efficiency {results['parallel_efficiency_2_workers']}"
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
