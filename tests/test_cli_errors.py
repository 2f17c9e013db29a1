"""Every command of the CLI against a corpus of bad inputs: one line on stderr, naming the
problem, and a non-zero exit; never a traceback (docs/cli.md: "a traceback only with -v").

A new bad input that ends in a traceback, or in the CLI's catch-all ("unexpected ..."),
fails here: each case must get a worded message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")

import yaml
from affine import Affine

from tests.helpers import OLINDA_BANDS, OLINDA_TIF, OLINDA_WAVELENGTHS

# (command line with {corpus} for the corpus folder, a phrase the one line must contain)
CASES: dict[str, tuple[list[str], str]] = {
    "demo size 0": (["demo", "--size", "0"], "--size: must be at least 16, got 0"),
    "demo size not a number": (["demo", "--size", "big"], "expected a whole number"),
    "demo over a finished run": (
        ["demo", "--out", "{corpus}/run", "--size", "64"],
        "holds outputs the demo did not write (_xclay",
    ),
    "demo out is a file": (["demo", "--out", "{corpus}/scene.tif"], "is a file, not a folder"),
    "demo unknown model": (
        ["demo", "--out", "{corpus}/d2", "--size", "64", "--model", "nope"],
        "nope",
    ),
    "demo missing checkpoint": (
        [
            "demo",
            "--out",
            "{corpus}/d3",
            "--size",
            "64",
            "--model",
            "clay-v1.5",
            "--checkpoint",
            "{corpus}/none.ckpt",
        ],
        "none.ckpt",
    ),
    "unknown command": (["bogus"], "invalid choice: 'bogus'"),
    "run missing spec": (["run", "{corpus}/none.yaml"], "no such run spec file"),
    "run spec not yaml": (["run", "{corpus}/bad.yaml"], "not valid YAML"),
    "run spec a yaml list": (["run", "{corpus}/list.yaml"], "list.yaml"),
    "run items a json array of numbers": (
        ["run", "{corpus}/numbers.yaml", "--dry-run"],
        "entry 0 of",
    ),
    "run items an empty array": (
        ["run", "{corpus}/emptylist.yaml", "--dry-run"],
        "holds no STAC items",
    ),
    "run items an empty collection": (
        ["run", "{corpus}/emptyfc.yaml", "--dry-run"],
        "holds no STAC items",
    ),
    "run items a json object": (
        ["run", "{corpus}/object.yaml", "--dry-run"],
        "not a STAC item collection",
    ),
    "run items a parquet file": (["run", "{corpus}/parquet.yaml", "--dry-run"], "items.parquet"),
    "run items not json": (["run", "{corpus}/text.yaml", "--dry-run"], "not readable JSON"),
    "run items without a crs": (
        ["run", "{corpus}/nocrs.yaml", "--dry-run"],
        "does not say where its pixels are",
    ),
    "run asset missing": (["run", "{corpus}/gone.yaml", "--dry-run"], "does not exist"),
    "run bbox swapped": (["run", "{corpus}/swapped.yaml", "--dry-run"], "longitude first"),
    "run outputs under a file": (
        ["run", "{corpus}/underfile.yaml", "--dry-run"],
        "Not a directory",
    ),
    "ingest missing spec": (["ingest", "{corpus}/none.yaml"], "no such run spec file"),
    "embed missing cube": (
        ["embed", "{corpus}/none.zarr", "--out", "{corpus}/e1"],
        "no datacube at",
    ),
    "embed without --out": (["embed", "{corpus}/run/embeddings.zarr"], "--out is required"),
    "embed a file": (["embed", "{corpus}/scene.tif", "--out", "{corpus}/e2"], "scene.tif"),
    "embed embeddings as a cube": (
        ["embed", "{corpus}/run/embeddings.zarr", "--out", "{corpus}/e3"],
        "embeddings.zarr",
    ),
    "embed a damaged cube": (
        ["embed", "{corpus}/damaged.zarr", "--out", "{corpus}/e4", "--chip-size", "32"],
        "damaged",
    ),
    "embed chip size larger than the cube": (
        ["embed", "{corpus}/demo/cube.zarr", "--out", "{corpus}/e5", "--chip-size", "4096"],
        "4096",
    ),
    "embed batch size 0": (
        ["embed", "{corpus}/demo/cube.zarr", "--out", "{corpus}/e6", "--batch-size", "0"],
        "--batch-size",
    ),
    "export missing store": (["export", "{corpus}/none.zarr"], "none.zarr"),
    "export a datacube": (
        ["export", "{corpus}/demo/cube.zarr", "--out", "{corpus}/x.parquet"],
        "cube.zarr",
    ),
    "export a tif": (["export", "{corpus}/scene.tif", "--out", "{corpus}/y.parquet"], "scene.tif"),
    "export onto an existing file": (
        ["export", "{corpus}/demo/embeddings.zarr", "--out", "{corpus}/scene.tif"],
        "already exists",
    ),
    "fit missing labels": (
        ["fit", "{corpus}/none.parquet", "--embeddings", "{corpus}/run/embeddings.zarr"],
        "no label file at",
    ),
    "fit labels of an unknown kind": (
        ["fit", "{corpus}/bad.yaml", "--embeddings", "{corpus}/run/embeddings.zarr"],
        "not a label file xclay reads",
    ),
    "fit a many-band raster as labels": (
        ["fit", "{corpus}/scene.tif", "--embeddings", "{corpus}/run/embeddings.zarr"],
        "must have one band",
    ),
    "fit without --column": (
        ["fit", "{corpus}/labels.geojson", "--embeddings", "{corpus}/run/embeddings.zarr"],
        "need the column",
    ),
    "fit unknown column": (
        [
            "fit",
            "{corpus}/labels.geojson",
            "--embeddings",
            "{corpus}/run/embeddings.zarr",
            "--column",
            "nope",
        ],
        "no column 'nope'",
    ),
    "fit too few labels": (
        [
            "fit",
            "{corpus}/labels.geojson",
            "--embeddings",
            "{corpus}/run/embeddings.zarr",
            "--column",
            "landcover",
        ],
        "needs at least 10",
    ),
    "fit labels elsewhere": (
        [
            "fit",
            "{corpus}/far.geojson",
            "--embeddings",
            "{corpus}/run/embeddings.zarr",
            "--column",
            "landcover",
        ],
        "no label falls on a chip",
    ),
    "fit missing embeddings": (
        ["fit", "{corpus}/labels.geojson", "--embeddings", "{corpus}/none.zarr"],
        "no embeddings Zarr at",
    ),
    "fit a datacube as embeddings": (
        ["fit", "{corpus}/labels.geojson", "--embeddings", "{corpus}/demo/cube.zarr"],
        "is a datacube",
    ),
    "fit one fold": (
        ["fit", "{corpus}/labels.geojson", "--embeddings", "{corpus}/e.zarr", "--folds", "1"],
        "--folds: must be at least 2",
    ),
    "fit min cover over 1": (
        ["fit", "{corpus}/labels.geojson", "--embeddings", "e.zarr", "--min-cover", "2"],
        "must be within (0, 1]",
    ),
    "predict missing model": (
        ["predict", "{corpus}/none.json", "{corpus}/run/embeddings.zarr"],
        "no model file at",
    ),
    "predict a model file that is not json": (
        ["predict", "{corpus}/text.json", "{corpus}/run/embeddings.zarr"],
        "is not a model file (not JSON",
    ),
    "predict stac items as a model": (
        ["predict", "{corpus}/items.json", "{corpus}/run/embeddings.zarr"],
        "not an xclay model file",
    ),
    "predict a model without its weights": (
        ["predict", "{corpus}/noweights.json", "{corpus}/run/embeddings.zarr"],
        "are missing",
    ),
    "predict another encoder's embeddings": (
        ["predict", "{corpus}/model.json", "{corpus}/run/embeddings.zarr"],
        "fitted on embeddings of 'clay-v1.5'",
    ),
    "predict missing embeddings": (
        ["predict", "{corpus}/model.json", "{corpus}/none.zarr"],
        "no embeddings Zarr at",
    ),
    "predict block of 0 MB": (
        ["predict", "{corpus}/model.json", "{corpus}/run/embeddings.zarr", "--block-mb", "0"],
        "--block-mb: must be at least 1",
    ),
    "predict onto an existing file": (
        [
            "predict",
            "{corpus}/rcf-model.json",
            "{corpus}/run/embeddings.zarr",
            "--out",
            "{corpus}/scene.tif",
        ],
        "already exists",
    ),
}


def _xclay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xclay.cli", *args], capture_output=True, text=True, timeout=300
    )


def _spec(folder: Path, name: str, items: str, **input_: object) -> None:
    spec = {
        "input": {"stac": {"items": items}, "bands": OLINDA_BANDS[:4], **input_},
        "grid": {"resolution": 28.5, "chip_size": 32, "edges": "pad"},
        "model": {"name": "rcf", "options": {"num_filters": 8, "sample_chips": 4}},
        "outputs": {"dir": f"out-{name}"},
    }
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(spec))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad inputs (and a few good ones to misuse)."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from xclay.ingest import stac_item

    if not OLINDA_TIF.is_file():
        pytest.skip(f"real test data not found at {OLINDA_TIF}")
    c = tmp_path_factory.mktemp("corpus")
    shutil.copy(OLINDA_TIF, c / "scene.tif")
    demo = _xclay("demo", "--out", str(c / "demo"), "--size", "64", "--chip-size", "32")
    assert demo.returncode == 0, demo.stderr
    run = _xclay(
        "embed",
        str(c / "demo" / "cube.zarr"),
        "--out",
        str(c / "run"),
        "--chip-size",
        "32",
        "--no-progress",
    )
    assert run.returncode == 0, run.stderr
    # a damaged datacube: its only pixel chunk (shard) deleted
    shutil.copytree(c / "demo" / "cube.zarr", c / "damaged.zarr")
    for chunk in (c / "damaged.zarr" / "pixels" / "c").rglob("*"):
        if chunk.is_file():
            chunk.unlink()

    (c / "bad.yaml").write_text("input: [unclosed\n")
    (c / "list.yaml").write_text("- input\n- grid\n")
    item = stac_item(c / "scene.tif", bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    pystac.ItemCollection([item]).save_object(dest_href=str(c / "items.json"))
    files = {
        "numbers": "[1, 2]",
        "emptylist": "[]",
        "emptyfc": json.dumps({"type": "FeatureCollection", "features": []}),
        "object": json.dumps({"type": "Thing"}),
        "text": "not json at all",
    }
    for name, text in files.items():
        (c / f"{name}.json").write_text(text)
        _spec(c, name, f"{name}.json")
    pq.write_table(pa.table({"id": ["a"]}), c / "items.parquet")
    _spec(c, "parquet", "items.parquet")
    # an image without a CRS, described by rio-stac directly (xclay's stac_item refuses it)
    with rasterio.open(
        c / "nocrs.tif",
        "w",
        driver="GTiff",
        width=32,
        height=32,
        count=4,
        dtype="uint8",
        transform=Affine(30, 0, 500000, 0, -30, 9000000),
    ) as dst:
        dst.write(np.ones((4, 32, 32), np.uint8))
    from rio_stac import create_stac_item

    with pytest.warns(UserWarning):  # rio-stac: no CRS, a whole-world bbox
        bare = create_stac_item(
            str(c / "nocrs.tif"),
            id="nocrs",
            asset_name="data",
            with_proj=True,
            with_eo=True,
            input_datetime=__import__("datetime").datetime(2020, 1, 1),
        )
    for k, entry in enumerate(bare.assets["data"].extra_fields["eo:bands"]):
        entry["name"] = OLINDA_BANDS[k]
    pystac.ItemCollection([bare]).save_object(dest_href=str(c / "nocrs.json"))
    _spec(c, "nocrs", "nocrs.json")
    gone = item.clone()
    gone.assets["data"].href = str(c / "gone.tif")
    pystac.ItemCollection([gone]).save_object(dest_href=str(c / "gone.json"))
    _spec(c, "gone", "gone.json")
    _spec(c, "swapped", "items.json", bbox=[-8.05, -34.92, -7.98, -34.82])
    _spec(c, "underfile", "items.json")
    spec = yaml.safe_load((c / "underfile.yaml").read_text())
    spec["outputs"]["dir"] = "scene.tif/out"
    (c / "underfile.yaml").write_text(yaml.safe_dump(spec))
    _map_inputs(c)
    return c


def _map_inputs(c: Path) -> None:
    """Labels (GeoJSON: a point at each chip of the run's embeddings, and one far away)
    and model files for fit and predict: one of another encoder's embeddings, one without
    its weights, and one of these embeddings."""
    import xclay
    from xclay.apply import MapModel
    from xclay.apply.model import embeddings_fingerprint

    emb = xclay.open_embeddings(c / "run" / "embeddings.zarr")
    lon, lat = emb["lon"].values.ravel(), emb["lat"].values.ravel()

    def points(coords: list[tuple[float, float]]) -> str:
        features = [
            {
                "type": "Feature",
                "properties": {"landcover": ["forest", "water"][k % 2]},
                "geometry": {"type": "Point", "coordinates": [x, y]},
            }
            for k, (x, y) in enumerate(coords)
        ]
        return json.dumps({"type": "FeatureCollection", "features": features})

    (c / "labels.geojson").write_text(points(list(zip(lon, lat, strict=True))))
    (c / "far.geojson").write_text(points([(10.0, 50.0)]))
    weights = {"mean": np.zeros(4, np.float32), "std": np.ones(4, np.float32)}
    weights |= {"weight": np.zeros((4, 2), np.float32), "bias": np.zeros(2, np.float32)}
    clay = {"model": {"name": "clay-v1.5", "dim": 1024}, "fingerprint": "0" * 64}
    MapModel("logistic", "classification", ("a", "b"), {}, weights, embeddings=clay).save(
        c / "model.json"
    )
    MapModel("logistic", "classification", ("a", "b"), {}, weights, embeddings=clay).save(
        c / "noweights.json"
    )
    (c / "noweights.safetensors").unlink()
    dim = emb.sizes["feature"]
    weights = {"mean": np.zeros(dim, np.float32), "std": np.ones(dim, np.float32)}
    weights |= {"weight": np.zeros((dim, 2), np.float32), "bias": np.zeros(2, np.float32)}
    ours = {"fingerprint": embeddings_fingerprint(emb.attrs["model"])}
    MapModel("logistic", "classification", ("a", "b"), {}, weights, embeddings=ours).save(
        c / "rcf-model.json"
    )


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_one_line_and_a_nonzero_exit(corpus: Path, case: str) -> None:
    argv, phrase = CASES[case]
    result = _xclay(*(a.replace("{corpus}", str(corpus)) for a in argv))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, (case, result.stdout, result.stderr)
    assert len(lines) == 1, (case, result.stderr)
    commands = ("demo", "run", "ingest", "embed", "export", "fit", "predict")
    command = argv[0] if argv[0] in commands else ""
    assert lines[0].startswith(f"xclay {command}".strip() + ": error: "), lines[0]
    assert "unexpected" not in lines[0], lines[0]  # the catch-all: a case xclay must word
    assert phrase in lines[0], (phrase, lines[0])


def test_the_catch_all_keeps_a_bug_to_one_line_and_shows_the_traceback_with_v(
    tmp_path: Path,
) -> None:
    """An error xclay does not word (here: a datacube whose zarr.json is a JSON list)
    still ends in one line, naming the exception; -v shows where it came from."""
    store = tmp_path / "odd.zarr"
    store.mkdir()
    (store / "zarr.json").write_text("[]")
    quiet = _xclay("export", str(store), "--out", str(tmp_path / "o.parquet"))
    loud = _xclay("-v", "export", str(store), "--out", str(tmp_path / "o.parquet"))
    assert quiet.returncode == loud.returncode == 1
    assert len(quiet.stderr.strip().splitlines()) == 1, quiet.stderr
    assert "Traceback" in loud.stderr and "Traceback" not in quiet.stderr
