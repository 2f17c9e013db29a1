"""Finding similar places: exact cosine-similarity search over an embedding set.

Pick a chip (by id), a place (lon, lat) or a vector, and get the chips most
like it, as the Clay "Explore" app did: :func:`similar` for one question,
:class:`SimilarityIndex` to ask many (the vectors are loaded and normalised
once). Search is exact (every chip is scored) and runs as one matrix-vector
product, or one matrix product for a batch of queries: see
``benchmarks/similarity_search.py`` for queries per second at a million chips.

Sources: an embeddings Dataset (:func:`xclay.embed`), an embeddings Zarr
store, or xclay GeoParquet (a file or a run's folder of parts). Results are
GeoDataFrames (needs ``geopandas``: ``pip install "xclay[explore]"``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from xclay.errors import DatacubeError, MissingDependencyError

__all__ = ["SimilarityIndex", "similar"]

Query = str | tuple[float, float] | Sequence[float] | np.ndarray
_EARTH_RADIUS_M = 6_371_008.8


class SimilarityIndex:
    """Unit-length embedding vectors of every embedded chip, and what each row is.

    Build it with :meth:`open` (any source) or :meth:`from_vectors`.

    Parameters
    ----------
    vectors
        ``[rows, dim]`` embedding vectors, one per row of ``rows``; kept as float32 and
        scaled to unit length (all-zero vectors stay zero).
    rows
        ``pandas.DataFrame`` saying what each vector is (its index is reset). Queries by
        id need ``id`` and ``chip_id`` columns, by point ``centre_lon`` and ``centre_lat``.
    geometry
        Callable from an array of row indices to their chips' footprints (shapely
        geometries, EPSG:4326). Default None: results have no geometry and a point
        query takes the chip with the nearest centre without checking it covers the point.

    Attributes
    ----------
    rows
        ``pandas.DataFrame``, one row per vector: ``id``, ``chip_id``, ``time``,
        ``centre_lat``, ``centre_lon`` and whatever else the source has per
        chip (quality fractions, loss, ...).
    """

    def __init__(self, vectors: np.ndarray, rows: Any, geometry: Any = None) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(rows):
            raise DatacubeError(
                f"vectors must be [rows, dim] with one row per chip; got {vectors.shape} for "
                f"{len(rows)} rows."
            )
        self.dim = int(vectors.shape[1])
        self.unit = _normalised(vectors)
        self.rows = rows.reset_index(drop=True)
        self._geometry = geometry  # callable: row indices -> shapely geometries (EPSG:4326)

    def __len__(self) -> int:
        return int(self.unit.shape[0])

    # -- building ---------------------------------------------------------------

    @classmethod
    def open(
        cls, source: xr.Dataset | str | os.PathLike[str] | Any, *, thumbnails: bool = False
    ) -> SimilarityIndex:
        """An index of an embeddings Dataset, Zarr store, GeoParquet file or folder, or a
        ``pyarrow.Table`` read from one. ``thumbnails=True`` keeps GeoParquet thumbnails in
        :attr:`rows` (memory: about 10 KB per chip)."""
        if isinstance(source, xr.Dataset):
            return cls.from_dataset(source)
        if isinstance(source, str | os.PathLike):
            path = Path(source)
            if (path / "zarr.json").is_file():
                from xclay.outputs.export import open_embeddings

                return cls.from_dataset(open_embeddings(path))
            if path.exists():
                return cls.from_table(_read_table(path, thumbnails))
            raise FileNotFoundError(f"no embeddings Zarr or GeoParquet at {path}.")
        if hasattr(source, "column_names"):
            return cls.from_table(source)
        raise DatacubeError(
            f"cannot search {type(source).__name__}: give an embeddings Dataset, the path of an "
            "embeddings Zarr or of GeoParquet, or a pyarrow Table."
        )

    @classmethod
    def from_dataset(cls, emb: xr.Dataset) -> SimilarityIndex:
        """An index of the embedded chips of an embeddings Dataset (patch grids: their mean)."""
        import pandas as pd

        from xclay.outputs.embeddings import validate_embeddings
        from xclay.outputs.export import chip_footprints, row_ids

        validate_embeddings(emb)
        embedded = np.asarray(emb["embedded"].values, dtype=bool)
        t, i, j = np.nonzero(embedded)
        vectors = np.asarray(emb["embedding"].values)[t, i, j]
        if vectors.ndim == 4:
            vectors = vectors.mean(axis=(1, 2))
        times = np.asarray(emb["time"].values, dtype="datetime64[ns]")[t]
        chip_ids = np.asarray(emb["chip_id"].values, dtype=object)[i, j].astype(str)
        rows = pd.DataFrame(
            {
                "id": row_ids(chip_ids, times),
                "chip_id": chip_ids,
                "time": times,
                "centre_lat": np.asarray(emb["lat"].values)[i, j],
                "centre_lon": np.asarray(emb["lon"].values)[i, j],
                "t": t,
                "chip_row": i,
                "chip_col": j,
            }
        )
        for name in ("nodata_fraction", "cloud_fraction", "clear_fraction", "loss"):
            if name in emb.data_vars:
                rows[name] = np.asarray(emb[name].values)[t, i, j]
        return cls(vectors, rows, lambda k: chip_footprints(emb, i[k], j[k])[1])

    @classmethod
    def from_table(cls, table: Any) -> SimilarityIndex:
        """An index of xclay GeoParquet rows (a ``pyarrow.Table``; int8 vectors are restored)."""
        import shapely

        from xclay.outputs.export import SCALE_COLUMN, dequantize_table

        if "embedding" not in table.column_names:
            raise DatacubeError("the table has no 'embedding' column: is it xclay GeoParquet?")
        if SCALE_COLUMN in table.column_names:
            table = dequantize_table(table)
        column = table["embedding"].combine_chunks()
        dim = column.type.list_size
        vectors = np.asarray(column.flatten()).reshape(-1, dim)
        rows = table.drop_columns(["embedding"]).to_pandas()
        if "time" in rows:
            rows["time"] = rows["time"].dt.tz_localize(None).to_numpy("datetime64[ns]")
        wkb = rows.pop("geometry").to_numpy() if "geometry" in rows else None
        geometry = (lambda k: shapely.from_wkb(wkb[k])) if wkb is not None else None
        return cls(vectors, rows, geometry)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, ids: Sequence[str] | None = None) -> SimilarityIndex:
        """An index of bare vectors (``ids`` default to their row numbers)."""
        import pandas as pd

        n = np.asarray(vectors).shape[0]
        names = [str(x) for x in ids] if ids is not None else [str(k) for k in range(n)]
        return cls(vectors, pd.DataFrame({"id": names, "chip_id": names}))

    # -- asking -----------------------------------------------------------------

    def vector(self, query: Query, *, time: Any = None) -> np.ndarray:
        """The query as a unit vector ``[dim]``: a chip or row id, a (lon, lat) point, or a vector."""
        if isinstance(query, str):
            result: np.ndarray = self.unit[self.locate(query, time=time)]
            return result
        q = np.asarray(query, dtype=np.float64)
        if q.shape == (2,) and self.dim != 2:
            result = self.unit[self.locate((float(q[0]), float(q[1])), time=time)]
            return result
        if q.shape != (self.dim,):
            raise DatacubeError(
                f"a query vector must have {self.dim} elements, got shape {q.shape}; queries are "
                "a chip id, a (lon, lat) point, or a vector."
            )
        result = _normalised(q[None, :].astype(np.float32))[0]
        return result

    def locate(self, query: str | Sequence[float], *, time: Any = None) -> int:
        """The row of a chip id / row id, or of the chip over a (lon, lat) point."""
        rows = self.rows
        if isinstance(query, str):
            hits = np.nonzero((rows["chip_id"] == query).to_numpy() | (rows["id"] == query))[0]
            if hits.size == 0:
                raise DatacubeError(
                    f"no embedded chip has the id {query!r} (ids look like {rows['id'].iloc[0]!r})."
                )
        else:
            hits = self._over_point(float(query[0]), float(query[1]))
        if hits.size > 1:
            hits = self._at_time(hits, time, query)
        return int(hits[0])

    def scores(self, query: Query, *, time: Any = None) -> np.ndarray:
        """``[rows]`` cosine similarity of every chip to the query."""
        result: np.ndarray = self.unit @ self.vector(query, time=time)
        return result

    def search(
        self, query: Query, *, k: int = 10, time: Any = None, include_query: bool = False
    ) -> Any:
        """The ``k`` chips most similar to ``query``, best first, as a GeoDataFrame with
        ``rank`` and ``similarity`` columns (the queried chip itself left out unless
        ``include_query``)."""
        if k < 1:
            raise DatacubeError(f"k must be >= 1, got {k}.")
        scores = self.scores(query, time=time)
        if not include_query and not _is_vector(query, self.dim):
            point = query if isinstance(query, str) else (float(query[0]), float(query[1]))
            scores[self.locate(point, time=time)] = -np.inf
        best = _top_k(scores[None, :], min(k, len(self)))[0]
        best = best[np.isfinite(scores[best])]
        return self._frame(best, scores[best])

    def search_many(self, vectors: np.ndarray, *, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Row indices and similarities ``[queries, k]`` of the best matches of many query
        vectors at once (one matrix product: far more queries per second than one by one)."""
        q = np.asarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DatacubeError(f"query vectors must be [queries, {self.dim}], got {q.shape}.")
        scores = _normalised(q) @ self.unit.T  # [queries, rows], each row contiguous
        best = _top_k(scores, min(k, len(self)))
        return best, np.take_along_axis(scores, best, axis=1)

    # -- helpers ----------------------------------------------------------------

    def _over_point(self, lon: float, lat: float) -> np.ndarray:
        if not (-180.0 <= lon <= 180.0 and -90.0 <= lat <= 90.0):
            raise DatacubeError(
                f"({lon}, {lat}) is not a (lon, lat) point in degrees: longitude first."
            )
        if "centre_lat" not in self.rows:
            raise DatacubeError("this index has no chip centres to find a point among.")
        distance = _haversine(
            lon, lat, self.rows["centre_lon"].to_numpy(), self.rows["centre_lat"].to_numpy()
        )
        nearest = float(distance.min())
        hits = np.nonzero(distance <= nearest * (1 + 1e-9) + 1e-6)[0]
        if self._geometry is not None:
            import shapely

            inside = shapely.contains_xy(self._geometry(hits[:1])[0], lon, lat)
            if not inside:
                raise DatacubeError(
                    f"no embedded chip covers ({lon}, {lat}); the nearest chip centre is "
                    f"{nearest / 1000:.1f} km away."
                )
        return hits

    def _at_time(self, hits: np.ndarray, time: Any, query: Any) -> np.ndarray:
        if "time" not in self.rows:
            return hits
        times = self.rows["time"].to_numpy()[hits]
        if time is None:
            if len(set(times.tolist())) > 1:
                listed = ", ".join(str(t)[:19] for t in times)
                raise DatacubeError(f"{query!r} has several times ({listed}); pass time=...")
            return hits
        chosen = hits[times == np.datetime64(time, "ns")]
        if chosen.size == 0:
            raise DatacubeError(f"{query!r} has no embedding at time {time}.")
        result: np.ndarray = chosen
        return result

    def _frame(self, index: np.ndarray, similarity: np.ndarray) -> Any:
        try:
            import geopandas as gpd
        except ImportError as err:
            raise MissingDependencyError(
                'search results are GeoDataFrames: pip install "xclay[explore]" (geopandas).'
            ) from err
        frame = self.rows.iloc[index].reset_index(drop=True)
        frame.insert(0, "rank", np.arange(1, len(index) + 1))
        frame.insert(1, "similarity", np.asarray(similarity, dtype=np.float64))
        if self._geometry is None:  # bare vectors: no footprints to draw
            return gpd.GeoDataFrame(frame)
        return gpd.GeoDataFrame(frame, geometry=self._geometry(index), crs="EPSG:4326")


