"""Run specs and the runner: STAC -> datacube -> embeddings -> GeoParquet in one command.

A run spec is a YAML file (see ``docs/run-spec.md``)::

    name: olinda
    input:
      stac: {items: items.json}        # or {api: URL, collections: [...], query: {...}}
      bands: [blue, green, red, nir08, swir16, swir22]
      datetime: 2000-01-01/2000-12-31
      composite: median
    grid: {resolution: 28.5, chip_size: 32, edges: pad}
    model: {name: rcf}
    outputs: {dir: out}

:func:`load_spec` validates it (an error names the file, the field and what
is allowed); :func:`plan` resolves it without reading pixels (``--dry-run``);
:func:`run` ingests, embeds and exports, and stores the spec and the resolved
plan in every output.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import xarray as xr

from xclay._atomic import atomic_output
from xclay._progress import progress_bar
from xclay.errors import XClayError
from xclay.quality import QualityFilter
from xclay.quantize import QUANTIZATIONS
from xclay.readers import Engine

if TYPE_CHECKING:
    from xclay.chips import Edges
    from xclay.datacube import Compression
    from xclay.devices import Precision
    from xclay.ingest import Composite

__all__ = ["RunReport", "RunSpec", "SpecError", "load_spec", "plan", "run"]

log = logging.getLogger(__name__)


class SpecError(XClayError, ValueError):
    """A run spec that is malformed: names the file, the field and what is allowed."""


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class StacSource:
    items: str | None = None
    api: str | None = None
    collections: tuple[str, ...] = ()
    query: dict[str, Any] | None = None
    max_items: int | None = None


@dataclass(frozen=True)
class InputSettings:
    stac: StacSource
    bands: tuple[str, ...] | None = None
    platform: str | None = None
    wavelengths: dict[str, float] | None = None
    datetime: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    composite: Composite = "median"
    mask: str | None = "auto"


@dataclass(frozen=True)
class GridSettings:
    resolution: float
    crs: str | None = None
    chip_size: int = 256
    stride: int | None = None
    edges: Edges = "drop"
    shard_chips: int | None = None
    compression: Compression = "zstd"
    max_pixels: int = 250_000_000_000


@dataclass(frozen=True)
class ModelSettings:
    name: str = "rcf"
    checkpoint: str | None = None
    output: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComputeSettings:
    device: str = "auto"
    engine: Engine = "auto"
    batch_size: int | Literal["auto"] = 16
    precision: Precision = "auto"
    prefetch: int = 2
    region_chips: int = 16


@dataclass(frozen=True)
class OutputSettings:
    dir: str
    datacube: str = "cube.zarr"
    embeddings: str = "embeddings.zarr"
    geoparquet: str = "embeddings.parquet"
    overwrite: bool = False
    quantize: str | None = None
    thumbnails: int = 0
    loss: bool = False


@dataclass(frozen=True)
class RunSpec:
    """A validated run spec. ``base`` is the folder relative paths are resolved from."""

    input: InputSettings
    grid: GridSettings
    outputs: OutputSettings
    model: ModelSettings = field(default_factory=ModelSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    quality: QualityFilter = field(default_factory=QualityFilter)
    name: str = ""
    version: int = 1
    base: str = "."

    def path(self, value: str) -> Path:
        """A path of the spec, resolved from the spec file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else Path(self.base) / p

    @property
    def datacube_path(self) -> Path:
        return self.path(self.outputs.dir) / self.outputs.datacube

    @property
    def embeddings_path(self) -> Path:
        return self.path(self.outputs.dir) / self.outputs.embeddings

    @property
    def geoparquet_path(self) -> Path:
        return self.path(self.outputs.dir) / self.outputs.geoparquet

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("base")
        return _plain(out)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<spec>", base: str = ".") -> RunSpec:
        return _Reader(source).spec(data, base)


