"""No benchmark rots: every script of benchmarks/ runs in its smoke mode, as a real process.

Each script runs with ``--smoke`` (tiny sizes, seconds; results to a temporary folder,
never to benchmarks/results/), so a benchmark that no longer runs, or a new one without a
smoke mode, fails here. The GPU acceptance script (benchmarks/gpu_acceptance.sh) runs as
its CPU dry run: every step in its smoke form, one after another, each leaving its
results and marker; its GPU command lines are parsed by the benchmarks they call; a
second call skips what is done for this code, and a step cut short by its limit leaves
the results before it as they were. The scripts the dry run calls are not run twice:
their tests read the dry run's markers.

The runs go on concurrently (a thread per core, each waiting on its process), started
when the first test here asks for one, for the tests selected.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
ACCEPTANCE = BENCH / "gpu_acceptance.sh"
# Modules the benchmarks import (or run), not benchmarks: everything else is one.
HELPERS = {"_common.py", "_wheels.py"}
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if p.name not in HELPERS)
# Further smoke runs of a script, with these arguments (scale.py's smoke run tries its
# --real shape itself, in the same process: one process less).
EXTRA: dict[str, list[list[str]]] = {}
RUNS: list[tuple[str, list[str]]] = [(name, []) for name in SCRIPTS] + [
    (n, a) for n, more in EXTRA.items() for a in more
]
SKIPPED = 77  # a benchmark whose data is absent (benchmarks/_common.py)
ORDER = ["env", "gpu-tests", "pipeline", "reads", "throughput"]  # first, in this order
TIMEOUT = 600


def run_id(name: str, args: list[str]) -> str:
    return " ".join([name, *args])


@dataclass
class Finished:
    """A process that ran: its exit status, output and results folder."""

    returncode: int
    output: str
    results: Path
    seconds: float


def _env(results: Path, **more: str) -> dict[str, str]:
    return {**os.environ, "XCLAY_BENCH_RESULTS": str(results), "PYTHONUNBUFFERED": "1", **more}


def _acceptance(results: Path, out: Path, *args: str, **env: str) -> Finished:
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(ACCEPTANCE), *args],
        cwd=ROOT,
        env=_env(results, PYTHON=sys.executable, OUT=str(out), **env),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return Finished(
        done.returncode, done.stdout + done.stderr, results, time.perf_counter() - start
    )


def dry_run_steps() -> list[tuple[str, int, str]]:
    """The dry run's steps: name, limit in seconds, command."""
    out = subprocess.run(
        ["bash", str(ACCEPTANCE), "--dry-run", "--print"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [line.split("\t") for line in out.splitlines() if line.strip()]
    return [(name, int(limit), command) for name, limit, command in rows]


def covered() -> dict[str, str]:
    """Script name -> the dry run's step that runs it (in its smoke form)."""
    out = {}
    for step, _, command in dry_run_steps():
        for word in command.split():
            if word.startswith("benchmarks/") and word.endswith(".py"):
                out[Path(word).name] = step
    return out


class Runs:
    """The smoke runs and the acceptance dry run, started together on first use."""

    def __init__(self, folder: Path, wanted: set[str], acceptance: bool) -> None:
        self.folder = folder
        self.wanted = wanted
        self.covered = covered()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[str, Future[Finished]] = {}
        # The dry run is needed by its own tests and by those of the scripts it runs.
        self.acceptance = acceptance or any(w in self.covered for w in wanted)

    def _start(self) -> None:
        # One more than the cores: the runs also wait (cluster start-ups, child processes).
        self._pool = ThreadPoolExecutor(max_workers=(os.cpu_count() or 2) + 1)
        # The longest first: the dry run, then the scripts it does not run.
        if self.acceptance:
            self._jobs["acceptance"] = self._pool.submit(
                _acceptance, self.folder / "acceptance", self.folder / "acceptance-out", "--dry-run"
            )
        for name, args in RUNS:
            key = run_id(name, args)
            if key in self.wanted and (args or name not in self.covered):
                self._jobs[key] = self._pool.submit(self._smoke, name, args)

    def _smoke(self, name: str, args: list[str]) -> Finished:
        results = self.folder / re.sub(r"[^\w.-]+", "_", run_id(name, args))
        results.mkdir(parents=True)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(BENCH / name), "--smoke", *args],
            cwd=ROOT,
            env=_env(results),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        return Finished(
            done.returncode, done.stdout + done.stderr, results, time.perf_counter() - start
        )

    def get(self, key: str) -> Finished:
        with self._lock:
            if self._pool is None:
                self._start()
        return self._jobs[key].result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runs]:
    here = [i for i in request.session.items if getattr(i, "module", None) is sys.modules[__name__]]
    wanted = {
        str(i.callspec.params["run"])  # type: ignore[attr-defined]
        for i in here
        if "run" in getattr(getattr(i, "callspec", None), "params", {})
    }
    acceptance = any(i.name.startswith("test_acceptance_") for i in here)
    before = sorted(p.name for p in (BENCH / "results").iterdir())
    runner = Runs(tmp_path_factory.mktemp("benchmarks"), wanted, acceptance)
    yield runner
    runner.close()
    after = sorted(p.name for p in (BENCH / "results").iterdir())
    assert after == before, "a smoke run wrote to benchmarks/results/"


