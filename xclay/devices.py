"""Which device and precision to compute on; torch is imported only when asked."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from xclay.errors import DatacubeError, DeviceError

if TYPE_CHECKING:
    import torch
    from torch import device as TorchDevice

__all__ = [
    "ComputePrecision",
    "Precision",
    "ThreadBudget",
    "available_cores",
    "cpu_flags",
    "cuda_available",
    "resolve_device",
    "resolve_precision",
]

Precision = Literal["auto", "fp32", "tf32", "bf16", "fp8"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
# FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards.
FP8_CAPABILITY = (8, 9)


def cuda_available() -> bool:
    """True when torch sees a usable CUDA device."""
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when usable, else CPU; ``"cuda[:N]"`` must be a GPU this process sees.

    Parameters
    ----------
    device
        ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (the GPU of index N). Another
        torch device type, a name torch does not know, or CUDA where torch sees no usable
        GPU, or an index beyond the GPUs it sees, is a :class:`~xclay.errors.DeviceError`.

    Returns
    -------
    torch.device
        The device; ``"auto"`` gives ``cuda`` (the current GPU) or ``cpu``.
    """
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
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise DeviceError(
            f"device={device!r}, but this process sees {count} GPU(s) (cuda:0..cuda:{count - 1}; "
            "CUDA_VISIBLE_DEVICES renumbers them); pick one of those."
        )
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


@dataclass(frozen=True)
class ComputePrecision:
    """How an encoder computes, resolved for a device.

    Parameters
    ----------
    name
        ``fp32`` (strict), ``tf32`` (fp32 storage, TF32 tensor-core matmuls on CUDA),
        ``bf16`` (bf16 matmuls, fp32 norms and accumulation), ``fp8`` (a transformer's
        linear layers in FP8 e4m3 with per-row scales, or per-tensor ones where the GPU
        cannot scale per row, and fp32 accumulation; the rest bf16).
    emulated
        FP8 computed exactly as on the GPU but with fp32 matrix products (CPU tests
        and accuracy checks; slow). Default ``False``: FP8 on tensor cores.
    """

    name: Literal["fp32", "tf32", "bf16", "fp8"]
    emulated: bool = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations (and of weights, except FP8's linear layers)."""
        import torch

        return torch.bfloat16 if self.name in ("bf16", "fp8") else torch.float32

    @contextlib.contextmanager
    def matmul_mode(self) -> Iterator[None]:
        """TF32 tensor-core matmuls for the duration (``tf32`` only), restored after."""
        if self.name != "tf32":
            yield
            return
        import torch

        before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def resolve_precision(
    precision: Precision, device: torch.device, preferred: Precision
) -> ComputePrecision:
    """The precision to compute in.

    ``tf32`` and ``fp8`` are GPU modes: asking for them elsewhere is a
    :class:`~xclay.errors.DeviceError` naming what to use.

    Parameters
    ----------
    precision
        The precision asked for: ``"auto"``, ``"fp32"``, ``"tf32"``, ``"bf16"`` or
        ``"fp8"`` (``fp8`` needs compute capability 8.9 or newer). ``"auto"`` takes
        the model's preference where the device runs it fast (bf16 on CUDA and on
        CPUs with AMX/AVX512-BF16), else fp32.
    device
        The torch device the encoder will run on.
    preferred
        The model's preferred precision (its ``preferred_precision``); used only
        with ``"auto"``, where only ``"bf16"`` changes the result.

    Returns
    -------
    ComputePrecision
        The resolved precision (never emulated).
    """
    if precision not in PRECISIONS:
        raise DeviceError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        fast_bf16 = device.type == "cuda" or cpu_has_fast_bf16()
        return ComputePrecision("bf16" if preferred == "bf16" and fast_bf16 else "fp32")
    if precision == "tf32" and device.type != "cuda":
        raise DeviceError(
            "precision='tf32' is an NVIDIA tensor-core mode (Ampere or newer); on a CPU use "
            "'fp32' (strict) or 'bf16'."
        )
    if precision == "fp8":
        if device.type != "cuda":
            raise DeviceError(
                "precision='fp8' needs an NVIDIA GPU with FP8 tensor cores (compute capability "
                "8.9 or newer: L4, L40, H100, H200, B200); on a CPU use 'bf16' or 'fp32'."
            )
        import torch

        capability = torch.cuda.get_device_capability(device)
        if tuple(capability) < FP8_CAPABILITY:
            raise DeviceError(
                f"precision='fp8' needs FP8 tensor cores (compute capability 8.9 or newer); "
                f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}. "
                "Use 'bf16'."
            )
    return ComputePrecision(precision)


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a SLURM allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadBudget:
    """How one embedding run shares the process's cores, decided in one place.

    Attributes
    ----------
    cores
        Cores available to the process.
    torch
        Intra-op threads of torch (the encoder on the CPU; small host ops on a GPU).
    decode
        Host threads reading and decoding chunk files (1: the reading thread alone).
    io
        kvikIO's thread pool (reads into GPU memory).

    Oversubscribing a busy machine is what hurts most: torch's OpenMP threads
    spin at barriers while another process holds their core (the demo on a
    2-core machine with one core busy: 20.8 s with two torch threads, 14.9 s
    with one; idle, two threads are 12 % faster). So the budget counts the
    cores other processes are using now and leaves them out. On the CPU the
    encoder is the work: torch gets the free cores (the reading thread is
    idle most of the time); on a GPU the host only reads and decodes, so the
    readers get the cores.
    """

    cores: int
    torch: int
    decode: int
    io: int

    @classmethod
    def for_device(
        cls, device: TorchDevice, *, cores: int | None = None, busy: float | None = None
    ) -> ThreadBudget:
        """The budget for an encoder on ``device``, over ``cores`` (default: the process's
        CPU affinity) of which ``busy`` are taken by other processes (default: measured,
        over a tenth of a second, from ``/proc/stat``)."""
        n = max(1, int(cores if cores is not None else available_cores()))
        if busy is None:
            busy = other_busy_cores() if cores is None else 0.0
        free = max(1, min(n, n - round(busy)))
        if device.type == "cuda":
            return cls(cores=n, torch=min(4, free), decode=max(1, free - 1), io=free)
        return cls(cores=n, torch=free, decode=1, io=1)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """torch's intra-op threads set to :attr:`torch` for the duration (unless the user
        fixed them with ``OMP_NUM_THREADS``), restored afterwards."""
        import torch

        if os.environ.get("OMP_NUM_THREADS"):
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.torch)
        try:
            yield
        finally:
            torch.set_num_threads(before)


