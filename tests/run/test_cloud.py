"""Runs on object storage, against a real S3 server on 127.0.0.1: every output in a bucket,
the same bytes as on disk, kill -9 and resume, a datacube read from a bucket, and one-line
errors naming the URL."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")
pytest.importorskip("obstore", reason="needs xclay[cloud]")

import pyarrow as pa
import yaml

import xclay
from tests.run.test_resume import items_file, reference, write_spec  # noqa: F401 (fixtures)
from tests.s3 import S3Server, subprocess_env
from xclay.storage import location


def _spec_to(folder: Path, items: Path, outdir: str, **compute: object) -> Path:
    spec = write_spec(folder, items, **compute)
    data = yaml.safe_load(spec.read_text())
    data["outputs"]["dir"] = outdir
    spec.write_text(yaml.safe_dump(data))
    return spec


def _cli(server: S3Server, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "xclay.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(server),
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _done(outdir: str, phase: str) -> int:
    folder = location(outdir) / "_xclay" / "done" / phase
    return sum(1 for marker, _ in folder.files() if marker.name.endswith(".json"))


def _table(outdir: str) -> pa.Table:
    return xclay.read_geoparquet(f"{outdir}/embeddings.parquet", dequantize=False)


def _assert_same_outputs(remote: str, local: Path) -> None:
    a = xclay.open_embeddings(f"{remote}/embeddings.zarr")
    b = xclay.open_embeddings(local / "embeddings.zarr")
    for name in ("embedding", "nodata_fraction", "embedded"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    np.testing.assert_array_equal(
        xclay.open_datacube(f"{remote}/cube.zarr")["pixels"].values,
        xclay.open_datacube(local / "cube.zarr")["pixels"].values,
    )
    ta, tb = _table(remote), xclay.read_geoparquet(local / "embeddings.parquet", dequantize=False)
    assert ta.num_rows == tb.num_rows == 121
    columns = ["id", "embedding", "geometry", "source_ids"]
    assert ta.select(columns).sort_by("id").equals(tb.select(columns).sort_by("id"))


@pytest.mark.slow
def test_a_run_writes_every_output_to_a_bucket(
    s3: S3Server,
    tmp_path: Path,
    items_file: Path,  # noqa: F811
    reference: Path,  # noqa: F811
) -> None:
    outdir = f"s3://{s3.bucket()}/runs/olinda"
    spec = _spec_to(tmp_path, items_file, outdir)
    dry = _cli(s3, "run", str(spec), "--dry-run")
    code, out, err = _finish(dry)
    assert code == 0, err
    assert not location(outdir).exists()  # the dry run's probe left nothing behind
    code, out, err = _finish(_cli(s3, "run", str(spec), "--no-progress"))
    assert code == 0, err
    assert f"{outdir}/embeddings.zarr" in out and not (tmp_path / "s3:").exists()
    _assert_same_outputs(outdir, reference)
    collection = location(f"{outdir}/stac/collection.json").read_json()
    hrefs = [link["href"] for link in collection["links"]] + [
        asset["href"] for asset in collection.get("assets", {}).values()
    ]
    assert "../embeddings.parquet" in hrefs  # relative: the catalog moves with the folder
    items = [p for p, _ in (location(outdir) / "stac" / "items").files()]
    assert len(items) == 1 and items[0].read_json()["assets"]["embeddings"]["href"] == (
        "../../embeddings.zarr"
    )
    # the same spec again resumes: nothing left to do
    code, out, err = _finish(_cli(s3, "run", str(spec), "--no-progress"))
    assert code == 0 and "resumed" in out and "nothing left to embed" in out, err


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["ingest", "embed"])
def test_kill_9_on_object_storage_then_resume_gives_identical_outputs(
    s3: S3Server,
    tmp_path: Path,
    items_file: Path,  # noqa: F811
    reference: Path,  # noqa: F811
    phase: str,
) -> None:
    outdir = f"s3://{s3.bucket()}/run"
    spec = _spec_to(tmp_path, items_file, outdir)
    proc = _cli(s3, "run", str(spec), "--no-progress")
    deadline = time.time() + 180
    while _done(outdir, phase) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert _done(outdir, "embed") < 36  # it really was cut short
    store = "embeddings.zarr" if phase == "embed" else "cube.zarr"
    opener = xclay.open_embeddings if phase == "embed" else xclay.open_datacube
    with pytest.raises(xclay.errors.DatacubeError, match="incomplete"):
        opener(f"{outdir}/{store}")
    code, out, err = _finish(_cli(s3, "run", str(spec), "--no-progress"))
    assert code == 0, err
    assert "resumed" in out and _done(outdir, "embed") == 36
    _assert_same_outputs(outdir, reference)


def test_datacubes_and_embeddings_live_in_a_bucket(s3: S3Server, tmp_path: Path) -> None:
    """The Python API and `xclay embed` with URLs: nothing lands in a local folder named
    's3:' (the silent mistake before)."""
    bucket = s3.bucket()
    cube = xclay.datasets.demo_composite(128, seed=3)
    url = xclay.write_datacube(cube, f"s3://{bucket}/cube.zarr", chip_size=32)
    assert url == f"s3://{bucket}/cube.zarr"
    opened = xclay.open_datacube(url)
    np.testing.assert_array_equal(opened["pixels"].values, cube["pixels"].values)
    with pytest.raises(xclay.errors.OutputExistsError, match="already exists"):
        xclay.write_datacube(cube, url, chip_size=32)
    encoder = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    emb = xclay.embed(opened, model=encoder, chip_size=32)
    assert xclay.to_zarr(emb, f"s3://{bucket}/emb.zarr") == f"s3://{bucket}/emb.zarr"
    xclay.to_geoparquet(emb, f"s3://{bucket}/emb.parquet")
    back = xclay.open_embeddings(f"s3://{bucket}/emb.zarr")
    np.testing.assert_array_equal(back["embedding"].values, emb["embedding"].values)
    rows = xclay.read_geoparquet(f"s3://{bucket}/emb.parquet", columns=["id", "embedding"])
    assert rows.num_rows == int(emb["embedded"].sum())
    result = subprocess.run(
        [sys.executable, "-m", "xclay.cli", "embed", url, "--out", f"s3://{bucket}/cli",
         "--chip-size", "32", "--no-progress"],
        capture_output=True, text=True, env=subprocess_env(s3), cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert xclay.read_geoparquet(f"s3://{bucket}/cli/embeddings.parquet").num_rows == 16
    assert not (tmp_path / "s3:").exists()


def test_storage_errors_are_one_line_naming_the_url(
    s3: S3Server,
    tmp_path: Path,
    items_file: Path,  # noqa: F811
) -> None:
    spec = _spec_to(tmp_path, items_file, "s3://no-such-bucket-xclay/run")
    for args in (["--dry-run"], ["--no-progress"]):
        code, _, err = _finish(_cli(s3, "run", str(spec), *args))
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1, err
        assert "s3://no-such-bucket-xclay/run" in lines[0] and "no such bucket" in lines[0]
    code, _, err = _finish(_cli(s3, "embed", f"s3://{s3.bucket()}/none.zarr", "--out", "o"))
    assert code == 1 and "no datacube at s3://" in err and len(err.strip().splitlines()) == 1
