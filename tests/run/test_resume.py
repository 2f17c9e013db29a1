"""Resumable runs under faults, with real processes: kill -9, killed Dask workers,
corrupt chunks, a full disk, read-only outputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")

import yaml

import xclay
from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS
from xclay.ingest import stac_item
from xclay.run import load_spec, run
from xclay.run.cluster import NO_DASHBOARD


@pytest.fixture(scope="module")
def items_file(olinda_tif: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("items")
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS, id="olinda")
    path = folder / "items.json"
    pystac.ItemCollection([item]).save_object(dest_href=str(path))
    return path


def write_spec(folder: Path, items: Path, **compute: object) -> Path:
    """Olinda in 32 px chips (11 x 11, padded) and regions of 2 x 2 chips: 36 regions a phase."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": "resume",
        "input": {"stac": {"items": str(items)}, "bands": OLINDA_BANDS},
        "grid": {"resolution": 28.5, "chip_size": 32, "edges": "pad"},
        "model": {"name": "rcf", "options": {"num_filters": 16, "sample_chips": 8}},
        "compute": {"region_chips": 2, "batch_size": 3, **compute},
        "quality": {"max_nodata": 0.9},
        "outputs": {"dir": "out"},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xclay.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )  # type: ignore[call-overload]


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def markers(outdir: Path, kind: str, phase: str) -> list[Path]:
    """The region markers a run left (``_xclay/<kind>/<phase>/<zone>/<bucket>/*.json``)."""
    return sorted((outdir / "_xclay" / kind / phase).rglob("*.json"))


def done(outdir: Path, phase: str) -> int:
    return len(markers(outdir, "done", phase))


