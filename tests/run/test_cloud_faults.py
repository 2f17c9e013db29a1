"""Object storage misbehaving, through a fault-injecting proxy in front of a real S3 server:
transient errors, slow responses and dropped connections are retried with backoff; faults
that last fail the region with a clear error, leave nothing that looks complete, and the
same spec resumes once the store is well."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")
pytest.importorskip("obstore", reason="needs xclay[cloud]")

import yaml

import xclay
from tests.faulty_proxy import Fault, FaultyProxy, faulty_proxy  # noqa: F401 (fixture)
from tests.run.test_resume import items_file, reference, write_spec  # noqa: F401 (fixtures)
from tests.s3 import S3Server
from xclay.run import load_spec, run


def _spec(folder: Path, items: Path, outdir: str, **storage: object) -> Path:
    # Regions of 6 x 6 chips (4 a phase): every fault still meets its requests, in a
    # quarter of the round trips through the proxy; the embeddings are the reference's.
    spec = write_spec(folder, items, region_chips=6)
    data = yaml.safe_load(spec.read_text())
    data["outputs"]["dir"] = outdir
    data["storage"] = storage
    spec.write_text(yaml.safe_dump(data))
    return spec


def _same_embeddings(remote: str, local: Path) -> None:
    a = xclay.open_embeddings(f"{remote}/embeddings.zarr")
    b = xclay.open_embeddings(local / "embeddings.zarr")
    np.testing.assert_array_equal(a["embedding"].values, b["embedding"].values)
    rows = xclay.read_geoparquet(f"{remote}/embeddings.parquet", columns=["id"])
    assert rows.num_rows == 121


@pytest.mark.slow
def test_transient_errors_slow_responses_and_dropped_connections_are_retried(
    s3: S3Server,
    faulty_proxy: FaultyProxy,  # noqa: F811
    tmp_path: Path,
    items_file: Path,  # noqa: F811
    reference: Path,  # noqa: F811
) -> None:
    outdir = f"s3://{s3.bucket()}/run"
    faults = [
        faulty_proxy.add(Fault(r"^PUT .*/embeddings\.parquet/part-", status=503, times=3)),
        faulty_proxy.add(Fault(r"^PUT .*/cube\.zarr/pixels/c/", status=500, times=2)),
        faulty_proxy.add(Fault(r"^GET .*/_xclay/run\.json", status=0, times=1)),
        faulty_proxy.add(Fault(r"^GET .*/embeddings\.zarr/zarr\.json", delay=3.0, times=1)),
    ]
    spec = load_spec(_spec(tmp_path, items_file, outdir, timeout="2s"))
    report = run(spec, progress=False)
    assert report.status == "complete", report.failed
    assert [f.hits for f in faults] == [3, 2, 1, 1]  # every fault happened, and was survived
    _same_embeddings(outdir, reference)


@pytest.mark.slow
def test_a_lasting_fault_fails_its_regions_clearly_and_the_run_resumes(
    s3: S3Server,
    faulty_proxy: FaultyProxy,  # noqa: F811
    tmp_path: Path,
    items_file: Path,  # noqa: F811
    reference: Path,  # noqa: F811
) -> None:
    outdir = f"s3://{s3.bucket()}/run"
    broken = faulty_proxy.add(
        Fault(r"^PUT .*/embeddings\.zarr/embedding/c/0/1/", status=500, times=None)
    )
    spec = load_spec(_spec(tmp_path, items_file, outdir, max_retries=1, retry_timeout=2))
    report = run(spec, progress=False)
    assert report.status == "incomplete" and broken.hits >= 2  # tried again, then gave up
    reasons = {f["reason"] for f in report.failed}
    assert all("embeddings.zarr" in r and "500" in r for r in reasons), reasons
    assert "INCOMPLETE" in report.describe()
    with pytest.raises(xclay.errors.DatacubeError, match="incomplete"):
        xclay.open_embeddings(f"{outdir}/embeddings.zarr")  # nothing looks complete
    with pytest.raises(xclay.errors.DatacubeError, match="not complete"):
        xclay.read_geoparquet(f"{outdir}/embeddings.parquet")
    broken.times = broken.hits  # the store is well again
    again = run(spec, progress=False)
    assert again.status == "complete" and again.resumed, again.failed
    _same_embeddings(outdir, reference)