def other_busy_cores(window: float = 0.1, max_age: float = 30.0) -> float:
    """How many of this process's cores other processes keep busy, from ``/proc/stat``
    (minus this process's own use), over the time since the last reading when that is
    between ``window`` and ``max_age`` seconds old (a reading is taken when xclay is
    imported), else over a fresh ``window``; 0 where that cannot be read. So a session
    costs no wait in a process that has been running a while."""
    import time

    global _LAST_READING
    try:
        cpus = os.sched_getaffinity(0)
        now = time.monotonic()
        last = _LAST_READING
        if last is None or now - last[0] > max_age or last[2] != len(cpus):
            last = (now, _ticks(cpus), len(cpus))
            time.sleep(window)
        elif now - last[0] < window:
            time.sleep(window - (now - last[0]))
        reading = (time.monotonic(), _ticks(cpus), len(cpus))
    except (OSError, AttributeError, ValueError, IndexError):
        return 0.0
    _LAST_READING = reading
    return busy_from_ticks(last[1], reading[1], len(cpus))


def _ticks(cpus: set[int]) -> tuple[int, int, int]:
    return (*_cpu_ticks(cpus), _own_ticks())


def _first_reading() -> tuple[float, tuple[int, int, int], int] | None:
    import time

    try:
        cpus = os.sched_getaffinity(0)
        return (time.monotonic(), _ticks(cpus), len(cpus))
    except (OSError, AttributeError, ValueError, IndexError):
        return None


def busy_from_ticks(before: tuple[int, int, int], after: tuple[int, int, int], cores: int) -> float:
    """Cores busy with other processes between two readings of (all ticks, busy ticks,
    this process's ticks) summed over ``cores`` CPUs."""
    total = after[0] - before[0]
    if total <= 0:
        return 0.0
    busy = (after[1] - before[1]) - (after[2] - before[2])
    return min(float(cores), max(0.0, busy / total * cores))


def _cpu_ticks(cpus: set[int]) -> tuple[int, int]:
    """(all ticks, busy ticks) summed over ``cpus`` from /proc/stat."""
    total = busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        ticks = [int(v) for v in rest.split()]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        total += sum(ticks[:8])
        busy += sum(ticks[:8]) - idle
    return total, busy


def _own_ticks() -> int:
    """User + system ticks of this process (all its threads)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


# The reading other_busy_cores() measures from: taken at import, so a session started a
# tenth of a second or more later needs no wait.
_LAST_READING = _first_reading()


def torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a NumPy dtype; a clear error for dtypes torch cannot hold."""
    import torch

    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError as err:
        raise DatacubeError(
            f"pixels of dtype {dtype} cannot be handed to torch; convert the cube to "
            "uint16, int16 or float32."
        ) from err
