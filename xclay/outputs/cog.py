"""Embeddings as Cloud-Optimized GeoTIFFs: what QGIS, GDAL (3.6 and later) and rasterio open.

One raster cell per chip (the chip grid's step, from the datacube's corner), one band
per feature, or per principal component with ``pca=N``; float32 (NaN: no vector) or
int8 with a GDAL scale per band (value = stored x scale; -128: no vector). Tiled, DEFLATE,
with averaged overviews, band descriptions and the model card in the metadata.

The embeddings are read window by window (rows of chips), so a continent's store is
exported in bounded memory; statistics (int8 scales, the PCA) take one pass before the
writing one. Needs ``xclay[io]`` (rasterio).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args, overload

import numpy as np
import xarray as xr

from xclay.errors import DatacubeError, MissingDependencyError
from xclay.outputs.export import chip_grid_transform
from xclay.protocols import ExportOption
from xclay.storage import Location, Where, location

__all__ = ["COG_CONVENTION", "COG_MEDIA_TYPE", "CogExporter", "to_cog"]

COG_CONVENTION = "xclay-cog/1"
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
CogDtype = Literal["float32", "int8"]
MISSING_INT8 = -128
_WINDOW_BYTES = 256 << 20  # vectors read at a time
_TILE_BYTES = 8 << 20  # uncompressed bytes of one tile (all bands: pixel interleaved)
_PCA_SAMPLE = 100_000  # chips the principal components are fitted on, at most


@overload
def to_cog(
    emb: xr.Dataset | Where,
    path: os.PathLike[str],
    *,
    pca: int | None = ...,
    dtype: CogDtype = ...,
    time: int | None = ...,
    blocksize: int | None = ...,
    overwrite: bool = ...,
) -> list[Path]: ...
@overload
def to_cog(
    emb: xr.Dataset | Where,
    path: Where,
    *,
    pca: int | None = ...,
    dtype: CogDtype = ...,
    time: int | None = ...,
    blocksize: int | None = ...,
    overwrite: bool = ...,
) -> list[Path | str]: ...
def to_cog(
    emb: xr.Dataset | Where,
    path: Where,
    *,
    pca: int | None = None,
    dtype: CogDtype = "float32",
    time: int | None = None,
    blocksize: int | None = None,
    overwrite: bool = False,
) -> list[Any]:
    """Write embeddings as Cloud-Optimized GeoTIFF(s); returns the files written (paths,
    or URLs).

    Parameters
    ----------
    emb
        An embeddings Dataset (:func:`xclay.embed`, :func:`xclay.open_embeddings`)
        or the path or URL of an embeddings Zarr.
    path
        The GeoTIFF (a path, or a URL: written locally, then uploaded whole). With
        several time steps (and ``time=None``) one file per step, named
        ``<stem>_<YYYY-MM-DD>.tif``.
    pca
        Write the first ``pca`` principal components (fitted on up to 100,000
        embedded chips) instead of every feature.
    dtype
        ``"float32"`` or ``"int8"`` (per-band GDAL scales; readers that apply
        scales, such as ``gdal_translate -unscale`` or QGIS, see the values).
    time
        Only this time step (index).
    blocksize
        Tile edge in cells (a multiple of 16); default: tiles of about 8 MB.
    overwrite
        Replace existing files (each only once its new file is complete); by
        default an existing file is an :class:`~xclay.errors.OutputExistsError`.
    """
    _rasterio()
    if dtype not in get_args(CogDtype):
        raise DatacubeError(f"dtype must be 'float32' or 'int8', got {dtype!r}.")
    if not isinstance(emb, xr.Dataset):
        from xclay.outputs.export import open_embeddings

        emb = open_embeddings(emb)
    _check(emb)
    steps = [time] if time is not None else list(range(emb.sizes["time"]))
    if not steps or not all(0 <= t < emb.sizes["time"] for t in steps):
        raise DatacubeError(f"time {time} is outside the {emb.sizes['time']} time step(s).")
    target = location(path)
    written: list[Path | str] = []
    for t in steps:
        out = target if len(steps) == 1 else target.with_name(f"{target.stem}_{_day(emb, t)}.tif")
        _write_step(emb, t, out, pca, dtype, blocksize, overwrite)
        written.append(out.path if out.is_local else out.url)
    return written


class CogExporter:
    """``xclay export --format cog``: :func:`to_cog` as an :class:`~xclay.protocols.Exporter`."""

    name = "cog"
    suffix = ".tif"
    media_type = COG_MEDIA_TYPE
    summary = "Cloud-Optimized GeoTIFF, one cell per chip (every feature a band, or --pca N)"
    options: Mapping[str, ExportOption] = MappingProxyType(
        {
            "pca": ExportOption(
                None, "cog: the first N principal components", type=int, metavar="N"
            ),
            "dtype": ExportOption(
                "float32",
                "cog: float32 (default) or int8 with a scale per band",
                get_args(CogDtype),
            ),
        }
    )
    by_region = False

    def write(
        self, emb: xr.Dataset | Path | str, out: Path | str, *, overwrite: bool, **options: Any
    ) -> list[Path | str]:
        return to_cog(emb, out, overwrite=overwrite, **options)

    def asset(self, path: Path | str) -> dict[str, Any]:
        try:
            rasterio = _rasterio()
        except MissingDependencyError:
            return {"type": COG_MEDIA_TYPE, "title": "Cloud-Optimized GeoTIFF", "roles": ["data"]}
        with location(path).local_copy() as local, rasterio.open(local) as src:
            tags = src.tags()
        pca = tags.get("XCLAY_VALUES") == "pca"
        what = "principal components" if pca else "every feature"
        return {
            "type": COG_MEDIA_TYPE,
            "title": f"Cloud-Optimized GeoTIFF, one cell per chip: {what} ({tags.get('XCLAY_DTYPE')})",
            "roles": ["data", "visual"] if pca else ["data"],
        }


@dataclass(frozen=True)
class _Values:
    """What the bands hold: the features, or principal components (``mean``, ``axes``)."""

    names: list[str]
    mean: np.ndarray | None = None
    axes: np.ndarray | None = None  # [components, features]
    explained: np.ndarray | None = None  # fraction of the variance, per component

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        if self.axes is None:
            return vectors
        result: np.ndarray = ((vectors - self.mean) @ self.axes.T).astype(np.float32)
        return result


def _write_step(
    emb: xr.Dataset,
    t: int,
    path: Location,
    pca: int | None,
    dtype: CogDtype,
    blocksize: int | None,
    overwrite: bool,
) -> None:
    import rasterio
    import rasterio.shutil

    values = _fit(emb, t, pca) if pca else _Values([f"feature {i}" for i in range(_dim(emb))])
    scales = _int8_scales(emb, t, values) if dtype == "int8" else None
    n_y, n_x = emb.sizes["chip_y"], emb.sizes["chip_x"]
    bands = len(values.names)
    block = blocksize or _blocksize(bands, np.dtype(dtype).itemsize)
    if block % 16 or block < 16:
        raise DatacubeError(f"blocksize must be a multiple of 16, got {block}.")
    profile = {
        "driver": "GTiff",
        "width": n_x,
        "height": n_y,
        "count": bands,
        "dtype": dtype,
        "crs": emb.attrs["datacube"]["crs_wkt"],
        "transform": chip_grid_transform(emb),
        "nodata": float("nan") if dtype == "float32" else MISSING_INT8,
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "BIGTIFF": "IF_SAFER",
    }
    with path.staged(overwrite=overwrite) as tmp:
        staging = tmp.with_name(tmp.name + ".staging.tif")
        try:
            with rasterio.open(staging, "w", **profile) as dst:
                for r0, r1, vectors in _windows(emb, t):
                    out = values(vectors)
                    bands_first = (
                        _encode(out, scales)
                        if scales is not None
                        else np.moveaxis(out.astype(np.float32), -1, 0)
                    )
                    dst.write(bands_first, window=((r0, r1), (0, n_x)))
                for i, name in enumerate(values.names, start=1):
                    dst.set_band_description(i, name)
                if scales is not None:
                    dst.scales = tuple(float(s) for s in scales)
                    dst.offsets = (0.0,) * bands
                dst.update_tags(**_tags(emb, t, values, dtype))
            rasterio.shutil.copy(
                staging,
                tmp,
                driver="COG",
                BLOCKSIZE=block,
                COMPRESS="DEFLATE",
                PREDICTOR="YES",
                OVERVIEWS="AUTO",
                RESAMPLING="AVERAGE",
                BIGTIFF="IF_SAFER",
            )
        finally:
            staging.unlink(missing_ok=True)


# --------------------------------------------------------------------------- reading


def _windows(emb: xr.Dataset, t: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Rows of chips at time ``t``: ``(first row, end row, vectors [rows, cols, D])``,
    NaN where no vector (patch grids averaged to one vector per chip)."""
    n_y, n_x = emb.sizes["chip_y"], emb.sizes["chip_x"]
    per_row = max(1, n_x * _dim(emb) * 4 * _patches(emb))
    rows = max(1, min(n_y, _WINDOW_BYTES // per_row))
    for r0 in range(0, n_y, rows):
        r1 = min(n_y, r0 + rows)
        vectors = np.asarray(
            emb["embedding"].isel(time=t, chip_y=slice(r0, r1)).values, dtype=np.float32
        )
        if vectors.ndim == 5:  # [rows, cols, patch_y, patch_x, D]
            vectors = vectors.mean(axis=(2, 3))
        yield r0, r1, vectors


def _dim(emb: xr.Dataset) -> int:
    return int(emb.sizes["feature"])


def _patches(emb: xr.Dataset) -> int:
    return int(emb.sizes.get("patch_y", 1) * emb.sizes.get("patch_x", 1))


# --------------------------------------------------------------------------- statistics


def _fit(emb: xr.Dataset, t: int, components: int) -> _Values:
    """Principal components of the embedded chips (a regular sample of at most
    ``_PCA_SAMPLE`` of them, so the fit costs the same for a town and a continent)."""
    dim = _dim(emb)
    if not 1 <= components <= dim:
        raise DatacubeError(f"pca must be between 1 and the {dim} features, got {components}.")
    embedded = int(np.asarray(emb["embedded"].isel(time=t).values).sum())
    if embedded < 2:
        raise DatacubeError(
            f"time step {t} has {embedded} embedded chip(s); a PCA needs at least 2."
        )
    step = max(1, int(np.ceil(np.sqrt(embedded / _PCA_SAMPLE))))
    sample = []
    for r0, _, vectors in _windows(emb, t):
        rows = vectors[(-r0) % step :: step, ::step]  # the same lattice in every window
        flat = rows.reshape(-1, dim)
        sample.append(flat[np.isfinite(flat).all(axis=1)])
    x = np.concatenate(sample).astype(np.float64)
    if len(x) < 2:
        raise DatacubeError("too few embedded chips on the sampling lattice for a PCA.")
    mean = x.mean(axis=0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    variance = singular**2
    explained = variance[:components] / max(float(variance.sum()), 1e-30)
    k = min(components, vt.shape[0])
    axes = vt[:k]
    # A component's sign is arbitrary: fix it so its largest loading is positive.
    axes = axes * np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])[:, None]
    names = [f"PC{i + 1} ({100 * e:.1f} % of variance)" for i, e in enumerate(explained[:k])]
    return _Values(names, mean.astype(np.float32), axes.astype(np.float32), explained[:k])


def _int8_scales(emb: xr.Dataset, t: int, values: _Values) -> np.ndarray:
    """Per band: the largest magnitude over all chips / 127 (1 for a band of zeros)."""
    top = np.zeros(len(values.names), dtype=np.float64)
    for _, _, vectors in _windows(emb, t):
        out = values(vectors)
        finite = np.isfinite(out).all(axis=-1)
        if finite.any():
            top = np.maximum(top, np.abs(out[finite]).max(axis=0))
    return np.where(top > 0, top / 127.0, 1.0)


def _encode(values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[rows, cols, bands]`` float -> ``[bands, rows, cols]`` int8 (-128: no vector)."""
    finite = np.isfinite(values).all(axis=-1)
    q = np.clip(np.rint(np.where(finite[..., None], values, 0) / scales), -127, 127)
    q = q.astype(np.int8)
    q[~finite] = MISSING_INT8
    return np.moveaxis(q, -1, 0)


# --------------------------------------------------------------------------- georeferencing


def _blocksize(bands: int, itemsize: int) -> int:
    """The largest power-of-two tile edge (128..512: GDAL's COG driver wants at least 128)
    whose tile (all bands: pixel interleaved) fits _TILE_BYTES."""
    edge = 512
    while edge > 128 and edge * edge * bands * itemsize > _TILE_BYTES:
        edge //= 2
    return edge


# --------------------------------------------------------------------------- metadata


def _tags(emb: xr.Dataset, t: int, values: _Values, dtype: str) -> dict[str, str]:
    """GDAL metadata (default domain, which every reader shows): what the bands are,
    the model card (without rcf's filters, which the embeddings Zarr keeps), the grid."""
    from xclay.model_card import ModelCard

    card = ModelCard.from_dict(dict(emb.attrs["model"]))
    cube = emb.attrs["datacube"]
    tags: dict[str, Any] = {
        "XCLAY_CONVENTION": COG_CONVENTION,
        "XCLAY_VALUES": "pca" if values.axes is not None else "features",
        "XCLAY_DTYPE": dtype,
        "XCLAY_TIME": _day(emb, t),
        "XCLAY_MODEL": card.name,
        "XCLAY_MODEL_DIM": card.dim,
        "XCLAY_MODEL_CARD": json.dumps(card.compact()),
        "XCLAY_GRID": json.dumps(emb.attrs["config"]["grid"]),
        "XCLAY_DATACUBE": json.dumps(
            {k: cube.get(k) for k in ("platform", "gsd", "bands", "wavelengths", "shape")}
        ),
        "XCLAY_EMBEDDED_CHIPS": int(np.asarray(emb["embedded"].isel(time=t).values).sum()),
        "TIFFTAG_SOFTWARE": f"xclay {emb.attrs.get('xclay_version', '')}".strip(),
    }
    if _patches(emb) > 1:
        tags["XCLAY_POOLING"] = "mean of each chip's patch tokens"
    if values.axes is not None:
        tags["XCLAY_PCA"] = json.dumps(
            {
                "mean": values.mean.tolist() if values.mean is not None else None,
                "components": values.axes.tolist(),
                "explained_variance_ratio": []
                if values.explained is None
                else [float(v) for v in values.explained],
            }
        )
    return {k: str(v) for k, v in tags.items()}


def _day(emb: xr.Dataset, t: int) -> str:
    value = np.datetime64(emb["time"].values[t], "D")
    return "unknown-date" if np.isnat(value) else str(value)


def _check(emb: xr.Dataset) -> None:
    from xclay.outputs.embeddings import validate_embeddings

    validate_embeddings(emb)
    if emb.attrs.get("quantization"):
        raise DatacubeError(
            "these embeddings are quantised and not dequantised; open them with "
            "xclay.open_embeddings (dequantize=True, the default) first."
        )


def _rasterio() -> Any:
    try:
        import rasterio
    except ImportError as err:
        raise MissingDependencyError(
            "writing GeoTIFFs needs rasterio: pip install 'xclay[io]'."
        ) from err
    return rasterio