def load_spec(path: str | os.PathLike[str]) -> RunSpec:
    """Read and validate a YAML run spec."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SpecError(f"{file}: no such run spec file.")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"{file}: not valid YAML ({err}).") from err
    return RunSpec.from_dict(data, source=str(file), base=str(file.parent.resolve()))


class _Reader:
    """Builds the spec's dataclasses from plain data, with errors that point at the field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> SpecError:
        return SpecError(f"{self.source}: {where}: {problem}")

    def section(
        self,
        data: Any,
        where: str,
        allowed: set[str],
        required: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, Any]:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise self.fail(where, f"must be a mapping of settings, got {type(data).__name__}.")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.fail(
                f"{where}.{unknown[0]}" if where else unknown[0],
                f"unknown setting; allowed: {', '.join(sorted(allowed))}.",
            )
        missing = sorted(required - set(data))
        if missing:
            raise self.fail(
                f"{where}.{missing[0]}" if where else missing[0], "required setting is missing."
            )
        return dict(data)

    def choice(self, value: Any, where: str, options: tuple[Any, ...]) -> Any:
        if value not in options:
            raise self.fail(
                where, f"must be one of {', '.join(map(repr, options))}, got {value!r}."
            )
        return value

    def number(
        self,
        value: Any,
        where: str,
        *,
        low: float | None = None,
        high: float | None = None,
        integer: bool = False,
        positive: bool = False,
    ) -> Any:
        ok = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
            raise self.fail(
                where, f"must be {'an integer' if integer else 'a number'}, got {value!r}."
            )
        if positive and value <= 0:
            raise self.fail(where, f"must be positive, got {value!r}.")
        if (low is not None and value < low) or (high is not None and value > high):
            raise self.fail(where, f"must be within [{low}, {high}], got {value!r}.")
        return value

    def text(self, value: Any, where: str, *, optional: bool = True) -> str | None:
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {value!r}.")
        return value

    def names(self, value: Any, where: str) -> tuple[str, ...] | None:
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise self.fail(where, f"must be a non-empty list of names, got {value!r}.")
        return tuple(value)

    def spec(self, data: Any, base: str) -> RunSpec:
        top = self.section(
            data,
            "",
            {"name", "version", "input", "grid", "model", "compute", "quality", "outputs"},
            {"input", "grid", "outputs"},
        )
        version = top.get("version", 1)
        if version != 1:
            raise self.fail("version", f"this xclay reads run spec version 1, got {version!r}.")
        return RunSpec(
            input=self.input(top["input"]),
            grid=self.grid(top["grid"]),
            outputs=self.outputs(top["outputs"]),
            model=self.model(top.get("model")),
            compute=self.compute(top.get("compute")),
            quality=self.quality(top.get("quality")),
            name=self.text(top.get("name"), "name") or "",
            version=1,
            base=base,
        )

    def input(self, data: Any) -> InputSettings:
        d = self.section(
            data,
            "input",
            {"stac", "bands", "platform", "wavelengths", "datetime", "bbox", "composite", "mask"},
            {"stac"},
        )
        stac = self.section(
            d["stac"], "input.stac", {"items", "api", "collections", "query", "max_items"}
        )
        if bool(stac.get("items")) == bool(stac.get("api")):
            raise self.fail(
                "input.stac", "give exactly one of items (a file) or api (a STAC API URL)."
            )
        source = StacSource(
            items=self.text(stac.get("items"), "input.stac.items"),
            api=self.text(stac.get("api"), "input.stac.api"),
            collections=self.names(stac.get("collections"), "input.stac.collections") or (),
            query=stac.get("query"),
            max_items=self.number(
                stac["max_items"], "input.stac.max_items", integer=True, positive=True
            )
            if "max_items" in stac
            else None,
        )
        if source.api and not source.collections:
            raise self.fail(
                "input.stac.collections",
                "a STAC API search needs collections, e.g. [sentinel-2-l2a].",
            )
        platform = self.text(d.get("platform"), "input.platform")
        if platform is not None:
            from xclay.models.sensors import list_platforms

            self.choice(platform, "input.platform", tuple(list_platforms()))
        bands = self.names(d.get("bands"), "input.bands")
        if bands is None and platform is None:
            raise self.fail(
                "input.bands", "required unless input.platform names a sensor (its bands are used)."
            )
        waves = d.get("wavelengths")
        if waves is not None and (
            not isinstance(waves, Mapping)
            or not all(isinstance(v, int | float) and v > 0 for v in waves.values())
        ):
            raise self.fail(
                "input.wavelengths", "must map band names to wavelengths in micrometres."
            )
        bbox = d.get("bbox")
        if bbox is not None:
            if not (
                isinstance(bbox, list)
                and len(bbox) == 4
                and all(isinstance(v, int | float) for v in bbox)
            ):
                raise self.fail(
                    "input.bbox", f"must be [west, south, east, north] in degrees, got {bbox!r}."
                )
            if not (-180 <= bbox[0] < bbox[2] <= 180 and -90 <= bbox[1] < bbox[3] <= 90):
                raise self.fail(
                    "input.bbox",
                    f"must be [west, south, east, north] with west < east, south < north, in degrees; got {bbox!r}.",
                )
        when = d.get("datetime")
        if when is not None and not isinstance(when, str):
            when = str(when)  # YAML turns a bare date into a date
        from xclay.masks import MASK_KINDS

        return InputSettings(
            stac=source,
            bands=bands,
            platform=platform,
            wavelengths={str(k): float(v) for k, v in waves.items()} if waves else None,
            datetime=when,
            bbox=(float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3])) if bbox else None,
            composite=self.choice(
                d.get("composite", "median"), "input.composite", ("median", "first-valid", "none")
            ),
            mask=self.choice(
                d.get("mask", "auto"), "input.mask", ("auto", "none", None, *MASK_KINDS)
            ),
        )

    def grid(self, data: Any) -> GridSettings:
        d = self.section(
            data,
            "grid",
            {
                "resolution",
                "crs",
                "chip_size",
                "stride",
                "edges",
                "shard_chips",
                "compression",
                "max_pixels",
            },
            {"resolution"},
        )
        return GridSettings(
            resolution=float(self.number(d["resolution"], "grid.resolution", positive=True)),
            crs=self.text(d.get("crs"), "grid.crs")
            if d.get("crs") is None or isinstance(d.get("crs"), str)
            else f"EPSG:{self.number(d['crs'], 'grid.crs', integer=True, positive=True)}",
            chip_size=self.number(
                d.get("chip_size", 256), "grid.chip_size", integer=True, positive=True
            ),
            stride=self.number(d["stride"], "grid.stride", integer=True, positive=True)
            if d.get("stride") is not None
            else None,
            edges=self.choice(d.get("edges", "drop"), "grid.edges", ("drop", "pad")),
            shard_chips=self.number(
                d["shard_chips"], "grid.shard_chips", integer=True, positive=True
            )
            if d.get("shard_chips") is not None
            else None,
            compression=self.choice(
                d.get("compression", "zstd"), "grid.compression", ("zstd", "lz4", "none")
            ),
            max_pixels=self.number(
                d.get("max_pixels", 250_000_000_000), "grid.max_pixels", integer=True, positive=True
            ),
        )

    def model(self, data: Any) -> ModelSettings:
        from xclay.models import list_models

        d = self.section(data, "model", {"name", "checkpoint", "output", "options"})
        options = d.get("options") or {}
        if not isinstance(options, Mapping):
            raise self.fail("model.options", "must be a mapping of the model's options.")
        return ModelSettings(
            name=self.choice(d.get("name", "rcf"), "model.name", tuple(list_models())),
            checkpoint=self.text(d.get("checkpoint"), "model.checkpoint"),
            output=self.choice(d.get("output"), "model.output", (None, "cls", "mean", "patches")),
            options=dict(options),
        )

    def compute(self, data: Any) -> ComputeSettings:
        d = self.section(
            data,
            "compute",
            {"device", "engine", "batch_size", "precision", "prefetch", "region_chips"},
        )
        batch = d.get("batch_size", 16)
        if batch != "auto":
            batch = self.number(batch, "compute.batch_size", integer=True, positive=True)
        device = self.text(d.get("device", "auto"), "compute.device") or "auto"
        if not (device in ("cpu", "cuda", "auto") or device.startswith("cuda:")):
            raise self.fail("compute.device", f"must be cpu, cuda, cuda:N or auto, got {device!r}.")
        return ComputeSettings(
            device=device,
            engine=self.choice(d.get("engine", "auto"), "compute.engine", get_args(Engine)),
            batch_size=batch,
            precision=self.choice(
                d.get("precision", "auto"), "compute.precision", ("auto", "fp32", "bf16")
            ),
            prefetch=self.number(
                d.get("prefetch", 2), "compute.prefetch", integer=True, low=0, high=64
            ),
            region_chips=self.number(
                d.get("region_chips", 16), "compute.region_chips", integer=True, positive=True
            ),
        )

    def quality(self, data: Any) -> QualityFilter:
        defaults = QualityFilter().to_dict()
        d = self.section(data, "quality", set(defaults))
        return QualityFilter(
            **{
                name: float(self.number(d.get(name, default), f"quality.{name}", low=0, high=1))
                for name, default in defaults.items()
            }
        )

    def outputs(self, data: Any) -> OutputSettings:
        d = self.section(
            data,
            "outputs",
            {
                "dir",
                "datacube",
                "embeddings",
                "geoparquet",
                "overwrite",
                "quantize",
                "thumbnails",
                "loss",
            },
            {"dir"},
        )
        return OutputSettings(
            dir=self.text(d["dir"], "outputs.dir", optional=False) or "",
            datacube=self.text(d.get("datacube", "cube.zarr"), "outputs.datacube") or "cube.zarr",
            embeddings=self.text(d.get("embeddings", "embeddings.zarr"), "outputs.embeddings")
            or "embeddings.zarr",
            geoparquet=self.text(d.get("geoparquet", "embeddings.parquet"), "outputs.geoparquet")
            or "embeddings.parquet",
            overwrite=self.flag(d.get("overwrite", False), "outputs.overwrite"),
            quantize=self.choice(d.get("quantize"), "outputs.quantize", (None, *QUANTIZATIONS)),
            thumbnails=self.thumbnails(d.get("thumbnails", False)),
            loss=self.flag(d.get("loss", False), "outputs.loss"),
        )

    def flag(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"must be true or false, got {value!r}.")
        return value

    def thumbnails(self, value: Any) -> int:
        if isinstance(value, bool):
            return 64 if value else 0
        return int(self.number(value, "outputs.thumbnails", integer=True, low=0, high=1024))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, resolved without reading pixels."""

    items: tuple[Any, ...]
    bands: tuple[str, ...]
    platform: str | None
    crs: str
    resolution: float
    shape: tuple[int, int]
    time_steps: int
    chips: int
    area_km2: float
    bytes_estimate: int
    bbox_lonlat: tuple[float, float, float, float]
    geobox: Any = None

    def grid_record(self) -> dict[str, Any]:
        """The pixel grid, exactly, for the run state (workers rebuild region grids from it)."""
        t = self.geobox.affine
        return {
            "shape": list(self.shape),
            "affine": [t.a, t.b, t.c, t.d, t.e, t.f],
            "crs": self.crs,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": [i.id for i in self.items],
            "bands": list(self.bands),
            "platform": self.platform,
            "crs": self.crs,
            "resolution": self.resolution,
            "shape": list(self.shape),
            "time_steps": self.time_steps,
            "chips": self.chips,
            "area_km2": round(self.area_km2, 3),
            "bytes_estimate": self.bytes_estimate,
            "bbox_lonlat": list(self.bbox_lonlat),
        }

    def describe(self) -> str:
        ny, nx = self.shape
        return "\n".join(
            [
                f"  items       {len(self.items)} ({', '.join(i.id for i in self.items[:3])}{', ...' if len(self.items) > 3 else ''})",
                f"  bands       {', '.join(self.bands)}"
                + (f"  (platform {self.platform})" if self.platform else ""),
                f"  area        {self.area_km2:,.1f} km2, bbox {[round(float(v), 4) for v in self.bbox_lonlat]}",
                f"  grid        {ny:,} x {nx:,} px at {self.resolution:g} in {self.crs}, {self.time_steps} time step(s)",
                f"  chips       {self.chips:,}",
                f"  data        ~{_human_bytes(self.bytes_estimate)} of pixels to read and write",
            ]
        )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _search(spec: RunSpec) -> list[Any]:
    from xclay.ingest import IngestError, filter_items, load_items

    source = spec.input.stac
    if source.items:
        items = load_items(spec.path(source.items))
        return filter_items(items, bbox=spec.input.bbox, datetime=spec.input.datetime)
    try:
        from pystac_client import Client
    except ImportError as err:
        from xclay.errors import MissingDependencyError

        raise MissingDependencyError(
            'STAC API search needs pystac-client: pip install "xclay[io]"'
        ) from err
    try:
        search = Client.open(str(source.api)).search(
            collections=list(source.collections),
            bbox=list(spec.input.bbox) if spec.input.bbox else None,
            datetime=spec.input.datetime,
            query=source.query,
            max_items=source.max_items,
        )
        return list(search.items())
    except Exception as err:  # network and API errors come in many types
        raise IngestError(
            f"STAC API search at {source.api} failed: {type(err).__name__}: {err}"
        ) from err


def plan(spec: RunSpec) -> RunPlan:
    """Resolve a spec: items, grid, chips and data volume, without reading pixels."""
    from xclay.chips import ChipGrid, ChipGridSpec
    from xclay.ingest import IngestError, _platform_of, plan_grid
    from xclay.models.sensors import get_sensor

    items = _search(spec)
    if not items:
        raise IngestError(
            f"the STAC search is empty: no items for bbox={list(spec.input.bbox) if spec.input.bbox else None}, "
            f"datetime={spec.input.datetime!r}. Widen the area or the time range."
        )
    platform = spec.input.platform or _platform_of(items)
    bands = spec.input.bands or (get_sensor(platform).band_names if platform else ())
    grid = plan_grid(
        items,
        resolution=spec.grid.resolution,
        crs=spec.grid.crs,
        bbox=spec.input.bbox,
        max_pixels=spec.grid.max_pixels,
    )
    days = {(i.datetime.date() if i.datetime else None) for i in items}
    steps = len(days) if spec.input.composite == "none" else 1
    chip_grid = ChipGrid.from_geobox(
        grid.geobox,
        ChipGridSpec(chip_size=spec.grid.chip_size, stride=spec.grid.stride, edges=spec.grid.edges),
    )
    ny, nx = grid.geobox.shape
    res = abs(float(grid.geobox.resolution.x))
    geographic = grid.geobox.crs is not None and grid.geobox.crs.geographic
    area = float("nan") if geographic else ny * nx * res * res / 1e6
    # Reading: every item's bands once over the grid; writing: the composite (2 bytes a sample).
    bytes_estimate = int(ny * nx * len(bands) * 2 * (len(items) + steps))
    return RunPlan(
        items=tuple(items),
        bands=tuple(bands),
        platform=platform,
        crs=str(grid.geobox.crs),
        resolution=res,
        shape=(int(ny), int(nx)),
        time_steps=steps,
        chips=chip_grid.rows * chip_grid.cols * steps,
        area_km2=area,
        bytes_estimate=bytes_estimate,
        bbox_lonlat=grid.bbox_lonlat,
        geobox=grid.geobox,
    )


# --------------------------------------------------------------------------- steps


@dataclass
class RunReport:
    """What a run did (or, when incomplete, how far it got and what failed)."""

    plan: RunPlan
    outputs: dict[str, str]
    seconds: dict[str, float]
    run: dict[str, int]
    status: Literal["complete", "incomplete"] = "complete"
    failed: list[dict[str, str]] = field(default_factory=list)
    resumed: bool = False

    def describe(self) -> str:
        r = self.run
        embed_s = self.seconds.get("embed", 0.0)
        lines = []
        if self.resumed:
            lines.append(
                "  resumed     a previous run of this spec: its finished regions were kept"
            )
        if r:
            lines.append(
                f"  chips       {r['chips_embedded']:,} embedded of {r['chips_total']:,}; skipped "
                f"{r['chips_skipped_nodata']} (nodata), {r.get('chips_skipped_cloud', 0)} (cloud), "
                f"{r['chips_failed']} (no valid window)"
            )
        lines.append(
            f"  throughput  {r.get('chips_embedded', 0) / max(embed_s, 1e-9):.1f} chips/s embedding; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        )
        lines += [f"  {k:11s} {v}" for k, v in self.outputs.items()]
        lines.append(f"  provenance  {len(self.plan.items)} STAC items, recorded in every output")
        if self.failed:
            lines.append(
                f"  INCOMPLETE  {len(self.failed)} region(s) failed; rerun the same spec to retry them:"
            )
            lines += [f"    {f['region']}: {f['reason']}" for f in self.failed[:10]]
        return "\n".join(lines)


def _identity(spec: RunSpec, resolved: RunPlan) -> dict[str, Any]:
    """What must not change between a run and its resumption (else outputs would mix)."""
    from xclay.models.checkpoints import file_sha256

    checkpoint = spec.path(spec.model.checkpoint) if spec.model.checkpoint else None
    return {
        "input": dataclasses.asdict(spec.input),
        "grid": dataclasses.asdict(spec.grid),
        "model": {
            "name": spec.model.name,
            "output": spec.model.output,
            "options": spec.model.options,
            "checkpoint_sha256": file_sha256(checkpoint)
            if checkpoint and checkpoint.is_file()
            else None,
        },
        "quality": dataclasses.asdict(spec.quality),
        "region_chips": spec.compute.region_chips,
        "precision": spec.compute.precision,
        "stored": {
            "quantize": spec.outputs.quantize,
            "thumbnails": spec.outputs.thumbnails,
            "loss": spec.outputs.loss,
        },
        "items": [i.id for i in resolved.items],
    }


def _start(spec: RunSpec, resolved: RunPlan, torch_threads: int | None) -> tuple[Any, bool]:
    """The run state, begun or resumed; on overwrite, previous outputs are removed first."""
    import pystac

    from xclay.errors import OutputExistsError
    from xclay.regions import RunState

    state = RunState(spec.path(spec.outputs.dir))
    outputs = (spec.datacube_path, spec.embeddings_path, spec.geoparquet_path)
    if spec.outputs.overwrite:
        for path in outputs:
            _remove(path)
        state.reset()
    elif not state.exists():
        for path in outputs:
            if path.exists():
                raise OutputExistsError(
                    f"{path} already exists and is not from a run of this spec; set "
                    "outputs.overwrite: true (CLI: --overwrite) or choose another outputs.dir. "
                    "Nothing was run."
                )
    paths = {
        "datacube": str(spec.datacube_path),
        "embeddings": str(spec.embeddings_path),
        "geoparquet": str(spec.geoparquet_path),
        "checkpoint": str(spec.path(spec.model.checkpoint)) if spec.model.checkpoint else None,
    }
    payload = {
        "spec": spec.to_dict(),
        "plan": resolved.to_dict(),
        "grid": resolved.grid_record(),
        "paths": paths,
    }
    resumed = state.begin(_identity(spec, resolved), payload)
    state.update(torch_threads=torch_threads)
    items_file = state.root / "items.json"
    if not items_file.is_file():
        items = [i.clone() for i in resolved.items]
        for item in items:
            item.make_asset_hrefs_absolute()
        pystac.ItemCollection(items).save_object(dest_href=str(items_file))
    return state, resumed


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _execute(
    fn: Any, regions: list[Any], outdir: Path, client: Any, desc: str, progress: bool | None
) -> list[dict[str, Any]]:
    """Run ``fn(outdir, region)`` for each region: as tasks on the Dask client, or here."""
    results: list[dict[str, Any]] = []
    with progress_bar(len(regions), progress, desc=desc, unit="region") as bar:
        if client is None:
            for region in regions:
                results.append(fn(str(outdir), region.to_dict()))
                bar.update(1)
            return results
        from distributed import as_completed

        warm_workers(client)
        futures = client.map(
            fn, [str(outdir)] * len(regions), [r.to_dict() for r in regions], pure=False
        )
        for future in as_completed(futures):
            try:
                results.append(future.result())
            except Exception as err:  # its workers kept dying (KilledWorker), or similar
                reason = f"{type(err).__name__}: {err}"
                results.append({"region": "?", "status": "failed", "reason": reason})
            bar.update(1)
    return results


def warm_workers(client: Any) -> None:
    """Import the heavy modules on every worker now, in parallel, rather than in each
    worker's first task."""
    client.run(_import_task_modules)


