"""The output-format seam: a format of another package (a NumPy ``.npz`` writer, declared
under the ``xclay.exporters`` entry-point group) is offered by ``xclay export``, written by
a run's export step, and listed in the run's STAC description; wrong options and formats
are clear errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import xclay
from tests.helpers import random_cube
from tests.packages import EXTRAS, EXTRAS_ENTRY_POINTS, installed
from xclay.cli import main
from xclay.errors import ConfigError
from xclay.outputs import formats
from xclay.protocols import Exporter
from xclay.run import RunSpec, export_step, run


@pytest.fixture
def npz_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Exporter]:
    """The npz format of a package installed for the test (tests/packages.py)."""
    with installed(tmp_path / "site", "xclay_extras", EXTRAS, EXTRAS_ENTRY_POINTS, monkeypatch):
        yield formats.get_exporter("npz")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> RunSpec:
    folder = tmp_path_factory.mktemp("run")
    cube = random_cube((1, 3, 64, 48), crs="EPSG:32720", origin=(300000.0, 9600000.0), seed=5)
    store = xclay.write_datacube(cube, folder / "cube.zarr", chip_size=16)
    spec = RunSpec.from_dict(
        {
            "input": {"datacube": str(store)},
            "grid": {"chip_size": 16},
            "model": {"name": "rcf", "options": {"num_filters": 8, "sample_chips": 4}},
            "outputs": {"dir": str(folder / "out")},
        }
    )
    assert run(spec, progress=False).status == "complete"
    return spec


def test_the_built_in_formats_keep_the_protocol() -> None:
    assert formats.export_formats()[0] == formats.DEFAULT_FORMAT == "geoparquet"
    for name in formats.export_formats():
        exporter = formats.get_exporter(name)
        assert isinstance(exporter, Exporter) and exporter.name == name
        assert exporter.suffix.startswith(".") and exporter.media_type


def test_a_new_format_is_offered_and_written_by_the_cli(
    npz_format: Exporter, finished_run: RunSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    store = finished_run.outdir.path / "embeddings.zarr"
    out = finished_run.outdir.path.parent / "vectors.npz"
    assert (
        main(["export", str(store), "--format", "npz", "--decimals", "2", "--out", str(out)]) == 0
    )
    assert f"npz         {out}" in capsys.readouterr().out
    emb = xclay.open_embeddings(store)
    with np.load(out) as saved:
        expected = emb["embedding"].values[emb["embedded"].values].round(2)
        np.testing.assert_array_equal(saved["vectors"], expected)


def test_a_run_exports_a_new_format_and_describes_it(
    npz_format: Exporter, finished_run: RunSpec
) -> None:
    written = export_step(finished_run, "npz", overwrite=True)
    assert written == [finished_run.outdir.path / "embeddings.npz"]
    assert (finished_run.outdir.path / "embeddings.npz").is_file()
    items = list((finished_run.outdir.path / "stac" / "items").glob("*.json"))
    assets = [asset for item in items for asset in _assets(item).items()]
    npz = [fields for key, fields in assets if key == "npz"]
    assert npz and npz[0]["type"] == "application/x-npz"
    assert npz[0]["href"].endswith("embeddings.npz")


def test_options_and_formats_are_checked(npz_format: Exporter, finished_run: RunSpec) -> None:
    with pytest.raises(ConfigError, match=r"--decimals applies to --format npz, not cog"):
        formats.check_options(formats.get_exporter("cog"), {"decimals": 3})
    with pytest.raises(ConfigError, match="unknown output format 'netcdf'; available: cog, geo"):
        formats.get_exporter("netcdf")
    with pytest.raises(ConfigError, match="registered already"):
        formats.register_exporter(type(npz_format)())
    with pytest.raises(ConfigError, match="is not an Exporter"):
        formats.register_exporter(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="follow its spec"):
        export_step(finished_run, "geoparquet", quantize="int8")


def _assets(item: Path) -> dict[str, Any]:
    import json

    assets: dict[str, Any] = json.loads(item.read_text())["assets"]
    return assets
