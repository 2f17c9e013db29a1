"""Honest checking: spatial block cross-validation, and the scores kept with a model.

Neighbouring chips share information (the same field, the same river), so a random split
of labelled chips lets a model be tested on near-copies of what it learnt from and its
scores come out too good. Here labels are grouped into square blocks on the map, larger
than the distance over which labels are alike, and whole blocks go to one fold.

The block edge (:func:`estimate_block`) is the range of the labels' spatial
autocorrelation read off their empirical variogram: classes by the indicator variogram
(half the share of pairs of labels that differ), values by the semivariance of the
standardised values, over 20 distance bins widening geometrically from the nearest pair of
labelled chips to half the largest distance between two. The range is the upper edge of the first bin whose semivariance
reaches 95 % of the sill (what independent labels give: ``(1 - sum p_k^2) / 2`` for
classes, 1 for standardised values); at least one chip. Where the labels are alike across
their whole extent (the sill is never reached) or the blocks that edge makes are too few
to fill the folds, the edge shrinks until there are twice as many blocks holding labels as
folds, with a :class:`CheckingWarning`: the scores may then be optimistic.

Blocks are shuffled (seeded) and dealt to the fold that has the fewest labels so far,
largest blocks first, so folds are near-equal in labels.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from xclay.errors import LabelError, XClayWarning

__all__ = [
    "BlockEstimate",
    "CheckingWarning",
    "classification_scores",
    "estimate_block",
    "regression_scores",
    "spatial_folds",
]

log = logging.getLogger(__name__)

_MAX_PAIRS_LABELS = 3000  # labels the variogram is computed on, at most (a seeded sample)
_BINS = 20
_SILL_FRACTION = 0.95


class CheckingWarning(XClayWarning):
    """Cross-validation that may score a model too well: too few blocks for the labels'
    spatial autocorrelation, so blocks were made smaller than its range."""


@dataclass(frozen=True)
class BlockEstimate:
    """The block edge of a spatial cross-validation and how it was found.

    Attributes
    ----------
    block_m
        Block edge in metres (the datacube CRS's units) used for the folds.
    range_m
        The range of the labels' spatial autocorrelation (metres), from the variogram;
        ``None`` when the sill was never reached or a block edge was given.
    rule
        How ``block_m`` was chosen, in words.
    lags, semivariance, pairs
        The empirical variogram: bin upper edges (metres), semivariance and pairs per bin.
    sill
        The semivariance of independent labels.
    """

    block_m: float
    range_m: float | None
    rule: str
    lags: tuple[float, ...] = ()
    semivariance: tuple[float, ...] = ()
    pairs: tuple[int, ...] = ()
    sill: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_m": self.block_m,
            "range_m": self.range_m,
            "rule": self.rule,
            "variogram": {
                "lag_m": list(self.lags),
                "semivariance": list(self.semivariance),
                "pairs": list(self.pairs),
                "sill": self.sill,
            },
        }


def _variogram(
    x: np.ndarray, y: np.ndarray, target: np.ndarray, classification: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    n = len(target)
    if n > _MAX_PAIRS_LABELS:
        pick = np.sort(np.random.default_rng(seed).choice(n, _MAX_PAIRS_LABELS, replace=False))
        x, y, target = x[pick], y[pick], target[pick]
        n = _MAX_PAIRS_LABELS
    a, b = np.triu_indices(n, k=1)
    distance = np.hypot(x[a] - x[b], y[a] - y[b])
    if classification:
        differ = (target[a] != target[b]).astype(np.float64)
        p = np.bincount(target.astype(np.int64)) / n
        sill = 0.5 * (1.0 - float((p**2).sum()))
        half_sq = 0.5 * differ
    else:
        z = (target - target.mean()) / max(float(target.std()), 1e-12)
        half_sq = 0.5 * (z[a] - z[b]) ** 2
        sill = 1.0
    reach = distance <= 0.5 * float(distance.max()) if len(distance) else distance > 0
    distance, half_sq = distance[reach], half_sq[reach]
    if not len(distance):
        return np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.int64), sill
    # Bins widening geometrically from the nearest pair out: the short lags, where the range
    # of most label sets lies, are resolved finely, the long ones still hold many pairs.
    positive = distance[distance > 0]
    nearest = float(positive.min()) if positive.size else 1.0
    edges = np.unique(
        np.geomspace(nearest * 1.01, max(float(distance.max()), nearest * 1.02), _BINS)
    )
    which = np.minimum(np.searchsorted(edges, distance, side="left"), len(edges) - 1)
    pairs = np.bincount(which, minlength=len(edges))
    gamma = np.bincount(which, weights=half_sq, minlength=len(edges)) / np.maximum(pairs, 1)
    return edges, gamma, pairs, sill


def estimate_block(
    x: np.ndarray,
    y: np.ndarray,
    target: np.ndarray,
    *,
    classification: bool,
    chip_m: float,
    folds: int,
    block_m: float | None = None,
    seed: int = 0,
) -> BlockEstimate:
    """The block edge of a spatial cross-validation (module docstring).

    Parameters
    ----------
    x, y
        ``[n]`` chip centres of the labels, in the datacube CRS (metres).
    target
        ``[n]`` class indices or values.
    classification
        Whether ``target`` holds classes.
    chip_m
        A chip's edge in metres: the smallest block.
    folds
        Folds the blocks must fill (twice as many blocks holding labels are needed).
    block_m
        A block edge to use instead of the estimate (still shrunk, with a warning, where
        it leaves too few blocks).
    seed
        Seed of the sample of labels the variogram is computed on (at most 3000).
    """
    lags, gamma, pairs, sill = _variogram(x, y, target, classification, seed)
    if block_m is not None:
        edge, range_m = float(block_m), None
        rule = f"given: {edge:g} m"
    else:
        enough = pairs >= 30
        reached = np.flatnonzero(enough & (gamma >= _SILL_FRACTION * sill))
        if reached.size:
            range_m = float(lags[reached[0]])
            edge = max(range_m, chip_m)
            rule = (
                f"the range of the labels' spatial autocorrelation ({range_m:.0f} m: the "
                f"variogram reaches {_SILL_FRACTION:.0%} of its sill), at least one chip"
            )
        else:
            range_m = None
            edge = float(lags[-1]) if len(lags) else chip_m
            rule = "the labels are alike across their whole extent (the sill is never reached)"
    edge = max(edge, chip_m)
    shrunk = edge
    while _occupied_blocks(x, y, shrunk) < 2 * folds and shrunk > chip_m:
        shrunk = max(chip_m, shrunk / 1.25)
    if _occupied_blocks(x, y, shrunk) < 2 * folds:
        raise LabelError(
            f"the labelled chips fill only {_occupied_blocks(x, y, shrunk)} blocks of one chip; "
            f"{folds}-fold spatial cross-validation needs at least {2 * folds}: label more "
            "places, or use fewer folds."
        )
    if shrunk < edge:
        warnings.warn(
            f"spatial cross-validation: blocks of {edge:.0f} m (the labels' autocorrelation) "
            f"leave too few blocks for {folds} folds; using {shrunk:.0f} m blocks, so the "
            "scores may be optimistic. Label a wider area, or use fewer folds.",
            CheckingWarning,
            stacklevel=3,
        )
        rule += f"; shrunk to {shrunk:.0f} m to make {2 * folds} blocks holding labels"
    return BlockEstimate(
        block_m=float(shrunk),
        range_m=range_m,
        rule=rule,
        lags=tuple(float(v) for v in lags),
        semivariance=tuple(float(v) for v in gamma),
        pairs=tuple(int(v) for v in pairs),
        sill=float(sill),
    )


def _blocks(x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    bx = np.floor((x - x.min()) / edge).astype(np.int64)
    by = np.floor((y - y.min()) / edge).astype(np.int64)
    result: np.ndarray = by * (int(bx.max()) + 1) + bx
    return result


def _occupied_blocks(x: np.ndarray, y: np.ndarray, edge: float) -> int:
    return int(np.unique(_blocks(x, y, edge)).size) if len(x) else 0


def spatial_folds(x: np.ndarray, y: np.ndarray, edge: float, folds: int, seed: int) -> np.ndarray:
    """``[n]`` fold of each label: square blocks of ``edge`` metres, whole blocks to a fold
    (the fold with the fewest labels so far, largest blocks first, ties by a seeded
    shuffle).

    Parameters
    ----------
    x, y
        ``[n]`` chip centres of the labels (metres).
    edge
        Block edge in metres.
    folds
        Number of folds.
    seed
        Seed of the shuffle of blocks.
    """
    blocks = _blocks(x, y, edge)
    unique, inverse, counts = np.unique(blocks, return_inverse=True, return_counts=True)
    if unique.size < folds:
        raise LabelError(
            f"{unique.size} blocks hold labels; {folds}-fold cross-validation needs at least "
            f"{folds}."
        )
    order = np.random.default_rng(seed).permutation(unique.size)
    order = order[np.argsort(-counts[order], kind="stable")]
    fold_of = np.empty(unique.size, dtype=np.int64)
    filled = np.zeros(folds, dtype=np.int64)
    for k in order.tolist():
        f = int(np.argmin(filled))
        fold_of[k] = f
        filled[f] += counts[k]
    result: np.ndarray = fold_of[inverse]
    return result


def inner_groups(x: np.ndarray, y: np.ndarray, edge: float) -> np.ndarray:
    """Block labels of the same blocks, for the inner cross-validations."""
    return _blocks(x, y, edge)


def classification_scores(
    truth: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]
) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision, recall, F1 and support, and the confusion
    matrix (rows: truth, columns: predicted) of class predictions.

    Parameters
    ----------
    truth, predicted
        ``[n]`` class indices.
    classes
        Class names in index order.
    """
    k = len(classes)
    truth = np.asarray(truth, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    confusion = np.bincount(truth * k + predicted, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    called = confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(called > 0, tp / called, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = support > 0
    return {
        "accuracy": float(tp.sum() / max(1, len(truth))),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion": confusion.tolist(),
        "n": len(truth),
    }


def regression_scores(truth: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """R², RMSE, MAE and bias (mean of predicted - truth) of value predictions.

    Parameters
    ----------
    truth, predicted
        ``[n]`` values.
    """
    truth = np.asarray(truth, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    error = predicted - truth
    total = float(((truth - truth.mean()) ** 2).sum()) if len(truth) else 0.0
    return {
        "r2": float(1.0 - (error**2).sum() / total) if total > 0 else float("nan"),
        "rmse": float(np.sqrt((error**2).mean())) if len(truth) else float("nan"),
        "mae": float(np.abs(error).mean()) if len(truth) else float("nan"),
        "bias": float(error.mean()) if len(truth) else float("nan"),
        "n": len(truth),
    }
