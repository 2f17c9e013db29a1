"""Writing datacubes as Zarr v3 stores: whole cubes, empty stores created from
grid arithmetic and filled block by block, chunk checksums, compression."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import xarray as xr

from xclay._json import jsonable
from xclay._progress import progress_bar
from xclay._version import __version__
from xclay.completion import COMPLETE_ATTR, mark_complete
from xclay.datacube.geometry import datacube_geobox
from xclay.datacube.validate import DATACUBE_DIMS, nodata_value, validate_datacube
from xclay.errors import ChunkingError, DatacubeError
from xclay.storage import Location, StorageOptions, Where, location
from xclay.storage.atomic import store_output

log = logging.getLogger("xclay.datacube")

Compression = Literal["zstd", "lz4", "none"]


@overload
def write_datacube(
    cube: xr.Dataset,
    path: os.PathLike[str],
    *,
    chip_size: int = ...,
    shard_chips: int | None = ...,
    compression: Compression = ...,
    overwrite: bool = ...,
    require_data: bool = ...,
    progress: bool | None = ...,
    storage_options: StorageOptions | None = ...,
) -> Path: ...
@overload
def write_datacube(
    cube: xr.Dataset,
    path: Where,
    *,
    chip_size: int = ...,
    shard_chips: int | None = ...,
    compression: Compression = ...,
    overwrite: bool = ...,
    require_data: bool = ...,
    progress: bool | None = ...,
    storage_options: StorageOptions | None = ...,
) -> Path | str: ...
def write_datacube(
    cube: xr.Dataset,
    path: Where,
    *,
    chip_size: int = 256,
    shard_chips: int | None = None,
    compression: Compression = "zstd",
    overwrite: bool = False,
    require_data: bool = False,
    progress: bool | None = False,
    storage_options: StorageOptions | None = None,
) -> Path | str:
    """Write a datacube as Zarr v3 with chunks aligned to the chip grid.

    Parameters
    ----------
    cube
        A datacube (see :func:`as_datacube`); numpy, dask or lazily opened.
    path
        Output store (``.zarr``): a path, or a URL (``s3://``, ``gs://``, ``az://``). A
        local store is written under a temporary name and renamed into place when
        complete; one on object storage is written in place and marked complete last.
        Either way a failure never leaves a store that looks whole (one without its mark
        is refused as incomplete).
    chip_size
        Chip edge in pixels; ``pixels`` is chunked ``(1, n_bands, chip_size, chip_size)``.
    shard_chips
        Group ``shard_chips x shard_chips`` chunks into one shard file
        (Zarr v3 sharding). ``None``: one file per chunk.
    compression
        ``"zstd"`` (default, level 3), ``"lz4"`` or ``"none"`` (fastest to
        read, largest on disk).
    overwrite
        Replace an existing store at ``path``.
    require_data
        Refuse (and write nothing) when no pixel of the cube is valid.
    progress
        Show a progress bar over the blocks (``None``: on an interactive terminal).
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).

    Returns
    -------
    pathlib.Path or str
        The written store: its path, or its URL.

    Memory stays bounded by one shard (or chunk) row block, whatever the cube's size.
    """

    validate_datacube(cube)
    if chip_size < 1:
        raise ChunkingError(f"chip_size must be a positive number of pixels, got {chip_size}.")
    if shard_chips is not None and shard_chips < 1:
        raise ChunkingError(f"shard_chips must be >= 1, got {shard_chips}.")
    pixels = cube["pixels"]
    nt, nb, ny, nx = pixels.shape
    block = chip_size * (shard_chips or 1)

    target = location(path, storage_options)
    with store_output(target, overwrite=overwrite) as tmp:
        create_datacube_store(
            cube, tmp, chip_size=chip_size, shard_chips=shard_chips, compression=compression
        )
        any_valid = False
        step = _write_step(pixels, block)
        blocks = [
            (t, y0, x0) for t in range(nt) for y0 in range(0, ny, step) for x0 in range(0, nx, step)
        ]
        with progress_bar(len(blocks), progress, desc="write datacube", unit="block") as bar:
            for t, y0, x0 in blocks:
                valid = write_datacube_block(
                    cube, tmp, t, (y0, min(ny, y0 + step)), (x0, min(nx, x0 + step))
                )
                any_valid = any_valid or valid
                bar.update(1)
        if require_data and not any_valid:
            raise DatacubeError(
                "the region has no valid pixel (every pixel is nodata, or masked as nodata); "
                "nothing was written. Check the area, the time range and the masks."
            )
        mark_complete(tmp)
    log.info("wrote datacube %s (%d x %d x %d x %d)", target, nt, nb, ny, nx)
    return target.path if target.is_local else target.url


def create_datacube_store(
    cube: xr.Dataset,
    path: Where,
    *,
    chip_size: int,
    shard_chips: int | None = None,
    compression: Compression = "zstd",
) -> Location:
    """Create a datacube store with its coords and attributes and empty (nodata) arrays,
    chunked for ``chip_size``; marked incomplete until :func:`mark_complete`.

    Blocks are then written with :func:`write_datacube_block`, in any order and
    by several processes at once when each writes whole shards (or chunks).

    Parameters
    ----------
    cube
        The datacube, or a template of it on the whole grid: the store takes its
        ``pixels`` (and ``quality``) shape, dtype, nodata and attributes, its coords,
        CRS and attributes, but not its pixel or quality values.
    path
        The store (a path or URL); anything already there is replaced.
    chip_size
        Chip edge in pixels; ``pixels`` is chunked ``(1, n_bands, chip_size, chip_size)``
        and ``quality`` ``(1, chip_size, chip_size)``.
    shard_chips
        Group ``shard_chips x shard_chips`` chunks into one shard file (Zarr v3
        sharding). ``None``: one file per chunk.
    compression
        ``"zstd"`` (default, level 3), ``"lz4"`` (Blosc) or ``"none"``; every chunk also
        carries a crc32c checksum.

    Returns
    -------
    Location
        The created store.
    """
    import zarr

    target = location(path)
    store = target.zarr_store()
    pixels = cube["pixels"]
    nb = pixels.shape[1]
    block = chip_size * (shard_chips or 1)
    has_quality = "quality" in cube.data_vars
    meta = cube.drop_vars(["pixels", "quality"] if has_quality else ["pixels"])
    meta.attrs = {**cube.attrs, "xclay_version": __version__, COMPLETE_ATTR: False}
    meta.to_zarr(store, mode="w", zarr_format=3, consolidated=False)
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    coordinates = " ".join(sorted(str(c) for c in cube.coords if c not in DATACUBE_DIMS))
    crs = datacube_geobox(cube).crs
    fill = nodata_value(pixels)
    group.create_array(
        "pixels",
        shape=pixels.shape,
        dtype=pixels.dtype,
        chunks=(1, nb, chip_size, chip_size),
        shards=(1, nb, block, block) if shard_chips else None,
        compressors=_compressors(compression),
        fill_value=fill if fill is not None else 0,
        dimension_names=DATACUBE_DIMS,
        attributes={
            **_variable_attrs(pixels, coordinates, crs),
            INTEGRITY_ATTR: dict(INTEGRITY),
        },
        config={"write_empty_chunks": True},
    )
    if has_quality:
        from xclay.masks import PixelClass

        group.create_array(
            "quality",
            shape=cube["quality"].shape,
            dtype=np.uint8,
            chunks=(1, chip_size, chip_size),
            shards=(1, block, block) if shard_chips else None,
            compressors=_compressors(compression),
            fill_value=int(PixelClass.NODATA),
            dimension_names=("time", "y", "x"),
            attributes={
                **_variable_attrs(cube["quality"], coordinates, crs),
                INTEGRITY_ATTR: dict(INTEGRITY),
            },
            config={"write_empty_chunks": True},
        )
    return target


def write_datacube_block(
    cube: xr.Dataset,
    path: Where,
    t: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    at: tuple[int, int, int] | None = None,
) -> bool:
    """Compute one block (all bands) of ``cube`` and write it into the store at ``path``.

    Parameters
    ----------
    cube
        The datacube the block is computed from (numpy, dask or lazily opened), with
        ``pixels`` and, where the store has one, ``quality``.
    path
        A store made by :func:`create_datacube_store` for the whole grid (path or URL).
    t
        The block's time step: an index into ``cube``'s ``time``.
    rows, cols
        Half-open ``(first, stop)`` ranges of pixel rows (``y``) and pixel columns
        (``x``) of ``cube``.
    at
        Where the block goes in the store, as ``(time step, first row, first column)``,
        when ``cube`` is itself only a part of the store's grid; default: the same place
        as in ``cube``.

    Returns
    -------
    bool
        Whether the block has a valid pixel (data in every band, finite, and quality
        class not nodata).
    """
    (y0, y1), (x0, x1) = rows, cols
    st, sy, sx = at if at is not None else (t, y0, x0)
    h, w = y1 - y0, x1 - x0
    pixels = cube["pixels"]
    parts = [pixels.variable[t, :, y0:y1, x0:x1]]
    if "quality" in cube.data_vars:
        parts.append(cube["quality"].variable[t, y0:y1, x0:x1])
    values, *rest = _compute_together(parts)
    quality = rest[0] if rest else None
    _array(path, "pixels")[st, :, sy : sy + h, sx : sx + w] = values
    if quality is not None:
        _array(path, "quality")[st, sy : sy + h, sx : sx + w] = quality
    return _any_valid(values, nodata_value(pixels), quality)


def _compute_together(parts: list[xr.Variable]) -> list[np.ndarray]:
    """The values of lazy variables in one computation: a composite's pixels and its
    quality share their reads, decodes and masks (computed apart, every source image of a
    block was read and decoded twice)."""
    # xarray loads a Dataset's dask variables in one dask.compute call
    loaded = xr.Dataset({f"part{k}": part for k, part in enumerate(parts)}).load()
    return [np.asarray(loaded[f"part{k}"].values) for k in range(len(parts))]


def _array(path: Where, name: str) -> Any:
    """An array of a datacube store, opened to write every chunk (zarr leaves out chunks
    equal to the fill value by default, which would make them indistinguishable from
    lost ones)."""
    import zarr

    array = zarr.open_array(location(path).zarr_store(), path=name, mode="r+", zarr_format=3)
    return array.with_config({"write_empty_chunks": True})


def write_empty_block(path: Where, t: int, rows: tuple[int, int], cols: tuple[int, int]) -> None:
    """Write a block of a datacube store as "no data": pixels at their fill value (the
    nodata value) and quality class nodata. A block no item covers is written like any
    other, so that every chunk of a complete store exists (a missing chunk is damage).

    Parameters
    ----------
    path
        A store made by :func:`create_datacube_store` (path or URL).
    t
        The block's time step: an index into the store's ``time``.
    rows, cols
        Half-open ``(first, stop)`` ranges of the store's pixel rows (``y``) and pixel
        columns (``x``).
    """
    (y0, y1), (x0, x1) = rows, cols
    pixels = _array(path, "pixels")
    pixels[t, :, y0:y1, x0:x1] = pixels.fill_value
    if (location(path) / "quality" / "zarr.json").is_file():
        quality = _array(path, "quality")
        quality[t, y0:y1, x0:x1] = quality.fill_value


def _write_step(pixels: xr.DataArray, block: int) -> int:
    """Pixels per written block edge: a whole number of stored blocks that also covers a
    whole dask chunk, so no chunk of a lazy (e.g. STAC) cube is computed twice."""
    if pixels.chunks is None:
        return block
    chunk = max(int(pixels.chunksizes["y"][0]), int(pixels.chunksizes["x"][0]))
    return block * max(1, -(-chunk // block))


def _variable_attrs(var: xr.DataArray, coordinates: str, crs: Any) -> dict[str, Any]:
    kept = {k: v for k, v in var.attrs.items() if k not in ("coordinates", GDAL_CRS_ATTR)}
    attrs: dict[str, Any] = jsonable(kept)
    attrs["coordinates"] = coordinates
    attrs.update(gdal_crs(crs))
    return attrs


# GDAL's own Zarr attribute for an array's CRS. GDAL (>= 3.11 for Zarr v3) does not follow
# CF's grid_mapping once a store has consolidated metadata, so stored arrays carry both;
# opened datasets drop it (it would go stale when a user reprojects).
GDAL_CRS_ATTR = "_CRS"


def gdal_crs(crs: Any) -> dict[str, Any]:
    """``{"_CRS": {"wkt": ...}}`` for a stored, georeferenced array (nothing without a CRS).

    Parameters
    ----------
    crs
        The array's CRS: any object with a ``to_wkt()`` method (odc-geo or pyproj CRS);
        ``None``: the result is empty.

    Returns
    -------
    dict
        Attributes to add to the array's: GDAL's ``_CRS`` with the CRS's WKT, or none.
    """
    return {GDAL_CRS_ATTR: {"wkt": crs.to_wkt()}} if crs is not None else {}


def _any_valid(values: np.ndarray, nodata: float | None, quality: np.ndarray | None) -> bool:
    """Whether a block (band, y, x) has a pixel with data in every band."""
    from xclay.masks import PixelClass

    ok = np.ones(values.shape[1:], dtype=bool)
    if nodata is not None and math.isfinite(nodata):
        ok &= (values != nodata).all(axis=0)
    if values.dtype.kind == "f":
        ok &= np.isfinite(values).all(axis=0)
    if quality is not None:
        ok &= quality != PixelClass.NODATA
    return bool(ok.any())


def _compressors(compression: Compression) -> Any:
    """The chunk codecs after ``bytes``: the compressor, then a CRC32C of the stored bytes
    (Zarr v3's ``crc32c`` codec), which every read path checks."""
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    if compression == "zstd":
        return [ZstdCodec(level=3), Crc32cCodec()]
    if compression == "lz4":
        return [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    if compression == "none":
        return [Crc32cCodec()]
    raise DatacubeError(f"compression must be 'zstd', 'lz4' or 'none', got {compression!r}.")


# Every chunk of a datacube array is written (zarr would otherwise leave out chunks that
# equal the fill value) and checksummed: a chunk missing from a complete store is damage,
# never a fill value, and a damaged chunk is an error naming it.
INTEGRITY_ATTR = "xclay_integrity"
INTEGRITY: dict[str, Any] = {"checksum": "crc32c", "every_chunk_written": True}
