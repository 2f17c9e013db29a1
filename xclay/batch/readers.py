"""Batch sources: where chip windows come from.

Three readers plug into :class:`~xclay.protocols.BatchSource`:

- :class:`WindowSource`: any xarray cube (NumPy, dask, a lazily opened store
  in a layout only zarr-python reads), one window at a time through xarray;
- :class:`ChunkSource`: a datacube store xclay can read directly
  (:mod:`xclay.datacube.chunks`): chunk files read with ``pread`` and decoded in
  place by a pool of host threads; on object storage, a batch's chunks fetched
  together first (concurrent ranged GETs, :mod:`xclay.storage.ranges`), then
  decoded the same way;
- :class:`xclay.datacube.gpuchunks.KvikioChunkSource`: the same chunks read into GPU memory
  with kvikIO (local files, or S3 and HTTP objects) and decoded there by nvCOMP.

The read engines (:mod:`xclay.batch.engines`) pick one for an embedding run.
"""

from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr

from xclay.batch.readahead import ReadAhead
from xclay.datacube.chunks import (
    ArrayLayout,
    DirectWindowReader,
    Gathered,
    UnsupportedLayout,
    gather,
)
from xclay.datacube.source import memory_array, store_array
from xclay.datacube.validate import nodata_value
from xclay.masks import PixelClass
from xclay.protocols import SourceFacts
from xclay.storage.ranges import MAX_IN_FLIGHT

__all__ = [
    "ChunkSource",
    "WindowSource",
    "chunk_layout",
    "store_layouts",
]

log = logging.getLogger(__name__)


def _pad_value(nodata: float | None, dtype: np.dtype[Any]) -> float:
    """What fills the part of a window past the raster (masked out anyway)."""
    if nodata is not None:
        return nodata
    return float("nan") if dtype.kind == "f" else 0.0


