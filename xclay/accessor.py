"""The ``.clay`` accessor: a thin facade over xclay's free functions.

Every method calls the typed function of the same name with the wrapped
object first; the accessor holds nothing but that object.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import xarray as xr

if TYPE_CHECKING:
    from xclay.chips import Edges
    from xclay.datacube import Compression, TimeLike
    from xclay.devices import Precision
    from xclay.protocols import Encoder
    from xclay.quality import QualityFilter
    from xclay.readers import Engine

__all__ = ["ClayDataArrayAccessor", "ClayDatasetAccessor"]


@xr.register_dataset_accessor("clay")
class ClayDatasetAccessor:
    """``ds.clay``: embed a datacube; write datacubes and embeddings; search and plot them."""

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    def embed(
        self,
        *,
        model: str | Encoder = "rcf",
        checkpoint: str | os.PathLike[str] | None = None,
        chip_size: int = 256,
        stride: int | None = None,
        edges: Edges = "drop",
        batch_size: int | Literal["auto"] = "auto",
        quality: QualityFilter | Mapping[str, float] | None = None,
        device: str = "auto",
        engine: Engine = "auto",
        precision: Precision = "auto",
        prefetch: int = 2,
        thumbnails: bool | int = False,
        loss: bool = False,
        progress: bool | None = None,
    ) -> xr.Dataset:
        """Embed every chip of this datacube: see :func:`xclay.embed`."""
        from xclay.embed import embed

        return embed(
            self._obj,
            model=model,
            checkpoint=checkpoint,
            chip_size=chip_size,
            stride=stride,
            edges=edges,
            batch_size=batch_size,
            quality=quality,
            device=device,
            engine=engine,
            precision=precision,
            prefetch=prefetch,
            thumbnails=thumbnails,
            loss=loss,
            progress=progress,
        )

    def write_datacube(
        self,
        path: str | os.PathLike[str],
        *,
        chip_size: int = 256,
        shard_chips: int | None = None,
        compression: Compression = "zstd",
        overwrite: bool = False,
    ) -> Path:
        """Write this datacube as chip-aligned Zarr v3: see :func:`xclay.write_datacube`."""
        from xclay.datacube import write_datacube

        return write_datacube(
            self._obj,
            path,
            chip_size=chip_size,
            shard_chips=shard_chips,
            compression=compression,
            overwrite=overwrite,
        )

    def to_zarr(
        self,
        path: str | os.PathLike[str],
        *,
        quantize: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write these embeddings as Zarr v3: see :func:`xclay.export.to_zarr`."""
        from xclay.export import to_zarr

        return to_zarr(self._obj, path, quantize=quantize, overwrite=overwrite)

    def to_geoparquet(
        self,
        path: str | os.PathLike[str],
        *,
        quantize: str | None = None,
        overwrite: bool = False,
    ) -> Path:
        """Write these embeddings as GeoParquet 1.1: see :func:`xclay.to_geoparquet`."""
        from xclay.export import to_geoparquet

        return to_geoparquet(self._obj, path, quantize=quantize, overwrite=overwrite)

    def similar(
        self, query: Any, *, k: int = 10, time: Any = None, include_query: bool = False
    ) -> Any:
        """The chips of these embeddings most like ``query``: see :func:`xclay.explore.similar`."""
        from xclay.explore import similar

        return similar(self._obj, query, k=k, time=time, include_query=include_query)

    def plot_pca(self, *, time: int = 0, ax: Any = None) -> Any:
        """PCA false-colour map of these embeddings: see :func:`xclay.viz.plot_pca`."""
        from xclay.viz import plot_pca

        return plot_pca(self._obj, time=time, ax=ax)

    def plot_similarity(
        self, query: Any, *, time: int = 0, ax: Any = None, cmap: str = "magma"
    ) -> Any:
        """Similarity heat map for a query: see :func:`xclay.viz.plot_similarity`."""
        from xclay.viz import plot_similarity

        return plot_similarity(self._obj, query, time=time, ax=ax, cmap=cmap)

    def plot_true_colour(self, *, time: int = 0, ax: Any = None) -> Any:
        """This datacube in true colour: see :func:`xclay.viz.plot_true_colour`."""
        from xclay.viz import plot_true_colour

        return plot_true_colour(self._obj, time=time, ax=ax)


@xr.register_dataarray_accessor("clay")
class ClayDataArrayAccessor:
    """``da.clay``: turn imagery into a datacube, or embed it directly."""

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    def as_datacube(
        self,
        *,
        platform: str | None = None,
        bands: Sequence[str] | None = None,
        wavelengths: Sequence[float] | Mapping[str, float] | None = None,
        time: TimeLike | tuple[TimeLike, TimeLike] | None = None,
        nodata: float | None = None,
        gsd: float | None = None,
        crs: str | int | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> xr.Dataset:
        """This imagery as a datacube: see :func:`xclay.as_datacube`."""
        from xclay.datacube import as_datacube

        return as_datacube(
            self._obj,
            platform=platform,
            bands=bands,
            wavelengths=wavelengths,
            time=time,
            nodata=nodata,
            gsd=gsd,
            crs=crs,
            provenance=provenance,
        )

    def embed(
        self,
        *,
        model: str | Encoder = "rcf",
        checkpoint: str | os.PathLike[str] | None = None,
        chip_size: int = 256,
        stride: int | None = None,
        edges: Edges = "drop",
        batch_size: int | Literal["auto"] = "auto",
        quality: QualityFilter | Mapping[str, float] | None = None,
        device: str = "auto",
        engine: Engine = "auto",
        precision: Precision = "auto",
        prefetch: int = 2,
        thumbnails: bool | int = False,
        loss: bool = False,
        progress: bool | None = None,
    ) -> xr.Dataset:
        """Embed this imagery (a datacube's ``pixels``): see :func:`xclay.embed`."""
        from xclay.embed import embed

        return embed(
            self._obj,
            model=model,
            checkpoint=checkpoint,
            chip_size=chip_size,
            stride=stride,
            edges=edges,
            batch_size=batch_size,
            quality=quality,
            device=device,
            engine=engine,
            precision=precision,
            prefetch=prefetch,
            thumbnails=thumbnails,
            loss=loss,
            progress=progress,
        )
