"""Labels joined to chips: what users have (points, polygons, label rasters) turned into one
target per chip, by a stated rule, each keeping its chip id.

Sources (:func:`read_labels`): a GeoDataFrame, or a GeoParquet, GeoJSON, GeoPackage,
FlatGeobuf or Shapefile (read by geopandas), in any CRS; or a label raster (a GeoTIFF, or an
``xarray.DataArray`` georeferenced as rioxarray or odc-geo read it) on any grid. Vector
labels name a ``column``: a class (text, integers, booleans: classification) or a value
(floats: regression).

Rules (:func:`join_labels`; ``rule="auto"`` picks by what the labels are):

``"point"``
    A point labels the chip whose window holds it (with overlapping chips, the one whose
    centre is nearest). Several points in one chip: the most frequent class (ties: the
    first class in order), or the mean value; ``support`` is the fraction of the chip's
    points that agree (1 for values).
``"cover"``
    Polygons: the fraction of each chip's window each class covers (polygons of a class
    dissolved first, so overlaps count once); the chip takes the class that covers the most,
    if it covers at least ``min_cover`` of the window. Values: the area-weighted mean of the
    polygons that cover at least ``min_cover`` of the window together. ``support`` is that
    cover fraction.
``"majority"``
    A class raster, put on the datacube's pixel grid (nearest neighbour): the most frequent
    class of each chip's labelled pixels, if labelled pixels cover at least ``min_cover`` of
    the window; ``support`` is the fraction of them in that class.
``"mean"``
    A value raster, put on the datacube's pixel grid (averaged where it is finer, bilinear
    where coarser): the mean of each chip's labelled pixels, if they cover at least
    ``min_cover`` of the window; ``support`` is that coverage.

Needs geopandas for vector labels (``pip install "xclay[explore]"``) and rasterio for label
rasters (``pip install "xclay[io]"``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import xarray as xr
from affine import Affine

from xclay.batch.chips import ChipGrid
from xclay.errors import LabelError, MissingDependencyError
from xclay.storage import location

if TYPE_CHECKING:
    import geopandas as gpd

__all__ = [
    "RASTER_SUFFIXES",
    "ChipLabels",
    "JoinRule",
    "Task",
    "chip_windows_of",
    "join_labels",
    "read_labels",
]

log = logging.getLogger(__name__)

JoinRule = Literal["auto", "point", "cover", "majority", "mean"]
Task = Literal["auto", "classification", "regression"]
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".img", ".jp2")
VECTOR_SUFFIXES = (".parquet", ".geoparquet", ".geojson", ".json", ".gpkg", ".fgb", ".shp", ".zip")
Labels = Any  # a GeoDataFrame, an xarray.DataArray, or a path or URL to either


# --------------------------------------------------------------------------- chip windows


@dataclass(frozen=True)
class ChipWindows:
    """The chips labels are joined to: square windows of ``size`` pixels at pixel offsets
    ``rows`` x ``cols`` of a datacube's north-up pixel grid (``affine``, ``crs``).

    Attributes
    ----------
    affine
        The datacube's pixel grid: pixel ``(col, row)`` to CRS ``(x, y)``.
    crs
        The datacube's CRS (WKT or anything odc-geo reads).
    shape
        The datacube's ``(rows, cols)`` in pixels.
    size
        Chip edge in pixels.
    rows, cols
        ``(n_rows,)`` top pixel rows and ``(n_cols,)`` left pixel columns of the chips,
        increasing (the chip grid, or the chips of an embeddings Dataset).
    ids
        ``(n_rows, n_cols)`` chip ids, when known already (an embeddings Dataset's);
        ``None``: computed from ``grid`` for the chips labelled.
    grid
        The chip grid, when the windows are a whole grid.
    """

    affine: Affine
    crs: Any
    shape: tuple[int, int]
    size: int
    rows: np.ndarray
    cols: np.ndarray
    ids: np.ndarray | None = None
    grid: ChipGrid | None = None

    def chip_ids(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """``[n]`` chip ids of chips ``(i[k], j[k])`` (indices into ``rows`` and ``cols``)."""
        if self.ids is not None:
            return np.asarray(self.ids[i, j], dtype=object)
        assert self.grid is not None
        grid = self.grid
        out = np.empty(len(i), dtype=object)
        for k, (a, b) in enumerate(
            zip(np.asarray(i).tolist(), np.asarray(j).tolist(), strict=True)
        ):
            out[k] = grid.chip_ids((a, a + 1), (b, b + 1))[0, 0]
        return out

    def centres(self, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(x, y)`` chip centres in the datacube CRS, each ``[n]``."""
        half = self.size / 2
        x = self.affine.c + self.affine.a * (self.cols[j] + half)
        y = self.affine.f + self.affine.e * (self.rows[i] + half)
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    @property
    def pixel_size(self) -> float:
        return float(abs(self.affine.a))


def chip_windows_of(target: xr.Dataset | ChipGrid) -> ChipWindows:
    """The chip windows of an embeddings Dataset (its own chips, with their ids) or of a
    chip grid.

    Parameters
    ----------
    target
        An embeddings Dataset (:func:`xclay.embed`, :func:`xclay.open_embeddings`) or a
        :class:`~xclay.batch.chips.ChipGrid` over a datacube.
    """
    if isinstance(target, ChipGrid):
        affine = target.source.affine
        return ChipWindows(
            affine,
            target.crs,
            (int(target.source.shape[0]), int(target.source.shape[1])),
            target.spec.chip_size,
            target.row_offsets,
            target.col_offsets,
            grid=target,
        )
    from xclay.outputs.embeddings import validate_embeddings

    validate_embeddings(target)
    cube = target.attrs["datacube"]
    return ChipWindows(
        Affine.from_gdal(*cube["geotransform"]),
        cube["crs_wkt"],
        (int(cube["shape"][0]), int(cube["shape"][1])),
        int(target.attrs["config"]["grid"]["chip_size"]),
        np.asarray(target["row_off"].values, dtype=np.int64),
        np.asarray(target["col_off"].values, dtype=np.int64),
        ids=np.asarray(target["chip_id"].values),
    )


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class ChipLabels:
    """Labels joined to chips: one row per labelled chip.

    Attributes
    ----------
    chip_id
        ``[n]`` chip ids (:mod:`xclay.batch.chips`).
    row, col
        ``[n]`` int64 chip row and column: indices into the chips joined to (the
        embeddings' ``chip_y``/``chip_x``, or the chip grid).
    row_off, col_off
        ``[n]`` int64 top pixel row and left pixel column of each chip's window in the
        datacube.
    x, y
        ``[n]`` float64 chip centres in the datacube CRS.
    target
        ``[n]``: int64 class indices into ``classes`` (classification), or float64 values.
    support
        ``[n]`` float64, how strongly the rule backs each label (see the module docstring).
    classes
        Class names, in index order (classification); ``None`` for regression.
    column
        The label column (or ``"raster"``), as named in the source.
    rule
        The join rule applied.
    chip_size
        Chip edge in pixels.
    crs
        The datacube CRS, as WKT.
    source
        Where the labels came from (a path or URL, or ``"GeoDataFrame"``/``"DataArray"``).
    dropped
        Labels (points, polygons) or chips (rasters) left out, by reason.
    """

    chip_id: np.ndarray
    row: np.ndarray
    col: np.ndarray
    row_off: np.ndarray
    col_off: np.ndarray
    x: np.ndarray
    y: np.ndarray
    target: np.ndarray
    support: np.ndarray
    classes: tuple[str, ...] | None
    column: str
    rule: str
    chip_size: int
    crs: str
    source: str = ""
    dropped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.target.shape[0])

    @property
    def task(self) -> Literal["classification", "regression"]:
        return "classification" if self.classes is not None else "regression"

    def counts(self) -> dict[str, int]:
        """Labelled chips per class (classification)."""
        if self.classes is None:
            return {}
        n = np.bincount(self.target.astype(np.int64), minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, n, strict=True)}

    def select(self, keep: np.ndarray) -> ChipLabels:
        """The labels of rows where ``keep`` (``[n]`` bool) is True."""
        keep = np.asarray(keep, dtype=bool)
        per_row = ("chip_id", "row", "col", "row_off", "col_off", "x", "y", "target", "support")
        changes = {name: getattr(self, name)[keep] for name in per_row}
        return ChipLabels(
            **changes,
            classes=self.classes,
            column=self.column,
            rule=self.rule,
            chip_size=self.chip_size,
            crs=self.crs,
            source=self.source,
            dropped=dict(self.dropped),
        )

    def describe(self) -> dict[str, Any]:
        """What was joined, for model files and reports (JSON-ready)."""
        out: dict[str, Any] = {
            "source": self.source,
            "column": self.column,
            "rule": self.rule,
            "task": self.task,
            "chips": len(self),
            "dropped": dict(self.dropped),
        }
        if self.classes is not None:
            out["classes"] = list(self.classes)
            out["counts"] = self.counts()
        else:
            out["mean"] = float(np.mean(self.target)) if len(self) else None
            out["std"] = float(np.std(self.target)) if len(self) else None
        return out

    def to_dataframe(self) -> Any:
        """The labels as a pandas DataFrame (one row per chip; ``label`` holds class names)."""
        import pandas as pd

        label = (
            np.asarray(self.classes, dtype=object)[self.target]
            if self.classes is not None
            else self.target
        )
        return pd.DataFrame(
            {
                "chip_id": self.chip_id,
                "chip_row": self.row,
                "chip_col": self.col,
                "row_off": self.row_off,
                "col_off": self.col_off,
                "x": self.x,
                "y": self.y,
                "target": self.target,
                "label": label,
                "support": self.support,
            }
        )


