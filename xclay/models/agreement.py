"""How closely two sets of embeddings of the same chips agree: the accuracy gate of a
fast precision against strict fp32.

Two figures, as users of embeddings meet them: the cosine similarity of each chip's two
vectors (its minimum and median over the chips), and the 10-nearest-neighbour recall
(for each chip, the share of its 10 nearest other chips by cosine under the reference
that are also among its 10 nearest under the other precision, averaged).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["GATES", "Agreement", "agreement"]

# What a precision must keep, against strict fp32 on the same chips.
GATES: dict[str, dict[str, float]] = {
    "bf16": {"cosine_min": 0.999},
    "tf32": {"cosine_min": 0.999},
    "fp8": {"cosine_min": 0.995, "knn10_recall": 0.95},
}


@dataclass(frozen=True)
class Agreement:
    """The figures of one comparison, and whether they pass the precision's gate.

    Attributes
    ----------
    precision
        The precision compared with strict fp32 (``"bf16"``, ``"tf32"``, ``"fp8"``):
        the key of its gate in :data:`GATES` (a name without a gate always passes).
    chips
        How many chips were compared.
    cosine_min, cosine_median
        The least and the median, over the chips, of the cosine similarity of each
        chip's two vectors.
    knn10_recall
        Mean share of each chip's ``k`` nearest other chips (by cosine; ``k`` is 10
        unless :func:`agreement` is given another) under the reference that are also
        among its ``k`` nearest under the other precision; ``None`` when there are
        ``k`` chips or fewer.
    """

    precision: str
    chips: int
    cosine_min: float
    cosine_median: float
    knn10_recall: float | None  # None with k (10) chips or fewer

    @property
    def failures(self) -> list[str]:
        """The gate's figures this comparison misses (empty: it passes)."""
        gate = GATES.get(self.precision, {})
        missed = []
        for name, least in gate.items():
            value = getattr(self, name)
            if value is not None and value < least:
                missed.append(f"{name} {value:.4f} < {least}")
        return missed

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "against": "fp32",
            "gate": GATES.get(self.precision, {}),
            "passes": not self.failures,
        }


def agreement(reference: np.ndarray, other: np.ndarray, precision: str, k: int = 10) -> Agreement:
    """Compare ``other`` ``[n, d]`` with ``reference`` ``[n, d]`` (rows: the same chips).

    Parameters
    ----------
    reference
        ``[n, d]`` embeddings of ``n`` chips computed in strict fp32 (any further axes are
        flattened into ``d``; figures are computed in float64).
    other
        ``[n, d]`` embeddings of the same chips, in the same order, in the precision
        compared; the same shape as ``reference`` (else a :class:`ValueError`).
    precision
        Name of the compared precision (``"bf16"``, ``"tf32"``, ``"fp8"``); it chooses
        the gate :attr:`Agreement.failures` checks.
    k
        Neighbours per chip for the nearest-neighbour recall; default 10, the count
        the gates assume. The recall is computed only with more than ``k`` chips.

    Returns
    -------
    Agreement
        The figures, with the precision's gate.
    """
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    oth = np.asarray(other, dtype=np.float64).reshape(len(other), -1)
    if ref.shape != oth.shape or len(ref) == 0:
        raise ValueError(f"need two non-empty sets of the same shape, got {ref.shape}, {oth.shape}")
    a, b = _unit(ref), _unit(oth)
    cosine = (a * b).sum(axis=1)
    recall = None
    if len(ref) > k:
        near_a = _neighbours(a, k)
        near_b = _neighbours(b, k)
        shared = [len(set(x) & set(y)) for x, y in zip(near_a, near_b, strict=True)]
        recall = float(np.mean(shared) / k)
    return Agreement(
        precision=precision,
        chips=len(ref),
        cosine_min=float(cosine.min()),
        cosine_median=float(np.median(cosine)),
        knn10_recall=recall,
    )


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _neighbours(unit: np.ndarray, k: int) -> np.ndarray:
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]
