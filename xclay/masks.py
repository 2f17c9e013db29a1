"""Per-pixel quality classes, decoded from the masks sensors ship.

A datacube may carry ``quality(time, y, x)`` uint8 with one class per pixel
(CF ``flag_values`` / ``flag_meanings``): clear, nodata, cloud, cloud
shadow, haze (thin cirrus), snow/ice. Chips get the fraction of each class;
``nodata`` pixels are also invalid for the encoder; the others are reported
so users can filter (``max_cloud``) or weigh chips, as stacchip does.

Decoders (dask- and NumPy-friendly, through xarray ``where``):

- Sentinel-2 L2A scene classification (SCL): 0 no data and 1 saturated or
  defective -> nodata; 3 cloud shadows -> cloud_shadow; 8, 9 cloud medium /
  high probability -> cloud; 10 thin cirrus -> haze; 11 snow or ice -> snow;
  2 dark area, 4 vegetation, 5 not vegetated, 6 water, 7 unclassified -> clear.
- Landsat Collection 2 QA_PIXEL bits: 0 fill -> nodata; 1 dilated cloud and
  3 cloud -> cloud; 4 cloud shadow -> cloud_shadow; 2 cirrus -> haze;
  5 snow -> snow; otherwise clear. Where several apply, the order of
  precedence is nodata, cloud, cloud_shadow, haze, snow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import xarray as xr

__all__ = [
    "FLAG_MEANINGS",
    "MASK_KINDS",
    "PixelClass",
    "decode_qa_pixel",
    "decode_scl",
    "quality_attrs",
]


class PixelClass(IntEnum):
    """The quality class of a pixel, as a datacube's ``quality`` variable stores it (uint8).

    ``CLEAR`` (0): none of the others. ``NODATA`` (1): no valid observation; also
    invalid for the encoder. ``CLOUD`` (2), ``CLOUD_SHADOW`` (3), ``HAZE`` (4, thin
    cirrus) and ``SNOW`` (5, snow or ice). ``PixelClass(2)`` is ``PixelClass.CLOUD``.
    """

    CLEAR = 0
    NODATA = 1
    CLOUD = 2
    CLOUD_SHADOW = 3
    HAZE = 4
    SNOW = 5


FLAG_MEANINGS = tuple(c.name.lower() for c in PixelClass)
# Observations of these classes are left out of composites.
EXCLUDED_FROM_COMPOSITES = (
    PixelClass.NODATA,
    PixelClass.CLOUD,
    PixelClass.CLOUD_SHADOW,
    PixelClass.HAZE,
)


def quality_attrs() -> dict[str, object]:
    """CF attributes of the ``quality`` variable."""
    return {
        "long_name": "pixel quality class",
        "flag_values": [int(c) for c in PixelClass],
        "flag_meanings": " ".join(FLAG_MEANINGS),
    }


def _classify(
    shape_like: xr.DataArray, rules: list[tuple[xr.DataArray, PixelClass]]
) -> xr.DataArray:
    """Start clear; apply rules from the lowest precedence to the highest."""
    out = xr.zeros_like(shape_like, dtype=np.uint8)
    for condition, cls in rules:
        out = out.where(~condition, np.uint8(cls))
    return out.astype(np.uint8)


def decode_scl(scl: xr.DataArray) -> xr.DataArray:
    """Sentinel-2 L2A SCL -> :class:`PixelClass`.

    Parameters
    ----------
    scl
        Scene classification values (NumPy- or dask-backed): 0, 1 -> nodata; 3 ->
        cloud_shadow; 8, 9 -> cloud; 10 -> haze; 11 -> snow; the others -> clear.

    Returns
    -------
    xarray.DataArray
        uint8 :class:`PixelClass` values, of the shape and coordinates of ``scl``.
    """
    return _classify(
        scl,
        [
            (scl == 11, PixelClass.SNOW),
            (scl == 10, PixelClass.HAZE),
            (scl == 3, PixelClass.CLOUD_SHADOW),
            (scl.isin([8, 9]), PixelClass.CLOUD),
            (scl.isin([0, 1]), PixelClass.NODATA),
        ],
    )


def decode_qa_pixel(qa: xr.DataArray) -> xr.DataArray:
    """Landsat Collection 2 QA_PIXEL -> :class:`PixelClass`.

    Parameters
    ----------
    qa
        QA_PIXEL bit flags (NumPy- or dask-backed): bit 0 -> nodata; 1, 3 -> cloud;
        4 -> cloud_shadow; 2 -> haze; 5 -> snow; none -> clear. Where several apply,
        the first of nodata, cloud, cloud_shadow, haze, snow.

    Returns
    -------
    xarray.DataArray
        uint8 :class:`PixelClass` values, of the shape and coordinates of ``qa``.
    """
    bits = qa.astype(np.int64)

    def bit(n: int) -> xr.DataArray:
        return (bits // (1 << n)) % 2 == 1

    return _classify(
        qa,
        [
            (bit(5), PixelClass.SNOW),
            (bit(2), PixelClass.HAZE),
            (bit(4), PixelClass.CLOUD_SHADOW),
            (bit(1) | bit(3), PixelClass.CLOUD),
            (bit(0), PixelClass.NODATA),
        ],
    )


@dataclass(frozen=True)
class MaskKind:
    """A sensor's mask: which asset carries it, and how to decode it."""

    name: str
    assets: tuple[str, ...]
    decode: Callable[[xr.DataArray], xr.DataArray]


MASK_KINDS = {
    "sentinel-2-scl": MaskKind("sentinel-2-scl", ("scl", "SCL"), decode_scl),
    "landsat-qa-pixel": MaskKind("landsat-qa-pixel", ("qa_pixel", "QA_PIXEL"), decode_qa_pixel),
}
