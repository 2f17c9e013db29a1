"""What this machine has: versions, CPU, GPU, optional parts.

Used by ``xclay info`` and saved with every benchmark result, so a figure
always travels with the machine that produced it.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from xclay._version import __version__
from xclay.devices import cpu_flags

__all__ = ["describe"]

_PACKAGES = (
    "numpy",
    "xarray",
    "zarr",
    "numcodecs",
    "odc-geo",
    "pyproj",
    "shapely",
    "pyarrow",
    "torch",
    "cupy-cuda13x",
    "cupy-cuda12x",
    "kvikio-cu13",
    "kvikio-cu12",
    "cupy-xarray",
    "nvidia-nvcomp-cu13",
    "nvidia-nvcomp-cu12",
    "xbatcher",
    "odc-stac",
    "rioxarray",
    "dask",
    "distributed",
)

_OPTIONAL = {
    "gpu": ("cupy", "kvikio"),
    "dask": ("dask", "distributed"),
    "io": ("rioxarray", "odc.stac"),
}


def describe(*, gpu: bool = True) -> dict[str, Any]:
    """A JSON-ready description of the machine and software.

    Parameters
    ----------
    gpu
        Also describe the GPU side under a ``"gpu"`` key: torch's CUDA build, the CUDA
        devices and the GPU data path (kvikIO, nvCOMP). Default True; False leaves the
        key out and does not import torch (package versions are still listed).

    Returns
    -------
    dict
        xclay and Python versions, platform, CPU, memory, installed package versions,
        which optional parts are importable, and (with ``gpu``) the GPU.
    """
    info: dict[str, Any] = {
        "xclay": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpu(),
        "memory_gib": _memory_gib(),
        "packages": {name: _version(name) for name in _PACKAGES if _version(name)},
        "optional": {part: not _missing(mods) for part, mods in _OPTIONAL.items()},
        "missing": {part: _missing(mods) for part, mods in _OPTIONAL.items() if _missing(mods)},
    }
    if gpu:
        info["gpu"] = _gpu()
    return info


def _cpu() -> dict[str, Any]:
    flags = cpu_flags()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "model": model,
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal"):
            return round(int(line.split()[1]) / (1 << 20), 1)
    return None


def _gpu() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"cuda": False, "reason": "torch is not installed"}
    out: dict[str, Any] = {
        "torch_cuda_build": torch.version.cuda,
        "cuda": bool(torch.cuda.is_available()),
        "torch_threads": torch.get_num_threads(),
    }
    if out["cuda"]:
        out["devices"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "memory_gib": round(
                    torch.cuda.get_device_properties(i).total_memory / (1 << 30), 1
                ),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            }
            for i in range(torch.cuda.device_count())
        ]
    from xclay.datacube.gpu import gpu_status

    out["data_path"] = gpu_status()
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of an optional part that cannot be imported here."""
    import importlib.util

    missing = []
    for mod in modules:
        try:
            if importlib.util.find_spec(mod) is None:
                missing.append(mod)
        except (ImportError, ValueError):
            missing.append(mod)
    return missing
