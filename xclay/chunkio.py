"""Chip windows straight from Zarr v3 chunk files, without zarr-python's per-chunk machinery.

A datacube written by :func:`xclay.write_datacube` stores one chunk per chip
window (all bands), so reading a chip is reading one chunk: find its bytes
(a file, or a byte range of a shard), decode them (nothing, zstd, or Blosc),
and place them in the batch buffer. This module does exactly that from the
Zarr v3 specification's layout (``zarr.json``: chunk grid, ``default`` chunk
keys, the ``bytes``, ``zstd``, ``blosc`` and ``sharding_indexed`` codecs), so
the host path reads a chunk with one ``pread`` (uncompressed: straight into
the batch buffer) and the GPU path can issue the same reads into device memory.

Layouts it does not cover (other codecs, transposes, variable chunk grids)
raise :class:`UnsupportedLayout`, and callers fall back to xarray/zarr reads.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ArrayLayout",
    "ChipChunks",
    "ChunkRef",
    "DirectWindowReader",
    "UnsupportedLayout",
]

_EMPTY = np.uint64(2**64 - 1)  # a shard index entry for an inner chunk that was never written
_INDEX_CRC_BYTES = 4


class UnsupportedLayout(Exception):
    """The store's layout is outside what direct reads handle; read it through zarr."""


@dataclass(frozen=True)
class ChunkRef:
    """Where one chunk's encoded bytes are: a file, and a byte range of it (None: whole file)."""

    path: str
    offset: int
    nbytes: int | None


@dataclass(frozen=True)
class ArrayLayout:
    """How a Zarr v3 array's chunks lie on disk.

    ``chunk_shape`` is the unit read and decoded: the inner chunk of a sharded
    array. ``compressor`` is ``None``, ``"zstd"`` or ``"blosc"`` (with
    ``codec_config``).
    """

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    chunk_shape: tuple[int, ...]
    fill_value: Any
    compressor: str | None
    codec_config: dict[str, Any]
    shard_shape: tuple[int, ...] | None
    index_at_end: bool
    separator: str

    @classmethod
    def open(cls, array_path: str | os.PathLike[str]) -> ArrayLayout:
        """Read ``zarr.json`` of one array; :class:`UnsupportedLayout` if it is not one of
        the layouts xclay writes (or compatible ones)."""
        path = Path(array_path)
        try:
            meta = json.loads((path / "zarr.json").read_text())
        except (OSError, ValueError) as err:
            raise UnsupportedLayout(f"no readable zarr.json in {path} ({err})") from err
        if meta.get("zarr_format") != 3 or meta.get("node_type") != "array":
            raise UnsupportedLayout("not a Zarr v3 array")
        grid = meta.get("chunk_grid", {})
        if grid.get("name") != "regular":
            raise UnsupportedLayout(f"chunk grid {grid.get('name')!r}")
        keys = meta.get("chunk_key_encoding", {"name": "default"})
        if keys.get("name") != "default":
            raise UnsupportedLayout(f"chunk key encoding {keys.get('name')!r}")
        separator = keys.get("configuration", {}).get("separator", "/")
        outer = tuple(int(n) for n in grid["configuration"]["chunk_shape"])
        codecs = list(meta.get("codecs", []))
        shard_shape, index_at_end = None, True
        if codecs and codecs[0]["name"] == "sharding_indexed":
            if len(codecs) != 1:
                raise UnsupportedLayout("codecs after sharding")
            conf = codecs[0]["configuration"]
            index_codecs = [c["name"] for c in conf.get("index_codecs", [])]
            if index_codecs not in (["bytes", "crc32c"], ["bytes"]):
                raise UnsupportedLayout(f"shard index codecs {index_codecs}")
            if index_codecs == ["bytes"]:
                raise UnsupportedLayout("shard index without a checksum")
            shard_shape, chunk_shape = outer, tuple(int(n) for n in conf["chunk_shape"])
            index_at_end = conf.get("index_location", "end") == "end"
            codecs = list(conf["codecs"])
        else:
            chunk_shape = outer
        dtype, compressor, config = _codecs(meta["data_type"], codecs)
        return cls(
            path=path,
            shape=tuple(int(n) for n in meta["shape"]),
            dtype=dtype,
            chunk_shape=chunk_shape,
            fill_value=meta.get("fill_value", 0),
            compressor=compressor,
            codec_config=config,
            shard_shape=shard_shape,
            index_at_end=index_at_end,
            separator=separator,
        )

    @property
    def chunk_nbytes(self) -> int:
        return int(np.prod(self.chunk_shape)) * self.dtype.itemsize

    def key(self, grid_index: Sequence[int]) -> str:
        return self.separator.join(["c", *(str(int(i)) for i in grid_index)])


