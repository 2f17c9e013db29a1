"""Read engines by name: the built-in ones picked as before, and one of another package
(declared under the ``xclay.sources`` entry-point group) taken by ``embed(engine=...)``,
the CLI and a run spec, in this process and on the workers of a Dask ``LocalCluster``,
whose run then exports in the same package's output format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import xclay
from tests.packages import EXTRAS, EXTRAS_ENTRY_POINTS, installed
from xclay.batch.engines import SOURCES, engine_names, resolve_engine
from xclay.errors import ConfigError, DeviceError, MissingDependencyError
from xclay.run.cluster import NO_DASHBOARD
from xclay.testing import synthetic_cube

CPU = torch.device("cpu")


@pytest.fixture
def extras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with installed(tmp_path / "site", "xclay_extras", EXTRAS, EXTRAS_ENTRY_POINTS, monkeypatch):
        import xclay_extras  # type: ignore[import-not-found]

        yield xclay_extras


def _store(tmp_path: Path) -> Path:
    cube = synthetic_cube((1, 4, 96, 96), seed=8)
    return xclay.write_datacube(cube, tmp_path / "cube.zarr", chip_size=16)


def _rcf() -> Any:
    return xclay.models.get_model("rcf", num_filters=8, sample_chips=4)


def test_the_built_in_engines_and_their_refusals() -> None:
    assert {"zarr", "kvikio"} <= set(SOURCES.names()) and engine_names()[0] == "auto"
    assert resolve_engine("auto", CPU) == "zarr" and resolve_engine("zarr", CPU) == "zarr"
    with pytest.raises(ConfigError, match="unknown read engine 'tiles'; available: kvikio, zarr"):
        resolve_engine("tiles", CPU)
    with pytest.raises((DeviceError, MissingDependencyError)):  # no kvikIO, or not a GPU
        resolve_engine("kvikio", CPU)


def test_an_installed_engine_reads_what_zarr_reads(extras: Any, tmp_path: Path) -> None:
    store = _store(tmp_path)
    model = _rcf()
    zarr = xclay.embed(xclay.open_datacube(store), model=model, chip_size=16, progress=False)
    windows = xclay.embed(
        xclay.open_datacube(store), model=model, chip_size=16, engine="windows", progress=False
    )
    assert extras.WindowsEngine.opened == 1
    assert windows.attrs["data_path"]["engine"] == "windows"
    assert zarr.attrs["data_path"]["engine"] == "zarr"
    np.testing.assert_array_equal(windows["embedding"].values, zarr["embedding"].values)


def test_the_cli_offers_an_installed_engine(extras: Any, tmp_path: Path) -> None:
    from xclay.cli import main

    store = _store(tmp_path)
    out = tmp_path / "out"
    assert (
        main(
            [
                "embed",
                str(store),
                "--out",
                str(out),
                "--chip-size",
                "16",
                "--engine",
                "windows",
                "--no-progress",
            ]
        )
        == 0
    )
    emb = xclay.open_embeddings(out / "embeddings.zarr")
    assert emb.attrs["data_path"]["engine"] == "windows"


@pytest.mark.slow
def test_a_cluster_run_reads_with_an_installed_engine_and_exports_an_installed_format(
    extras: Any, tmp_path: Path
) -> None:
    pytest.importorskip("distributed", reason="needs xclay[dask]")
    from distributed import Client, LocalCluster

    from xclay.run import RunSpec, export_step, run

    store = _store(tmp_path)

    def spec(engine: str, out: str) -> RunSpec:
        return RunSpec.from_dict(
            {
                "input": {"datacube": str(store)},
                "grid": {"chip_size": 16},
                "model": {"name": "rcf", "options": {"num_filters": 8, "sample_chips": 4}},
                "compute": {"region_chips": 3, "engine": engine},
                "outputs": {"dir": str(tmp_path / out)},
            }
        )

    assert run(spec("zarr", "local"), progress=False).status == "complete"
    remote = spec("windows", "cluster")
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **NO_DASHBOARD) as cluster,
        Client(cluster) as client,
    ):
        # the workers are other processes: they find the engine themselves, and use it
        found = client.run(
            lambda: "windows" in __import__("xclay.batch.engines").batch.engines.SOURCES
        )
        assert all(found.values()) and len(found) == 2
        report = run(remote, client=client, progress=False)
        opened = client.run(lambda: __import__("xclay_extras").WindowsEngine.opened)
    assert report.status == "complete", report.failed
    assert all(opened.values())  # each worker read its regions with it (a source per cube)
    local = xclay.open_embeddings(tmp_path / "local" / "embeddings.zarr")
    cluster = xclay.open_embeddings(tmp_path / "cluster" / "embeddings.zarr")
    np.testing.assert_array_equal(cluster["embedding"].values, local["embedding"].values)

    written = export_step(remote, "npz")
    assert written == [tmp_path / "cluster" / "embeddings.npz"]
    with np.load(written[0]) as saved:
        assert len(saved["vectors"]) == int(cluster["embedded"].sum())
    items = (tmp_path / "cluster" / "stac" / "items").glob("*.json")
    assets = [json.loads(item.read_text())["assets"] for item in items]
    assert any(a.get("npz", {}).get("type") == "application/x-npz" for a in assets)
