"""Batches assembled chunk by chunk on the encoder's device (the kvikio engine's hot path).

When every chip is one Zarr chunk (:class:`xclay.chunkio.ChipChunks`), a batch
is ``batch_size`` chunk reads into a preallocated tensor: on the GPU through
kvikIO (:mod:`xclay.gpu`), on the host through a pool of threads. Validity,
nodata and quality-class fractions are then computed on that device for the
whole batch at once, chips that fail the quality filter are dropped, and the
tensors go to the encoder as they are (no per-chip xarray indexing, no host
round trip). The host variant runs the same assembly on CPU tensors, which is
how CI tests it; only the read differs.

Batches hold the accepted chips among ``batch_size`` scanned ones, so with a
quality filter they can be smaller than ``batch_size``. Embeddings do not
depend on batch boundaries.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr

from xclay.batching import BatchPlan, _prefetched, _recycling, _torch_dtype, chip_windows
from xclay.chunkio import ArrayLayout, ChipChunks, HostChunkBatchReader, UnsupportedLayout
from xclay.datacube import nodata_value, store_engine, store_source
from xclay.masks import PixelClass
from xclay.quality import ChipQuality

if TYPE_CHECKING:
    import torch

    from xclay.gpu import Decode

__all__ = ["ChunkBatchSource", "DeviceBatch", "chunk_batch_source", "iter_chunk_batches"]

log = logging.getLogger(__name__)

Reads = Literal["host", "kvikio"]


@dataclass
class DeviceBatch:
    """Accepted chips of one batch as torch tensors on the encoder's device.

    ``pixels[n, band, y, x]``, ``valid[n, y, x]``, ``index[n]`` their
    ``(t, chip_row, chip_col)``; ``scanned`` counts the chips looked at.
    The data is in place when the batch is yielded.
    """

    pixels: torch.Tensor
    valid: torch.Tensor
    index: np.ndarray
    scanned: int
    slot: int

    def __len__(self) -> int:
        return int(self.index.shape[0])


class ChunkBatchSource:
    """Reads batches of chip chunks (pixels and quality classes) into tensors on ``device``.

    ``reads="kvikio"`` (CUDA device) reads with kvikIO and decodes with
    nvCOMP per ``decode``; ``reads="host"`` reads with threads into CPU memory.
    """

    def __init__(
        self,
        pixels: ChipChunks,
        quality: ChipChunks | None,
        *,
        nodata: float | None,
        device: torch.device,
        reads: Reads = "host",
        decode: Decode = "auto",
    ) -> None:
        self.pixels, self.quality = pixels, quality
        self.device = device
        self.reads = reads
        self.nodata = nodata
        dtype = pixels.layout.dtype.newbyteorder("=")
        self.dtype = dtype
        self.pad_value = (
            nodata if nodata is not None else (float("nan") if dtype.kind == "f" else 0.0)
        )
        if reads == "kvikio":
            from xclay.gpu import KvikioChunkBatchReader

            self._pixel_reader: Any = KvikioChunkBatchReader(pixels, decode=decode)
            self._quality_reader: Any = (
                KvikioChunkBatchReader(quality, decode=decode) if quality is not None else None
            )
        else:
            self._pixel_reader = HostChunkBatchReader(pixels)
            self._quality_reader = HostChunkBatchReader(quality) if quality is not None else None

    @property
    def has_quality(self) -> bool:
        return self.quality is not None

    @property
    def bands(self) -> int:
        shape = self.pixels.layout.shape
        return shape[1] if len(shape) == 4 else 1

    def read(self, refs: list[Any], out: torch.Tensor, quality: bool = False) -> None:
        reader = self._quality_reader if quality else self._pixel_reader
        if self.reads == "kvikio":
            reader.read(refs, out)
        else:
            reader.read(refs, out.numpy())

    def close(self) -> None:
        for reader in (self._pixel_reader, self._quality_reader):
            if reader is not None:
                reader.close()


def chunk_batch_source(
    cube: xr.Dataset, chip_size: int, device: torch.device, *, decode: Decode = "auto"
) -> ChunkBatchSource | None:
    """The chunk-batch source of a datacube opened with ``engine="kvikio"`` and embedded on
    a CUDA device; None (the per-chip host path) otherwise, or when its layout does not
    put one chip in one chunk (the reason is logged)."""
    pixels = cube["pixels"]
    if device.type != "cuda" or store_engine(pixels) != "kvikio":
        return None
    return open_chunk_source(cube, chip_size, device, reads="kvikio", decode=decode)


def open_chunk_source(
    cube: xr.Dataset,
    chip_size: int,
    device: torch.device,
    *,
    reads: Reads,
    decode: Decode = "auto",
) -> ChunkBatchSource | None:
    """A :class:`ChunkBatchSource` over the stores behind ``cube`` (None, with the reason
    logged, where the layout does not allow one)."""
    pixels = cube["pixels"]
    quality = cube["quality"] if "quality" in cube.data_vars else None
    try:
        chunks = _chip_chunks(pixels, chip_size)
        quality_chunks = _chip_chunks(quality, chip_size) if quality is not None else None
    except UnsupportedLayout as err:
        log.warning("chips are read per window on the host: %s", err)
        return None
    return ChunkBatchSource(
        chunks,
        quality_chunks,
        nodata=nodata_value(pixels),
        device=device,
        reads=reads,
        decode=decode,
    )


def _chip_chunks(da: xr.DataArray, chip_size: int) -> ChipChunks:
    source = store_source(da)
    if source is None:
        raise UnsupportedLayout(f"{da.name} is not read unchanged from its store")
    layout = ArrayLayout.open(source)
    if layout.shape != tuple(da.shape):
        raise UnsupportedLayout(f"{da.name} has another shape than its store")
    return ChipChunks(layout, chip_size)


class _DevicePool:
    """``slots`` sets of batch tensors on the device; a released slot is reused only after
    the work queued on it by the consumer has finished (a CUDA event per slot)."""

    def __init__(self, n: int, batch_size: int, source: ChunkBatchSource, size: int) -> None:
        import torch

        dev = source.device
        dtype = _torch_dtype(source.dtype)
        self.pixels = [
            torch.empty((batch_size, source.bands, size, size), dtype=dtype, device=dev)
            for _ in range(n)
        ]
        self.valid = [
            torch.empty((batch_size, size, size), dtype=torch.bool, device=dev) for _ in range(n)
        ]
        self.classes = [
            torch.empty((batch_size, size, size), dtype=torch.uint8, device=dev)
            for _ in range(n if source.has_quality else 0)
        ]
        self._done: list[Any] = [None] * n
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self.free.put(i)

    @property
    def slots(self) -> int:
        return len(self.pixels)

    def release(self, slot: int) -> None:
        if self.pixels[slot].is_cuda:
            import torch

            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.pixels[slot].device))
            self._done[slot] = event
        self.free.put(slot)

    def take(self) -> int:
        slot = self.free.get()
        event, self._done[slot] = self._done[slot], None
        if event is not None:
            event.synchronize()  # kvikIO writes are not stream-ordered: wait on the host
        return slot


def iter_chunk_batches(
    source: ChunkBatchSource,
    plan: BatchPlan,
    quality: ChipQuality,
    *,
    prefetch: int = 2,
) -> Iterator[DeviceBatch]:
    """Yield batches of the block's accepted chips in (time, chip row, chip col) order,
    filling ``quality`` for every chip scanned (as :func:`xclay.batching.iter_batches`).

    With ``prefetch > 0`` a thread reads (on CUDA: on its own stream) the next
    batches while the encoder runs; ``prefetch + 2`` buffer sets bound memory.
    """
    pool = _DevicePool(prefetch + 2, plan.batch_size, source, plan.grid.spec.chip_size)
    if prefetch == 0:
        yield from _recycling(_fill(source, plan, quality, pool, None), pool)
        return

    def fill(stop: threading.Event) -> Iterator[DeviceBatch]:
        if source.device.type != "cuda":
            yield from _fill(source, plan, quality, pool, stop)
            return
        import torch

        side = torch.cuda.Stream(source.device)
        with torch.cuda.stream(side):
            yield from _fill(source, plan, quality, pool, stop)

    for batch in _recycling(_prefetched(fill, pool, prefetch), pool):
        if batch.pixels.is_cuda:
            import torch

            # Made on the reading thread's stream, used on this one.
            stream = torch.cuda.current_stream(batch.pixels.device)
            batch.pixels.record_stream(stream)
            batch.valid.record_stream(stream)
        yield batch


def _validity(
    pixels: torch.Tensor, classes: torch.Tensor | None, nodata: float | None, out: torch.Tensor
) -> None:
    """``out[k, y, x]``: no band equal to nodata, every band finite, class not nodata. On
    CPU tensors NumPy does it (torch's uint16 comparisons are 4x slower there)."""
    if pixels.is_cuda:
        import torch

        out.fill_(True)
        if nodata is not None and np.isfinite(nodata):
            out &= (pixels != nodata).all(dim=1)
        if pixels.is_floating_point():
            out &= torch.isfinite(pixels).all(dim=1)
        if classes is not None:
            out &= classes != PixelClass.NODATA
        return
    px, valid = pixels.numpy(), out.numpy()
    if nodata is not None and np.isfinite(nodata):
        np.all(px != px.dtype.type(nodata), axis=1, out=valid)
    else:
        valid.fill(True)
    if px.dtype.kind == "f":
        valid &= np.isfinite(px).all(axis=1)
    if classes is not None:
        valid &= classes.numpy() != PixelClass.NODATA


def _fill(
    source: ChunkBatchSource,
    plan: BatchPlan,
    quality: ChipQuality,
    pool: _DevicePool,
    stop: threading.Event | None,
) -> Iterator[DeviceBatch]:
    import torch

    size = plan.grid.spec.chip_size
    rows, cols = chip_windows(plan.grid)
    (t0, t1), (r0, r1), (c0, c1) = plan.block.times, plan.block.rows, plan.block.cols
    tt, ii, jj = np.meshgrid(np.arange(t0, t1), np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
    order = np.stack([tt.ravel(), ii.ravel(), jj.ravel()], axis=1)
    with_classes = source.has_quality and quality.class_fraction is not None
    nodata = source.nodata
    for start in range(0, len(order), plan.batch_size):
        if stop is not None and stop.is_set():
            return
        index = order[start : start + plan.batch_size]
        n = len(index)
        windows = [(int(t), int(rows[i]), int(cols[j])) for t, i, j in index]
        slot = pool.take()
        pixels, valid = pool.pixels[slot][:n], pool.valid[slot][:n]
        refs, outside = source.pixels.plan(windows)
        source.read(refs, pixels)
        classes = None
        if source.quality is not None:
            classes = pool.classes[slot][:n]
            source.read(source.quality.plan(windows)[0], classes, quality=True)
        for k, (oy, ox) in enumerate(outside):  # the part of a padded window past the raster
            if oy:
                pixels[k, :, size - oy :, :] = source.pad_value
            if ox:
                pixels[k, :, :, size - ox :] = source.pad_value
            if classes is not None and (oy or ox):
                classes[k, size - oy :, :] = PixelClass.NODATA
                classes[k, :, size - ox :] = PixelClass.NODATA
        _validity(pixels, classes, nodata, valid)
        for k, (oy, ox) in enumerate(outside):
            if oy:
                valid[k, size - oy :, :] = False
            if ox:
                valid[k, :, size - ox :] = False
        area = float(size * size)
        fraction = (1.0 - valid.sum(dim=(1, 2)).double() / area).cpu().numpy()
        at = (index[:, 0] - t0, index[:, 1] - r0, index[:, 2] - c0)
        quality.nodata_fraction[at] = fraction
        fractions = None
        if with_classes and classes is not None and quality.class_fraction is not None:
            k_classes = len(PixelClass)
            codes = classes.reshape(n, -1).long()
            codes = torch.where(codes < k_classes, codes, k_classes)  # unknown codes: not counted
            counts = torch.zeros((n, k_classes + 1), dtype=torch.int64, device=pixels.device)
            counts.scatter_add_(1, codes, torch.ones_like(codes))
            fractions = (counts[:, :k_classes].double() / area).cpu().numpy()
            quality.class_fraction[at] = fractions
        keep = [
            k
            for k in range(n)
            if plan.quality.reason(
                float(fraction[k]), fractions[k] if fractions is not None else None
            )
            < 0
        ]
        if len(keep) < n:
            chosen = torch.as_tensor(keep, dtype=torch.long, device=pixels.device)
            pixels, valid = pixels.index_select(0, chosen), valid.index_select(0, chosen)
        yield DeviceBatch(pixels, valid, index[keep].copy(), n, slot)
