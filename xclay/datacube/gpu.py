"""Datacubes and GPU memory: whether this machine can read into it (kvikIO, CuPy, a CUDA
device; GPUDirect Storage and nvCOMP for speed). Nothing here imports cupy or kvikio until
used, so the package imports on machines without CUDA; :func:`gpu_status` says what the
machine can do, and :func:`require_kvikio` turns "cannot" into a clear error. The GPU
read route itself is :mod:`xclay.datacube.gpuchunks`.
"""

from __future__ import annotations

from typing import Any

from xclay._json import plain
from xclay.errors import DeviceError, MissingDependencyError

__all__ = ["gpu_status", "kvikio_usable", "require_kvikio"]


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
