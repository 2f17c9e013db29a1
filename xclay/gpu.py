"""The GPU data path: chip chunks read straight into GPU memory with kvikIO, decoded there.

Each chip of a datacube written by :func:`xclay.write_datacube` is one Zarr
chunk (:class:`xclay.chunkio.ChipChunks`). For a batch, this module issues one
kvikIO ``pread`` per chunk into device memory (GPUDirect Storage where the
system has it, kvikIO's POSIX compatibility mode otherwise) and:

- uncompressed chunks land in their slot of the batch buffer: no decode, no
  host copy;
- zstd chunks land in a device staging buffer and are decompressed on the GPU
  in one nvCOMP batch call, straight from disk bytes to pixels;
- where nvCOMP is missing (or the codec is Blosc), chunks are decoded on the
  host by threads and copied up once per batch, and the reason is logged.

Nothing here imports cupy, kvikio or nvCOMP until a reader is built, so the
package imports on machines without CUDA; :func:`gpu_status` says what the
machine can do, and :func:`require_kvikio` turns "cannot" into a clear error.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import xarray as xr
from xarray.backends import BackendArray

from xclay.chunkio import ChipChunks, ChunkRef, HostChunkBatchReader, UnsupportedLayout
from xclay.errors import DatacubeError, DeviceError, MissingDependencyError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Decode",
    "KvikioChunkBatchReader",
    "gpu_status",
    "gpu_variable",
    "kvikio_usable",
    "require_kvikio",
]

log = logging.getLogger(__name__)

Decode = Literal["auto", "nvcomp", "host"]


def require_kvikio() -> None:
    """Raise a :class:`~xclay.errors.DatacubeError` naming what is missing unless kvikIO,
    CuPy and a CUDA device are all usable."""
    missing = [m for m in ("kvikio", "cupy") if not _importable(m)]
    if missing:
        raise MissingDependencyError(
            f"engine='kvikio' needs {' and '.join(missing)}: pip install \"xclay[gpu]\" "
            "(CUDA 13; \"xclay[gpu-cu12]\" for CUDA 12), or use engine='zarr'."
        )
    reason = _cuda_unusable()
    if reason:
        raise DeviceError(
            f"engine='kvikio' reads into GPU memory, but no CUDA GPU is usable here ({reason}); "
            "use engine='zarr' (or engine='auto', which picks zarr on this machine)."
        )


def kvikio_usable() -> bool:
    try:
        require_kvikio()
    except (MissingDependencyError, DeviceError):
        return False
    return True


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package of a dotted name
        return False


def _cuda_unusable() -> str | None:
    """Why CUDA cannot be used here, or None when it can (asked through torch, which reports
    a missing driver as False rather than raising)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = torch.version.cuda
        return "torch has no CUDA build" if not build else "no CUDA device or driver"
    return None


def gpu_status() -> dict[str, Any]:
    """What the GPU data path can use here: kvikIO (version, GDS or compatibility mode,
    threads), nvCOMP, and the GPU. Never raises; missing pieces are reported as such."""
    out: dict[str, Any] = {"kvikio": None, "nvcomp": None, "cuda": _cuda_unusable() is None}
    if _importable("kvikio"):
        out["kvikio"] = _kvikio_status()
    if out["cuda"] and _importable("cupy"):
        try:
            import cupy

            version = cupy.cuda.runtime.driverGetVersion()
            out["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
        except Exception as err:
            out["driver_cuda"] = f"unknown ({type(err).__name__})"
    if _importable("nvidia.nvcomp"):
        try:
            from nvidia import nvcomp

            out["nvcomp"] = str(getattr(nvcomp, "__version__", "unknown"))
        except Exception as err:  # a broken install is reported, not raised
            out["nvcomp"] = f"unusable ({type(err).__name__}: {err})"
    return out


def _kvikio_status() -> dict[str, Any]:
    try:
        import kvikio
        import kvikio.defaults
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}
    info: dict[str, Any] = {"version": str(getattr(kvikio, "__version__", "unknown"))}
    for key in ("compat_mode", "num_threads", "task_size", "gds_threshold"):
        try:
            info[key] = _plain(kvikio.defaults.get(key))
        except Exception as err:  # older kvikio: no generic get(); not fatal
            info[key] = f"unknown ({type(err).__name__})"
    info["gds"] = _gds_available()
    return info


