"""STAC assets on object storage and HTTP servers, ingested as they are (GDAL's virtual file
systems, through odc-stac), under the GDAL settings xclay sets for cloud reads.

The servers are real and run in processes of their own (tests/servers.py): the S3 API
server of tests/s3.py and a static HTTP server with byte ranges, which logs the requests
GDAL makes. The same scene read from a local file is the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import xarray as xr

from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS
from tests.s3 import S3Server
from tests.servers import serving
from xclay.errors import StorageError
from xclay.storage import location
from xclay.storage.gdal import CLOUD_DEFAULTS, gdal_settings

if TYPE_CHECKING:
    import pystac

pytest.importorskip("odc.stac", reason="needs odc-stac (xclay[io])")

# Every variable that would change the settings, cleared for these tests (a developer's own
# AWS profile and endpoint included).
_ENVIRONMENT = (
    *CLOUD_DEFAULTS,
    "AWS_S3_ENDPOINT",
    "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING",
    "AWS_NO_SIGN_REQUEST",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT",
    "AWS_PROFILE",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in _ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return monkeypatch


@pytest.fixture
def s3_gdal(s3_server: S3Server, clean_env: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with the environment pointing at it as a user's would (the AWS
    tools' AWS_ENDPOINT_URL, which GDAL itself does not read)."""
    pytest.importorskip("obstore", reason="needs obstore (xclay[cloud])")
    for name, value in s3_server.env.items():
        clean_env.setenv(name, value)
    return s3_server


def _item(scene: Path, href: str) -> pystac.Item:
    from xclay.ingest import stac_item

    item = stac_item(scene, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    item.assets["data"].href = href
    return item


def _load(items: list[pystac.Item] | str, **kwargs: Any) -> xr.Dataset:
    from xclay.ingest import from_stac

    cube = from_stac(items, bands=OLINDA_BANDS, resolution=28.5, chunk_size=128, **kwargs)
    return cube.compute()  # Dask's threads read the chunks (several per band)


@pytest.fixture(scope="module")
def local_cube(olinda_tif: Path) -> xr.Dataset:
    from xclay.ingest import stac_item

    return _load([stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)])


def _same_pixels(remote: xr.Dataset, local: xr.Dataset) -> None:
    assert remote["pixels"].shape == local["pixels"].shape
    np.testing.assert_array_equal(remote["pixels"].values, local["pixels"].values)
    assert remote["pixels"].values.any()
    for name in ("x", "y", "band"):
        np.testing.assert_array_equal(remote[name].values, local[name].values)


# --------------------------------------------------------------------------- the settings


