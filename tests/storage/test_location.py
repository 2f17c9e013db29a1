"""Locations: the same reads and writes on a local path and on a real S3 server."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from tests.s3 import S3Server
from xclay.errors import OutputExistsError, StorageError
from xclay.storage import Location, is_url, location


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    if request.param == "local":
        return location(tmp_path / "place")
    s3: S3Server = request.getfixturevalue("s3")
    return location(f"s3://{s3.bucket()}/place")


def test_what_a_place_is() -> None:
    assert location("cube.zarr").is_local and location("file:///tmp/x").path == Path("/tmp/x")
    remote = location("s3://bucket/runs/a/cube.zarr")
    assert (remote.root, remote.key, remote.name, remote.suffix) == (
        "s3://bucket", "runs/a/cube.zarr", "cube.zarr", ".zarr",
    )  # fmt: skip
    assert str(remote / "pixels" / "zarr.json") == "s3://bucket/runs/a/cube.zarr/pixels/zarr.json"
    assert str(remote.parent) == "s3://bucket/runs/a" and remote.with_suffix(".parquet").name == (
        "cube.parquet"
    )
    assert is_url("gs://b/x") and is_url("https://host/x.tif") and not is_url("/tmp/x")
    assert remote.gdal_path() == "/vsis3/bucket/runs/a/cube.zarr"
    assert location("https://host/a.tif").gdal_path() == "/vsicurl/https://host/a.tif"
    with pytest.raises(StorageError, match="does not know the ftp:// scheme"):
        location("ftp://host/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        location("s3:///x")


def test_reads_and_writes_are_the_same_everywhere(place: Location) -> None:
    assert not place.exists() and not place.is_dir()
    (place / "a" / "one.bin").write_bytes(b"0123456789")
    (place / "a" / "two.json").write_json({"x": 1})
    (place / "b.txt").write_text("hello")
    assert place.exists() and place.is_dir() and (place / "b.txt").is_file()
    assert not (place / "a").is_file() and (place / "a").is_dir()
    assert (place / "a" / "one.bin").read_ranges([0, 5], [2, 3]) == [b"01", b"567"]
    assert (place / "a" / "two.json").read_json() == {"x": 1}
    assert (place / "a" / "one.bin").size() == 10
    assert [p.name for p in place.iterdir()] == ["a", "b.txt"]
    json_size = (place / "a" / "two.json").size()
    assert [(p.name, n) for p, n in place.files()] == [("one.bin", 10), ("two.json", json_size),
                                                         ("b.txt", 5)]  # fmt: skip
    with pytest.raises(FileNotFoundError, match="missing"):
        (place / "missing").read_bytes()
    (place / "a").remove()
    assert not (place / "a").exists() and (place / "b.txt").exists()
    place.remove()
    assert not place.exists()


def test_create_only_writes_let_exactly_one_writer_win(place: Location) -> None:
    """Two workers writing the same marker with overwrite=False: one succeeds, the other
    is told it exists (S3: a conditional PUT, If-None-Match: *)."""
    marker = place / "done.json"
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def claim(k: int) -> None:
        barrier.wait()
        try:
            marker.write_json({"worker": k}, overwrite=False)
            outcomes.append("won")
        except OutputExistsError:
            outcomes.append("exists")

    threads = [threading.Thread(target=claim, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["exists"] * 7 + ["won"]
    assert set(marker.read_json()) == {"worker"}


def test_staged_outputs_appear_whole_or_not_at_all(place: Location) -> None:
    target = place / "table.parquet"
    with pytest.raises(RuntimeError), target.staged(overwrite=False) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer died")
    assert not target.exists()
    with target.staged(overwrite=False) as tmp:
        tmp.write_bytes(b"whole")
    assert target.read_bytes() == b"whole"
    with pytest.raises(OutputExistsError), target.staged(overwrite=False) as tmp:
        pass
    with target.local_copy() as copy:
        assert copy.read_bytes() == b"whole"


def test_errors_name_the_url_and_why(s3: S3Server) -> None:
    missing = location("s3://no-such-bucket-xclay/cube.zarr/zarr.json")
    with pytest.raises(StorageError, match=r"s3://no-such-bucket-xclay/cube.zarr/zarr.json: no "
                       r"such bucket 'no-such-bucket-xclay'"):  # fmt: skip
        missing.read_bytes()
    with pytest.raises(StorageError, match="HTTP locations are read-only"):
        location("https://example.invalid/x.json").write_text("x")


def test_fsspec_spellings_of_storage_options_work(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What xarray users pass to s3fs (anon, key/secret, client_kwargs' endpoint_url)
    configures the store as obstore's own keys would."""
    bucket = s3.bucket()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    assert location(f"gcs://{bucket}/x").root == f"gs://{bucket}"  # fsspec's scheme name
    keyed = {"key": "xclay-test", "secret": "xclay-test-secret", "endpoint_url": s3.endpoint}
    location(f"s3://{bucket}/private.txt", keyed).write_text("mine")
    assert location(f"s3://{bucket}/private.txt", keyed).read_text() == "mine"
    # anon: an unsigned request, which this private bucket refuses (public ones serve it)
    anonymous = {"anon": True, "client_kwargs": {"endpoint_url": s3.endpoint}}
    with pytest.raises(StorageError, match=r"private\.txt: access denied"):
        location(f"s3://{bucket}/private.txt", anonymous).read_text()