# --------------------------------------------------------------------------- reading


def read_labels(source: Labels, *, storage_options: dict[str, Any] | None = None) -> Any:
    """Labels as users have them, read: a GeoDataFrame (vector files) or a DataArray (rasters).

    Parameters
    ----------
    source
        A GeoDataFrame or DataArray (returned as they are); or the path or URL of a
        GeoParquet (``.parquet``), GeoJSON, GeoPackage, FlatGeobuf, Shapefile (``.shp``
        with its sidecar files; a URL must be a zipped one), or a GeoTIFF.
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).

    Returns
    -------
    geopandas.GeoDataFrame or xarray.DataArray
        Vector labels with their CRS, or a one-band label raster georeferenced.
    """
    if isinstance(source, xr.DataArray):
        return source
    if _is_geodataframe(source):
        if source.crs is None:
            raise LabelError(
                "the labels' GeoDataFrame has no CRS: set it (gdf.set_crs('EPSG:4326')) so "
                "xclay knows where the labels are."
            )
        return source
    if not isinstance(source, str | os.PathLike):
        raise LabelError(
            f"labels must be a GeoDataFrame, a DataArray, or a path or URL to a file; got "
            f"{type(source).__name__}."
        )
    where = location(source, storage_options)
    suffix = where.suffix.lower()
    if suffix not in RASTER_SUFFIXES + VECTOR_SUFFIXES:
        raise LabelError(
            f"{where}: not a label file xclay reads (by its suffix {suffix!r}); give "
            "GeoParquet, GeoJSON, GeoPackage, FlatGeobuf, a Shapefile or a GeoTIFF."
        )
    if not where.is_file():
        raise FileNotFoundError(f"no label file at {where}.")
    if suffix in RASTER_SUFFIXES:
        return _read_raster(where)
    if suffix == ".shp" and not where.is_local:
        raise LabelError(
            f"{where}: a Shapefile is several files; on object storage give it zipped (.zip) "
            "or as GeoParquet."
        )
    gpd = _geopandas()
    with where.local_copy() as local:
        try:
            if suffix in (".parquet", ".geoparquet"):
                frame = gpd.read_parquet(local)
            else:
                frame = gpd.read_file(local)
        except Exception as err:  # pyarrow, pyogrio: a file they cannot read
            raise LabelError(f"{where}: cannot read it as labels: {_first_line(err)}") from err
    if frame.crs is None:
        raise LabelError(
            f"{where}: the labels have no CRS (a Shapefile without its .prj?); write them "
            "with one so xclay knows where they are."
        )
    return frame


