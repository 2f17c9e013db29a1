"""Nothing wrong passes silently: damaged datacubes, bad georeferencing, wrong units, bad
outputs, specs, checkpoints and items. Each case: a one-line error naming the problem and
the fix (no traceback from the CLI), and nothing marked complete that is not."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.datacube import Compression, is_complete
from xclay.datacube.chunks import ArrayLayout, ChunkLocator
from xclay.errors import (
    CheckpointError,
    DatacubeError,
    DataIntegrityError,
    ModelError,
    OutputError,
)
from xclay.models.clay import ClayV15
from xclay.models.rcf import RCFEncoder

from .helpers import random_cube

CHIP = 32


def _xclay(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xclay.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def _one_clear_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _cube(tmp_path: Path, compression: Compression = "zstd", shard: int | None = 2) -> Path:
    """A 4 x 4-chip datacube on disk (sharded by 2 x 2 chips by default)."""
    cube = random_cube((1, 3, 4 * CHIP, 4 * CHIP), seed=3)
    return xclay.write_datacube(
        cube, tmp_path / "cube.zarr", chip_size=CHIP, compression=compression, shard_chips=shard
    )


def _embed_cli(cube: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _xclay(
        "embed", str(cube), "--out", str(out), "--chip-size", str(CHIP), "--no-progress",
        "--device", "cpu", "--batch-size", "3", "--region-chips", "2", *extra,
    )  # fmt: skip


def _damage(path: Path, offset: int, nbytes: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for k in range(offset, min(offset + nbytes, len(data))):
        data[k] ^= 0xA5
    path.write_bytes(bytes(data))


def _chunk(cube: Path, index: tuple[int, ...]) -> tuple[Path, int, int]:
    ref = ChunkLocator(ArrayLayout.open(cube / "pixels")).find(index)
    assert ref is not None
    size = ref.nbytes if ref.nbytes is not None else Path(ref.path).stat().st_size
    return Path(ref.path), ref.offset, size


# --------------------------------------------------------------------------- damaged datacubes


@pytest.mark.parametrize(
    ("compression", "shard"), [("zstd", 2), ("zstd", None), ("none", 2), ("none", None), ("lz4", 2)]
)
def test_a_damaged_chunk_fails_its_region_and_nothing_is_marked_complete(
    tmp_path: Path, compression: Compression, shard: int | None
) -> None:
    cube = _cube(tmp_path, compression, shard)
    path, offset, size = _chunk(cube, (0, 0, 2, 3))
    _damage(path, offset + size // 3)
    result = _embed_cli(cube, tmp_path / "out")
    assert result.returncode == 3, result.stderr  # incomplete: the other regions are done
    assert "INCOMPLETE" in result.stdout and str(path) in result.stdout
    assert "checksum" in result.stdout or "does not decode" in result.stdout
    assert not is_complete(tmp_path / "out" / "embeddings.zarr")
    with pytest.raises(DatacubeError, match="not complete"):
        xclay.read_geoparquet(tmp_path / "out" / "embeddings.parquet")
    parts = xclay.read_geoparquet(tmp_path / "out" / "embeddings.parquet", partial=True)
    assert 0 < parts.num_rows < 16  # what was good was kept


@pytest.mark.parametrize("what", ["shard file", "chunk file"])
def test_a_lost_file_is_damage_not_nodata(tmp_path: Path, what: str) -> None:
    cube = _cube(tmp_path, "zstd", 2 if what == "shard file" else None)
    path, _, _ = _chunk(cube, (0, 0, 1, 1))
    path.unlink()
    result = _embed_cli(cube, tmp_path / "out")
    assert result.returncode == 3 and "is missing" in result.stdout
    assert not is_complete(tmp_path / "out" / "embeddings.zarr")


def test_a_cut_short_shard_and_a_damaged_shard_index(tmp_path: Path) -> None:
    cube = _cube(tmp_path, "zstd", 2)
    shard, _, _ = _chunk(cube, (0, 0, 0, 0))
    shard.write_bytes(shard.read_bytes()[:-100])  # the index is at the end
    other, _, _ = _chunk(cube, (0, 0, 3, 3))
    _damage(other, other.stat().st_size - 10)  # inside its index
    result = _embed_cli(cube, tmp_path / "out")
    assert result.returncode == 3
    assert result.stdout.count("shard index") >= 1 and "INCOMPLETE" in result.stdout
    assert "2 region(s) failed" in result.stdout


@pytest.mark.parametrize("which", ["zarr.json", "pixels/zarr.json"])
def test_damaged_metadata_is_one_line_naming_the_file(tmp_path: Path, which: str) -> None:
    cube = _cube(tmp_path)
    meta = cube / which
    meta.write_text(meta.read_text()[: len(meta.read_text()) // 2])
    result = _embed_cli(cube, tmp_path / "out")
    _one_clear_line(result, "zarr.json")
    assert not (tmp_path / "out" / "embeddings.zarr").exists()


def test_random_damage_never_gives_a_complete_wrong_output(tmp_path: Path) -> None:
    """Flip random bytes in random chunks, again and again: the embedding either fails
    naming damage, or gives exactly the undamaged result (never anything else)."""
    cube = _cube(tmp_path, "zstd", 2)
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    reference = xclay.open_datacube(cube).clay.embed(
        model=model, chip_size=CHIP, device="cpu", progress=False
    )
    files = sorted(p for p in (cube / "pixels").rglob("*") if p.is_file() and p.name != "zarr.json")
    pristine = {p: p.read_bytes() for p in files}
    rng = np.random.default_rng(7)
    caught = 0
    for _ in range(25):
        victim = files[int(rng.integers(len(files)))]
        data = bytearray(pristine[victim])
        for k in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
            data[int(k)] ^= int(rng.integers(1, 256))
        victim.write_bytes(bytes(data))
        rebuilt = RCFEncoder.from_card(reference.attrs["model"])
        try:
            got = xclay.open_datacube(cube).clay.embed(
                model=rebuilt, chip_size=CHIP, device="cpu", progress=False
            )
        except DataIntegrityError:
            caught += 1
        else:
            np.testing.assert_array_equal(got["embedding"].values, reference["embedding"].values)
        victim.write_bytes(pristine[victim])
    assert caught >= 20  # (a flip can only pass unseen if it cancels itself: none here)


def test_a_store_without_checksums_opens_with_a_warning(tmp_path: Path) -> None:
    import zarr

    cube = _cube(tmp_path, "zstd", None)
    group = zarr.open_group(cube, mode="r+")
    pixels = group["pixels"]
    assert isinstance(pixels, zarr.Array)
    values = pixels[...]
    assert isinstance(values, np.ndarray)
    attrs = {k: v for k, v in pixels.attrs.items() if k != "xclay_integrity"}
    del group["pixels"]
    from zarr.codecs import ZstdCodec

    group.create_array(
        "pixels", data=values, chunks=(1, 3, CHIP, CHIP), compressors=[ZstdCodec()],
        dimension_names=("time", "band", "y", "x"), attributes=attrs, fill_value=0,
    )  # fmt: skip
    with pytest.warns(xclay.errors.DataIntegrityWarning, match="without chunk checksums"):
        opened = xclay.open_datacube(cube)
    np.testing.assert_array_equal(opened["pixels"].values, values)


# --------------------------------------------------------------------------- georeferencing


def test_a_geotiff_without_a_geotransform_is_refused(tmp_path: Path) -> None:
    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    rioxarray = pytest.importorskip("rioxarray", reason="needs xclay[io]")
    path = tmp_path / "bare.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint16"
    ) as dst:  # no transform, no CRS
        dst.write(np.full((3, 64, 64), 500, dtype=np.uint16))
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        da = rioxarray.open_rasterio(path)
    assert any(issubclass(w.category, rasterio.errors.NotGeoreferencedWarning) for w in seen)
    with pytest.raises(DatacubeError, match="no georeferencing"):
        xclay.as_datacube(da, crs="EPSG:32720", wavelengths=[0.49, 0.56, 0.66])


def test_coordinates_in_other_units_than_the_crs_are_refused() -> None:
    cube = random_cube((1, 2, 32, 32))
    # Metres labelled as degrees: y = 9,000,000 "degrees" of latitude.
    da = (
        cube["pixels"]
        .drop_vars("spatial_ref")
        .assign_coords(x=np.arange(32) * 10.0 + 500000, y=9000000 - np.arange(32) * 10.0)
    )
    with pytest.raises(DatacubeError, match="do not map to valid longitudes and latitudes"):
        xclay.as_datacube(da, crs="EPSG:4326", wavelengths=[0.5, 0.6])


def _grid(x: np.ndarray, y: np.ndarray) -> xr.DataArray:
    """Two bands on the grid of coordinates ``x``, ``y`` (pixel centres), no CRS of its own."""
    return xr.DataArray(
        np.full((2, y.size, x.size), 500, dtype=np.uint16),
        dims=("band", "y", "x"),
        coords={"x": x.astype(np.float64), "y": y.astype(np.float64)},
    )


_NY, _NX = 64, 48


@pytest.mark.parametrize("crs", ["EPSG:32720", "EPSG:32633", "EPSG:4326"])
@pytest.mark.parametrize(
    ("form", "x", "y"),
    [
        ("0..N, y increasing", np.arange(_NX), np.arange(_NY)),
        ("0..N, y decreasing", np.arange(_NX), np.arange(_NY)[::-1]),
        ("half-pixel centres, y decreasing", np.arange(_NX) + 0.5, np.arange(_NY)[::-1] + 0.5),
        ("1..N", np.arange(1, _NX + 1), np.arange(1, _NY + 1)),
        ("flipped x", np.arange(_NX)[::-1], np.arange(_NY)),
    ],
)
def test_pixel_indices_as_coordinates_are_refused(
    crs: str, form: str, x: np.ndarray, y: np.ndarray
) -> None:
    # An exact identity transform (centres 0.5.., y increasing) was refused before; these
    # were not, and put chips near the south pole (UTM 20S) or on the equator.
    with pytest.raises(DatacubeError, match="no georeferencing: its coordinates are pixel") as err:
        xclay.as_datacube(_grid(x, y), crs=crs, wavelengths=[0.5, 0.6], gsd=10)
    assert "\n" not in str(err.value) and "write_transform" in str(err.value)


@pytest.mark.parametrize("crs", ["EPSG:32720", "EPSG:32620"])
@pytest.mark.parametrize("y_up", [False, True])
def test_pixel_offsets_in_metres_from_the_crs_origin_are_refused(crs: str, y_up: bool) -> None:
    # Pixel indices times a 10 m pixel: a UTM CRS's origin lies 500 km west of its zone.
    y = np.arange(_NY) * 10.0 + 5
    with pytest.raises(DatacubeError, match=r"starts at the origin \(0, 0\) of EPSG:") as err:
        xclay.as_datacube(
            _grid(np.arange(_NX) * 10.0 + 5, y if y_up else y[::-1]),
            crs=crs,
            wavelengths=[0.5, 0.6],
        )
    assert "\n" not in str(err.value) and "write_crs" in str(err.value)


def test_a_grid_far_outside_its_crs_area_of_use_is_refused() -> None:
    from pyproj import Transformer

    def grid_at(crs: str, lon: float, lat: float, res: float = 10.0, n: int = 64) -> xr.DataArray:
        x0, y0 = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
        return _grid(x0 + res * (np.arange(n) + 0.5), y0 - res * (np.arange(n) + 0.5))

    # UTM 20S coordinates labelled New Zealand's TM, or zone 33N's 16 degrees west of it
    utm20s = _grid(300005 + 10.0 * np.arange(_NX), 9600005 - 10.0 * np.arange(_NY))
    with pytest.raises(DatacubeError, match="degrees outside the area EPSG:2193 is used in"):
        xclay.as_datacube(utm20s, crs="EPSG:2193", wavelengths=[0.5, 0.6])
    with pytest.raises(DatacubeError, match="degrees outside the area EPSG:32633 is used in"):
        xclay.as_datacube(
            grid_at("EPSG:32633", -8.0, 45.0), crs="EPSG:32633", wavelengths=[0.5, 0.6]
        )
    # Real tiles overhang their zone: Sentinel-2's by a tile (4 degrees of longitude at 70 N,
    # 7 at 80 N), Landsat's southern scenes sit in northern zones (negative northings), and
    # zone 1 reaches over the antimeridian.
    for crs, lon, lat in [
        ("EPSG:32633", 8.0, 70.0),
        ("EPSG:32633", 21.5, 70.0),
        ("EPSG:32633", 5.0, 80.0),
        ("EPSG:32619", -70.0, -33.0),
        ("EPSG:32601", 179.9, 65.0),
    ]:
        cube = xclay.as_datacube(grid_at(crs, lon, lat), crs=crs, wavelengths=[0.5, 0.6])
        assert cube.sizes["x"] == 64


# --------------------------------------------------------------------------- units


def _sentinel2(values: np.ndarray) -> xr.Dataset:
    cube = random_cube((1, 4, 64, 64), dtype=str(values.dtype))
    da = cube["pixels"].copy(data=values)
    return xclay.as_datacube(da, platform="sentinel-2-l2a", bands=["blue", "green", "red", "nir"])


@pytest.mark.parametrize(
    ("what", "values"),
    [
        ("8-bit", np.random.default_rng(0).integers(1, 255, (1, 4, 64, 64)).astype(np.uint8)),
        ("reflectance 0-1", np.random.default_rng(0).uniform(0.01, 0.6, (1, 4, 64, 64)).astype("float32")),
    ],
)  # fmt: skip
def test_data_in_other_units_than_the_sensor_table_are_refused(
    what: str, values: np.ndarray
) -> None:
    cube = _sentinel2(values)
    with pytest.raises(ModelError, match="not in that sensor's units") as err:
        xclay.embed(cube, model="rcf", chip_size=32, device="cpu", progress=False)
    assert "reflectance x 10000" in str(err.value)


def test_data_in_the_sensors_units_pass() -> None:
    values = np.random.default_rng(0).integers(200, 4000, (1, 4, 64, 64)).astype(np.uint16)
    emb = xclay.embed(_sentinel2(values), model=xclay.models.get_model("rcf", num_filters=8,
                      sample_chips=2), chip_size=32, device="cpu", progress=False)  # fmt: skip
    assert emb["embedded"].values.all()


def test_wavelengths_in_nanometres_are_refused() -> None:
    cube = random_cube((1, 2, 32, 32))
    with pytest.raises(
        DatacubeError, match=r"'b0' has wavelength 490, outside 0.3-15.0 µm.*0.49 µm"
    ):
        xclay.as_datacube(cube["pixels"], wavelengths=[490.0, 665.0])


def test_modis_wavelengths_are_micrometres_in_the_cube_and_nanometres_for_clay() -> None:
    from xclay.models.clay import _wavelengths
    from xclay.protocols import InputSpec
    from xclay.sensors import get_sensor, list_platforms

    for platform in list_platforms():  # every entry: physical micrometres (radar: its own)
        for band in get_sensor(platform).bands:
            assert 0.3 <= band.wavelength <= 15 or platform == "sentinel-1-rtc", (platform, band)
    bands = ["sur_refl_b01", "sur_refl_b02"]
    cube = random_cube((1, 2, 32, 32))
    modis = xclay.as_datacube(cube["pixels"], platform="modis", bands=bands)
    np.testing.assert_allclose(modis["wavelength"].values, [0.645, 0.8585])
    spec = InputSpec("modis", tuple(bands), (0.645, 0.8585), 500.0, 0, "uint16", 32)
    assert _wavelengths(spec)[0] == [645.0, 858.5]  # what Clay v1.5 saw in training


def test_pixels_that_are_not_numbers_are_refused() -> None:
    cube = random_cube((1, 2, 32, 32))
    with pytest.raises(DatacubeError, match="not numeric"):
        xclay.as_datacube(cube["pixels"].astype(bool), wavelengths=[0.5, 0.6])


def test_non_finite_pixels_are_never_embedded() -> None:
    cube = random_cube((1, 2, 32, 64), dtype="float32", nodata=None)
    cube["pixels"].values[0, 1, :, 32:] = np.inf
    emb = xclay.embed(
        cube, model=xclay.models.get_model("rcf", num_filters=8, sample_chips=2),
        chip_size=32, device="cpu", progress=False,
    )  # fmt: skip
    assert emb["embedded"].values[0].tolist() == [[True, False]]


# --------------------------------------------------------------------------- dates


def test_an_unknown_date_stays_unknown_through_odc_stac(tmp_path: Path) -> None:
    pytest.importorskip("odc.stac", reason="needs xclay[io]")
    rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
    import odc.stac
    from affine import Affine

    from xclay.ingest import stac_item

    path = tmp_path / "scene.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=64, height=64, count=2, dtype="uint16",
        crs="EPSG:32720", transform=Affine(10, 0, 300000, 0, -10, 9000000), nodata=0,
    ) as dst:  # fmt: skip
        dst.write(np.full((2, 64, 64), 700, dtype=np.uint16))
    item = stac_item(path, bands=["red", "nir"], wavelengths=[0.66, 0.84])  # no date
    ds = odc.stac.load([item], bands=["red", "nir"])
    cube = xclay.as_datacube(ds, wavelengths=[0.66, 0.84])
    assert np.isnat(cube["time"].values).all()  # not 1900, not 2000: unknown


# --------------------------------------------------------------------------- outputs


def test_an_unwritable_output_folder_is_found_before_any_compute(tmp_path: Path) -> None:
    cube = _cube(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    result = _embed_cli(cube, tmp_path / "a-file" / "out")
    _one_clear_line(result, "cannot write the outputs", "Nothing was run")


def test_a_read_only_output_file_system_is_found_before_any_compute(tmp_path: Path) -> None:
    from xclay.run.preflight import check_outputs

    # /proc is read-only for everyone, root included.
    with pytest.raises(OutputError, match="cannot write the outputs in /proc/xclay-out"):
        check_outputs(Path("/proc/xclay-out"), 0)


def test_too_little_free_space_is_found_before_any_compute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from xclay.run.preflight import check_outputs

    real = shutil.disk_usage
    free = real(tmp_path).free
    with pytest.raises(OutputError, match="the outputs need about") as err:
        check_outputs(tmp_path / "out", int(free * 2))
    assert "free" in str(err.value) and "Nothing was run" in str(err.value)
    check_outputs(tmp_path / "out2", 1024)  # room for a kilobyte
    assert (tmp_path / "out2").is_dir() and not list((tmp_path / "out2").iterdir())


def test_the_output_estimate_follows_the_model_options(tmp_path: Path) -> None:
    """The disk check sizes vectors by the model's options (it once took every model at
    its default length, so rcf with more filters or Clay's patch grids could fill a disk
    the check had passed)."""
    from xclay.models import get_model_info
    from xclay.run import load_spec, plan
    from xclay.run.preflight import estimate_output_bytes

    cube = _cube(tmp_path)
    few = load_spec(_spec(tmp_path, cube, options={"num_filters": 8}))
    resolved = plan(few)
    many = load_spec(_spec(tmp_path, cube, options={"num_filters": 256}))
    extra = estimate_output_bytes(many, resolved) - estimate_output_bytes(few, resolved)
    assert extra == 2 * resolved.chips * (512 - 16) * 4  # twice: Zarr and GeoParquet
    clay = get_model_info("clay-v1.5")
    assert clay.values_per_chip({"size": "tiny", "output": "patches"}, 64) == 192 * 8 * 8
    assert clay.values_per_chip({"size": "tiny"}, 64) == 192
    assert clay.values_per_chip({}, 256) == 1024  # the checkpoint decides: the widest


def test_an_existing_output_of_another_run_is_refused(tmp_path: Path) -> None:
    cube = _cube(tmp_path)
    assert _embed_cli(cube, tmp_path / "out").returncode == 0
    result = _embed_cli(cube, tmp_path / "out", "--max-nodata", "0.1")
    _one_clear_line(result, "different run", "--overwrite")


# --------------------------------------------------------------------------- specs and checkpoints


def _spec(folder: Path, cube: Path, **model: object) -> Path:
    import yaml

    spec = {
        "input": {"datacube": str(cube)},
        "grid": {"chip_size": CHIP},
        "model": {"name": "rcf", **model},
        "compute": {"device": "cpu"},
        "outputs": {"dir": str(folder / "out")},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_missing_checkpoint_fails_the_dry_run(tmp_path: Path) -> None:
    spec = _spec(tmp_path, _cube(tmp_path), name="clay-v1.5", checkpoint="nowhere.ckpt")
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_a_corrupt_checkpoint_fails_the_dry_run(tmp_path: Path) -> None:
    (tmp_path / "broken.ckpt").write_bytes(os.urandom(4096))
    spec = _spec(tmp_path, _cube(tmp_path), name="clay-v1.5", checkpoint="broken.ckpt")
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 1 and "not a readable Clay checkpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_any_corrupt_checkpoint_bytes_are_a_checkpoint_error(tmp_path: Path) -> None:
    """Random bytes fail torch.load in many ways (an IndexError from the unpickler once made
    the CLI print a traceback): every one is a CheckpointError."""
    from xclay.models.checkpoints import read_torch_file

    rng = np.random.default_rng(0)
    path = tmp_path / "broken.ckpt"
    for _ in range(300):
        size = int(rng.integers(1, 4096))
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        if rng.random() < 0.5:  # a pickle's opening bytes, to get deeper into the unpickler
            data = b"\x80\x02" + data
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable Clay checkpoint"):
            read_torch_file(path, model="Clay")


def test_a_checkpoint_of_another_architecture_fails_the_dry_run(tmp_path: Path) -> None:
    import torch

    from xclay.models.clay_encoder import ClayEncoder

    state = ClayEncoder.from_size("tiny").state_dict()
    key = "transformer.layers.0.0.to_out.weight"
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 8)
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"is not a Clay v1\.5 tiny encoder"):
        ClayV15.check_checkpoint(tmp_path / "other.pt")
    spec = _spec(tmp_path, _cube(tmp_path), name="clay-v1.5", checkpoint="other.pt")
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 1 and "of other shapes" in result.stderr


def test_model_options_the_model_lacks_fail_the_dry_run(tmp_path: Path) -> None:
    spec = _spec(tmp_path, _cube(tmp_path), options={"num_filtres": 16})
    result = _xclay("run", str(spec), "--dry-run")
    _one_clear_line(result, "has no options ['num_filtres']", "num_filters")


def test_a_good_spec_passes_the_dry_run_and_writes_nothing(tmp_path: Path) -> None:
    spec = _spec(tmp_path, _cube(tmp_path), options={"num_filters": 8})
    result = _xclay("run", str(spec), "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "preflight" in result.stdout and not (tmp_path / "out").exists()


def test_an_unknown_spec_field_is_one_line(tmp_path: Path) -> None:
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"input": {"datacube": "c.zarr"}, "outputs": {"dir": "o"},
                                    "grid": {"chip_size": 32, "chipsize": 3}}))  # fmt: skip
    _one_clear_line(_xclay("run", str(path), "--dry-run"), "grid.chipsize", "unknown setting")


# --------------------------------------------------------------------------- items


def test_an_items_file_that_is_not_json_is_one_line(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "items.json").write_text('{"type": "FeatureCollection", "features": [')
    spec = {
        "input": {"stac": {"items": "items.json"}, "bands": ["red"], "wavelengths": {"red": 0.66}},
        "grid": {"resolution": 10},
        "outputs": {"dir": "out"},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    _one_clear_line(_xclay("run", str(tmp_path / "spec.yaml"), "--dry-run"), "items.json")


# --------------------------------------------------------------------------- resuming embeds


def test_a_killed_embed_resumes_where_it_stopped(tmp_path: Path) -> None:
    cube = xclay.write_datacube(
        random_cube((1, 3, 12 * CHIP, 12 * CHIP), seed=4), tmp_path / "cube.zarr", chip_size=CHIP
    )
    out = tmp_path / "out"
    # Regions of 2 x 2 chips: 36 regions to kill the command among.
    spec_args = [sys.executable, "-m", "xclay.cli", "embed", str(cube), "--out", str(out),
                 "--chip-size", str(CHIP), "--no-progress", "--device", "cpu", "--batch-size", "2",
                 "--region-chips", "2"]  # fmt: skip
    proc = subprocess.Popen(spec_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    markers = out / "_xclay" / "done" / "embed"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if markers.is_dir() and sum(1 for _ in markers.rglob("*.json")) >= 1:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.skip("the embed finished before it could be killed (a very fast machine)")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not is_complete(out / "embeddings.zarr")
    result = subprocess.run(spec_args, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout and is_complete(out / "embeddings.zarr")
    whole = xclay.embed(
        xclay.open_datacube(cube),
        model=RCFEncoder.from_card(json.loads(
            (out / "_xclay" / "run.json").read_text())["card"]),
        chip_size=CHIP, device="cpu", progress=False,
    )  # fmt: skip
    got = xclay.open_embeddings(out / "embeddings.zarr")
    np.testing.assert_array_equal(got["embedding"].values, whole["embedding"].values)


def test_cli_user_errors_never_print_a_traceback(tmp_path: Path) -> None:
    cases = [
        ("embed", str(tmp_path / "missing.zarr"), "--out", str(tmp_path / "o")),
        ("export", str(tmp_path / "missing.zarr")),
        ("run", str(tmp_path / "missing.yaml")),
        ("embed", str(_cube(tmp_path)), "--out", str(tmp_path / "o"), "--chip-size", "0"),
    ]
    for args in cases:
        result = _xclay(*args)
        assert result.returncode in (1, 2), (args, result.stderr)  # 2: a usage mistake
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.stderr.startswith(f"xclay {args[0]}: error: "), result.stderr