def _import_task_modules() -> None:
    import odc.stac  # noqa: F401
    import torch  # noqa: F401

    import xclay.embed
    import xclay.ingest
    import xclay.tasks  # noqa: F401


def _failures(state: Any, phase: str, results: list[dict[str, Any]]) -> list[dict[str, str]]:
    recorded = [
        {
            "region": f"{f['region']['phase']}-{f['region']['index']:06d}",
            "reason": f["reason"].splitlines()[0],
        }
        for f in state.failed(phase)
    ]
    lost = [r for r in results if r.get("status") == "failed" and r.get("region") == "?"]
    return recorded + [{"region": "?", "reason": r["reason"]} for r in lost]


def _ingest_phase(
    spec: RunSpec, resolved: RunPlan, state: Any, client: Any, progress: bool | None
) -> list[dict[str, str]]:
    from xclay.datacube import create_datacube_store, is_complete, mark_complete
    from xclay.ingest import IngestError, from_stac
    from xclay.regions import ingest_regions
    from xclay.tasks import ingest_region

    path = spec.datacube_path
    if is_complete(path):
        return []
    if not (path / "zarr.json").is_file():
        template = from_stac(
            list(resolved.items),
            bands=list(resolved.bands),
            resolution=spec.grid.resolution,
            datetime=spec.input.datetime,
            composite=spec.input.composite,
            mask=spec.input.mask,
            platform=resolved.platform,
            wavelengths=spec.input.wavelengths,
            geobox=resolved.geobox,
        )
        template.attrs["run_spec"] = spec.to_dict()
        with atomic_output(path, overwrite=True) as tmp:  # a half-created store never stays
            create_datacube_store(
                template,
                tmp,
                chip_size=spec.grid.chip_size,
                shard_chips=spec.grid.shard_chips,
                compression=spec.grid.compression,
            )
    block = spec.grid.chip_size * spec.compute.region_chips
    regions = ingest_regions(resolved.time_steps, resolved.shape, block)
    todo = [r for r in regions if not state.is_done(r)]
    results = _execute(ingest_region, todo, state.root.parent, client, "ingest", progress)
    failed = _failures(state, "ingest", results)
    if failed:
        return failed
    if not any(d.get("any_valid") for d in state.done("ingest")):
        _remove(path)
        state.reset()
        raise IngestError(
            "the region has no valid pixel (every pixel is nodata, or masked as nodata); "
            "nothing was written. Check the area, the time range and the masks."
        )
    mark_complete(path)
    return []


