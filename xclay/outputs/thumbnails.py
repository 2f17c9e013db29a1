"""A small true-colour preview of every chip, stored beside its embedding.

Each thumbnail is RGBA uint8: the chip's red, green and blue bands averaged
over the valid pixels of each thumbnail cell, stretched linearly between the
2nd and 98th percentiles of those bands, and transparent in proportion to
the cell's nodata. The stretch is fitted once per run, on sample chips of
the cube, and stored with the outputs, so every thumbnail of a run (and of
every region, on every worker) shares one colour scale and thumbnails can be
compared with each other.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xclay.errors import DatacubeError
from xclay.sensors import get_sensor

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_SIZE", "ThumbnailStretch", "decode_png", "encode_png", "make_thumbnails"]

DEFAULT_SIZE = 64
_RGB_WAVELENGTHS = (0.665, 0.56, 0.49)  # micrometres: red, green, blue
_PERCENTILES = (2.0, 98.0)


def rgb_bands(
    bands: Sequence[str], wavelengths: Sequence[float], platform: str | None
) -> list[str]:
    """The red, green and blue bands: the sensor table's for a known platform, else the
    bands nearest 665, 560 and 490 nm."""
    names = [str(b) for b in bands]
    if platform:
        sensor = get_sensor(platform)
        if sensor.rgb_bands and all(b in names for b in sensor.rgb_bands):
            return list(sensor.rgb_bands)
    if len(names) < 3:
        raise DatacubeError(
            f"a true-colour image needs at least three bands; this cube has {len(names)}."
        )
    waves = np.asarray(wavelengths, dtype=np.float64)
    return [names[int(np.argmin(np.abs(waves - w)))] for w in _RGB_WAVELENGTHS]


@dataclass(frozen=True)
class ThumbnailStretch:
    """Which bands are red, green and blue, and the values mapped to 0 and 255 for each.

    Parameters
    ----------
    bands
        The names of the red, green and blue bands, in that order.
    low, high
        For each of those bands, the value mapped to 0 and the value mapped to 255
        (values between are stretched linearly; those outside are clipped).
    """

    bands: tuple[str, str, str]
    low: tuple[float, float, float]
    high: tuple[float, float, float]

    def to_dict(self) -> dict[str, list[Any]]:
        return {"bands": list(self.bands), "low": list(self.low), "high": list(self.high)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThumbnailStretch:
        def three(key: str, kind: type) -> Any:
            values = tuple(kind(v) for v in data[key])
            if len(values) != 3:
                raise DatacubeError(f"thumbnail stretch {key} needs 3 values, got {values}.")
            return values

        return cls(three("bands", str), three("low", float), three("high", float))

    @classmethod
    def fit(
        cls, pixels: np.ndarray, valid: np.ndarray, band_names: Sequence[str], rgb: Sequence[str]
    ) -> ThumbnailStretch:
        """2-98 % of each RGB band over the valid pixels of sample chips ``[B, C, H, W]``."""
        index = [list(band_names).index(b) for b in rgb]
        values = np.moveaxis(np.asarray(pixels)[:, index], 1, -1)[np.asarray(valid)]
        values = values[np.isfinite(values).all(axis=-1)]
        if values.shape[0] == 0:
            raise DatacubeError("no valid pixel in the sample chips to fit a thumbnail stretch.")
        low, high = np.percentile(values.astype(np.float64), _PERCENTILES, axis=0)
        high = np.where(high > low, high, low + 1.0)  # a constant band: avoid dividing by 0
        r, g, b = (str(x) for x in rgb)
        return cls((r, g, b), _three(low), _three(high))


def _three(values: np.ndarray) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


def thumbnail_size(requested: int, chip_size: int) -> int:
    """Edge of the stored thumbnails: the requested size, at most the chip's (no upsampling)."""
    if requested < 1:
        raise DatacubeError(f"thumbnail size must be >= 1 px, got {requested}.")
    return min(int(requested), int(chip_size))


def make_thumbnails(
    pixels: torch.Tensor,
    valid: torch.Tensor,
    band_index: Sequence[int],
    stretch: ThumbnailStretch,
    size: int,
) -> np.ndarray:
    """``[B, C, H, W]`` chips and ``[B, H, W]`` validity (torch, on any device) ->
    ``[B, size, size, 4]`` RGBA uint8 (NumPy).

    Each thumbnail cell averages the valid pixels under it (cells as
    :func:`torch.nn.functional.adaptive_avg_pool2d` draws them); alpha is the
    cell's valid fraction. On a GPU this costs next to nothing beside the encoder.

    Parameters
    ----------
    pixels
        ``[B, C, H, W]`` chips, any numeric dtype (computed in float32); NaN nodata is
        allowed where ``valid`` is False.
    valid
        ``[B, H, W]`` pixel validity (nonzero: valid); cells with no valid pixel come
        out transparent black.
    band_index
        Positions along ``C`` of the red, green and blue bands, in the order of
        ``stretch.bands``.
    stretch
        The values mapped to 0 and 255 for each of those bands.
    size
        Edge of the thumbnails in pixels (:func:`thumbnail_size` keeps it within the
        chip's).
    """
    import torch
    import torch.nn.functional as F

    rgb = torch.stack([pixels[:, i].to(torch.float32) for i in band_index], dim=1)
    weight = valid.to(device=rgb.device, dtype=torch.float32).unsqueeze(1)  # [B, 1, H, W]
    rgb = torch.where(weight > 0, rgb, 0.0)  # nodata may be NaN: keep it out of the sums
    total = F.adaptive_avg_pool2d(rgb * weight, size)
    fraction = F.adaptive_avg_pool2d(weight, size)  # [B, 1, s, s]
    mean = total / fraction.clamp_min(1e-9)
    low = torch.tensor(stretch.low, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    high = torch.tensor(stretch.high, dtype=torch.float32, device=rgb.device).view(1, 3, 1, 1)
    colour = ((mean - low) / (high - low)).clamp(0.0, 1.0) * (fraction > 0)
    rgba = torch.cat([colour, fraction], dim=1).mul(255.0).round().to(torch.uint8)
    return rgba.permute(0, 2, 3, 1).cpu().numpy()


def encode_png(rgba: np.ndarray) -> bytes:
    """One ``[size, size, 4]`` uint8 thumbnail as PNG bytes.

    Parameters
    ----------
    rgba
        The thumbnail, ``[size, size, 4]`` uint8 RGBA (as :func:`make_thumbnails`
        makes them); :func:`decode_png` reads the bytes back.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgba)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes (a GeoParquet ``thumbnail``) -> ``[size, size, 4]`` uint8 RGBA.

    Parameters
    ----------
    data
        The PNG file's bytes; images that are not RGBA are converted to it.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGBA"))
