"""Run specs: what a run is, read from YAML and validated field by field.

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

or, to embed a datacube that already exists, ``input: {datacube: cube.zarr}``.
:func:`load_spec` validates it: an error names the file, the field and what
is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from xclay._json import plain
from xclay.batch.chips import Edges
from xclay.batch.readers import Engine
from xclay.devices import PRECISIONS
from xclay.errors import SpecError
from xclay.ingest.grid import MAX_PIXELS
from xclay.models.clay import Output as ClayOutput
from xclay.outputs.quantize import QUANTIZATIONS
from xclay.quality import QualityFilter
from xclay.storage import Location, Where, is_url, location

if TYPE_CHECKING:
    from xclay.datacube import Compression
    from xclay.devices import Precision
    from xclay.ingest import Composite

__all__ = [
    "ComputeSettings",
    "GridSettings",
    "InputSettings",
    "ModelSettings",
    "OutputSettings",
    "RunSpec",
    "SpecError",
    "StacSource",
    "load_spec",
]


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class StacSource:
    """The spec's ``input.stac``: STAC items from a file or an API search. Each field is in
    docs/run-spec.md's table of fields.

    Parameters
    ----------
    items
        A file: an ItemCollection or FeatureCollection JSON, an Item JSON, or a static
        ``catalog.json``, relative to the spec file's folder; exactly one of ``items`` and
        ``api``.
    api
        A STAC API URL to search (pystac-client).
    collections
        Collections to search (``api`` only, and required with it).
    query
        A STAC API query (``api`` only), e.g. ``{"eo:cloud_cover": {"lt": 20}}``; default
        none.
    max_items
        Stop the search after this many items (``api`` only); default no limit.
    """

    items: str | None = None
    api: str | None = None
    collections: tuple[str, ...] = ()
    query: dict[str, Any] | None = None
    max_items: int | None = None


@dataclass(frozen=True)
class InputSettings:
    """The spec's ``input``: what to embed (STAC items to composite, or a datacube store).
    Each field is in docs/run-spec.md's table of fields.

    Parameters
    ----------
    stac
        The STAC items to ingest (:class:`StacSource`); exactly one of ``stac`` and
        ``datacube``.
    datacube
        Instead of ``stac``: a datacube Zarr to embed, relative to the spec file's folder
        (no ingestion; the other fields do not apply).
    bands
        Band names as the items name them (asset keys, ``eo:bands`` names or common
        names); default the bands of ``platform``, which is then required.
    platform
        A sensor-table key (``"sentinel-2-l2a"``, ``"landsat-c2l2-sr"``, ...); default
        from the items' ``platform`` or collection id.
    wavelengths
        Band name -> central wavelength (micrometres), for other sensors; default from
        the platform or the items' ``eo:bands``.
    datetime
        ``"start/end"`` (ISO dates; ``..`` for an open end): the items kept and the
        composite's time range; default all times.
    bbox
        The area (west, south, east, north) in degrees; default the items' extent.
    composite
        ``"median"`` of valid observations (default), ``"first-valid"``, or ``"none"``
        (one time step per solar day).
    mask
        ``"auto"`` (default: Sentinel-2 SCL or Landsat QA_PIXEL when the items have
        them), ``"none"`` (or ``None``), ``"sentinel-2-scl"`` or ``"landsat-qa-pixel"``.
    """

    stac: StacSource | None = None
    datacube: str | None = None  # embed this existing datacube store (no ingest)
    bands: tuple[str, ...] | None = None
    platform: str | None = None
    wavelengths: dict[str, float] | None = None
    datetime: str | None = None
    bbox: tuple[float, float, float, float] | None = None
    composite: Composite = "median"
    mask: str | None = "auto"


@dataclass(frozen=True)
class GridSettings:
    """The spec's ``grid``: the pixel grid, the chips and the datacube store's layout.
    Each field is in docs/run-spec.md's table of fields.

    Parameters
    ----------
    resolution
        Pixel size in the target CRS's units (metres for UTM); required with
        ``input.stac``.
    crs
        A CRS (``"EPSG:32633"``): one grid; ``"utm"``: tiled by UTM zone; default
        ``None``: the items' CRS when they share one, tiled by UTM zone when the area
        spans several 6-degree zones, else the UTM zone of its centre.
    chip_size
        Chip edge in pixels; default 256.
    stride
        Pixels between chip origins; default the chip size.
    edges
        ``"drop"`` (default): only whole chips inside the grid; ``"pad"``: also the chips
        that reach past its last rows and columns, padded with nodata.
    shard_chips
        Chips per shard edge in the datacube Zarr; default ``compute.region_chips`` (one
        shard file per region and array).
    compression
        The datacube Zarr's compression: ``"zstd"`` (default), ``"lz4"`` or ``"none"``.
    max_pixels
        Refuse grids with more pixels than this, over all zones (a units mistake, not a
        request); default 2.5e11.
    """

    resolution: float | None = None  # needed to ingest from STAC
    crs: str | None = None  # a CRS, "utm" (tiled by UTM zone), or None (see xclay.run.plan)
    chip_size: int = 256
    stride: int | None = None
    edges: Edges = "drop"
    shard_chips: int | None = None
    compression: Compression = "zstd"
    max_pixels: int = MAX_PIXELS


@dataclass(frozen=True)
class ModelSettings:
    """The spec's ``model``: the encoder, its weights and options. Each field is in
    docs/run-spec.md's table of fields.

    Parameters
    ----------
    name
        A registry name (``xclay info`` lists them); default ``"rcf"``.
    checkpoint
        Weights (``clay-v1.5``) or fitted filters (``rcf``), relative to the spec file's
        folder; default none.
    output
        Which vector to store: ``"cls"``, ``"mean"`` or ``"patches"`` (Clay); default
        ``None``: the model's default.
    options
        The model's own options (e.g. ``{"num_filters": 256}`` for rcf); default none.
    """

    name: str = "rcf"
    checkpoint: str | None = None
    output: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def encoder_options(self) -> dict[str, Any]:
        """The keyword options the model is built with: ``options``, and ``output``
        where given."""
        return {**self.options, **({"output": self.output} if self.output is not None else {})}


@dataclass(frozen=True)
class ComputeSettings:
    """The spec's ``compute``: device, read engine, batches, precision, regions. Each field
    is in docs/run-spec.md's table of fields.

    Parameters
    ----------
    device
        ``"auto"`` (default: a CUDA GPU when there is one), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.
    engine
        How chips are read: ``"zarr"`` (host), ``"kvikio"`` (into GPU memory), or
        ``"auto"`` (default: kvikio on a GPU with kvikIO installed).
    batch_size
        Chips per encoder call (chips that pass the quality filter); default ``"auto"``:
        sized by the model for the device.
    precision
        ``"auto"`` (default), ``"fp32"``, ``"tf32"`` (CUDA), ``"bf16"`` or ``"fp8"`` (CUDA,
        compute capability 8.9+).
    prefetch
        Batches read ahead; default 2.
    region_chips
        Chips per region edge: the unit of work, of resumption, and of the embeddings
        Zarr's chunks; default 16.
    """

    device: str = "auto"
    engine: Engine = "auto"
    batch_size: int | Literal["auto"] = "auto"
    precision: Precision = "auto"
    prefetch: int = 2
    region_chips: int = 16


@dataclass(frozen=True)
class OutputSettings:
    """The spec's ``outputs``: where and what is written. Each field is in
    docs/run-spec.md's table of fields.

    Parameters
    ----------
    dir
        The outputs' folder, relative to the spec file's folder; required.
    datacube
        The datacube Zarr, in ``dir``; default ``"cube.zarr"`` (with several zones, one
        per zone, its name suffixed with the zone's CRS: ``cube-EPSG32719.zarr``).
    embeddings
        The embeddings Zarr, in ``dir`` (one per zone, like ``datacube``); default
        ``"embeddings.zarr"``.
    geoparquet
        The GeoParquet dataset (a folder of parts), in ``dir``; default
        ``"embeddings.parquet"``.
    items
        The run's STAC items, indexed (GeoParquet), in ``dir``; default ``"items.parquet"``.
    overwrite
        Replace existing outputs (CLI: ``--overwrite``); default False.
    quantize
        ``"int8"``: int8 vectors with a scale per vector in both outputs; default ``None``:
        float32 vectors.
    thumbnails
        Edge in pixels of a true-colour preview per chip (YAML ``true``: 64); default 0:
        none.
    loss
        Score each chip with Clay's masked-reconstruction loss; default False.
    """

    dir: str
    datacube: str = "cube.zarr"
    embeddings: str = "embeddings.zarr"
    geoparquet: str = "embeddings.parquet"
    items: str = "items.parquet"
    overwrite: bool = False
    quantize: str | None = None
    thumbnails: int = 0
    loss: bool = False


@dataclass(frozen=True)
class RunSpec:
    """A validated run spec (``docs/run-spec.md`` describes its fields).

    Parameters
    ----------
    input
        What to embed: STAC items to ingest (``input.stac`` and how to ingest them), or
        an existing datacube (``input.datacube``).
    grid
        The pixel and chip grid: resolution, CRS, chip size, stride, edges, sharding,
        compression and the pixel limit.
    outputs
        Where the outputs go (``outputs.dir``), their names, and what they store.
    model
        The encoder: registry name, checkpoint, output and options; default ``rcf``.
    compute
        How to embed: device, engine, batch size, precision, prefetch and region size;
        default the spec's defaults (``auto`` device, engine, batch size and precision).
    quality
        Which chips to embed, by their pixel-class fractions; default skip chips more
        than half nodata.
    name
        A label, stored with the outputs.
    version
        The spec format version (1).
    base
        The folder relative paths are resolved from (the spec file's folder).
    storage
        Settings for every object-storage location of the run (inputs and outputs)
        beyond the environment: obstore's keys (``endpoint``, ``region``,
        ``skip_signature``, ...). Keep secrets in the environment: the spec is stored
        with the outputs.
    gdal
        GDAL configuration options for reading the STAC assets (remote COGs), over
        xclay's settings for cloud reads and the environment's
        (:func:`xclay.storage.gdal.gdal_settings`), e.g. ``GDAL_HTTP_MAX_RETRY: 3``.
    """

    input: InputSettings
    grid: GridSettings
    outputs: OutputSettings
    model: ModelSettings = field(default_factory=ModelSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    quality: QualityFilter = field(default_factory=QualityFilter)
    name: str = ""
    version: int = 1
    base: str = "."
    storage: Mapping[str, Any] = field(default_factory=dict)
    gdal: Mapping[str, Any] = field(default_factory=dict)

    def path(self, value: str) -> Location:
        """A location of the spec: a URL as it is, a path resolved from the spec file's
        folder."""
        if is_url(value) or value.startswith("file://"):
            return location(value, self.storage)
        p = Path(value).expanduser()
        if p.is_absolute():
            return location(p)
        if is_url(self.base):  # a spec read from a URL: its relative paths are beside it
            return location(self.base, self.storage) / p.as_posix()
        return location(Path(self.base) / p)

    @property
    def outdir(self) -> Location:
        return self.path(self.outputs.dir)

    @property
    def datacube_path(self) -> Location:
        """The datacube store (the input's, when the run embeds an existing datacube)."""
        if self.input.datacube is not None:
            return self.path(self.input.datacube)
        return self.outdir / self.outputs.datacube

    @property
    def items_path(self) -> Location:
        return self.outdir / self.outputs.items

    @property
    def embeddings_path(self) -> Location:
        return self.outdir / self.outputs.embeddings

    @property
    def geoparquet_path(self) -> Location:
        return self.outdir / self.outputs.geoparquet

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("base")
        for optional in ("storage", "gdal"):
            if not out[optional]:
                out.pop(optional)
        result: dict[str, Any] = plain(out)
        return result

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<spec>", base: str = ".") -> RunSpec:
        return _Reader(source).spec(data, base)


def load_spec(path: Where) -> RunSpec:
    """Read and validate a YAML run spec.

    Parameters
    ----------
    path
        The spec's YAML file (a path or URL); relative paths in it are resolved from its
        folder.

    Returns
    -------
    RunSpec
        The validated spec. An invalid one raises :class:`SpecError`, naming the file,
        the field and what is allowed.
    """
    import yaml

    file = location(path)
    try:
        text = file.read_text()
    except FileNotFoundError as err:
        raise SpecError(f"{file}: no such run spec file.") from err
    except IsADirectoryError as err:
        raise SpecError(f"{file}: a folder, not a run spec file.") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{file}: not valid YAML{where}: {problem}.") from err
    except UnicodeDecodeError as err:
        raise SpecError(f"{file}: not a text file; a run spec is YAML.") from err
    base = str(file.parent.path.resolve()) if file.is_local else file.parent.url
    return RunSpec.from_dict(data, source=str(file), base=base)


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
            {
                "name",
                "version",
                "input",
                "grid",
                "model",
                "compute",
                "quality",
                "outputs",
                "storage",
                "gdal",
            },
            {"input", "outputs"},
        )
        version = top.get("version", 1)
        if version != 1:
            raise self.fail("version", f"this xclay reads run spec version 1, got {version!r}.")
        inputs = self.input(top["input"])
        grid = self.grid(top.get("grid"))
        if inputs.stac is not None and grid.resolution is None:
            raise self.fail(
                "grid.resolution", "required to ingest from STAC (pixel size, e.g. 10 for 10 m)."
            )
        if grid.crs is not None and grid.crs.lower() == "utm":
            grid = dataclasses.replace(grid, crs="utm")
        return RunSpec(
            input=inputs,
            grid=grid,
            outputs=self.outputs(top["outputs"]),
            model=self.model(top.get("model")),
            compute=self.compute(top.get("compute")),
            quality=self.quality(top.get("quality")),
            name=self.text(top.get("name"), "name") or "",
            version=1,
            base=base,
            storage=self.options(top.get("storage"), "storage", "storage options"),
            gdal=self.options(top.get("gdal"), "gdal", "GDAL configuration options"),
        )

    def options(self, data: Any, where: str, what: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, Mapping) or not all(isinstance(k, str) for k in data):
            raise self.fail(where, f"must be a mapping of {what}, got {data!r}.")
        for key, value in data.items():
            if not isinstance(value, str | bool | int | float):
                raise self.fail(
                    f"{where}.{key}", f"must be a string, number or boolean, got {value!r}."
                )
        return dict(data)

    def input(self, data: Any) -> InputSettings:
        d = self.section(
            data,
            "input",
            {
                "stac",
                "datacube",
                "bands",
                "platform",
                "wavelengths",
                "datetime",
                "bbox",
                "composite",
                "mask",
            },
        )
        if ("stac" in d) == ("datacube" in d):
            raise self.fail(
                "input",
                "give exactly one of stac (items to ingest) or datacube (a store to embed).",
            )
        if "datacube" in d:
            extra = sorted(set(d) - {"datacube"})
            if extra:
                raise self.fail(
                    f"input.{extra[0]}",
                    "describes STAC ingestion; an input datacube already has its bands and times.",
                )
            return InputSettings(
                datacube=self.text(d["datacube"], "input.datacube", optional=False)
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
        search_only = [k for k in ("collections", "query", "max_items") if k in stac]
        if source.items and search_only:
            raise self.fail(
                f"input.stac.{search_only[0]}",
                "applies to a STAC API search (api:), not to an items file; remove it, or "
                "filter the file's items with input.bbox and input.datetime.",
            )
        if source.api and not source.collections:
            raise self.fail(
                "input.stac.collections",
                "a STAC API search needs collections, e.g. [sentinel-2-l2a].",
            )
        platform = self.text(d.get("platform"), "input.platform")
        if platform is not None:
            from xclay.sensors import list_platforms

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
                swapped = [bbox[1], bbox[0], bbox[3], bbox[2]]
                outside = not (-90 <= bbox[1] <= 90 and -90 <= bbox[3] <= 90)
                hint = (
                    f" Latitudes {bbox[1]!r} and {bbox[3]!r} are outside -90..90: longitude "
                    f"comes first (did you mean {swapped!r}?)."
                    if outside and -90 <= swapped[1] < swapped[3] <= 90
                    else ""
                )
                raise self.fail(
                    "input.bbox",
                    "must be [west, south, east, north] with west < east, south < north, in "
                    f"degrees; got {bbox!r}.{hint}",
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
        )
        return GridSettings(
            resolution=float(self.number(d["resolution"], "grid.resolution", positive=True))
            if d.get("resolution") is not None
            else None,
            crs=self.text(d.get("crs"), "grid.crs")
            if d.get("crs") is None or isinstance(d.get("crs"), str)
            else f"EPSG:{self.number(d['crs'], 'grid.crs', integer=True, positive=True)}",
            chip_size=self.number(
                d.get("chip_size", 256), "grid.chip_size", integer=True, positive=True
            ),
            stride=self.number(d["stride"], "grid.stride", integer=True, positive=True)
            if d.get("stride") is not None
            else None,
            edges=self.choice(d.get("edges", "drop"), "grid.edges", get_args(Edges)),
            shard_chips=self.number(
                d["shard_chips"], "grid.shard_chips", integer=True, positive=True
            )
            if d.get("shard_chips") is not None
            else None,
            compression=self.choice(
                d.get("compression", "zstd"), "grid.compression", ("zstd", "lz4", "none")
            ),
            max_pixels=self.number(
                d.get("max_pixels", MAX_PIXELS), "grid.max_pixels", integer=True, positive=True
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
            output=self.choice(d.get("output"), "model.output", (None, *get_args(ClayOutput))),
            options=dict(options),
        )

    def compute(self, data: Any) -> ComputeSettings:
        d = self.section(
            data,
            "compute",
            {"device", "engine", "batch_size", "precision", "prefetch", "region_chips"},
        )
        batch = d.get("batch_size", "auto")
        if batch != "auto":
            batch = self.number(batch, "compute.batch_size", integer=True, positive=True)
        device = self.text(d.get("device", "auto"), "compute.device") or "auto"
        if not (device in ("cpu", "cuda", "auto") or device.startswith("cuda:")):
            raise self.fail("compute.device", f"must be cpu, cuda, cuda:N or auto, got {device!r}.")
        return ComputeSettings(
            device=device,
            engine=self.choice(d.get("engine", "auto"), "compute.engine", get_args(Engine)),
            batch_size=batch,
            precision=self.choice(d.get("precision", "auto"), "compute.precision", PRECISIONS),
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
                "items",
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
            items=self.text(d.get("items", "items.parquet"), "outputs.items") or "items.parquet",
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
