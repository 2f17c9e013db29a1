"""Ingest: xclay's against the hand-written odc-stac and stackstac versions of the same job.

The job: an annual-style median composite of Sentinel-2 L2A-like imagery, cloud-masked by
its scene classification (SCL), written as Zarr with zstd. The same synthetic COGs for
every variant (``--dates`` dates of ``--size`` x ``--size`` px at 10 m, 4 uint16 bands
with nodata 0 and the SCL, ``--tile`` px tiles, DEFLATE with the horizontal predictor,
overviews; written once with rasterio into ``--data``, a cache folder):

- ``xclay``: ``xclay.ingest.from_stac(items, bands=..., resolution=10, chunk_size=C)``
  then ``xclay.write_datacube(cube, path)`` (256 px chips, zstd), as a user writes it;
- ``odc-stac``: what a user writes with the same libraries:
  ``odc.stac.load(items, bands=[...bands, "scl"], groupby="solar_day",
  chunks={"x": C, "y": C})``, masked where the SCL is one of the classes xclay leaves out
  of composites (:data:`xclay.masks.EXCLUDED_FROM_COMPOSITES`: 0, 1, 3, 8, 9, 10) and where
  a band is nodata, ``.median("time")``, rounded back to uint16, ``to_zarr`` with zstd;
- ``stackstac``: the same with ``stackstac.stack(items, assets=..., chunksize=C)``.

Each variant runs ``--repeats`` times in a fresh process, the variants alternated (A, B,
C, B, C, A, ...), with ``--threads`` Dask threads (the threaded scheduler), on each
``--modes``: ``local`` (files on disk, in the page cache), ``http`` (the same files from
a local range-serving HTTP/1.1 server, run by this script in a process of its own) and
``http-20ms`` (the same, each request answered ``--latency`` seconds late, as object
storage answers). The GDAL settings are xclay's cloud defaults
(:data:`xclay.storage.gdal.CLOUD_DEFAULTS`) for every variant. Per run: CPU seconds of the
process during the job (every thread), wall seconds, peak RSS, and over HTTP the requests
and bytes the server answered. Every variant's output is compared with a reference made
here with NumPy alone (rasterio reads, the same mask, ``np.nanmedian`` in float64, rounded
half to even): the pixels must be identical.

With ``--profile`` (default when py-spy is installed) each variant runs once more on
local files under ``py-spy record`` (else cProfile) and the result keeps its top
functions (self time) and the share of a few groups (reads and decode, the median,
masking, Dask's scheduler, the Zarr write).

    python benchmarks/ingest.py                       # 12 dates, 2048 px, 3 repeats, all modes
    python benchmarks/ingest.py --modes local --repeats 5
    python benchmarks/ingest.py --smoke               # 3 dates, 512 px, 256 px tiles

Goals (issue 24; ratios of medians in one run): xclay's CPU per band-observation <= 0.5x
odc-stac's on local files; its wall time with 20 ms per request <= 0.5x odc-stac's; its
peak memory no higher than odc-stac's; identical pixels.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import is_smoke, median, parse, save  # noqa: E402

BANDS = ["blue", "green", "red", "nir"]
MASK = "scl"
NODATA = 0
CRS = "EPSG:32720"
ORIGIN = (500000.0, 9650000.0)  # UTM 20S, near Manaus
RES = 10.0
# The SCL classes xclay leaves out of composites (xclay.masks: nodata 0, 1; cloud shadow 3;
# cloud 8, 9; thin cirrus 10): checked against xclay's decoder in main().
EXCLUDED_SCL = [0, 1, 3, 8, 9, 10]
VARIANTS = ["xclay", "odc-stac", "stackstac"]
MODES = ["local", "http", "http-20ms"]
DATA_VERSION = 1  # of the synthetic imagery: a new version writes a new cache folder


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048, help="image edge in pixels")
    p.add_argument("--dates", type=int, default=12, help="acquisition dates")
    p.add_argument("--tile", type=int, default=512, help="COG tile edge in pixels")
    p.add_argument("--chunk", type=int, default=1024, help="Dask chunk edge (every variant)")
    p.add_argument("--threads", type=int, default=2, help="Dask threads (every variant)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per variant and mode")
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--latency", type=float, default=0.02, help="seconds, mode http-20ms")
    p.add_argument("--data", type=Path, default=None, help="where the COGs are cached")
    p.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="profile each variant once (default: when py-spy is installed)",
    )
    p.add_argument("--tag", default="", help="added to the result file's name")
    p.add_argument(
        "--step-only",
        action="store_true",
        help="time only the composite step (masking and medians of decoded observations in "
        "memory) on one CPU core and, where CuPy sees a GPU, on the GPU",
    )
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a run: VARIANT
    p.add_argument("--items", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--serve", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--log", type=Path, default=None, help=argparse.SUPPRESS)
    args = parse(
        p, {"size": 512, "dates": 3, "tile": 256, "chunk": 256, "repeats": 1,
            "modes": ["local", "http-20ms"], "variants": ["xclay", "odc-stac"], "profile": False},
    )  # fmt: skip
    if args.serve is not None:
        serve(args.serve, args.log, args.latency)
        return
    if args.child is not None:
        print(json.dumps(child(args.child, args.items, args.out, args.chunk, args.threads)))
        return

    _check_classes()
    if args.step_only:
        step = composite_step(args.size, args.dates, args.repeats)
        params = {"size": args.size, "dates": args.dates, "repeats": args.repeats,
                  "bands": BANDS, "smoke": is_smoke()}  # fmt: skip
        device = "cuda" if step.get("cuda") else "cpu"
        out = save("ingest", params, {"composite_step": step}, device=device,
                   variant=args.tag or "composite-step")  # fmt: skip
        print(json.dumps(step, indent=1))
        print(f"saved {out}")
        return
    available = [v for v in args.variants if v != "stackstac" or _importable("stackstac")]
    left_out = {
        v: "stackstac is not installed (pip install stackstac; it pins pandas<3, xclay's lock "
        "has pandas 3)"
        for v in args.variants
        if v not in available
    }
    scratch = Path(tempfile.mkdtemp(prefix="xclay-bench-ingest-"))
    data = args.data or (scratch / "data" if is_smoke() else _cache_dir(args))
    try:
        items = write_imagery(data, args.size, args.dates, args.tile)
        reference = reference_composite(data, args.size, args.dates)
        results = measure(args, available, items, reference, scratch)
        results["left_out"] = left_out
        if args.profile is None:
            args.profile = shutil.which("py-spy") is not None or _pyspy() is not None
        if args.profile:
            results["profiles"] = {v: profile(v, items, scratch, args) for v in available}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["summary"] = summarise(results["runs"], args)
    results["composite_step"] = composite_step(min(args.size, 1024), args.dates, args.repeats)
    params = {
        **{k: v for k, v in vars(args).items()
           if k not in ("child", "items", "out", "serve", "log", "data")},
        "bands": BANDS,
        "mask": MASK,
        "excluded_scl": EXCLUDED_SCL,
        "band_observations": len(BANDS) * args.dates * args.size**2,
        "imagery_bytes": sum(f.stat().st_size for f in data.glob("*.tif")),
        "data": str(data),
    }  # fmt: skip
    out = save("ingest", params, results, variant=args.tag)
    print(table(results["summary"]))
    print("composite step: " + json.dumps(results["composite_step"]))
    print(f"saved {out}")


# --------------------------------------------------------------------------- the imagery


def _cache_dir(args: argparse.Namespace) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return (
        base
        / "xclay"
        / "bench-ingest"
        / (f"v{DATA_VERSION}_{args.size}px_{args.dates}d_{args.tile}t")
    )


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1): bilinear interpolation of a coarse grid."""
    coarse = rng.random((cells + 1, cells + 1))
    at = np.linspace(0, cells, size)
    lo = np.minimum(at.astype(int), cells - 1)
    frac = at - lo
    weights = np.zeros((size, cells + 1))
    weights[np.arange(size), lo] = 1 - frac
    weights[np.arange(size), lo + 1] = frac
    return np.asarray(weights @ coarse @ weights.T)


