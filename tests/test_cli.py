"""The command line, run as users run it: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import xarray as xr

import xclay


def _xclay(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xclay.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_demo_writes_every_output(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    run = _xclay("demo", "--out", str(out), "--size", "256", "--chip-size", "64", "--no-progress")
    assert run.returncode == 0, run.stderr
    for name in ("cube.zarr", "embeddings.zarr", "embeddings.parquet", "preview.png"):
        assert (out / name).exists(), name
        assert name in run.stdout
    assert "chips/s" in run.stdout
    cube = xclay.open_datacube(out / "cube.zarr")
    assert cube["pixels"].shape == (1, 10, 256, 256)
    emb = xclay.open_embeddings(out / "embeddings.zarr")
    table = pq.read_table(out / "embeddings.parquet")
    assert table.num_rows == int(emb["embedded"].sum()) > 0
    assert emb.sizes["feature"] == 1024  # rcf default: 512 filters
    from PIL import Image

    with Image.open(out / "preview.png") as img:
        assert img.width > 2 * img.height * 0.9  # two panels side by side
    # Running the demo again replaces its outputs.
    assert (
        _xclay(
            "demo", "--out", str(out), "--size", "256", "--chip-size", "64", "--no-progress"
        ).returncode
        == 0
    )


def test_embed_command_on_a_written_cube(tmp_path: Path, demo_cube_256: xr.Dataset) -> None:
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    run = _xclay(
        "embed", str(cube), "--out", str(tmp_path / "out"), "--chip-size", "128", "--no-progress"
    )
    assert run.returncode == 0, run.stderr
    emb = xclay.open_embeddings(tmp_path / "out" / "embeddings.zarr")
    assert emb.sizes["chip_y"] == 2 and np.isfinite(emb["embedding"].values).all()
    # The same command again resumes (here: nothing left to do) ...
    again = _xclay("embed", str(cube), "--out", str(tmp_path / "out"), "--chip-size", "128")
    assert again.returncode == 0 and "resumed" in again.stdout
    # ... another one into the same folder is refused, saying how to start over.
    other = _xclay("embed", str(cube), "--out", str(tmp_path / "out"), "--chip-size", "64")
    assert other.returncode == 1 and "different run" in other.stderr
    assert "--overwrite" in other.stderr and "Traceback" not in other.stderr
    assert xclay.read_geoparquet(tmp_path / "out" / "embeddings.parquet").num_rows == 4


def test_errors_are_one_clear_line_not_a_traceback(tmp_path: Path) -> None:
    run = _xclay("embed", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o"))
    assert run.returncode != 0
    assert "no datacube at" in run.stderr


def test_chip_sizes_are_free_and_bad_ones_are_reported(
    tmp_path: Path, demo_cube_256: xr.Dataset
) -> None:
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    # A chip size that is no multiple of the store's 64 px chunks embeds as it is ...
    ok = _xclay("embed", str(cube), "--out", str(tmp_path / "o"), "--chip-size", "96")
    assert ok.returncode == 0, ok.stderr
    assert xclay.read_geoparquet(tmp_path / "o" / "embeddings.parquet").num_rows == 4
    assert "64 px" in ok.stdout  # the columns and rows edges='drop' left out are reported
    # ... one larger than the datacube, or not positive, is refused in one line with the fix.
    big = _xclay("embed", str(cube), "--out", str(tmp_path / "b"), "--chip-size", "512")
    assert big.returncode == 1 and "Traceback" not in big.stderr
    assert "smaller than one chip" in big.stderr and "edges='pad'" in big.stderr
    zero = _xclay("embed", str(cube), "--out", str(tmp_path / "z"), "--chip-size", "0")
    assert zero.returncode == 2 and "--chip-size: must be positive, got 0" in zero.stderr


def test_chip_filters_from_the_command_line(tmp_path: Path, demo_cube_256: xr.Dataset) -> None:
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    out = tmp_path / "o"
    strict = _xclay("embed", str(cube), "--out", str(out), "--max-nodata", "0", "--no-progress")
    assert strict.returncode == 0, strict.stderr
    emb = xclay.open_embeddings(out / "embeddings.zarr")
    skipped = int((emb["nodata_fraction"].values > 0).sum())
    assert skipped > 0 and f"{skipped} (nodata)" in strict.stdout  # the demo has gaps
    assert emb.attrs["config"]["quality"]["max_nodata"] == 0.0
    clouds = _xclay("embed", str(cube), "--out", str(tmp_path / "c"), "--min-clear", "0.5")
    assert clouds.returncode == 1 and "Traceback" not in clouds.stderr
    assert "need a datacube with a 'quality' variable" in clouds.stderr


def test_stored_extras_from_the_command_line(tmp_path: Path, demo_cube_256: xr.Dataset) -> None:
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    out = tmp_path / "o"
    run = _xclay(
        "embed", str(cube), "--out", str(out), "--chip-size", "64", "--thumbnails", "16",
        "--quantize", "int8", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    raw = xclay.open_embeddings(out / "embeddings.zarr", dequantize=False)
    assert raw["embedding"].dtype == np.int8 and raw["thumbnail"].shape[3:] == (16, 16, 4)
    table = xclay.read_geoparquet(out / "embeddings.parquet")
    assert table["thumbnail"].null_count == 0 and "embedding_scale" not in table.column_names
    again = _xclay("export", str(out / "embeddings.zarr"), "--out", str(tmp_path / "f.parquet"))
    assert again.returncode == 0, again.stderr  # float32 unless --quantize
    assert (
        xclay.read_geoparquet(tmp_path / "f.parquet", dequantize=False)["embedding"].type.value_type
        == "float"
    )
    loss = _xclay("embed", str(cube), "--out", str(tmp_path / "l"), "--loss")
    assert (
        loss.returncode == 1 and "has no decoder" in loss.stderr and "Traceback" not in loss.stderr
    )


def test_info_reports_machine_and_parts() -> None:
    run = _xclay("info", "--json")
    assert run.returncode == 0, run.stderr
    info = json.loads(run.stdout)
    assert info["xclay"] == xclay.__version__
    assert info["packages"]["zarr"].startswith("3.")
    assert "rcf" in info["models"]
    assert set(info["optional"]) == {"gpu", "dask", "io"}
    assert info["gpu"]["cuda"] in (True, False)
    data_path = info["gpu"]["data_path"]
    import importlib.util

    assert (data_path["kvikio"] is None) == (importlib.util.find_spec("kvikio") is None)
    text = _xclay("info")
    io_line = next(line for line in text.stdout.splitlines() if line.startswith("GPU I/O"))
    assert "kvikio" in io_line and "nvCOMP" in io_line
    assert text.returncode == 0 and "CPU" in text.stdout
    models = next(line for line in text.stdout.splitlines() if line.startswith("models"))
    assert "rcf" in models and "clay-v1.5" in models


def test_embed_with_clay_checkpoint_and_output(tmp_path: Path, demo_cube_256: xr.Dataset) -> None:
    import torch

    from xclay.models.clay_encoder import ClayEncoder

    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(ClayEncoder.from_size("tiny").state_dict(), ckpt)
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    run = _xclay(
        "embed", str(cube), "--out", str(tmp_path / "o"), "--chip-size", "64",
        "--model", "clay-v1.5", "--checkpoint", str(ckpt), "--model-option", "output=mean",
        "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "clay-v1.5 (192-d)" in run.stdout
    emb = xclay.open_embeddings(tmp_path / "o" / "embeddings.zarr")
    assert emb.attrs["model"]["output"] == "mean" and emb.attrs["model"]["checkpoint"] == "tiny.pt"
    # the model checks its own options; --output is the deprecated spelling of one
    bad = _xclay("embed", str(cube), "--out", str(tmp_path / "o2"), "--output", "mean")
    assert bad.returncode == 1 and "has no options ['output']" in bad.stderr
    assert "--output is deprecated; write --model-option output=mean" in bad.stderr
    bad = _xclay(
        "embed", str(cube), "--out", str(tmp_path / "o3"), "--model", "clay-v1.5",
        "--checkpoint", str(ckpt), "--model-option", "output=tokens",
    )  # fmt: skip
    assert bad.returncode == 1
    assert "'clay-v1.5': output must be one of cls, mean, patches, got 'tokens'" in bad.stderr


def test_embed_with_the_kvikio_engine_needs_a_gpu_and_says_so(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip(
            "this machine has CUDA; tests/batch/test_gpu_engine.py covers the kvikio engine"
        )
    from .helpers import random_cube

    cube = xclay.write_datacube(random_cube(), tmp_path / "c.zarr", chip_size=16)
    run = _xclay(
        "embed", str(cube), "--out", str(tmp_path / "o"), "--engine", "kvikio", "--chip-size", "16"
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "engine='kvikio'" in run.stderr and "engine='zarr'" in run.stderr
    assert not (tmp_path / "o" / "embeddings.zarr").exists()


def test_embed_counts_chips_and_says_how_to_retry(
    tmp_path: Path, demo_cube_256: xr.Dataset
) -> None:
    """`xclay embed` shows its plan, then progress in chips (not regions), and its advice
    names the command it is (there is no spec to rerun)."""
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    run = _xclay("embed", str(cube), "--out", str(tmp_path / "out"), "--chip-size", "64",
                 "--region-chips", "2", "--log-every", "0")  # fmt: skip
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "  embed       16 chips in 4 regions to do" in lines
    assert any(
        line.startswith("  embed       16 of 16 chips (100%), 4 of 4 regions") for line in lines
    )
    # a damaged chunk fails its region; the report says how to retry: this same command
    chunks = sorted(p for p in (cube / "pixels" / "c").rglob("*") if p.is_file())
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:-100])
    again = _xclay("embed", str(cube), "--out", str(tmp_path / "out2"), "--chip-size", "64",
                   "--region-chips", "2", "--no-progress")  # fmt: skip
    assert again.returncode == 3, again.stderr  # finished, incomplete
    assert "failed; rerun the same xclay embed command to retry them" in again.stdout
    assert "spec" not in again.stdout.split("INCOMPLETE")[1]


def test_info_names_what_a_missing_part_lacks() -> None:
    result = _xclay("info")
    assert result.returncode == 0, result.stderr
    parts = next(line for line in result.stdout.splitlines() if line.startswith("parts"))
    for part in parts.removeprefix("parts").split(", "):
        _name, _, state = part.strip().partition(": ")
        assert state == "yes" or (state.startswith("no (") and "missing" in state), part


def test_a_local_cluster_run_keeps_the_cluster_quiet(
    tmp_path: Path, demo_cube_256: xr.Dataset
) -> None:
    pytest.importorskip("distributed", reason="needs xclay[dask]")
    cube = xclay.write_datacube(demo_cube_256, tmp_path / "cube.zarr", chip_size=64)
    run = _xclay("embed", str(cube), "--out", str(tmp_path / "out"), "--chip-size", "64",
                 "--cluster", "local:2", "--no-progress")  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stderr == "", run.stderr  # no distributed INFO lines after the report
    assert "EPSG:32720" in run.stdout and "PROJCRS" not in run.stdout  # the CRS by its name


def test_a_missing_distributed_is_named_as_such(tmp_path: Path) -> None:
    """Dask installed without its distributed scheduler: --cluster says which package is
    missing (it said Dask was)."""
    code = (
        "import sys; sys.modules['distributed'] = None\n"  # importing it now fails
        "from xclay.cli import main\n"
        "sys.exit(main(['embed', 'cube.zarr', '--out', 'o', '--chip-size', '32', "
        "'--cluster', 'local:2']))"
    )
    xclay.write_datacube(xclay.datasets.demo_composite(64), tmp_path / "cube.zarr", chip_size=32)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr
    assert "the 'distributed' package" in done.stderr and "xclay[dask]" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
