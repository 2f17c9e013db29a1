"""Linear probes: how much of a per-chip quantity an embedding predicts.

:func:`ridge_cv` fits ridge regressions from chip vectors to a target (mean
elevation, biomass, a land-cover fraction...) and reports the out-of-fold
R²: each chip is predicted by a model that never saw it, nor (with
``groups``) any chip of its spatial block, since neighbouring chips share
information a random split would leak. The ridge penalty is chosen inside
each training fold by a nested cross-validation, so the held-out folds never
inform it. NumPy only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr
from affine import Affine

from xclay.errors import DatacubeError

__all__ = ["ProbeResult", "chip_blocks", "chip_means", "ridge_cv"]

DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-6, 3, 19))


@dataclass(frozen=True)
class ProbeResult:
    """Out-of-fold R² over all chips, per fold, the penalties chosen, and the predictions.

    Attributes
    ----------
    r2
        R² of the out-of-fold predictions of all chips kept (those with a finite
        target and features); NaN when their target is constant.
    fold_r2
        R² of each fold's held-out chips, in fold order (NaN for a fold whose
        target is constant).
    alphas
        The penalty chosen in each fold by its inner cross-validation, in fold order.
    predicted
        ``[chips]`` float64 out-of-fold predictions, in the order of the input rows;
        NaN for chips left out.
    """

    r2: float
    fold_r2: tuple[float, ...]
    alphas: tuple[float, ...]
    predicted: np.ndarray


def ridge_cv(
    features: np.ndarray,
    target: np.ndarray,
    *,
    folds: int = 5,
    groups: np.ndarray | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    seed: int = 0,
) -> ProbeResult:
    """Cross-validated ridge regression ``target ~ features``.

    Parameters
    ----------
    features
        ``[chips, dims]`` (standardised on each training fold).
    target
        ``[chips]``; rows where it or any feature is not finite are left out.
    folds
        Number of folds (chips, or groups, are shuffled into them with ``seed``).
    groups
        ``[chips]`` labels kept together in one fold (e.g. :func:`chip_blocks`).
    alphas
        Candidate penalties (relative to the number of training chips), chosen
        in each training fold by an inner cross-validation over the same groups.
    seed
        Seed of the random shuffle of chips (or groups) into folds; the inner
        cross-validations use ``seed + 1``, ``seed + 2``, ...

    Returns
    -------
    ProbeResult
        ``r2`` of the out-of-fold predictions of all chips kept, ``fold_r2`` and the
        ``alphas`` chosen per fold, and ``predicted``: ``[chips]`` out-of-fold
        predictions, NaN for chips left out.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(target, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise DatacubeError(
            f"features must be [chips, dims] and target [chips]; got {x.shape}, {y.shape}."
        )
    keep = np.isfinite(y) & np.isfinite(x).all(axis=1)
    labels = np.arange(x.shape[0]) if groups is None else np.asarray(groups)
    x, y, labels = x[keep], y[keep], labels[keep]
    fold = _folds(labels, folds, seed)
    predicted = np.full(y.shape, np.nan)
    fold_r2, chosen = [], []
    for f in range(folds):
        test, train = fold == f, fold != f
        inner = _folds(labels[train], folds, seed + 1 + f)
        errors = np.zeros(len(alphas))
        for g in range(folds):
            fit, check = inner != g, inner == g
            guesses = _ridge_path(x[train][fit], y[train][fit], x[train][check], alphas)
            errors += ((guesses - y[train][check][None, :]) ** 2).sum(axis=1)
        best = int(np.argmin(errors))
        predicted[test] = _ridge_path(x[train], y[train], x[test], [alphas[best]])[0]
        fold_r2.append(_r2(y[test], predicted[test]))
        chosen.append(float(alphas[best]))
    out = np.full(keep.shape, np.nan)
    out[keep] = predicted
    return ProbeResult(_r2(y, predicted), tuple(fold_r2), tuple(chosen), out)


def _folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold number of each row: whole groups shuffled into ``folds`` near-equal folds."""
    unique = np.unique(labels)
    if folds < 2 or unique.size < folds:
        raise DatacubeError(
            f"{folds}-fold cross-validation needs at least {max(folds, 2)} chips (or groups) "
            f"with finite values; got {unique.size}."
        )
    order = np.random.default_rng(seed).permutation(unique)
    fold_of = dict(zip(order.tolist(), (np.arange(unique.size) % folds).tolist(), strict=True))
    return np.array([fold_of[g] for g in labels.tolist()])


def _ridge_path(
    x_fit: np.ndarray, y_fit: np.ndarray, x_new: np.ndarray, alphas: Sequence[float]
) -> np.ndarray:
    """``[alphas, new rows]`` predictions of ridge fits (features standardised on ``x_fit``;
    penalty ``alpha * rows``), all from one SVD."""
    mean, std = x_fit.mean(axis=0), x_fit.std(axis=0)
    std[std == 0] = 1.0
    z, z_new = (x_fit - mean) / std, (x_new - mean) / std
    u, s, vt = np.linalg.svd(z, full_matrices=False)
    y_mean = y_fit.mean()
    uty = u.T @ (y_fit - y_mean)
    projected = z_new @ vt.T  # [new, k]
    n = x_fit.shape[0]
    return np.stack([projected @ (s / (s**2 + a * n) * uty) + y_mean for a in alphas])


def _r2(y: np.ndarray, predicted: np.ndarray) -> float:
    total = np.sum((y - y.mean()) ** 2)
    return float(1.0 - np.sum((y - predicted) ** 2) / total) if total > 0 else float("nan")


def chip_blocks(rows: np.ndarray, cols: np.ndarray, size: int) -> np.ndarray:
    """Group labels of ``size x size`` blocks of the chip grid, for spatial cross-validation.

    Parameters
    ----------
    rows, cols
        ``[chips]`` non-negative integer row and column of each chip in the chip grid
        (e.g. the ``chip_row`` and ``chip_col`` columns of ``SimilarityIndex.rows``).
    size
        Edge of a block, in chips.

    Returns
    -------
    numpy.ndarray
        ``[chips]`` integer labels, one per block: the ``groups`` of :func:`ridge_cv`.
    """
    rows, cols = np.asarray(rows), np.asarray(cols)
    result: np.ndarray = (rows // size) * (int(cols.max()) // size + 1) + cols // size
    return result


def chip_means(
    raster: xr.DataArray, emb: xr.Dataset, *, nodata: float | None = None, min_valid: float = 0.5
) -> np.ndarray:
    """``[chip_y, chip_x]``: the mean of a one-band raster (elevation, a label map...) over
    each chip's window, as a probe target.

    The raster is first put on the datacube's pixel grid: averaged where it is
    finer, bilinearly interpolated where it is coarser. Needs rasterio
    (``pip install "xclay[io]"``).

    Parameters
    ----------
    raster
        One band (dimensions of length 1 are dropped), any CRS and resolution,
        georeferenced as rioxarray or odc-geo read it.
    emb
        Embeddings Dataset (:func:`xclay.embed`): its datacube's pixel grid and each
        chip's window.
    nodata
        A raster value to treat as missing. NaN, and the nodata the raster itself
        declares, are missing anyway; default None adds no other.
    min_valid
        Fraction (0-1) of a chip's ``chip_size x chip_size`` window that must have
        values; chips with less get NaN. Default half.
    """
    import odc.geo.xr  # noqa: F401  (the .odc accessor)
    from odc.geo.geobox import GeoBox

    cube = emb.attrs["datacube"]
    target = GeoBox(tuple(cube["shape"]), Affine.from_gdal(*cube["geotransform"]), cube["crs_wkt"])
    band = raster.squeeze(drop=True)
    if band.ndim != 2:
        raise DatacubeError(f"chip_means needs a one-band raster; got dims {raster.dims}.")
    values = band.astype(np.float64)
    if nodata is not None:
        values = values.where(values != nodata)
    finer = abs(band.odc.geobox.resolution.x) < abs(target.resolution.x)
    on_cube = values.odc.reproject(
        target, resampling="average" if finer else "bilinear", dst_nodata=np.nan
    ).values
    size = int(emb.attrs["config"]["grid"]["chip_size"])
    rows = np.asarray(emb["row_off"].values, dtype=np.int64)
    cols = np.asarray(emb["col_off"].values, dtype=np.int64)
    out = np.full((rows.size, cols.size), np.nan)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            window = on_cube[max(r, 0) : r + size, max(c, 0) : c + size]
            ok = np.isfinite(window)
            if ok.sum() >= min_valid * size * size:
                out[i, j] = window[ok].mean()
    return out
