"""Where a composite's arithmetic runs: the CPU (NumPy) or a CUDA GPU (CuPy).

On a GPU, a chunk's decoded observations (every band and the mask, all dates) are copied
into device memory once, masked and composited there by the kernels of
:mod:`xclay.ingest.composite` (the same code the CPU runs, with CuPy as its array module),
and each result is copied back for the Zarr write. Reading and decoding the source images
stays on the host (GDAL).

Nothing here imports CuPy until a GPU composite runs: ``import xclay`` and CPU ingests
never load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, get_args

import numpy as np

from xclay.errors import ConfigError, DeviceError, MissingDependencyError

__all__ = ["COMPOSITE_DEVICES", "CompositeDevice", "array_module", "resolve_composite_device"]

CompositeDevice = Literal["auto", "cpu", "cuda"]
COMPOSITE_DEVICES: tuple[CompositeDevice, ...] = get_args(CompositeDevice)


def resolve_composite_device(device: str) -> Literal["cpu", "cuda"]:
    """The device a composite runs on.

    Parameters
    ----------
    device
        ``"auto"`` (a CUDA GPU when CuPy is installed and a GPU is usable, else the CPU),
        ``"cpu"`` or ``"cuda"`` (an error where there is no usable GPU).

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda"``.
    """
    if device not in COMPOSITE_DEVICES:
        raise ConfigError(
            f"device must be one of {list(COMPOSITE_DEVICES)} for a composite, got {device!r}."
        )
    if device == "cpu":
        return "cpu"
    reason = _unusable()
    if reason is None:
        return "cuda"
    if device == "auto":
        return "cpu"
    if reason.startswith("CuPy"):
        raise MissingDependencyError(
            "device='cuda' composites with CuPy, which is not installed: pip install "
            '"xclay[gpu]" (CUDA 13; "xclay[gpu-cu12]" for CUDA 12), or use device=\'cpu\'.'
        )
    raise DeviceError(
        f"device='cuda' asks for a CUDA GPU, but none is usable here ({reason}); use "
        "device='cpu' or device='auto'."
    )


def _unusable() -> str | None:
    """Why a GPU composite cannot run here, or None when it can."""
    from xclay.datacube.gpu import importable

    if not importable("cupy"):
        return "CuPy is not installed"
    from xclay.devices import cuda_available

    return None if cuda_available() else "no CUDA device or driver"


def array_module(device: Literal["cpu", "cuda"]) -> Any:
    """The array module of a device: ``numpy`` for the CPU, ``cupy`` for a CUDA GPU
    (imported now).

    Parameters
    ----------
    device
        ``"cpu"`` or ``"cuda"`` (:func:`resolve_composite_device`).
    """
    if device == "cpu":
        return np
    try:
        import cupy
    except ImportError as err:
        raise MissingDependencyError(
            "a GPU composite needs CuPy: pip install \"xclay[gpu]\", or use device='cpu'."
        ) from err
    return cupy


def to_device(arrays: Sequence[np.ndarray], xp: Any) -> list[Any]:
    """Host arrays in the memory of ``xp``'s device (the same arrays for NumPy)."""
    if xp is np:
        return list(arrays)
    return [xp.asarray(a) for a in arrays]


def to_host(array: Any, xp: Any) -> np.ndarray:
    """A device array copied into host memory (once the work that writes it is done)."""
    if xp is np:
        return np.asarray(array)
    return np.asarray(xp.asnumpy(array))
