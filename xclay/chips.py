"""The chip grid: windows over a datacube, their footprints, centres and ids.

A chip is a square window of ``chip_size`` pixels (all bands) whose top-left
pixel is at ``(row_off, col_off) = (i * stride, j * stride)`` in the
datacube grid. Edges are explicit: ``"drop"`` keeps only windows that lie
inside the raster; ``"pad"`` adds windows that cover the last rows/columns,
their outside part filled with nodata (and counted in ``nodata_fraction``).

Footprints are computed from the datacube's exact affine transform, in the
native CRS and in WGS84 (the four window corners transformed with
``always_xy``: longitude first in every geometry, latitude first only where a
model asks for (lat, lon)).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from affine import Affine
from odc.geo import CRS
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from xclay.errors import DatacubeError

__all__ = ["ChipGrid", "ChipGridSpec", "Edges", "crs_tag", "window_corners"]

Edges = Literal["drop", "pad"]


@dataclass(frozen=True)
class ChipGridSpec:
    """How to cut a datacube into chips.

    Parameters
    ----------
    chip_size
        Chip edge in pixels.
    stride
        Step between chip origins in pixels (``None``: ``chip_size``, no overlap).
    edges
        ``"drop"``: only whole windows inside the raster. ``"pad"``: also the
        windows that reach past the last row/column, padded with nodata.
    """

    chip_size: int = 256
    stride: int | None = None
    edges: Edges = "drop"

    def __post_init__(self) -> None:
        if not isinstance(self.chip_size, int | np.integer) or self.chip_size < 1:
            raise DatacubeError(f"chip_size must be a positive integer, got {self.chip_size!r}.")
        if self.stride is not None and (
            not isinstance(self.stride, int | np.integer) or self.stride < 1
        ):
            raise DatacubeError(f"stride must be a positive integer or None, got {self.stride!r}.")
        if self.edges not in ("drop", "pad"):
            raise DatacubeError(f"edges must be 'drop' or 'pad', got {self.edges!r}.")

    @property
    def step(self) -> int:
        return int(self.stride if self.stride is not None else self.chip_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChipGridSpec:
        return cls(**data)


@dataclass(frozen=True)
class ChipGrid:
    """Chip windows over a datacube's pixel grid (``source``)."""

    spec: ChipGridSpec
    source: GeoBox

    @classmethod
    def from_geobox(cls, source: GeoBox, spec: ChipGridSpec) -> ChipGrid:
        grid = cls(spec, source)
        if grid.rows == 0 or grid.cols == 0:
            ny, nx = source.shape
            raise DatacubeError(
                f"the datacube ({ny} x {nx} px) is smaller than one chip ({spec.chip_size} px) "
                f"with edges='drop'; use edges='pad' or a chip_size of at most {min(ny, nx)}."
            )
        return grid

    # -- layout ----------------------------------------------------------------

    @property
    def rows(self) -> int:
        return _count(self.source.shape[0], self.spec.chip_size, self.spec.step, self.spec.edges)

    @property
    def cols(self) -> int:
        return _count(self.source.shape[1], self.spec.chip_size, self.spec.step, self.spec.edges)

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    @property
    def row_offsets(self) -> np.ndarray:
        """Top pixel row of each chip row, shape ``(rows,)``."""
        return np.arange(self.rows, dtype=np.int64) * self.spec.step

    @property
    def col_offsets(self) -> np.ndarray:
        """Left pixel column of each chip column, shape ``(cols,)``."""
        return np.arange(self.cols, dtype=np.int64) * self.spec.step

    # -- geometry --------------------------------------------------------------

    @property
    def crs(self) -> CRS:
        crs = self.source.crs
        if crs is None:
            raise DatacubeError("the datacube grid has no CRS.")
        return crs

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Chip centres in the native CRS: ``(y (rows,), x (cols,))``."""
        half = self.spec.chip_size / 2
        t = self.source.affine
        x = t.c + t.a * (self.col_offsets + half)
        y = t.f + t.e * (self.row_offsets + half)
        return y, x

    def centres_lonlat(self) -> tuple[np.ndarray, np.ndarray]:
        """Chip centres in WGS84 degrees: ``(lon, lat)``, each ``(rows, cols)``."""
        y, x = self.centres()
        xx, yy = np.meshgrid(x, y)
        return _to_lonlat(self.crs, xx, yy)

    def corners_native(self) -> np.ndarray:
        """Window corners in the native CRS, ``(rows, cols, 5, 2)`` closed rings of (x, y)."""
        rr, cc = np.meshgrid(self.row_offsets, self.col_offsets, indexing="ij")
        return window_corners(self.source.affine, rr, cc, self.spec.chip_size)

    def corners_lonlat(self) -> np.ndarray:
        """Window corners in WGS84, ``(rows, cols, 5, 2)`` closed rings of (lon, lat)."""
        native = self.corners_native()
        lon, lat = _to_lonlat(self.crs, native[..., 0], native[..., 1])
        return np.stack([lon, lat], axis=-1)

    def geobox(self) -> GeoBox:
        """The chip grid as a raster: one cell per chip, centred on the chip centre.

        Cell size is ``stride x pixel size`` (the chip size when chips do not overlap).
        """
        t = self.source.affine
        step, half = self.spec.step, self.spec.chip_size / 2
        origin = t @ (half - step / 2, half - step / 2)
        affine = Affine(t.a * step, 0.0, origin[0], 0.0, t.e * step, origin[1])
        return GeoBox((self.rows, self.cols), affine, self.crs)

    def chip_ids(self) -> np.ndarray:
        """Deterministic chip ids, ``(rows, cols)`` of str.

        ``{crs}_{size}px_{res}m_{x}_{y}``: the CRS, the chip size, the pixel
        size and the native coordinates of the window's top-left corner. The
        same window of the same grid gets the same id in every run.
        """
        t = self.source.affine
        tag = crs_tag(self.crs)
        res = _fmt(abs(t.a))
        xs = [_fmt(v) for v in t.c + t.a * self.col_offsets]
        ys = [_fmt(v) for v in t.f + t.e * self.row_offsets]
        size = self.spec.chip_size
        ids = [[f"{tag}_{size}px_{res}m_{x}_{y}" for x in xs] for y in ys]
        return np.array(ids, dtype=object).reshape(self.rows, self.cols)


def window_corners(
    transform: Affine, row_off: np.ndarray, col_off: np.ndarray, size: int
) -> np.ndarray:
    """Corners of pixel windows as closed rings ``(..., 5, 2)`` of (x, y).

    Order: top-left, bottom-left, bottom-right, top-right, top-left, which is
    counter-clockwise on the map for a north-up grid (the GeoJSON right-hand rule).
    """
    cols = np.stack([col_off, col_off, col_off + size, col_off + size, col_off], axis=-1)
    rows = np.stack([row_off, row_off + size, row_off + size, row_off, row_off], axis=-1)
    x = transform.c + transform.a * cols + transform.b * rows
    y = transform.f + transform.d * cols + transform.e * rows
    return np.stack([x, y], axis=-1).astype(np.float64)


def crs_tag(crs: CRS) -> str:
    """A short, stable name for a CRS: ``EPSG32720``, or a hash of its WKT."""
    epsg = crs.epsg
    if epsg is not None:
        return f"EPSG{epsg}"
    return "CRS" + hashlib.sha256(crs.to_wkt().encode()).hexdigest()[:10]


def _to_lonlat(crs: CRS, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    transformer = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True)
    lon, lat = transformer.transform(
        np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    )
    return np.asarray(lon), np.asarray(lat)


def _count(n: int, size: int, step: int, edges: Edges) -> int:
    if edges == "drop":
        return 0 if n < size else (n - size) // step + 1
    return 1 + max(0, -(-(n - size) // step))


def _fmt(value: float) -> str:
    """Coordinates to centimetres, without trailing zeros: 288776.25, 500000."""
    text = f"{round(float(value), 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
