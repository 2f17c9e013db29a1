"""What a run costs besides the encoder, from 1e4 to 1e7 chips: growth exponents, and the
arithmetic for South America (2.7e6 chips) and the world (1.5e8 chips).

Everything here goes through the run machinery users run (``xclay.run``):

- ``embed``: a whole run (``input: {datacube: ...}``) of an empty datacube
  (no chunk written: a read fills the chip with the fill value instead of
  decoding it, so reads cost the machinery and validity, not IO and decoding,
  which ``embed_pipeline.py`` and ``read_engines.py`` measure) with a null
  encoder (a vector per chip, no work): planning, store creation, regions,
  batches, validity and quality, embeddings Zarr and GeoParquet writes, resume
  bookkeeping, completion. Seconds per phase, CPU seconds, peak memory (RSS)
  of the process. At ``--sample-from`` sizes and above, every driver step runs
  at full size but only a random sample of the regions is embedded, and the
  tasks' total is their median times the number of regions (tasks cost what
  their region costs: the benchmark checks that the median does not grow with
  the grid).
- ``world``: the driver's and a worker's memory on a world-size grid
  (1.5e8 chips): plan, store creation, region enumeration, a worker's session
  and three region tasks, in a fresh process each (peak RSS).
- ``catalogue``: a synthetic catalogue of 10,000 items over the area (footprints
  on a grid, 100 dates): indexing it, its sidecar, a datacube store created for
  it and blocks written into it, item queries per region, and the metadata a
  GeoParquet row and a part's footer carry.
- ``composite``: one region's median composite over 100 dates of real pixels.

Chips are 8 px of one band with 16-d zero vectors by default (the machinery alone,
comparable with earlier figures); ``--real`` measures chips as a Clay run has them:
256 px, 10 bands (uint16), 1024-d vectors of random values (they compress as real
embeddings do), regions of 16 x 16 chips, batches of 128. Grids wider than a UTM zone
are made taller instead (at most ~650 km wide), so every cube lies in its zone.

    python benchmarks/scale.py                       # all sections, 1e4..1e7 chips of 8 px
    python benchmarks/scale.py --sample-from 1e8     # the same, every region of 1e7 run
    python benchmarks/scale.py --real                # embed and world at 256 px, 1e4..3e5 chips
    python benchmarks/scale.py --sections embed --chips 1e4 1e5
    python benchmarks/scale.py --smoke               # every section, tiny sizes
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import torch
import xarray as xr
import yaml
from _common import parse, save
from affine import Affine
from odc.geo.geobox import GeoBox
from odc.geo.xr import xr_coords

import xclay
from xclay.datacube import create_datacube_store, mark_complete
from xclay.model_card import ModelCard
from xclay.models.registry import EncoderPlugin, register_model

SOUTH_AMERICA, WORLD = 2.7e6, 1.5e8
ZONE_CUBE = (
    7.5e5  # chips of 256 px in one UTM zone from 12 N to 56 S: a continent run's largest cube
)
ZONE_WIDTH_M = 650_000.0  # a cube wider than this is made taller instead: it stays in its zone
GSD = 10.0


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a chip is here: pixels a side, bands, vector length and values, and how a run
    groups chips (region edge in chips, batch)."""

    chip: int = 8  # pixels a chip side: the pixel work per chip is negligible
    bands: int = 1
    dim: int = 16
    vectors: str = "zeros"  # or "random": incompressible, as real embeddings are
    region: int = 32  # chips a region side
    batch: int = 1024


LEGACY = Shape()
REAL = Shape(chip=256, bands=10, dim=1024, vectors="random", region=16, batch=128)
SHAPE = LEGACY  # set by configure(); read by the encoder, the cubes and the specs


def configure(shape: Shape) -> None:
    """Use ``shape`` in this process (the measured child processes call it too)."""
    global SHAPE
    SHAPE = shape


# --------------------------------------------------------------------------- a null encoder


class NullEncoder:
    """Does no work: a vector per chip, zeros or (``Shape.vectors="random"``) rows of a
    fixed random table, so that the embeddings compress as real ones do."""

    preferred_precision = "fp32"

    def __init__(self, dim: int | None = None, vectors: str | None = None) -> None:
        self.dim = dim or SHAPE.dim
        self.vectors = vectors or SHAPE.vectors
        self._table: torch.Tensor | None = None

    @property
    def card(self) -> ModelCard:
        return ModelCard(
            name="null",
            version="0",
            family="none",
            description="no-op",
            dim=self.dim,
            output="pooled",
            params={"vectors": self.vectors},
        )

    def prepare(self, spec: Any, sample: Any, *, device: Any, precision: Any) -> None:
        pass

    def encode(self, batch: Any) -> torch.Tensor:
        n = len(batch)
        if self.vectors == "zeros":
            return torch.zeros(n, self.dim)
        if self._table is None or len(self._table) < n + 4096:
            g = torch.Generator().manual_seed(0)
            self._table = torch.rand(max(8192, 2 * n + 4096), self.dim, generator=g)
        # A different slice each call: batches do not repeat within a region's chunk.
        start = int(torch.randint(0, len(self._table) - n, (1,)))
        return self._table[start : start + n]

    @classmethod
    def from_card(cls, card: Any, *, checkpoint: Any = None) -> NullEncoder:
        return cls(card.dim, card.params.get("vectors"))


class NullModel(EncoderPlugin):
    name = "null"
    description = "does nothing (benchmarks of everything but the encoder)"
    dim = SHAPE.dim
    normalization = ("none",)

    def build(self, dim: int | None = None, vectors: str | None = None) -> NullEncoder:
        return NullEncoder(dim, vectors)

    def rebuild(self, card: Any, *, checkpoint: Any = None) -> NullEncoder:
        return NullEncoder.from_card(card)


def register_null() -> None:
    register_model(NullModel)


# --------------------------------------------------------------------------- inputs


