"""Which device and precision to compute on; torch is imported only when asked."""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from xclay.errors import DeviceError

if TYPE_CHECKING:
    import torch

__all__ = ["Precision", "cpu_flags", "cuda_available", "resolve_device", "resolve_dtype"]

Precision = Literal["auto", "fp32", "bf16"]


def cuda_available() -> bool:
    """True when torch sees a usable CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when usable, else CPU; ``"cuda[:N]"`` must be usable."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise DeviceError(
            f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'."
        ) from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device={device!r} asks for a CUDA GPU, but none is usable here (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device='cpu' "
            "or device='auto'."
        )
    if dev.type not in ("cpu", "cuda"):
        raise DeviceError(f"device {device!r} is not supported; use 'cpu', 'cuda' or 'auto'.")
    return dev


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it does not exist)."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return frozenset()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matrix work runs several times faster than fp32."""
    flags = cpu_flags()
    return platform.machine() in ("x86_64", "AMD64") and bool({"amx_bf16", "avx512_bf16"} & flags)


def resolve_dtype(precision: Precision, device: torch.device, preferred: Precision) -> torch.dtype:
    """The compute dtype for ``precision``; ``"auto"`` takes the model's preference
    where the device runs it fast (bf16 on CUDA and on CPUs with AMX/AVX512-BF16)."""
    import torch

    if precision not in ("auto", "fp32", "bf16"):
        raise DeviceError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}.")
    if precision == "auto":
        fast_bf16 = device.type == "cuda" or cpu_has_fast_bf16()
        precision = preferred if preferred == "fp32" or fast_bf16 else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32
