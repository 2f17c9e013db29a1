"""The embeddings Dataset: its schema (variables, coordinates, attributes, convention),
built block by block from what the embedding loop computed, and checked
(:func:`validate_embeddings`) before anything reads or exports it. The embedding loop
(:mod:`xclay.embed`) writes it; the outputs (:mod:`xclay.outputs.export`, :mod:`xclay.outputs.cog`,
:mod:`xclay.explore`) read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import xarray as xr
from odc.geo.xr import xr_coords

from xclay._version import __version__
from xclay.batch.batching import Block
from xclay.batch.chips import ChipGrid
from xclay.datacube import gdal_crs, nodata_value
from xclay.errors import DatacubeError
from xclay.masks import PixelClass
from xclay.model_card import ModelCard
from xclay.outputs.quantize import SCALE_VARIABLE, quantization_of
from xclay.outputs.thumbnails import ThumbnailStretch
from xclay.quality import ChipQuality

__all__ = [
    "EMBEDDINGS_CONVENTION",
    "BlockGeometry",
    "BlockResult",
    "EmbeddingsContext",
    "embeddings_dataset",
    "validate_embeddings",
]

EMBEDDINGS_CONVENTION = "xclay-embeddings/1"


@dataclass(frozen=True)
class EmbeddingsContext:
    """What the Datasets of every block of one embedding share.

    Parameters
    ----------
    cube
        The datacube embedded.
    grid
        The chip grid cut from it.
    times
        The cube's time steps, datetime64[ns].
    card
        The encoder's model card, as prepared.
    config
        The embedding's configuration (``EmbedConfig``), as stored in the attributes.
    stretch
        The thumbnails' colour stretch; ``None`` without thumbnails.
    data_path
        How the chips were read (engine, reader, device, threads, fallbacks).
    """

    cube: xr.Dataset
    grid: ChipGrid
    times: np.ndarray
    card: ModelCard
    config: dict[str, Any]
    stretch: ThumbnailStretch | None
    data_path: dict[str, Any]


@dataclass(frozen=True)
class BlockGeometry:
    """Where a block's chips are, from the grid's arithmetic alone (:meth:`of`).

    Attributes
    ----------
    lonlat
        ``(rows, cols, 2)`` chip centres in WGS84 degrees, longitude first.
    chip_ids
        ``(rows, cols)`` object array of the chips' ids (str; see
        :meth:`xclay.batch.chips.ChipGrid.chip_ids`).
    """

    lonlat: np.ndarray
    chip_ids: np.ndarray

    @classmethod
    def of(cls, grid: ChipGrid, block: Block) -> BlockGeometry:
        lon, lat = grid.centres_lonlat(block.rows, block.cols)
        return cls(np.stack([lon, lat], axis=-1), grid.chip_ids(block.rows, block.cols))


@dataclass
class BlockResult:
    """The embeddings and quality of a block of chips.

    Parameters
    ----------
    block
        The block embedded: ranges of time steps, chip rows and chip columns.
    vectors
        ``[time, rows, cols, *vector_shape]`` float32 vectors (``vector_shape`` is the
        model card's: ``[dim]``, or ``[patch_y, patch_x, dim]`` for patch grids); NaN
        where not embedded.
    quality
        Per-chip nodata and quality-class fractions of the block.
    embedded
        ``[time, rows, cols]`` bool: the chip has a vector (all of it finite).
    counts
        Chip counts of the block (``chips_total``, ``chips_embedded``,
        ``chips_skipped_<reason>``, ``chips_failed``), stored as the Dataset's ``run``
        attribute.
    thumbnails
        ``[time, rows, cols, size, size, 4]`` uint8 RGBA previews (zero where not
        embedded); default None: no ``thumbnail`` variable.
    loss
        ``[time, rows, cols]`` float32 masked-reconstruction loss, NaN where not scored;
        default None: no ``loss`` variable.
    geometry
        The block's chip centres and ids; default None computes them from the grid
        (:meth:`BlockGeometry.of`) when the Dataset is built.
    """

    block: Block
    vectors: np.ndarray  # [time, rows, cols, *vector_shape] float32, NaN where not embedded
    quality: ChipQuality
    embedded: np.ndarray  # [time, rows, cols] bool
    counts: dict[str, int]
    thumbnails: np.ndarray | None = None  # [time, rows, cols, size, size, 4] uint8
    loss: np.ndarray | None = None  # [time, rows, cols] float32, NaN where not scored
    geometry: BlockGeometry | None = None  # chip centres and ids of the block


def _class_fractions(quality: ChipQuality, dims: tuple[str, ...]) -> dict[str, Any]:
    """``<class>_fraction`` variables (cloud, cloud_shadow, haze, snow, clear); NaN when unknown."""
    out = {}
    for cls in (
        PixelClass.CLOUD,
        PixelClass.CLOUD_SHADOW,
        PixelClass.HAZE,
        PixelClass.SNOW,
        PixelClass.CLEAR,
    ):
        name = cls.name.lower()
        values = quality.fraction(cls)
        out[f"{name}_fraction"] = (
            dims,
            values,
            {
                "long_name": f"fraction of chip pixels of quality class {name} "
                "(NaN: the cube has no quality classes)",
                "units": "1",
            },
        )
    return out


def embeddings_dataset(context: EmbeddingsContext, result: BlockResult) -> xr.Dataset:
    """The embeddings Dataset of a block (its own coords, computed for the block).

    Parameters
    ----------
    context
        What every block of the embedding shares: cube, chip grid, times, model card,
        configuration, thumbnail stretch and data path.
    result
        The block's vectors, quality, counts and optional thumbnails and loss.

    Returns
    -------
    xarray.Dataset
        ``embedding`` ``[time, chip_y, chip_x, (patch_y, patch_x,) feature]`` with the
        per-chip quality variables, the block's coordinates (time, chip centres, pixel
        offsets, ``chip_id``, ``lat``, ``lon``) and the attributes of
        :data:`EMBEDDINGS_CONVENTION`, the block's counts as ``run``.
    """
    geometry = result.geometry or BlockGeometry.of(context.grid, result.block)
    return xr.Dataset(
        data_variables(result, context.card.name, context.stretch, context.grid.crs),
        coords={**grid_coords(context, result.block), **chip_coordinates(geometry)},
        attrs=embeddings_attrs(context, result.counts),
    )


_DIMS3 = ("time", "chip_y", "chip_x")
_VAR_ATTRS: dict[str, dict[str, Any]] = {
    "nodata_fraction": {"long_name": "fraction of chip pixels without data", "units": "1"},
    "embedded": {"long_name": "chip was embedded (passed the filters, vector valid)"},
    "loss": {
        "long_name": "masked-reconstruction loss of the chip: mean L1 error over its 75 % "
        "masked patches, normalised units (model attrs: params.loss)",
        "units": "1",
    },
}


def _georeferenced(crs: Any) -> dict[str, Any]:
    """Attributes that place a per-chip variable on the map: CF's ``grid_mapping`` (xarray,
    rioxarray, odc-geo) and GDAL's own ``_CRS`` (GDAL >= 3.11 reads Zarr v3; with
    consolidated metadata it does not follow ``grid_mapping``)."""
    return {"grid_mapping": "spatial_ref", **gdal_crs(crs)}


def data_variables(
    result: BlockResult, model_name: str, stretch: ThumbnailStretch | None, crs: Any
) -> dict[str, Any]:
    """The per-chip variables of a block, ``name -> (dims, values, attrs)``, placed on the
    map (CF grid mapping and GDAL's CRS)."""
    variables = _chip_variables(result, model_name, stretch)
    placed = _georeferenced(crs)
    return {
        name: (dims, values, {**attrs, **placed})
        for name, (dims, values, attrs) in variables.items()
    }


def _chip_variables(
    result: BlockResult, model_name: str, stretch: ThumbnailStretch | None
) -> dict[str, Any]:
    vectors = result.vectors
    patch_dims = ("patch_y", "patch_x") if vectors.ndim == 6 else ()
    extra: dict[str, Any] = {}
    if result.loss is not None:
        extra["loss"] = (_DIMS3, result.loss, _VAR_ATTRS["loss"])
    if result.thumbnails is not None and stretch is not None:
        extra["thumbnail"] = (
            (*_DIMS3, "thumb_y", "thumb_x", "rgba"),
            result.thumbnails,
            {
                "long_name": "true-colour preview of the chip (RGBA; alpha: valid fraction)",
                "bands": list(stretch.bands),
                "stretch_low": list(stretch.low),
                "stretch_high": list(stretch.high),
            },
        )
    return {
        "embedding": (
            (*_DIMS3, *patch_dims, "feature"),
            vectors,
            {"long_name": f"{model_name} chip embedding"},
        ),
        "nodata_fraction": (_DIMS3, result.quality.nodata_fraction, _VAR_ATTRS["nodata_fraction"]),
        **_class_fractions(result.quality, _DIMS3),
        "embedded": (_DIMS3, result.embedded, _VAR_ATTRS["embedded"]),
        **extra,
    }


def grid_coords(context: EmbeddingsContext, block: Block) -> dict[str, Any]:
    """The 1-D coords of a block (time, chip centres, pixel offsets): rows plus columns."""
    grid, cube = context.grid, context.cube
    (t0, t1), (r0, r1), (c0, c1) = block.times, block.rows, block.cols
    # The same arithmetic for every block, so a region's coords equal its slice of the whole.
    y, x = grid.centres((r0, r1), (c0, c1))
    row_off, col_off = grid.offsets((r0, r1), (c0, c1))
    cells = grid.geobox()
    if r1 > r0 and c1 > c0:
        cells = cells[r0:r1, c0:c1]
    spatial_ref = xr_coords(cells, crs_coord_name="spatial_ref")["spatial_ref"]
    coords: dict[str, Any] = {
        "time": context.times[t0:t1],
        "chip_y": ("chip_y", y, _axis_attrs(grid.crs, "y")),
        "chip_x": ("chip_x", x, _axis_attrs(grid.crs, "x")),
        "feature": np.arange(context.card.dim, dtype=np.int32),
        "spatial_ref": spatial_ref,
        "row_off": (
            "chip_y",
            row_off,
            {"long_name": "top pixel row of the chip window in the datacube"},
        ),
        "col_off": (
            "chip_x",
            col_off,
            {"long_name": "left pixel column of the chip window in the datacube"},
        ),
    }
    for extra in ("time_start", "time_end"):
        if extra in cube.coords:
            coords[extra] = ("time", cube[extra].values[t0:t1])
    return coords


def _axis_attrs(crs: Any, axis: Literal["x", "y"]) -> dict[str, str]:
    """CF attributes of the chip-centre axes, by which rioxarray, odc-geo and GDAL find
    the spatial dims of ``(chip_y, chip_x)`` without being told."""
    geographic = bool(crs.geographic)
    if geographic:
        name, units = (
            ("longitude", "degrees_east") if axis == "x" else ("latitude", "degrees_north")
        )
    else:
        name = f"projection_{axis}_coordinate"
        units = str(crs.units[0 if axis == "x" else 1])
    return {
        "axis": axis.upper(),
        "standard_name": name,
        "units": units,
        "long_name": f"chip centre {axis} (datacube CRS)",
    }


_CHIP_DIMS = ("chip_y", "chip_x")


def chip_coordinates(geometry: BlockGeometry) -> dict[str, Any]:
    """Per-chip coords of a block: WGS84 centres and chip ids (regions write their own)."""
    return {
        "chip_id": (
            _CHIP_DIMS,
            geometry.chip_ids,
            {"long_name": "chip id (see xclay.batch.chips)"},
        ),
        "lat": (
            _CHIP_DIMS,
            geometry.lonlat[..., 1],
            {
                "units": "degrees_north",
                "standard_name": "latitude",
                "long_name": "chip centre latitude (WGS84)",
            },
        ),
        "lon": (
            _CHIP_DIMS,
            geometry.lonlat[..., 0],
            {
                "units": "degrees_east",
                "standard_name": "longitude",
                "long_name": "chip centre longitude (WGS84)",
            },
        ),
    }


def embeddings_attrs(context: EmbeddingsContext, counts: dict[str, int]) -> dict[str, Any]:
    """The attributes of an embeddings Dataset: convention, model card, configuration, the
    datacube's description, the block's counts, the data path and xclay's version."""
    cube, grid = context.cube, context.grid
    t = grid.source.affine
    return {
        "convention": EMBEDDINGS_CONVENTION,
        "model": context.card.to_dict(),
        "config": context.config,
        "datacube": {
            "platform": cube.attrs.get("platform", ""),
            "gsd": float(cube.attrs["gsd"]),
            "bands": [str(b) for b in cube["band"].values],
            "wavelengths": [float(w) for w in cube["wavelength"].values],
            "crs_wkt": grid.crs.to_wkt(),
            "geotransform": list(t.to_gdal()),
            "shape": [int(s) for s in grid.source.shape],
            "nodata": nodata_value(cube["pixels"]),
            "dtype": str(cube["pixels"].dtype),
            "provenance": cube.attrs.get("provenance", {}),
        },
        "run": counts,
        "data_path": context.data_path,
        "xclay_version": __version__,
    }


def validate_embeddings(emb: xr.Dataset) -> None:
    """Raise :class:`DatacubeError` when ``emb`` is not an xclay embeddings Dataset.

    Parameters
    ----------
    emb
        The Dataset to check: it needs the ``embedding``, ``embedded`` and
        ``nodata_fraction`` variables, the per-chip coordinates (``chip_id``,
        ``lat``, ``lon``, ``row_off``, ``col_off``), ``embedding_scale`` when
        quantised, and the ``datacube`` and ``config`` attributes.
    """
    if not isinstance(emb, xr.Dataset) or "embedding" not in emb.data_vars:
        raise DatacubeError(
            "expected an embeddings Dataset (from xclay.embed) with an 'embedding' variable."
        )
    needed = ["embedded", "nodata_fraction", "chip_id", "lat", "lon", "row_off", "col_off"]
    if quantization_of(emb):
        needed.append(SCALE_VARIABLE)
    missing = [n for n in needed if n not in emb.variables]
    if missing or "datacube" not in emb.attrs or "config" not in emb.attrs:
        raise DatacubeError(
            f"the embeddings Dataset lacks {missing or 'its datacube/config attrs'}; it must come "
            "from xclay.embed (or xclay.open_embeddings) unchanged apart from selections."
        )
