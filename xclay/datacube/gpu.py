"""Datacubes and GPU memory: whether this machine can read into it (kvikIO, CuPy, a CUDA
device; GPUDirect Storage and nvCOMP for speed), and GPU-backed variables for
``open_datacube(engine="kvikio")``. Nothing here imports cupy or kvikio until used, so
the package imports on machines without CUDA; :func:`gpu_status` says what the machine
can do, and :func:`require_kvikio` turns "cannot" into a clear error. The batch path's
GPU reader is :class:`xclay.batch.gpu.KvikioChunkSource`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr
from xarray.backends import BackendArray

from xclay._json import plain
from xclay.errors import DeviceError, MissingDependencyError
from xclay.storage import Location

__all__ = ["gpu_status", "gpu_variable", "kvikio_usable", "require_kvikio"]


def require_kvikio() -> None:
    """Raise a :class:`~xclay.errors.MissingDependencyError` (kvikIO or CuPy not installed)
    or a :class:`~xclay.errors.DeviceError` (no usable CUDA device), naming what is missing."""
    missing = [m for m in ("kvikio", "cupy") if not importable(m)]
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
    """Whether this machine can read chunks into GPU memory (kvikIO and a CUDA device)."""
    try:
        require_kvikio()
    except (MissingDependencyError, DeviceError):
        return False
    return True


def importable(module: str) -> bool:
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
    if importable("kvikio"):
        out["kvikio"] = _kvikio_status()
    if out["cuda"] and importable("cupy"):
        try:
            import cupy

            version = cupy.cuda.runtime.driverGetVersion()
            out["driver_cuda"] = f"{version // 1000}.{version % 1000 // 10}"
        except Exception as err:
            out["driver_cuda"] = f"unknown ({type(err).__name__})"
    if importable("nvidia.nvcomp"):
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
            info[key] = plain(kvikio.defaults.get(key))
        except Exception as err:  # older kvikio: no generic get(); not fatal
            info[key] = f"unknown ({type(err).__name__})"
    info["gds"] = gds_available()
    return info


def gds_available() -> str:
    """Whether cuFile (GDS) would be used: 'yes', 'no (...)' or 'unknown (...)'."""
    try:
        import kvikio.cufile_driver

        props = kvikio.cufile_driver.get("is_gds_available")
        return "yes" if props else "no (compatibility mode: POSIX reads through a bounce buffer)"
    except Exception as err:
        return f"unknown ({type(err).__name__}: {err})"


def gpu_variable(store: Location, name: str, like: xr.DataArray) -> Any:
    """Lazy data for variable ``name`` of a datacube store that reads into GPU memory: each
    read decodes its window with zarr-python on the host and copies it up once, basic
    slices only (xarray applies fancy indexing to the CuPy result).

    zarr decodes on the host whatever the buffers: the crc32c codec every xclay store has
    checks each chunk on the host, and zarr 3.1 ships no GPU decoder. Read into GPU
    buffers (``zarr.config.enable_gpu()`` over :class:`kvikio.zarr.GDSStore`), every chunk
    would go up, back down to be checked and decoded, and up again, with a
    ``ZarrUserWarning`` per chunk from the crc32c codec.

    Parameters
    ----------
    store
        The datacube store (local or on object storage).
    name
        The variable's array in the store: ``"pixels"`` or ``"quality"``.
    like
        The variable as opened on the host: the lazy data takes its shape and dtype (its
        values are not read).

    Returns
    -------
    xarray.core.indexing.LazilyIndexedArray
        Data for a variable (``da.copy(data=...)``); reading it gives CuPy arrays.
    """
    from xarray.core import indexing

    return indexing.LazilyIndexedArray(_DeviceZarrArray(store, name, like.shape, like.dtype))


class _DeviceZarrArray(BackendArray):
    def __init__(self, store: Location, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.store, self.name = store, name
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __getitem__(self, key: Any) -> Any:
        from xarray.core import indexing

        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.BASIC, self._read
        )

    def _read(self, key: tuple[Any, ...]) -> Any:
        import cupy
        import zarr

        store = self.store.zarr_store(read_only=True)
        array = zarr.open_array(store, path=self.name, mode="r", zarr_format=3)
        return cupy.asarray(array[key])