def _embed_phase(
    spec: RunSpec, resolved: RunPlan, state: Any, client: Any, progress: bool | None
) -> list[dict[str, str]]:
    from xclay.datacube import is_complete, mark_complete, open_datacube
    from xclay.embed import EmbedConfig, EmbedSession
    from xclay.export import create_embeddings_store
    from xclay.models.registry import encoder_from_card
    from xclay.regions import embed_regions, write_json_atomic
    from xclay.tasks import embed_region

    path = spec.embeddings_path
    if is_complete(path):
        return []
    record = state.record()
    cube = open_datacube(spec.datacube_path)
    if "card" in record:  # resuming: the encoder exactly as it was first prepared
        config = EmbedConfig.from_dict(record["embed_config"])
        encoder = encoder_from_card(record["card"], checkpoint=record["paths"]["checkpoint"])
    else:
        encoder = _encoder(spec)
        config = _embed_config(spec, cube, encoder)
    session = EmbedSession(cube, encoder, config)
    if "card" not in record:
        # The session's config: with what preparing fixed (the thumbnails' stretch).
        state.update(card=session.card.to_dict(), embed_config=session.config.to_dict())
    if not (path / "zarr.json").is_file():
        layout = session.layout()
        if spec.outputs.quantize:
            layout = layout.quantized(spec.outputs.quantize)
        layout.coords.attrs.update({"run_spec": spec.to_dict(), "run_plan": resolved.to_dict()})
        with atomic_output(path, overwrite=True) as tmp:
            create_embeddings_store(layout, tmp, region_chips=spec.compute.region_chips)
    spec.geoparquet_path.mkdir(parents=True, exist_ok=True)
    regions = embed_regions(len(session.times), session.grid.shape, spec.compute.region_chips)
    todo = [r for r in regions if not state.is_done(r)]
    results = _execute(embed_region, todo, state.root.parent, client, "embed", progress)
    failed = _failures(state, "embed", results)
    if failed:
        return failed
    counts = _total_counts(state)
    mark_complete(path, run=counts)
    parts = sorted(p.name for p in spec.geoparquet_path.glob("part-*.parquet"))
    write_json_atomic(
        spec.geoparquet_path / "_xclay_complete.json", {"run": counts, "parts": parts}
    )
    return []