def similar(
    embeddings: xr.Dataset | str | os.PathLike[str] | Any,
    query: Query,
    *,
    k: int = 10,
    time: Any = None,
    include_query: bool = False,
) -> Any:
    """The ``k`` chips most like ``query`` (a chip id, a (lon, lat) point or a vector), by
    cosine similarity, best first: a GeoDataFrame with ``rank``, ``similarity``, the
    chips' ids, times, centres and footprints.

    For many queries build a :class:`SimilarityIndex` once.

    Parameters
    ----------
    embeddings
        An embeddings Dataset, an embeddings Zarr path, a GeoParquet file or folder, or a
        ``pyarrow.Table`` read from one.
    query
        A chip id or row id, a (lon, lat) point in degrees (the chip over it), or a vector
        as long as the embeddings.
    k
        Number of chips to return (at least 1, default 10); fewer if the source has fewer.
    time
        The time (a ``numpy.datetime64`` or an ISO string, matched exactly) of the queried
        chip when a chip id or point has embeddings at several times; required then.
        Otherwise, and for vector queries, it is ignored.
    include_query
        Keep the queried chip itself among the results. Default False: it is left out.
        A vector query leaves nothing out.

    Returns
    -------
    geopandas.GeoDataFrame
        One row per chip found, ``rank`` 1 the most similar, with footprints in EPSG:4326
        where the source has them.
    """
    return SimilarityIndex.open(embeddings).search(
        query, k=k, time=time, include_query=include_query
    )


def _read_table(path: Path, thumbnails: bool) -> Any:
    import pyarrow.parquet as pq

    from xclay.outputs.export import read_geoparquet

    names = pq.ParquetDataset(path).schema.names
    columns = [c for c in names if thumbnails or c != "thumbnail"]
    return read_geoparquet(path, columns=columns, dequantize=False)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    result: np.ndarray = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    return result


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """``[queries, k]`` indices of the largest scores per row, best first.

    torch's top-k: selecting 10 of a million scores is ~25x faster than NumPy's
    argpartition, which would otherwise cost more than the matrix product.
    """
    import torch

    rows = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32))
    return torch.topk(rows, k, dim=1, largest=True, sorted=True).indices.numpy()


def _is_vector(query: Query, dim: int) -> bool:
    if isinstance(query, str):
        return False
    return np.asarray(query).shape == (dim,) and dim != 2


def _haversine(lon: float, lat: float, lons: np.ndarray, lats: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat), np.radians(lats)
    dp, dl = p2 - p1, np.radians(lons - lon)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    result: np.ndarray = 2 * _EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return result
