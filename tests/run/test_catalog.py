"""A run's outputs as STAC: a Collection, Items and the model, validated with pystac
against the STAC, projection, ML Model (mlm v1.5.2) and embeddings (emb v0.0.1) JSON
schemas, read from tests/stac_schemas (no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xclay
from tests.helpers import random_cube, stac_validator, validate_stac
from xclay.run import RunSpec, run

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
pytest.importorskip("jsonschema", reason="validation needs jsonschema")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run over a two-step datacube, with COGs exported afterwards."""
    folder = tmp_path_factory.mktemp("run")
    cube = random_cube((2, 3, 96, 80), crs="EPSG:32720", origin=(300000.0, 9600000.0), seed=3)
    cube["pixels"].values[:, :, :16, :16] = 0
    cube = cube.assign_coords(
        time_start=("time", cube["time"].values - np.timedelta64(10, "D")),
        time_end=("time", cube["time"].values + np.timedelta64(10, "D")),
    )
    store = xclay.write_datacube(cube, folder / "cube.zarr", chip_size=16)
    spec = RunSpec.from_dict(
        {
            "name": "olinda test",
            "input": {"datacube": str(store)},
            "grid": {"chip_size": 16},
            "model": {"name": "rcf", "options": {"num_filters": 8, "sample_chips": 4}},
            "compute": {"region_chips": 4},
            "outputs": {"dir": str(folder / "out"), "quantize": "int8"},
        }
    )
    report = run(spec, progress=False)
    assert report.status == "complete" and "stac" in report.outputs
    exported = subprocess.run(
        [sys.executable, "-m", "xclay.cli", "export", str(folder / "out" / "embeddings.zarr"),
         "--format", "cog", "--pca", "3", "--dtype", "int8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    assert "stac" in exported.stdout  # the catalog was rewritten with the COGs
    return folder / "out"


def test_the_catalog_validates_against_every_schema_it_names(finished_run: Path) -> None:
    validator = stac_validator()
    folder = finished_run / "stac"
    collection = validate_stac(folder / "collection.json", validator)
    assert {
        "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json",
        "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    } <= set(collection)
    items = sorted((folder / "items").glob("*.json"))
    assert len(items) == 2  # one zone, two time steps
    for item in items:
        assert "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json" in validate_stac(
            item, validator
        )
    model = validate_stac(folder / "model.json", validator)
    assert "https://stac-extensions.github.io/mlm/v1.5.2/schema.json" in model


def test_a_broken_catalog_fails_validation(finished_run: Path, tmp_path: Path) -> None:
    """The validation can fail: without emb:dimensions, or a model without inputs."""
    validator = stac_validator()
    collection = json.loads((finished_run / "stac" / "collection.json").read_text())
    del collection["emb:dimensions"]
    with pytest.raises(pystac.errors.STACValidationError):
        pystac.validation.validate_dict(collection, validator=validator)
    model = json.loads((finished_run / "stac" / "model.json").read_text())
    del model["properties"]["mlm:input"]
    with pytest.raises(pystac.errors.STACValidationError):
        pystac.validation.validate_dict(model, validator=validator)


def test_the_catalog_describes_the_outputs(finished_run: Path) -> None:
    folder = finished_run / "stac"
    collection = pystac.Collection.from_file(str(folder / "collection.json"))
    emb = xclay.open_embeddings(finished_run / "embeddings.zarr")
    fields = collection.extra_fields
    assert fields["emb:type"] == "chip"
    assert fields["emb:dimensions"] == emb.sizes["feature"]
    assert fields["data_type"] == "int8"  # the run stores int8 vectors
    assert fields["emb:chip_layout"] == {
        "layout_type": "regular_grid",
        "chip_size": [16, 16],
        "stride": [16, 16],
    }
    assert collection.id == "olinda-test"
    rels = {link.rel: link for link in collection.links}
    model = pystac.Item.from_file(str((folder / rels["emb:model"].href).resolve()))
    assert model.properties["mlm:name"] == "rcf"
    assert model.properties["mlm:output"][0]["result"]["shape"] == [-1, emb.sizes["feature"]]
    assert (folder / rels["emb:source-data"].href).resolve() == (
        finished_run.parent / "cube.zarr"
    ).resolve()
    model_href = (folder / model.assets["model"].href).resolve()
    assert model_href.name == "_xclay_run.json" and model_href.is_file()

    items = sorted(collection.get_items(), key=lambda i: i.datetime)
    assert [i.datetime.date().isoformat() for i in items] == [
        str(np.datetime64(t, "D")) for t in emb["time"].values
    ]
    for t, item in enumerate(items):
        props = item.properties
        assert props["proj:code"] == "EPSG:32720"
        assert props["proj:shape"] == [emb.sizes["chip_y"], emb.sizes["chip_x"]]
        assert props["proj:transform"] == [160.0, 0.0, 300000.0, 0.0, -160.0, 9600000.0]
        assert props["emb:quantization"]["quantized_dtype"] == "int8"
        assert props["xclay:chips_embedded"] == int(emb["embedded"].values[t].sum())
        start, end = emb["time_start"].values[t], emb["time_end"].values[t]
        assert props["start_datetime"].startswith(str(np.datetime64(start, "D")))
        assert props["end_datetime"].startswith(str(np.datetime64(end, "D")))
        # Assets: the Zarr, the GeoParquet dataset, this time step's COG; all exist.
        assert item.assets["embeddings"].media_type == "application/vnd+zarr"
        assert item.assets["geoparquet"].media_type == "application/vnd.apache.parquet"
        cog = item.assets["cog"]
        assert "cloud-optimized" in cog.media_type and "principal components" in cog.title
        for asset in item.assets.values():
            assert (folder / "items" / asset.href).resolve().exists(), asset.href
        # The footprint holds every chip centre of the item's grid.
        import shapely

        footprint = shapely.geometry.shape(item.geometry)
        centres = shapely.points(emb["lon"].values.ravel(), emb["lat"].values.ravel())
        assert shapely.contains(footprint, centres).all()
        assert item.bbox == pytest.approx(list(footprint.bounds))