def write_imagery(folder: Path, size: int, dates: int, tile: int) -> list[dict[str, Any]]:
    """The COGs and their STAC items (as dicts, hrefs absolute), written once per folder."""
    listing = folder / "items.json"
    if listing.is_file():
        return list(json.loads(listing.read_text())["features"])
    import rasterio
    from affine import Affine

    from xclay.ingest import stac_item

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(24)
    land = _smooth(rng, size, 8)
    water = land < 0.25
    base = {b: 300 + 3000 * _smooth(rng, size, 16) * (k + 1) / len(BANDS) for k, b in
            enumerate(BANDS)}  # fmt: skip
    profile = {
        "driver": "COG", "width": size, "height": size, "count": 1, "crs": CRS,
        "transform": Affine(RES, 0, ORIGIN[0], 0, -RES, ORIGIN[1]),
        "compress": "DEFLATE", "predictor": 2, "blocksize": tile, "overview_resampling": "nearest",
    }  # fmt: skip
    features = []
    start = np.datetime64("2024-01-05")
    for d in range(dates):
        day = str(start + np.timedelta64(30 * d, "D"))
        cloud = _smooth(rng, size, 12) > 0.62 + 0.05 * rng.random()
        shadow = np.roll(cloud, (size // 40, size // 50), axis=(0, 1)) & ~cloud
        cirrus = (_smooth(rng, size, 6) > 0.8) & ~cloud
        scl = np.where(water, 6, np.where(land > 0.7, 5, 4)).astype(np.uint8)
        scl[cirrus] = 10
        scl[shadow] = 3
        scl[cloud] = np.where(_smooth(rng, size, 24)[cloud] > 0.5, 9, 8)
        edge = np.add.outer(np.arange(size), np.arange(size)) < size * (0.6 * (d % 3 == 0))
        scl[edge] = 0  # outside the swath on some dates
        assets = {}
        for b in BANDS:
            noise = rng.normal(0, 40, (size, size))
            value = base[b] * (0.9 + 0.2 * rng.random()) + noise + 4000 * cloud
            value = np.clip(value, 1, 10000).astype(np.uint16)
            value[rng.random((size, size)) < 1e-4] = 10000  # saturated pixels
            value[edge] = NODATA
            path = folder / f"S2_{day}_{b}.tif"
            with rasterio.open(path, "w", dtype="uint16", nodata=NODATA, **profile) as dst:
                dst.write(value, 1)
            assets[b] = path
        path = folder / f"S2_{day}_{MASK}.tif"
        with rasterio.open(path, "w", dtype="uint8", **profile) as dst:
            dst.write(scl, 1)
        assets[MASK] = path
        item = stac_item(
            assets, datetime=f"{day}T14:00:00Z", id=f"S2_{day}", collection="sentinel-2-l2a"
        )
        features.append(item.to_dict())
    listing.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return features


def reference_composite(folder: Path, size: int, dates: int) -> np.ndarray:
    """The composite made with NumPy alone: every band's observations read whole with
    rasterio, left out where the SCL is an excluded class or the band is nodata,
    ``np.nanmedian`` in float64, rounded half to even, nodata where none is left;
    ``(band, y, x)`` uint16. Cached beside the imagery."""
    cached = folder / "reference.npy"
    if cached.is_file():
        return np.load(cached)
    import warnings

    import rasterio

    items = json.loads((folder / "items.json").read_text())["features"]

    def read(href: str) -> np.ndarray:
        with rasterio.open(href) as src:
            return np.asarray(src.read(1))

    excluded = np.stack([np.isin(read(i["assets"][MASK]["href"]), EXCLUDED_SCL) for i in items])
    out = np.empty((len(BANDS), size, size), dtype=np.uint16)
    for k, b in enumerate(BANDS):
        obs = np.stack([read(i["assets"][b]["href"]) for i in items]).astype(np.float64)
        obs[excluded | (obs == NODATA)] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN pixels
            med = np.nanmedian(obs, axis=0)
        out[k] = np.round(np.nan_to_num(med, nan=NODATA)).astype(np.uint16)
    np.save(cached, out)
    return out


def _check_classes() -> None:
    """EXCLUDED_SCL are the SCL values xclay's own decoder sends out of composites."""
    import xarray as xr

    from xclay.masks import EXCLUDED_FROM_COMPOSITES, decode_scl

    values = np.arange(256, dtype=np.uint8)
    classes = decode_scl(xr.DataArray(values)).values
    mine = values[np.isin(classes, [int(c) for c in EXCLUDED_FROM_COMPOSITES])].tolist()
    if mine[: len(EXCLUDED_SCL)] != EXCLUDED_SCL or any(v < 12 for v in mine[6:]):
        raise SystemExit(f"SCL classes xclay excludes: {mine[:12]}, this benchmark: {EXCLUDED_SCL}")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- the step alone


def composite_step(size: int, dates: int, repeats: int) -> dict[str, Any]:
    """Band-observations a second of the composite step alone: the SCL's exclusion table,
    validity (nodata in any band) and each band's median, on observations already decoded
    in memory (``dates`` x ``size`` x ``size``, 4 uint16 bands and the SCL), with
    xclay's kernels: NumPy on one CPU core (its ufuncs run in the calling thread), and
    CuPy on the GPU where CuPy sees one, with and without the copies of the observations
    up and the medians down. The best of ``repeats``; the GPU's results are compared
    with the CPU's bit for bit."""
    from xclay.ingest.composite import (
        excluded_observations,
        exclusion_table,
        median_of_valid,
        valid_observations,
    )
    from xclay.masks import decode_scl

    rng = np.random.default_rng(7)
    shape = (dates, size, size)
    bands = [rng.integers(1, 10000, shape, dtype=np.uint16) for _ in BANDS]
    for band in bands:
        band[rng.random(shape) < 0.05] = NODATA
    scl = rng.choice(np.array([4, 5, 6, 4, 8, 9, 3, 10, 0], dtype=np.uint8), shape)
    table = exclusion_table(decode_scl, np.uint8)
    observations = len(BANDS) * dates * size * size

    def step(xp: Any, arrays: list[Any], device_table: Any) -> list[Any]:
        excluded = excluded_observations(arrays[-1], device_table, decode_scl, xp)
        valid = valid_observations(arrays[:-1], excluded, NODATA, xp)
        return [median_of_valid(b, valid, NODATA, xp) for b in arrays[:-1]]

    def best(run: Any) -> float:
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    cpu_s = best(lambda: step(np, [*bands, scl], table))
    out: dict[str, Any] = {
        "observations": observations,
        "cpu_one_core": {"seconds": cpu_s, "band_observations_per_s": observations / cpu_s},
    }
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no CUDA device")
    except Exception as err:  # no CuPy, or no GPU: said in the result
        out["cuda"] = None
        out["cuda_not_run"] = f"{type(err).__name__}: {err}"
        return out
    on_gpu = [cupy.asarray(a) for a in (*bands, scl)]
    gpu_table = cupy.asarray(table)

    def compute() -> None:
        step(cupy, on_gpu, gpu_table)
        cupy.cuda.runtime.deviceSynchronize()

    def with_copies() -> list[np.ndarray]:
        arrays = [cupy.asarray(a) for a in (*bands, scl)]
        return [cupy.asnumpy(m) for m in step(cupy, arrays, gpu_table)]

    compute()  # compiles the kernels
    expected = step(np, [*bands, scl], table)
    same = all(g.tobytes() == c.tobytes() for g, c in zip(with_copies(), expected, strict=True))
    gpu_s, copied_s = best(compute), best(with_copies)
    out["cuda"] = {
        "device": cupy.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "seconds": gpu_s,
        "band_observations_per_s": observations / gpu_s,
        "seconds_with_copies": copied_s,
        "band_observations_per_s_with_copies": observations / copied_s,
        "cpu_cores_matched": cpu_s / gpu_s,
        "cpu_cores_matched_with_copies": cpu_s / copied_s,
        "identical_to_cpu": same,
    }
    return out


# --------------------------------------------------------------------------- one run


def child(variant: str, items_path: Path, out: Path, chunk: int, threads: int) -> dict[str, Any]:
    """Run one variant's job in this (fresh) process; its costs."""
    import dask

    # What the variants import, imported before the clock starts: the job is measured.
    import dask.array
    import odc.stac  # noqa: F401
    import pystac  # noqa: F401
    import rasterio  # noqa: F401
    import tqdm  # noqa: F401
    import xarray  # noqa: F401
    import zarr  # noqa: F401

    import xclay.datacube
    import xclay.ingest  # noqa: F401
    from xclay.storage.gdal import CLOUD_DEFAULTS

    if _importable("distributed"):  # dask imports it at the first compute, when installed
        import distributed  # noqa: F401
    if variant == "stackstac":
        import stackstac  # noqa: F401

    items = json.loads(items_path.read_text())["features"]
    job = {"xclay": _xclay, "odc-stac": _odc_stac, "stackstac": _stackstac}[variant]
    rss_before = _peak_rss()
    cpu, wall = time.process_time(), time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=threads):
        job(items, out, chunk, dict(CLOUD_DEFAULTS))
    return {
        "cpu_s": time.process_time() - cpu,
        "wall_s": time.perf_counter() - wall,
        "peak_rss_mb": _peak_rss(),
        "rss_before_mb": rss_before,
    }


def _peak_rss() -> float:
    """This process's peak resident memory in MB (``VmHWM``: getrusage's ``ru_maxrss``
    keeps the parent's peak across fork and exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _xclay(items: list[dict[str, Any]], out: Path, chunk: int, gdal: dict[str, str]) -> None:
    import pystac

    import xclay

    cube = xclay.ingest.from_stac(
        [pystac.Item.from_dict(i) for i in items], bands=BANDS, resolution=RES, chunk_size=chunk
    )
    xclay.write_datacube(cube, out, compression="zstd")


def _zstd_to_zarr(composite: Any, out: Path) -> None:
    from zarr.codecs import ZstdCodec

    encoding = {b: {"compressors": [ZstdCodec(level=3)]} for b in composite.data_vars}
    composite.to_zarr(out, encoding=encoding, zarr_format=3, consolidated=False)


def _odc_stac(items: list[dict[str, Any]], out: Path, chunk: int, gdal: dict[str, str]) -> None:
    import odc.stac
    import pystac
    import rasterio

    with rasterio.Env(**gdal):  # captured by the lazy load, set around every read
        ds = odc.stac.load(
            [pystac.Item.from_dict(i) for i in items],
            bands=[*BANDS, MASK],
            groupby="solar_day",
            chunks={"x": chunk, "y": chunk},
        )
        data = ds[BANDS]
        clear = ~ds[MASK].isin(EXCLUDED_SCL)
        composite = data.where(clear & (data != NODATA)).median("time")
        composite = composite.fillna(NODATA).round().astype("uint16")
        _zstd_to_zarr(composite, out)


def _stackstac(items: list[dict[str, Any]], out: Path, chunk: int, gdal: dict[str, str]) -> None:
    import stackstac

    env = stackstac.rio_env.LayeredEnv(always=gdal)
    stack = stackstac.stack(
        items, assets=[*BANDS, MASK], epsg=int(CRS.split(":")[1]), resolution=RES,
        chunksize=chunk, dtype="uint16", fill_value=np.uint16(NODATA), rescale=False, gdal_env=env,
    )  # fmt: skip
    data = stack.sel(band=BANDS)
    clear = ~stack.sel(band=MASK).isin(EXCLUDED_SCL)
    composite = data.where(clear & (data != NODATA)).median("time")
    composite = composite.fillna(NODATA).round().astype("uint16")
    composite = composite.reset_coords(drop=True).to_dataset("band")
    composite.attrs = {}  # stackstac's spec and CRS objects are not JSON
    _zstd_to_zarr(composite, out)


def read_output(variant: str, out: Path) -> np.ndarray:
    """A variant's composite, ``(band, y, x)``."""
    import xarray as xr

    if variant == "xclay":
        import xclay

        return np.asarray(xclay.open_datacube(out)["pixels"].values[0])
    ds = xr.open_zarr(out, consolidated=False)
    return np.stack([np.asarray(ds[b].values) for b in BANDS])


# --------------------------------------------------------------------------- HTTP


class RangeHandler(BaseHTTPRequestHandler):
    """A folder's files over HTTP/1.1 (keep-alive), whole or ``Range: bytes=A-B``, each
    answer ``latency`` seconds late; one line per request (``METHOD PATH BYTES``) in the
    log."""

    protocol_version = "HTTP/1.1"
    folder: Path
    latency: float
    log: Any
    lock = threading.Lock()
    _RANGE = re.compile(r"bytes=(\d*)-(\d*)$")

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _answer(self, *, body: bool) -> None:
        if self.latency:
            time.sleep(self.latency)
        path = self.folder / self.path.lstrip("/").split("?")[0]
        if not path.is_file() or ".." in self.path:
            self._log(0)
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size
        start, end = 0, size - 1
        header = self.headers.get("Range", "")
        match = self._RANGE.match(header.strip()) if header else None
        if match and match.group(1):
            start, end = int(match.group(1)), min(int(match.group(2) or end), end)
        elif match and match.group(2):
            start = max(0, size - int(match.group(2)))
        if start > end:
            self._log(0)
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(HTTPStatus.PARTIAL_CONTENT if match else HTTPStatus.OK)
        self.send_header("Content-Type", "image/tiff")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if match:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent = 0
        if body:
            with path.open("rb") as f:
                sent = len(data := os.pread(f.fileno(), end - start + 1, start))
                self.wfile.write(data)
        self._log(sent)

    def _log(self, sent: int) -> None:
        with self.lock:
            self.log.write(f"{self.command} {self.path} {sent}\n")
            self.log.flush()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request log is the file


def serve(folder: Path, log: Path, latency: float) -> None:
    """Serve ``folder`` until stdin closes; print the port first."""
    with log.open("a") as out:
        handler = type("Handler", (RangeHandler,), {"folder": folder, "latency": latency,
                                                    "log": out})  # fmt: skip
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        print(server.server_address[1], flush=True)
        sys.stdin.read()
        server.shutdown()


@contextlib.contextmanager
def serving(folder: Path, log: Path, latency: float) -> Iterator[int]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(folder), "--log", str(log),
         "--latency", str(latency)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the HTTP server did not start (it said {line!r})")
        yield int(line)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def requests_in(log: Path) -> dict[str, int]:
    lines = log.read_text().splitlines() if log.is_file() else []
    return {
        "http_requests": len(lines),
        "http_bytes": sum(int(line.rsplit(" ", 1)[1]) for line in lines),
    }


def with_hrefs(items: list[dict[str, Any]], base: str) -> list[dict[str, Any]]:
    """The items with every asset's href ``base/<file name>``."""
    out = json.loads(json.dumps(items))
    for item in out:
        for asset in item["assets"].values():
            asset["href"] = f"{base}/{Path(asset['href']).name}"
    return out


# --------------------------------------------------------------------------- the runs


def measure(
    args: argparse.Namespace,
    variants: list[str],
    items: list[dict[str, Any]],
    reference: np.ndarray,
    scratch: Path,
) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    data = Path(items[0]["assets"][BANDS[0]]["href"]).parent
    for mode in args.modes:
        latency = args.latency if mode == "http-20ms" else 0.0
        log = scratch / f"requests_{mode}.log"
        with contextlib.ExitStack() as stack:
            listing = scratch / f"items_{mode}.json"
            if mode == "local":
                listing.write_text(json.dumps({"features": items}))
            else:
                port = stack.enter_context(serving(data, log, latency))
                remote = with_hrefs(items, f"http://127.0.0.1:{port}")
                listing.write_text(json.dumps({"features": remote}))
            for r in range(args.repeats):
                order = variants[r % len(variants) :] + variants[: r % len(variants)]
                for variant in order:
                    log.write_text("")
                    out = scratch / f"out_{variant}.zarr"
                    shutil.rmtree(out, ignore_errors=True)
                    row = {"mode": mode, "variant": variant, "repeat": r,
                           **run_child(variant, listing, out, args)}  # fmt: skip
                    if mode != "local":
                        row.update(requests_in(log))
                    got = read_output(variant, out)
                    row["identical_pixels"] = bool(np.array_equal(got, reference))
                    if not row["identical_pixels"]:
                        row["pixels_differing"] = int((got != reference).sum())
                    runs.append(row)
                    print(json.dumps(row), flush=True)
    return {"runs": runs}


def run_child(variant: str, listing: Path, out: Path, args: argparse.Namespace,
              prefix: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    command = [*(prefix or []), sys.executable, __file__, "--child", variant,
               "--items", str(listing), "--out", str(out), "--chunk", str(args.chunk),
               "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("{")][-1]
    return dict(json.loads(line))


# --------------------------------------------------------------------------- profiles

# Groups of the profile: a sample counts in the group of its innermost frame that one of
# these patterns matches (py-spy's frames: "function (path:line)"). A leaf in Task.__call__
# is a C function a Dask task calls directly: the baselines' masking operators (&, ~, !=).
GROUPS = {
    "read and decode (GDAL)": [r"_rio\.py", r"rasterio/", r"rio_reader", r"nodata_fuser",
                               r"_fuser\.py", r"^_read \(xclay"],
    "median": [r"_median_small_integers", r"median_of_valid", r"nanmedian", r"ma/core\.py",
               r"ma/extras\.py", r"^sort ", r"^median "],
    "masking and conversions": [r"valid_observations", r"excluded_observations", r"^isin ",
                                r"^_isin ", r"^where ", r"^astype ", r"^fillna ", r"^round ",
                                r"decode_scl", r"_classify", r"^Task\.__call__ "],
    "zarr write": [r"zarr/", r"numcodecs", r"zstd"],
    "concatenating chunks": [r"concatenate"],
    "dask scheduling": [r"dask/local\.py", r"dask/threaded\.py", r"dask/_task_spec\.py",
                        r"dask/order\.py", r"dask/optimization", r"dask/core\.py",
                        r"dask/highlevelgraph", r"dask/base\.py", r"dask/blockwise",
                        r"dask/_expr"],
}  # fmt: skip
# Leaves where a thread waits (py-spy counts some of these as active): left out of the
# shares, their total reported apart.
WAITING = [r"^_worker \(concurrent", r"^Condition\.wait ", r"^EpollSelector\.select ",
           r"^Event\.wait ", r"^Queue\.get ", r"^Thread\.join ", r"^lock\.acquire"]  # fmt: skip


def _pyspy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).is_file() else None


def profile(variant: str, items: list[dict[str, Any]], scratch: Path,
            args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    listing = scratch / "items_profile.json"
    listing.write_text(json.dumps({"features": items}))
    out = scratch / f"profile_{variant}.zarr"
    shutil.rmtree(out, ignore_errors=True)
    spy = _pyspy()
    raw = scratch / f"profile_{variant}.txt"
    if spy:
        prefix = [spy, "record", "--rate", "200", "--format", "raw", "--output", str(raw),
                  "--nonblocking", "--"]  # fmt: skip
        run_child(variant, listing, out, args, prefix)
        stacks = _collapsed(raw)
        tool = "py-spy (--format raw: collapsed stacks of every thread, idle left out)"
    else:
        prefix = [sys.executable, "-m", "cProfile", "-o", str(raw)]
        run_child(variant, listing, out, args, prefix)
        stacks = _cprofile_stacks(raw)
        tool = "cProfile (self time per function)"
    return {"tool": tool, **summarise_profile(stacks)}


def _collapsed(path: Path) -> collections.Counter[tuple[str, ...]]:
    out: collections.Counter[tuple[str, ...]] = collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        out[tuple(stack.split(";"))] += int(count)
    return out


def _cprofile_stacks(path: Path) -> collections.Counter[tuple[str, ...]]:
    import pstats

    stats = pstats.Stats(str(path))
    out: collections.Counter[tuple[str, ...]] = collections.Counter()
    for (file, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        out[(f"{name} ({file}:{line})",)] += int(row[2] * 1e4)  # self time, 0.1 ms units
    return out


def summarise_profile(stacks: collections.Counter[tuple[str, ...]]) -> dict[str, Any]:
    """Top functions by self samples, and the share of each of :data:`GROUPS`, of the job
    (samples under the benchmark's child() only: imports left out)."""
    job = {s: n for s, n in stacks.items() if _in_job(s)} or dict(stacks)
    waiting = {s: n for s, n in job.items() if any(re.search(p, s[-1]) for p in WAITING)}
    busy = {s: n for s, n in job.items() if s not in waiting}
    total = sum(busy.values()) or 1
    own: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for stack, n in busy.items():
        own[_short(stack[-1])] += n
        groups[_group(stack)] += n
    return {
        "samples": total,
        "waiting_samples_left_out": sum(waiting.values()),
        "groups_percent": {g: round(100 * n / total, 1) for g, n in groups.most_common()},
        "top_self_percent": {f: round(100 * n / total, 1) for f, n in own.most_common(12)},
    }


def _in_job(stack: tuple[str, ...]) -> bool:
    """A sample of the job: in child() (the main thread) or in a thread it started
    (Dask's and the readers' threads), not in the imports before."""
    return any(f.startswith("child (") for f in stack) or "_bootstrap (threading.py" in stack[0]


def _group(stack: tuple[str, ...]) -> str:
    """The group of the innermost frame of ``stack`` that one of :data:`GROUPS` names."""
    for frame in reversed(stack):
        for group, patterns in GROUPS.items():
            if any(re.search(p, frame) for p in patterns):
                return group
    return "other"


def _short(frame: str) -> str:
    """``name (path/to/site-packages/pkg/mod.py:12)`` -> ``name (pkg/mod.py)``."""
    match = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    name, path = match.groups()
    path = re.sub(r".*site-packages/", "", path)
    path = re.sub(r".*/(xclay|benchmarks)/", r"\1/", path)
    return f"{name} ({path})"


# --------------------------------------------------------------------------- summary


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Medians per mode and variant, and xclay's ratios to odc-stac (ratio of medians)."""
    observations = len(BANDS) * args.dates * args.size**2
    rows: dict[str, dict[str, Any]] = {}
    for mode in args.modes:
        for variant in {r["variant"] for r in runs}:
            mine = [r for r in runs if r["mode"] == mode and r["variant"] == variant]
            if not mine:
                continue
            row: dict[str, Any] = {
                key: median([float(r[key]) for r in mine])
                for key in ("cpu_s", "wall_s", "peak_rss_mb", "http_requests", "http_bytes")
                if key in mine[0]
            }
            row["cpu_ns_per_band_observation"] = 1e9 * row["cpu_s"] / observations
            row["identical_pixels"] = all(r["identical_pixels"] for r in mine)
            row["runs"] = len(mine)
            rows[f"{mode} {variant}"] = row
    ratios: dict[str, Any] = {}
    paired: dict[str, Any] = {}
    keys = ("cpu_s", "wall_s", "peak_rss_mb")
    for mode in args.modes:
        a, b = rows.get(f"{mode} xclay"), rows.get(f"{mode} odc-stac")
        if a and b:
            ratios[mode] = {k: a[k] / b[k] for k in keys}
            # each repeat's xclay run against the odc-stac run of the same round
            rounds = {
                r["repeat"]: {x["variant"]: x for x in runs
                              if x["mode"] == mode and x["repeat"] == r["repeat"]}
                for r in runs if r["mode"] == mode
            }  # fmt: skip
            pairs = [v for v in rounds.values() if "xclay" in v and "odc-stac" in v]
            paired[mode] = {
                k: median([v["xclay"][k] / v["odc-stac"][k] for v in pairs]) for k in keys
            }
    goals = {}
    if "local" in ratios:
        goals["cpu_per_band_observation_local <= 0.5x odc-stac"] = ratios["local"]["cpu_s"] <= 0.5
        goals["peak_rss_local <= odc-stac"] = ratios["local"]["peak_rss_mb"] <= 1.0
    if "http-20ms" in ratios:
        goals["wall_http_20ms <= 0.5x odc-stac"] = ratios["http-20ms"]["wall_s"] <= 0.5
    goals["identical_pixels"] = all(r["identical_pixels"] for r in runs)
    return {
        "rows": rows,
        "xclay_over_odc_stac": ratios,
        "xclay_over_odc_stac_paired": paired,
        "goals": goals,
    }


def table(summary: dict[str, Any]) -> str:
    lines = ["| mode | variant | CPU (s) | wall (s) | peak RSS (MB) | ns CPU / band-obs | "
             "requests | MB read | identical |", "|---" * 9 + "|"]  # fmt: skip
    for name, row in summary["rows"].items():
        mode, variant = name.split(" ", 1)
        mb = f"{row['http_bytes'] / 1e6:.0f}" if "http_bytes" in row else ""
        req = f"{row['http_requests']:.0f}" if "http_requests" in row else ""
        lines.append(
            f"| {mode} | {variant} | {row['cpu_s']:.2f} | {row['wall_s']:.2f} | "
            f"{row['peak_rss_mb']:.0f} | {row['cpu_ns_per_band_observation']:.1f} | {req} | "
            f"{mb} | {row['identical_pixels']} |"
        )
    lines.append("")
    for mode, r in summary["xclay_over_odc_stac"].items():
        pairs = summary["xclay_over_odc_stac_paired"][mode]
        lines.append(
            f"xclay / odc-stac, {mode} (ratio of medians; median of paired ratios): "
            + ", ".join(f"{k} {v:.2f}; {pairs[k]:.2f}" for k, v in r.items())
        )
    lines.append("goals: " + json.dumps(summary["goals"]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
