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
import datetime as dt
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xclay._json import plain
from xclay.batch.chips import CHIP_SIZE, EDGES, STRIDE, Edges
from xclay.batch.engines import Engine
from xclay.datacube import Compression
from xclay.devices import Precision
from xclay.embed import BATCH_SIZE, DEVICE, ENGINE, LOSS, PRECISION, PREFETCH, THUMBNAILS
from xclay.errors import ConfigError, SpecError
from xclay.ingest import Composite
from xclay.ingest.grid import MAX_PIXELS as MAX_PIXELS_DEFAULT
from xclay.outputs.quantize import QUANTIZE
from xclay.quality import QualityFilter
from xclay.settings import (
    Setting,
    check_fields,
    declared,
    documented,
    markdown_rows,
    read_section,
    settings_of,
)
from xclay.storage import Location, Where, is_url, location

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

# The run spec's own settings, declared once (xclay.settings); the embedding's settings
# in it (chip grid, compute, thumbnails, loss, quality) are the ones embed() declares.


def _options(value: Any) -> Any:
    """A mapping of options (storage, GDAL): names to strings, numbers or booleans."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, str | bool | int | float):
                raise ValueError(f"{key!r} must be a string, number or boolean, got {item!r}")
    return value


def _crs(value: Any) -> Any:
    """``grid.crs`` as written: an EPSG number, ``EPSG:n``, a WKT, or ``utm`` (any case)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return f"EPSG:{value}"
    if isinstance(value, str) and value.lower() == "utm":
        return "utm"
    return value


def _when(value: Any) -> Any:
    return str(value) if isinstance(value, dt.date) else value  # YAML reads a bare date


def _platforms() -> tuple[str, ...]:
    from xclay.sensors import list_platforms

    return tuple(list_platforms())


def _masks() -> tuple[Any, ...]:
    from xclay.masks import MASK_KINDS

    return ("auto", "none", *MASK_KINDS)


def _models() -> tuple[str, ...]:
    from xclay.models import list_models

    return tuple(list_models())