def grid_shape(chips: float) -> tuple[int, int]:
    """Rows and columns of chips: a square, unless that is wider than a UTM zone."""
    side = math.isqrt(int(chips))
    cols = min(side, int(ZONE_WIDTH_M // (SHAPE.chip * GSD)))
    return int(chips) // cols, cols


def empty_cube(
    path: Path, chips: float, *, origin: tuple[float, float] = (180000.0, 9000000.0)
) -> Path:
    """A datacube store of ``chips`` chips, sharded by region, with no chunk written: the
    store says so (its unwritten chunks read as the fill value, 0, which is not nodata:
    every chip is embedded)."""
    rows, cols = grid_shape(chips)
    ny, nx, nb = rows * SHAPE.chip, cols * SHAPE.chip, SHAPE.bands
    geobox = GeoBox((ny, nx), Affine(GSD, 0, origin[0], 0, -GSD, origin[1]), "EPSG:32720")
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    # Dask chunks of at most ~64 MB: the store's creation looks at the template, and a
    # bigger chunk would show in the peak memory the world section measures.
    side = int(math.sqrt(64e6 / (2 * nb)))
    block = max(SHAPE.chip, min(8192, side) // SHAPE.chip * SHAPE.chip)
    pixels = xr.DataArray(
        da.zeros((1, nb, ny, nx), dtype="uint16", chunks=(1, nb, min(ny, block), min(nx, block))),
        dims=("time", "band", "y", "x"),
        coords={"time": np.array(["2024-07-01"], dtype="datetime64[ns]"),
                "band": [f"b{i + 1}" for i in range(nb)],
                "y": coords["y"], "x": coords["x"], "spatial_ref": coords["spatial_ref"]},
    )  # fmt: skip
    cube = xclay.as_datacube(pixels, wavelengths=[0.45 + 0.17 * i for i in range(nb)])
    create_datacube_store(cube, path, chip_size=SHAPE.chip, shard_chips=SHAPE.region)
    chunks_left_unwritten(path)
    mark_complete(path)
    return path


def chunks_left_unwritten(path: Path) -> None:
    """Say in the store that its unwritten chunks read as the fill value: xclay's stores
    write every chunk (a missing one is damage), but here none is written, so that reads
    cost the machinery, not pixels. (The same in _scale_probe.py.)"""
    meta_path = path / "pixels" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    integrity = meta.get("attributes", {}).get("xclay_integrity")
    if integrity:
        integrity["every_chunk_written"] = False
        meta_path.write_text(json.dumps(meta))


def write_spec(folder: Path, cube: Path, region: int | None = None) -> Path:
    spec = {
        "input": {"datacube": str(cube)},
        "grid": {"chip_size": SHAPE.chip},
        "model": {"name": "null", "options": {"dim": SHAPE.dim, "vectors": SHAPE.vectors}},
        "compute": {"device": "cpu", "region_chips": region or SHAPE.region,
                    "batch_size": SHAPE.batch, "prefetch": 0},
        "quality": {"max_nodata": 1.0},
        "outputs": {"dir": str(folder / "out")},
    }  # fmt: skip
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


# --------------------------------------------------------------------------- embed


def embed_run(chips: float, sample: int | None, region: int, folder: Path) -> dict[str, Any]:
    """One run of the embed phase over an empty cube of ``chips`` chips (in this process)."""
    from xclay.run import phases
    from xclay.run.state import Region

    register_null()
    folder.mkdir(parents=True, exist_ok=True)
    cube = empty_cube(folder / "cube.zarr", chips)
    spec = xclay.run.load_spec(write_spec(folder, cube, region))
    cpu0, t0 = time.process_time(), time.perf_counter()
    times: dict[str, float] = {}
    task_seconds: list[float] = []
    task_cpu: list[float] = []
    real_execute = phases._execute

    def run_sample(
        fn: Any,
        regions: Callable[[], Iterator[Region]],
        outdir: Path,
        client: Any,
        desc: str,
        *rest: Any,
        **kw: Any,
    ) -> None:
        every = list(regions())
        times["regions"] = float(len(every))
        picks = every
        if sample is not None and len(every) > sample:
            rng = np.random.default_rng(0)
            picks = [every[i] for i in sorted(rng.choice(len(every), sample, replace=False))]
        for r in picks:
            start, start_cpu = time.perf_counter(), time.process_time()
            real_execute(fn, lambda r=r: iter([r]), outdir, None, desc, *rest, **kw)
            task_seconds.append(time.perf_counter() - start)
            task_cpu.append(time.process_time() - start_cpu)

    # The public step (plan, preflight, resume state, regions, completion, the run's STAC),
    # with its one place that runs regions sampled: nothing else of the run is private.
    phases._execute = run_sample  # type: ignore[assignment]
    try:
        report = xclay.run.embed_step(spec, progress=False)
        assert report.status != "incomplete", report
    finally:
        phases._execute = real_execute  # type: ignore[assignment]
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    embedded = int(report.run.get("chips_embedded", 0))
    n_regions = int(times["regions"])
    task_median = float(np.median(task_seconds))
    tasks_total = float(np.sum(task_seconds))
    driver = wall - tasks_total
    sampled = len(task_seconds) < n_regions
    # Measured when every region ran; estimated from the tasks' median when sampled. CPU
    # seconds (every thread of this process) beside wall seconds: on a shared machine the
    # wall clock also counts the time other processes held the cores.
    estimated = driver + task_median * n_regions if sampled else wall
    task_cpu_median = float(np.median(task_cpu))
    driver_cpu = cpu - float(np.sum(task_cpu))
    estimated_cpu = driver_cpu + task_cpu_median * n_regions if sampled else cpu
    rows, cols = grid_shape(chips)
    n_chips = rows * cols
    assert sampled or embedded == n_chips, (embedded, n_chips)
    return {
        "chips": n_chips,
        "regions": n_regions,
        "regions_run": len(task_seconds),
        "chips_embedded": embedded,
        "region_chips": region,
        "task_median_s": round(task_median, 4),
        "driver_s": round(driver, 3),
        "run_wall_s": round(wall, 3),
        "run_cpu_s": round(cpu, 3),
        "non_encoder_s": round(estimated, 3),
        "non_encoder_us_per_chip": round(1e6 * estimated / n_chips, 1),
        "task_cpu_median_s": round(task_cpu_median, 4),
        "driver_cpu_s": round(driver_cpu, 3),
        "non_encoder_cpu_s": round(estimated_cpu, 3),
        "non_encoder_cpu_us_per_chip": round(1e6 * estimated_cpu / n_chips, 1),
        "sampled": sampled,
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3, 1),
    }


def fit(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Least-squares fit of log(key) = a + b log(chips): (b, prediction at 1 chip's scale)."""
    x = np.log([r["chips"] for r in rows])
    y = np.log([r[key] for r in rows])
    b, a = np.polyfit(x, y, 1)
    return float(b), float(a)


def extrapolate(rows: list[dict[str, Any]], chips: float, key: str = "non_encoder_s") -> float:
    """Seconds at ``chips``: the largest measured size's per-chip cost, scaled linearly
    (when the exponent is ~1) or by the fitted power law (whichever is larger)."""
    b, a = fit(rows, key)
    largest = max(rows, key=lambda r: r["chips"])
    linear = largest[key] / largest["chips"] * chips
    return max(linear, float(math.exp(a) * chips**b))


# --------------------------------------------------------------------------- world


def _peak_rss_of(code: str) -> dict[str, Any]:
    """Run ``code`` in a fresh Python (benchmarks/ on its path); its JSON line and peak RSS."""
    here = Path(__file__).resolve().parent
    return _run_python(code, here, f"{here}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _run_python(code: str, cwd: Path, pythonpath: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    if out.returncode != 0:
        raise RuntimeError(f"the measured process failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


_DRIVER = """
import json, resource, time, tempfile
def _peak_mb():  # this process's own peak RSS (ru_maxrss carries a forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3, 1)
from pathlib import Path
import scale, xclay
from xclay.run import phases
scale.configure(scale.Shape(**{shape}))
scale.register_null()
folder = Path(tempfile.mkdtemp())
t0 = time.perf_counter()
cube = scale.empty_cube(folder / "cube.zarr", {chips})
spec = xclay.run.load_spec(scale.write_spec(folder, cube))
resolved = phases.plan(spec)
state, _ = phases._start(spec, resolved, None)
sessions = phases._prepare(spec, resolved, state)
layout = sessions[0].layout()
from xclay.outputs.export import create_embeddings_store
create_embeddings_store(layout, folder / "emb.zarr", region_chips=scale.SHAPE.region)
regions = list(phases.embed_regions(0, 1, sessions[0].grid.shape, scale.SHAPE.region))
done = state.done_names("embed")
todo = [r for r in regions if r.name not in done]
print(json.dumps({{"regions": len(todo), "seconds": round(time.perf_counter() - t0, 2),
    "peak_rss_mb": _peak_mb()}}))
"""

_WORKER = """
import json, resource, time, tempfile
def _peak_mb():  # this process's own peak RSS (ru_maxrss carries a forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3, 1)
from pathlib import Path
import numpy as np, scale, xclay
from xclay.batch.batching import Block
from xclay.batch.chips import ChipGridSpec
from xclay.embed import EmbedConfig, EmbedSession
from xclay.outputs.export import create_embeddings_store, to_geoparquet, write_embeddings_region
from xclay.quality import QualityFilter
scale.configure(scale.Shape(**{shape}))
R = scale.SHAPE.region
folder = Path(tempfile.mkdtemp())
cube = xclay.open_datacube(scale.empty_cube(folder / "cube.zarr", {chips}))
config = EmbedConfig(grid=ChipGridSpec(chip_size=scale.SHAPE.chip), batch_size=scale.SHAPE.batch,
    quality=QualityFilter(max_nodata=1.0), device="cpu", prefetch=0)
base = _peak_mb()
t0 = time.perf_counter()
session = EmbedSession(cube, scale.NullEncoder(), config)
setup = time.perf_counter() - t0
create_embeddings_store(session.layout(), folder / "emb.zarr", region_chips=R)
rows, cols = session.grid.shape
rng = np.random.default_rng(1)
seconds = []
for k in range(3):
    r = int(rng.integers(0, rows // R)) * R
    c = int(rng.integers(0, cols // R)) * R
    t = time.perf_counter()
    block = Block((0, 1), (r, r + R), (c, c + R))
    ds = session.dataset(session.embed_block(block, progress=False))
    write_embeddings_region(folder / "emb.zarr", ds, (0, r, c))
    to_geoparquet(ds, folder / f"p{{k}}.parquet")
    seconds.append(time.perf_counter() - t)
print(json.dumps({{"session_setup_s": round(setup, 3), "task_s": round(float(np.median(seconds)), 3),
    "peak_rss_mb": _peak_mb(),
    "rss_before_session_mb": round(base, 1)}}))
"""


def world(chips: float) -> dict[str, Any]:
    shape = dataclasses.asdict(SHAPE)
    return {
        "chips": chips,
        "grid": list(grid_shape(chips)),
        "driver": _peak_rss_of(_DRIVER.format(chips=chips, shape=shape)),
        "worker": _peak_rss_of(_WORKER.format(chips=chips, shape=shape)),
    }


# --------------------------------------------------------------------------- catalogue


def synthetic_items(n_tiles: int, n_dates: int) -> list[Any]:
    """``n_tiles`` footprints on a grid over the area of the empty cubes x ``n_dates``
    dates: Sentinel-2-like items (4 bands, uint16, nodata 0) with metadata only."""
    import pystac
    from pystac.extensions.eo import Band, EOExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    side = math.isqrt(n_tiles)
    lon0, lat0, step = -64.85, -9.0, 0.08  # a square degree over the cubes (EPSG:32720)
    items = []
    start = dt.datetime(2024, 1, 1, 14, 0, tzinfo=dt.UTC)
    for d in range(n_dates):
        when = start + dt.timedelta(days=3 * d)
        for i in range(side):
            for j in range(side):
                w, n = lon0 + j * step, lat0 - i * step
                geom = {"type": "Polygon", "coordinates": [[[w, n - step], [w + step, n - step],
                        [w + step, n], [w, n], [w, n - step]]]}  # fmt: skip
                item = pystac.Item(
                    f"S2_T{i:03d}{j:03d}_{when:%Y%m%d}", geom, [w, n - step, w + step, n], when,
                    {"proj:epsg": 32720}, collection="sentinel-2-l2a",
                )  # fmt: skip
                for b, wave in zip(
                    ("blue", "green", "red", "nir"), (0.49, 0.56, 0.665, 0.842), strict=True
                ):
                    asset = pystac.Asset(
                        f"/data/{item.id}_{b}.tif", media_type=pystac.MediaType.COG, roles=["data"]
                    )
                    item.add_asset(b, asset)
                    EOExtension.ext(asset, add_if_missing=True).bands = [
                        Band.create(name=b, center_wavelength=wave)
                    ]
                    RasterExtension.ext(asset, add_if_missing=True).bands = [
                        RasterBand.create(nodata=0, data_type=DataType.UINT16)
                    ]
                items.append(item)
    return items


def catalogue(
    folder: Path, n_items: int = 10_000, px: int = 8192, part_chips: int = 256 * 256
) -> dict[str, Any]:
    from xclay.batch.batching import Block
    from xclay.batch.chips import ChipGridSpec
    from xclay.datacube import write_datacube_block
    from xclay.embed import EmbedConfig, EmbedSession
    from xclay.ingest import datacube_template
    from xclay.outputs.export import chip_footprints, to_geoparquet
    from xclay.quality import QualityFilter
    from xclay.run.items import index_items

    out: dict[str, Any] = {"items": n_items}
    t = time.perf_counter()
    items = synthetic_items(n_items // 100, 100)
    out["items_made_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    index, summary = index_items([[i.to_dict() for i in items]], folder / "index.parquet")
    out["index_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    index.save(folder / "items.parquet")
    out["sidecar_s"] = round(time.perf_counter() - t, 2)
    out["sidecar_mb"] = round((folder / "items.parquet").stat().st_size / 1e6, 2)
    # A datacube for the catalogue: created from metadata, then blocks written into it.
    geobox = GeoBox((px, px), Affine(10.0, 0, 300000.0, 0, -10.0, 9000000.0), "EPSG:32720")
    half = px // 2
    provenance = {"items": {"count": len(index), "file": "../items.parquet", "sha256": "-"}}
    t = time.perf_counter()
    template = datacube_template(items[:1], bands=["blue", "green", "red", "nir"], geobox=geobox,
                                 time_range=summary.time_range, provenance=provenance)  # fmt: skip
    create_datacube_store(template, folder / "cube.zarr", chip_size=256, shard_chips=16)
    out["store_create_s"] = round(time.perf_counter() - t, 3)
    out["store_zarr_json_kb"] = round((folder / "cube.zarr" / "zarr.json").stat().st_size / 1e3, 1)
    block = template.isel(x=slice(0, half), y=slice(0, half)).compute()
    t = time.perf_counter()
    for y0 in (0, half):
        for x0 in (0, half):
            write_datacube_block(
                block, folder / "cube.zarr", 0, (0, half), (0, half), at=(0, y0, x0)
            )
    out["write_4_blocks_s"] = round(time.perf_counter() - t, 2)
    # Item queries per region (blocks of half the cube's edge: 4096 px).
    import shapely

    t = time.perf_counter()
    hits = []
    for y0 in range(0, px, half):
        for x0 in range(0, px, half):
            area = shapely.geometry.shape(
                geobox[y0 : y0 + half, x0 : x0 + half].extent.to_crs("EPSG:4326").json
            )
            hits.append(len(index.query(area)))
    out["query_per_region_ms"] = round(1e3 * (time.perf_counter() - t) / len(hits), 2)
    out["items_per_region"] = hits
    # A region's GeoParquet part with each row's own sources.
    # Over the catalogue's footprints, so that each row has its sources.
    cube = xclay.open_datacube(
        empty_cube(folder / "empty.zarr", part_chips, origin=(300000.0, 9000000.0))
    )
    session = EmbedSession(cube, NullEncoder(), EmbedConfig(grid=ChipGridSpec(chip_size=SHAPE.chip),
        batch_size=1024, quality=QualityFilter(max_nodata=1.0), device="cpu", prefetch=0))  # fmt: skip
    ds = session.dataset(session.embed_block(Block((0, 1), (0, 32), (0, 32)), progress=False))
    _, i, j = np.nonzero(ds["embedded"].values)
    _, footprints = chip_footprints(ds, i, j)
    found = index.query(shapely.union_all(footprints))
    sources = [found.ids[h].tolist() for h in found.touching(footprints)]
    meta = {"run_metadata": {"file": "_xclay_run.json", "sha256": "0" * 64},
            "part": {"zone": "EPSG32720", "region": 0, "time": 0, "counts": ds.attrs["run"]}}  # fmt: skip
    part = to_geoparquet(ds, folder / "part.parquet", sources=sources, run_metadata=meta)
    import pyarrow.parquet as pq

    md = pq.read_metadata(part)
    rows = md.num_rows
    source_bytes = sum(
        md.row_group(g).column(c).total_compressed_size
        for g in range(md.num_row_groups)
        for c in range(md.num_columns)
        if md.row_group(g).column(c).path_in_schema.startswith("source_ids")
    )
    footer = sum(len(k) + len(v) for k, v in (md.metadata or {}).items())
    out.update(
        part_rows=rows,
        sources_per_row=round(float(np.mean([len(s) for s in sources])), 1),
        source_ids_bytes_per_row=round(source_bytes / rows, 1),
        footer_bytes=footer,
        footer_bytes_per_row=round(footer / rows, 1),
        xclay_footer_bytes=len(md.metadata[b"xclay"]),
    )
    return out


# --------------------------------------------------------------------------- composite


def composite_catalogue(
    folder: Path, tiles: int = 10, dates: int = 100, tile_px: int = 512
) -> Path:
    """``tiles x tiles`` footprints x ``dates`` dates of real pixels (4 bands, uint16): one
    base GeoTIFF, and a VRT per tile placing it there (items of one tile share it)."""
    import pystac
    import rasterio
    from pystac.extensions.eo import Band, EOExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension

    rng = np.random.default_rng(0)
    base = folder / "base.tif"
    with rasterio.open(base, "w", driver="GTiff", width=tile_px, height=tile_px, count=4,
                       dtype="uint16", crs="EPSG:32720", nodata=0, tiled=True,
                       transform=Affine(10.0, 0, 0, 0, -10.0, 0)) as dst:  # fmt: skip
        dst.write(rng.integers(1, 10000, (4, tile_px, tile_px), dtype=np.uint16))
    x0, y0, size = 300000.0, 9000000.0, tile_px * 10.0
    items = []
    start = dt.datetime(2024, 1, 1, 14, 0, tzinfo=dt.UTC)
    to_lonlat = __import__("pyproj").Transformer.from_crs("EPSG:32720", "EPSG:4326", always_xy=True)
    for i in range(tiles):
        for j in range(tiles):
            left, top = x0 + j * size, y0 - i * size
            vrt = folder / f"tile_{i}_{j}.vrt"
            vrt.write_text(_vrt(base, left, top, tile_px))
            lon, lat = to_lonlat.transform([left, left + size, left + size, left],
                                           [top, top, top - size, top - size])  # fmt: skip
            ring = [[float(a), float(b)] for a, b in zip(lon, lat, strict=True)]
            geom = {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}
            bbox = [min(lon), min(lat), max(lon), max(lat)]
            for d in range(dates):
                when = start + dt.timedelta(days=3 * d)
                item = pystac.Item(f"T{i}{j}_{d:03d}", geom, bbox, when, {})
                ext = ProjectionExtension.ext(item, add_if_missing=True)
                ext.epsg, ext.shape = 32720, [tile_px, tile_px]
                ext.transform = [10.0, 0.0, left, 0.0, -10.0, top]
                # GDAL reads VRTs by content; odc-stac loads assets typed as GeoTIFF.
                asset = pystac.Asset(str(vrt), media_type=pystac.MediaType.GEOTIFF, roles=["data"])
                item.add_asset("data", asset)
                EOExtension.ext(asset, add_if_missing=True).bands = [
                    Band.create(name=b, center_wavelength=w)
                    for b, w in zip(
                        ("blue", "green", "red", "nir"), (0.49, 0.56, 0.665, 0.842), strict=True
                    )
                ]
                RasterExtension.ext(asset, add_if_missing=True).bands = [
                    RasterBand.create(nodata=0, data_type=DataType.UINT16) for _ in range(4)
                ]
                items.append(item)
    path = folder / "items.json"
    pystac.ItemCollection(items).save_object(dest_href=str(path))
    return path


def _vrt(base: Path, left: float, top: float, px: int) -> str:
    bands = "".join(
        f'<VRTRasterBand dataType="UInt16" band="{b}"><NoDataValue>0</NoDataValue><SimpleSource>'
        f'<SourceFilename relativeToVRT="0">{base}</SourceFilename><SourceBand>{b}</SourceBand>'
        f'<SrcRect xOff="0" yOff="0" xSize="{px}" ySize="{px}"/>'
        f'<DstRect xOff="0" yOff="0" xSize="{px}" ySize="{px}"/></SimpleSource></VRTRasterBand>'
        for b in range(1, 5)
    )
    return (
        f'<VRTDataset rasterXSize="{px}" rasterYSize="{px}"><SRS>EPSG:32720</SRS>'
        f"<GeoTransform>{left}, 10.0, 0.0, {top}, 0.0, -10.0</GeoTransform>{bands}</VRTDataset>"
    )


_COMPOSITE = """
import json, resource, time
def _peak_mb():  # this process's own peak RSS (ru_maxrss carries a forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3, 1)
import numpy as np
from odc.geo.geobox import GeoBox
from affine import Affine
import xclay
from xclay.ingest import from_stac, load_items
from xclay.datacube import create_datacube_store, write_datacube_block
items = load_items("{items}")
block = GeoBox(({px}, {px}), Affine(10.0, 0, 300000.0 + 2560, 0, -10.0, 9000000.0 - 2560), "EPSG:32720")
{select}
t = time.perf_counter()
cube = from_stac(chosen, bands=["blue", "green", "red", "nir"], resolution=10, composite="median",
    mask=None, geobox=block, provenance=False, chunk_size={chunk})
import dask
with dask.config.set(scheduler="threads"):
    values = cube["pixels"].values
print(json.dumps({{"items": len(chosen), "seconds": round(time.perf_counter() - t, 2),
    "peak_rss_mb": _peak_mb(),
    "checksum": int(values.astype(np.int64).sum())}}))
"""


def composite(
    folder: Path,
    old_code: Path | None,
    px: int = 1024,
    *,
    tiles: int = 10,
    dates: int = 100,
    tile_px: int = 512,
) -> dict[str, Any]:
    """One region's median composite over 100 dates: peak memory and time, the items it
    loads, and (with ``old_code``, a checkout of an earlier xclay) the same region as that
    code did it: all the run's items, float64, one chunk per block."""
    from xclay.run.items import ItemIndex
    from xclay.run.tasks import composite_tile

    items_path = composite_catalogue(folder, tiles, dates, tile_px)
    index = ItemIndex.from_items(xclay.ingest.load_items(items_path))
    geobox = GeoBox(
        (px, px), Affine(10.0, 0, 300000.0 + 2560, 0, -10.0, 9000000.0 - 2560), "EPSG:32720"
    )
    import shapely

    found = index.query(shapely.geometry.shape(geobox.extent.to_crs("EPSG:4326").json))
    observations = found.observations()
    tile = composite_tile(observations, px)
    (folder / "region-items.json").write_text(json.dumps(found.ids.tolist()))
    select = (
        f"ids = set(json.loads(open('{folder / 'region-items.json'}').read()))\n"
        "chosen = [i for i in items if i.id in ids]"
    )
    out: dict[str, Any] = {"catalogue_items": len(index), "region_px": px, "tile_px": tile,
                           "observations": observations}  # fmt: skip
    out["now"] = _peak_rss_of(_COMPOSITE.format(items=items_path, px=px, select=select, chunk=tile))
    if old_code is not None:
        code = _COMPOSITE.format(items=items_path, px=px, select="chosen = items", chunk=px)
        out["before"] = _peak_rss_of_at(code, old_code)
    return out


def _peak_rss_of_at(code: str, root: Path) -> dict[str, Any]:
    """As :func:`_peak_rss_of`, with the xclay of another checkout."""
    return _run_python(code, root, str(root))


# --------------------------------------------------------------------------- the world's catalogue

DATES = 73  # a year of one tile's Sentinel-2 acquisitions (a 5-day revisit)
LAND = (-56.0, 60.0)  # the latitudes a world run of the land covers (UTM's are -80 to 84)


def world_tiles(n_tiles: int) -> list[tuple[int, float, float]]:
    """``n_tiles`` tiles of one degree (Sentinel-2's are 110 km), the same density at any
    count: a block of rows over the land's latitudes, as many columns as the world has
    (a region's items are the same few tiles whatever the catalogue's size)."""
    cols = min(math.ceil(math.sqrt(2 * n_tiles)), 340)
    rows = math.ceil(n_tiles / cols)
    south = max(LAND[0], LAND[1] - rows - 2.0)
    west = -cols / 2.0
    return [(k, west + k % cols, south + k // cols) for k in range(n_tiles)]


def world_items(path: Path, n_items: int, dates: int = DATES) -> dict[str, Any]:
    """Write a synthetic catalogue of Sentinel-2 L2A items as newline-delimited JSON, one
    item a line, ``dates`` acquisitions of ``n_items / dates`` tiles: each item has the
    sensor's 10 bands and its SCL as cloud-optimised GeoTIFF assets on https (remote: never
    read by a dry run), ``proj:code`` of its UTM zone, a footprint and a time. An item's
    JSON is ~2.7 KB, as a real one stripped of links is."""
    from xclay.sensors import get_sensor

    bands = (*get_sensor("sentinel-2-l2a").band_names, "scl")
    tiles = world_tiles(max(1, round(n_items / dates)))
    start = dt.datetime(2024, 1, 1, 14, 0, tzinfo=dt.UTC)
    count = 0
    with path.open("w") as f:
        for d in range(dates):
            when = (start + dt.timedelta(days=5 * d)).strftime("%Y-%m-%dT%H:%M:%SZ")
            for k, w, s in tiles:
                zone = int((w + 0.5 + 180.0) // 6) + 1
                epsg = (32600 if s >= 0 else 32700) + zone
                assets = {
                    b: {"href": f"https://data.example/S2/T{k:05d}/{d:03d}/{b}.tif",
                        "type": "image/tiff; application=geotiff; profile=cloud-optimized",
                        "roles": ["data"], "eo:bands": [{"name": b}],
                        "raster:bands": [{"nodata": 0, "data_type": "uint8" if b == "scl"
                                          else "uint16"}]}
                    for b in bands
                }  # fmt: skip
                ring = [[w, s], [w + 1, s], [w + 1, s + 1], [w, s + 1], [w, s]]
                item = {
                    "type": "Feature", "stac_version": "1.0.0", "id": f"S2_T{k:05d}_{d:03d}",
                    "collection": "sentinel-2-l2a",
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "bbox": [w, s, w + 1, s + 1],
                    "properties": {"datetime": when, "platform": "sentinel-2a",
                                   "proj:code": f"EPSG:{epsg}", "eo:cloud_cover": 10.0},
                    "assets": assets, "links": [],
                }  # fmt: skip
                f.write(json.dumps(item, separators=(",", ":")) + "\n")
                count += 1
    return {"items": count, "tiles": len(tiles), "dates": dates,
            "file_mb": round(path.stat().st_size / 1e6, 1)}  # fmt: skip


def world_spec(folder: Path, items: Path, chip: int) -> Path:
    """A run over the catalogue's area: Sentinel-2's 10 bands at 10 m, chips of ``chip``
    px, one median composite a chip; the null encoder."""
    spec = {
        "input": {"stac": {"items": str(items)}, "platform": "sentinel-2-l2a"},
        "grid": {"chip_size": chip, "resolution": 10, "max_pixels": 10**16},
        "model": {"name": "null", "options": {"dim": SHAPE.dim, "vectors": SHAPE.vectors}},
        "compute": {"device": "cpu", "region_chips": SHAPE.region},
        "outputs": {"dir": str(folder / "out")},
    }  # fmt: skip
    path = folder / f"spec-{chip}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


_DRY_RUN = """
import json, time
def _peak_mb():  # this process's own peak RSS
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3, 1)
import scale, xclay
from xclay.run import plan
from xclay.run.phases import check_start
from xclay.run.preflight import preflight
scale.register_null()
spec = xclay.run.load_spec({spec!r})
t0, c0 = time.perf_counter(), time.process_time()
resolved = plan(spec)
planned = time.perf_counter() - t0
from xclay.errors import OutputError
try:
    preflight(spec, resolved, dry_run=True)
    refused = None
except OutputError as err:  # a world's outputs outgrow this disk: the last check, said
    refused = str(err)
check_start(spec, resolved)
seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
peak = _peak_mb()
if {keep!r}:
    resolved.items.save({keep!r})
print(json.dumps({{"plan_s": round(planned, 1), "dry_run_s": round(seconds, 1),
    "dry_run_cpu_s": round(cpu, 1), "chips": resolved.chips, "zones": len(resolved.zones),
    "items": len(resolved.items), "row_groups": resolved.items.row_groups,
    "peak_rss_mb": peak, "outputs_refused": refused}}))
"""

_QUERIES = """
import json, time
import numpy as np, shapely
def _peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3, 1)
from xclay.run.items import ItemIndex
index = ItemIndex.open({path!r})
opened = _peak_mb()
west, south, east, north = index.bbox
edge = {edge}
rng = np.random.default_rng(7)
ms, day_ms, items_ms, hits, groups = [], [], [], [], []
for k in range({n}):
    x, y = rng.uniform(west, east - edge), rng.uniform(south, north - edge)
    area = shapely.box(x, y, x + edge, y + edge)
    t = time.perf_counter()
    found = index.query(area)
    ms.append(1e3 * (time.perf_counter() - t))
    hits.append(len(found))
    groups.append(len(index.groups_for(area)))
    day = found.days[0] if len(found) else None
    t = time.perf_counter()
    index.query(area, day=day)
    day_ms.append(1e3 * (time.perf_counter() - t))
    t = time.perf_counter()
    found.items()
    items_ms.append(1e3 * (time.perf_counter() - t))
ms = ms[3:]  # the first queries warm the file's pages
print(json.dumps({{"query_ms_median": round(float(np.median(ms)), 2),
    "query_ms_p95": round(float(np.percentile(ms, 95)), 2),
    "day_query_ms_median": round(float(np.median(day_ms[3:])), 2),
    "items_built_ms_median": round(float(np.median(items_ms[3:])), 2),
    "hits_median": int(np.median(hits)), "row_groups_read_median": int(np.median(groups)),
    "open_rss_mb": opened, "peak_rss_mb": _peak_mb()}}))
"""

_WINDOW = """
import json, time
def _peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1e3, 1)
def _rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1e3, 1)
import distributed
from distributed.deploy.subprocess import SubprocessCluster
from xclay.run.state import Region, embed_regions
from xclay.run.submit import Tally, execute, window
def task(outdir, region):
    r = Region.from_dict(region)
    return {{"region": r.name, "status": "done", "counts": {{"chips_total": 256}}}}
def wanted(dask_scheduler):  # tasks a client holds on the scheduler
    return sum(1 for ts in dask_scheduler.tasks.values() if ts.who_wants)
# The scheduler and the workers in processes of their own: this process is the driver.
with SubprocessCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
        distributed.Client(cluster) as client:
    client.wait_for_workers(2)
    size = window(client, None)
    held, rss, submitted = [], [], [0]
    def on_submit(n):
        submitted[0] += 1
        if submitted[0] % 10 == 0:
            held.append(client.run_on_scheduler(wanted))
        if submitted[0] == 1 or submitted[0] % 1000 == 0:
            rss.append(_rss_mb())
    tally = Tally()
    t = time.perf_counter()
    execute(task, embed_regions(0, 1, ({side}, {side}), 1), "out", client, tally, on_submit=on_submit)
    seconds = time.perf_counter() - t
print(json.dumps({{"regions": tally.done, "window": size, "scheduler_tasks_max": max(held),
    "seconds": round(seconds, 1), "rss_mb_every_1000": rss,
    "peak_rss_mb": _peak_mb()}}))
"""


def scheduler_window(regions: int) -> dict[str, Any]:
    """``regions`` tasks of no work through the run's bounded submission on a local
    cluster (a scheduler and 2 workers of 1 thread, each a process of its own): the most
    tasks the scheduler held for the client (read every 10 submissions), against the
    window, and the driver's memory every 1,000 regions."""
    side = math.isqrt(regions)
    return _peak_rss_of(_WINDOW.format(side=side))


def world_catalogue(
    folder: Path, sizes: list[float], chips: list[int], queries: int = 60
) -> dict[str, Any]:
    """For each catalogue size: the catalogue written (NDJSON), then in a fresh process
    each a dry run of ``xclay run`` over it at each chip size (plan and preflight: the
    driver's seconds and peak RSS), and a worker's item queries for random regions of
    ``compute.region_chips`` chips a side (milliseconds, row groups read, peak RSS)."""
    rows = []
    for n in sizes:
        made = folder / f"items-{int(n)}.ndjson"
        t = time.perf_counter()
        row: dict[str, Any] = {"catalogue": world_items(made, int(n))}
        row["catalogue"]["write_s"] = round(time.perf_counter() - t, 1)
        index = folder / f"index-{int(n)}.parquet"
        for chip in chips:
            keep = str(index) if chip == chips[0] else ""
            code = _DRY_RUN.format(spec=str(world_spec(folder, made, chip)), keep=keep)
            row[f"dry_run_{chip}px"] = _peak_rss_of(code)
            print(json.dumps({"items": n, f"dry_run_{chip}px": row[f"dry_run_{chip}px"]}),
                  flush=True)  # fmt: skip
        edge = SHAPE.region * chips[0] * GSD / 111_320.0  # a region's edge, in degrees
        row["queries"] = _peak_rss_of(_QUERIES.format(path=str(index), edge=edge, n=queries))
        row["index_mb"] = round(index.stat().st_size / 1e6, 1)
        made.unlink()
        index.unlink()
        print(json.dumps({"items": n, "queries": row["queries"]}), flush=True)
        rows.append(row)
    return {"rows": rows}


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sections", nargs="+", default=None, help="default: all; --real: embed world")
    p.add_argument(
        "--before", type=Path, default=None, help="a checkout of an earlier xclay to compare"
    )
    p.add_argument(
        "--real",
        action="store_true",
        help="chips as a Clay run has them: 256 px, 10 bands, 1024-d random vectors, "
        "16 x 16-chip regions, batches of 128",
    )
    p.add_argument("--chips", type=float, nargs="+", default=None, help="default 1e4..1e7")
    p.add_argument(
        "--sample-from", type=float, default=None, help="sizes from which tasks are sampled"
    )
    p.add_argument(
        "--sample",
        type=int,
        default=None,
        help="regions embedded at sampled sizes (256; --real: 64)",
    )
    p.add_argument("--region-chips", type=int, default=None, help="default 32 (--real: 16)")
    p.add_argument(
        "--world",
        type=float,
        default=None,
        help="chips of the world section's grid (default 1.5e8; --real: 7.5e5, the largest "
        "cube of a continent run, one UTM zone from 12 N to 56 S, as a world of 256 px chips "
        "is one cube per zone)",
    )
    p.add_argument("--items", type=int, default=10_000, help="items of the catalogue section")
    p.add_argument(
        "--catalogues",
        type=float,
        nargs="+",
        default=[1e4, 1e5, 1.5e6],
        help="item counts of the items section's world catalogues",
    )
    p.add_argument(
        "--item-chips",
        type=int,
        nargs="+",
        default=[100, 256],
        help="chip sizes (px) of the items section's dry runs",
    )
    p.add_argument(
        "--window-regions",
        type=int,
        default=20_000,
        help="regions of the items section's bounded-submission run",
    )
    p.add_argument("--tag", default="", help="added to the results file's name")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke sizes
    args = parse(
        p,
        {"sections": None, "chips": [256, 4096],
         "sample_from": 4096, "sample": 2, "world": 1e5, "items": 400, "tiny": True,
         "catalogues": [365], "item_chips": [256], "window_regions": 200},
    )  # fmt: skip
    shape = REAL if args.real else LEGACY
    if args.tiny and args.real:
        shape = dataclasses.replace(REAL, chip=64, bands=2, region=4, batch=16)
    if args.region_chips:
        shape = dataclasses.replace(shape, region=args.region_chips)
    configure(shape)
    args.region_chips = shape.region
    args.sections = args.sections or (
        ["embed", "world"] if args.real else ["embed", "world", "catalogue", "items", "composite"]
    )
    args.sample = args.sample or (64 if args.real else 256)
    args.chips = args.chips or ([1e4, 1e5, 3e5] if args.real else [1e4, 1e5, 1e6, 1e7])
    args.sample_from = args.sample_from or (3e5 if args.real else 1e7)
    args.world = args.world or (ZONE_CUBE if args.real else WORLD)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "embed" in args.sections:
            rows = []
            for n in args.chips:
                sample = args.sample if n >= args.sample_from else None
                row = embed_run(n, sample, shape.region, Path(tmp) / f"embed-{int(n)}")
                rows.append(row)
                print(json.dumps(row), flush=True)
            largest = max(rows, key=lambda r: r["chips"])
            cpu = "non_encoder_cpu_s"
            results["embed"] = {
                "rows": rows,
                "exponent_non_encoder": round(fit(rows, "non_encoder_s")[0], 3),
                "exponent_non_encoder_cpu": round(fit(rows, cpu)[0], 3),
                "exponent_task": round(fit(rows, "task_median_s")[0], 3),
                "exponent_task_cpu": round(fit(rows, "task_cpu_median_s")[0], 3),
                "us_per_chip_largest": largest["non_encoder_us_per_chip"],
                "cpu_us_per_chip_largest": largest["non_encoder_cpu_us_per_chip"],
                "south_america_s": round(extrapolate(rows, SOUTH_AMERICA), 1),
                "south_america_cpu_s": round(extrapolate(rows, SOUTH_AMERICA, cpu), 1),
                "world_hours": round(extrapolate(rows, WORLD) / 3600, 2),
                "world_cpu_hours": round(extrapolate(rows, WORLD, cpu) / 3600, 2),
            }
            print(
                json.dumps({k: v for k, v in results["embed"].items() if k != "rows"}), flush=True
            )
        if args.tiny and not args.real:
            # A smoke run tries the real chips' shape too, in little and in this process.
            configure(dataclasses.replace(REAL, chip=64, bands=2, region=4, batch=16))
            folder = Path(tmp) / "embed-real"
            results["embed_real"] = embed_run(256, None, SHAPE.region, folder)
            print(json.dumps(results["embed_real"]), flush=True)
            configure(shape)
        if "world" in args.sections:
            results["world"] = world(args.world)
            print(json.dumps(results["world"]), flush=True)
        if "catalogue" in args.sections:
            folder = Path(tmp) / "catalogue"
            folder.mkdir()
            if args.tiny:
                results["catalogue"] = catalogue(folder, args.items, px=1024, part_chips=64 * 64)
            else:
                results["catalogue"] = catalogue(folder, args.items)
            print(json.dumps(results["catalogue"]), flush=True)
        if "items" in args.sections:
            folder = Path(tmp) / "items"
            folder.mkdir()
            results["items"] = world_catalogue(folder, args.catalogues, args.item_chips)
            results["items"]["window"] = scheduler_window(args.window_regions)
            print(json.dumps({"window": results["items"]["window"]}), flush=True)
        if "composite" in args.sections:
            folder = Path(tmp) / "composite"
            folder.mkdir()
            if args.tiny:
                results["composite"] = composite(
                    folder, args.before, 256, tiles=2, dates=4, tile_px=256
                )
            else:
                results["composite"] = composite(folder, args.before)
            print(json.dumps(results["composite"]), flush=True)
    params = {**vars(args), "before": str(args.before) if args.before else None,
              "shape": dataclasses.asdict(shape), "chip_px": shape.chip, "bands": shape.bands,
              "dim": shape.dim, "cores": os.cpu_count()}  # fmt: skip
    variant = "_".join(v for v in ("real" if args.real else "", args.tag) if v)
    path = save("scale", params, results, variant=variant)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
