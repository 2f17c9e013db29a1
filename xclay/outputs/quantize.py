"""Compact vectors: int8 embeddings with one scale per vector.

``quantize="int8"`` stores each vector ``v`` as ``q = rint(127 * v / max|v|)``
(int8 in -127..127) and its scale ``s = max|v| / 127`` (float32), so
``v ≈ s * q`` with an error of at most ``s / 2`` per element. One scale per
vector (not per dimension) keeps every vector independent of the rest of
the run: regions are quantised as they are embedded, in any order, and a
chip's bytes never change when the run grows. Cosine similarity and the
ranking of dot products need only ``q`` (the scale is a positive factor per
vector). A vector that was not embedded is all ``-128`` with a NaN scale.

Four bytes per element become one: 1024-d Clay vectors go from 4096 to 1028
bytes per chip (before compression).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core.indexing import IndexingSupport, explicit_indexing_adapter

from xclay.errors import DatacubeError
from xclay.settings import Setting

__all__ = [
    "MISSING_INT8",
    "QUANTIZATIONS",
    "QUANTIZE",
    "dequantize_embeddings",
    "dequantize_int8",
    "quantization_of",
    "quantize_embeddings",
    "quantize_int8",
]

QUANTIZATIONS = ("int8",)
# The setting, declared once (xclay.settings): a run spec's outputs.quantize, --quantize.
QUANTIZE = Setting(
    None, "int8: int8 vectors with a scale per vector, 4x smaller (default: float32)",
    choices=QUANTIZATIONS, see="schemas.md#compact-vectors-quantizeint8",
)  # fmt: skip
MISSING_INT8 = -128  # every element of a vector that was not embedded
SCALE_VARIABLE = "embedding_scale"
METHOD = "int8-absmax-per-vector"


def quantization_attrs() -> dict[str, Any]:
    """What a reader needs to restore the vectors (stored with them)."""
    return {
        "method": METHOD,
        "scale": SCALE_VARIABLE,
        "dequantize": f"embedding * {SCALE_VARIABLE}",
        "missing": MISSING_INT8,
    }


def check_quantize(value: str | None) -> str | None:
    if value is not None and value not in QUANTIZATIONS:
        raise DatacubeError(
            f"quantize must be None (float32) or one of {', '.join(QUANTIZATIONS)}, got {value!r}."
        )
    return value


def quantize_int8(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[..., D]`` float -> (``[..., D]`` int8, ``[...]`` float32 scale).

    Vectors with any non-finite element become all :data:`MISSING_INT8` with a
    NaN scale; an all-zero vector gets scale 0.

    Parameters
    ----------
    vectors
        Vectors ``[..., D]`` along the last axis, any float dtype (computed in float32).

    Returns
    -------
    q, scale
        ``q``: ``[..., D]`` int8 in -127..127; ``scale``: ``[...]`` float32, one per
        vector, so that ``vectors ≈ scale[..., None] * q``.
    """
    v = np.asarray(vectors, dtype=np.float32)
    finite = np.asarray(np.isfinite(v).all(axis=-1))
    absmax = np.max(np.abs(np.where(finite[..., None], v, 0.0)), axis=-1)
    scale = (absmax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[..., None]
    q = np.clip(np.rint(np.where(finite[..., None], v, 0.0) / safe), -127, 127).astype(np.int8)
    q[~finite] = MISSING_INT8
    scale[~finite] = np.nan
    return q, scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``[..., D]`` int8 and ``[...]`` scale -> float32 vectors (NaN where missing).

    Parameters
    ----------
    q
        Quantised vectors ``[..., D]`` int8, as :func:`quantize_int8` returns them;
        elements equal to :data:`MISSING_INT8` come back as NaN.
    scale
        One scale per vector, ``[...]`` (the shape of ``q`` without its last axis).
    """
    q = np.asarray(q)
    out = q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[..., None]
    out[q == MISSING_INT8] = np.nan
    return out


def quantization_of(emb: xr.Dataset) -> dict[str, Any] | None:
    """The quantization attributes of an embeddings Dataset (None: float vectors).

    Parameters
    ----------
    emb
        An embeddings Dataset; only its ``quantization`` attribute is read.

    Returns
    -------
    dict or None
        A copy of that attribute (``method``, ``scale``, ``dequantize``, ``missing``), or
        None when it is absent or empty.
    """
    q = emb.attrs.get("quantization")
    return dict(q) if q else None


def quantize_embeddings(emb: xr.Dataset, method: str = "int8") -> xr.Dataset:
    """``embedding`` as int8 plus ``embedding_scale`` (its dims without ``feature``).

    Parameters
    ----------
    emb
        An embeddings Dataset with float vectors (read into memory); one already
        quantised is returned unchanged.
    method
        The quantisation, one of :data:`QUANTIZATIONS`; default (and only) ``"int8"``:
        one scale per vector (:func:`quantize_int8`).

    Returns
    -------
    xarray.Dataset
        A copy of ``emb`` with the int8 ``embedding``, its float32 ``embedding_scale``
        and the ``quantization`` attribute (:func:`quantization_of`).
    """
    check_quantize(method)
    if quantization_of(emb):
        return emb
    var = emb["embedding"]
    q, scale = quantize_int8(np.asarray(var.values))
    out = emb.copy()
    out["embedding"] = xr.Variable(var.dims, q, {**var.attrs, "units": "1 (scaled)"})
    out[SCALE_VARIABLE] = xr.Variable(var.dims[:-1], scale, scale_attrs(var.attrs))
    out.attrs["quantization"] = quantization_attrs()
    return out


def scale_attrs(embedding_attrs: dict[str, Any]) -> dict[str, Any]:
    return {
        "long_name": "scale of each int8 vector: embedding = stored int8 * embedding_scale",
        **(
            {"grid_mapping": embedding_attrs["grid_mapping"]}
            if "grid_mapping" in embedding_attrs
            else {}
        ),
    }


def dequantize_embeddings(emb: xr.Dataset) -> xr.Dataset:
    """float32 ``embedding`` again (lazily for lazily opened stores); ``embedding_scale``
    dropped, and the ``quantization`` attribute renamed ``dequantized_from`` (the values
    are approximate: within half a quantisation step).

    Parameters
    ----------
    emb
        An embeddings Dataset; a quantised one must still hold ``embedding_scale``, and
        one with float vectors is returned unchanged. Vectors that were not embedded
        come back as NaN.
    """
    if not quantization_of(emb):
        return emb
    if SCALE_VARIABLE not in emb.data_vars:
        raise DatacubeError(
            f"these embeddings are int8 but lack {SCALE_VARIABLE!r}; open the whole store, or "
            "keep that variable in selections."
        )
    q, scale = emb["embedding"].variable, emb[SCALE_VARIABLE].variable
    attrs = {k: v for k, v in q.attrs.items() if k != "units"}
    if isinstance(q._data, np.ndarray) or q.chunks is not None:  # NumPy or dask: no reads yet
        stored = emb["embedding"]
        values = (stored.astype(np.float32) * emb[SCALE_VARIABLE].astype(np.float32)).where(
            stored != MISSING_INT8
        )
        variable = xr.Variable(q.dims, values.transpose(*q.dims).data, attrs)
    else:  # lazily opened: read (and dequantise) only what is indexed
        lazy = xr.core.indexing.LazilyIndexedArray(_Dequantized(q, scale))
        variable = xr.Variable(q.dims, lazy, attrs)
    out = emb.drop_vars(SCALE_VARIABLE)
    out["embedding"] = variable
    out.attrs = {k: v for k, v in emb.attrs.items() if k != "quantization"}
    out.attrs["dequantized_from"] = emb.attrs["quantization"]
    return out


class _Dequantized(BackendArray):
    """A lazily opened int8 store seen as float32 vectors: reads only what is indexed."""

    def __init__(self, q: xr.Variable, scale: xr.Variable) -> None:
        self.shape = tuple(int(s) for s in q.shape)
        self.dtype = np.dtype(np.float32)
        self._q = q
        self._scale = scale

    def __getitem__(self, key: Any) -> Any:
        return explicit_indexing_adapter(key, self.shape, IndexingSupport.BASIC, self._read)

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        q = np.asarray(self._q[key].values)
        scale = np.asarray(self._scale[key[:-1]].values)
        if isinstance(key[-1], int | np.integer):  # one feature: scale per element, not per row
            out = q.astype(np.float32) * scale.astype(np.float32)
            out[q == MISSING_INT8] = np.nan
            return np.asarray(out)
        return dequantize_int8(q, scale)