class WindowSource(SourceFacts):
    """Chip windows of any xarray datacube, one window at a time: NumPy slices for cubes in
    memory, xarray's lazy indexing (basic slices) for dask-backed or lazily opened ones.

    Parameters
    ----------
    pixels
        The cube's ``pixels(time, band, y, x)``; its ``nodata`` attribute (if any) pads
        windows past the raster and marks invalid pixels.
    quality
        The cube's ``quality(time, y, x)`` pixel classes; ``None`` when it has none.
    """

    xp = np
    name = "xarray windows"

    def __init__(self, pixels: xr.DataArray, quality: xr.DataArray | None = None) -> None:
        self._pixels = pixels.variable
        self._quality = quality.variable if quality is not None else None
        # Not pixels.data: for a lazily opened cube that would read every pixel.
        self._numpy = memory_array(pixels)
        self._quality_numpy = memory_array(quality) if quality is not None else None
        self._shape = tuple(int(s) for s in pixels.shape)
        self._dtype = np.dtype(pixels.dtype)
        self._nodata = nodata_value(pixels)
        self._pad = _pad_value(self._nodata, self._dtype)

    @property
    def has_quality(self) -> bool:
        return self._quality is not None

    def read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
        size = pixels.shape[-1]
        if self._numpy is not None:
            for k, (t, row, col) in enumerate(windows.tolist()):
                self._read_window(k, t, row, col, size, pixels, classes, None)
            return
        # Lazy or dask-backed: one read of the windows' common extent (a strip of chips),
        # cut into windows, rather than a read (and a dask graph) per window.
        for t in np.unique(windows[:, 0]).tolist():
            ks = np.flatnonzero(windows[:, 0] == t)
            extent = self._extent(windows[ks], size)
            if extent is None:
                for k in ks.tolist():
                    _, row, col = windows[k].tolist()
                    self._read_window(k, t, row, col, size, pixels, classes, None)
                continue
            block = self._block(t, extent, classes is not None)
            for k in ks.tolist():
                _, row, col = windows[k].tolist()
                self._read_window(k, t, row, col, size, pixels, classes, block)

    def _extent(self, windows: np.ndarray, size: int) -> tuple[int, int, int, int] | None:
        """The raster rows and columns the windows cover together, when reading them at
        once costs at most 4x their own pixels (else None: one read per window)."""
        _, _, ny, nx = self._shape
        r0 = max(int(windows[:, 1].min()), 0)
        c0 = max(int(windows[:, 2].min()), 0)
        r1 = min(int(windows[:, 1].max()) + size, ny)
        c1 = min(int(windows[:, 2].max()) + size, nx)
        if r0 >= r1 or c0 >= c1:
            return None
        if (r1 - r0) * (c1 - c0) > 4 * len(windows) * size * size:
            return None
        return r0, r1, c0, c1

    def _block(
        self, t: int, extent: tuple[int, int, int, int], with_classes: bool
    ) -> tuple[tuple[int, int], np.ndarray, np.ndarray | None]:
        r0, r1, c0, c1 = extent
        values = _host(self._pixels[t, :, r0:r1, c0:c1].data)
        classes = None
        if with_classes and self._quality is not None:
            classes = _host(self._quality[t, r0:r1, c0:c1].data)
        return (r0, c0), values, classes

    def _read_window(
        self,
        k: int,
        t: int,
        row: int,
        col: int,
        size: int,
        pixels: Any,
        classes: Any | None,
        block: tuple[tuple[int, int], np.ndarray, np.ndarray | None] | None,
    ) -> None:
        _, _, ny, nx = self._shape
        r0, r1 = max(row, 0), min(row + size, ny)
        c0, c1 = max(col, 0), min(col + size, nx)
        whole = r1 - r0 == size and c1 - c0 == size
        if not whole:
            pixels[k].fill(self._pad)
        if r0 >= r1 or c0 >= c1:
            if classes is not None:
                classes[k].fill(PixelClass.NODATA)
            return
        window: Any
        q: Any = None
        if block is not None:
            (br, bc), values, q = block
            window = values[:, r0 - br : r1 - br, c0 - bc : c1 - bc]
        elif self._numpy is not None:
            window, q = self._numpy[t, :, r0:r1, c0:c1], None
        else:
            window, q = _host(self._pixels[t, :, r0:r1, c0:c1].data), None
        pixels[k, :, r0 - row : r1 - row, c0 - col : c1 - col] = window
        if classes is None or self._quality is None:
            return
        if not whole:
            classes[k].fill(PixelClass.NODATA)
        qw: Any
        if block is not None and q is not None:
            (br, bc), _, _ = block
            qw = q[r0 - br : r1 - br, c0 - bc : c1 - bc]
        elif self._quality_numpy is not None:
            qw = self._quality_numpy[t, r0:r1, c0:c1]
        else:
            qw = _host(self._quality[t, r0:r1, c0:c1].data)
        classes[k, r0 - row : r1 - row, c0 - col : c1 - col] = qw

    def reading_stream(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


def _host(data: Any) -> np.ndarray:
    """A window as NumPy: dask computes, CuPy results (engine="kvikio") come back."""
    if hasattr(data, "compute") and not isinstance(data, np.ndarray):
        data = data.compute()
    get = getattr(data, "get", None)
    return np.asarray(get() if callable(get) and not isinstance(data, np.ndarray) else data)


class ChunkSource(SourceFacts):
    """Chip windows straight from a datacube store's Zarr v3 chunk files
    (:mod:`xclay.datacube.chunks`): one ``pread`` per chunk, decoded in place by a pool of
    host threads (``pread`` and zstd/Blosc decoding release the GIL), with windows that
    span several chunks or reach past the raster handled per chunk.

    A store on object storage is read the same way, but for where the bytes come from:
    each :meth:`read` first fetches every chunk its windows need, pixels and quality
    together (the shard indexes it has not read yet, then the chunks: each round all in
    flight at once, adjacent ranges of a shard in one request;
    :func:`xclay.datacube.chunks.gather`), then checks and decodes them as local ones.
    Told the order of the coming reads (:meth:`expect`, as the fill loop does), it
    fetches the next windows' chunks while it decodes (:mod:`xclay.batch.readahead`).

    Parameters
    ----------
    pixels
        The chunk layout of the store's ``pixels`` array.
    quality
        The chunk layout of its ``quality`` array; ``None`` when the cube has none.
    nodata
        The pixels' nodata value: it pads windows past the raster (``None``: NaN for
        float pixels, 0 otherwise).
    threads
        Host threads that read and decode chunks (1, the default: the calling thread
        alone, no pool).
    """

    xp = np

    def __init__(
        self,
        pixels: ArrayLayout,
        quality: ArrayLayout | None,
        *,
        nodata: float | None,
        threads: int = 1,
    ) -> None:
        dtype = pixels.dtype.newbyteorder("=")
        self._dtype = dtype
        self._nodata = nodata
        self._shape = tuple(int(s) for s in pixels.shape)
        self._pixels = DirectWindowReader(pixels, pad_value=_pad_value(nodata, dtype))
        self._quality = (
            DirectWindowReader(quality, pad_value=float(PixelClass.NODATA))
            if quality is not None
            else None
        )
        self.threads = max(1, int(threads))
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="xclay-chunks")
            if self.threads > 1
            else None
        )
        self.layouts = (pixels, quality)
        readers = [r for r in (self._pixels, self._quality) if r is not None]
        self._gathers = any(r.locator.gathers for r in readers)
        self._ahead = ReadAhead(readers) if self._gathers else None

    @property
    def name(self) -> str:
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}"
        if self._gathers:
            return f"chunk objects (host, {MAX_IN_FLIGHT} requests in flight, {threads})"
        return f"chunk files (host, {threads})"

    @property
    def has_quality(self) -> bool:
        return self._quality is not None

    def read(self, windows: np.ndarray, pixels: Any | None, classes: Any | None) -> None:
        """As :meth:`BatchSource.read`; ``pixels`` may be None to read only the classes."""
        shaped = pixels if pixels is not None else classes
        assert shaped is not None
        size = int(shaped.shape[-1])
        quality = self._quality if classes is not None else None
        fetched: dict[int, Gathered] = {}
        if self._gathers:  # every chunk the batch needs, fetched together first
            ahead = self._ahead.take(windows, size) if self._ahead is not None else None
            if ahead is not None:
                readers = [r for r in (self._pixels, self._quality) if r is not None]
                gathered = ahead
            else:
                readers = [r for r in (self._pixels if pixels is not None else None, quality) if r]
                gathered = gather([(r, windows, size) for r in readers])
            for reader, got in zip(readers, gathered, strict=True):
                fetched[id(reader)] = got

        def one(k: int, t: int, row: int, col: int) -> None:
            if pixels is not None:
                self._pixels.read(t, row, col, size, pixels[k], fetched.get(id(self._pixels)))
            if quality is not None and classes is not None:
                quality.read(t, row, col, size, classes[k], fetched.get(id(quality)))

        jobs = [(k, *w) for k, w in enumerate(windows.tolist())]
        if self._pool is None or len(jobs) < 2:
            for job in jobs:
                one(*job)
            return
        for future in [self._pool.submit(one, *job) for job in jobs]:
            future.result()

    def expect(self, windows: np.ndarray) -> None:
        """The windows ``(t, row, col)`` the coming reads will ask for, in order: on object
        storage their chunks are fetched ahead of the reads (a no-op on a local disk)."""
        if self._ahead is not None:
            self._ahead.expect(windows)

    def reading_stream(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def clear_cache(self) -> None:
        """Forget the decoded chunks kept for neighbouring chips (benchmarks: each pass
        then pays for its own decoding, as a run that reads every chip once does)."""
        for reader in (self._pixels, self._quality):
            if reader is not None:
                reader.clear_cache()

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def store_layouts(cube: xr.Dataset) -> tuple[ArrayLayout, ArrayLayout | None]:
    """The chunk layouts of the stores behind a cube's ``pixels`` (and ``quality``), when
    xclay can read them directly; :class:`~xclay.datacube.chunks.UnsupportedLayout` (with the
    reason) otherwise.

    Parameters
    ----------
    cube
        A datacube as opened from its store (:func:`xclay.open_datacube`).
    """
    layouts: dict[str, ArrayLayout] = {}
    for name in ("pixels", "quality"):
        if name not in cube.data_vars:
            continue
        da = cube[name]
        array = store_array(da)
        if array is None:
            raise UnsupportedLayout(f"{name} is not read unchanged from its store")
        layout = array.chunk_layout()
        if layout.dtype.newbyteorder("=") != da.dtype:
            raise UnsupportedLayout(f"{name} has another dtype than its store")
        layouts[name] = layout
    return layouts["pixels"], layouts.get("quality")


def chunk_layout(chunks: Any, chip: int, step: int) -> str:
    """How chip windows meet stored chunks of ``chunks`` = (rows, cols) pixels: any chip
    size and stride is read; this says at what cost (for reports).

    Parameters
    ----------
    chunks
        A chunk's rows and columns in pixels.
    chip
        Chip edge in pixels.
    step
        Step between chip origins in pixels.
    """
    cy, cx = (int(c) for c in chunks)
    if (cy, cx) == (chip, chip) and step % chip == 0:
        return "one chunk a chip"
    if chip % cy == 0 and chip % cx == 0 and step % cy == 0 and step % cx == 0:
        return f"{(chip // cy) * (chip // cx)} chunks a chip"
    if cy % chip == 0 and cx % chip == 0 and cy % step == 0 and cx % step == 0:
        return f"up to {(cy // step) * (cx // step)} chips a chunk, each chunk decoded once"
    return (
        f"chips of {chip} px every {step} px across chunks of {cy} x {cx} px: each chunk "
        "decoded once for the chips that share it (a cache of decoded chunks)"
    )
