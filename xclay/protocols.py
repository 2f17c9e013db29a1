"""The plug-in points of xclay, apart from their implementations.

- :class:`Encoder`: turns a batch of chips into one vector per chip (the
  weight-free ``rcf`` baseline, Clay v1.5, ...).
- :class:`WindowReader`: reads chip windows of a datacube into a batch
  buffer (engine ``zarr`` on the host; ``kvikio`` into GPU memory).

And the plain data that crosses them: :class:`InputSpec` (what an encoder
must know about the cube's bands) and :class:`ChipBatch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

    from xclay.devices import Precision
    from xclay.models.card import ModelCard

__all__ = ["ChipBatch", "Encoder", "InputSpec", "ReconstructionScorer", "Sampler", "WindowReader"]


@dataclass(frozen=True)
class InputSpec:
    """What an encoder must know about the datacube it will embed.

    Attributes
    ----------
    platform
        Sensor-table key, or ``None`` for an unknown sensor.
    bands
        Band names in the order of the ``band`` dim.
    wavelengths
        Central wavelength of each band (micrometres, or the sensor table's units).
    gsd
        Ground sample distance in metres.
    nodata
        Nodata value of the pixels (``None``: none; NaN is always nodata for floats).
    dtype
        NumPy dtype name of the stored pixels.
    chip_size
        Chip edge in pixels.
    """

    platform: str | None
    bands: tuple[str, ...]
    wavelengths: tuple[float, ...]
    gsd: float
    nodata: float | None
    dtype: str
    chip_size: int


@dataclass(frozen=True)
class ChipBatch:
    """A batch of chips on the compute device.

    Attributes
    ----------
    pixels
        ``[B, C, H, W]`` raw digital numbers in the cube's dtype (not normalised).
    valid
        ``[B, H, W]`` bool, True where every band has data.
    lonlat
        ``[B, 2]`` float64 chip centres in degrees, (lon, lat) order.
    time
        ``[B]`` datetime64[ns] acquisition times (midpoints for composites); NaT: unknown.
    chip_ids
        ``[B]`` chip ids (:mod:`xclay.chips`), where known (not for sample chips).
    """

    pixels: torch.Tensor
    valid: torch.Tensor
    lonlat: torch.Tensor
    time: np.ndarray
    chip_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


# A source of sample chips for fitting (``rcf`` filters, "auto" normalisation):
# ``sample(n, seed)`` returns up to n chips drawn reproducibly from the cube.
Sampler = Callable[[int, int], ChipBatch]


@runtime_checkable
class Encoder(Protocol):
    """A model that embeds chips.

    Lifecycle: ``prepare`` once per datacube (normalisation, wave-conditioned
    weights, fitted filters), then ``encode`` per batch. ``card`` describes
    the model as prepared, and goes into every output.
    """

    @property
    def card(self) -> ModelCard: ...

    @property
    def preferred_precision(self) -> Precision:
        """Precision for ``precision="auto"`` on a device that runs bf16 fast."""
        ...

    def prepare(
        self, spec: InputSpec, sample: Sampler, *, device: torch.device, dtype: torch.dtype
    ) -> None: ...

    def encode(self, batch: ChipBatch) -> torch.Tensor:
        """``[B, dim]`` float32 embeddings (NaN rows for chips it cannot embed)."""
        ...


@runtime_checkable
class ReconstructionScorer(Protocol):
    """An encoder that can also score chips by how well its decoder reconstructs them."""

    def enable_loss(self, seed: int) -> None:
        """Load what scoring needs (the decoder); call before ``prepare``."""
        ...

    def loss(self, batch: ChipBatch) -> torch.Tensor:
        """``[B]`` float32 per-chip reconstruction loss."""
        ...


@runtime_checkable
class WindowReader(Protocol):
    """Reads chip windows (all bands) of a datacube's pixels."""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(time, band, y, x)`` of the datacube."""
        ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    def read(self, t: int, row: int, col: int, size: int, out: np.ndarray) -> None:
        """Fill ``out`` ``[band, size, size]`` with the window at ``(row, col)`` of time ``t``.

        Parts of the window outside the raster are filled with the nodata value.
        """
        ...
