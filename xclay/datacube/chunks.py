r"""Chip windows straight from Zarr v3 chunk files, into buffers the caller owns.

A datacube written by :func:`xclay.write_datacube` stores one chunk per chip
window (all bands), so reading a chip is reading one chunk: find its bytes
(a file, or a byte range of a shard), check them, decode them (nothing, zstd,
or Blosc), and place them in the batch buffer. What the store is comes from
zarr-python: the array's metadata (chunk grid, chunk keys, codecs, data type,
fill value) is its ``ArrayV3Metadata``, and shard indexes are decoded (their
checksums checked) by the sharding codec's own index codecs. What zarr-python
does not do is kept here: one ``pread`` (or ranged GET) a chunk into a
preallocated buffer, uncompressed chunks straight into the batch buffer, and
the same reads issued into device memory by :mod:`xclay.datacube.gpuchunks`.

Integrity: a chunk whose ``crc32c`` does not match its bytes, a chunk or shard
cut short, and a chunk missing from a store that writes every chunk
(``xclay_integrity`` in the array's attributes) are
:class:`~xclay.errors.DataIntegrityError`\ s naming the chunk, never data.

Layouts it does not cover (other codecs, transposes, variable chunk grids)
raise :class:`UnsupportedLayout`, and callers fall back to xarray/zarr reads.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from zarr.codecs import (
    BloscCodec,
    BytesCodec,
    Crc32cCodec,
    ShardingCodec,
    ShardingCodecIndexLocation,
    ZstdCodec,
)
from zarr.codecs.bytes import Endian
from zarr.core.array_spec import ArrayConfig, ArraySpec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.codec_pipeline import BatchedCodecPipeline
from zarr.core.dtype import UInt64
from zarr.core.metadata.v3 import ArrayV3Metadata
from zarr.core.sync import sync as zarr_sync

from xclay.errors import DataIntegrityError, StorageError, UnsupportedLayout
from xclay.storage import Location, StorageOptions, Where, location
from xclay.storage.ranges import ByteRange, gathers, read_ranges

__all__ = [
    "ArrayLayout",
    "ChipChunks",
    "ChunkRef",
    "DirectWindowReader",
    "UnsupportedLayout",
]

_EMPTY = np.uint64(2**64 - 1)  # a shard index entry for an inner chunk that was never written


@dataclass(frozen=True)
class ChunkRef:
    """Where one chunk's encoded bytes are: a file, and a byte range of it (None: whole file).

    Attributes
    ----------
    path
        The file that holds the chunk: its own chunk file, or the shard file it is in.
    offset
        Where the chunk's bytes start in the file, in bytes (0 for a chunk file).
    nbytes
        How many bytes the stored chunk takes, its crc32c included where there is one;
        ``None``: the whole file (a chunk of an unsharded array).
    """

    path: str
    offset: int
    nbytes: int | None


@dataclass(frozen=True)
class ArrayLayout:
    """How a Zarr v3 array's chunks lie in its store (:meth:`open` reads it from
    ``zarr.json`` through zarr-python's own metadata model).

    Attributes
    ----------
    location
        The array's directory: its ``zarr.json`` and chunk (or shard) files, on a local
        disk or on object storage.
    metadata
        The array's metadata as zarr-python reads it: chunk grid, chunk key encoding,
        codecs (the sharding codec's index codecs among them), data type, fill value.
    shape
        The array's shape, ``(time, band, y, x)`` for a datacube's pixels.
    dtype
        The stored data type, in the byte order of the ``bytes`` codec.
    chunk_shape
        The unit read and decoded: the chunk, or the inner chunk of a sharded array.
    fill_value
        The value of chunks that were never written.
    compressor
        ``None``, ``"zstd"`` or ``"blosc"``.
    codec_config
        The compressor's configuration (empty without one).
    shard_shape
        The shape of a shard (the outer chunk grid); ``None``: the array is not sharded.
    index_at_end
        The shard index is at the end of each shard file (False: at its start).
    checksum
        Each stored chunk ends with the crc32c of what precedes it.
    every_chunk_written
        A missing chunk is damage (:class:`~xclay.errors.DataIntegrityError`), not the
        fill value: the store says it writes every chunk, and its chunks are checksummed.
    """

    location: Location
    metadata: ArrayV3Metadata
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunk_shape: tuple[int, ...]
    fill_value: Any
    compressor: str | None
    codec_config: dict[str, Any]
    shard_shape: tuple[int, ...] | None
    index_at_end: bool
    checksum: bool = False
    every_chunk_written: bool = False

    @classmethod
    def open(cls, array: Where, storage_options: StorageOptions | None = None) -> ArrayLayout:
        """Read ``zarr.json`` of one array (a path, a URL or a
        :class:`~xclay.storage.Location`); :class:`UnsupportedLayout` if it is not one of the
        layouts xclay writes (or compatible ones)."""
        path = location(array, storage_options)
        try:
            raw = (path / "zarr.json").read_bytes()
        except FileNotFoundError as err:
            raise UnsupportedLayout(f"no readable zarr.json in {path} ({err})") from err
        except StorageError:
            raise  # the store cannot be reached: not damage
        except OSError as err:
            raise _damaged_metadata(path, err) from err
        try:
            document = json.loads(raw)
        except ValueError as err:
            raise _damaged_metadata(path, err) from err
        if not isinstance(document, dict):
            raise _damaged_metadata(path, "not a JSON object")
        if document.get("zarr_format") != 3 or document.get("node_type") != "array":
            raise UnsupportedLayout("not a Zarr v3 array")
        try:
            metadata = ArrayV3Metadata.from_dict(document)
        except (ValueError, TypeError, KeyError) as err:  # what zarr-python cannot read either
            raise UnsupportedLayout(f"metadata zarr-python does not read ({err})") from err
        return cls.from_metadata(path, metadata)

    @classmethod
    def from_metadata(cls, path: Location, metadata: ArrayV3Metadata) -> ArrayLayout:
        """The layout of the array at ``path`` whose metadata zarr-python has read;
        :class:`UnsupportedLayout` where xclay's reads do not cover it."""
        grid = metadata.chunk_grid
        if not isinstance(grid, RegularChunkGrid):
            raise UnsupportedLayout(f"chunk grid {type(grid).__name__}")
        outer = tuple(int(n) for n in grid.chunk_shape)
        codecs = tuple(metadata.codecs)
        shard_shape, index_at_end = None, True
        if codecs and isinstance(codecs[0], ShardingCodec):
            sharding = codecs[0]
            if len(codecs) != 1:
                raise UnsupportedLayout("codecs after sharding")
            if not _bytes_then(sharding.index_codecs, (Crc32cCodec,)):
                raise UnsupportedLayout(
                    f"shard index codecs {_names(sharding.index_codecs)} (an index without a "
                    "checksum)"
                )
            shard_shape, chunk_shape = outer, tuple(int(n) for n in sharding.chunk_shape)
            index_at_end = sharding.index_location == ShardingCodecIndexLocation.end
            codecs = tuple(sharding.codecs)
        else:
            chunk_shape = outer
        dtype, compressor, config, checksum = _codecs(metadata, codecs)
        integrity = metadata.attributes.get("xclay_integrity") or {}
        return cls(
            location=path,
            metadata=metadata,
            shape=tuple(int(n) for n in metadata.shape),
            dtype=dtype,
            chunk_shape=chunk_shape,
            fill_value=metadata.fill_value,
            compressor=compressor,
            codec_config=config,
            shard_shape=shard_shape,
            index_at_end=index_at_end,
            checksum=checksum,
            every_chunk_written=bool(integrity.get("every_chunk_written")) and checksum,
        )

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def key(self, grid_index: Sequence[int]) -> str:
        """The store key of the chunk (or shard) at ``grid_index``, as the array's chunk key
        encoding spells it."""
        return self.metadata.chunk_key_encoding.encode_chunk_key(tuple(int(i) for i in grid_index))


def _damaged_metadata(path: Location, why: object) -> DataIntegrityError:
    return DataIntegrityError(
        f"{path / 'zarr.json'} cannot be read ({why}); the store is damaged: rewrite it."
    )


def _bytes_then(codecs: Sequence[object], rest: tuple[type, ...]) -> bool:
    """Whether ``codecs`` are the ``bytes`` codec followed by exactly ``rest``."""
    return (
        len(codecs) == 1 + len(rest)
        and isinstance(codecs[0], BytesCodec)
        and all(isinstance(c, kind) for c, kind in zip(codecs[1:], rest, strict=True))
    )


def _codecs(
    metadata: ArrayV3Metadata, codecs: Sequence[object]
) -> tuple[np.dtype[Any], str | None, dict[str, Any], bool]:
    """dtype, compressor (None, zstd, blosc), its configuration, and whether a crc32c
    follows, from a chunk codec chain."""
    if not codecs or not isinstance(codecs[0], BytesCodec):
        raise UnsupportedLayout(f"codecs {_names(codecs)} (array-to-array codecs)")
    try:
        dtype = np.dtype(metadata.data_type.to_native_dtype())
    except TypeError as err:
        raise UnsupportedLayout(f"data type {metadata.data_type}") from err
    if dtype.kind not in "biuf":
        raise UnsupportedLayout(f"data type {dtype}")
    if dtype.itemsize > 1:
        big = codecs[0].endian == Endian.big
        dtype = dtype.newbyteorder(">" if big else "<")
    rest = list(codecs[1:])
    checksum = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    if checksum:
        rest = rest[:-1]
    if not rest:
        return dtype, None, {}, checksum
    if len(rest) == 1 and isinstance(rest[0], ZstdCodec | BloscCodec):
        described = rest[0].to_dict()
        config = described.get("configuration", {})
        return (
            dtype,
            str(described["name"]),
            dict(config) if isinstance(config, dict) else {},
            checksum,
        )
    raise UnsupportedLayout(f"bytes-to-bytes codecs {_names(rest)}")


def _names(codecs: Sequence[Any]) -> list[str]:
    """The codecs' names as ``zarr.json`` spells them."""
    return [str(c.to_dict().get("name", type(c).__name__)) for c in codecs]


class ChunkLocator:
    """Finds chunk bytes: one file per chunk, or a range of a shard (indexes read once and
    cached).

    Where requests are costly (:func:`~xclay.storage.ranges.gathers`: object storage), a
    chunk file is not looked for before it is read (a missing one is found missing when
    read), and :meth:`find_many` reads the indexes of all the shards it needs at once.
    """

    def __init__(self, layout: ArrayLayout) -> None:
        self.layout = layout
        self.gathers = gathers(layout.location)
        per_shard = (
            [s // c for s, c in zip(layout.shard_shape, layout.chunk_shape, strict=True)]
            if layout.shard_shape is not None
            else []
        )
        self._per_shard = per_shard
        # A local array's folder as a Path: finding a chunk file is then what it always was.
        self._root = None if self.gathers else layout.location.path
        self._indexes: dict[tuple[int, ...], np.ndarray | None] = {}
        self._lock = threading.Lock()
        if per_shard:
            sharding = layout.metadata.codecs[0]
            assert isinstance(sharding, ShardingCodec)
            self._index_pipeline = BatchedCodecPipeline.from_codecs(sharding.index_codecs)
            self._index_spec = ArraySpec(
                shape=(*per_shard, 2),
                dtype=UInt64(endianness="little"),
                fill_value=_EMPTY,
                config=ArrayConfig.from_dict({}),
                prototype=default_buffer_prototype(),
            )

    def find(self, chunk: Sequence[int]) -> ChunkRef | None:
        """The bytes of the chunk at ``chunk`` (grid index), or None if it was never written
        (it then holds the fill value)."""
        lay = self.layout
        if lay.shard_shape is None:
            if self._root is None:  # found missing when read
                return ChunkRef(str(lay.location / lay.key(chunk)), 0, None)
            path = self._root / lay.key(chunk)
            return ChunkRef(str(path), 0, None) if path.is_file() else None
        shard, inner = self._shard_of(chunk)
        index = self._index(shard)
        if index is None:
            return None
        offset, nbytes = index[np.ravel_multi_index(inner, self._per_shard)]
        if offset == _EMPTY and nbytes == _EMPTY:
            return None
        where = (
            self._root / lay.key(shard) if self._root is not None else lay.location / lay.key(shard)
        )
        return ChunkRef(str(where), int(offset), int(nbytes))

    def find_many(self, chunks: Sequence[Sequence[int]]) -> list[ChunkRef | None]:
        """:meth:`find` for each chunk, the indexes of the shards not read yet read together
        first."""
        self._read_indexes(chunks)
        return [self.find(c) for c in chunks]

    def _read_indexes(self, chunks: Sequence[Sequence[int]]) -> None:
        wanted = self.index_ranges(chunks)
        if wanted:
            self.take_indexes(wanted, read_ranges([r for _, r in wanted]))

    def index_ranges(
        self, chunks: Sequence[Sequence[int]]
    ) -> list[tuple[tuple[int, ...], ByteRange]]:
        """The byte ranges of the indexes not read yet of the shards that hold ``chunks``
        (grid indices), each with its shard; none for an unsharded array. For a caller that
        reads them together with other ranges: :meth:`take_indexes` then checks and keeps
        them."""
        if not self._per_shard:
            return []
        shards = {self._shard_of(c)[0] for c in chunks}
        with self._lock:
            todo = sorted(s for s in shards if s not in self._indexes)
        size = self._index_nbytes()
        lay = self.layout
        start = -size if lay.index_at_end else 0
        return [(s, ByteRange(lay.location / lay.key(s), start, size)) for s in todo]

    def take_indexes(
        self, wanted: Sequence[tuple[tuple[int, ...], ByteRange]], data: Sequence[Any]
    ) -> None:
        """Check and keep shard indexes read as :meth:`index_ranges` said (None: the shard
        does not exist: its chunks were never written)."""
        size = self._index_nbytes()
        found: dict[tuple[int, ...], np.ndarray | None] = {}
        read: list[tuple[tuple[int, ...], ByteRange, Any]] = []
        for (shard, r), raw in zip(wanted, data, strict=True):
            if raw is None:
                found[shard] = None
            elif len(memoryview(raw)) != size:
                raise DataIntegrityError(
                    f"{r.where}: shard index truncated ({len(memoryview(raw))} of {size} "
                    "bytes); the shard is damaged."
                )
            else:
                read.append((shard, r, raw))
        for shard, entries in zip((s for s, _, _ in read), self._decode_indexes(read), strict=True):
            found[shard] = entries
        with self._lock:
            self._indexes.update(found)

    def missing(self, chunk: Sequence[int]) -> None:
        """A chunk that was not found: damage in a store that writes every chunk (an error
        naming it), the fill value otherwise."""
        if self.layout.every_chunk_written:
            lay = self.layout
            if lay.shard_shape is None:
                where = lay.location / lay.key(chunk)
            else:
                where = lay.location / lay.key(self._shard_of(chunk)[0])
            raise DataIntegrityError(
                f"{where}: chunk {tuple(int(i) for i in chunk)} is missing from a datacube that "
                "writes every chunk; the datacube is damaged. Rewrite it (or remove it and "
                "rerun the ingest)."
            )

    def _shard_of(self, chunk: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        per = self._per_shard
        shard = tuple(int(i) // n for i, n in zip(chunk, per, strict=True))
        inner = tuple(int(i) % n for i, n in zip(chunk, per, strict=True))
        return shard, inner

    def _index_nbytes(self) -> int:
        entries = 16 * int(np.prod(self._per_shard))  # an offset and a size, uint64 each
        return int(self._index_pipeline.compute_encoded_size(entries, self._index_spec))

    def _decode_indexes(
        self, read: Sequence[tuple[tuple[int, ...], ByteRange, Any]]
    ) -> list[np.ndarray]:
        """Shard indexes decoded (and their checksums checked) by zarr-python's codecs of
        the array's shard index: each an ``(inner chunks, 2)`` array of offsets and sizes."""
        if not read:
            return []
        prototype = default_buffer_prototype()
        pairs = [(prototype.buffer.from_bytes(bytes(raw)), self._index_spec) for _, _, raw in read]
        try:
            decoded = zarr_sync(self._index_pipeline.decode(pairs))
        except ValueError:  # zarr's crc32c codec: "Stored and computed checksum do not match"
            decoded = [None] * len(read)
        out = []
        for (_, r, raw), entries in zip(read, decoded, strict=True):
            if entries is None:  # which index is damaged: each decoded alone
                entries = self._decode_one(r, raw)
            out.append(entries.as_numpy_array().astype("<u8", copy=False).reshape(-1, 2))
        return out

    def _decode_one(self, r: ByteRange, raw: Any) -> Any:
        buffer = default_buffer_prototype().buffer.from_bytes(bytes(raw))
        try:
            (entries,) = zarr_sync(self._index_pipeline.decode([(buffer, self._index_spec)]))
        except ValueError as err:
            raise DataIntegrityError(
                f"{r.where}: the shard index checksum does not match its bytes ({err}); the "
                "shard is damaged."
            ) from err
        if entries is None:
            raise DataIntegrityError(f"{r.where}: the shard index is empty; the shard is damaged.")
        return entries

    def _index(self, shard: tuple[int, ...]) -> np.ndarray | None:
        with self._lock:
            if shard in self._indexes:
                return self._indexes[shard]
        per = self._per_shard
        self._read_indexes([tuple(s * n for s, n in zip(shard, per, strict=True))])
        with self._lock:
            return self._indexes[shard]


def crc32c_matches(data: Any, stored: Any) -> bool:
    """Whether ``stored`` (4 bytes, little-endian, as Zarr's ``crc32c`` codec writes them)
    is the CRC32C of ``data`` (any bytes-like object)."""
    return crc32c(data) == int.from_bytes(bytes(stored), "little")


def crc32c(data: Any) -> int:
    """The CRC32C (Castagnoli) of a bytes-like object, without copying it: google-crc32c's
    hardware-accelerated library called on the buffer itself (its Python API accepts only
    ``bytes``, which would cost a copy of every chunk); a copy through that API where the
    library cannot be loaded."""
    array = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    array = array.reshape(-1).view(np.uint8)
    extend = _native_crc32c()
    if extend is not None and array.flags.c_contiguous:
        return int(extend(0, array.ctypes.data, array.nbytes))
    import google_crc32c

    return int(google_crc32c.value(array.tobytes()))


@functools.cache
def _native_crc32c() -> Any:
    import ctypes

    import google_crc32c

    package = Path(google_crc32c.__file__).parent
    for lib in sorted((package.parent / "google_crc32c.libs").glob("libcrc32c*.so*")):
        try:
            extend = ctypes.CDLL(str(lib)).crc32c_extend
        except (OSError, AttributeError):
            continue
        extend.restype = ctypes.c_uint32
        extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return extend  # ctypes calls release the GIL: threads check chunks in parallel
    return None


def _check_window_layout(layout: ArrayLayout) -> None:
    """A ``(time, band, y, x)`` or ``(time, y, x)`` array with one time step and all bands
    per chunk: the layouts whose chip windows are read chunk by chunk."""
    if layout.shape[0] < 1 or len(layout.shape) not in (3, 4):
        raise UnsupportedLayout(f"array of shape {layout.shape}")
    if len(layout.shape) == 4 and layout.chunk_shape[1] != layout.shape[1]:
        raise UnsupportedLayout("bands split across chunks")
    if layout.chunk_shape[0] != 1:
        raise UnsupportedLayout("several time steps per chunk")


class DirectWindowReader:
    """Reads chip windows of a ``(time, band, y, x)`` or ``(time, y, x)`` Zarr v3 array into
    host buffers: ``pread`` per chunk, decoded in place; windows may be any size at any
    place, spanning several chunks, part of one, or reaching past the raster.

    A chunk the window holds whole is decoded straight into ``out`` (or, when the bands
    of a larger window are strided, into a reused buffer and copied in). Chunks that
    windows only partly cover are decoded once into a cache (least recently used first
    out) and cut from there, so neighbouring chips that share a chunk (chips smaller than
    chunks, or not aligned with them) decode it once.

    Parameters
    ----------
    layout
        The array's chunk layout; :class:`UnsupportedLayout` unless each chunk holds one
        time step and all bands.
    pad_value
        What fills the part of a window past the raster (the nodata value, for pixels).
    cache_bytes
        The size of the cache of decoded chunks in bytes (default 256 MiB); it holds at
        least one chunk.
    """

    def __init__(
        self, layout: ArrayLayout, *, pad_value: float, cache_bytes: int = 256 << 20
    ) -> None:
        _check_window_layout(layout)
        self.layout = layout
        self.locator = ChunkLocator(layout)
        self.pad_value = pad_value
        self._decoder = _host_decoder(layout)
        self._cache = _ChunkCache(
            max(1, cache_bytes // max(1, layout.chunk_nbytes)),
            layout.chunk_shape[1:],
            layout.dtype.newbyteorder("="),
        )
        self._local = threading.local()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def read(
        self,
        t: int,
        row: int,
        col: int,
        size: int,
        out: np.ndarray,
        gathered: Gathered | None = None,
    ) -> None:
        """Fill ``out`` (``[band, size, size]``, or ``[size, size]`` for 3-D arrays) with the
        window at ``(row, col)`` of time ``t``; its chunks' stored bytes come from
        ``gathered`` (:func:`gather`) where they are there, else are read now."""
        lay = self.layout
        cy, cx = lay.chunk_shape[-2], lay.chunk_shape[-1]
        ny, nx = lay.shape[-2], lay.shape[-1]
        r0, r1 = max(row, 0), min(row + size, ny)
        c0, c1 = max(col, 0), min(col + size, nx)
        if r1 - r0 != size or c1 - c0 != size:
            out.fill(self.pad_value)
        if r0 >= r1 or c0 >= c1:
            return
        for gy in range(r0 // cy, (r1 - 1) // cy + 1):
            for gx in range(c0 // cx, (c1 - 1) // cx + 1):
                ys, ye = max(r0, gy * cy), min(r1, (gy + 1) * cy)
                xs, xe = max(c0, gx * cx), min(c1, (gx + 1) * cx)
                target = out[..., ys - row : ye - row, xs - col : xe - col]
                whole = (ye - ys, xe - xs) == (cy, cx)  # the window holds the whole chunk
                if whole and target.flags.c_contiguous:
                    self._read_chunk(t, gy, gx, target, gathered)  # in place
                    continue
                part = (..., slice(ys - gy * cy, ye - gy * cy), slice(xs - gx * cx, xe - gx * cx))
                entry = self._cache.get((t, gy, gx))
                if entry is None and whole:
                    # No other window needs it (it lies inside this one): decode it beside
                    # the window in this thread's hot buffer, rather than push shared
                    # chunks out of the cache.
                    scratch = self._scratch()
                    self._read_chunk(t, gy, gx, scratch, gathered)
                    target[...] = scratch
                    continue
                if entry is None:
                    buffer = self._cache.buffer()
                    self._read_chunk(t, gy, gx, buffer, gathered)
                    entry = self._cache.put((t, gy, gx), buffer)
                try:
                    target[...] = entry.array[part]
                finally:
                    self._cache.release(entry)

    def clear_cache(self) -> None:
        """Forget the decoded chunks (their buffers are kept for the next ones)."""
        self._cache.clear()

    def _scratch(self) -> np.ndarray:
        """This thread's chunk-sized buffer for chunks no other window needs: one hot
        buffer instead of cache entries that would only push shared chunks out."""
        buf: np.ndarray | None = getattr(self._local, "scratch", None)
        if buf is None:
            shape = self.layout.chunk_shape[1:]
            buf = self._local.scratch = np.empty(shape, self.layout.dtype.newbyteorder("="))
        return buf

    def _grid_index(self, t: int, gy: int, gx: int) -> tuple[int, ...]:
        return (t, 0, gy, gx) if len(self.layout.shape) == 4 else (t, gy, gx)

    def chunks_for(self, windows: np.ndarray, size: int) -> list[tuple[int, ...]]:
        """The grid indices of the chunks that windows ``(t, row, col)`` of ``size`` px
        cover (within the raster), but for those decoded in the cache now."""
        lay = self.layout
        cy, cx = lay.chunk_shape[-2], lay.chunk_shape[-1]
        ny, nx = lay.shape[-2], lay.shape[-1]
        seen: dict[tuple[int, ...], None] = {}
        for t, row, col in windows.tolist():
            r0, r1 = max(row, 0), min(row + size, ny)
            c0, c1 = max(col, 0), min(col + size, nx)
            if r0 >= r1 or c0 >= c1:
                continue
            # A window that is exactly one chunk decodes it in place, never from the cache.
            direct = size == cy == cx and row % cy == 0 and col % cx == 0
            for gy in range(r0 // cy, (r1 - 1) // cy + 1):
                for gx in range(c0 // cx, (c1 - 1) // cx + 1):
                    if direct or not self._cache.has((t, gy, gx)):
                        seen[self._grid_index(t, gy, gx)] = None
        return list(seen)

    def _read_chunk(
        self, t: int, gy: int, gx: int, out: np.ndarray, gathered: Gathered | None = None
    ) -> None:
        """Decode one chunk into ``out`` (C-contiguous, the chunk's shape without time)."""
        index = self._grid_index(t, gy, gx)
        if gathered is None or index not in gathered:
            if self.locator.gathers:  # not gathered (it left the cache since): read it alone
                gathered = gather_chunks([(self, [index])])[0]
            else:
                ref = self.locator.find(index)
                if ref is None:
                    self.locator.missing(index)
                    out.fill(self.layout.fill_value)
                    return
                read_chunk(self.layout, ref, out, self._decoder)
                return
        stored = gathered[index]
        if stored is None:
            self.locator.missing(index)  # damage, where the store writes every chunk
            out.fill(self.layout.fill_value)
            return
        decode_stored(self.layout, stored[0], stored[1], out, self._decoder)


# Gathered chunks: where each is and its stored bytes; None: not there (never written, or
# lost: the reader that decodes it tells which, and raises for damage).
Gathered = dict[tuple[int, ...], tuple[ChunkRef, Any] | None]


def gather(wants: Sequence[tuple[DirectWindowReader, np.ndarray, int]]) -> list[Gathered]:
    """The stored bytes of every chunk that windows need, from several arrays at once:
    what a reader on object storage does before decoding a batch.

    Parameters
    ----------
    wants
        For each array's reader, the windows ``(t, row, col)`` and their size in pixels.

    Returns
    -------
    list of dict
        For each reader, its chunks' stored bytes by grid index (chunks decoded in its
        cache now are left out), for :meth:`DirectWindowReader.read`.
    """
    return gather_chunks([(reader, reader.chunks_for(w, size)) for reader, w, size in wants])


def gather_chunks(
    wants: Sequence[tuple[DirectWindowReader, Sequence[tuple[int, ...]]]],
) -> list[Gathered]:
    """The stored bytes of chunks (grid indices) of several arrays, in at most two rounds
    of requests, each all in flight at once (:func:`~xclay.storage.ranges.read_ranges`):
    the indexes of the shards not read yet, then the chunks. A chunk that is not there is
    None, for the reader that decodes it to call damage (a store that writes every chunk)
    or the fill value."""
    indexes = [reader.locator.index_ranges(chunks) for reader, chunks in wants]
    flat = [r for wanted in indexes for _, r in wanted]
    if flat:
        data = iter(read_ranges(flat))
        for (reader, _), wanted in zip(wants, indexes, strict=True):
            reader.locator.take_indexes(wanted, [next(data) for _ in wanted])
    refs = [[reader.locator.find(c) for c in chunks] for reader, chunks in wants]
    ranges = [
        _byte_range(reader.layout, ref)
        for (reader, _), found in zip(wants, refs, strict=True)
        for ref in found
        if ref is not None
    ]
    data = iter(read_ranges(ranges))
    out: list[Gathered] = []
    for (_, chunks), found in zip(wants, refs, strict=True):
        gathered: Gathered = {}
        for chunk, ref in zip(chunks, found, strict=True):
            stored = next(data) if ref is not None else None
            gathered[chunk] = (ref, stored) if ref is not None and stored is not None else None
        out.append(gathered)
    return out


def _byte_range(layout: ArrayLayout, ref: ChunkRef) -> ByteRange:
    where = location(ref.path, layout.location.options)
    return ByteRange(where, ref.offset, ref.nbytes)


@dataclass
class _CachedChunk:
    array: np.ndarray
    pins: int = 1  # readers copying from it now: its buffer is reused only after them
    evicted: bool = False


class _ChunkCache:
    """Decoded chunks, at most ``capacity`` of them, the least recently used dropped first;
    safe to share between reading threads.

    Buffers come in slabs of several chunks (at least 8 MB: NumPy asks the kernel for
    huge pages there, and decoding into 4 KB pages was 2x slower here), and a dropped
    chunk's buffer becomes a spare for the next decode once no reader is copying from
    it (pins), so a cache that keeps missing reuses memory instead of faulting in a
    fresh chunk-sized array for every chunk it decodes.
    """

    SLAB_BYTES = 8 << 20

    def __init__(self, capacity: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
        from collections import OrderedDict

        self.capacity = capacity
        self._shape, self._dtype = tuple(shape), dtype
        self._chunks: OrderedDict[tuple[int, ...], _CachedChunk] = OrderedDict()
        self._spares: list[np.ndarray] = []
        self._made = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[int, ...]) -> _CachedChunk | None:
        """The chunk, pinned (call :meth:`release` after copying from it), or None."""
        with self._lock:
            entry = self._chunks.get(key)
            if entry is not None:
                entry.pins += 1
                self._chunks.move_to_end(key)
            return entry

    def has(self, key: tuple[int, ...]) -> bool:
        """Whether the chunk is cached now (it may leave before it is asked for)."""
        with self._lock:
            return key in self._chunks

    def put(self, key: tuple[int, ...], array: np.ndarray) -> _CachedChunk:
        """Cache a freshly decoded chunk; it comes back pinned, like :meth:`get`."""
        entry = _CachedChunk(array)
        with self._lock:
            old = self._chunks.pop(key, None)  # another thread decoded it too
            if old is not None:
                self._drop(old)
            self._chunks[key] = entry
            while len(self._chunks) > self.capacity:
                self._drop(self._chunks.popitem(last=False)[1])
        return entry

    def release(self, entry: _CachedChunk) -> None:
        with self._lock:
            entry.pins -= 1
            if entry.evicted and entry.pins == 0:
                self._keep_spare(entry.array)

    def buffer(self) -> np.ndarray:
        """A chunk-sized buffer to decode into: a spare, or one of a new slab's."""
        with self._lock:
            if not self._spares:
                nbytes = max(1, int(np.prod(self._shape)) * self._dtype.itemsize)
                room = max(1, self.capacity + 1 - self._made)  # the cache and one being read
                count = min(room, max(1, -(-self.SLAB_BYTES // nbytes)))
                slab = np.empty((count, *self._shape), self._dtype)
                self._spares.extend(slab)
                self._made += count
            return self._spares.pop()

    def clear(self) -> None:
        with self._lock:
            while self._chunks:
                self._drop(self._chunks.popitem()[1])

    def _drop(self, entry: _CachedChunk) -> None:
        entry.evicted = True
        if entry.pins == 0:
            self._keep_spare(entry.array)

    def _keep_spare(self, array: np.ndarray) -> None:
        if len(self._spares) + len(self._chunks) <= self.capacity:
            self._spares.append(array)
        else:  # one more than the cache holds was made while others were pinned
            self._made -= 1


def read_chunk(layout: ArrayLayout, ref: ChunkRef, out: np.ndarray, decoder: Any) -> None:
    """Read, check and decode one stored chunk of a local file into ``out`` (C-contiguous,
    chunk-shaped): uncompressed bytes land in ``out`` directly (the checksum read beside
    them), compressed ones are read whole and handed to :func:`decode_stored`."""
    raw = out.view(np.uint8).reshape(-1)
    trailer = 4 if layout.checksum else 0
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        if decoder is None:
            crc = bytearray(trailer)
            got = os.preadv(fd, [raw.data, crc] if trailer else [raw.data], ref.offset)
            if got != raw.size + trailer:
                raise _cut_short(layout, ref, got, raw.size + trailer)
            if trailer and not crc32c_matches(raw, crc):
                raise _mismatch(layout, ref)
            if not layout.dtype.isnative:
                out.byteswap(inplace=True)
            return
        nbytes = ref.nbytes if ref.nbytes is not None else os.fstat(fd).st_size
        encoded = os.pread(fd, nbytes, ref.offset)
    finally:
        os.close(fd)
    decode_stored(layout, ref, encoded, out, decoder)


def decode_stored(
    layout: ArrayLayout, ref: ChunkRef, stored: Any, out: np.ndarray, decoder: Any
) -> None:
    """Check one chunk's stored bytes, as read from any storage (its crc32c included where
    it has one), and decode them into ``out`` (C-contiguous, chunk-shaped): the one check
    and decode of every host read, local or remote.

    A chunk shorter than its reference says, whose checksum does not match, or that does
    not decode is a :class:`~xclay.errors.DataIntegrityError` naming it.
    """
    raw = out.view(np.uint8).reshape(-1)
    trailer = 4 if layout.checksum else 0
    payload = memoryview(stored).cast("B")
    expected = ref.nbytes if ref.nbytes is not None else None
    if decoder is None:
        expected = raw.size + trailer
    if expected is not None and len(payload) != expected:
        raise _cut_short(layout, ref, len(payload), expected)
    if trailer:
        if len(payload) < trailer or not crc32c_matches(payload[:-trailer], payload[-trailer:]):
            raise _mismatch(layout, ref)
        payload = payload[:-trailer]
    if decoder is None:
        raw[:] = np.frombuffer(payload, dtype=np.uint8)
    else:
        try:
            decoder.decode(payload, out=raw)
        except Exception as err:  # zstd/blosc report bad frames as various errors
            raise DataIntegrityError(
                f"{_chunk_name(layout, ref)}: the chunk does not decode ({err}); the "
                "datacube is damaged."
            ) from err
    if not layout.dtype.isnative:
        out.byteswap(inplace=True)


def _cut_short(layout: ArrayLayout, ref: ChunkRef, got: int, nbytes: int) -> DataIntegrityError:
    return DataIntegrityError(
        f"{_chunk_name(layout, ref)}: chunk cut short ({got} of {nbytes} bytes); the datacube "
        "is damaged."
    )


def _chunk_name(layout: ArrayLayout, ref: ChunkRef) -> str:
    where = f" at byte {ref.offset}" if ref.nbytes is not None else ""
    return f"{ref.path}{where}"


def _mismatch(layout: ArrayLayout, ref: ChunkRef) -> DataIntegrityError:
    return DataIntegrityError(
        f"{_chunk_name(layout, ref)}: the chunk's checksum does not match its bytes; the "
        "datacube is damaged. Rewrite it (or remove it and rerun the ingest)."
    )


def _host_decoder(layout: ArrayLayout) -> Any:
    if layout.compressor is None:
        return None
    import numcodecs

    if layout.compressor == "zstd":
        return numcodecs.Zstd(level=int(layout.codec_config.get("level", 0)))
    return numcodecs.Blosc()  # Blosc frames describe themselves: no settings needed to decode


class ChipChunks:
    """The chunks behind chip windows when each chip is exactly one chunk.

    ``plan(windows)`` turns ``(t, row, col)`` windows into chunk references
    (None: never written, holds the fill value) and how many rows and columns
    of each reach past the raster. Raises :class:`UnsupportedLayout` unless the
    chip size equals the chunk edge and every window starts on a chunk
    boundary: then a batch is one read (and one decode) per chip, the unit both
    the threaded host reader and the GPU reader (:mod:`xclay.datacube.gpuchunks`) work in.

    Parameters
    ----------
    layout
        The array's chunk layout, ``(time, band, y, x)`` or ``(time, y, x)``, each chunk
        one time step with all bands.
    chip_size
        Chip edge in pixels; it must equal the chunks' edge in ``y`` and ``x``.
    """

    def __init__(self, layout: ArrayLayout, chip_size: int) -> None:
        _check_window_layout(layout)
        if layout.chunk_shape[-2:] != (chip_size, chip_size):
            raise UnsupportedLayout(
                f"chunks of {layout.chunk_shape[-2:]} px for chips of {chip_size} px"
            )
        self.layout = layout
        self.locator = ChunkLocator(layout)
        self.chip_size = chip_size

    def plan(
        self, windows: Sequence[tuple[int, int, int]]
    ) -> tuple[list[ChunkRef | None], list[tuple[int, int]]]:
        size = self.chip_size
        ny, nx = self.layout.shape[-2], self.layout.shape[-1]
        indexes: list[tuple[int, ...]] = []
        outside: list[tuple[int, int]] = []
        for t, row, col in windows:
            if row % size or col % size:
                raise UnsupportedLayout(f"window at ({row}, {col}) is not on a chunk boundary")
            gy, gx = row // size, col // size
            indexes.append((t, 0, gy, gx) if len(self.layout.shape) == 4 else (t, gy, gx))
            outside.append((max(0, row + size - ny), max(0, col + size - nx)))
        refs = self.locator.find_many(indexes)
        for index, ref in zip(indexes, refs, strict=True):
            if ref is None:
                self.locator.missing(index)
        return refs, outside


#: Reads whole chunks: ``read(windows, out)`` fills ``out[k]`` (one chunk's shape less its
#: time axis) with the chunk whose origin is window ``k`` = ``(t, row, col)``.
TileReader = Callable[[np.ndarray, Any], None]


def tile_edge(layout: ArrayLayout) -> int:
    """The edge of the square chunks whole-chunk reads work in; :class:`UnsupportedLayout`
    for other layouts."""
    _check_window_layout(layout)
    cy, cx = layout.chunk_shape[-2:]
    if cy != cx:
        raise UnsupportedLayout(f"chunks of {cy} x {cx} px (not square)")
    return int(cy)


def host_tiles(layout: ArrayLayout) -> TileReader:
    """Whole chunks read into host buffers by a :class:`DirectWindowReader` (the parts of
    edge chunks past the raster hold the fill value)."""
    edge = tile_edge(layout)
    reader = DirectWindowReader(layout, pad_value=float(layout.fill_value), cache_bytes=0)

    def read(windows: np.ndarray, out: Any) -> None:
        for k, (t, row, col) in enumerate(windows.tolist()):
            reader.read(int(t), int(row), int(col), edge, out[k])

    return read


class HostTiles:
    """Whole chunks into host buffers, read as a batch source reads (``read(windows,
    pixels, classes)``, pixels only): what the GPU reader falls back to for chunks it
    decodes on the host."""

    def __init__(self, layout: ArrayLayout) -> None:
        self._read = host_tiles(layout)
        self._slot = layout.chunk_shape[1:]

    def read(self, windows: np.ndarray, pixels: Any, classes: Any | None) -> None:
        self._read(windows, pixels.reshape(len(windows), *self._slot))


def read_region(
    layout: ArrayLayout, key: tuple[Any, ...], read_tiles: TileReader, empty: Callable[..., Any]
) -> Any:
    """The region ``array[key]`` of a ``(time, band, y, x)`` or ``(time, y, x)`` array with
    square chunks (:func:`tile_edge`), assembled from the whole chunks it touches.

    Parameters
    ----------
    layout
        The array's chunk layout.
    key
        One integer or slice (any step) per dimension, as xarray's basic indexing gives.
    read_tiles
        What reads whole chunks (:func:`host_tiles`, or the GPU's
        :func:`xclay.datacube.gpuchunks.device_tiles`): the one read route for batches
        and for xarray.
    empty
        Allocates the tiles' buffer, ``empty(shape, dtype)``: ``numpy.empty`` or
        ``cupy.empty``; the region is an array of the same kind.
    """
    edge = tile_edge(layout)
    shape = layout.shape
    if len(key) != len(shape):
        raise IndexError(f"{len(key)} indices for an array of {len(shape)} dimensions")
    picks = [_as_range(k, n) for k, n in zip(key, shape, strict=True)]
    dtype = layout.dtype.newbyteorder("=")
    if any(len(r) == 0 for r in picks):
        kept = zip(picks, key, strict=True)
        return empty(tuple(len(r) for r, k in kept if isinstance(k, slice)), dtype)
    rows, cols = picks[-2], picks[-1]
    gy = range(min(rows) // edge, max(rows) // edge + 1)
    gx = range(min(cols) // edge, max(cols) // edge + 1)
    times = list(picks[0])
    windows = np.array(
        [(t, y * edge, x * edge) for t in times for y in gy for x in gx], dtype=np.int64
    ).reshape(-1, 3)
    tiles = empty((len(windows), *layout.chunk_shape[1:]), dtype)
    read_tiles(windows, tiles)
    inner = layout.chunk_shape[1:-2]  # the bands, or nothing
    tiles = tiles.reshape(len(times), len(gy), len(gx), *inner, edge, edge)
    # (time, gy, gx, [band], y, x) -> (time, [band], gy, y, gx, x): the tiles side by side
    order = (0, *range(3, 3 + len(inner)), 1, 3 + len(inner), 2, 4 + len(inner))
    mosaic = tiles.transpose(order).reshape(len(times), *inner, len(gy) * edge, len(gx) * edge)
    within = [
        slice(None),
        *(_shifted(r, 0) for r in picks[1:-2]),
        _shifted(rows, gy.start * edge),
        _shifted(cols, gx.start * edge),
    ]
    region = mosaic[tuple(within)]
    if any(not isinstance(k, slice) for k in key):  # an integer index drops its dimension
        region = region[tuple(slice(None) if isinstance(k, slice) else 0 for k in key)]
    return region


def _as_range(k: Any, n: int) -> range:
    if isinstance(k, slice):
        return range(*k.indices(n))
    i = int(k)
    if not -n <= i < n:
        raise IndexError(f"index {i} is out of bounds for a dimension of {n}")
    i %= n
    return range(i, i + 1)


def _shifted(r: range, origin: int) -> slice:
    """The slice that picks ``r`` from an axis whose first element is ``origin``."""
    start = r[0] - origin
    stop = r[-1] - origin + (1 if r.step > 0 else -1)
    return slice(start, stop if stop >= 0 else None, r.step)