def _read_raster(where: Any) -> xr.DataArray:
    try:
        import rioxarray
    except ImportError as err:
        raise MissingDependencyError(
            "label rasters need rioxarray: pip install 'xclay[io]'."
        ) from err
    with where.local_copy() as local:
        try:
            opened: Any = rioxarray.open_rasterio(local, masked=False)
            opened = opened.load()
        except Exception as err:  # rasterio: not a raster it reads
            raise LabelError(f"{where}: cannot read it as a raster: {_first_line(err)}") from err
    assert isinstance(opened, xr.DataArray)
    if opened.rio.crs is None:
        raise LabelError(f"{where}: the label raster has no CRS; write it with one.")
    return opened


def _is_geodataframe(value: object) -> bool:
    return type(value).__name__ == "GeoDataFrame" and hasattr(value, "geometry")


def _geopandas() -> Any:
    try:
        import geopandas
    except ImportError as err:
        raise MissingDependencyError(
            "vector labels need geopandas: pip install 'xclay[explore]'."
        ) from err
    return geopandas


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------- joining


def join_labels(
    target: xr.Dataset | ChipGrid,
    labels: Labels,
    *,
    column: str | None = None,
    rule: JoinRule = "auto",
    task: Task = "auto",
    min_cover: float = 0.5,
    classes: Sequence[str] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> ChipLabels:
    """Join labels to chips by a stated rule (module docstring); each keeps its chip id.

    Parameters
    ----------
    target
        The chips: an embeddings Dataset (its chips and their ids) or a chip grid over a
        datacube (:class:`~xclay.batch.chips.ChipGrid`).
    labels
        Points or polygons (a GeoDataFrame, or a GeoParquet, GeoJSON, GeoPackage,
        FlatGeobuf or Shapefile), or a label raster (a DataArray or a GeoTIFF), in any
        CRS (:func:`read_labels`).
    column
        The label column of vector labels (required for them); ignored for rasters.
    rule
        ``"auto"`` (points: ``"point"``; polygons: ``"cover"``; rasters: ``"majority"``
        for classes, ``"mean"`` for values), or one of them.
    task
        ``"auto"``: floats are values (regression), anything else classes; or say which.
    min_cover
        For polygons and rasters: the fraction (0-1] of a chip's window the winning class
        (polygons) or the labelled pixels (rasters) must cover; default 0.5.
    classes
        The class names in index order, to keep indices stable across label sets (a label
        not among them is a :class:`~xclay.errors.LabelError`); default: the sorted
        classes found.
    storage_options
        Settings for object storage when ``labels`` is a URL.

    Returns
    -------
    ChipLabels
        One row per labelled chip: chip id, grid position, window, centre, target and
        support, with the classes and the rule.
    """
    if rule not in get_args(JoinRule):
        raise LabelError(f"rule must be one of {get_args(JoinRule)}, got {rule!r}.")
    if task not in get_args(Task):
        raise LabelError(f"task must be one of {get_args(Task)}, got {task!r}.")
    if not 0.0 < float(min_cover) <= 1.0:
        raise LabelError(f"min_cover must be within (0, 1], got {min_cover!r}.")
    windows = chip_windows_of(target)
    source = labels if isinstance(labels, str | os.PathLike) else type(labels).__name__
    read = read_labels(labels, storage_options=storage_options)
    if isinstance(read, xr.DataArray):
        joined = _join_raster(windows, read, rule, task, float(min_cover), classes)
    else:
        joined = _join_vector(windows, read, column, rule, task, float(min_cover), classes)
    result = _finish(windows, joined, str(source))
    if not len(result):
        raise LabelError(
            f"no label falls on a chip ({_dropped_text(result.dropped)}): check that the labels "
            "lie over the datacube (their CRS, the column) and min_cover."
        )
    log.info("joined %d chips by %s (%s)", len(result), result.rule, result.dropped)
    return result


@dataclass
class _Joined:
    """Rows before ids and centres are attached."""

    i: np.ndarray
    j: np.ndarray
    target: np.ndarray
    support: np.ndarray
    classes: tuple[str, ...] | None
    column: str
    rule: str
    dropped: dict[str, int]


def _finish(windows: ChipWindows, joined: _Joined, source: str) -> ChipLabels:
    i, j = joined.i.astype(np.int64), joined.j.astype(np.int64)
    x, y = windows.centres(i, j)
    crs = windows.crs if isinstance(windows.crs, str) else windows.crs.to_wkt()
    return ChipLabels(
        chip_id=windows.chip_ids(i, j),
        row=i,
        col=j,
        row_off=windows.rows[i].astype(np.int64),
        col_off=windows.cols[j].astype(np.int64),
        x=x,
        y=y,
        target=joined.target,
        support=joined.support.astype(np.float64),
        classes=joined.classes,
        column=joined.column,
        rule=joined.rule,
        chip_size=windows.size,
        crs=crs,
        source=source,
        dropped=joined.dropped,
    )


def _dropped_text(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in dropped.items() if n) or "none read"


def _classes_of(
    values: np.ndarray, given: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices of ``values`` (any dtype) and the class names, in order."""
    names = np.array([_class_name(v) for v in values.tolist()], dtype=object)
    if given is not None:
        order = tuple(str(c) for c in given)
        unknown = sorted(set(names.tolist()) - set(order))
        if unknown:
            raise LabelError(f"labels of classes {unknown[:5]} are not among the classes {order}.")
    else:
        found = np.unique(values)
        order = tuple(_class_name(v) for v in found.tolist())
    index = {name: k for k, name in enumerate(order)}
    return np.array([index[n] for n in names.tolist()], dtype=np.int64), order


def _class_name(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_regression(values: np.ndarray, task: Task) -> bool:
    if task != "auto":
        return task == "regression"
    return bool(np.asarray(values).dtype.kind == "f")


def _join_vector(
    windows: ChipWindows,
    frame: gpd.GeoDataFrame,
    column: str | None,
    rule: JoinRule,
    task: Task,
    min_cover: float,
    given: Sequence[str] | None,
) -> _Joined:
    import shapely

    if column is None:
        raise LabelError(
            "vector labels need the column holding the class or value (--column NAME, "
            f"or column=NAME); they have {[c for c in frame.columns if c != frame.geometry.name]}."
        )
    if column not in frame.columns:
        raise LabelError(
            f"the labels have no column {column!r}; they have "
            f"{[c for c in frame.columns if c != frame.geometry.name]}."
        )
    missing = frame[column].isna().to_numpy() | frame.geometry.isna().to_numpy()
    frame = frame.loc[~missing]
    frame = frame.loc[~frame.geometry.is_empty]
    dropped = {"without a label or geometry": int(missing.sum())}
    if not len(frame):
        return _empty(column, rule if rule != "auto" else "point", dropped)
    native = frame.to_crs(windows.crs)
    kinds = set(shapely.get_type_id(native.geometry.values).tolist())
    points = kinds <= {0, 4}  # Point, MultiPoint
    polygons = kinds <= {3, 6}  # Polygon, MultiPolygon
    if not (points or polygons):
        raise LabelError(
            "vector labels must be all points or all polygons; these mix geometry types "
            f"{sorted(kinds)} (shapely type ids)."
        )
    chosen = rule if rule != "auto" else ("point" if points else "cover")
    if chosen == "point" and not points:
        raise LabelError("rule 'point' needs point labels; these are polygons (rule 'cover').")
    if chosen == "cover" and not polygons:
        raise LabelError("rule 'cover' needs polygon labels; these are points (rule 'point').")
    if chosen not in ("point", "cover"):
        raise LabelError(
            f"rule {chosen!r} is for label rasters; vector labels join by 'point' or 'cover'."
        )
    values = native[column].to_numpy()
    regression = _is_regression(values, task)
    if regression and np.asarray(values).dtype.kind not in "fiub":
        raise LabelError(f"column {column!r} holds text; a regression needs numbers.")
    if chosen == "point":
        return _join_points(windows, native, values, regression, given, column, dropped)
    return _join_polygons(windows, native, values, regression, given, column, min_cover, dropped)


def _empty(column: str, rule: str, dropped: dict[str, int]) -> _Joined:
    none = np.zeros(0, dtype=np.int64)
    return _Joined(none, none, none, np.zeros(0), None, column, rule, dropped)


def _nearest_chip(offsets: np.ndarray, pixel: np.ndarray, size: int) -> np.ndarray:
    """Index of the chip whose window ``[off, off + size)`` holds ``pixel`` and whose centre
    is nearest it; -1 where none holds it."""
    centres = offsets + size / 2
    k = np.clip(np.searchsorted(centres, pixel), 1, max(1, len(centres) - 1))
    if len(centres) == 1:
        k = np.zeros_like(k)
    else:
        left = np.abs(pixel - centres[k - 1]) <= np.abs(pixel - centres[k])
        k = np.where(left, k - 1, k)
    inside = (pixel >= offsets[k]) & (pixel < offsets[k] + size)
    return np.where(inside, k, -1)


def _join_points(
    windows: ChipWindows,
    native: gpd.GeoDataFrame,
    values: np.ndarray,
    regression: bool,
    given: Sequence[str] | None,
    column: str,
    dropped: dict[str, int],
) -> _Joined:
    import shapely

    parts = native.geometry.explode(index_parts=False)  # a MultiPoint: each of its points
    label_of = parts.index.to_numpy()
    position = {label: k for k, label in enumerate(native.index.tolist())}
    rows_of = np.array([position[label] for label in label_of.tolist()], dtype=np.int64)
    xy = shapely.get_coordinates(parts.values)
    inverse = ~windows.affine
    col_px, row_px = inverse @ (xy[:, 0], xy[:, 1])
    i = _nearest_chip(windows.rows.astype(np.float64), np.asarray(row_px), windows.size)
    j = _nearest_chip(windows.cols.astype(np.float64), np.asarray(col_px), windows.size)
    inside = (i >= 0) & (j >= 0)
    dropped["outside the chips"] = int((~inside).sum())
    i, j, rows_of = i[inside], j[inside], rows_of[inside]
    if not inside.any():
        return _empty(column, "point", dropped)
    point_values = values[rows_of]
    if regression:
        target = point_values.astype(np.float64)
        classes = None
    else:
        target, classes = _classes_of(point_values, given)
    return _aggregate_points(i, j, target, regression, classes, column, dropped, len(windows.cols))


def _aggregate_points(
    i: np.ndarray,
    j: np.ndarray,
    target: np.ndarray,
    regression: bool,
    classes: tuple[str, ...] | None,
    column: str,
    dropped: dict[str, int],
    n_cols: int,
) -> _Joined:
    key = i.astype(np.int64) * n_cols + j
    chips, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    out: np.ndarray
    if regression:
        sums = np.bincount(inverse, weights=target, minlength=len(chips))
        out = sums / counts
        support = np.ones(len(chips))
    else:
        assert classes is not None
        k = len(classes)
        votes = np.bincount(inverse * k + target, minlength=len(chips) * k).reshape(-1, k)
        out = votes.argmax(axis=1).astype(np.int64)  # ties: the first class
        support = votes.max(axis=1) / counts
    dropped["sharing a chip with another point"] = int(len(key) - len(chips))
    return _Joined(chips // n_cols, chips % n_cols, out, support, classes, column, "point", dropped)


def _chip_range(offsets: np.ndarray, size: int, low: float, high: float) -> tuple[int, int]:
    """Chips ``[a, b)`` whose windows ``[off, off + size)`` meet pixels ``[low, high)``."""
    a = int(np.searchsorted(offsets + size, low, side="right"))
    b = int(np.searchsorted(offsets, high, side="left"))
    return a, max(a, b)


def _join_polygons(
    windows: ChipWindows,
    native: gpd.GeoDataFrame,
    values: np.ndarray,
    regression: bool,
    given: Sequence[str] | None,
    column: str,
    min_cover: float,
    dropped: dict[str, int],
) -> _Joined:
    import shapely

    if regression:
        shapes = native.geometry.values
        target_of = values.astype(np.float64)
        classes = None
    else:
        codes, classes = _classes_of(values, given)
        # Polygons of one class dissolved: where they overlap, the area counts once.
        dissolved = [
            shapely.union_all(native.geometry.values[codes == k]) for k in range(len(classes))
        ]
        shapes = np.array(dissolved, dtype=object)
        target_of = np.arange(len(classes), dtype=np.float64)
    a = windows.affine
    inverse = ~a
    size = windows.size
    area = (size * a.a) * (size * a.e)
    chip_area = abs(area)
    rows_f, cols_f = windows.rows.astype(np.float64), windows.cols.astype(np.float64)
    pieces_i, pieces_j, pieces_k, pieces_area = [], [], [], []
    outside = 0
    for k, shape in enumerate(shapes):
        if shape is None or shape.is_empty:
            continue
        minx, miny, maxx, maxy = shape.bounds
        c0, r0 = inverse @ (minx, maxy)
        c1, r1 = inverse @ (maxx, miny)
        ia, ib = _chip_range(rows_f, size, min(r0, r1), max(r0, r1))
        ja, jb = _chip_range(cols_f, size, min(c0, c1), max(c0, c1))
        if ia == ib or ja == jb:
            outside += 1
            continue
        grid_i, grid_j = np.meshgrid(np.arange(ia, ib), np.arange(ja, jb), indexing="ij")
        ii, jj = grid_i.ravel(), grid_j.ravel()
        x0 = a.c + a.a * cols_f[jj]
        y0 = a.f + a.e * rows_f[ii]
        x1, y1 = x0 + a.a * size, y0 + a.e * size
        boxes = shapely.box(
            np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)
        )
        covered = shapely.area(shapely.intersection(boxes, shape)) / chip_area
        meets = covered > 0
        pieces_i.append(ii[meets])
        pieces_j.append(jj[meets])
        pieces_k.append(np.full(int(meets.sum()), k))
        pieces_area.append(covered[meets])
    dropped["outside the chips"] = outside
    if not pieces_i:
        return _empty(column, "cover", dropped)
    i, j = np.concatenate(pieces_i), np.concatenate(pieces_j)
    kk, cover = np.concatenate(pieces_k), np.concatenate(pieces_area)
    n_cols = len(windows.cols)
    key = i.astype(np.int64) * n_cols + j
    chips, inv = np.unique(key, return_inverse=True)
    if regression:
        total = np.minimum(np.bincount(inv, weights=cover, minlength=len(chips)), 1.0)
        weighted = np.bincount(inv, weights=cover * target_of[kk], minlength=len(chips))
        sums = np.bincount(inv, weights=cover, minlength=len(chips))
        value = weighted / np.maximum(sums, 1e-300)
        keep = total >= min_cover
        out: np.ndarray = value[keep]
        support = total[keep]
    else:
        assert classes is not None
        n = len(classes)
        per_class = np.bincount(inv * n + kk, weights=cover, minlength=len(chips) * n)
        per_class = np.minimum(per_class.reshape(-1, n), 1.0)
        best = per_class.argmax(axis=1)
        top = per_class.max(axis=1)
        keep = top >= min_cover
        out = best[keep].astype(np.int64)
        support = top[keep]
    dropped["chips covered less than min_cover"] = int((~keep).sum())
    chips = chips[keep]
    return _Joined(chips // n_cols, chips % n_cols, out, support, classes, column, "cover", dropped)


def _join_raster(
    windows: ChipWindows,
    raster: xr.DataArray,
    rule: JoinRule,
    task: Task,
    min_cover: float,
    given: Sequence[str] | None,
) -> _Joined:
    band = raster.squeeze(drop=True)
    if band.ndim != 2:
        raise LabelError(f"a label raster must have one band; this one has dims {raster.dims}.")
    regression = _is_regression(np.asarray([], dtype=band.dtype), task)
    chosen = rule if rule != "auto" else ("mean" if regression else "majority")
    if chosen not in ("majority", "mean"):
        raise LabelError(
            f"rule {chosen!r} is for vector labels; a label raster joins by 'majority' or 'mean'."
        )
    regression = chosen == "mean"
    on_grid, (pr0, pc0) = _raster_on_grid(windows, band, regression)
    size = windows.size
    rows = windows.rows - pr0
    cols = windows.cols - pc0
    ny, nx = on_grid.shape
    ii = np.flatnonzero((rows + size > 0) & (rows < ny))
    jj = np.flatnonzero((cols + size > 0) & (cols < nx))
    finite = np.isfinite(on_grid)
    classes: tuple[str, ...] | None = None
    codes = None
    if not regression:
        found = np.unique(on_grid[finite])
        if given is not None:
            classes = tuple(str(c) for c in given)
            unknown = sorted({_class_name(v) for v in found.tolist()} - set(classes))
            if unknown:
                raise LabelError(
                    f"raster classes {unknown[:5]} are not among the classes {classes}."
                )
        else:
            classes = tuple(_class_name(v) for v in found.tolist())
        index = {name: k for k, name in enumerate(classes)}
        lookup = np.array([index[_class_name(v)] for v in found.tolist()], dtype=np.int64)
        codes = np.full(on_grid.shape, -1, dtype=np.int64)
        codes[finite] = lookup[np.searchsorted(found, on_grid[finite])]
    out_i, out_j, out_t, out_s = [], [], [], []
    thin = 0
    for i in ii.tolist():
        r0, r1 = max(int(rows[i]), 0), min(int(rows[i]) + size, ny)
        for j in jj.tolist():
            c0, c1 = max(int(cols[j]), 0), min(int(cols[j]) + size, nx)
            ok = finite[r0:r1, c0:c1]
            labelled = int(ok.sum())
            if labelled < min_cover * size * size:
                thin += 1
                continue
            if regression:
                out_t.append(float(on_grid[r0:r1, c0:c1][ok].mean()))
                out_s.append(labelled / (size * size))
            else:
                assert codes is not None and classes is not None
                votes = np.bincount(codes[r0:r1, c0:c1][ok], minlength=len(classes))
                out_t.append(int(votes.argmax()))
                out_s.append(float(votes.max()) / labelled)
            out_i.append(i)
            out_j.append(j)
    dropped = {"chips labelled less than min_cover": thin}
    return _Joined(
        np.asarray(out_i, dtype=np.int64),
        np.asarray(out_j, dtype=np.int64),
        np.asarray(out_t, dtype=np.float64 if regression else np.int64),
        np.asarray(out_s, dtype=np.float64),
        classes,
        "raster",
        chosen,
        dropped,
    )


def _raster_on_grid(
    windows: ChipWindows, band: xr.DataArray, regression: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """The label raster on the datacube's pixel grid, over the chips it can reach: float64,
    NaN where unlabelled, and its ``(row, col)`` origin in the datacube's pixels."""
    try:
        import odc.geo.xr  # noqa: F401  (the .odc accessor)
        from odc.geo.geobox import GeoBox
    except ImportError as err:  # pragma: no cover - odc-geo is a core dependency
        raise MissingDependencyError("label rasters need odc-geo.") from err
    source_box = band.odc.geobox
    if source_box is None or source_box.crs is None:
        raise LabelError("the label raster is not georeferenced (no CRS or transform).")
    nodata = band.odc.nodata
    values = band.astype(np.float64)
    if nodata is not None and np.isfinite(nodata):
        values = values.where(band != nodata)
    target = GeoBox(windows.shape, windows.affine, windows.crs)
    # Only the part of the datacube the raster covers (a continent's cube stays unread).
    footprint = source_box.extent.to_crs(target.crs)
    minx, miny, maxx, maxy = footprint.boundingbox
    inverse = ~windows.affine
    cs, rs = inverse @ (np.array([minx, maxx, minx, maxx]), np.array([miny, miny, maxy, maxy]))
    r0 = max(0, int(np.floor(np.min(rs))))
    r1 = min(windows.shape[0], int(np.ceil(np.max(rs))))
    c0 = max(0, int(np.floor(np.min(cs))))
    c1 = min(windows.shape[1], int(np.ceil(np.max(cs))))
    if r0 >= r1 or c0 >= c1:
        return np.full((0, 0), np.nan), (0, 0)
    part = target[r0:r1, c0:c1]
    if regression:
        finer = abs(source_box.resolution.x) < abs(part.resolution.x)
        resampling = "average" if finer else "bilinear"
    else:
        resampling = "nearest"
    on_grid = values.odc.reproject(part, resampling=resampling, dst_nodata=np.nan).values
    return np.asarray(on_grid, dtype=np.float64), (r0, c0)