def test_cloud_defaults_and_what_overrides_them(clean_env: pytest.MonkeyPatch) -> None:
    assert gdal_settings() == dict(CLOUD_DEFAULTS)
    assert CLOUD_DEFAULTS["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert CLOUD_DEFAULTS["GDAL_HTTP_MULTIPLEX"] == "YES"

    # The AWS tools' endpoint, as GDAL spells it (GDAL reads no AWS_ENDPOINT_URL).
    clean_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = gdal_settings()
    assert (settings["AWS_S3_ENDPOINT"], settings["AWS_HTTPS"], settings["AWS_VIRTUAL_HOSTING"]) == (
        "127.0.0.1:9000", "NO", "FALSE",
    )  # fmt: skip

    # The user's own environment wins over xclay's defaults and derived values...
    clean_env.setenv("AWS_S3_ENDPOINT", "minio.lan:9000")
    clean_env.setenv("GDAL_HTTP_MAX_RETRY", "3")
    settings = gdal_settings()
    assert (settings["AWS_S3_ENDPOINT"], settings["GDAL_HTTP_MAX_RETRY"]) == ("minio.lan:9000", "3")

    # ...and the options given with the call win over the environment.
    settings = gdal_settings(
        {"GDAL_HTTP_MAX_RETRY": 5, "GDAL_HTTP_MULTIPLEX": False, "GDAL_CACHEMAX": 512},
        {"endpoint_url": "https://s3.example.org", "anon": True, "region": "eu-west-1"},
    )
    assert settings["GDAL_HTTP_MAX_RETRY"] == "5" and settings["GDAL_HTTP_MULTIPLEX"] == "NO"
    assert settings["GDAL_CACHEMAX"] == "512"
    assert (settings["AWS_S3_ENDPOINT"], settings["AWS_HTTPS"]) == ("s3.example.org", "YES")
    assert settings["AWS_NO_SIGN_REQUEST"] == "YES" and settings["AWS_REGION"] == "eu-west-1"

    # An active rasterio.Env is the user's too.
    import rasterio

    with rasterio.Env(GDAL_HTTP_RETRY_DELAY="2"):
        assert gdal_settings()["GDAL_HTTP_RETRY_DELAY"] == "2"

    with pytest.raises(StorageError, match="credentials are not GDAL options"):
        gdal_settings({"AWS_SECRET_ACCESS_KEY": "x"})


def test_the_odc_driver_travels_to_dask_workers_with_its_settings() -> None:
    """A lazy cube computed on a cluster pickles its reader driver to the workers."""
    import pickle

    from xclay.storage.gdal import odc_driver

    driver = pickle.loads(pickle.dumps(odc_driver({"GDAL_HTTP_MAX_RETRY": "7"})))
    assert driver.capture_env()["GDAL_HTTP_MAX_RETRY"] == "7"


# --------------------------------------------------------------------------- reads


def test_s3_assets_load_the_same_pixels_as_the_local_file(
    s3_gdal: S3Server, olinda_tif: Path, local_cube: xr.Dataset
) -> None:
    """Items whose asset is s3://bucket/scene.tif on an S3-compatible server named only by
    AWS_ENDPOINT_URL: GDAL gets the endpoint from xclay, in every Dask thread."""
    url = f"s3://{s3_gdal.bucket()}/scenes/scene.tif"
    location(url).upload(olinda_tif)
    cube = _load([_item(olinda_tif, url)])
    _same_pixels(cube, local_cube)
    source = cube.attrs["provenance"]["sources"][0]["assets"]["data"]
    assert source["href"] == url and len(source["sha256"]) == 64  # the item's checksum


def test_http_assets_load_the_same_pixels_and_the_users_environment_wins(
    tmp_path: Path, olinda_tif: Path, local_cube: xr.Dataset, clean_env: pytest.MonkeyPatch
) -> None:
    """An https-style asset on a static server: ranged GETs of the file and nothing else
    (GDAL's own defaults would also GET the folder, a listing, and HEAD nine sidecars of
    each file: .aux.xml, .msk, ...). A user who wants GDAL to list folders says so in the
    environment, and that wins over xclay's settings (and odc-stac's defaults)."""
    folder = tmp_path / "www"
    folder.mkdir()
    for name in ("scene.tif", "again.tif"):
        (folder / name).write_bytes(olinda_tif.read_bytes())
    log = tmp_path / "requests.log"
    log.touch()
    with serving("http", str(folder), str(log)) as port:
        cube = _load([_item(olinda_tif, f"http://127.0.0.1:{port}/scene.tif")])
        requests = log.read_text().splitlines()
        clean_env.setenv("GDAL_DISABLE_READDIR_ON_OPEN", "FALSE")
        _load([_item(olinda_tif, f"http://127.0.0.1:{port}/again.tif")])
        again = [line.strip() for line in log.read_text().splitlines()[len(requests) :]]
    _same_pixels(cube, local_cube)
    assert requests, "GDAL made no request"
    assert {line.split()[1] for line in requests} == {"/scene.tif"}, requests
    assert any("bytes=" in line for line in requests), requests  # ranged reads
    # The folder is listed now; the sidecars GDAL would then probe are still not files
    # on a server for xclay (CPL_VSIL_CURL_ALLOWED_EXTENSIONS: .tif, .jp2, ...).
    assert "GET /" in again and {line.split()[1] for line in again} == {"/", "/again.tif"}, again


def test_gdal_options_reach_the_reads(
    tmp_path: Path, olinda_tif: Path, clean_env: pytest.MonkeyPatch
) -> None:
    """gdal_options hold in the Dask tasks that read: allowing only .jp2 files on servers,
    GDAL takes the .tif for absent and the load fails naming it, without a request."""
    from rasterio.errors import RasterioIOError

    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "other.tif").write_bytes(olinda_tif.read_bytes())
    log = tmp_path / "requests.log"
    log.touch()
    with serving("http", str(folder), str(log)) as port:
        href = f"http://127.0.0.1:{port}/other.tif"
        with pytest.raises(RasterioIOError, match=r"other\.tif' does not exist"):
            _load(
                [_item(olinda_tif, href)], gdal_options={"CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".jp2"}
            )
    assert log.read_text() == ""


def test_check_local_hrefs_leaves_remote_assets_to_gdal(olinda_tif: Path) -> None:
    from xclay.errors import IngestError
    from xclay.ingest.items import check_local_hrefs

    for href in ("s3://bucket/a.tif", "https://host/a.tif", "/vsis3/bucket/a.tif"):
        check_local_hrefs([_item(olinda_tif, href)], OLINDA_BANDS)
    with pytest.raises(IngestError, match="does not exist"):
        check_local_hrefs([_item(olinda_tif, "/no/such/scene.tif")], OLINDA_BANDS)


# --------------------------------------------------------------------------- runs


def _run(folder: Path, items: list[pystac.Item], env: dict[str, str], **top: Any) -> Path:
    """``xclay run`` (a process of its own, as users run it) over ``items``; its outputs."""
    import pystac
    import yaml

    folder.mkdir()
    pystac.ItemCollection(items).save_object(dest_href=str(folder / "items.json"))
    spec = {
        "input": {"stac": {"items": "items.json"}, "bands": OLINDA_BANDS},
        "grid": {"resolution": 28.5, "chip_size": 32, "edges": "pad"},
        "model": {"name": "rcf", "options": {"num_filters": 16, "sample_chips": 8}},
        "quality": {"max_nodata": 0.9},
        "outputs": {"dir": "out"},
        **top,
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = subprocess.run(
        [sys.executable, "-m", "xclay.cli", "run", str(folder / "spec.yaml"), "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return folder / "out"


def _same_embeddings(a: Path, b: Path) -> None:
    import xclay

    ea, eb = (
        xclay.open_embeddings(a / "embeddings.zarr"),
        xclay.open_embeddings(b / "embeddings.zarr"),
    )
    np.testing.assert_array_equal(ea["embedding"].values, eb["embedding"].values)
    np.testing.assert_array_equal(
        xclay.open_datacube(a / "cube.zarr")["pixels"].values,
        xclay.open_datacube(b / "cube.zarr")["pixels"].values,
    )


@pytest.mark.slow
def test_a_run_reads_remote_assets_under_the_specs_gdal_and_storage_settings(
    s3: S3Server, tmp_path: Path, olinda_tif: Path
) -> None:
    """`xclay run` over items whose asset is on an HTTP server, then on the S3 server: the
    spec's ``gdal:`` options reach the reads of the run's ingest tasks (here: list folders,
    seen in the server's log), and its ``storage:`` endpoint reaches GDAL (the process's
    environment names no endpoint). Both give the local run's datacube and embeddings."""
    env = {k: v for k, v in os.environ.items() if k not in _ENVIRONMENT}
    local = _run(tmp_path / "local", [_item(olinda_tif, str(olinda_tif))], env)

    www = tmp_path / "www"
    www.mkdir()
    (www / "run.tif").write_bytes(olinda_tif.read_bytes())
    log = tmp_path / "requests.log"
    log.touch()
    with serving("http", str(www), str(log)) as port:
        item = _item(olinda_tif, f"http://127.0.0.1:{port}/run.tif")
        http = _run(tmp_path / "http", [item], env, gdal={"GDAL_DISABLE_READDIR_ON_OPEN": "NO"})
    assert "GET /" in [line.strip() for line in log.read_text().splitlines()]
    _same_embeddings(http, local)

    url = f"s3://{s3.bucket()}/scenes/run.tif"
    location(url).upload(olinda_tif)
    keys = {k: v for k, v in s3.env.items() if k != "AWS_ENDPOINT_URL"}
    remote = _run(tmp_path / "s3", [_item(olinda_tif, url)], {**env, **keys},
                  storage={"endpoint": s3.endpoint})  # fmt: skip
    _same_embeddings(remote, local)


def test_a_specs_gdal_options_are_mappings_of_values(tmp_path: Path) -> None:
    import yaml

    from xclay.run import SpecError, load_spec

    spec = {
        "input": {"stac": {"items": "items.json"}, "bands": ["red"]},
        "grid": {"resolution": 10},
        "outputs": {"dir": "out"},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert "gdal" not in load_spec(path).to_dict()  # none given: none stored
    path.write_text(yaml.safe_dump({**spec, "gdal": {"GDAL_HTTP_MAX_RETRY": 3}}))
    assert load_spec(path).to_dict()["gdal"] == {"GDAL_HTTP_MAX_RETRY": 3}
    path.write_text(yaml.safe_dump({**spec, "gdal": {"GDAL_HTTP_MAX_RETRY": [3]}}))
    with pytest.raises(
        SpecError,
        match=r"gdal: 'GDAL_HTTP_MAX_RETRY' must be a string, number or boolean, got \[3\]",
    ):
        load_spec(path)


# --------------------------------------------------------------------------- items files


def _collection(items: list[pystac.Item]) -> dict[str, Any]:
    import pystac

    return pystac.ItemCollection(items).to_dict(transform_hrefs=False)


def test_an_items_file_on_s3_resolves_relative_hrefs_against_its_url(
    s3: S3Server, olinda_tif: Path, tmp_path: Path
) -> None:
    from xclay.errors import IngestError
    from xclay.ingest import load_items

    bucket = s3.bucket()
    url = f"s3://{bucket}/stac/items.json"
    location(url).write_json(_collection([_item(olinda_tif, "../scenes/scene.tif")]))
    for source in (url, location(url)):
        (item,) = load_items(source)
        assert item.assets["data"].href == f"s3://{bucket}/scenes/scene.tif"

    # A catalog: its items, and their assets, found through its relative links.
    item = _item(olinda_tif, "./scene.tif")
    item.set_self_href(None)
    item.clear_links()
    root = f"s3://{bucket}/catalog"
    location(f"{root}/catalog.json").write_json({
        "type": "Catalog", "stac_version": "1.0.0", "id": "scenes", "description": "scenes",
        "links": [{"rel": "item", "href": "./olinda/olinda.json", "type": "application/json"}],
    })  # fmt: skip
    location(f"{root}/olinda/olinda.json").write_json(item.to_dict(transform_hrefs=False))
    (found,) = load_items(f"{root}/catalog.json")
    assert found.assets["data"].get_absolute_href() == f"{root}/olinda/scene.tif"

    with pytest.raises(IngestError, match=f"STAC file s3://{bucket}/none.json does not exist"):
        load_items(f"s3://{bucket}/none.json")
    with pytest.raises(StorageError, match="no such bucket"):
        load_items("s3://xclay-no-such-bucket/items.json")

    # file:// URLs are local files.
    (tmp_path / "items.json").write_text(
        json.dumps(_collection([_item(olinda_tif, "scenes/scene.tif")]))
    )
    (local,) = load_items(f"file://{tmp_path}/items.json")
    assert local.assets["data"].href == str(tmp_path / "scenes" / "scene.tif")


def test_an_items_file_on_an_http_server(tmp_path: Path, olinda_tif: Path) -> None:
    from xclay.ingest import load_items

    folder = tmp_path / "www"
    (folder / "stac").mkdir(parents=True)
    (folder / "stac" / "items.json").write_text(
        json.dumps(_collection([_item(olinda_tif, "scene.tif")]))
    )
    with serving("http", str(folder), str(tmp_path / "requests.log")) as port:
        (item,) = load_items(f"http://127.0.0.1:{port}/stac/items.json")
    assert item.assets["data"].href == f"http://127.0.0.1:{port}/stac/scene.tif"


def test_from_stac_reads_items_and_scene_from_a_bucket(
    s3_gdal: S3Server, olinda_tif: Path, local_cube: xr.Dataset
) -> None:
    """items.json and the scene beside it on S3, the asset's href relative to the file."""
    bucket = s3_gdal.bucket()
    location(f"s3://{bucket}/olinda/scene.tif").upload(olinda_tif)
    url = f"s3://{bucket}/olinda/items.json"
    location(url).write_json(_collection([_item(olinda_tif, "scene.tif")]))
    _same_pixels(_load(url), local_cube)


def test_a_run_specs_items_file_may_be_a_url(
    s3: S3Server, olinda_tif: Path, tmp_path: Path
) -> None:
    import yaml

    from xclay.run import load_spec, plan

    bucket = s3.bucket()
    url = f"s3://{bucket}/stac/items.json"
    location(url).write_json(_collection([_item(olinda_tif, "scene.tif")]))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "input": {"stac": {"items": url}, "bands": OLINDA_BANDS},
        "grid": {"resolution": 28.5, "chip_size": 32},
        "outputs": {"dir": "out"},
    }))  # fmt: skip
    spec = load_spec(path)
    assert spec.path(url).url == url
    resolved = plan(spec)
    assert resolved.items is not None
    (item,) = resolved.items.representatives()
    assert item.assets["data"].href == f"s3://{bucket}/stac/scene.tif"


# --------------------------------------------------------------------------- latency


def _s2_items(folder: Path, href: str) -> list[pystac.Item]:
    """Three Sentinel-2-like dates (4 uint16 bands, nodata 0, and the SCL), 64 x 64 px,
    their assets at ``href/<file>``."""
    import rasterio
    from affine import Affine

    from xclay.ingest import stac_item

    rng = np.random.default_rng(24)
    profile = {"driver": "GTiff", "width": 64, "height": 64, "count": 1, "crs": "EPSG:32720",
               "transform": Affine(10, 0, 500000, 0, -10, 9650000)}  # fmt: skip
    items = []
    for day in ("2024-03-01", "2024-03-11", "2024-03-21"):
        assets = {}
        for band in ("blue", "green", "red", "nir", "scl"):
            path = folder / f"{day}_{band}.tif"
            if band == "scl":
                data = rng.choice(np.array([4, 4, 4, 8, 9, 3, 0], dtype=np.uint8), (64, 64))
            else:
                data = rng.integers(0, 3000, (64, 64)).astype(np.uint16)
            with rasterio.open(path, "w", dtype=data.dtype, nodata=0, **profile) as dst:
                dst.write(data, 1)
            assets[band] = path
        item = stac_item(assets, datetime=f"{day}T14:00:00Z", id=day, collection="sentinel-2-l2a")
        for asset in item.assets.values():
            asset.href = f"{href}/{Path(asset.href).name}"
        items.append(item)
    return items


def test_a_median_over_http_keeps_many_reads_in_flight(tmp_path: Path) -> None:
    """Remote reads hide their latency: with one Dask thread computing the cube, a median
    composite of items on a server that answers each request 50 ms late still has many
    requests in flight at once (a chunk's reads run on a read pool sized for latency, not
    one at a time as Dask's tasks would), and makes the local files' composite."""
    import dask

    from xclay.ingest import from_stac

    folder = tmp_path / "www"
    folder.mkdir()
    local = _s2_items(folder, str(folder))
    log = tmp_path / "requests.log"
    log.touch()
    bands = ["blue", "green", "red", "nir"]
    with (
        dask.config.set(scheduler="threads", num_workers=1),
        serving("slow-http", str(folder), str(log), "0.05") as port,
    ):
        remote = from_stac(
            _s2_items(folder, f"http://127.0.0.1:{port}"), bands=bands, resolution=10
        ).compute()
        expected = from_stac(local, bands=bands, resolution=10).compute()
    in_flight = [int(line.split()[-1]) for line in log.read_text().splitlines()]
    assert len(in_flight) >= 15, in_flight  # 5 files a date, 3 dates
    assert max(in_flight) >= 8, in_flight
    np.testing.assert_array_equal(remote["pixels"].values, expected["pixels"].values)
    np.testing.assert_array_equal(remote["quality"].values, expected["quality"].values)
    assert remote["pixels"].values.any()