def _bbox(value: Any) -> Any:
    """``input.bbox`` checked: [west, south, east, north] in degrees, with a hint on axis
    order when latitudes look like longitudes."""
    if value is None:
        return None
    if not (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError(f"must be [west, south, east, north] in degrees, got {value!r}")
    if not (-180 <= value[0] < value[2] <= 180 and -90 <= value[1] < value[3] <= 90):
        swapped = [value[1], value[0], value[3], value[2]]
        outside = not (-90 <= value[1] <= 90 and -90 <= value[3] <= 90)
        hint = (
            f" Latitudes {value[1]!r} and {value[3]!r} are outside -90..90: longitude comes "
            f"first (did you mean {swapped!r}?)."
            if outside and -90 <= swapped[1] < swapped[3] <= 90
            else ""
        )
        raise ValueError(
            "must be [west, south, east, north] with west < east, south < north, in "
            f"degrees; got {list(value)!r}.{hint}"
        )
    return tuple(float(v) for v in value)


ITEMS = Setting(
    None, "a file or folder (or URL): an ItemCollection / FeatureCollection JSON, an array of "
    "Items, an Item JSON, a static catalog.json, newline-delimited JSON (one Item a line) or "
    "stac-geoparquet (a file, or a folder of them); exactly one of items and api", flag=False,
    see="#large-catalogues",
)  # fmt: skip
API = Setting(None, "a STAC API URL to search (pystac-client)", flag=False)
COLLECTIONS = Setting((), "collections to search (required with api)", flag=False)
QUERY = Setting(None, "a STAC API query, e.g. {eo:cloud_cover: {lt: 20}} (api only)", flag=False)
MAX_ITEMS = Setting(None, "stop the search after this many items (api only)", positive=True)

DATACUBE = Setting(
    None, "instead of stac: a datacube Zarr to embed (no ingestion; the other input fields "
    "do not apply)", flag=False,
)  # fmt: skip
BANDS = Setting(None, "band names as the items name them; default the platform's bands")
PLATFORM = Setting(
    None, "a sensor-table key; default from the items' platform or collection", choices=_platforms
)
WAVELENGTHS = Setting(None, "band -> central wavelength, for other sensors", unit="µm")
DATETIME = Setting(
    None, "start/end (ISO dates, .. for an open end): items kept, composite range",
    coerce=_when,
)  # fmt: skip
BBOX = Setting(
    None, "[west, south, east, north] in degrees; default the items' extent", coerce=_bbox
)
COMPOSITE = Setting("median", "median of valid observations, first-valid, or none (a step a day)")
MASK = Setting(
    "auto", "pixel classes left out of composites: auto (SCL, QA_PIXEL where present), none, "
    "or a mask kind", choices=_masks,
)  # fmt: skip

RESOLUTION = Setting(None, "pixel size in the target CRS (required with input.stac)", positive=True)
CRS = Setting(
    None, "a CRS (EPSG:32633, or 32633), or utm: one grid per UTM zone; default the items' "
    "CRS, or UTM zones when the area spans several", coerce=_crs,
    see="#areas-across-utm-zones",
)  # fmt: skip
SHARD_CHIPS = Setting(
    None, "chips per shard edge in the datacube Zarr; default compute.region_chips",
    positive=True,
)  # fmt: skip
COMPRESSION = Setting("zstd", "the datacube Zarr's compression")
MAX_PIXELS = Setting(
    MAX_PIXELS_DEFAULT, "refuse grids larger than this, over all zones (a units mistake)",
    positive=True,
)  # fmt: skip

MODEL = Setting("rcf", "a registry name (xclay info lists them)", choices=_models)
CHECKPOINT = Setting(None, "weights or fitted filters: a path or URL (read once, cached)")
MODEL_OPTIONS = Setting(
    {}, "the model's own options, checked by the model: e.g. {num_filters: 256} for rcf, "
    "{output: patches} for clay-v1.5", see="models.md",
)  # fmt: skip

REGION_CHIPS = Setting(
    16, "chips per region edge: the unit of work, of resuming, and of the embeddings Zarr's "
    "chunks", unit="chips", positive=True, metavar="N",
)  # fmt: skip

REGIONS_IN_FLIGHT = Setting(
    None, "regions submitted to a Dask cluster at once (the driver and the scheduler hold "
    "these only); default 2 per worker thread", unit="regions", positive=True, metavar="N",
    see="hpc.md#bounded-submission",
)  # fmt: skip

DIR = Setting(dataclasses.MISSING, "folder of the outputs: a path, or a URL (s3://bucket/prefix)")
CUBE_NAME = Setting("cube.zarr", "datacube Zarr, in dir (one per zone: cube-EPSG32719.zarr)")
EMBEDDINGS_NAME = Setting("embeddings.zarr", "embeddings Zarr, in dir (one per zone)")
GEOPARQUET_NAME = Setting("embeddings.parquet", "GeoParquet dataset (a folder of parts), in dir")
ITEMS_NAME = Setting("items.parquet", "the run's STAC items, indexed (GeoParquet), in dir")
OVERWRITE = Setting(False, "replace existing outputs (CLI: --overwrite)")

NAME = Setting("", "a label, stored with the outputs")
VERSION = Setting(1, "spec format version (this xclay reads version 1)", choices=(1,))
STORAGE = Setting(
    {}, "storage options for every URL of the run (obstore's or fsspec's keys, max_retries, "
    "retry_timeout); CLI: --storage-option KEY=VALUE", coerce=_options, see="cloud.md",
)  # fmt: skip
GDAL = Setting(
    {}, "GDAL settings for reading the items' images, over xclay's cloud defaults; CLI: "
    "--gdal-option KEY=VALUE", coerce=_options, see="cloud.md#stac-assets-on-https-and-s3",
)  # fmt: skip


@documented()
@dataclass(frozen=True)
class StacSource:
    """The spec's ``input.stac``: STAC items from a file or an API search (each field's
    declaration says what it is; docs/run-spec.md's table lists them)."""

    items: str | None = declared(ITEMS)
    api: str | None = declared(API)
    collections: tuple[str, ...] = declared(COLLECTIONS)
    query: dict[str, Any] | None = declared(QUERY)
    max_items: int | None = declared(MAX_ITEMS)

    def __post_init__(self) -> None:
        check_fields(self, prefix="input.stac.")
        if bool(self.items) == bool(self.api):
            raise ConfigError(
                "input.stac: give exactly one of items (a file) or api (a STAC API URL)."
            )
        search_only = [k for k in ("collections", "query", "max_items") if getattr(self, k)]
        if self.items and search_only:
            raise ConfigError(
                f"input.stac.{search_only[0]}: applies to a STAC API search (api:), not to an "
                "items file; remove it, or filter the file's items with input.bbox and "
                "input.datetime."
            )
        if self.api and not self.collections:
            raise ConfigError(
                "input.stac.collections: a STAC API search needs collections, e.g. "
                "[sentinel-2-l2a]."
            )


@documented(stac="STAC items to composite (:class:`StacSource`); None with a ``datacube``.")
@dataclass(frozen=True)
class InputSettings:
    """The spec's ``input``: what to embed (STAC items to composite, or a datacube store)."""

    stac: StacSource | None = None
    datacube: str | None = declared(DATACUBE)
    bands: tuple[str, ...] | None = declared(BANDS)
    platform: str | None = declared(PLATFORM)
    wavelengths: dict[str, float] | None = declared(WAVELENGTHS)
    datetime: str | None = declared(DATETIME)
    bbox: tuple[float, float, float, float] | None = declared(BBOX)
    composite: Composite = declared(COMPOSITE)
    mask: str | None = declared(MASK)

    def __post_init__(self) -> None:
        check_fields(self, prefix="input.")
        if (self.stac is None) == (self.datacube is None):
            raise ConfigError(
                "input: give exactly one of stac (items to ingest) or datacube (a store to embed)."
            )
        if self.bands is not None and not self.bands:
            raise ConfigError("input.bands: must name at least one band, got [].")
        if self.stac is not None and self.bands is None and self.platform is None:
            raise ConfigError(
                "input.bands: required unless input.platform names a sensor (its bands are used)."
            )
        if self.wavelengths and not all(v > 0 for v in self.wavelengths.values()):
            raise ConfigError("input.wavelengths: must map band names to positive micrometres.")


@documented()
@dataclass(frozen=True)
class GridSettings:
    """The spec's ``grid``: the pixel grid, the chips and the datacube store's layout."""

    resolution: float | None = declared(RESOLUTION)
    crs: str | None = declared(CRS)
    chip_size: int = declared(CHIP_SIZE)
    stride: int | None = declared(STRIDE)
    edges: Edges = declared(EDGES)
    shard_chips: int | None = declared(SHARD_CHIPS)
    compression: Compression = declared(COMPRESSION)
    max_pixels: int = declared(MAX_PIXELS)

    def __post_init__(self) -> None:
        check_fields(self, prefix="grid.")


@documented()
@dataclass(frozen=True)
class ModelSettings:
    """The spec's ``model``: the encoder, its weights and options."""

    name: str = declared(MODEL)
    checkpoint: str | None = declared(CHECKPOINT)
    options: dict[str, Any] = declared(MODEL_OPTIONS)

    def __post_init__(self) -> None:
        check_fields(self, prefix="model.")

    @property
    def output(self) -> str | None:
        """``options["output"]`` (deprecated: the spec once had ``model.output``)."""
        value = self.options.get("output")
        return None if value is None else str(value)

    def encoder_options(self) -> dict[str, Any]:
        """The keyword options the model is built with (a copy of ``options``)."""
        return dict(self.options)


@documented()
@dataclass(frozen=True)
class ComputeSettings:
    """The spec's ``compute``: device, read engine, batches, precision, regions (the
    embedding's settings, as :func:`xclay.embed` declares them, and the run's regions)."""

    device: str = declared(DEVICE)
    engine: Engine = declared(ENGINE)
    batch_size: int | Literal["auto"] = declared(BATCH_SIZE)
    precision: Precision = declared(PRECISION)
    prefetch: int = declared(PREFETCH)
    region_chips: int = declared(REGION_CHIPS)
    regions_in_flight: int | None = declared(REGIONS_IN_FLIGHT)

    def __post_init__(self) -> None:
        check_fields(self, prefix="compute.")


@documented()
@dataclass(frozen=True)
class OutputSettings:
    """The spec's ``outputs``: where and what is written."""

    dir: str = declared(DIR)
    datacube: str = declared(CUBE_NAME)
    embeddings: str = declared(EMBEDDINGS_NAME)
    geoparquet: str = declared(GEOPARQUET_NAME)
    items: str = declared(ITEMS_NAME)
    overwrite: bool = declared(OVERWRITE)
    quantize: Literal["int8"] | None = declared(QUANTIZE)
    thumbnails: int = declared(THUMBNAILS)
    loss: bool = declared(LOSS)

    def __post_init__(self) -> None:
        check_fields(self, prefix="outputs.")


def settings_table() -> str:
    """docs/run-spec.md's table of fields, made from the declarations (a test holds the
    page to it: ``python -c "from xclay.run.spec import settings_table as t; print(t())"``
    prints it)."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    rows += markdown_rows(RunSpec, "")
    for key, cls in SECTIONS.items():
        rows += markdown_rows(cls, key)
    return "\n".join(rows)


# The spec's sections: key -> the dataclass that declares its fields.
SECTIONS: dict[str, type[Any]] = {
    "input": InputSettings,
    "input.stac": StacSource,
    "grid": GridSettings,
    "model": ModelSettings,
    "compute": ComputeSettings,
    "quality": QualityFilter,
    "outputs": OutputSettings,
}


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
    name: str = declared(NAME)
    version: int = declared(VERSION)
    base: str = "."
    storage: Mapping[str, Any] = declared(STORAGE)
    gdal: Mapping[str, Any] = declared(GDAL)

    def __post_init__(self) -> None:
        check_fields(self)

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
        """A spec from plain data (a YAML document); errors name ``source`` and the field.

        Parameters
        ----------
        data
            The spec's sections as a mapping.
        source
            Where it was read from, for messages (a file's path).
        base
            The folder relative paths are resolved from.
        """
        try:
            return _read(data, base)
        except ConfigError as err:
            raise SpecError(f"{source}: {err}") from err


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


def _model_section(given: Any) -> Any:
    """The model section, with ``model.output`` (deprecated: a model's own option, which
    the spec does not know) moved into ``model.options``."""
    if not isinstance(given, Mapping) or "output" not in given:
        return given
    warnings.warn(
        "model.output is deprecated: write it as a model option, model.options.output.",
        DeprecationWarning,
        stacklevel=4,
    )
    rest = {k: v for k, v in given.items() if k != "output"}
    options = rest.get("options") or {}
    if not isinstance(options, Mapping):
        return given  # read_section says what is wrong with options
    if given["output"] is not None:
        rest["options"] = {"output": given["output"], **options}
    return rest


def _read(data: Any, base: str) -> RunSpec:
    """The spec's sections read with their declarations (:mod:`xclay.settings`), and the
    rules that span fields."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"must be a mapping of sections, got {type(data).__name__}.")
    sections = {"input", "grid", "model", "compute", "quality", "outputs"}
    top = {name for name, _, _ in settings_of(RunSpec)}
    unknown = sorted(set(data) - sections - top)
    if unknown:
        allowed = ", ".join(sorted(sections | top))
        raise ConfigError(f"{unknown[0]}: unknown setting; allowed: {allowed}.")
    for name in ("input", "outputs"):
        if data.get(name) is None:
            raise ConfigError(f"{name}: required setting is missing.")
    given = data["input"]
    if isinstance(given, Mapping) and given.get("datacube") is not None:
        defaults = {n: s.default for n, _, s in settings_of(InputSettings)}
        extra = sorted(
            k for k, v in given.items() if k != "datacube" and v not in (None, defaults.get(k))
        )
        if extra:
            raise ConfigError(
                f"input.{extra[0]}: describes STAC ingestion; an input datacube already has "
                "its bands and times."
            )
    stac = None
    if isinstance(given, Mapping) and given.get("stac") is not None:
        stac = read_section(StacSource, given["stac"], "input.stac")
    rest = {k: v for k, v in given.items() if k != "stac"} if isinstance(given, Mapping) else given
    inputs = read_section(InputSettings, rest, "input", stac=stac)
    grid = read_section(GridSettings, data.get("grid"), "grid")
    if inputs.stac is not None and grid.resolution is None:
        raise ConfigError(
            "grid.resolution: required to ingest from STAC (pixel size, e.g. 10 for 10 m)."
        )
    spec: RunSpec = read_section(
        RunSpec,
        {k: data[k] for k in top if k in data},
        "",
        input=inputs,
        grid=grid,
        outputs=read_section(OutputSettings, data["outputs"], "outputs", required=["dir"]),
        model=read_section(ModelSettings, _model_section(data.get("model")), "model"),
        compute=read_section(ComputeSettings, data.get("compute"), "compute"),
        quality=read_section(QualityFilter, data.get("quality"), "quality"),
        base=base,
    )
    return spec
