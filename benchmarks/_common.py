"""Shared by the benchmarks: smoke mode, and results saved with the context that produced them.

Every benchmark parses its arguments with :func:`parse`, which adds ``--smoke``: tiny
sizes that run in seconds, to show that the benchmark still runs (``make test`` runs
every benchmark so, ``tests/test_benchmarks.py``). A smoke run writes its results to a
temporary folder (or ``$XCLAY_BENCH_RESULTS``), never to ``benchmarks/results/``.

A result file carries the machine (``xclay.environment.describe``), the commit, and what
ran on it (:func:`context`: device name, driver, torch/CuPy/kvikIO/nvCOMP versions).
Importing this module imports no xclay (a benchmark may import another checkout's).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
RESULTS_ENV = "XCLAY_BENCH_RESULTS"  # where results go instead (smoke runs, dry runs)
COMMIT_ENV = "XCLAY_COMMIT"  # the commit, where the tree has no .git (a GPU machine's copy)
# Set: a benchmark parses its command line and exits (the tests check the acceptance
# script's GPU command lines so, on machines that cannot run them).
PARSE_ONLY_ENV = "XCLAY_BENCH_PARSE_ONLY"
SMOKE_HELP = (
    "tiny sizes, seconds: check that the benchmark runs; results go to a temporary folder "
    f"(or ${RESULTS_ENV}), never to benchmarks/results/"
)
_smoke = False


def parse(
    parser: argparse.ArgumentParser,
    smoke: Mapping[str, Any],
    argv: list[str] | None = None,
) -> argparse.Namespace:
    """Parse the command line with ``--smoke`` added; with it, the ``smoke`` values
    replace the arguments of the same name (tiny sizes) and results go to a temporary
    folder."""
    global _smoke
    parser.add_argument("--smoke", action="store_true", help=SMOKE_HELP)
    args = parser.parse_args(argv)
    if os.environ.get(PARSE_ONLY_ENV):
        raise SystemExit(0)
    if args.smoke:
        _smoke = True
        for name, value in smoke.items():
            if not hasattr(args, name):
                raise SystemExit(f"smoke setting {name!r} is not an argument of this benchmark")
            setattr(args, name, value)
    return args


def is_smoke() -> bool:
    return _smoke


SKIPPED = 77  # the exit status of a benchmark that cannot run here (automake's "skipped")


def require(path: Path, what: str) -> None:
    """Exit with status :data:`SKIPPED` and the reason when ``path`` (data a benchmark
    reads, e.g. from ../shared/data) is absent: the smoke test skips it, saying why."""
    if not path.exists():
        print(f"skipped: needs {what} at {path}", flush=True)
        raise SystemExit(SKIPPED)


def results_dir() -> Path:
    """``$XCLAY_BENCH_RESULTS``; else a new temporary folder in smoke mode; else
    ``benchmarks/results/``."""
    if os.environ.get(RESULTS_ENV):
        return Path(os.environ[RESULTS_ENV])
    if _smoke:
        return Path(tempfile.mkdtemp(prefix="xclay-bench-smoke-"))
    return RESULTS


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall-clock seconds of ``repeats`` calls (after the caller's warm-up), and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def used_engine(params: dict[str, Any], used: str) -> dict[str, Any]:
    """``params`` with ``engine`` the engine that ran and ``engine_requested`` the one
    asked for (``auto`` resolves, ``kvikio`` can fall back: the file says which ran)."""
    return {**params, "engine_requested": params.get("engine"), "engine": used}


def commit() -> dict[str, Any]:
    """The commit of this checkout (``$XCLAY_COMMIT`` where the tree has no .git), whether
    tracked files differ from it, and a hash of the code (what the results depend on)."""
    out: dict[str, Any] = {"commit": os.environ.get(COMMIT_ENV) or None, "dirty": None}
    if shutil.which("git") and (ROOT / ".git").exists():
        head = _git("rev-parse", "--short", "HEAD")
        if head:
            out["commit"] = head
            out["dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    out["code"] = code_hash()
    return out


CODE_ENV = "XCLAY_CODE"  # the code hash, given (the acceptance script hashes once a call)


def code_hash() -> str:
    """A hash of the code a result depends on (the package, benchmarks, tests and
    pyproject; results excluded), the same with or without git (benchmarks/code_hash.sh);
    ``$XCLAY_CODE`` where the caller hashed it already."""
    if os.environ.get(CODE_ENV):
        return os.environ[CODE_ENV]
    out = subprocess.run(
        ["bash", str(HERE / "code_hash.sh")], cwd=ROOT, capture_output=True, text=True
    )
    return out.stdout.strip() or "unknown"


def _git(*args: str) -> str:
    out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def context() -> dict[str, Any]:
    """What ran: the device (name, driver, CUDA), and the versions of the libraries the
    GPU path runs on, as imported (not only as installed)."""
    out: dict[str, Any] = {"device_name": None, "driver": None, "cuda_runtime": None}
    versions: dict[str, str | None] = {}
    import torch

    versions["torch"] = torch.__version__
    out["torch_cuda_build"] = torch.version.cuda
    if torch.cuda.is_available():
        out["device_name"] = torch.cuda.get_device_name(0)
        out["devices"] = torch.cuda.device_count()
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    else:
        from xclay.environment import describe

        out["device_name"] = f"cpu: {describe(gpu=False)['cpu']['model']}"
    for module, name in (("cupy", "cupy"), ("kvikio", "kvikio"), ("nvidia.nvcomp", "nvcomp")):
        versions[name] = _module_version(module)
    if versions["cupy"]:
        try:
            import cupy

            runtime = cupy.cuda.runtime.runtimeGetVersion()
            out["cuda_runtime"] = f"{runtime // 1000}.{runtime % 1000 // 10}"
        except Exception as err:  # no CUDA device: the version is not known
            out["cuda_runtime"] = f"unknown ({type(err).__name__})"
    out["driver"] = _nvidia_smi("driver_version")
    out["versions"] = versions
    return out


def _module_version(module: str) -> str | None:
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    try:
        imported = __import__(module, fromlist=["_"])
    except Exception as err:  # installed but broken: say so
        return f"unusable ({type(err).__name__}: {err})"
    return str(getattr(imported, "__version__", "unknown"))


def _nvidia_smi(field: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout else None


def save(
    name: str,
    params: dict[str, Any],
    results: dict[str, Any],
    *,
    device: str = "cpu",
    variant: str = "",
) -> Path:
    """Write ``<results>/<name>_<device>[_<variant>]_<date>.json`` with the machine, the
    commit and what ran (atomically: a run cut short leaves no half-written file)."""
    from xclay.environment import describe

    today = dt.date.today().isoformat()
    payload = {
        "benchmark": name,
        "date": today,
        "command": "python " + " ".join(sys.argv),
        "smoke": _smoke,
        **commit(),
        "context": context(),
        "machine": describe(),
        "params": params,
        "results": results,
    }
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{device}{'_' + variant if variant else ''}_{today}.json"
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