def _encoder(spec: RunSpec) -> Any:
    from xclay.models import get_model

    options = dict(spec.model.options)
    if spec.model.output is not None:
        options["output"] = spec.model.output
    checkpoint = spec.path(spec.model.checkpoint) if spec.model.checkpoint else None
    return get_model(spec.model.name, checkpoint=checkpoint, **options)


def _embed_config(spec: RunSpec, cube: xr.Dataset, encoder: Any) -> Any:
    from xclay.chips import ChipGridSpec
    from xclay.embed import EmbedConfig, _auto_batch_size

    batch = spec.compute.batch_size
    if batch == "auto":
        batch = _auto_batch_size(encoder, cube, spec.grid.chip_size, spec.compute.device)
    return EmbedConfig(
        grid=ChipGridSpec(
            chip_size=spec.grid.chip_size, stride=spec.grid.stride, edges=spec.grid.edges
        ),
        batch_size=batch,
        quality=spec.quality,
        device=spec.compute.device,
        engine=spec.compute.engine,
        precision=spec.compute.precision,
        prefetch=spec.compute.prefetch,
        thumbnails=spec.outputs.thumbnails,
        loss=spec.outputs.loss,
    )


def _total_counts(state: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for done in state.done("embed"):
        for key, value in done["counts"].items():
            total[key] = total.get(key, 0) + int(value)
    return total


def _report(
    spec: RunSpec,
    resolved: RunPlan,
    state: Any,
    seconds: dict[str, float],
    failed: list[dict[str, str]],
    resumed: bool,
) -> RunReport:
    return RunReport(
        plan=resolved,
        outputs={
            "datacube": str(spec.datacube_path),
            "embeddings": str(spec.embeddings_path),
            "geoparquet": str(spec.geoparquet_path),
        },
        seconds=seconds,
        run=_total_counts(state),
        status="incomplete" if failed else "complete",
        failed=failed,
        resumed=resumed,
    )


def run(
    spec: RunSpec,
    *,
    client: Any = None,
    progress: bool | None = None,
    torch_threads: int | None = None,
) -> RunReport:
    """Ingest, embed and export as the spec says, region by region, resumably.

    Parameters
    ----------
    spec
        A validated run spec (:func:`load_spec`).
    client
        A ``distributed.Client``: regions run as tasks on its workers. ``None``:
        in this process, one after another.
    progress
        Progress bars (``None``: on an interactive terminal).
    torch_threads
        Threads for torch in each task (e.g. cores / workers on a local cluster).

    A rerun of the same spec resumes: finished regions are kept, failed and
    missing ones are done. The report's ``status`` is ``"incomplete"`` when
    regions failed; nothing half-written is ever marked complete.
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    resolved = plan(spec)
    state, resumed = _start(spec, resolved, torch_threads)
    seconds["plan"] = time.perf_counter() - start
    for phase, step in (("ingest", _ingest_phase), ("embed", _embed_phase)):
        start = time.perf_counter()
        failed = step(spec, resolved, state, client, progress)
        seconds[phase] = time.perf_counter() - start
        if failed:
            return _report(spec, resolved, state, seconds, failed, resumed)
    return _report(spec, resolved, state, seconds, [], resumed)


def ingest(spec: RunSpec, *, client: Any = None, progress: bool | None = None) -> RunReport:
    """Step 1 alone: STAC items -> datacube Zarr (resumable, like :func:`run`)."""
    resolved = plan(spec)
    state, resumed = _start(spec, resolved, None)
    start = time.perf_counter()
    failed = _ingest_phase(spec, resolved, state, client, progress)
    seconds = {"ingest": time.perf_counter() - start}
    return _report(spec, resolved, state, seconds, failed, resumed)


def embed_step(spec: RunSpec, *, client: Any = None, progress: bool | None = None) -> RunReport:
    """Step 2 alone: datacube Zarr -> embeddings Zarr and GeoParquet parts (after step 1)."""
    from xclay.datacube import is_complete

    if not is_complete(spec.datacube_path):
        raise XClayError(
            f"{spec.datacube_path} is not a complete datacube yet; run xclay ingest first."
        )
    resolved = plan(spec)
    state, resumed = _start(spec, resolved, None)
    start = time.perf_counter()
    failed = _embed_phase(spec, resolved, state, client, progress)
    seconds = {"embed": time.perf_counter() - start}
    return _report(spec, resolved, state, seconds, failed, resumed)


def export_step(spec: RunSpec) -> Path:
    """Step 3 alone: (re)write the GeoParquet parts from the complete embeddings Zarr."""
    from xclay.export import open_embeddings, to_geoparquet
    from xclay.regions import embed_regions

    emb = open_embeddings(spec.embeddings_path)
    out = spec.geoparquet_path
    out.mkdir(parents=True, exist_ok=True)
    shape = (emb.sizes["chip_y"], emb.sizes["chip_x"])
    for region in embed_regions(emb.sizes["time"], shape, spec.compute.region_chips):
        part = emb.isel(
            time=slice(region.time, region.time + 1),
            chip_y=slice(*region.rows),
            chip_x=slice(*region.cols),
        )
        path = out / f"part-{region.index:06d}.parquet"
        if bool(part["embedded"].any()):
            to_geoparquet(part.load(), path, quantize=spec.outputs.quantize, overwrite=True)
        else:
            path.unlink(missing_ok=True)
    return out


def client_for(
    cluster: str | None, scheduler: str | None, device: str, *, threads: int | None = None
) -> tuple[Any, int | None]:
    """A Dask client for ``--cluster local:N`` or ``--scheduler ADDRESS``, and the torch threads
    each task should use (``threads``, default: the cores shared among the workers);
    ``(None, None)`` to run in this process."""
    if cluster is None and scheduler is None:
        return None, None
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        from xclay.errors import MissingDependencyError

        raise MissingDependencyError(
            'distributed runs need Dask: pip install "xclay[dask]"'
        ) from err
    if scheduler is not None:
        return Client(scheduler), None
    assert cluster is not None
    kind, _, count = cluster.partition(":")
    if kind != "local" or not count.isdigit() or int(count) < 1:
        raise SpecError(f"--cluster must be local:N (N workers), got {cluster!r}.")
    workers = int(count)
    if device != "cpu":
        try:
            import torch
            from dask_cuda import LocalCUDACluster

            if torch.cuda.is_available():
                gpus = min(workers, torch.cuda.device_count())
                return Client(LocalCUDACluster(n_workers=gpus)), None
        except ImportError:
            log.info("dask-cuda is not installed; a CPU LocalCluster is used")
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    _worker_environment(threads)
    cluster_obj = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    return Client(cluster_obj), threads


def _worker_environment(threads: int) -> None:
    """What Dask puts in a new worker's environment (kept for the workers it restarts).

    Dask sets OMP/MKL/OpenBLAS to 1 thread and MALLOC_TRIM_THRESHOLD_; setting any glibc
    malloc threshold turns off glibc's adaptive mmap threshold, so every large temporary
    is mapped and page-faulted anew: small torch ops ran 10x slower in a worker than in a
    plain process (benchmarks/scaling.py, docs/hpc.md). Give workers their share of the
    cores and leave malloc alone.
    """
    import dask

    dask.config.set(
        {
            "distributed.nanny.pre-spawn-environ": {
                "OMP_NUM_THREADS": threads,
                "MKL_NUM_THREADS": threads,
                "OPENBLAS_NUM_THREADS": threads,
            }
        }
    )
    # A nanny leaves the variables it set in this process's environment, where later
    # workers (restarted ones too) would inherit them: take it out.
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
