"""Read engines: how an embedding run reads its chips, by name, in one registry.

An engine is a :class:`SourcePlugin`: it says whether it can feed an encoder on a device
and opens the batch sources (:class:`~xclay.protocols.BatchSource`) for a cube. xclay's
own are ``zarr`` (chunk files read and decoded on the host, or xarray windows for cubes
not read unchanged from a store) and ``kvikio`` (the same chunks read into GPU memory by
kvikIO and decoded there by nvCOMP); ``auto`` picks kvikio on a GPU where kvikIO can read,
else zarr. Another package adds an engine under the ``xclay.sources`` entry-point group
(:mod:`xclay.plugins`); ``compute.engine``, ``--engine`` and ``embed(engine=...)`` then
take its name, on every worker of a cluster too.

Whenever an engine has to take a slower path than the one asked for (no nvCOMP, no
GPUDirect Storage, a layout the fast path cannot read), it says so with a
:class:`~xclay.errors.DataPathWarning` and records the reason, which runs put in their
report.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import xarray as xr

from xclay.batch.readers import ChunkSource, WindowSource, chunk_layout, store_layouts
from xclay.datacube.chunks import UnsupportedLayout
from xclay.datacube.source import store_source
from xclay.datacube.validate import nodata_value
from xclay.errors import ConfigError, DataPathWarning, DeviceError
from xclay.plugins import Registry

if TYPE_CHECKING:
    import torch

    from xclay.devices import ThreadBudget
    from xclay.protocols import BatchSource

__all__ = [
    "SOURCES",
    "Engine",
    "KvikioEngine",
    "SourceChoice",
    "SourcePlugin",
    "ZarrEngine",
    "engine_names",
    "open_batch_source",
    "resolve_engine",
]

#: ``"auto"`` or a registered engine's name (:func:`engine_names`).
Engine = str


@dataclass
class SourceChoice:
    """The sources an embedding run reads with, and why it is not faster.

    :func:`open_batch_source` makes one; :meth:`close` closes both sources.

    Attributes
    ----------
    batches
        The source batches are read from: on the GPU (kvikIO) or on the host.
    host
        A source over the same cube that reads into host memory (sampling chips for
        fitting); the same object as ``batches`` when that one reads on the host.
    engine
        The engine resolved from the one asked for (:func:`resolve_engine`); where a
        fallback was taken, ``batches`` may read on a slower path than it names.
    fallbacks
        Every slower path taken, one sentence each; default none.
    layout
        How chip windows meet the storage's chunks, a note for reports
        (:func:`~xclay.batch.readers.chunk_layout`, or ``"in memory"``); default empty.
    """

    batches: BatchSource
    host: BatchSource
    engine: str
    fallbacks: list[str] = field(default_factory=list)
    layout: str = ""  # how chip windows meet the storage's chunks

    def close(self) -> None:
        self.batches.close()
        if self.host is not self.batches:
            self.host.close()


class SourcePlugin:
    """A read engine. Subclass it, set ``name`` and ``description``, and implement
    :meth:`open` (and :meth:`check` when it cannot feed every device).

    Attributes
    ----------
    name
        What ``engine=`` takes.
    description
        One line: what it reads, and into which memory.
    """

    name: str
    description: str

    def check(self, device: torch.device) -> None:
        """Refuse a device this engine cannot feed (a :class:`~xclay.errors.DeviceError`
        saying what to use instead); by default every device is fed.

        Parameters
        ----------
        device
            The torch device the encoder runs on.
        """

    def open(
        self,
        cube: xr.Dataset,
        *,
        chip_size: int,
        device: torch.device,
        threads: ThreadBudget,
        stride: int | None = None,
    ) -> SourceChoice:
        """The batch sources for embedding ``cube`` on ``device``.

        Parameters
        ----------
        cube
            The datacube: ``pixels`` and, where it has one, ``quality``.
        chip_size
            Chip edge in pixels.
        device
            The torch device the encoder runs on (checked by :meth:`check` first).
        threads
            The run's thread budget (``threads.decode`` host threads, ``threads.io``).
        stride
            Step between chip origins in pixels (None: ``chip_size``).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


class ZarrEngine(SourcePlugin):
    """Chunk files read and decoded on the host (:class:`~xclay.batch.readers.ChunkSource`);
    a cube not read unchanged from a store xclay reads directly goes through xarray one
    window at a time (:class:`~xclay.batch.readers.WindowSource`), said as a fallback."""

    name = "zarr"
    description = "chunks read and decoded on the host (xarray windows where it must)"

    def open(
        self,
        cube: xr.Dataset,
        *,
        chip_size: int,
        device: torch.device,
        threads: ThreadBudget,
        stride: int | None = None,
    ) -> SourceChoice:
        return _host_choice(self.name, cube, chip_size, threads, stride, must_say=False)


