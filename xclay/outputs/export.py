"""Embeddings out: a georeferenced Zarr raster of vectors, and GeoParquet 1.1.

Both are written under a temporary name and renamed into place when
complete: a failure never leaves an output that looks finished.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, overload

import numpy as np
import xarray as xr
from affine import Affine

from xclay._json import jsonable
from xclay.batch.chips import window_corners
from xclay.datacube.geometry import to_lonlat
from xclay.errors import DatacubeError, MissingDependencyError
from xclay.outputs.embeddings import validate_embeddings
from xclay.outputs.quantize import (
    MISSING_INT8,
    QUANTIZATIONS,
    SCALE_VARIABLE,
    check_quantize,
    dequantize_embeddings,
    dequantize_int8,
    quantization_attrs,
    quantization_of,
    quantize_embeddings,
    quantize_int8,
    scale_attrs,
)
from xclay.protocols import ExportOption
from xclay.storage import StorageOptions, Where, location
from xclay.storage.atomic import store_output

__all__ = [
    "GEOPARQUET_VERSION",
    "PARQUET_MEDIA_TYPE",
    "EmbeddingsLayout",
    "GeoParquetExporter",
    "VariableSpec",
    "chip_footprints",
    "chip_grid_transform",
    "create_embeddings_store",
    "embeddings_table",
    "open_embeddings",
    "read_footer",
    "read_geoparquet",
    "to_geoparquet",
    "to_zarr",
    "write_embeddings_region",
]

log = logging.getLogger(__name__)

GEOPARQUET_VERSION = "1.1.0"
PARQUET_CONVENTION = "xclay-geoparquet/1"
PARQUET_MEDIA_TYPE = "application/vnd.apache.parquet"
# Per-chip fractions of quality classes (null: the cube had no quality classes).
QUALITY_COLUMNS = (
    "cloud_fraction",
    "cloud_shadow_fraction",
    "haze_fraction",
    "snow_fraction",
    "clear_fraction",
)
_ROW_GROUP_BYTES = 128 << 20
SCALE_COLUMN = "embedding_scale"
# A run's GeoParquet folder: its metadata (written first) and its completion mark (last).
RUN_METADATA = "_xclay_run.json"
RUN_COMPLETE = "_xclay_complete.json"


# --------------------------------------------------------------------------- Zarr


@overload
def to_zarr(
    emb: xr.Dataset,
    path: os.PathLike[str],
    *,
    quantize: str | None = ...,
    overwrite: bool = ...,
    storage_options: StorageOptions | None = ...,
) -> Path: ...
@overload
def to_zarr(
    emb: xr.Dataset,
    path: Where,
    *,
    quantize: str | None = ...,
    overwrite: bool = ...,
    storage_options: StorageOptions | None = ...,
) -> Path | str: ...
def to_zarr(
    emb: xr.Dataset,
    path: Where,
    *,
    quantize: str | None = None,
    overwrite: bool = False,
    storage_options: StorageOptions | None = None,
) -> Path | str:
    """Write an embeddings Dataset as Zarr v3 (a raster of vectors any GIS can place).

    Chunks hold 32 x 32 chips with all features, so reading a region or a
    single chip's vector touches few files.

    Parameters
    ----------
    emb
        An embeddings Dataset (:func:`xclay.embed`, :func:`open_embeddings`).
    path
        The Zarr store to write: a folder (written under a temporary name beside it and
        renamed into place when complete) or a URL (``s3://``, ``gs://``, ``az://``:
        written in place, its consolidated metadata last, removed if writing fails).
    quantize
        ``None`` (default): float32 vectors. ``"int8"``: int8 vectors and a
        per-vector ``embedding_scale`` (:mod:`xclay.outputs.quantize`);
        :func:`open_embeddings` restores float32.
    overwrite
        Replace an existing store at ``path`` (locally only once the new one is
        complete); by default an existing ``path`` is an
        :class:`~xclay.errors.OutputExistsError`.
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).

    Returns
    -------
    pathlib.Path or str
        The store written: its path, or its URL.
    """
    validate_embeddings(emb)
    from xclay.completion import COMPLETE_ATTR, consolidate
    from xclay.datacube.store import GDAL_CRS_ATTR

    out = quantize_embeddings(emb, quantize) if quantize else emb.copy()
    out.attrs = jsonable({**out.attrs, COMPLETE_ATTR: True})
    out["chip_id"] = out["chip_id"].astype(object)
    wkt = out["spatial_ref"].attrs.get("crs_wkt") if "spatial_ref" in out.coords else None
    for var in out.data_vars.values():  # GDAL's CRS attribute, from the grid's own CRS
        var.attrs = {k: v for k, v in var.attrs.items() if k != GDAL_CRS_ATTR}
        if wkt and var.attrs.get("grid_mapping") == "spatial_ref":
            var.attrs[GDAL_CRS_ATTR] = {"wkt": wkt}
    n_y, n_x = out.sizes["chip_y"], out.sizes["chip_x"]
    per_chip = int(np.prod([out.sizes[d] for d in out["embedding"].dims[3:]]))
    side = 32 if per_chip <= 4096 else 2  # patch grids: a few chips per chunk (~16 MiB)
    cy, cx = min(n_y, side), min(n_x, side)
    vector_chunks = (1, cy, cx, *(out.sizes[d] for d in out["embedding"].dims[3:]))
    encoding: dict[str, dict[str, Any]] = {
        "embedding": {"chunks": vector_chunks},
        "nodata_fraction": {"chunks": (1, cy, cx)},
        "embedded": {"chunks": (1, cy, cx)},
        **({"loss": {"chunks": (1, cy, cx)}} if "loss" in out else {}),
        **({SCALE_VARIABLE: {"chunks": vector_chunks[:-1]}} if SCALE_VARIABLE in out else {}),
        **({"thumbnail": {"chunks": _thumbnail_chunks(out)}} if "thumbnail" in out else {}),
        **{name: {"chunks": (1, cy, cx)} for name in QUALITY_COLUMNS if name in out.data_vars},
    }
    for name in encoding:
        out[name].encoding = {}
    target = location(path, storage_options)
    with store_output(target, overwrite=overwrite) as tmp:
        out.to_zarr(
            tmp.zarr_store(), mode="w", zarr_format=3, consolidated=False, encoding=encoding
        )
        consolidate(tmp)
    log.info("wrote embeddings Zarr %s", target)
    return target.path if target.is_local else target.url


def _thumbnail_chunks(emb: xr.Dataset) -> tuple[int, ...]:
    """Chunks of about 16 MiB (32 x 32 chips of 64 px thumbnails), never more than 32 x 32 chips."""
    edge = emb.sizes["thumb_y"]
    side = int(max(1, min(32, np.sqrt((16 << 20) / max(1, edge * edge * 4)))))
    return (1, min(emb.sizes["chip_y"], side), min(emb.sizes["chip_x"], side), edge, edge, 4)


def open_embeddings(
    path: Where,
    *,
    dequantize: bool = True,
    allow_incomplete: bool = False,
    storage_options: StorageOptions | None = None,
) -> xr.Dataset:
    """Open an embeddings Zarr written by :func:`to_zarr` or a run (lazily).

    Parameters
    ----------
    path
        The embeddings Zarr store: the folder holding its ``zarr.json``, or its URL.
    dequantize
        ``True`` (default): quantised stores read as float32 vectors. ``False``:
        the stored int8 ``embedding`` and its ``embedding_scale``.
    allow_incomplete
        Open a run's store before every region is written (regions not written
        yet read as missing, ``embedded`` False). By default an incomplete store
        is a :class:`~xclay.errors.DatacubeError`.
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).

    Returns
    -------
    xarray.Dataset
        The embeddings, read from the store only when their values are used.
    """
    store = location(path, storage_options)
    if not (store / "zarr.json").is_file():
        raise FileNotFoundError(
            f"no embeddings Zarr at {store}: expected a store written by to_zarr."
        )
    from xclay.completion import is_complete, read_metadata
    from xclay.datacube.store import GDAL_CRS_ATTR

    read_metadata(store)
    if not allow_incomplete and not is_complete(store):
        raise DatacubeError(
            f"the embeddings at {store} are incomplete (a run is in progress or was interrupted); "
            "resume it with xclay run SPEC, or pass allow_incomplete=True to read what is there."
        )
    emb = xr.open_zarr(
        store.zarr_store(read_only=True), chunks=None, consolidated=False, zarr_format=3
    )
    if "embedding" not in emb.data_vars:
        what = "a datacube" if "pixels" in emb.data_vars else "a Zarr store without embeddings"
        raise DatacubeError(
            f"{store} is {what}, not an embeddings Zarr; give the embeddings store (xclay "
            "embed or a run writes it: <outputs.dir>/embeddings.zarr)."
        )
    validate_embeddings(emb)
    for var in emb.data_vars.values():
        var.attrs.pop(GDAL_CRS_ATTR, None)  # for GDAL; stale if the data is reprojected
    return dequantize_embeddings(emb) if dequantize else emb


def chip_grid_transform(emb: xr.Dataset) -> Affine:
    """The chip grid as a raster (GeoTIFFs, STAC's ``proj:transform``): cells of the grid's
    step from the first chip's corner, so a chip's cell is its window when chips do not
    overlap (with a stride, the step's square at its corner).

    Parameters
    ----------
    emb
        An embeddings Dataset, or a selection of it; its chips must be a contiguous
        block of the grid (every step along ``chip_y`` and ``chip_x``), else a
        :class:`~xclay.errors.DatacubeError`.

    Returns
    -------
    affine.Affine
        The transform from (column, row) cells of the chip grid to the datacube's CRS.
    """
    grid = emb.attrs["config"]["grid"]
    step = int(grid.get("stride") or grid["chip_size"])
    rows = np.asarray(emb["row_off"].values)
    cols = np.asarray(emb["col_off"].values)
    for name, offsets in (("chip_y", rows), ("chip_x", cols)):
        if len(offsets) > 1 and not (np.diff(offsets) == step).all():
            raise DatacubeError(
                f"the {name} chips are not every {step} px (a selection with a step?); a "
                "raster needs a regular chip grid: select a contiguous block."
            )
    cube = Affine.from_gdal(*emb.attrs["datacube"]["geotransform"])
    return cube @ Affine.translation(int(cols[0]), int(rows[0])) @ Affine.scale(step)


# --------------------------------------------------------------------------- regional stores


@dataclass(frozen=True)
class VariableSpec:
    """Dims, dtype and attributes of one data variable of an embeddings store.

    Parameters
    ----------
    dims
        Dimension names: the grid's (``time``, ``chip_y``, ``chip_x``, or ``chip_y``,
        ``chip_x`` for a per-chip coordinate), then those of ``chip_shape``.
    dtype
        NumPy dtype name (``"float32"``, ``"int8"``, ``"bool"``...), or ``"str"`` for
        strings (chip ids).
    attrs
        The variable's attributes; a data variable's also get a ``coordinates`` attribute
        naming the store's coordinates when the store is created.
    chip_shape
        Its shape per chip, after the grid's dims (the features; patch grids and
        thumbnails add theirs); default ``()``: one value per chip.
    fill_value
        What unwritten chunks read as; default None: by dtype, NaN for floats, False for
        bool, ``""`` for strings, else 0.
    coordinate
        A per-chip coordinate (``chip_id``, ``lat``, ``lon``), not data; default False.
    """

    dims: tuple[str, ...]
    dtype: str
    attrs: dict[str, Any]
    chip_shape: tuple[int, ...] = ()
    fill_value: Any = None  # what unwritten chunks read as (None: NaN, False, 0, "" by dtype)
    coordinate: bool = False  # a per-chip coordinate (chip_id, lat, lon), not data


@dataclass(frozen=True)
class EmbeddingsLayout:
    """An embeddings Dataset without its data, for :func:`create_embeddings_store` (so
    creating a store costs the grid's rows plus columns, not its chips).

    Parameters
    ----------
    coords
        A Dataset of the whole grid's 1-D coords (time, chip centres, pixel offsets,
        ``spatial_ref``) and the embeddings' attributes; no data variables.
    variables
        Name to :class:`VariableSpec` of each data variable and per-chip coordinate,
        which regions write as they go (:func:`write_embeddings_region`).
    """

    coords: xr.Dataset
    variables: dict[str, VariableSpec]

    def quantized(self, method: str) -> EmbeddingsLayout:
        """The layout of the same embeddings stored quantised (:mod:`xclay.outputs.quantize`)."""
        check_quantize(method)
        vector = self.variables["embedding"]
        variables = dict(self.variables)
        variables["embedding"] = VariableSpec(
            vector.dims,
            "int8",
            {**vector.attrs, "units": "1 (scaled)"},
            vector.chip_shape,
            MISSING_INT8,
        )
        variables[SCALE_VARIABLE] = VariableSpec(
            vector.dims[:-1], "float32", scale_attrs(vector.attrs), vector.chip_shape[:-1]
        )
        coords = self.coords.copy()
        coords.attrs = {**coords.attrs, "quantization": quantization_attrs()}
        return EmbeddingsLayout(coords, variables)


def create_embeddings_store(layout: EmbeddingsLayout, path: Where, *, region_chips: int) -> Where:
    """Create an embeddings Zarr whose chunks are ``region_chips x region_chips`` chips:
    1-D coords and attributes written, data variables and per-chip coordinates empty
    (NaN / False / ""), marked incomplete.

    Regions of that size are then written with :func:`write_embeddings_region`, in any
    order and by several processes at once (no two regions share a chunk).

    Parameters
    ----------
    layout
        The whole grid's coords and attributes, and the specs of the variables to
        create (:class:`EmbeddingsLayout`).
    path
        The Zarr store to create (a path or URL; written in place, with ``mode="w"``).
    region_chips
        Chunk edge in chips along ``chip_y`` and ``chip_x`` (at most the grid's
        size); every chunk holds one time step.

    Returns
    -------
    str, path-like or Location
        ``path``, the store created.
    """
    import zarr

    from xclay.completion import COMPLETE_ATTR

    coords = layout.coords.copy()
    coords.attrs = jsonable({**coords.attrs, COMPLETE_ATTR: False})
    store = location(path).zarr_store()
    coords.to_zarr(store, mode="w", zarr_format=3, consolidated=False)
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    sizes = dict(coords.sizes)
    per_chip = [name for name, spec in layout.variables.items() if spec.coordinate]
    names = " ".join(sorted([*(str(c) for c in coords.coords if c not in coords.dims), *per_chip]))
    edges = {"time": 1, "chip_y": region_chips, "chip_x": region_chips}
    for name, spec in layout.variables.items():
        grid_dims = spec.dims[: len(spec.dims) - len(spec.chip_shape)]
        shape = (*(sizes[d] for d in grid_dims), *spec.chip_shape)
        chunks = (*(min(sizes[d], edges[d]) for d in grid_dims), *spec.chip_shape)
        strings = spec.dtype == "str"
        dtype: Any = str if strings else np.dtype(spec.dtype)
        fill = spec.fill_value if spec.fill_value is not None else _default_fill(spec.dtype)
        attrs = dict(spec.attrs) if spec.coordinate else {**spec.attrs, "coordinates": names}
        group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunks,
            fill_value=fill,
            dimension_names=spec.dims,
            attributes=jsonable(attrs),
        )
    return path


def _default_fill(dtype_name: str) -> Any:
    if dtype_name == "str":
        return ""
    dtype = np.dtype(dtype_name)
    if dtype.kind == "b":
        return False
    return np.nan if dtype.kind == "f" else 0


def write_embeddings_region(path: Where, block: xr.Dataset, offsets: tuple[int, int, int]) -> None:
    """Write a block into the store at ``offsets``: its data variables, and its per-chip
    coordinates (chip ids, WGS84 centres). The arrays are written concurrently.

    Parameters
    ----------
    path
        The embeddings Zarr, as :func:`create_embeddings_store` created it.
    block
        The block's embeddings Dataset (from :meth:`EmbedSession.dataset`).
    offsets
        (time, chip row, chip column): the store's indices of the block's first chip.
    """
    import asyncio

    from zarr.api.asynchronous import open_array
    from zarr.core.sync import sync

    t0, r0, c0 = offsets
    starts = {"time": t0, "chip_y": r0, "chip_x": c0}
    writes: list[tuple[str, tuple[slice, ...], np.ndarray]] = []
    for name, var in block.variables.items():
        per_chip = var.dims == ("chip_y", "chip_x") and name in block.coords
        if not (name in block.data_vars or per_chip):
            continue  # the grid's 1-D coords were written when the store was created
        values = np.asarray(var.values)
        key = tuple(
            slice(starts[d], starts[d] + n) if d in starts else slice(None)
            for d, n in zip(var.dims, values.shape, strict=True)
        )
        writes.append((str(name), key, values))

    store = location(path).zarr_store()

    async def write_all() -> None:
        async def one(name: str, key: tuple[slice, ...], values: np.ndarray) -> None:
            array = await open_array(store=store, path=name, mode="r+", zarr_format=3)
            await array.setitem(key, values)

        await asyncio.gather(*(one(*w) for w in writes))

    sync(write_all())


# --------------------------------------------------------------------------- GeoParquet


@overload
def to_geoparquet(
    emb: xr.Dataset,
    path: os.PathLike[str],
    *,
    quantize: str | None = ...,
    overwrite: bool = ...,
    sources: Sequence[Sequence[str]] | None = ...,
    run_metadata: Mapping[str, Any] | None = ...,
    centre_in_zone: Sequence[bool] | None = ...,
    storage_options: StorageOptions | None = ...,
) -> Path: ...
@overload
def to_geoparquet(
    emb: xr.Dataset,
    path: Where,
    *,
    quantize: str | None = ...,
    overwrite: bool = ...,
    sources: Sequence[Sequence[str]] | None = ...,
    run_metadata: Mapping[str, Any] | None = ...,
    centre_in_zone: Sequence[bool] | None = ...,
    storage_options: StorageOptions | None = ...,
) -> Path | str: ...
def to_geoparquet(
    emb: xr.Dataset,
    path: Where,
    *,
    quantize: str | None = None,
    overwrite: bool = False,
    sources: Sequence[Sequence[str]] | None = None,
    run_metadata: Mapping[str, Any] | None = None,
    centre_in_zone: Sequence[bool] | None = None,
    storage_options: StorageOptions | None = None,
) -> Path | str:
    """Write one GeoParquet 1.1 row per embedded (time, chip).

    Columns: ``id`` (unique per row), ``chip_id`` (per window), ``time``,
    ``start_datetime``/``end_datetime`` (composites), ``embedding``
    (fixed-size list of float32; with ``quantize="int8"`` of int8, and an
    ``embedding_scale`` column: :func:`read_geoparquet` restores float32),
    ``geometry`` (WKB polygon, EPSG:4326, longitude first), ``bbox`` (covering
    struct), ``centre_lat``, ``centre_lon``, ``native_crs``, ``native_footprint``
    (WKB in the datacube CRS), ``row_off``/``col_off``/``chip_size`` (pixel window),
    ``nodata_fraction``, ``cloud_fraction``, ``cloud_shadow_fraction``,
    ``haze_fraction``, ``snow_fraction``, ``clear_fraction``, ``loss`` (when the
    embeddings have it), ``thumbnail`` (PNG bytes, when the embeddings have
    thumbnails), ``platform``, ``source_ids``, ``centre_in_zone``.
    Chips that were not embedded are not written; their count is in the
    footer's ``run``. The footer holds ``geo`` and ``xclay`` (model card, config,
    datacube, run).

    Parameters
    ----------
    emb
        An embeddings Dataset (:func:`xclay.embed`, :func:`open_embeddings`);
        float32 or quantised.
    path
        The Parquet file to write: a path (written under a temporary name beside it and
        renamed into place when complete) or a URL (uploaded in one PUT once written).
    quantize
        ``None`` (default): float32 vectors. ``"int8"``: int8 vectors and an
        ``embedding_scale`` column (:mod:`xclay.outputs.quantize`).
    overwrite
        Replace an existing file at ``path`` (only once the new one is complete);
        by default an existing ``path`` is an :class:`~xclay.errors.OutputExistsError`.
    sources
        Per row (in row order, one per embedded chip), the ids of the STAC items
        behind the chip; default: the datacube's own provenance, for every row.
    run_metadata
        Written into the ``xclay`` footer in place of the model card, config,
        datacube and run: a run's parts pass a reference to the run's metadata
        file (read back by :func:`read_footer`), so no part repeats it.
    centre_in_zone
        Per row, whether the chip's centre lies in the zone whose grid it is on (a run
        over UTM zones: :meth:`xclay.run.zones.Zone.owns`); default True for every row
        (one grid owns all its chips).
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).

    Returns
    -------
    pathlib.Path or str
        The file written: its path, or its URL.
    """
    table = embeddings_table(
        emb,
        quantize=quantize,
        sources=sources,
        run_metadata=run_metadata,
        centre_in_zone=centre_in_zone,
    )
    dim = emb.sizes["feature"]
    rows_per_group = max(1, _ROW_GROUP_BYTES // ((1 if quantize else 4) * dim + 512))
    target = location(path, storage_options)
    with target.staged(overwrite=overwrite) as tmp:
        write_table(table, tmp, row_group_size=rows_per_group)
    log.info("wrote GeoParquet %s (%d rows)", target, table.num_rows)
    return target.path if target.is_local else target.url


def write_table(table: Any, path: str | os.PathLike[str], **options: Any) -> None:
    """Write a table whose schema carries ``geo`` and ``xclay`` metadata: ``geo`` stays in
    the Arrow schema (GeoParquet readers look there), ``xclay`` goes to the file's
    key-value metadata only, so it is not stored a second time inside the serialised
    Arrow schema."""
    import pyarrow.parquet as pq

    meta = dict(table.schema.metadata or {})
    extra = meta.pop(b"xclay", None)
    table = table.replace_schema_metadata(meta)
    with pq.ParquetWriter(path, table.schema, compression="zstd") as writer:
        writer.write_table(table, **options)
        if extra is not None:
            writer.add_key_value_metadata({b"xclay": extra})


def read_footer(path: Where) -> dict[str, Any]:
    """The ``xclay`` metadata of a GeoParquet file (model card, config, datacube, run).

    For a part of a run the run's metadata is read from the file the part
    names (checked against its sha256) and merged in; ``part`` says which
    region the file holds.

    Parameters
    ----------
    path
        A GeoParquet file written by xclay: a whole file, or one part of a run's
        folder (the run's metadata file is looked for beside it).
    """
    import hashlib

    import pyarrow.parquet as pq

    file = location(path)
    fs, where = file.arrow()
    raw = (pq.read_metadata(where, filesystem=fs).metadata or {}).get(b"xclay")
    if raw is None:
        raise DatacubeError(f"{file} has no xclay metadata; it was not written by xclay.")
    meta: dict[str, Any] = json.loads(raw)
    ref = meta.get("run_metadata")
    if ref:
        shared = file.parent / ref["file"]
        data = shared.read_bytes()
        if hashlib.sha256(data).hexdigest() != ref["sha256"]:
            raise DatacubeError(
                f"{shared} is not the run metadata {file.name} was written with (its sha256 "
                "differs); the run folder was changed after the run."
            )
        meta = {**json.loads(data), **meta}
    return meta


def embeddings_table(
    emb: xr.Dataset,
    *,
    quantize: str | None = None,
    sources: Sequence[Sequence[str]] | None = None,
    run_metadata: Mapping[str, Any] | None = None,
    centre_in_zone: Sequence[bool] | None = None,
) -> Any:
    """The rows :func:`to_geoparquet` writes, as a ``pyarrow.Table`` with its footer
    metadata (``geo``, ``xclay``) in the schema.

    Parameters
    ----------
    emb
        An embeddings Dataset (float32 or quantised); one row per embedded
        (time, chip).
    quantize
        ``None`` (default): float32 vectors. ``"int8"``: int8 vectors and an
        ``embedding_scale`` column.
    sources
        Per row (in row order, one per embedded chip), the ids of the STAC items
        behind the chip; default: the datacube's own provenance, for every row.
    run_metadata
        Put into the ``xclay`` metadata in place of the model card, config,
        datacube and run (a run's parts: a reference to the run's metadata file).
    centre_in_zone
        Per row, whether the chip's centre lies in its own zone; default True for all.
    """
    import pyarrow as pa
    import shapely
    from pyproj import CRS as ProjCRS

    validate_embeddings(emb)
    check_quantize(quantize)
    cube = emb.attrs["datacube"]
    size = int(emb.attrs["config"]["grid"]["chip_size"])
    native_crs = ProjCRS.from_wkt(cube["crs_wkt"])

    embedded = np.asarray(emb["embedded"].values, dtype=bool)
    t_idx, i_idx, j_idx = np.nonzero(embedded)
    n = t_idx.size
    dim = emb.sizes["feature"]
    vectors = np.asarray(emb["embedding"].values)[t_idx, i_idx, j_idx]
    if quantization_of(emb):  # stored int8: back to float32 first
        vectors = dequantize_int8(
            vectors, np.asarray(emb[SCALE_VARIABLE].values)[t_idx, i_idx, j_idx]
        )
    vectors = vectors.astype(np.float32, copy=False)
    if vectors.ndim == 4:  # patch grids: one vector per chip, the mean of its patch tokens
        vectors = vectors.mean(axis=(1, 2))
    vector_columns = _vector_columns(vectors, dim, quantize)

    row_off = np.asarray(emb["row_off"].values, dtype=np.int64)
    col_off = np.asarray(emb["col_off"].values, dtype=np.int64)
    native, geoms = chip_footprints(emb, i_idx, j_idx)
    bounds = shapely.bounds(geoms) if n else np.empty((0, 4))

    times = np.asarray(emb["time"].values, dtype="datetime64[ns]")
    chip_ids = np.asarray(emb["chip_id"].values, dtype=object)[i_idx, j_idx].astype(str)
    row_time = times[t_idx]
    ids = row_ids(chip_ids, row_time)
    if sources is None:
        source_lists: Any = [_source_ids(cube.get("provenance", {}))] * n
    else:
        source_lists = [list(row) for row in sources]
        if len(source_lists) != n:
            raise DatacubeError(f"sources has {len(source_lists)} rows for {n} embedded chips.")
    own = np.ones(n, dtype=bool) if centre_in_zone is None else np.asarray(centre_in_zone, bool)
    if own.shape != (n,):
        raise DatacubeError(f"centre_in_zone has {own.size} rows for {n} embedded chips.")
    epsg = native_crs.to_epsg()

    columns: dict[str, pa.Array] = {
        "id": pa.array(ids, type=pa.string()),
        "chip_id": pa.array(chip_ids.tolist(), type=pa.string()),
        "time": _timestamps(row_time),
        "start_datetime": _timestamps(_coord_or_nat(emb, "time_start")[t_idx]),
        "end_datetime": _timestamps(_coord_or_nat(emb, "time_end")[t_idx]),
        **vector_columns,
        "geometry": pa.array(shapely.to_wkb(geoms).tolist() if n else [], type=pa.binary()),
        "bbox": pa.StructArray.from_arrays(
            [pa.array(bounds[:, k], type=pa.float64()) for k in range(4)],
            names=["xmin", "ymin", "xmax", "ymax"],
        ),
        "centre_lat": pa.array(np.asarray(emb["lat"].values)[i_idx, j_idx], type=pa.float64()),
        "centre_lon": pa.array(np.asarray(emb["lon"].values)[i_idx, j_idx], type=pa.float64()),
        "native_crs": pa.array(
            [f"EPSG:{epsg}" if epsg else native_crs.to_wkt()] * n, type=pa.string()
        ),
        "native_footprint": pa.array(
            shapely.to_wkb(shapely.polygons(native)).tolist() if n else [], type=pa.binary()
        ),
        "row_off": pa.array(row_off[i_idx], type=pa.int64()),
        "col_off": pa.array(col_off[j_idx], type=pa.int64()),
        "chip_size": pa.array(np.full(n, size), type=pa.int32()),
        "nodata_fraction": pa.array(
            np.asarray(emb["nodata_fraction"].values, dtype=np.float32)[t_idx, i_idx, j_idx],
            type=pa.float32(),
        ),
        **{
            name: _floats_or_null(
                np.asarray(emb[name].values, dtype=np.float32)[t_idx, i_idx, j_idx]
            )
            for name in QUALITY_COLUMNS
            if name in emb.data_vars
        },
        **(
            {
                "loss": _floats_or_null(
                    np.asarray(emb["loss"].values, np.float32)[t_idx, i_idx, j_idx]
                )
            }
            if "loss" in emb.data_vars
            else {}
        ),
        **(
            {"thumbnail": _png_column(np.asarray(emb["thumbnail"].values)[t_idx, i_idx, j_idx])}
            if "thumbnail" in emb.data_vars
            else {}
        ),
        "platform": pa.array([cube.get("platform", "")] * n, type=pa.string()),
        "source_ids": pa.array(source_lists, type=pa.list_(pa.string())),
        "centre_in_zone": pa.array(own, type=pa.bool_()),
    }
    table = pa.table(columns)
    geo = {
        "version": GEOPARQUET_VERSION,
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": sorted({str(g.geom_type) for g in geoms}) if n else ["Polygon"],
                "crs": ProjCRS.from_epsg(4326).to_json_dict(),
                "bbox": _overall_bbox(bounds),
                "covering": {
                    "bbox": {
                        "xmin": ["bbox", "xmin"],
                        "ymin": ["bbox", "ymin"],
                        "xmax": ["bbox", "xmax"],
                        "ymax": ["bbox", "ymax"],
                    }
                },
            }
        },
    }
    embedding_meta = {
        "dim": int(dim),
        "dtype": "int8" if quantize else "float32",
        "quantization": {**quantization_attrs(), "scale": SCALE_COLUMN} if quantize else None,
        "output": (emb.attrs.get("model") or {}).get("output"),
        "per_chip": "mean of patch tokens" if "patch_y" in emb["embedding"].dims else "as stored",
    }
    if run_metadata is not None:
        xclay_meta: dict[str, Any] = {
            "convention": PARQUET_CONVENTION,
            "xclay_version": emb.attrs.get("xclay_version"),
            **run_metadata,
            "embedding": embedding_meta,
        }
    else:
        xclay_meta = {
            "convention": PARQUET_CONVENTION,
            "xclay_version": emb.attrs.get("xclay_version"),
            "model": emb.attrs.get("model"),
            "config": emb.attrs.get("config"),
            "datacube": cube,
            "embedding": embedding_meta,
            "run": emb.attrs.get("run"),
            "run_spec": emb.attrs.get("run_spec"),
            "run_plan": emb.attrs.get("run_plan"),
        }
    table = table.replace_schema_metadata(
        {
            b"geo": json.dumps(geo).encode(),
            b"xclay": json.dumps(jsonable(xclay_meta)).encode(),
        }
    )
    return table


def chip_footprints(emb: xr.Dataset, rows: np.ndarray, cols: np.ndarray) -> tuple[Any, Any]:
    """Footprints of chips ``(rows[k], cols[k])`` of ``emb``: native rings ``[n, 5, 2]``
    in the datacube CRS, and WGS84 polygons (split at the antimeridian where they cross it).

    Parameters
    ----------
    emb
        An embeddings Dataset, or a selection of it: its ``row_off`` and ``col_off``
        place the chips' windows on the datacube.
    rows, cols
        ``[n]`` integer positions of the chips along ``emb``'s ``chip_y`` and ``chip_x``
        (indices into the Dataset, which are the grid's chip rows and columns only when
        ``emb`` is the whole grid).

    Returns
    -------
    native : numpy.ndarray
        ``[n, 5, 2]`` float64 closed rings of (x, y) in the datacube CRS: top-left,
        bottom-left, bottom-right, top-right, top-left.
    lonlat : numpy.ndarray
        ``[n]`` shapely Polygons in WGS84, longitude first; MultiPolygons where a
        footprint crosses the antimeridian.
    """
    cube = emb.attrs["datacube"]
    size = int(emb.attrs["config"]["grid"]["chip_size"])
    transform = Affine.from_gdal(*cube["geotransform"])
    row_off = np.asarray(emb["row_off"].values, dtype=np.int64)[rows]
    col_off = np.asarray(emb["col_off"].values, dtype=np.int64)[cols]
    native = window_corners(transform, row_off, col_off, size)
    lon, lat = to_lonlat(cube["crs_wkt"], native[..., 0], native[..., 1])
    return native, _lonlat_polygons(np.stack([lon, lat], axis=-1))


def _vector_columns(vectors: np.ndarray, dim: int, quantize: str | None) -> dict[str, Any]:
    import pyarrow as pa

    if not quantize:
        flat = pa.array(vectors.reshape(-1), type=pa.float32())
        return {"embedding": pa.FixedSizeListArray.from_arrays(flat, dim)}
    q, scale = quantize_int8(vectors)
    return {
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(q.reshape(-1), type=pa.int8()), dim
        ),
        SCALE_COLUMN: pa.array(scale, type=pa.float32()),
    }


def _png_column(thumbnails: np.ndarray) -> Any:
    import pyarrow as pa

    from xclay.outputs.thumbnails import encode_png

    return pa.array([encode_png(t) for t in thumbnails], type=pa.binary())


def read_geoparquet(
    path: Where,
    *,
    columns: list[str] | None = None,
    filters: Any = None,
    dequantize: bool = True,
    geodataframe: bool = False,
    partial: bool = False,
    storage_options: StorageOptions | None = None,
) -> Any:
    """Read xclay GeoParquet (a file, or a run's folder of parts) as a ``pyarrow.Table``.

    A run's folder (with ``_xclay_run.json``) is refused until the run is complete (its
    ``_xclay_complete.json``), as :func:`open_embeddings` refuses an unfinished store.

    Parameters
    ----------
    path
        A GeoParquet file, or a folder of them (a run's parts): a path or a URL.
    columns
        The columns to read, as :func:`pyarrow.parquet.read_table` takes them;
        default all.
    filters
        Row filters, as :func:`pyarrow.parquet.read_table` takes them
        (e.g. ``[("cloud_fraction", "<", 0.1)]``); default none.
    dequantize
        ``True`` (default): quantised vectors come back as float32. ``False``: the
        stored int8 ``embedding`` and its ``embedding_scale``.
    geodataframe
        Return a ``geopandas.GeoDataFrame`` (needs geopandas) instead of a
        ``pyarrow.Table``.
    partial
        Read the parts of a run that is not complete, as far as they are written.
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).

    Returns
    -------
    pyarrow.Table or geopandas.GeoDataFrame
        The rows; with ``geodataframe=True`` and no ``geometry`` column read, a
        ``pandas.DataFrame``.
    """
    import pyarrow.parquet as pq

    source = location(path, storage_options)
    if not source.exists():
        raise FileNotFoundError(f"no GeoParquet at {source}.")
    fs, where = source.arrow()
    running = (source / RUN_METADATA).is_file()
    if running and not partial and not (source / RUN_COMPLETE).is_file():
        raise DatacubeError(
            f"the GeoParquet parts in {source} are of a run that is not complete (in progress "
            "or interrupted: no _xclay_complete.json); resume it (xclay run SPEC), or pass "
            "partial=True to read the parts written so far."
        )
    wanted = columns
    if (
        columns is not None
        and "embedding" in columns
        and SCALE_COLUMN not in columns
        and SCALE_COLUMN in pq.ParquetDataset(where, filesystem=fs).schema.names
    ):
        wanted = [*columns, SCALE_COLUMN]  # needed to dequantise; dropped again below
    table = pq.read_table(where, columns=wanted, filters=filters, filesystem=fs)
    names = table.column_names
    if dequantize and "embedding" in names and SCALE_COLUMN in names:
        table = dequantize_table(table)
    if not geodataframe:
        return table
    try:
        import geopandas as gpd
    except ImportError as err:
        raise MissingDependencyError(
            "geodataframe=True needs geopandas: pip install geopandas"
        ) from err
    frame = table.to_pandas()
    if "geometry" not in frame:
        return frame
    geometry = gpd.GeoSeries.from_wkb(frame.pop("geometry"), crs="EPSG:4326")
    return gpd.GeoDataFrame(frame, geometry=geometry)


def dequantize_table(table: Any) -> Any:
    """A GeoParquet ``pyarrow.Table`` with int8 ``embedding`` and ``embedding_scale``
    -> the same rows with float32 vectors."""
    import pyarrow as pa
    import pyarrow.compute as pc

    names = table.column_names
    vectors = table["embedding"].combine_chunks()
    dim = vectors.type.list_size
    q = np.asarray(pc.list_flatten(vectors)).reshape(-1, dim)
    restored = dequantize_int8(q, np.asarray(table[SCALE_COLUMN]))
    floats = pa.FixedSizeListArray.from_arrays(
        pa.array(restored.reshape(-1), type=pa.float32()), dim
    )
    table = table.set_column(names.index("embedding"), "embedding", floats)
    return table.drop_columns([SCALE_COLUMN])


class GeoParquetExporter:
    """``xclay export --format geoparquet``: :func:`to_geoparquet` as an
    :class:`~xclay.protocols.Exporter`; a run writes it region by region (its parts)."""

    name = "geoparquet"
    suffix = ".parquet"
    media_type = PARQUET_MEDIA_TYPE
    summary = "GeoParquet 1.1, one row per chip (the default)"
    options: Mapping[str, ExportOption] = MappingProxyType(
        {
            "quantize": ExportOption(
                None,
                "geoparquet: int8 vectors with a scale per vector (default: float32)",
                QUANTIZATIONS,
            )
        }
    )
    by_region = True

    def write(
        self, emb: xr.Dataset | Path | str, out: Path | str, *, overwrite: bool, **options: Any
    ) -> list[Path | str]:
        ds = emb if isinstance(emb, xr.Dataset) else open_embeddings(emb)
        return [to_geoparquet(ds, out, overwrite=overwrite, **options)]

    def asset(self, path: Path | str) -> dict[str, Any]:
        what = "a folder of parts" if location(path).is_dir() else "one file"
        return {"type": PARQUET_MEDIA_TYPE, "title": f"GeoParquet 1.1 ({what})", "roles": ["data"]}


def _lonlat_polygons(rings: np.ndarray) -> np.ndarray:
    """Polygons from lon/lat rings; a ring crossing the antimeridian becomes a
    MultiPolygon split at +/-180 (so no footprint wraps around the globe)."""
    import shapely
    import shapely.affinity

    geoms = shapely.polygons(rings)
    if rings.shape[0] == 0:
        result: np.ndarray = geoms
        return result
    span = rings[..., 0].max(axis=-1) - rings[..., 0].min(axis=-1)
    for k in np.nonzero(span > 180.0)[0]:
        ring = rings[k].copy()
        ring[ring[:, 0] < 0, 0] += 360.0
        poly = shapely.Polygon(ring)
        east = shapely.intersection(poly, shapely.box(0.0, -90.0, 180.0, 90.0))
        west = shapely.affinity.translate(
            shapely.intersection(poly, shapely.box(180.0, -90.0, 360.0, 90.0)), xoff=-360.0
        )
        geoms[k] = shapely.MultiPolygon([east, west])
    result = geoms
    return result


def _overall_bbox(bounds: np.ndarray) -> list[float]:
    if bounds.shape[0] == 0:
        return []
    return [
        float(bounds[:, 0].min()),
        float(bounds[:, 1].min()),
        float(bounds[:, 2].max()),
        float(bounds[:, 3].max()),
    ]


def _timestamps(values: np.ndarray) -> Any:
    import pyarrow as pa

    values = np.asarray(values, dtype="datetime64[us]")
    return pa.array(values, type=pa.timestamp("us", tz="UTC"), mask=np.isnat(values))


def _coord_or_nat(emb: xr.Dataset, name: str) -> np.ndarray:
    if name in emb.coords:
        return np.asarray(emb[name].values, dtype="datetime64[ns]")
    return np.full(emb.sizes["time"], np.datetime64("NaT"), dtype="datetime64[ns]")


def _floats_or_null(values: np.ndarray) -> Any:
    import pyarrow as pa

    return pa.array(values, type=pa.float32(), mask=~np.isfinite(values))


def row_ids(chip_ids: Any, times: np.ndarray) -> list[str]:
    """Unique row ids: ``{chip_id}_{time as YYYYMMDDTHHMMSS}`` (``notime`` when unknown)."""
    return [f"{c}_{_time_tag(t)}" for c, t in zip(chip_ids, times, strict=True)]


def _time_tag(t: np.datetime64) -> str:
    if np.isnat(t):
        return "notime"
    return np.datetime_as_string(t, unit="s").replace("-", "").replace(":", "")


def _source_ids(provenance: Mapping[str, Any]) -> list[str]:
    out = []
    for src in provenance.get("sources", []):
        if isinstance(src, Mapping):
            out.append(str(src.get("id") or src.get("href") or ""))
        else:
            out.append(str(src))
    if not out and provenance.get("generator"):
        out.append(str(provenance["generator"]))
    return out
