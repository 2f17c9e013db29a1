"""Run specs and `xclay run`: STAC items -> datacube -> embeddings -> GeoParquet."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import pytest

if TYPE_CHECKING:
    from pystac import Item

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")

import yaml

import xclay
from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS
from xclay.ingest import stac_item
from xclay.outputs.export import read_footer
from xclay.run import SpecError, load_spec


def _xclay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xclay.cli", *args], capture_output=True, text=True, timeout=300
    )


def _spec(folder: Path, items: str, **changes: object) -> Path:
    spec: dict[str, Any] = {
        "name": "olinda",
        "input": {"stac": {"items": items}, "bands": OLINDA_BANDS, "composite": "median"},
        "grid": {"resolution": 28.5, "chip_size": 32, "edges": "pad"},
        "model": {"name": "rcf", "options": {"num_filters": 16, "sample_chips": 8}},
        "quality": {"max_nodata": 0.9},
        "outputs": {"dir": "out"},
    }
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            spec[section][name] = value
        else:
            spec[section] = value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _save(items: list[Item], path: Path) -> str:
    pystac.ItemCollection(items).save_object(dest_href=str(path))
    return path.name


@pytest.fixture(scope="module")
def olinda_per_band(olinda_tif: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bands")
    with rasterio.open(olinda_tif) as src:
        profile = {**src.profile, "count": 1}
        files = {}
        for k, band in enumerate(OLINDA_BANDS):
            files[band] = folder / f"olinda_{band}.tif"
            with rasterio.open(files[band], "w", **profile) as dst:
                dst.write(src.read(k + 1), 1)
    return files


def test_olinda_run_same_embeddings_from_one_or_many_assets(
    tmp_path: Path, olinda_tif: Path, olinda_per_band: dict[str, Path]
) -> None:
    import geopandas as gpd

    runs = {}
    for kind, item in {
        "multiband": stac_item(
            olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS, id="olinda"
        ),
        "per_band": stac_item(
            olinda_per_band,
            wavelengths=dict(zip(OLINDA_BANDS, OLINDA_WAVELENGTHS, strict=True)),
            id="olinda",
        ),
    }.items():
        folder = tmp_path / kind
        folder.mkdir()
        spec = _spec(folder, _save([item], folder / "items.json"))
        result = _xclay("run", str(spec), "--no-progress")
        assert result.returncode == 0, result.stderr
        assert "chips" in result.stdout and "geoparquet" in result.stdout
        runs[kind] = folder / "out"
    a = xclay.open_embeddings(runs["multiband"] / "embeddings.zarr")
    b = xclay.open_embeddings(runs["per_band"] / "embeddings.zarr")
    np.testing.assert_array_equal(a["embedding"].values, b["embedding"].values)
    assert a.sizes["chip_y"] == 11 and a.sizes["chip_x"] == 11
    import duckdb

    folder = runs["per_band"] / "embeddings.parquet"
    gdf = gpd.read_parquet(folder)
    assert len(gdf) == 121 and gdf["id"].is_unique and gdf.crs.to_epsg() == 4326
    assert pq.read_table(folder).num_rows == 121  # the folder of parts is one table
    rows = (
        duckdb.connect()
        .execute(f"SELECT count(*), count(DISTINCT chip_id) FROM '{folder}/*.parquet'")
        .fetchone()
    )
    assert rows == (121, 121)
    assert (
        gdf["centre_lat"].between(-8.2, -7.8).all()
        and gdf["centre_lon"].between(-35.05, -34.75).all()
    )
    # The spec and the resolved plan travel with the outputs.
    parts = sorted((runs["per_band"] / "embeddings.parquet").glob("part-*.parquet"))
    assert parts and (runs["per_band"] / "embeddings.parquet" / "_xclay_complete.json").is_file()
    meta = read_footer(parts[0])  # the part's footer and the run's metadata
    assert meta["run_spec"]["name"] == "olinda" and meta["run_spec"]["grid"]["chip_size"] == 32
    assert meta["run_plan"]["items"] == 1 and meta["run_plan"]["crs"] == "EPSG:31985"
    assert meta["model"]["name"] == "rcf" and meta["part"]["zone"] == "EPSG31985"
    # ... stored once per run, not in every part: a part's own footer is small.
    own = pq.read_metadata(parts[0]).metadata
    assert len(own[b"xclay"]) < 2048 and b"filters" not in own[b"xclay"]
    assert all(ids.as_py() == ["olinda"] for ids in pq.read_table(folder)["source_ids"])
    assert a.attrs["run_spec"]["input"]["bands"] == OLINDA_BANDS
    cube = xclay.open_datacube(runs["multiband"] / "cube.zarr")
    assert cube.attrs["run_spec"]["input"]["composite"] == "median"
    items = cube.attrs["provenance"]["items"]  # the run's items: a sidecar, by hash
    sidecar = runs["multiband"] / "cube.zarr" / items["file"]
    assert items["count"] == 1 and sidecar.resolve() == (runs["multiband"] / "items.parquet")
    assert pq.read_table(sidecar)["id"].to_pylist() == ["olinda"]


def test_run_stores_loss_thumbnails_and_int8_vectors(tmp_path: Path, olinda_tif: Path) -> None:
    import torch

    from xclay.models.clay_decoder import ClayDecoder, DecoderSize
    from xclay.models.clay_encoder import ClayEncoder

    torch.manual_seed(0)
    encoder = ClayEncoder.from_size("tiny")
    decoder = ClayDecoder(encoder.dim, DecoderSize(dim=64, depth=1, heads=4, dim_head=16))
    state = {f"model.encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"model.decoder.{k}": v for k, v in decoder.state_dict().items()})
    torch.save({"state_dict": state, "hyper_parameters": {}}, tmp_path / "clay.ckpt")
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    spec = _spec(
        tmp_path,
        _save([item], tmp_path / "items.json"),
        model={"name": "clay-v1.5", "checkpoint": "clay.ckpt"},
        outputs={"dir": "out", "quantize": "int8", "thumbnails": 16, "loss": True},
        compute={"region_chips": 4, "precision": "fp32"},
    )
    result = _xclay("run", str(spec), "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    raw = xclay.open_embeddings(out / "embeddings.zarr", dequantize=False)
    assert raw["embedding"].dtype == np.int8 and "embedding_scale" in raw
    emb = xclay.open_embeddings(out / "embeddings.zarr")
    embedded = emb["embedded"].values
    assert embedded.sum() == 121
    assert np.isfinite(emb["embedding"].values[embedded]).all()
    assert np.isfinite(emb["loss"].values[embedded]).all()
    thumbs = emb["thumbnail"].values
    assert thumbs.shape == (1, 11, 11, 16, 16, 4) and (thumbs[embedded][..., 3] > 0).any()
    # The stretch was fitted once, by the driver, and every region used it.
    stretch = emb["thumbnail"].attrs["stretch_low"], emb["thumbnail"].attrs["stretch_high"]
    record = json.loads((out / "_xclay" / "run.json").read_text())
    assert list(stretch[0]) == record["embed_config"]["thumbnail_stretch"]["low"]
    assert record["card"]["params"]["loss"]["seed"] == 0
    table = xclay.read_geoparquet(out / "embeddings.parquet")
    assert table.num_rows == 121 and table["loss"].null_count == 0
    assert table.schema.field("embedding").type.value_type == "float"  # restored
    parts = pq.read_table(out / "embeddings.parquet")
    assert parts.schema.field("embedding").type.value_type == "int8"
    by_id = dict(zip(table["chip_id"].to_pylist(), table["loss"].to_pylist(), strict=True))
    ids = emb["chip_id"].values
    for i, j in [(0, 0), (5, 7), (10, 10)]:
        assert by_id[ids[i, j]] == pytest.approx(float(emb["loss"].values[0, i, j]))


def test_dry_run_plans_without_reading_or_writing(tmp_path: Path, olinda_tif: Path) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"))
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "352 x 349 px at 28.5 in EPSG:31985" in result.stdout
    assert "chips       121" in result.stdout
    assert "km2" in result.stdout and "MiB" in result.stdout
    assert not (tmp_path / "out").exists()
    # The volume is that of the items' own dtype (uint8 here: 1 byte a value), read once
    # from the item and written once into the datacube.
    from xclay.run import plan

    resolved = plan(load_spec(spec))
    assert resolved.dtype == "uint8"
    assert resolved.bytes_estimate == 2 * 352 * 349 * len(OLINDA_BANDS)


def test_steps_one_at_a_time(tmp_path: Path, olinda_tif: Path) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"))
    for step in ("ingest", "embed", "export"):
        result = (
            _xclay(step, str(spec), "--no-progress")
            if step != "export"
            else _xclay(step, str(spec))
        )
        assert result.returncode == 0, (step, result.stderr)
    out = tmp_path / "out"
    assert (out / "cube.zarr").is_dir() and (out / "embeddings.zarr").is_dir()
    assert list((out / "embeddings.parquet").glob("part-*.parquet"))
    again = _xclay("run", str(spec), "--no-progress")  # the same spec: resumes, nothing left to do
    assert again.returncode == 0 and "resumed" in again.stdout, again.stderr
    assert _xclay("run", str(spec), "--no-progress", "--overwrite").returncode == 0
    foreign = tmp_path / "foreign"
    (foreign / "out" / "cube.zarr").mkdir(parents=True)
    other = _spec(foreign, str(tmp_path / "items.json"))
    refused = _xclay("run", str(other), "--no-progress")
    assert refused.returncode == 1 and "not from a run of this spec" in refused.stderr


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"grid__resolution": -30}, "grid.resolution: must be positive, got -30"),
        ({"grid__edges": "wrap"}, "grid.edges: must be one of 'drop', 'pad', got 'wrap'"),
        (
            {"grid__chipsize": 32},
            "grid.chipsize: unknown setting (did you mean 'chip_size'?); allowed: chip_size, "
            "compression",
        ),
        (
            {"input__composite": "mean"},
            "input.composite: must be one of 'median', 'first-valid', 'none'",
        ),
        (
            {"input__bbox": [10, 5, 0, 6]},
            "input.bbox: must be [west, south, east, north] with west < east",
        ),
        ({"model": {"name": "clay-v9"}}, "model.name: must be one of 'clay-v1.5', 'rcf'"),
        ({"quality": {"max_cloud": 2}}, "quality.max_cloud: must be within [0, 1], got 2"),
        ({"quality": {"min_clear": -0.1}}, "quality.min_clear: must be within [0, 1]"),
        (
            {"quality": {"max_fog": 0.1}},
            "quality.max_fog: unknown setting (did you mean 'max_snow'?); allowed: max_cloud, "
            "max_cloud_shadow, max_haze",
        ),
        ({"outputs": {}}, "outputs.dir: required setting is missing"),
        (
            {"input": {"stac": {"items": "a.json", "api": "https://x"}, "bands": ["red"]}},
            "give exactly one of items",
        ),
        ({"compute": {"batch_size": "lots"}}, "compute.batch_size: must be an integer"),
        (
            {"input": {"stac": {"items": "a.json", "max_items": 5}, "bands": ["red"]}},
            "input.stac.max_items: applies to a STAC API search (api:), not to an items file",
        ),
    ],
)
def test_malformed_specs_name_the_file_the_field_and_what_is_allowed(
    tmp_path: Path, changes: dict, message: str
) -> None:
    path = _spec(tmp_path, "items.json", **changes)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert message in str(info.value)


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        load_spec(bad)
    result = _xclay("run", str(tmp_path / "none.yaml"))
    assert result.returncode == 1 and "no such run spec file" in result.stderr


def test_region_without_a_valid_pixel_writes_nothing(tmp_path: Path) -> None:
    from affine import Affine

    tif = tmp_path / "empty.tif"
    with rasterio.open(
        tif, "w", driver="GTiff", width=64, height=64, count=2, dtype="uint16", crs="EPSG:32633",
        transform=Affine(10, 0, 500000, 0, -10, 4000000), nodata=0,
    ) as dst:  # fmt: skip
        dst.write(np.zeros((2, 64, 64), dtype=np.uint16))
    item = stac_item(tif, bands=["red", "nir"], wavelengths=[0.66, 0.84])
    spec = _spec(
        tmp_path,
        _save([item], tmp_path / "items.json"),
        input__bands=["red", "nir"],
        grid__resolution=10,
    )
    result = _xclay("run", str(spec), "--no-progress")
    assert result.returncode == 1 and "no valid pixel" in result.stderr
    assert not (tmp_path / "out" / "cube.zarr").exists()
    assert not any(p.name.startswith(".cube.zarr") for p in (tmp_path / "out").iterdir())


def test_unreachable_asset_href_fails_its_region_and_nothing_looks_complete(
    tmp_path: Path, olinda_tif: Path
) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    item.assets["data"].href = "https://imagery.invalid/olinda.tif"
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"))
    result = _xclay("run", str(spec), "--no-progress")
    assert result.returncode == 3, result.stderr  # incomplete
    # The band reads run concurrently: the first error raised is GDAL's own ("Could not
    # resolve host: imagery.invalid") or, from a read after it, GDAL's cached "does not
    # exist" of the URL: either names the host.
    assert "INCOMPLETE" in result.stdout and "imagery.invalid" in result.stdout
    cube = tmp_path / "out" / "cube.zarr"
    assert not xclay.datacube.is_complete(cube)
    with pytest.raises(xclay.errors.DatacubeError, match="is incomplete"):
        xclay.open_datacube(cube)
    assert not (tmp_path / "out" / "embeddings.zarr").exists()


def test_band_the_items_do_not_have(tmp_path: Path, olinda_tif: Path) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"), input__bands=["red", "rededge1"])
    for args in (["--dry-run"], []):  # found from item metadata, before any pixel is read
        result = _xclay("run", str(spec), *args)
        assert (
            result.returncode == 1 and "bands ['rededge1'] are not in every item" in result.stderr
        )
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_empty_search_is_reported(tmp_path: Path, olinda_tif: Path) -> None:
    item = stac_item(
        olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS, datetime="2001-05-05"
    )
    spec = _spec(
        tmp_path, _save([item], tmp_path / "items.json"), input__datetime="2020-01-01/2020-12-31"
    )
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 1, result.stderr
    assert "no item of" in result.stderr and "is within input.datetime" in result.stderr
    assert "the items in the area were acquired 2001-05-05 to 2001-05-05" in result.stderr


@pytest.fixture
def stac_api(olinda_tif: Path) -> Iterator[str]:
    """A minimal STAC API on localhost (landing page, conformance, item search) serving Olinda."""
    import http.server
    import threading
    from urllib.parse import parse_qs, urlparse

    from xclay.ingest.items import parse_time_range

    item = stac_item(
        olinda_tif,
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
        datetime="2001-05-05",
        id="olinda",
    )
    item.collection_id = "landsat-olinda"
    feature = item.to_dict()
    assert item.datetime is not None
    when: datetime.datetime = item.datetime

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _search(self, params: dict) -> None:
            start, end = parse_time_range(params.get("datetime"))
            hit = (start is None or when >= start) and (end is None or when <= end)
            self._send(
                {"type": "FeatureCollection", "features": [feature] if hit else [], "links": []}
            )

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if url.path == "/search":
                self._search({k: v[0] for k, v in parse_qs(url.query).items()})
                return
            address = self.server.server_address
            assert isinstance(address, tuple)  # a TCP server's (host, port)
            base = f"http://127.0.0.1:{address[1]}"
            self._send(
                {
                    "type": "Catalog", "id": "test-api", "description": "test", "stac_version": "1.0.0",
                    "conformsTo": ["https://api.stacspec.org/v1.0.0/core", "https://api.stacspec.org/v1.0.0/item-search"],
                    "links": [
                        {"rel": "self", "href": base + "/"},
                        {"rel": "root", "href": base + "/"},
                        {"rel": "search", "href": base + "/search", "type": "application/geo+json", "method": "GET"},
                        {"rel": "search", "href": base + "/search", "type": "application/geo+json", "method": "POST"},
                    ],
                }
            )  # fmt: skip

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            self._search(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()
    thread.join()


def test_stac_api_search_end_to_end(tmp_path: Path, stac_api: str) -> None:
    from xclay.run import plan, run

    spec = load_spec(
        _spec(tmp_path, "unused", input__stac={"api": stac_api, "collections": ["landsat-olinda"]})
    )
    items = plan(spec).items
    assert items is not None
    assert len(items) == 1 and items.head == ["olinda"]
    report = run(spec, progress=False)
    assert report.run["chips_embedded"] == 121
    empty = load_spec(
        _spec(
            tmp_path,
            "unused",
            input__stac={"api": stac_api, "collections": ["landsat-olinda"]},
            input__datetime="2020-01-01/2020-12-31",
        )
    )
    with pytest.raises(xclay.ingest.IngestError, match=r"the STAC search at http.* is empty"):
        plan(empty)
    down = load_spec(
        _spec(tmp_path, "unused", input__stac={"api": "http://127.0.0.1:9/", "collections": ["x"]})
    )
    with pytest.raises(
        xclay.ingest.IngestError, match=r"STAC API search at http://127\.0\.0\.1:9/ failed"
    ):
        plan(down)


# --------------------------------------------------------------------------- a user's second day


def test_relative_asset_hrefs_are_relative_to_the_items_file(
    tmp_path: Path, olinda_tif: Path
) -> None:
    """The documented way to make items (stac_item on a relative path, then save_object)
    writes relative hrefs; they resolve against the items file, from any working folder."""
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(olinda_tif, data / "scene.tif")
    item = subprocess.run(
        [sys.executable, "-c", (
            "import pystac, xclay; from xclay.ingest import stac_item; "
            f"i = stac_item('scene.tif', bands={OLINDA_BANDS!r}, wavelengths={OLINDA_WAVELENGTHS!r}); "
            "pystac.ItemCollection([i]).save_object(dest_href='items.json')"
        )],
        cwd=data, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert item.returncode == 0, item.stderr
    hrefs = [a["href"] for f in json.loads((data / "items.json").read_text())["features"]
             for a in f["assets"].values()]  # fmt: skip
    assert hrefs == ["scene.tif"]  # relative, as users' files will be
    spec = _spec(tmp_path, "data/items.json")
    result = subprocess.run(
        [sys.executable, "-m", "xclay.cli", "run", str(spec), "--dry-run"],
        cwd=tmp_path.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "chips       121" in result.stdout
    # a JSON array of Items is an items file too, with the same resolution
    features = json.loads((data / "items.json").read_text())["features"]
    (data / "array.json").write_text(json.dumps(features))
    from xclay.ingest import load_items

    (loaded,) = load_items(data / "array.json")
    assert loaded.assets["data"].href == str(data / "scene.tif")


def test_a_dry_run_refuses_what_the_run_refuses(tmp_path: Path, olinda_tif: Path) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    items = _save([item], tmp_path / "items.json")
    spec = _spec(tmp_path, items, model={"name": "rcf", "options": {"num_filters": 8}})
    assert _xclay("run", str(spec), "--no-progress").returncode == 0
    again = _xclay("run", str(spec), "--dry-run")
    assert again.returncode == 0 and "resumes     the run of this spec" in again.stdout
    changed = _spec(tmp_path, items, grid__chip_size=64,
                    model={"name": "rcf", "options": {"num_filters": 8}})  # fmt: skip
    for args in (["--dry-run"], ["--no-progress"]):
        result = _xclay("run", str(changed), *args)
        assert result.returncode == 1, (args, result.stdout)
        assert "holds outputs of a different run (changed: grid)" in result.stderr, args
    # outputs under a regular file, and on a pseudo file system: the same words either way
    for where, words in ((str(olinda_tif) + "/out", "Not a directory"),
                         ("/proc/xclay-out", "pseudo file system")):  # fmt: skip
        spec = _spec(tmp_path, items, outputs={"dir": where})
        dry, real = _xclay("run", str(spec), "--dry-run"), _xclay("run", str(spec))
        assert dry.returncode == real.returncode == 1
        assert words in dry.stderr and dry.stderr == real.stderr


def test_bands_without_a_wavelength_are_found_by_the_plan(tmp_path: Path, olinda_tif: Path) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS)  # no wavelengths, no platform
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"))
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 1 and "have no known wavelength" in result.stderr
    assert "input.wavelengths" in result.stderr


def test_resumed_runs_report_what_this_process_did(tmp_path: Path, olinda_tif: Path) -> None:
    """Throughput counts this process's chips: a resume that redoes a few regions is not
    credited with the chips of the regions it kept."""
    from xclay.run import run
    from xclay.run.state import RunState

    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    spec = load_spec(_spec(tmp_path, _save([item], tmp_path / "items.json"),
                           compute={"region_chips": 4}))  # fmt: skip
    first = run(spec, progress=False)
    assert first.here["chips_embedded"] == first.run["chips_embedded"] == 121
    noop = run(spec, progress=False)
    assert noop.resumed and noop.here == {} and noop.run["chips_embedded"] == 121
    assert "nothing left to embed" in noop.describe() and "chips/s" not in noop.describe()
    # take back two regions: the resume redoes them only
    state = RunState(spec.outdir)
    markers = sorted((state.root.path / "done" / "embed").rglob("*.json"))
    redo = [json.loads(m.read_text()) for m in markers[:2]]
    for marker in markers[:2]:
        marker.unlink()
    from xclay.completion import COMPLETE_ATTR

    meta_path = spec.outdir.path / "embeddings.zarr" / "zarr.json"  # no longer complete
    meta = json.loads(meta_path.read_text())
    del meta["attributes"][COMPLETE_ATTR]
    meta_path.write_text(json.dumps(meta))
    resumed = run(spec, progress=False)
    assert resumed.resumed and resumed.run["chips_embedded"] == 121
    redone = sum(r["counts"]["chips_embedded"] for r in redo)
    assert resumed.here["chips_embedded"] == redone < 121
    assert f"({redone:,} chips embedded by this run)" in resumed.describe()


def test_a_batch_log_shows_the_plan_first_then_progress_then_the_report(
    tmp_path: Path, olinda_tif: Path
) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"), compute={"region_chips": 4})
    result = _xclay("run", str(spec), "--log-every", "0")  # no terminal: a log
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first = {key: next(k for k, line in enumerate(lines) if line.startswith(key))
             for key in ("  chips       121", "  ingest", "  embed", "  throughput")}  # fmt: skip
    assert first["  chips       121"] < first["  ingest"] < first["  embed"] < first["  throughput"]
    embed = [line for line in lines if line.startswith("  embed ")]
    assert embed[0] == "  embed       121 chips in 9 regions to do"  # 11 x 11 chips, 4 x 4 a region
    assert any("of 121 chips" in line and "regions" in line and "left" in line for line in embed)
    assert embed[-1].startswith("  embed       121 of 121 chips (100%), 9 of 9 regions")
    assert result.stderr == ""
    assert sum("note" in line for line in lines) <= 1  # each note once
    quiet = _xclay("run", str(spec), "--no-progress", "--overwrite")
    assert not any(line.startswith(("  embed ", "  ingest ")) for line in quiet.stdout.splitlines())


def test_a_mask_that_finds_no_classes_is_noted_once_in_the_plan(
    tmp_path: Path, olinda_tif: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mask: auto on Sentinel-2 items without an SCL asset: one note in the plan (it was a
    log line per region)."""
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS,
                     platform="sentinel-2-l2a")  # fmt: skip
    spec = _spec(tmp_path, _save([item], tmp_path / "items.json"))
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if "mask 'auto'" in line]
    assert len(notes) == 1 and "scl/SCL asset" in notes[0], result.stdout
    # what each region's load asks says nothing (it said it once a region, at INFO)
    from xclay.ingest.items import band_names
    from xclay.ingest.stac import quality_mask

    with caplog.at_level("DEBUG", logger="xclay"):
        assert quality_mask("auto", "sentinel-2-l2a", band_names([item])) is None
    assert not caplog.records