def table(outdir: Path) -> pa.Table:
    parts = sorted((outdir / "embeddings.parquet").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def assert_same_outputs(a: Path, b: Path) -> None:
    ea = xclay.open_embeddings(a / "embeddings.zarr")
    eb = xclay.open_embeddings(b / "embeddings.zarr")
    for name in ("embedding", "nodata_fraction", "embedded"):
        np.testing.assert_array_equal(ea[name].values, eb[name].values, err_msg=name)
    np.testing.assert_array_equal(
        xclay.open_datacube(a / "cube.zarr")["pixels"].values,
        xclay.open_datacube(b / "cube.zarr")["pixels"].values,
    )
    ta, tb = table(a), table(b)
    assert ta.num_rows == 121
    # Rows are the same whatever the regions (and so the parts) they were written in.
    columns = ["id", "embedding", "geometry", "source_ids"]
    assert ta.select(columns).sort_by("id").equals(tb.select(columns).sort_by("id"))


@pytest.fixture(scope="module")
def reference(items_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, in a subprocess like the others."""
    spec = write_spec(tmp_path_factory.mktemp("reference"), items_file)
    code, _out, err = finish(cli("run", str(spec), "--no-progress"))
    assert code == 0, err
    return spec.parent / "out"


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ingest", "embed"])
def test_kill_9_midway_then_resume_gives_identical_outputs(
    tmp_path: Path, items_file: Path, reference: Path, phase: str
) -> None:
    spec = write_spec(tmp_path, items_file)
    outdir = tmp_path / "out"
    proc = cli("run", str(spec), "--no-progress")
    deadline = time.time() + 120
    while done(outdir, phase) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()  # reap it and close its pipes
    assert done(outdir, "embed") < 36  # it really was cut short
    with pytest.raises(xclay.errors.DatacubeError, match="incomplete"):
        xclay.open_embeddings(
            outdir / "embeddings.zarr"
        ) if phase == "embed" else xclay.open_datacube(outdir / "cube.zarr")
    code, out, err = finish(cli("run", str(spec), "--no-progress"))
    assert code == 0, err
    assert "resumed" in out
    assert done(outdir, "embed") == 36
    assert not list(outdir.rglob(".*.partial-*"))  # temporary files of the killed run are gone
    assert_same_outputs(outdir, reference)


def _held(dask_scheduler: Any) -> int:
    """Regions in flight on the scheduler: tasks a client wants that have not finished. A
    finished one can stay wanted a moment after its result was folded: distributed sends
    a future's release one event-loop turn after it was asked for, so the next region's
    submission can reach the scheduler first."""
    return sum(1 for ts in dask_scheduler.tasks.values() if ts.who_wants and ts.state != "memory")


@pytest.mark.slow
def test_dask_worker_killed_mid_task_is_retried_elsewhere(tmp_path: Path, items_file: Path) -> None:
    """A worker killed mid-task: its task runs again elsewhere, the run completes with the
    outputs of an uninterrupted run, and the scheduler never holds more than the window
    of regions (2 of the phase's 36)."""
    import torch
    from distributed import Client, LocalCluster

    threads = torch.get_num_threads()
    try:
        reference = write_spec(tmp_path / "reference", items_file)
        run(load_spec(reference), progress=False, torch_threads=1)  # the workers' thread count
    finally:
        torch.set_num_threads(threads)
    spec = write_spec(tmp_path / "cluster", items_file, regions_in_flight=2)
    outdir = tmp_path / "cluster" / "out"
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **NO_DASHBOARD) as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())
        killed: list[int] = []

        def killer() -> None:
            deadline = time.time() + 120
            while done(outdir, "embed") < 4 and time.time() < deadline:
                time.sleep(0.01)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

        held: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                held.append(client.run_on_scheduler(_held))

        thread = threading.Thread(target=killer)
        watcher = threading.Thread(target=watch)
        thread.start()
        watcher.start()
        try:
            report = run(load_spec(spec), client=client, progress=False, torch_threads=1)
        finally:
            stop.set()
            watcher.join()
        thread.join()
        assert killed
        assert pids[0] not in client.run(os.getpid).values()  # that worker is gone (restarted anew)
    assert max(held) <= 2 and len(held) > 10, (max(held), len(held))
    assert report.status == "complete", report.failed
    assert report.run["chips_embedded"] == 121
    assert_same_outputs(outdir, reference.parent / "out")


@pytest.mark.slow
def test_a_run_on_a_cluster_killed_midway_resumes(tmp_path: Path, items_file: Path) -> None:
    """``xclay run --cluster local:2`` (a window of 2 regions in flight) killed with its
    workers midway: the rerun keeps the finished regions as they were and does the rest;
    every chip once."""
    spec = write_spec(tmp_path, items_file, regions_in_flight=2)
    outdir = tmp_path / "out"
    proc = cli("run", str(spec), "--no-progress", "--cluster", "local:2", start_new_session=True)
    deadline = time.time() + 180
    while done(outdir, "embed") < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its cluster, together
    proc.communicate()
    finished = done(outdir, "embed")
    assert 8 <= finished < 36
    before = {p: p.stat().st_mtime_ns for p in markers(outdir, "done", "embed")}
    code, out, err = finish(cli("run", str(spec), "--no-progress", "--cluster", "local:2"))
    assert code == 0, err
    assert "resumed" in out and done(outdir, "embed") == 36
    assert {p: p.stat().st_mtime_ns for p in before} == before
    rows = table(outdir)
    assert rows.num_rows == 121 and len(set(rows["id"].to_pylist())) == 121


@pytest.mark.slow
def test_a_many_region_run_killed_midway_resumes_to_the_same_outputs(
    tmp_path: Path, items_file: Path, reference: Path
) -> None:
    spec = write_spec(tmp_path, items_file, region_chips=1)  # 121 regions a phase
    outdir = tmp_path / "out"
    proc = cli("run", str(spec), "--no-progress")
    deadline = time.time() + 180
    while done(outdir, "embed") < 40 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    finished = done(outdir, "embed")
    assert 40 <= finished < 121
    before = {p: p.stat().st_mtime_ns for p in markers(outdir, "done", "embed")}
    code, out, err = finish(cli("run", str(spec), "--no-progress"))
    assert code == 0, err
    assert "resumed" in out and done(outdir, "embed") == 121
    # The finished regions were kept as they were, not redone.
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert_same_outputs(outdir, reference)


@pytest.mark.slow
def test_corrupt_chunk_fails_its_region_and_only_it_is_retried(
    tmp_path: Path, items_file: Path, reference: Path
) -> None:
    spec = write_spec(tmp_path, items_file)
    outdir = tmp_path / "out"
    assert finish(cli("ingest", str(spec), "--no-progress"))[0] == 0
    # Chip (3, 4), in embed region 8: its chunk's bytes inside the shard are overwritten.
    from xclay.datacube.chunks import ArrayLayout, ChunkLocator

    ref = ChunkLocator(ArrayLayout.open(outdir / "cube.zarr" / "pixels")).find((0, 0, 3, 4))
    assert ref is not None and ref.nbytes is not None
    chunk = Path(ref.path)
    original = chunk.read_bytes()
    damaged = bytearray(original)
    damaged[ref.offset : ref.offset + ref.nbytes] = (b"not a zstd frame" * ref.nbytes)[: ref.nbytes]
    chunk.write_bytes(bytes(damaged))
    code, out, err = finish(cli("embed", str(spec), "--no-progress"))
    assert code == 3, err  # incomplete
    assert "embed-z00-0000008" in out and "INCOMPLETE" in out
    assert [p.stem for p in markers(outdir, "failed", "embed")] == ["embed-z00-0000008"]
    done_markers = {p: p.stat().st_mtime_ns for p in markers(outdir, "done", "embed")}
    assert len(done_markers) == 35
    with pytest.raises(xclay.errors.DatacubeError, match="incomplete"):
        xclay.open_embeddings(outdir / "embeddings.zarr")
    code, out, err = finish(cli("embed", str(spec), "--no-progress"))  # still corrupt
    assert code == 3
    assert {
        p: p.stat().st_mtime_ns for p in done_markers
    } == done_markers  # only region 8 was tried
    chunk.write_bytes(original)
    code, out, err = finish(cli("embed", str(spec), "--no-progress"))
    assert code == 0, err
    assert not markers(outdir, "failed", "embed")
    assert_same_outputs(outdir, reference)


def _limit_file_size(limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_full_disk_is_a_clear_error_and_leaves_nothing_that_looks_complete(
    tmp_path: Path, items_file: Path, reference: Path
) -> None:
    spec = write_spec(tmp_path, items_file)
    outdir = tmp_path / "out"
    code, out, err = finish(
        cli("run", str(spec), "--no-progress", preexec_fn=lambda: _limit_file_size(12_000))
    )
    assert code in (1, 3), (out, err)
    assert "File too large" in out + err
    assert "Traceback" not in err
    assert not xclay.datacube.is_complete(outdir / "embeddings.zarr")
    assert not (outdir / "embeddings.parquet" / "_xclay_complete.json").exists()
    for part in (outdir / "embeddings.parquet").glob("part-*.parquet"):
        pq.read_table(part)  # every part that exists is whole
    code, out, err = finish(cli("run", str(spec), "--no-progress"))  # space again: resume
    assert code == 0, err
    assert_same_outputs(outdir, reference)


def test_output_folder_that_cannot_be_created_is_a_clear_error(
    tmp_path: Path, items_file: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    spec = write_spec(tmp_path, items_file)
    data = yaml.safe_load(spec.read_text())
    data["outputs"]["dir"] = str(blocker / "out")
    spec.write_text(yaml.safe_dump(data))
    code, _out, err = finish(cli("run", str(spec), "--no-progress"))
    assert code == 1 and "Traceback" not in err
    assert "Not a directory" in err and "a-file" in err


def test_changing_the_spec_midway_is_refused(tmp_path: Path, items_file: Path) -> None:
    spec = write_spec(tmp_path, items_file)
    assert finish(cli("ingest", str(spec), "--no-progress"))[0] == 0
    data = yaml.safe_load(spec.read_text())
    data["grid"]["chip_size"] = 64
    spec.write_text(yaml.safe_dump(data))
    code, _out, err = finish(cli("run", str(spec), "--no-progress"))
    assert code == 1 and "holds outputs of a different run (changed: grid)" in err
    data["grid"]["chip_size"] = 32
    data["model"]["options"]["num_filters"] = 8
    spec.write_text(yaml.safe_dump(data))
    code, _out, err = finish(cli("run", str(spec), "--no-progress"))
    assert code == 1 and "changed: model" in err
