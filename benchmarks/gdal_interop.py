"""Do real GDAL builds open xclay's outputs? A check to rerun on a machine with GDAL.

Writes, in a scratch folder, a datacube (sharded, checksummed), an embeddings Zarr (from
a run, consolidated) and Cloud-Optimized GeoTIFFs (every feature float32; PCA int8),
then asks each GDAL given (its command-line tools) to describe them and to translate
each array to a GeoTIFF, which is compared value for value with what xclay wrote.

    python benchmarks/gdal_interop.py                              # the gdalinfo on PATH
    python benchmarks/gdal_interop.py --gdal "" --gdal "chroot /tmp/sid" --root /tmp/sid

``--gdal`` is a command prefix (repeatable; "" is the tools on PATH); with ``--root``
the files are written under that folder, and prefixes starting with ``chroot`` see
them at ``/data``. GDAL reads Zarr v3 from 3.11 on; older GDALs are expected to open
the GeoTIFFs only. Where a prefix finds no ``gdalinfo``, the result says so.

    python benchmarks/gdal_interop.py --smoke      # a 256 px datacube, the GDAL on PATH
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import xarray as xr
from _common import parse, save

import xclay
from xclay.datasets import demo_composite
from xclay.outputs.cog import to_cog
from xclay.run import RunSpec, run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gdal", action="append", default=None, help="command prefix (repeatable)")
    p.add_argument("--root", type=Path, default=None, help="a chroot's root (files go to /data)")
    p.add_argument("--size", type=int, default=1024, help="datacube edge in pixels")
    args = parse(p, {"size": 256, "root": None})
    prefixes = args.gdal if args.gdal is not None else [""]
    base = (args.root / "data") if args.root else Path(tempfile.mkdtemp(prefix="xclay-gdal-"))
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    results = []
    try:
        outputs = _write(base, args.size)
        for prefix in prefixes:
            inside = bool(args.root) and prefix.startswith("chroot")
            seen = {
                k: (Path("/data") / v.relative_to(base)) if inside else v
                for k, v in outputs.items()
            }
            results.append(_check(prefix, outputs, seen, base))
            print(json.dumps(results[-1], indent=1))
    finally:
        if args.root is None:
            shutil.rmtree(base, ignore_errors=True)
    save("gdal_interop", {"gdal": prefixes, "size": args.size}, {"readers": results})


def _write(base: Path, size: int) -> dict[str, Path]:
    cube = xclay.write_datacube(
        demo_composite(size, seed=2), base / "cube.zarr", chip_size=64, shard_chips=2
    )
    spec = RunSpec.from_dict(
        {
            "input": {"datacube": str(cube)},
            "grid": {"chip_size": 32},  # 32 x 32 chips, 4 to a stored chunk
            "model": {"name": "rcf", "options": {"num_filters": 16, "sample_chips": 8}},
            "compute": {"region_chips": 4},
            "outputs": {"dir": str(base / "run")},
        }
    )
    run(spec, progress=False)
    emb = base / "run" / "embeddings.zarr"
    (features,) = to_cog(emb, base / "features.tif")
    (pca,) = to_cog(emb, base / "pca.tif", pca=3, dtype="int8", blocksize=16)  # overviews
    return {"cube": cube, "embeddings": emb, "features_cog": features, "pca_cog": pca}


def _gdal(prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*shlex.split(prefix), *args], capture_output=True, text=True)


def _check(
    prefix: str, outputs: dict[str, Path], seen: dict[str, Path], base: Path
) -> dict[str, Any]:
    tool = shlex.split(prefix)[0] if prefix.strip() else "gdalinfo"
    if shutil.which(tool) is None:
        return {"gdal": prefix or "PATH", "version": None, "error": f"{tool} not found"}
    version = _gdal(prefix, "gdalinfo", "--version").stdout.strip()
    out: dict[str, Any] = {"gdal": prefix or "PATH", "version": version, "checks": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cube = xr.open_zarr(outputs["cube"])
        emb = xr.open_zarr(outputs["embeddings"])
    arrays = {
        "datacube pixels (sharded, crc32c)": (
            f'ZARR:"{seen["cube"]}":/pixels',
            cube["pixels"].values[0],
        ),
        "embeddings: embedding": (
            f'ZARR:"{seen["embeddings"]}":/embedding',
            np.moveaxis(emb["embedding"].values[0], -1, 0),
        ),
        "embeddings: nodata_fraction": (
            f'ZARR:"{seen["embeddings"]}":/nodata_fraction',
            emb["nodata_fraction"].values[0][None],
        ),
        "COG, every feature (float32)": (str(seen["features_cog"]), None),
        "COG, PCA (int8, scales)": (str(seen["pca_cog"]), None),
    }
    for name, (source, expected) in arrays.items():
        target_seen = seen["cube"].parent / "translated.tif"
        target = base / "translated.tif"
        target.unlink(missing_ok=True)
        result = _gdal(prefix, "gdal_translate", "-q", source, str(target_seen))
        check: dict[str, Any] = {"opens": result.returncode == 0}
        if result.returncode != 0:
            check["error"] = result.stderr.strip()[-300:]
        else:
            with rasterio.open(target) as src:
                got = src.read()
                check["crs"] = src.crs.to_epsg() if src.crs else None
                check["transform"] = list(src.transform)[:6]
            if expected is None:
                with rasterio.open(base / Path(source).name) as orig:
                    expected = orig.read()
                    check["overviews"] = orig.overviews(1)
            check["values_equal"] = bool(np.array_equal(got, expected, equal_nan=True))
        out["checks"][name] = check
    return out


if __name__ == "__main__":
    main()