def _results(folder: Path) -> list[dict[str, Any]]:
    return [
        json.loads(p.read_text())
        for p in sorted(folder.glob("*.json"))
        if not p.name.startswith("acceptance-step_")
    ]


def _tail(finished: Finished) -> str:
    return finished.output[-6000:]


def test_every_benchmark_has_a_smoke_mode() -> None:
    def smoke(text: str) -> bool:  # _common.parse adds --smoke; the probe adds its own
        return "--smoke" in text and ("from _common import" in text or "args.smoke" in text)

    missing = [n for n in SCRIPTS if not smoke((BENCH / n).read_text())]
    assert not missing, f"benchmarks without --smoke (see benchmarks/_common.py): {missing}"
    assert "scale.py" in SCRIPTS and "cluster_run.py" in SCRIPTS


@pytest.mark.parametrize("run", [run_id(n, a) for n, a in RUNS])
def test_benchmark_smoke(runs: Runs, run: str) -> None:
    name = run.split()[0]
    saves = "save(" in (BENCH / name).read_text()
    if run == name and name in runs.covered:
        step = runs.covered[name]
        finished = runs.get("acceptance")
        marker = finished.results / f"acceptance-step_{step}.json"
        assert marker.is_file(), f"the dry run did not run its {step} step:\n{_tail(finished)}"
        record = json.loads(marker.read_text())
        assert record["returncode"] == 0, f"{name} (dry run, step {step}):\n{_tail(finished)}"
        assert not saves or record["files"], f"{name} saved no results in the dry run"
        return
    finished = runs.get(run)
    if finished.returncode == SKIPPED:
        reason = [line for line in finished.output.splitlines() if line.startswith("skipped:")]
        pytest.skip(reason[-1] if reason else "the benchmark's data is absent")
    assert finished.returncode == 0, f"{run} --smoke failed:\n{_tail(finished)}"
    if saves:
        results = _results(finished.results)
        assert results, f"{run} --smoke saved nothing in {finished.results}"
        assert all(r["smoke"] for r in results)


# --------------------------------------------------------------------------- the acceptance


