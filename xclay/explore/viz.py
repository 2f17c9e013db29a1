"""Pictures of cubes and embeddings: true colour, PCA false colour, similarity maps,
the demo preview. The ``plot_*`` functions draw with matplotlib
(``pip install "xclay[explore]"``) in the datacube's CRS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from affine import Affine

from xclay.datacube import datacube_geobox, nodata_value
from xclay.errors import MissingDependencyError
from xclay.outputs.thumbnails import rgb_bands

__all__ = [
    "pca_colour",
    "plot_pca",
    "plot_side_by_side",
    "plot_similarity",
    "plot_true_colour",
    "save_preview",
    "true_colour",
]


def true_colour(cube: xr.Dataset, *, time: int = 0, max_size: int = 1024) -> np.ndarray:
    """RGBA ``[y, x, 4]`` uint8 true-colour image, 2-98 % stretched, nodata transparent.

    Parameters
    ----------
    cube
        Datacube with ``pixels`` ``[time, band, y, x]`` and ``band`` and ``wavelength``
        coordinates; red, green and blue are the platform's, else the bands nearest
        665, 560 and 490 nm.
    time
        Position (not a date) of the time step to show; default the first.
    max_size
        Longest side of the image in pixels: every ``step``-th pixel is read, the
        smallest ``step`` that keeps both sides within it.
    """
    bands = _rgb_bands(cube)
    pixels = cube["pixels"]
    ny, nx = pixels.sizes["y"], pixels.sizes["x"]
    step = max(1, int(np.ceil(max(ny, nx) / max_size)))
    index = [int(np.nonzero(cube["band"].values == b)[0][0]) for b in bands]
    rgb = np.stack(
        [
            np.asarray(pixels.variable[time, i, ::step, ::step].values, dtype=np.float64)
            for i in index
        ],
        axis=-1,
    )
    nodata = nodata_value(pixels)
    valid = np.isfinite(rgb).all(axis=-1)
    if nodata is not None:
        valid &= ~(rgb == nodata).any(axis=-1)
    out = np.zeros((*rgb.shape[:2], 4), dtype=np.uint8)
    if valid.any():
        lo, hi = np.percentile(rgb[valid], [2, 98], axis=0)
        scaled = np.clip((rgb - lo) / np.maximum(hi - lo, 1e-9), 0, 1)
        out[..., :3] = np.rint(255 * scaled).astype(np.uint8)
    out[..., 3] = np.where(valid, 255, 0)
    return out


def pca_colour(emb: xr.Dataset, *, time: int = 0) -> np.ndarray:
    """RGBA ``[chip_y, chip_x, 4]`` uint8: the first three principal components
    of the embeddings as red, green, blue (chips not embedded are transparent).

    Parameters
    ----------
    emb
        Embeddings Dataset (:func:`xclay.embed`); patch grids are coloured by each chip's
        mean patch vector.
    time
        Position (not a date) of the time step; the components are those of its chips
        alone. Default the first.
    """
    vectors = np.asarray(emb["embedding"].values[time], dtype=np.float64)  # [y, x, (py, px,) D]
    if vectors.ndim == 5:  # patch grids: colour each chip by its mean patch token
        vectors = vectors.mean(axis=(2, 3))
    valid = np.isfinite(vectors).all(axis=-1)
    out = np.zeros((*vectors.shape[:2], 4), dtype=np.uint8)
    if valid.sum() < 2:
        return out
    x = vectors[valid]
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = x @ vt[:3].T
    if comps.shape[1] < 3:
        comps = np.pad(comps, ((0, 0), (0, 3 - comps.shape[1])))
    lo, hi = np.percentile(comps, [2, 98], axis=0)
    scaled = np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1)
    rgb = np.zeros((*vectors.shape[:2], 3))
    rgb[valid] = scaled
    out[..., :3] = np.rint(255 * rgb).astype(np.uint8)
    out[..., 3] = np.where(valid, 255, 0)
    return out


def save_preview(
    cube: xr.Dataset, emb: xr.Dataset, path: str | os.PathLike[str], *, height: int = 512
) -> Path:
    """PNG: the true-colour composite beside a PCA false-colour image of the embeddings.

    Both panels cover the same ground: the embedding grid is drawn over the
    part of the cube its chips cover. Both show the first time step.

    Parameters
    ----------
    cube
        Datacube with ``pixels`` ``[time, band, y, x]`` and ``band`` and ``wavelength``
        coordinates, drawn as :func:`true_colour` draws it.
    emb
        Embeddings Dataset of that cube (:func:`xclay.embed`), drawn as
        :func:`pca_colour` draws it; chips not embedded are left transparent.
    path
        Where to write the PNG; missing parent folders are created.
    height
        Height of the image in pixels; each panel keeps the cube's aspect ratio, and
        an 8-pixel white gap separates them. Default 512.

    Returns
    -------
    pathlib.Path
        ``path``, written.
    """
    from PIL import Image

    rgb = true_colour(cube, max_size=max(height, 256) * 2)
    pca = pca_colour(emb)
    left = Image.fromarray(rgb, mode="RGBA").resize(
        (round(height * rgb.shape[1] / rgb.shape[0]), height), Image.Resampling.BILINEAR
    )
    # Chips cover row_off..row_off+chip of the cube: place the PCA cells there.
    chip = int(emb.attrs["config"]["grid"]["chip_size"])
    scale = height / cube.sizes["y"]
    right = Image.new("RGBA", left.size, (0, 0, 0, 0))
    cells = Image.fromarray(pca, mode="RGBA")
    row0, col0 = int(emb["row_off"].values[0]), int(emb["col_off"].values[0])
    stride = int(emb.attrs["config"]["grid"]["stride"] or chip)
    span_y = (pca.shape[0] - 1) * stride + chip
    span_x = (pca.shape[1] - 1) * stride + chip
    cells = cells.resize(
        (max(1, round(span_x * scale)), max(1, round(span_y * scale))),
        Image.Resampling.NEAREST,
    )
    right.alpha_composite(cells, (round(col0 * scale), round(row0 * scale)))
    gap = 8
    canvas = Image.new("RGBA", (left.width * 2 + gap, height), (255, 255, 255, 255))
    canvas.alpha_composite(left, (0, 0))
    canvas.alpha_composite(right, (left.width + gap, 0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def _rgb_bands(cube: xr.Dataset) -> list[str]:
    return rgb_bands(
        [str(b) for b in cube["band"].values],
        [float(w) for w in cube["wavelength"].values],
        cube.attrs.get("platform"),
    )


# --------------------------------------------------------------------------- matplotlib


def plot_true_colour(cube: xr.Dataset, *, time: int = 0, ax: Any = None) -> Any:
    """Draw the datacube in true colour on ``ax``, in its CRS (2-98 % stretched, see
    :func:`true_colour`).

    Parameters
    ----------
    cube
        Datacube with ``pixels`` ``[time, band, y, x]`` and ``band`` and ``wavelength``
        coordinates; red, green and blue are the platform's, else the bands nearest
        665, 560 and 490 nm.
    time
        Position (not a date) of the time step to draw; default the first.
    ax
        Matplotlib axes to draw on; default None makes a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    ax = _axes(ax)
    image = true_colour(cube, time=time)
    geobox = datacube_geobox(cube)
    left, bottom, right, top = geobox.extent.boundingbox
    ax.imshow(image, extent=(left, right, bottom, top), interpolation="nearest")
    _label(ax, geobox.crs, "true colour")
    return ax