class KvikioEngine(SourcePlugin):
    """The chunks read into GPU memory by kvikIO and decoded there by nvCOMP
    (:class:`~xclay.datacube.gpuchunks.KvikioChunkSource`), with a host source beside it for
    sampling; a layout it cannot read is decoded on the host and copied (a fallback)."""

    name = "kvikio"
    description = "chunks read into GPU memory by kvikIO, decoded there by nvCOMP"

    def check(self, device: torch.device) -> None:
        from xclay.datacube import gpu

        gpu.require_kvikio()
        if device.type != "cuda":
            raise DeviceError(
                "engine='kvikio' reads chips into GPU memory for an encoder on the GPU, but "
                f"device is {device.type!r}; use device='cuda' (or 'auto'), or engine='zarr'."
            )

    def open(
        self,
        cube: xr.Dataset,
        *,
        chip_size: int,
        device: torch.device,
        threads: ThreadBudget,
        stride: int | None = None,
    ) -> SourceChoice:
        choice = _host_choice(self.name, cube, chip_size, threads, stride, must_say=True)
        if not isinstance(choice.host, ChunkSource):
            return choice  # xarray windows: said already
        from xclay.datacube.gpuchunks import KvikioChunkSource

        host = choice.host
        pixels, quality = host.layouts
        try:
            gpu_source = KvikioChunkSource(
                pixels,
                quality,
                chip_size=chip_size,
                nodata=nodata_value(cube["pixels"]),
                threads=threads,
                host=host,
            )
        except UnsupportedLayout as err:
            _fallback(
                choice.fallbacks,
                f"kvikIO cannot read this layout ({err}); chips are decoded on the host by "
                f"{host.threads} thread(s) and copied to the GPU",
            )
            return choice
        for reason in gpu_source.fallbacks:
            _fallback(choice.fallbacks, reason)
        choice.batches = gpu_source
        return choice


def _host_choice(
    engine: str,
    cube: xr.Dataset,
    chip_size: int,
    threads: ThreadBudget,
    stride: int | None,
    *,
    must_say: bool,
) -> SourceChoice:
    """The host source: chunk reads where the store allows, else xarray windows (a
    fallback said where the cube has a store, or where ``must_say``)."""
    step = stride or chip_size
    fallbacks: list[str] = []
    try:
        pixels, quality = store_layouts(cube)
    except UnsupportedLayout as err:
        window = WindowSource(cube["pixels"], cube.data_vars.get("quality"))
        if store_source(cube["pixels"]) is not None or must_say:
            _fallback(fallbacks, f"chips are read through xarray, one window at a time: {err}")
        chunks = cube["pixels"].chunksizes
        edges = (int(chunks["y"][0]), int(chunks["x"][0])) if chunks else None
        note = chunk_layout(edges, chip_size, step) if edges else "in memory"
        return SourceChoice(window, window, engine, fallbacks, note)
    host = ChunkSource(pixels, quality, nodata=nodata_value(cube["pixels"]), threads=threads.decode)
    return SourceChoice(
        host, host, engine, fallbacks, chunk_layout(pixels.chunk_shape[-2:], chip_size, step)
    )


def _fallback(fallbacks: list[str], reason: str) -> None:
    fallbacks.append(reason)
    warnings.warn(reason, DataPathWarning, stacklevel=4)


def _adopt(value: Any) -> SourcePlugin:
    if isinstance(value, type) and issubclass(value, SourcePlugin):
        value = value()
    if not isinstance(value, SourcePlugin):
        raise TypeError(f"a {type(value).__name__} is not a SourcePlugin (or its class)")
    if not isinstance(getattr(value, "name", None), str) or value.name == "auto":
        raise TypeError(f"{value!r} needs a name (a string other than 'auto')")
    return value


#: The read engines (:mod:`xclay.plugins`): xclay's own and installed ones.
SOURCES: Registry[SourcePlugin] = Registry(
    "read engine", "xclay.sources", _adopt, error=ConfigError
)
SOURCES.built_in(ZarrEngine, KvikioEngine)


def engine_names() -> tuple[str, ...]:
    """What ``engine=`` takes: ``"auto"`` and every registered engine's name."""
    return ("auto", *SOURCES.names())


def resolve_engine(engine: Engine, device: torch.device) -> str:
    """The engine an embedding run reads chips with.

    Parameters
    ----------
    engine
        ``"auto"``: kvikio when the encoder runs on a CUDA device and kvikIO can read
        there, else zarr; a registered engine's name: that engine, if it can feed
        ``device`` (a :class:`~xclay.errors.DeviceError` otherwise: ``"kvikio"`` needs
        kvikIO and a CUDA device).
    device
        The torch device the encoder runs on.

    Returns
    -------
    str
        A registered engine's name.
    """
    from xclay.datacube import gpu

    if engine == "auto":
        return "kvikio" if device.type == "cuda" and gpu.kvikio_usable() else "zarr"
    SOURCES.get(engine).check(device)
    return engine


def open_batch_source(
    cube: xr.Dataset,
    *,
    chip_size: int,
    engine: Engine,
    device: torch.device,
    threads: ThreadBudget,
    stride: int | None = None,
) -> SourceChoice:
    """The batch sources for embedding ``cube`` on ``device`` with ``engine``, chosen once.

    Parameters
    ----------
    cube
        The datacube: ``pixels`` and, where it has one, ``quality``. Chunks are read
        directly when both are read unchanged from a Zarr v3 store in a layout
        :mod:`xclay.datacube.chunks` reads; otherwise chips are read through xarray.
    chip_size
        Chip edge in pixels.
    engine
        ``"auto"`` or a registered engine (see :func:`resolve_engine`).
    device
        The torch device the encoder runs on.
    threads
        The run's thread budget: ``threads.decode`` host threads read and decode chunks;
        ``threads.io`` sizes kvikIO's pool.
    stride
        Step between chip origins in pixels (``None``: ``chip_size``); it only shapes
        the note on how chip windows meet the stored chunks.

    Returns
    -------
    SourceChoice
        The source batches are read from, a host source over the same cube, the engine
        resolved, every slower path taken (each also a
        :class:`~xclay.errors.DataPathWarning`) and the chunk layout note.
    """
    resolved = resolve_engine(engine, device)
    return SOURCES.get(resolved).open(
        cube, chip_size=chip_size, device=device, threads=threads, stride=stride
    )