def test_acceptance_steps_and_limits() -> None:
    steps = dry_run_steps()
    names = [s for s, _, _ in steps]
    assert names[: len(ORDER)] == ORDER
    assert {"gate", "cluster", "summary"} <= set(names)
    gpu = subprocess.run(
        ["bash", str(ACCEPTANCE), "--print"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    limits = [int(line.split("\t")[1]) for line in gpu.splitlines()]
    assert sum(limits) <= 480, f"the steps' limits sum to {sum(limits)} s, over 8 minutes"
    assert all(command for _, _, command in steps)


def test_acceptance_gpu_commands_parse() -> None:
    """The GPU command lines, which no CPU can run, are valid for their benchmarks."""
    gpu = subprocess.run(
        ["bash", str(ACCEPTANCE), "--print"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    commands = [line.split("\t")[2].split()[1:] for line in gpu.splitlines()]
    code = f"""
import runpy, sys
sys.path.insert(0, {str(BENCH)!r})
for argv in {commands!r}:
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise SystemExit(f"{{argv}}: exit {{exit.code}}")
    else:
        raise SystemExit(f"{{argv}}: ran instead of parsing its arguments only")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "XCLAY_BENCH_PARSE_ONLY": "1"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_acceptance_dry_run(runs: Runs) -> None:
    finished = runs.get("acceptance")
    assert finished.returncode == 0, _tail(finished)
    for step, _, _ in dry_run_steps():
        record = json.loads((finished.results / f"acceptance-step_{step}.json").read_text())
        assert record["returncode"] == 0, (step, _tail(finished))
        assert record["dry_run"] is True
    assert (finished.results.parent / "acceptance-out" / "acceptance.tgz").is_file()


def test_acceptance_results_say_what_ran(runs: Runs) -> None:
    results = _results(runs.get("acceptance").results)
    by = {r["benchmark"]: r for r in results}
    for r in results:
        assert {"commit", "dirty", "code", "context", "machine"} <= set(r)
        assert {"device_name", "driver", "versions"} <= set(r["context"])
        assert {"torch", "cupy", "kvikio", "nvcomp"} <= set(r["context"]["versions"])
    pipeline = by["embed_pipeline"]["params"]
    assert pipeline["engine"] == by["embed_pipeline"]["results"]["data_path"]["engine"]
    assert "engine_requested" in pipeline
    throughput = [r for r in results if r["benchmark"] == "model_throughput"]
    for r in throughput:
        assert r["params"]["chip_size"] == r["results"]["chip_size"]
        assert {row["chip_size"] for row in r["results"]["rows"]} == {r["params"]["chip_size"]}
    rows = by["read_engines"]["results"]["rows"]
    assert all("engine" in row for row in rows)
    assert all("reader" in row for row in rows if "chips_per_s" in row)


def test_acceptance_continues_and_keeps_results(runs: Runs, tmp_path: Path) -> None:
    """A second call skips what is done for this code; a step cut short by its limit
    leaves the results before it as they were, and the next call runs it again."""
    first = runs.get("acceptance")
    assert first.returncode == 0, _tail(first)
    folder = tmp_path / "results"
    subprocess.run(["cp", "-r", str(first.results), str(folder)], check=True)
    # The first call's code: this checkout may change meanwhile (not in CI; here, beside
    # other work), and what is tested is how a call continues one on the same code.
    code = json.loads((folder / "acceptance-step_env.json").read_text())["code"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    (folder / "acceptance-step_summary.json").unlink()
    out = tmp_path / "out"
    cut = _acceptance(folder, out, "--dry-run", LIMITS="summary=0.2", XCLAY_CODE=code)
    assert cut.returncode != 0, cut.output
    for step, _, _ in dry_run_steps():
        if step != "summary":
            assert f"=== {step}: skipped, done for code" in cut.output, cut.output
    assert "cut short by its 0.2s limit" in cut.output, cut.output
    assert json.loads((folder / "acceptance-step_summary.json").read_text())["returncode"] == 124
    for name, stamp in stamps.items():
        if name != "acceptance-step_summary.json":
            assert (folder / name).stat().st_mtime_ns == stamp, f"{name} changed"
    again = _acceptance(folder, out, "--dry-run", STEPS="summary", XCLAY_CODE=code)
    assert again.returncode == 0, again.output
    assert json.loads((folder / "acceptance-step_summary.json").read_text())["returncode"] == 0


def test_acceptance_needs_a_gpu_unless_dry(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here")
    done = _acceptance(tmp_path / "results", tmp_path / "out")
    assert done.returncode == 2
    assert "no CUDA GPU here" in done.output
    assert not list((tmp_path / "results").glob("*.json"))


# --------------------------------------------------------------------------- what it needs


def _bench_module(name: str) -> Any:
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def test_gpu_wheel_list_is_complete() -> None:
    wheels = _bench_module("_wheels")
    listed = wheels.WheelList.read()
    assert wheels.declared(listed) == []
    for name in ("attrs", "certifi", "toolz", "cloudpickle", "click", "dask-cuda", "distributed"):
        assert name in listed.pins, f"{name} is not in benchmarks/gpu_wheels.txt"
    assert {"torch", "cupy-cuda13x", "xarray", "pyarrow"} <= listed.image
    header = (BENCH / "gpu_wheels.sh").read_text()
    assert "bash benchmarks/gpu_wheels.sh" in header


def test_gpu_wheel_list_refuses_what_would_break_the_install(tmp_path: Path) -> None:
    wheels = _bench_module("_wheels")
    twice = tmp_path / "twice.txt"
    twice.write_text("zarr==3.1.6\nZarr==3.1.5\n")
    with pytest.raises(ValueError, match="listed twice"):
        wheels.WheelList.read(twice)
    loose = tmp_path / "loose.txt"
    loose.write_text("zarr>=3\n")
    with pytest.raises(ValueError, match="not pinned"):
        wheels.WheelList.read(loose)


def test_gate_chips_need_no_rioxarray() -> None:
    """The precision gate's real imagery is in the repository and opens without rioxarray."""
    chips = BENCH / "data" / "gate_chips.npz"
    assert chips.stat().st_size < 400_000
    code = f"""
import sys
sys.modules["rioxarray"] = None  # importing it fails
sys.path.insert(0, {str(BENCH)!r})
import precision_gate
batch, spec = precision_gate.gate_chips(64, 64)
assert len(batch) == 16 and spec.bands[0] == "blue", (len(batch), spec.bands)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_gate_chips_are_the_scene_they_name() -> None:
    """The array file holds the Landsat scene's pixels, place and CRS (where the scene is)."""
    gate = _bench_module("precision_gate")
    if not gate.SCENE.is_file():
        pytest.skip(f"needs the real scene at {gate.SCENE}")
    rioxarray = pytest.importorskip("rioxarray")
    import numpy as np

    scene = rioxarray.open_rasterio(gate.SCENE)
    r, c, n = gate.CUT
    cut = scene.isel(y=slice(r, r + n), x=slice(c, c + n))
    cube = gate.gate_cube()
    np.testing.assert_array_equal(cube["pixels"].values[0], cut.values)
    np.testing.assert_allclose(cube["x"].values, cut["x"].values)
    np.testing.assert_allclose(cube["y"].values, cut["y"].values)
    from pyproj import CRS

    assert CRS(cube["spatial_ref"].attrs["crs_wkt"]).to_epsg() == cut.rio.crs.to_epsg() == 31985


def test_gpu_wheels_keep_the_listed_version(tmp_path: Path) -> None:
    """Another tool's unpinned download beside the list's pin: the other version goes, and
    the closure check names what is still missing."""
    import zipfile

    wheels = _bench_module("_wheels")
    listed = wheels.WheelList.read()
    pinned = str(listed.pins["dask"].specifier).removeprefix("==")
    for version in (pinned, "2099.1.0"):
        with zipfile.ZipFile(tmp_path / f"dask-{version}-py3-none-any.whl", "w") as z:
            z.writestr(
                f"dask-{version}.dist-info/METADATA",
                f"Name: dask\nVersion: {version}\nRequires-Dist: toolz>=0.12\n"
                "Requires-Dist: nothing-provides-this\n",
            )
    problems = wheels.check(tmp_path, listed)
    assert any("several versions" in p for p in problems)
    removed = wheels.dedupe(tmp_path, listed)
    assert [p.name for p in removed] == ["dask-2099.1.0-py3-none-any.whl"]
    problems = wheels.check(tmp_path, listed)
    assert not any("several versions" in p or p.startswith("dask==") for p in problems)
    assert any("nothing-provides-this" in p for p in problems)
    assert any(p.startswith("zarr==") for p in problems)  # listed, not downloaded here