def plot_pca(emb: xr.Dataset, *, time: int = 0, ax: Any = None) -> Any:
    """Draw the embeddings' first three principal components as red, green and blue, one
    cell per chip, in the datacube's CRS (chips not embedded are left blank).

    Parameters
    ----------
    emb
        Embeddings Dataset (:func:`xclay.embed`); patch grids are coloured by each chip's
        mean patch vector.
    time
        Position (not a date) of the time step to draw; default the first.
    ax
        Matplotlib axes to draw on; default None makes a new figure.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    ax = _axes(ax)
    ax.imshow(pca_colour(emb, time=time), extent=_chip_extent(emb), interpolation="nearest")
    _label(ax, _crs(emb), f"{emb.attrs['model']['name']} embeddings: PCA false colour")
    return ax


def plot_similarity(
    emb: xr.Dataset, query: Any, *, time: int = 0, ax: Any = None, cmap: str = "magma"
) -> Any:
    """Draw every chip's cosine similarity to ``query`` as a heat map, the queried chip
    outlined. The colour scale runs from the 2nd percentile of the scores up to 1.

    Parameters
    ----------
    emb
        Embeddings Dataset (:func:`xclay.embed`); patch grids are compared by each chip's
        mean patch vector.
    query
        A chip id, a (lon, lat) point in degrees or a vector, as :func:`xclay.explore.similar`
        takes; an id or point is outlined in cyan.
    time
        Position (not a date) of the time step whose chips are drawn; default the first.
        It does not choose the query's time: an id or point with several times is refused.
    ax
        Matplotlib axes to draw on; default None makes a new figure.
    cmap
        Matplotlib colour map name; default ``"magma"``.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on (with a colour bar beside them).
    """
    from xclay.explore.search import SimilarityIndex

    ax = _axes(ax)
    index = SimilarityIndex.from_dataset(emb)
    scores = index.scores(query)
    grid = np.full((emb.sizes["chip_y"], emb.sizes["chip_x"]), np.nan)
    rows = index.rows
    at = (rows["t"] == time).to_numpy()
    grid[rows["chip_row"].to_numpy()[at], rows["chip_col"].to_numpy()[at]] = scores[at]
    extent = _chip_extent(emb)
    # The scale spans what the chips score (embeddings of non-negative features are never
    # far apart), up to 1: the query itself.
    low = float(np.nanpercentile(grid, 2)) if np.isfinite(grid).any() else -1.0
    shown = ax.imshow(grid, extent=extent, cmap=cmap, vmin=low, vmax=1, interpolation="nearest")
    ax.figure.colorbar(shown, ax=ax, label="cosine similarity", shrink=0.8)
    if isinstance(query, str) or np.asarray(query).shape == (2,):
        k = index.locate(query)
        x = float(emb["chip_x"].values[rows["chip_col"][k]])
        y = float(emb["chip_y"].values[rows["chip_row"][k]])
        ax.plot([x], [y], marker="s", markersize=12, markerfacecolor="none", color="cyan")
    _label(ax, _crs(emb), "similarity to the query")
    return ax


def plot_side_by_side(cube: xr.Dataset, emb: xr.Dataset, *, time: int = 0) -> Any:
    """A figure: the true-colour datacube beside the PCA map of its embeddings, same extent.

    Parameters
    ----------
    cube
        Datacube, drawn as :func:`plot_true_colour` draws it.
    emb
        Embeddings Dataset of that cube, drawn as :func:`plot_pca` draws it.
    time
        Position (not a date) of the time step drawn in both panels; default the first.

    Returns
    -------
    matplotlib.figure.Figure
        The figure, 12 x 6 inches, its two axes sharing x and y.
    """
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 6), sharex=True, sharey=True)
    plot_true_colour(cube, time=time, ax=left)
    plot_pca(emb, time=time, ax=right)
    fig.tight_layout()
    return fig


def _axes(ax: Any) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise MissingDependencyError('plots need matplotlib: pip install "xclay[explore]"') from err
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    return ax


def _chip_extent(emb: xr.Dataset) -> tuple[float, float, float, float]:
    """Image extent (left, right, bottom, top) of the chip-centre grid: one cell per chip."""
    x = np.asarray(emb["chip_x"].values, dtype=np.float64)
    y = np.asarray(emb["chip_y"].values, dtype=np.float64)
    gt = Affine.from_gdal(
        *(float(v) for v in str(emb["spatial_ref"].attrs["GeoTransform"]).split())
    )
    dx, dy = gt.a, gt.e
    return (x[0] - dx / 2, x[-1] + dx / 2, y[-1] + dy / 2, y[0] - dy / 2)


def _crs(emb: xr.Dataset) -> Any:
    from pyproj import CRS

    return CRS.from_wkt(emb.attrs["datacube"]["crs_wkt"])


def _label(ax: Any, crs: Any, title: str) -> None:
    epsg = crs.to_epsg() if hasattr(crs, "to_epsg") else getattr(crs, "epsg", None)
    name = f"EPSG:{epsg}" if epsg else "datacube CRS"
    ax.set_title(title)
    ax.set_xlabel(f"x ({name}, m)")
    ax.set_ylabel(f"y ({name}, m)")
    ax.set_aspect("equal")
    ax.ticklabel_format(useOffset=False, style="plain")