def _gds_available() -> str:
    """Whether cuFile (GDS) would be used: 'yes', 'no (...)' or 'unknown (...)'."""
    try:
        import kvikio.cufile_driver

        props = kvikio.cufile_driver.get("is_gds_available")
        return "yes" if props else "no (compatibility mode: POSIX reads through a bounce buffer)"
    except Exception as err:
        return f"unknown ({type(err).__name__}: {err})"


def _plain(value: Any) -> Any:
    return value if isinstance(value, int | float | str | bool) else str(value)


class KvikioChunkBatchReader:
    """Reads a batch of chip chunks into a CUDA tensor with kvikIO, decoding on the GPU.

    ``decode``: ``"auto"`` (nvCOMP where it can decode the codec, else host
    threads), ``"nvcomp"`` (required), or ``"host"`` (read and decode on the
    host, then one host-to-device copy per batch: the baseline the benchmarks
    compare against).
    """

    def __init__(self, chunks: ChipChunks, *, decode: Decode = "auto") -> None:
        require_kvikio()
        import cupy
        import kvikio

        self._cupy, self._kvikio = cupy, kvikio
        self.chunks = chunks
        layout = chunks.layout
        if not layout.dtype.isnative:
            raise UnsupportedLayout(f"{layout.dtype.str} pixels (big-endian): read on the host")
        self.chunk_bytes = layout.chunk_nbytes
        self.decode = self._choose_decode(decode, layout.compressor)
        self._host = (
            HostChunkBatchReader(chunks) if self.decode == "host" and layout.compressor else None
        )
        self._staging: Any = None
        self._codec: Any = None
        self._pinned: np.ndarray | None = None
        self._lock = threading.Lock()

    @staticmethod
    def _choose_decode(decode: Decode, compressor: str | None) -> str:
        if compressor is None:
            return "none"
        if decode == "host":
            return "host"
        reason = None
        if compressor != "zstd":
            reason = f"nvCOMP does not decode {compressor} chunks"
        elif not _importable("nvidia.nvcomp"):
            reason = "nvCOMP is not installed (pip install nvidia-nvcomp-cu13)"
        if reason is None:
            return "nvcomp"
        if decode == "nvcomp":
            raise DatacubeError(f"decode='nvcomp' is not possible: {reason}.")
        log.warning("decoding %s chunks on the host: %s", compressor, reason)
        return "host"

    def read(self, refs: Sequence[ChunkRef | None], out: torch.Tensor) -> None:
        """Fill ``out[k]`` (a CUDA tensor, chunk-shaped per chip) with chunk ``k`` of
        ``refs``; missing chunks take the fill value. Work is ordered on torch's current
        stream; returns when the data is in place."""
        import torch

        cupy = self._cupy
        stream = torch.cuda.current_stream(out.device)
        with cupy.cuda.ExternalStream(stream.cuda_stream, out.device.index or 0):
            target = cupy.from_dlpack(out)
            fill = self.chunks.layout.fill_value
            for k, ref in enumerate(refs):
                if ref is None:
                    target[k].fill(fill)
            present = [(k, ref) for k, ref in enumerate(refs) if ref is not None]
            if not present:
                return
            if self.decode == "none":
                self._read_raw(present, target)
            elif self.decode == "nvcomp":
                self._read_nvcomp(present, target, stream.cuda_stream)
            else:
                self._read_host(present, target)
            stream.synchronize()

    def _read_raw(self, present: list[tuple[int, ChunkRef]], target: Any) -> None:
        """Uncompressed: each chunk's bytes go straight into its slot (cuFile DMA with GDS)."""
        futures = []
        files = _Files(self._kvikio)
        try:
            for k, ref in present:
                slot = target[k].view(self._cupy.uint8).ravel()
                futures.append(files.open(ref.path).pread(slot, slot.nbytes, ref.offset))
            for future, (_, ref) in zip(futures, present, strict=True):
                got = future.get()
                if got != self.chunk_bytes:
                    raise OSError(f"{ref.path}: chunk truncated ({got} of {self.chunk_bytes})")
        finally:
            files.close()

    def _read_nvcomp(self, present: list[tuple[int, ChunkRef]], target: Any, stream: int) -> None:
        """zstd: encoded bytes into one device staging buffer, one nvCOMP batch decode."""
        cupy = self._cupy
        sizes = [_encoded_size(ref) for _, ref in present]
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        total = int(starts[-1])
        if self._staging is None or self._staging.nbytes < total:
            # Grown to 1.5x what is needed: compressed sizes vary from batch to batch.
            self._staging = cupy.empty(total + total // 2, dtype=cupy.uint8)
        files = _Files(self._kvikio)
        try:
            futures = [
                files.open(ref.path).pread(
                    self._staging[starts[i] : starts[i + 1]], sizes[i], ref.offset
                )
                for i, (_, ref) in enumerate(present)
            ]
            for future, size, (_, ref) in zip(futures, sizes, present, strict=True):
                if future.get() != size:
                    raise OSError(f"{ref.path}: encoded chunk truncated")
        finally:
            files.close()
        from nvidia import nvcomp

        if self._codec is None:
            self._codec = nvcomp.Codec(
                algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW, cuda_stream=stream
            )
        encoded = [
            nvcomp.as_array(self._staging[starts[i] : starts[i + 1]]) for i in range(len(present))
        ]
        decoded = self._codec.decode(encoded)
        for (k, ref), chunk in zip(present, decoded, strict=True):
            raw = cupy.asarray(chunk).view(cupy.uint8).ravel()
            if raw.nbytes != self.chunk_bytes:
                raise OSError(
                    f"{ref.path}: decoded {raw.nbytes} bytes, expected {self.chunk_bytes}"
                )
            target[k].view(cupy.uint8).ravel()[...] = raw

    def _read_host(self, present: list[tuple[int, ChunkRef]], target: Any) -> None:
        """Host decode (threads), then one copy of the whole batch to the device."""
        assert self._host is not None
        shape = (target.shape[0], *target.shape[1:])
        if self._pinned is None or self._pinned.shape != shape:
            import torch

            pinned = torch.empty(
                shape, dtype=torch.from_numpy(np.empty(0, target.dtype)).dtype, pin_memory=True
            )
            self._pinned = pinned.numpy()
        refs: list[ChunkRef | None] = [None] * shape[0]
        for k, ref in present:
            refs[k] = ref
        self._host.read(refs, self._pinned)
        keep = [k for k, _ in present]
        if len(keep) == shape[0]:
            target.set(self._pinned)
        else:
            for k in keep:
                target[k].set(self._pinned[k])

    def close(self) -> None:
        if self._host is not None:
            self._host.close()


def _encoded_size(ref: ChunkRef) -> int:
    if ref.nbytes is not None:
        return ref.nbytes
    return Path(ref.path).stat().st_size


class _Files:
    """kvikIO file handles for one batch: a shard file is opened once for all its chunks."""

    def __init__(self, kvikio: Any) -> None:
        self._kvikio = kvikio
        self._open: dict[str, Any] = {}

    def open(self, path: str) -> Any:
        handle = self._open.get(path)
        if handle is None:
            handle = self._open[path] = self._kvikio.CuFile(path, "r")
        return handle

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()


def gpu_variable(store: Path, name: str, like: xr.DataArray) -> Any:
    """Lazy data for variable ``name`` of a datacube store that reads into GPU memory:
    zarr-python through :class:`kvikio.zarr.GDSStore`, under ``zarr.config.enable_gpu()``
    for each read only, with basic slices (fancy indexing of GPU-backed Zarr arrays is
    not supported upstream; xarray applies it to the CuPy result instead)."""
    from xarray.core import indexing

    return indexing.LazilyIndexedArray(_KvikioZarrArray(store, name, like.shape, like.dtype))


class _KvikioZarrArray(BackendArray):
    def __init__(self, store: Path, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.store, self.name = store, name
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __getitem__(self, key: Any) -> Any:
        from xarray.core import indexing

        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple[Any, ...]) -> Any:
        import kvikio.zarr
        import zarr

        with zarr.config.enable_gpu():
            array = zarr.open_array(kvikio.zarr.GDSStore(str(self.store)), path=self.name, mode="r")
            return array[key]
