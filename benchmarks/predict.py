"""A map over a continent's embeddings: chips predicted per second, and the memory it takes.

Builds a synthetic embeddings Zarr as xclay writes it (``xclay.to_zarr``: chunks of 32 x 32
chips with all features, zstd) of ``--chips`` chips of ``--dim`` float32 values (South
America at 256 px: 2.7 million 1024-d chips, 11 GB) in a separate process, fits each model
on 500 labelled chips of it (``xclay.apply.fit``), then times ``xclay.apply.predict`` over
the whole store on this machine's CPU (or GPU, ``--device``): blocks of whole chunks read
ahead while the model runs. The store's vectors are low-rank plus noise (what compresses
of real embeddings, roughly); the figures are for a warm page cache (the store was just
written). Peak memory is this process's (it never holds the store).

    python benchmarks/predict.py [--chips 2700000 --dim 1024 --models linear,mlp,knn]
    python benchmarks/predict.py --store /tmp/sa.zarr --keep   # reuse a built store
    python benchmarks/predict.py --smoke                       # 4,096 chips of 64-d
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import is_smoke, parse, save

GOAL_S = 120.0  # the issue's: 2.7 million 1024-d chips within 2 minutes on this CPU
CHUNK = 32  # chips a chunk edge, as xclay.to_zarr writes
LABELS = 500
CLASSES = 10


def build(path: Path, chips: int, dim: int, seed: int = 0) -> None:
    """An embeddings Zarr of ``chips`` chips (a square grid) of ``dim`` float32 values,
    written chunk by chunk (dask) through xclay.to_zarr."""
    import dask.array as da
    import xarray as xr

    import xclay
    from xclay.batch.chips import ChipGrid, ChipGridSpec
    from xclay.testing import synthetic_cube

    side = int(np.ceil(np.sqrt(chips)))
    cube = synthetic_cube((1, 4, 64, 64), seed=seed, res=10.0)
    template = xclay.embed(cube, model="rcf", chip_size=32, progress=False)
    attrs = dict(template.attrs)
    card = dict(attrs["model"])
    card.update(dim=dim, output_shape=[], params={"synthetic": True, "seed": seed})
    attrs["model"] = card
    attrs["config"] = {
        **attrs["config"],
        "grid": {"chip_size": 256, "stride": None, "edges": "drop"},
    }
    datacube = dict(attrs["datacube"])
    gt = list(datacube["geotransform"])
    datacube["shape"] = [side * 256, side * 256]
    attrs["datacube"] = datacube
    from affine import Affine
    from odc.geo.geobox import GeoBox

    box = GeoBox((side * 256, side * 256), Affine.from_gdal(*gt), datacube["crs_wkt"])
    grid = ChipGrid.from_geobox(box, ChipGridSpec(256))
    y, x = grid.centres()
    rows, cols = grid.offsets()
    lon, lat = grid.centres_lonlat()
    basis = np.random.default_rng(seed).standard_normal((32, dim)).astype(np.float32)

    def block(block_info: Any = None) -> np.ndarray:
        _, (r0, r1), (c0, c1), _ = block_info[None]["array-location"]
        rng = np.random.default_rng([seed, r0, c0])
        n = (r1 - r0) * (c1 - c0)
        latent = rng.standard_normal((n, 32), dtype=np.float32)
        vectors = latent @ basis + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
        return vectors.reshape(1, r1 - r0, c1 - c0, dim)

    chunks = (1, CHUNK, CHUNK, dim)
    vectors = da.map_blocks(
        block, dtype=np.float32, chunks=da.core.normalize_chunks(chunks, (1, side, side, dim))
    )
    per_chip = ("time", "chip_y", "chip_x")
    emb = xr.Dataset(
        {
            "embedding": ((*per_chip, "feature"), vectors, {"long_name": "synthetic embedding"}),
            "embedded": (per_chip, da.ones((1, side, side), dtype=bool, chunks=chunks[:3])),
            "nodata_fraction": (per_chip, da.zeros((1, side, side), np.float32, chunks=chunks[:3])),
        },
        coords={
            "time": template["time"].values,
            "chip_y": y,
            "chip_x": x,
            "feature": np.arange(dim, dtype=np.int32),
            "row_off": ("chip_y", rows),
            "col_off": ("chip_x", cols),
            "spatial_ref": template["spatial_ref"],
            "chip_id": (("chip_y", "chip_x"), grid.chip_ids()),
            "lat": (("chip_y", "chip_x"), lat),
            "lon": (("chip_y", "chip_x"), lon),
        },
        attrs=attrs,
    )
    xclay.to_zarr(emb, path, overwrite=True)


def labels(path: Path, seed: int = 0) -> Any:
    """500 points at random chips' centres, of 10 random classes."""
    import geopandas as gpd

    import xclay

    emb = xclay.open_embeddings(path)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, emb.sizes["chip_y"], LABELS)
    j = rng.integers(0, emb.sizes["chip_x"], LABELS)
    x, y = emb["chip_x"].values[j], emb["chip_y"].values[i]
    classes = np.array([f"class {k}" for k in rng.integers(0, CLASSES, LABELS)])
    crs = emb.attrs["datacube"]["crs_wkt"]
    return gpd.GeoDataFrame({"landcover": classes}, geometry=gpd.points_from_xy(x, y), crs=crs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chips", type=int, default=2_700_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--models", default="linear,mlp,knn", help="comma-separated model kinds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--block-mb", type=int, default=256)
    p.add_argument("--store", type=Path, default=None, help="the store (built when absent)")
    p.add_argument("--keep", action="store_true", help="keep the store built")
    p.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    args = parse(p, {"chips": 4096, "dim": 64, "block_mb": 1})
    if args.build_only:
        build(args.store, args.chips, args.dim)
        return

    import xclay
    from xclay.apply import fit, predict

    folder = None
    store = args.store
    if store is None:
        folder = Path(tempfile.mkdtemp(prefix="xclay-bench-predict-"))
        store = folder / "embeddings.zarr"
    built_s = None
    if not (store / "zarr.json").is_file():
        t0 = time.perf_counter()
        argv = [sys.executable, __file__, "--build-only", "--store", str(store)]
        argv += ["--chips", str(args.chips), "--dim", str(args.dim)]
        subprocess.run(argv, check=True)
        built_s = round(time.perf_counter() - t0, 1)
        print(f"built {store} in {built_s} s", flush=True)
    try:
        emb = xclay.open_embeddings(store)
        chips = int(emb.sizes["chip_y"] * emb.sizes["chip_x"])
        dim = int(emb.sizes["feature"])
        stored = sum(f.stat().st_size for f in (store / "embedding").rglob("*") if f.is_file())
        points = labels(store)
        rows = []
        for kind in args.models.split(","):
            params = {"mlp": {"epochs": 100}, "knn": {"k": 10}, "linear": {"alpha": 0.1}}[kind]
            t0 = time.perf_counter()
            model = fit(emb, points, column="landcover", model=kind, params=params, folds=3)  # type: ignore[arg-type]
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = predict(store, model, device=args.device, block_mb=args.block_mb)
            seconds = time.perf_counter() - t0
            predicted = int((out["class"].values >= 0).sum())
            rows.append(
                {
                    "model": model.kind,
                    "params": model.params,
                    "fit_s": round(fit_s, 2),
                    "predict_s": round(seconds, 2),
                    "chips_per_s": round(chips / seconds),
                    "read_gb_per_s": round(chips * dim * 4 / seconds / 1e9, 3),
                    "chips_predicted": predicted,
                    "within_goal": bool(seconds <= GOAL_S * chips / 2_700_000),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3),
                }
            )
            print(rows[-1], flush=True)
            assert predicted == chips, (predicted, chips)
        results = {
            "chips": chips,
            "dim": dim,
            "store_bytes": stored,
            "vector_bytes": chips * dim * 4,
            "store_build_s": built_s,
            "goal_s_for_2_7_million": GOAL_S,
            "rows": rows,
        }
        path = save("predict", vars(args) | {"store": str(store)}, results, device=args.device)
        print(f"wrote {path}")
    finally:
        if folder is not None and (is_smoke() or not args.keep):
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
