"""The plug-in points of xclay, apart from their implementations.

- :class:`Encoder`: turns a batch of chips into one vector per chip (the
  weight-free ``rcf`` baseline, Clay v1.5, ...).
- :class:`BatchSource`: reads chip windows of a datacube into batch buffers
  (on the host through xarray or straight from Zarr chunk files; into GPU
  memory through kvikIO).
- :class:`Exporter`: writes a finished embedding set in one output format
  (GeoParquet, Cloud-Optimized GeoTIFF, ...), registered in :mod:`xclay.outputs.formats`.

And the plain data that crosses them: :class:`InputSpec` (what an encoder
must know about the cube's bands) and :class:`ChipBatch`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    import xarray as xr

    from xclay.devices import ComputePrecision, Precision
    from xclay.model_card import ModelCard

__all__ = [
    "BatchSource",
    "ChipBatch",
    "Encoder",
    "ExportOption",
    "Exporter",
    "InputSpec",
    "ReconstructionScorer",
    "Sampler",
    "SizesItsBatches",
    "SourceFacts",
]


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
    batch_size
        Chips per ``encode`` call (at most; 0: not known), for encoders that compile a
        graph of one static batch.
    """

    platform: str | None
    bands: tuple[str, ...]
    wavelengths: tuple[float, ...]
    gsd: float
    nodata: float | None
    dtype: str
    chip_size: int
    batch_size: int = 0


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
        ``[B]`` chip ids (:mod:`xclay.batch.chips`), where known (not for sample chips).
    """

    pixels: torch.Tensor
    valid: torch.Tensor
    lonlat: torch.Tensor
    time: np.ndarray
    chip_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def rows(self, start: int, stop: int) -> ChipBatch:
        """Chips ``start:stop`` of the batch (views, no copy)."""
        ids = self.chip_ids[start:stop] if self.chip_ids is not None else None
        return ChipBatch(
            self.pixels[start:stop],
            self.valid[start:stop],
            self.lonlat[start:stop],
            self.time[start:stop],
            ids,
        )


class SourceFacts:
    """The datacube facts every :class:`BatchSource` reports, from attributes its
    ``__init__`` sets: ``_shape`` ``(time, band, y, x)``, ``_dtype``, ``_nodata``."""

    _shape: tuple[int, ...]
    _dtype: np.dtype[Any]
    _nodata: float | None

    @property
    def shape(self) -> tuple[int, int, int, int]:
        t, b, y, x = self._shape
        return t, b, y, x

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def nodata(self) -> float | None:
        return self._nodata


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
        self, spec: InputSpec, sample: Sampler, *, device: torch.device, precision: ComputePrecision
    ) -> Encoder | None:
        """Get ready to embed this cube on ``device`` in ``precision`` (its ``dtype`` is
        the activations'); refuse a precision the model has no path for (ModelError).

        Returns the encoder ready for the cube, whose state all exists (a new object, as
        Clay's, or ``self``); ``None`` (plug-ins written before it returned one) means
        ``self`` is ready. The caller enters ``precision.matmul_mode()`` around
        ``encode``."""
        ...

    def encode(self, batch: ChipBatch) -> torch.Tensor:
        """``[B, dim]`` float32 embeddings (NaN rows for chips it cannot embed)."""
        ...


@runtime_checkable
class SizesItsBatches(Protocol):
    """An encoder that knows what batch fills a device (``batch_size="auto"``); others
    get 16 chips a batch."""

    def batch_size_hint(self, device: torch.device, chip_size: int, bands: int) -> int:
        """Chips per batch that keep ``device`` busy without running out of memory."""
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
class BatchSource(Protocol):
    """Reads chip windows of a datacube (all bands, and its quality classes) into batch
    buffers: the one seam between a datacube's storage and the batch path
    (:mod:`xclay.batch.batching`). Implementations: :class:`xclay.batch.readers.WindowSource`
    (any xarray cube), :class:`xclay.batch.readers.ChunkSource` (Zarr v3 chunk files
    decoded by host threads), :class:`xclay.datacube.gpuchunks.KvikioChunkSource` (kvikIO reads
    into GPU memory, nvCOMP decode).
    """

    @property
    def name(self) -> str:
        """What reads, for reports: e.g. ``"chunks (host, 2 threads)"``."""
        ...

    @property
    def xp(self) -> Any:
        """The array module of the buffers it fills: ``numpy``, or ``cupy`` on a GPU."""
        ...

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(time, band, y, x)`` of the datacube."""
        ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def nodata(self) -> float | None:
        """The pixels' nodata value (None: none; NaN is always nodata for floats)."""
        ...

    @property
    def has_quality(self) -> bool:
        """Whether it reads quality classes (the cube has a ``quality`` variable)."""
        ...

    def read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
        """Fill ``pixels[k]`` ``[band, size, size]`` with the window ``windows[k]`` =
        ``(t, row, col)`` (top-left pixel), and ``classes[k]`` ``[size, size]`` with its
        quality classes when given. Parts of a window past the raster hold the nodata
        value (pixels) and :attr:`xclay.masks.PixelClass.NODATA` (classes). Returns when
        the data is in place."""
        ...

    def reading_stream(self) -> AbstractContextManager[Any]:
        """Where a background reader works: a side CUDA stream for GPU sources, nothing
        for host ones."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ExportOption:
    """A keyword option of an output format, as the CLI offers it (``--<name>``).

    Parameters
    ----------
    default
        The value when the option is not given (also the CLI flag's default).
    help
        One line for ``xclay export --help``.
    choices
        The values allowed; ``None`` (default): any value ``type`` accepts.
    type
        Converts the flag's text to the option's value (default ``str``).
    metavar
        The value's name in ``--help``; ``None`` (default): argparse's own.
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    type: Callable[[str], Any] = str
    metavar: str | None = None


@runtime_checkable
class Exporter(Protocol):
    """Writes a finished embedding set in one output format.

    The CLI's ``xclay export --format`` choices and options, a run's export step and its
    STAC description are all read from the registered exporters
    (:func:`xclay.outputs.formats.register_exporter`): a new format is one class.
    """

    #: The ``--format`` value.
    name: str
    #: The file suffix of one store's export (``".tif"``); with several time steps a
    #: format may write one file per step, named ``<stem>_<YYYY-MM-DD><suffix>``.
    suffix: str
    #: The media type of its files (the STAC asset ``type``).
    media_type: str
    #: One line for ``xclay export --help``.
    summary: str
    #: The keyword options :meth:`write` takes, by name.
    options: Mapping[str, ExportOption]
    #: True: a run writes it region by region as it embeds (resumable parts, with the
    #: spec's settings); False: it is written once per embeddings store, after the run.
    by_region: bool

    def write(
        self, emb: xr.Dataset | Path | str, out: Path | str, *, overwrite: bool, **options: Any
    ) -> Sequence[Path | str]:
        """Write ``emb`` (a Dataset, or an embeddings Zarr's path or URL) to ``out`` (a
        path, or a URL on object storage); return the files written (paths or URLs)."""
        ...

    def asset(self, path: Path | str) -> dict[str, Any]:
        """The STAC asset fields of a written file beyond its ``href``: ``type``,
        ``title``, ``roles``."""
        ...
