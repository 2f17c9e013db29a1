"""The GPU data path: chip chunks read straight into GPU memory with kvikIO, decoded there.

Each chip of a datacube written by :func:`xclay.write_datacube` is one Zarr
chunk (:class:`xclay.datacube.chunks.ChipChunks`). For a batch, this module issues one
kvikIO ``pread`` per chunk into device memory (GPUDirect Storage where the
system has it, kvikIO's POSIX compatibility mode otherwise; for a datacube on S3 or
an HTTP server, ranged GETs of ``kvikio.RemoteFile``, :mod:`xclay.storage.gpufiles`,
all of a batch in flight at once on kvikIO's pool) and:

- uncompressed chunks land in their slot of the batch buffer: no decode, no
  host copy;
- zstd chunks land in a device staging buffer and are decompressed on the GPU
  in one nvCOMP batch call, straight into their slots of the batch buffer;
- where nvCOMP is missing (or the codec is Blosc), chunks are decoded on the
  host by threads and copied up once per read, and the run says so
  (:class:`~xclay.errors.DataPathWarning`, a line in its report).

Nothing here imports cupy, kvikio or nvCOMP until a reader is built, so the
package imports on machines without CUDA; :mod:`xclay.datacube.gpu` says what the
machine can do.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from xclay.datacube.chunks import (
    ArrayLayout,
    ChipChunks,
    ChunkRef,
    HostTiles,
    TileReader,
    UnsupportedLayout,
    tile_edge,
)
from xclay.datacube.gpu import gds_available, importable, require_kvikio
from xclay.errors import DatacubeError, DataIntegrityError, StorageError
from xclay.masks import PixelClass
from xclay.protocols import SourceFacts
from xclay.storage import location
from xclay.storage.gpufiles import kvikio_file, kvikio_unreadable
from xclay.storage.ranges import MAX_IN_FLIGHT, gathers

if TYPE_CHECKING:
    from xclay.devices import ThreadBudget
    from xclay.protocols import BatchSource

__all__ = ["Decode", "KvikioChunkSource", "device_tiles"]

log = logging.getLogger(__name__)

Decode = Literal["auto", "nvcomp", "host"]


class KvikioChunkSource(SourceFacts):
    """Chip windows read into GPU memory with kvikIO and decoded there
    (a :class:`~xclay.protocols.BatchSource` whose buffers are CuPy arrays).

    Needs one chip per chunk (:class:`~xclay.datacube.chunks.ChipChunks`; otherwise
    :class:`~xclay.datacube.chunks.UnsupportedLayout`). Per read: one kvikIO ``pread``
    per chunk; uncompressed chunks land in their slot of the batch buffer,
    zstd chunks in a device staging buffer from which one nvCOMP batch call
    decodes them straight into their slots. :attr:`fallbacks` lists every slower
    road taken.

    A datacube on S3 or an HTTP server is read the same way through kvikIO's
    ``RemoteFile`` (a ranged GET per chunk; a shard opened once a read, without asking
    the server its size; an unsharded chunk's size asked with a ``HEAD``), kvikIO's pool
    sized for the network (at least :data:`~xclay.storage.ranges.MAX_IN_FLIGHT`
    threads, so that a batch's requests are in flight together). Such a store must say
    that it writes every chunk (xclay's do): an object that is not there is damage.
    Other object stores (``gs://``, ``az://``) are
    :class:`~xclay.datacube.chunks.UnsupportedLayout` (the host reader reads them).

    Parameters
    ----------
    pixels
        The chunk layout of the store's ``pixels`` array (native byte order; big-endian
        chunks are :class:`~xclay.datacube.chunks.UnsupportedLayout`).
    quality
        The chunk layout of its ``quality`` array; ``None`` when the cube has none.
    chip_size
        Chip edge in pixels; it must equal the chunks' edge (one chip per chunk).
    nodata
        The pixels' nodata value: it fills the part of a padded window past the raster
        (``None``: NaN for float pixels, 0 otherwise).
    threads
        The run's thread budget: ``threads.io`` sizes kvikIO's thread pool.
    host
        The same store's host reader (:class:`~xclay.batch.readers.ChunkSource`): it
        reads and decodes whatever is decoded on the host.
    decode
        ``"auto"`` (nvCOMP where it decodes the codec, else host threads), ``"nvcomp"``
        (required: an error where it cannot decode the codec), or ``"host"`` (read and
        decode on the host, one copy per read: the benchmarks' baseline). Uncompressed
        chunks are never decoded.
    """

    def __init__(
        self,
        pixels: ArrayLayout,
        quality: ArrayLayout | None,
        *,
        chip_size: int,
        nodata: float | None,
        threads: ThreadBudget,
        host: BatchSource,
        decode: Decode = "auto",
    ) -> None:
        require_kvikio()
        import cupy
        import kvikio

        self._cupy, self._kvikio = cupy, kvikio
        self._chunks = ChipChunks(pixels, chip_size)
        self._quality_chunks = ChipChunks(quality, chip_size) if quality is not None else None
        layouts = [layout for layout in (pixels, quality) if layout is not None]
        for layout in layouts:
            if not layout.dtype.isnative:
                raise UnsupportedLayout(f"{layout.dtype.str} chunks (big-endian)")
            reason = kvikio_unreadable(layout.location)
            if reason is not None:
                raise UnsupportedLayout(reason)
            if gathers(layout.location) and not layout.every_chunk_written:
                # A chunk object that is not there would have to be told from a failed
                # request: only stores that write every chunk (and say so) are read so.
                raise UnsupportedLayout(
                    "a store on object storage that may leave chunks out (written without "
                    "xclay's checksums)"
                )
        self._remote = any(gathers(layout.location) for layout in layouts)
        self.fallbacks: list[str] = []
        self._decode = {
            "pixels": self._choose_decode(decode, pixels.compressor),
            "quality": self._choose_decode(decode, quality.compressor) if quality else "none",
        }
        self._host = host  # reads (and decodes) on the host what nvCOMP cannot
        # Remote reads wait on the network, not on cores: as many in flight as the host
        # reader's requests (each pread of a chunk is one request on one pool thread).
        io = max(threads.io, MAX_IN_FLIGHT) if self._remote else threads.io
        self._threads = _set_kvikio_threads(kvikio, io)
        gds = "yes" if self._remote else gds_available()
        if gds != "yes":
            self.fallbacks.append(
                f"GPUDirect Storage is not in use ({gds}); kvikIO reads through host bounce "
                "buffers. Reads are still direct to GPU memory, but bounded by host memory "
                "bandwidth."
            )
        self._shape = tuple(int(s) for s in pixels.shape)
        self._dtype = pixels.dtype.newbyteorder("=")
        self._nodata = nodata
        self._pad = (
            nodata if nodata is not None else (float("nan") if self._dtype.kind == "f" else 0)
        )
        self._stream = cupy.cuda.Stream(non_blocking=True)
        self._local = threading.local()  # nvCOMP codecs and staging buffers: one per thread
        self._pinned: dict[tuple[str, tuple[int, ...]], np.ndarray] = {}

    @property
    def xp(self) -> Any:
        return self._cupy

    @property
    def name(self) -> str:
        decode = self._decode["pixels"]
        files = " remote files" if self._remote else ""
        return f"kvikIO{files} ({self._threads} thread(s)), {decode} decode"

    @property
    def has_quality(self) -> bool:
        return self._quality_chunks is not None

    def _choose_decode(self, decode: Decode, compressor: str | None) -> str:
        if compressor is None:
            return "none"
        if decode == "host":
            return "host"
        reason = None
        if compressor != "zstd":
            reason = f"nvCOMP does not decode {compressor} chunks"
        elif not importable("nvidia.nvcomp"):
            reason = "nvCOMP is not installed (pip install nvidia-nvcomp-cu13)"
        if reason is None:
            return "nvcomp"
        if decode == "nvcomp":
            raise DatacubeError(f"decode='nvcomp' is not possible: {reason}.")
        self.fallbacks.append(
            f"{compressor} chunks are decoded on the host and copied to the GPU: {reason}"
        )
        return "host"

    def reading_stream(self) -> Any:
        """The side stream a background reader works on (CuPy's current stream inside)."""
        return self._stream

    def read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
        """Fill ``pixels[k]`` (and ``classes[k]``) with window ``k``; work is queued on
        CuPy's current stream, which is synchronised before returning. On the null stream
        (a caller without a stream of its own, e.g. ``iter_batches(prefetch=0)``), the work
        runs on the reader's own stream instead: nvCOMP refuses stream 0. kvikIO writes are
        not stream-ordered either way, so work queued on the buffers must have finished."""
        if self._cupy.cuda.get_current_stream().ptr == 0:
            with self._stream:
                self._read(windows, pixels, classes)
        else:
            self._read(windows, pixels, classes)

    def _read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
        tuples = [(int(t), int(r), int(c)) for t, r, c in windows.tolist()]
        on_host = {
            "pixels": self._decode["pixels"] == "host",
            "quality": classes is not None and self._decode["quality"] == "host",
        }
        if any(on_host.values()):
            self._read_host(
                windows,
                pixels if on_host["pixels"] else None,
                classes if on_host["quality"] else None,
            )
        refs, outside = self._chunks.plan(tuples)
        if not on_host["pixels"]:
            self._read_chunks(self._decode["pixels"], self._chunks, refs, pixels)
        if classes is not None and self._quality_chunks is not None and not on_host["quality"]:
            qrefs, _ = self._quality_chunks.plan(tuples)
            self._read_chunks(self._decode["quality"], self._quality_chunks, qrefs, classes)
        for k, (oy, ox) in enumerate(outside):  # the part of a padded window past the raster
            if oy:
                pixels[k, :, pixels.shape[-2] - oy :, :] = self._pad
                if classes is not None:
                    classes[k, classes.shape[-2] - oy :, :] = PixelClass.NODATA
            if ox:
                pixels[k, :, :, pixels.shape[-1] - ox :] = self._pad
                if classes is not None:
                    classes[k, :, classes.shape[-1] - ox :] = PixelClass.NODATA
        self._cupy.cuda.get_current_stream().synchronize()

    def _read_chunks(
        self, decode: str, chunks: ChipChunks, refs: Sequence[ChunkRef | None], target: Any
    ) -> None:
        fill = chunks.layout.fill_value
        for k, ref in enumerate(refs):
            if ref is None:
                target[k].fill(fill)
        present = [(k, ref) for k, ref in enumerate(refs) if ref is not None]
        if not present:
            return
        files = _Files(self._kvikio, chunks.layout.location.options)
        try:
            if decode == "none":
                self._read_raw(present, target, chunks.layout, files)
            else:
                self._read_nvcomp(present, target, chunks.layout, files)
        finally:
            files.close()

    def _read_raw(
        self,
        present: list[tuple[int, ChunkRef]],
        target: Any,
        layout: ArrayLayout,
        files: _Files,
    ) -> None:
        """Uncompressed: each chunk's bytes go straight into its slot (cuFile DMA with GDS);
        checksummed chunks are read to pinned host memory, checked, then copied up."""
        if not layout.checksum:
            slots = [(ref, target[k].view(self._cupy.uint8).ravel()) for k, ref in present]
            pread_chunks(self._kvikio, slots, files)
            return
        nbytes = layout.chunk_nbytes
        stream = self._cupy.cuda.get_current_stream()
        sizes, starts = _stored_layout(present, files)
        with self._reused("pinned").lend(int(starts[-1]), stream) as host:
            self._read_checked(present, host, starts, sizes, files)
            for i, (k, _) in enumerate(present):
                slot = target[k].view(self._cupy.uint8).ravel()
                slot.set(host[starts[i] : starts[i] + nbytes], stream=stream)

    def _read_checked(
        self,
        present: list[tuple[int, ChunkRef]],
        host: np.ndarray,
        starts: np.ndarray,
        sizes: list[int],
        files: _Files,
    ) -> None:
        """Stored bytes of the chunks into pinned host memory at ``starts`` with kvikIO's
        pool, each chunk's crc32c checked there (before anything reaches the GPU)."""
        from xclay.datacube.chunks import crc32c_matches

        _read_stored(files, present, host, starts, sizes)
        for i, (_, ref) in enumerate(present):
            chunk = host[starts[i] : starts[i] + sizes[i]]
            if sizes[i] < 4 or not crc32c_matches(chunk[:-4], chunk[-4:]):
                raise DataIntegrityError(
                    f"{ref.path} at byte {ref.offset}: the chunk's checksum does not match its "
                    "bytes; the datacube is damaged. Rewrite it (or remove it and rerun the "
                    "ingest)."
                )

    def _reused(self, kind: Literal["pinned", "staging"]) -> _Reused:
        """This thread's buffer of ``kind``: pinned host memory, or device staging."""
        reused: _Reused | None = getattr(self._local, kind, None)
        if reused is None:
            make = _pinned_bytes if kind == "pinned" else self._device_bytes
            reused = _Reused(make, self._cupy.cuda.Event(disable_timing=True))
            setattr(self._local, kind, reused)
        return reused

    def _device_bytes(self, nbytes: int) -> Any:
        return self._cupy.empty(nbytes, dtype=self._cupy.uint8)

    def _read_nvcomp(
        self,
        present: list[tuple[int, ChunkRef]],
        target: Any,
        layout: ArrayLayout,
        files: _Files,
    ) -> None:
        """zstd: encoded bytes into one device staging buffer, then one nvCOMP batch decode
        straight into the chips' slots (no per-chunk copy). Checksummed chunks are read to
        pinned host memory and checked first, then copied up in one transfer."""
        from nvidia import nvcomp

        cupy = self._cupy
        nbytes = layout.chunk_nbytes
        stream = cupy.cuda.get_current_stream()
        sizes, starts = _stored_layout(present, files)
        total = int(starts[-1])
        with self._reused("staging").lend(total, stream) as staging:
            if layout.checksum:
                with self._reused("pinned").lend(total, stream) as host:
                    self._read_checked(present, host, starts, sizes, files)
                    staging[:total].set(host[:total], stream=stream)
                payloads = [s - 4 for s in sizes]  # the stored bytes without their checksum
            else:
                _read_stored(files, present, staging, starts, sizes)
                payloads = sizes
            codec = self._codec(nvcomp, stream.ptr)
            encoded = nvcomp.as_arrays(
                [staging[starts[i] : starts[i] + payloads[i]] for i in range(len(present))],
                cuda_stream=stream.ptr,
            )
            slots = nvcomp.as_arrays(
                [target[k].view(cupy.uint8).ravel() for k, _ in present], cuda_stream=stream.ptr
            )
            decoded = codec.decode(encoded, out=slots)
        for (_, ref), got in zip(present, decoded.buffer_sizes, strict=True):
            if int(got) != nbytes:
                raise DataIntegrityError(
                    f"{ref.path}: decoded {int(got)} bytes, expected {nbytes}; the datacube is "
                    "damaged."
                )

    def _codec(self, nvcomp: Any, stream: int) -> Any:
        """An nvCOMP zstd codec for this thread and stream (codecs are not thread-safe)."""
        codecs: dict[int, Any] = self._local.__dict__.setdefault("codecs", {})
        if stream not in codecs:
            codecs[stream] = nvcomp.Codec(
                algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW, cuda_stream=stream
            )
        return codecs[stream]

    def _read_host(self, windows: np.ndarray, pixels: Any | None, classes: Any | None) -> None:
        """Host decode (threads) into pinned memory, then one copy per array and read."""
        stream = self._cupy.cuda.get_current_stream()
        staged = [self._pinned_like(name, a) for name, a in (("px", pixels), ("q", classes))]
        self._host.read(windows, staged[0], staged[1])
        for device, host in zip((pixels, classes), staged, strict=True):
            if device is not None:
                device.set(host, stream=stream)
        stream.synchronize()  # the pinned buffers are reused by the next read

    def _pinned_like(self, name: str, target: Any | None) -> np.ndarray | None:
        if target is None:
            return None
        key = (name, tuple(target.shape))
        pinned = self._pinned.get(key)
        if pinned is None:
            import torch

            from xclay.devices import torch_dtype

            pinned = torch.empty(
                target.shape, dtype=torch_dtype(np.dtype(target.dtype)), pin_memory=True
            ).numpy()
            self._pinned[key] = pinned
        return pinned

    def close(self) -> None:
        """Nothing of its own to release: the host reader belongs to whoever made it."""


def _set_kvikio_threads(kvikio: Any, threads: int) -> int:
    """Size kvikIO's thread pool for this machine (it starts with one thread)."""
    try:
        kvikio.defaults.set("num_threads", int(threads))
        return int(kvikio.defaults.get("num_threads"))
    except Exception as err:  # an older kvikIO: keep its pool, say so
        log.info("kvikIO thread pool left as it is: %s", err)
        return -1


def aligned_starts(sizes: Sequence[int]) -> np.ndarray:
    """Where each of chunks of ``sizes`` bytes starts in one buffer, 16-byte aligned (what
    nvCOMP asks of the buffers it decodes from); the last entry is the buffer's length."""
    padded = [-(-size // 16) * 16 for size in sizes]
    return np.concatenate([[0], np.cumsum(padded, dtype=np.int64)]).astype(np.int64)


def pread_chunks(
    kvikio: Any, reads: Sequence[tuple[ChunkRef, Any]], files: _Files | None = None
) -> None:
    """Read each chunk's stored bytes into its buffer (host or device memory, filled whole)
    with kvikIO, every read in flight at once on its thread pool; a shard file (or object)
    is opened once. A short read is a :class:`~xclay.errors.DataIntegrityError` naming the
    file, and so is a chunk or shard object that is not there.

    Parameters
    ----------
    kvikio
        The imported ``kvikio`` module.
    reads
        Each chunk, and the buffer its stored bytes go to.
    files
        The handles open for this read (a remote chunk's size may have opened it); none:
        opened here, and closed before returning.
    """
    own = files is None
    handles = files if files is not None else _Files(kvikio, {})
    try:
        ends: dict[str, int] = {}
        for ref, buf in reads:
            ends[ref.path] = max(ends.get(ref.path, 0), ref.offset + int(buf.nbytes))
        futures = [
            (ref, buf, handles.open(ref.path, ends[ref.path]).pread(buf, buf.nbytes, ref.offset))
            for ref, buf in reads
        ]
        for ref, buf, future in futures:
            got = handles.wait(ref.path, future)
            if got != buf.nbytes:
                raise DataIntegrityError(
                    f"{ref.path}: chunk cut short ({got} of {buf.nbytes} bytes at byte "
                    f"{ref.offset}); the datacube is damaged."
                )
    finally:
        if own:
            handles.close()


def _stored_layout(
    present: list[tuple[int, ChunkRef]], files: _Files
) -> tuple[list[int], np.ndarray]:
    """Each chunk's stored size, and where it starts (16-byte aligned) in one buffer that
    holds them side by side; the last start is the buffer's length."""
    sizes = [files.size(ref) for _, ref in present]
    return sizes, aligned_starts(sizes)


def _read_stored(
    files: _Files,
    present: list[tuple[int, ChunkRef]],
    into: Any,
    starts: np.ndarray,
    sizes: list[int],
) -> None:
    """The chunks' stored bytes into ``into`` (pinned host memory or device staging) at
    ``starts``."""
    pread_chunks(
        files.kvikio,
        [(ref, into[starts[i] : starts[i] + sizes[i]]) for i, (_, ref) in enumerate(present)],
        files,
    )


def _pinned_bytes(nbytes: int) -> np.ndarray:
    import torch

    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()


class _Reused:
    """A buffer one thread reuses read after read (pinned host memory, device staging) that
    work queued on a CUDA stream reads after :meth:`lend` has returned: async copies out of
    pinned memory, nvCOMP decodes out of staging. kvikIO fills it outside any stream, so
    lending it again first waits for everything queued on it during the last loan (an
    event recorded as that loan ends), and so does replacing it with a larger one (its
    memory would go back to an allocator while still being read).

    Parameters
    ----------
    make
        Makes a buffer of at least the bytes asked for.
    event
        A CUDA event (``cupy.cuda.Event``), recorded on the lending stream at each loan's end.
    """

    def __init__(self, make: Callable[[int], Any], event: Any) -> None:
        self._make = make
        self._buffer: Any = None
        self._event = event
        self._lent = False  # the event marks the end of a loan not yet waited for

    @contextlib.contextmanager
    def lend(self, nbytes: int, stream: Any) -> Iterator[Any]:
        """The buffer, at least ``nbytes`` long, for work queued on ``stream`` inside."""
        if self._lent:
            self._event.synchronize()
            self._lent = False
        if self._buffer is None or self._buffer.nbytes < nbytes:
            # Grown to 1.5x what is needed: compressed sizes vary from read to read.
            self._buffer = self._make(nbytes + nbytes // 2)
        try:
            yield self._buffer
        finally:
            stream.record(self._event)
            self._lent = True


class _Files:
    """kvikIO handles for one read: a shard file (or object) is opened once for all its
    chunks; local files as ``CuFile``, S3 and HTTP objects as ``RemoteFile``
    (:func:`xclay.storage.gpufiles.kvikio_file`, with the store's ``options``)."""

    def __init__(self, kvikio: Any, options: dict[str, Any]) -> None:
        self.kvikio = kvikio
        self._options = options
        self._open: dict[str, Any] = {}

    def open(self, path: str, end: int | None = None) -> Any:
        """The handle of ``path``; ``end``: where the last range read from it ends (a remote
        one is then opened without asking the server its size)."""
        handle = self._open.get(path)
        if handle is None:
            where = location(path, self._options)
            try:
                handle = kvikio_file(self.kvikio, where, end)
            except RuntimeError as err:  # libcurl's failures, a 404 among them
                raise _remote_error(path, err) from err
            self._open[path] = handle
        return handle

    def size(self, ref: ChunkRef) -> int:
        """A chunk's stored size: its shard index's, or its file's (a remote chunk object's
        from the server: it is opened for the read that follows)."""
        if ref.nbytes is not None:
            return ref.nbytes
        where = location(ref.path)
        if where.is_local:
            return where.path.stat().st_size
        return int(self.open(ref.path).nbytes())

    def wait(self, path: str, future: Any) -> int:
        try:
            return int(future.get())
        except RuntimeError as err:
            raise _remote_error(path, err) from err

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def _remote_error(path: str, err: RuntimeError) -> Exception:
    """A failed kvikIO remote read as xclay names it: an object that is not there is damage
    (remote stores read here write every chunk), anything else a storage error."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "404" in text:
        return DataIntegrityError(
            f"{path}: the chunk (or its shard) is missing from a datacube that writes every "
            "chunk; the datacube is damaged. Rewrite it (or remove it and rerun the ingest)."
        )
    return StorageError(f"{path}: kvikIO could not read it ({text}).")


def device_tiles(layout: ArrayLayout) -> TileReader:
    """Whole chunks of ``layout`` read into GPU memory by a :class:`KvikioChunkSource`, the
    reader the batch path uses: ``open_datacube(engine="kvikio")``'s variables read through
    it (:class:`xclay.datacube.source.StoreArray`), so xarray and the batch path share one
    GPU read route. :class:`UnsupportedLayout` where it does not read the layout.

    Parameters
    ----------
    layout
        The array's chunk layout: square chunks of one time step and all bands.
    """
    import torch

    from xclay.devices import ThreadBudget

    edge = tile_edge(layout)
    source = KvikioChunkSource(
        layout,
        None,
        chip_size=edge,
        nodata=None,
        threads=ThreadBudget.for_device(torch.device("cuda")),
        host=cast("BatchSource", HostTiles(layout)),
    )
    slot = (1, *layout.chunk_shape[1:]) if len(layout.shape) == 3 else layout.chunk_shape[1:]

    def read(windows: np.ndarray, out: Any) -> None:
        source.read(windows, out.reshape(len(windows), *slot), None)

    return read
