"""Checkpoints on object storage: read once into xclay's cache, verified by sha256, reused
while the remote file is unchanged, downloaded again when it changed or the copy was
damaged. A Clay checkpoint with random weights on a real S3 server stands in for the
official one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from tests.s3 import S3Server, subprocess_env
from xclay.errors import CheckpointError
from xclay.storage import location
from xclay.storage.cache import local_checkpoint

torch = pytest.importorskip("torch", reason="needs torch")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("XCLAY_CACHE", str(folder))
    return folder


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    from xclay.testing import write_clay_checkpoint

    (tmp_path / "weights").mkdir()
    return write_clay_checkpoint(tmp_path / "weights" / "clay-v1.5.ckpt", size="tiny", seed=3)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(cache: Path, url: str) -> Path:
    return cache / "checkpoints" / hashlib.sha256(url.encode()).hexdigest() / "clay-v1.5.ckpt"


def test_a_clay_checkpoint_in_a_bucket_embeds_as_the_local_file(
    s3: S3Server, cache: Path, checkpoint: Path, demo_cube_256: xr.Dataset
) -> None:
    url = f"s3://{s3.bucket()}/models/clay-v1.5.ckpt"
    location(url).upload(checkpoint)

    # fp32: bf16's rounding may differ between two calls of the CPU kernels (seen once
    # under load); the weights are what is compared here
    local = xclay.embed(demo_cube_256, model="clay-v1.5", checkpoint=checkpoint, chip_size=64,
                        precision="fp32", progress=False)  # fmt: skip
    remote = xclay.embed(demo_cube_256, model="clay-v1.5", checkpoint=url, chip_size=64,
                         precision="fp32", progress=False)  # fmt: skip
    np.testing.assert_allclose(remote["embedding"].values, local["embedding"].values, rtol=1e-5)
    card = remote.attrs["model"]
    assert card["checkpoint"] == "clay-v1.5.ckpt"  # the file's name, wherever it was read
    assert (
        card["checkpoint_sha256"]
        == _sha256(checkpoint)
        == local.attrs["model"]["checkpoint_sha256"]
    )

    copy = _cached(cache, url)
    assert copy.read_bytes() == checkpoint.read_bytes()
    record = json.loads((copy.parent / "source.json").read_text())
    assert record["url"] == url and record["size"] == checkpoint.stat().st_size
    assert record["sha256"] == _sha256(checkpoint) and record["etag"]


def test_the_cached_copy_is_reused_until_it_is_damaged_or_the_remote_file_changes(
    s3: S3Server, cache: Path, checkpoint: Path, tmp_path: Path
) -> None:
    from xclay.testing import write_clay_checkpoint

    url = f"s3://{s3.bucket()}/clay-v1.5.ckpt"
    location(url).upload(checkpoint)
    copy = local_checkpoint(url)
    assert copy == _cached(cache, url)
    first = copy.stat()

    # Used again: the same file, not downloaded again (nor rewritten).
    encoder = xclay.models.get_model("clay-v1.5", checkpoint=url)
    assert encoder.card.checkpoint_sha256 == _sha256(checkpoint)
    again = copy.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    # Damaged (same size, one byte changed): downloaded again, whole.
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert local_checkpoint(url) == copy and _sha256(copy) == _sha256(checkpoint)
    assert copy.stat().st_ino != first.st_ino  # a new file renamed into place

    # Replaced remotely by other weights: the new ones, and the card says so.
    (tmp_path / "other").mkdir()
    other = write_clay_checkpoint(tmp_path / "other" / "clay-v1.5.ckpt", size="tiny", seed=4)
    location(url).upload(other)
    encoder = xclay.models.get_model("clay-v1.5", checkpoint=url)
    assert encoder.card.checkpoint_sha256 == _sha256(other) == _sha256(copy)
    assert not [p.name for p in copy.parent.iterdir() if p.name.endswith(".partial")]


def test_local_paths_are_used_where_they_are_and_missing_objects_are_named(
    s3: S3Server, cache: Path, checkpoint: Path
) -> None:
    assert local_checkpoint(checkpoint) == checkpoint
    assert local_checkpoint(f"file://{checkpoint}") == checkpoint
    assert not cache.exists()
    url = f"s3://{s3.bucket()}/none/clay-v1.5.ckpt"
    with pytest.raises(CheckpointError, match=f"checkpoint {url} does not exist"):
        xclay.models.get_model("clay-v1.5", checkpoint=url)


def test_two_processes_downloading_at_once_leave_one_whole_copy(
    s3: S3Server, cache: Path, checkpoint: Path
) -> None:
    url = f"s3://{s3.bucket()}/shared/clay-v1.5.ckpt"
    location(url).upload(checkpoint)
    code = (
        "from xclay.storage.cache import local_checkpoint as c; import sys; print(c(sys.argv[1]))"
    )
    env = {**subprocess_env(s3), "XCLAY_CACHE": str(cache)}
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    paths = {worker.communicate(timeout=120)[0].strip() for worker in workers}
    assert all(worker.returncode == 0 for worker in workers)
    copy = _cached(cache, url)
    assert paths == {str(copy)} and _sha256(copy) == _sha256(checkpoint)
    assert sorted(os.listdir(copy.parent)) == [".lock", "clay-v1.5.ckpt", "source.json"]


def test_xclay_checkpoint_may_name_a_url(
    s3: S3Server, cache: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"s3://{s3.bucket()}/env/clay-v1.5.ckpt"
    location(url).upload(checkpoint)
    monkeypatch.setenv("XCLAY_CHECKPOINT", url)
    encoder = xclay.models.get_model("clay-v1.5")
    assert encoder.card.checkpoint_sha256 == _sha256(checkpoint)


def test_a_run_specs_checkpoint_may_be_a_url(
    s3: S3Server, cache: Path, checkpoint: Path, tmp_path: Path, olinda_tif: Path
) -> None:
    """`xclay run` with model.checkpoint: s3://...: planned, checked and embedded with the
    cached copy; the outputs' model card names the file and its sha256."""
    import pystac
    import yaml

    from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS
    from xclay.ingest import stac_item

    url = f"s3://{s3.bucket()}/models/clay-v1.5.ckpt"
    location(url).upload(checkpoint)
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    pystac.ItemCollection([item]).save_object(dest_href=str(tmp_path / "items.json"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "input": {"stac": {"items": "items.json"}, "bands": OLINDA_BANDS},
        "grid": {"resolution": 28.5, "chip_size": 32, "edges": "pad"},
        "model": {"name": "clay-v1.5", "checkpoint": url},
        "quality": {"max_nodata": 0.9},
        "outputs": {"dir": "out"},
    }))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "xclay.cli", "run", str(tmp_path / "spec.yaml"), "--no-progress"],
        capture_output=True, text=True, timeout=300,
        env={**subprocess_env(s3), "XCLAY_CACHE": str(cache)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    card = xclay.open_embeddings(tmp_path / "out" / "embeddings.zarr").attrs["model"]
    assert card["checkpoint"] == "clay-v1.5.ckpt"
    assert card["checkpoint_sha256"] == _sha256(checkpoint)
    assert _sha256(_cached(cache, url)) == _sha256(checkpoint)


def test_a_checkpoint_on_an_http_server_is_fetched_once(
    cache: Path, checkpoint: Path, tmp_path: Path
) -> None:
    """Counted at the server: the first use GETs the file, the next ones only HEAD it; a
    changed file (another ETag) is fetched again."""
    from tests.servers import serving

    www = tmp_path / "www"
    www.mkdir()
    served = www / "clay-v1.5.ckpt"
    served.write_bytes(checkpoint.read_bytes())
    log = tmp_path / "requests.log"
    log.touch()
    with serving("http", str(www), str(log)) as port:
        url = f"http://127.0.0.1:{port}/clay-v1.5.ckpt"
        for _ in range(3):
            assert _sha256(local_checkpoint(url)) == _sha256(checkpoint)
        requests = [line.split()[0] for line in log.read_text().splitlines()]
        assert requests == ["HEAD", "GET", "HEAD", "HEAD"], requests
        data = bytearray(checkpoint.read_bytes())
        data[-1] ^= 0xFF
        served.write_bytes(bytes(data))
        os.utime(served, ns=(0, 10**18))  # another modification time: another ETag
        assert local_checkpoint(url).read_bytes() == bytes(data)
    assert [line.split()[0] for line in log.read_text().splitlines()][4:] == ["HEAD", "GET"]
