"""Do the embeddings carry information? Predict each chip's mean elevation on Olinda.

Embeds the Landsat 7 Olinda scene (../shared/data), takes each chip's mean
elevation from the DEM of the same area (-1: unknown), and fits ridge
regressions from chip vectors to it (:func:`xclay.explore.probe.ridge_cv`: 5 folds
of 2 x 2-chip spatial blocks, the penalty chosen by nested cross-validation).
The baseline is the same regression on each chip's per-band mean digital
numbers: what the pixels say without a model.

    python benchmarks/downstream_elevation.py [--chip-size 16] [--checkpoint clay-v1.5.ckpt]
    python benchmarks/downstream_elevation.py --smoke      # 32 px chips, 64 rcf filters
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from _common import parse, require, save

import xclay
from xclay.explore.probe import chip_blocks, chip_means, ridge_cv

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import OLINDA_BANDS, OLINDA_DEM, OLINDA_TIF, OLINDA_WAVELENGTHS  # noqa: E402


def band_means(cube: object, emb: object, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``[chips, bands]`` mean digital number of each band over each chip's window."""
    pixels = np.asarray(cube["pixels"].values[0], dtype=np.float64)  # type: ignore[index]
    size = int(emb.attrs["config"]["grid"]["chip_size"])  # type: ignore[attr-defined]
    r_off = np.asarray(emb["row_off"].values)[rows]  # type: ignore[index]
    c_off = np.asarray(emb["col_off"].values)[cols]  # type: ignore[index]
    return np.stack(
        [
            pixels[:, r : r + size, c : c + size].mean(axis=(1, 2))
            for r, c in zip(r_off, c_off, strict=True)
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chip-size", type=int, default=16)
    p.add_argument("--block", type=int, default=2, help="spatial block edge in chips")
    p.add_argument("--checkpoint", type=Path, default=None, help="Clay weights, to add Clay")
    p.add_argument("--filters", type=int, default=None, help="rcf filters (default: rcf's)")
    args = parse(p, {"chip_size": 32, "filters": 64, "checkpoint": None})
    require(OLINDA_TIF, "the real scene (../shared/data)")
    require(OLINDA_DEM, "the scene's elevation (../shared/data)")
    import rioxarray

    cube = xclay.as_datacube(
        rioxarray.open_rasterio(OLINDA_TIF), bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS
    )
    rcf = {"num_filters": args.filters} if args.filters else {}
    models = {"rcf": xclay.models.get_model("rcf", **rcf)}
    if args.checkpoint:
        models["clay-v1.5"] = xclay.models.get_model("clay-v1.5", checkpoint=args.checkpoint)
    results: dict[str, object] = {}
    for name, model in models.items():
        emb = xclay.embed(cube, model=model, chip_size=args.chip_size, progress=False)
        elevation = chip_means(rioxarray.open_rasterio(OLINDA_DEM), emb, nodata=-1)
        usable = emb["embedded"].values[0] & np.isfinite(elevation)
        rows, cols = np.nonzero(usable)
        groups = chip_blocks(rows, cols, args.block)
        y = elevation[rows, cols]
        probe = ridge_cv(emb["embedding"].values[0][rows, cols], y, groups=groups)
        results[name] = {"r2": round(probe.r2, 4), "fold_r2": [round(v, 4) for v in probe.fold_r2]}
        if "band_means" not in results:
            base = ridge_cv(band_means(cube, emb, rows, cols), y, groups=groups)
            results["band_means"] = {
                "r2": round(base.r2, 4),
                "fold_r2": [round(v, 4) for v in base.fold_r2],
            }
            results["chips"] = int(y.size)
            results["elevation_m"] = {"min": float(y.min()), "max": float(y.max())}
    path = save("downstream_elevation", {k: str(v) for k, v in vars(args).items()}, results)
    for key, value in results.items():
        print(f"{key:14s} {value}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
