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

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from affine import Affine
from odc.geo import CRS
from odc.geo.geobox import GeoBox

from xclay.datacube.geometry import crs_tag, to_lonlat
from xclay.errors import DatacubeError
from xclay.settings import Setting, check_fields, declared

__all__ = [
    "CHIP_SIZE",
    "EDGES",
    "STRIDE",
    "ChipGrid",
    "ChipGridSpec",
    "Edges",
    "Span",
    "window_corners",
]

Edges = Literal["drop", "pad"]
# Chip rows or columns of a block, a half-open range (None: all of them).
Span = tuple[int, int] | None

# The chip grid's settings, declared once (xclay.settings): embed(), a run spec's grid:
# section and the CLI's flags all read these.
CHIP_SIZE = Setting(256, "chip edge", unit="px", positive=True, metavar="PX")
STRIDE = Setting(None, "pixels between chip origins; none: the chip size, no overlap",
                 unit="px", positive=True, metavar="PX")  # fmt: skip
EDGES = Setting(
    "drop",
    "drop: only whole chips inside the grid; pad: also those past its last rows and "
    "columns, padded with nodata",
)


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

    chip_size: int = declared(CHIP_SIZE)
    stride: int | None = declared(STRIDE)
    edges: Edges = declared(EDGES)

    def __post_init__(self) -> None:
        for name in ("chip_size", "stride"):  # NumPy integers count as integers here
            value = getattr(self, name)
            if isinstance(value, np.integer):
                object.__setattr__(self, name, int(value))
        check_fields(self)

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
    """Chip windows over a datacube's pixel grid (``source``).

    :meth:`from_geobox` makes one and refuses a grid that holds no chip.

    Parameters
    ----------
    spec
        How to cut the grid into chips: chip size, stride and edge rule.
    source
        The datacube's pixel grid: its shape in pixels, affine transform and CRS.
    """

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
    def left_out(self) -> tuple[int, int]:
        """Pixel rows and columns at the bottom and right edges that no chip covers
        (``edges="drop"`` leaves out what is short of a whole chip; ``"pad"`` nothing)."""
        size, step = self.spec.chip_size, self.spec.step

        def uncovered(n: int, count: int) -> int:
            return 0 if self.spec.edges == "pad" else n - ((count - 1) * step + size)

        ny, nx = self.source.shape
        return uncovered(ny, self.rows), uncovered(nx, self.cols)

    def describe_left_out(self) -> str | None:
        """A sentence for run plans when edges='drop' leaves pixels out; None when it does not."""
        rows, cols = self.left_out
        if not rows and not cols:
            return None
        parts = [f"{n} px {what}" for n, what in ((cols, "columns"), (rows, "rows")) if n]
        return (
            f"edges='drop' leaves out the last {' and '.join(parts)} of the datacube (short of "
            "a whole chip); edges='pad' embeds them, padded with nodata"
        )

    @property
    def row_offsets(self) -> np.ndarray:
        """Top pixel row of each chip row, shape ``(rows,)``."""
        return np.arange(self.rows, dtype=np.int64) * self.spec.step

    @property
    def col_offsets(self) -> np.ndarray:
        """Left pixel column of each chip column, shape ``(cols,)``."""
        return np.arange(self.cols, dtype=np.int64) * self.spec.step

    # -- any block of the grid, from arithmetic alone --------------------------
    #
    # Every method below takes the chip rows and columns of a block (half-open
    # ranges; None: all) and costs what the block costs, never the whole grid:
    # a region of a continental run computes its own windows, ids and footprints.

    def _span(self, rows: Span, cols: Span) -> tuple[tuple[int, int], tuple[int, int]]:
        r = (0, self.rows) if rows is None else (int(rows[0]), int(rows[1]))
        c = (0, self.cols) if cols is None else (int(cols[0]), int(cols[1]))
        if not (0 <= r[0] <= r[1] <= self.rows and 0 <= c[0] <= c[1] <= self.cols):
            raise DatacubeError(
                f"chip rows {r} / cols {c} are outside the {self.rows} x {self.cols} chip grid."
            )
        return r, c

    def offsets(self, rows: Span = None, cols: Span = None) -> tuple[np.ndarray, np.ndarray]:
        """Top pixel rows ``(n_rows,)`` and left pixel columns ``(n_cols,)`` of a block's chips."""
        (r0, r1), (c0, c1) = self._span(rows, cols)
        step = self.spec.step
        return (
            np.arange(r0, r1, dtype=np.int64) * step,
            np.arange(c0, c1, dtype=np.int64) * step,
        )

    # -- geometry --------------------------------------------------------------

    @property
    def crs(self) -> CRS:
        crs = self.source.crs
        if crs is None:
            raise DatacubeError("the datacube grid has no CRS.")
        return crs

    def centres(self, rows: Span = None, cols: Span = None) -> tuple[np.ndarray, np.ndarray]:
        """Chip centres in the native CRS: ``(y (n_rows,), x (n_cols,))``."""
        row_off, col_off = self.offsets(rows, cols)
        half = self.spec.chip_size / 2
        t = self.source.affine
        x = t.c + t.a * (col_off + half)
        y = t.f + t.e * (row_off + half)
        return y, x

    def centres_lonlat(self, rows: Span = None, cols: Span = None) -> tuple[np.ndarray, np.ndarray]:
        """Chip centres in WGS84 degrees: ``(lon, lat)``, each ``(n_rows, n_cols)``."""
        y, x = self.centres(rows, cols)
        xx, yy = np.meshgrid(x, y)
        return to_lonlat(self.crs, xx, yy)

    def lonlat_of(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """WGS84 ``(lon, lat)`` centres of chips ``(rows[k], cols[k])`` (any chips of the grid)."""
        half = self.spec.chip_size / 2
        step, t = self.spec.step, self.source.affine
        x = t.c + t.a * (np.asarray(cols, dtype=np.int64) * step + half)
        y = t.f + t.e * (np.asarray(rows, dtype=np.int64) * step + half)
        return to_lonlat(self.crs, x, y)

    def corners_native(self, rows: Span = None, cols: Span = None) -> np.ndarray:
        """Window corners in the native CRS, ``(n_rows, n_cols, 5, 2)`` closed rings of (x, y)."""
        row_off, col_off = self.offsets(rows, cols)
        rr, cc = np.meshgrid(row_off, col_off, indexing="ij")
        return window_corners(self.source.affine, rr, cc, self.spec.chip_size)

    def corners_lonlat(self, rows: Span = None, cols: Span = None) -> np.ndarray:
        """Window corners in WGS84, ``(n_rows, n_cols, 5, 2)`` closed rings of (lon, lat)."""
        native = self.corners_native(rows, cols)
        lon, lat = to_lonlat(self.crs, native[..., 0], native[..., 1])
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

    def chip_ids(self, rows: Span = None, cols: Span = None) -> np.ndarray:
        """Deterministic chip ids, ``(n_rows, n_cols)`` of str.

        ``{crs}_{size}px_{res}m_{x}_{y}``: the CRS, the chip size, the pixel
        size and the native coordinates of the window's top-left corner. The
        same window of the same grid gets the same id in every run, whichever
        block it is computed in.
        """
        row_off, col_off = self.offsets(rows, cols)
        t = self.source.affine
        res = _fmt(abs(t.a))
        prefix = f"{crs_tag(self.crs)}_{self.spec.chip_size}px_{res}m_"
        xs = np.array([f"{prefix}{_fmt(v)}_" for v in t.c + t.a * col_off], dtype=object)
        ys = np.array([_fmt(v) for v in t.f + t.e * row_off], dtype=object)
        return _outer_ids(xs, ys)


def _outer_ids(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """``out[i, j] = xs[j] + ys[i]`` as an object array of str."""
    out = np.empty((ys.size, xs.size), dtype=object)
    for i, y in enumerate(ys):
        out[i] = xs + y
    return out


def window_corners(
    transform: Affine, row_off: np.ndarray, col_off: np.ndarray, size: int
) -> np.ndarray:
    """Corners of pixel windows as closed rings ``(..., 5, 2)`` of (x, y).

    Order: top-left, bottom-left, bottom-right, top-right, top-left, which is
    counter-clockwise on the map for a north-up grid (the GeoJSON right-hand rule).

    Parameters
    ----------
    transform
        The raster's affine transform, from pixel ``(col, row)`` to native CRS ``(x, y)``.
    row_off, col_off
        Top pixel row and left pixel column of each window, integer arrays of the same
        shape ``(...)`` (one element per window).
    size
        Window edge in pixels (square windows).

    Returns
    -------
    numpy.ndarray
        ``(..., 5, 2)`` float64 closed rings of native CRS ``(x, y)``, one per window.
    """
    cols = np.stack([col_off, col_off, col_off + size, col_off + size, col_off], axis=-1)
    rows = np.stack([row_off, row_off + size, row_off + size, row_off, row_off], axis=-1)
    x = transform.c + transform.a * cols + transform.b * rows
    y = transform.f + transform.d * cols + transform.e * rows
    return np.stack([x, y], axis=-1).astype(np.float64)


def _count(n: int, size: int, step: int, edges: Edges) -> int:
    if edges == "drop":
        return 0 if n < size else (n - size) // step + 1
    return 1 + max(0, -(-(n - size) // step))


def _fmt(value: float) -> str:
    """Coordinates to centimetres, without trailing zeros: 288776.25, 500000."""
    text = f"{round(float(value), 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