def _codecs(
    data_type: str, codecs: list[dict[str, Any]]
) -> tuple[np.dtype[Any], str | None, dict[str, Any]]:
    if not codecs or codecs[0]["name"] != "bytes":
        raise UnsupportedLayout(f"codecs {[c['name'] for c in codecs]} (array-to-array codecs)")
    try:
        dtype = np.dtype(data_type)
    except TypeError as err:
        raise UnsupportedLayout(f"data type {data_type!r}") from err
    endian = codecs[0].get("configuration", {}).get("endian", "little")
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian == "little" else ">")
    rest = codecs[1:]
    if not rest:
        return dtype, None, {}
    if len(rest) == 1 and rest[0]["name"] in ("zstd", "blosc"):
        return dtype, rest[0]["name"], dict(rest[0].get("configuration", {}))
    raise UnsupportedLayout(f"bytes-to-bytes codecs {[c['name'] for c in rest]}")


class ChunkLocator:
    """Finds chunk bytes: one file per chunk, or a range of a shard (indexes cached)."""

    def __init__(self, layout: ArrayLayout) -> None:
        self.layout = layout
        self._indexes: dict[tuple[int, ...], np.ndarray | None] = {}
        self._lock = threading.Lock()

    def find(self, chunk: Sequence[int]) -> ChunkRef | None:
        """The bytes of the chunk at ``chunk`` (grid index), or None if it was never written
        (it then holds the fill value)."""
        lay = self.layout
        if lay.shard_shape is None:
            path = lay.path / lay.key(chunk)
            return ChunkRef(str(path), 0, None) if path.is_file() else None
        per_shard = [s // c for s, c in zip(lay.shard_shape, lay.chunk_shape, strict=True)]
        shard = tuple(int(i) // n for i, n in zip(chunk, per_shard, strict=True))
        inner = tuple(int(i) % n for i, n in zip(chunk, per_shard, strict=True))
        index = self._index(shard, per_shard)
        if index is None:
            return None
        offset, nbytes = index[np.ravel_multi_index(inner, per_shard)]
        if offset == _EMPTY and nbytes == _EMPTY:
            return None
        return ChunkRef(str(lay.path / lay.key(shard)), int(offset), int(nbytes))

    def _index(self, shard: tuple[int, ...], per_shard: list[int]) -> np.ndarray | None:
        with self._lock:
            if shard in self._indexes:
                return self._indexes[shard]
        path = self.layout.path / self.layout.key(shard)
        n = int(np.prod(per_shard))
        size = n * 16 + _INDEX_CRC_BYTES
        index: np.ndarray | None = None
        if path.is_file():
            with path.open("rb") as f:
                total = os.fstat(f.fileno()).st_size
                start = total - size if self.layout.index_at_end else 0
                raw = os.pread(f.fileno(), size, start)
            if len(raw) != size:
                raise OSError(f"{path}: shard index truncated ({len(raw)} of {size} bytes)")
            _check_crc32c(raw[:-_INDEX_CRC_BYTES], raw[-_INDEX_CRC_BYTES:], path)
            index = np.frombuffer(raw[:-_INDEX_CRC_BYTES], dtype="<u8").reshape(n, 2)
        with self._lock:
            self._indexes[shard] = index
        return index


def _check_crc32c(data: bytes, stored: bytes, path: Path) -> None:
    from numcodecs import CRC32C

    # numcodecs' CRC32C appends the little-endian checksum, as Zarr's crc32c codec does.
    expected = bytes(CRC32C().encode(np.frombuffer(data, dtype=np.uint8)))[-_INDEX_CRC_BYTES:]
    if expected != stored:
        raise OSError(f"{path}: the shard index checksum does not match; the file is corrupt.")


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
    host buffers: ``pread`` per chunk, decoded in place; windows may span several chunks
    and reach past the raster (filled with ``pad_value``)."""

    def __init__(self, layout: ArrayLayout, *, pad_value: float) -> None:
        _check_window_layout(layout)
        self.layout = layout
        self.locator = ChunkLocator(layout)
        self.pad_value = pad_value
        self._decoder = _host_decoder(layout)
        self._local = threading.local()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layout.shape

    def read(self, t: int, row: int, col: int, size: int, out: np.ndarray) -> None:
        """Fill ``out`` (``[band, size, size]``, or ``[size, size]`` for 3-D arrays) with the
        window at ``(row, col)`` of time ``t``."""
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
                whole = (ye - ys, xe - xs) == (cy, cx) and target.flags.c_contiguous
                chunk = target if whole else self._scratch()
                self._read_chunk(t, gy, gx, chunk)
                if not whole:
                    target[...] = chunk[
                        ..., ys - gy * cy : ye - gy * cy, xs - gx * cx : xe - gx * cx
                    ]

    def _grid_index(self, t: int, gy: int, gx: int) -> tuple[int, ...]:
        return (t, 0, gy, gx) if len(self.layout.shape) == 4 else (t, gy, gx)

    def _scratch(self) -> np.ndarray:
        buf = getattr(self._local, "chunk", None)
        if buf is None:
            buf = np.empty(self.layout.chunk_shape[1:], dtype=self.layout.dtype.newbyteorder("="))
            self._local.chunk = buf
        return buf

    def _read_chunk(self, t: int, gy: int, gx: int, out: np.ndarray) -> None:
        """Decode one chunk into ``out`` (C-contiguous, the chunk's shape without time)."""
        ref = self.locator.find(self._grid_index(t, gy, gx))
        if ref is None:
            out.fill(self.layout.fill_value)
            return
        self._read_ref(ref, out)

    def _read_ref(self, ref: ChunkRef, out: np.ndarray) -> None:
        raw = out.view(np.uint8).reshape(-1)
        fd = os.open(ref.path, os.O_RDONLY)
        try:
            if self._decoder is None:
                got = os.preadv(fd, [raw.data], ref.offset)
                if got != raw.size:
                    raise OSError(f"{ref.path}: chunk truncated ({got} of {raw.size} bytes)")
            else:
                nbytes = ref.nbytes if ref.nbytes is not None else os.fstat(fd).st_size
                encoded = os.pread(fd, nbytes, ref.offset)
                self._decoder.decode(encoded, out=raw)
        finally:
            os.close(fd)
        if not self.layout.dtype.isnative:
            out.byteswap(inplace=True)


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
    the threaded host reader and the GPU reader (:mod:`xclay.gpu`) work in.
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
        refs: list[ChunkRef | None] = []
        outside: list[tuple[int, int]] = []
        for t, row, col in windows:
            if row % size or col % size:
                raise UnsupportedLayout(f"window at ({row}, {col}) is not on a chunk boundary")
            gy, gx = row // size, col // size
            index = (t, 0, gy, gx) if len(self.layout.shape) == 4 else (t, gy, gx)
            refs.append(self.locator.find(index))
            outside.append((max(0, row + size - ny), max(0, col + size - nx)))
        return refs, outside
