"""The datacube convention: building it from what users have, validation, Zarr v3 on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from affine import Affine

import xclay
from tests import cuda_standins
from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS, random_cube, raster
from xclay.datacube import Compression, datacube_geobox
from xclay.errors import DatacubeError, OutputExistsError


def _odc_stac_like(bands: list[str], *, shape: tuple[int, int] = (64, 48)) -> xr.Dataset:
    """A Dataset shaped like odc.stac.load's: one (time, y, x) variable per band."""
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    gb = GeoBox(shape, Affine(10, 0, 600000, 0, -10, 5000000), "EPSG:32632")
    coords = xr_coords(gb, crs_coord_name="spatial_ref")
    rng = np.random.default_rng(3)
    time = np.array(["2023-05-01", "2023-06-01"], dtype="datetime64[ns]")
    data_vars = {
        b: (
            ("time", "y", "x"),
            rng.integers(1, 5000, size=(2, *shape)).astype("uint16"),
            {"nodata": 0},
        )
        for b in bands
    }
    return xr.Dataset(data_vars, coords={"time": time, **coords})


# --------------------------------------------------------------------------- as_datacube


def test_from_rioxarray_geotiff_keeps_exact_transform(olinda_tif: Path) -> None:
    import rasterio
    import rioxarray

    da = raster(rioxarray.open_rasterio(olinda_tif))
    cube = xclay.as_datacube(da, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    with rasterio.open(olinda_tif) as src:
        transform, crs, shape = src.transform, src.crs, (src.height, src.width)
    assert cube["pixels"].dims == ("time", "band", "y", "x")
    assert cube["pixels"].shape == (1, 6, *shape)
    assert cube["pixels"].dtype == np.uint8
    geobox = datacube_geobox(cube)
    assert tuple(geobox.affine)[:6] == tuple(transform)[:6]
    assert geobox.crs is not None
    assert geobox.crs.epsg == crs.to_epsg() == 31985
    assert cube.attrs["gsd"] == pytest.approx(28.5)
    assert list(cube["band"].values) == OLINDA_BANDS
    np.testing.assert_allclose(cube["wavelength"].values, OLINDA_WAVELENGTHS)
    assert np.isnat(cube["time"].values[0])  # acquisition date not recorded in the file
    source = cube.attrs["provenance"]["sources"][0]
    assert source["href"].endswith("L7_ETMs.tif") and len(source["sha256"]) == 64
    np.testing.assert_array_equal(cube["pixels"].values[0], da.values)


def test_from_odc_stac_dataset_with_platform_fills_wavelengths() -> None:
    ds = _odc_stac_like(["red", "nir", "blue"])
    cube = xclay.as_datacube(ds, platform="sentinel-2-l2a", bands=["blue", "red", "nir"])
    assert list(cube["band"].values) == ["blue", "red", "nir"]
    np.testing.assert_allclose(cube["wavelength"].values, [0.493, 0.665, 0.842])
    assert cube.sizes["time"] == 2
    assert cube["pixels"].attrs["nodata"] == 0
    assert cube.attrs["platform"] == "sentinel-2-l2a"
    assert cube.attrs["gsd"] == 10.0
    np.testing.assert_array_equal(cube["pixels"].sel(band="nir").values, ds["nir"].values)


def test_composite_time_range_is_stored_as_midpoint_with_bounds() -> None:
    ds = _odc_stac_like(["red"]).isel(time=0, drop=True)
    cube = xclay.as_datacube(ds, wavelengths=[0.665], time=("2024-01-01", "2025-01-01"))
    assert cube["time"].values[0] == np.datetime64("2024-07-02T00:00:00", "ns")
    assert cube["time_start"].values[0] == np.datetime64("2024-01-01", "ns")
    assert cube["time_end"].values[0] == np.datetime64("2025-01-01", "ns")


def test_a_range_of_dates_has_a_round_midpoint() -> None:
    # a run's datetime "2024-06-01/2024-06-30" ends at the last microsecond of June 30
    from xclay.ingest.composite import composite_range

    ds = _odc_stac_like(["red"]).isel(time=0, drop=True)
    june = composite_range("2024-06-01/2024-06-30", np.array([], dtype="datetime64[ns]"))
    cube = xclay.as_datacube(ds, wavelengths=[0.665], time=june)
    # not 2024-06-15T23:59:59.999999500
    assert cube["time"].values[0] == np.datetime64("2024-06-16T00:00:00", "ns")
    assert cube["time_end"].values[0] == np.datetime64("2024-06-30T23:59:59.999999", "ns")


def test_subset_cube_keeps_exact_transform() -> None:
    cube = random_cube(origin=(500000.0, 4000000.0))
    sub = cube.isel(x=slice(16, 48), y=slice(32, 64))
    gb = datacube_geobox(sub)
    assert gb.affine == Affine(10, 0, 500160, 0, -10, 3999680)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_crs", "no CRS"),
        ("no_band_dim", "no band dim"),
        ("no_wavelengths", "wavelengths missing"),
        ("bool_dtype", "not numeric"),
        ("unnamed_bands_with_platform", "pass bands="),
        ("band_not_in_platform", "has no band 'coastal'"),
        ("unknown_platform", "unknown platform"),
        ("wrong_wavelength_count", "2 values but the imagery has 3 bands"),
        ("time_twice", "already has a time dim"),
        ("extra_dim", "unexpected dims"),
    ],
)
def test_as_datacube_rejects_bad_input_with_a_clear_message(case: str, message: str) -> None:
    ds = _odc_stac_like(["red", "green", "blue"])
    kwargs: dict = {"platform": "sentinel-2-l2a"}
    obj: xr.Dataset | xr.DataArray = ds
    if case == "no_crs":
        obj = ds.drop_vars("spatial_ref")
    elif case == "no_band_dim":
        obj = xr.DataArray(np.zeros((4, 3, 5)), dims=("a", "y", "x"))
    elif case == "no_wavelengths":
        kwargs = {}
    elif case == "bool_dtype":
        obj = ds.astype(bool)
    elif case == "unnamed_bands_with_platform":
        obj = ds.to_dataarray("band").assign_coords(band=[1, 2, 3])
    elif case == "band_not_in_platform":
        obj = ds.rename({"red": "coastal"})
    elif case == "unknown_platform":
        kwargs = {"platform": "sentinel-9"}
    elif case == "wrong_wavelength_count":
        kwargs = {"wavelengths": [0.5, 0.6]}
    elif case == "time_twice":
        kwargs["time"] = "2024-01-01"
    elif case == "extra_dim":
        obj = ds.expand_dims(member=[0, 1])
    with pytest.raises(DatacubeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        xclay.as_datacube(obj, **kwargs)


def test_validate_rejects_a_plain_dataset() -> None:
    with pytest.raises(DatacubeError, match="no 'pixels' variable"):
        xclay.validate_datacube(xr.Dataset({"a": ("x", [1, 2])}))


# --------------------------------------------------------------------------- write / open


def test_write_open_round_trip_chip_aligned(tmp_path: Path) -> None:
    cube = random_cube((2, 3, 96, 80))
    path = Path(xclay.write_datacube(cube, tmp_path / "cube.zarr", chip_size=32))
    arr = zarr.open_array(path / "pixels", mode="r")
    assert arr.chunks == (1, 3, 32, 32)  # one chunk = all bands of one chip window
    assert arr.shards is None
    opened = xclay.open_datacube(path)
    assert not isinstance(opened["pixels"].variable._data, np.ndarray)  # lazy
    xr.testing.assert_identical(
        opened["pixels"].load().reset_coords(drop=True), cube["pixels"].reset_coords(drop=True)
    )
    assert datacube_geobox(opened) == datacube_geobox(cube)
    assert opened.attrs["platform"] == cube.attrs["platform"]
    assert opened.attrs["provenance"] == cube.attrs["provenance"]
    np.testing.assert_array_equal(opened["wavelength"].values, cube["wavelength"].values)


def test_written_cube_is_readable_by_rioxarray_and_odc_geo(tmp_path: Path) -> None:
    import odc.geo.xr  # noqa: F401  (registers .odc)
    import rioxarray  # noqa: F401  (registers .rio)

    cube = random_cube(crs="EPSG:32720", origin=(300000.0, 9600000.0))
    path = xclay.write_datacube(cube, tmp_path / "cube.zarr", chip_size=16)
    opened = xr.open_zarr(path, consolidated=False)
    pixels = opened["pixels"]
    assert pixels.rio.crs.to_epsg() == 32720
    assert tuple(pixels.rio.transform())[:6] == (10.0, 0.0, 300000.0, 0.0, -10.0, 9600000.0)
    assert pixels.odc.geobox == datacube_geobox(cube)


def test_sharded_and_uncompressed_stores_read_back_identically(tmp_path: Path) -> None:
    cube = random_cube((1, 4, 100, 70))
    sharded = Path(xclay.write_datacube(cube, tmp_path / "s.zarr", chip_size=16, shard_chips=4))
    raw = Path(xclay.write_datacube(cube, tmp_path / "r.zarr", chip_size=16, compression="none"))
    arr = zarr.open_array(sharded / "pixels", mode="r")
    assert arr.chunks == (1, 4, 16, 16) and arr.shards == (1, 4, 64, 64)
    shard_files = [
        p for p in (sharded / "pixels").rglob("*") if p.is_file() and p.name != "zarr.json"
    ]
    assert len(shard_files) == 2 * 2  # 100 x 70 px in 64 px shards
    # Uncompressed still carries a checksum of every chunk.
    assert [type(c).__name__ for c in zarr.open_array(raw / "pixels", mode="r").compressors] == [
        "Crc32cCodec"
    ]
    for path in (sharded, raw):
        np.testing.assert_array_equal(
            xclay.open_datacube(path)["pixels"].values, cube["pixels"].values
        )


def test_write_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    cube = random_cube()
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=16)
    with pytest.raises(OutputExistsError, match="already exists"):
        xclay.write_datacube(cube, path, chip_size=16)
    xclay.write_datacube(cube.isel(band=[0]), path, chip_size=16, overwrite=True)
    assert xclay.open_datacube(path).sizes["band"] == 1


def test_failed_write_leaves_no_store_behind(tmp_path: Path) -> None:
    import dask.array as dsa

    cube = random_cube((1, 2, 64, 64))

    def explode(block: np.ndarray) -> np.ndarray:
        raise OSError("disk vanished")

    bad = cube.copy()
    data = dsa.from_array(cube["pixels"].values, chunks=(1, 2, 32, 32)).map_blocks(
        explode, dtype="uint16"
    )
    bad["pixels"] = cube["pixels"].copy(data=data)
    with pytest.raises(OSError, match="disk vanished"):
        xclay.write_datacube(bad, tmp_path / "c.zarr", chip_size=32)
    assert list(tmp_path.iterdir()) == []


def test_open_missing_store_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no datacube at"):
        xclay.open_datacube(tmp_path / "nope.zarr")


def test_kvikio_engine_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    import importlib.util

    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU tests cover the kvikio engine")
    path = xclay.write_datacube(random_cube(), tmp_path / "c.zarr", chip_size=16)
    expected: type[Exception]
    if importlib.util.find_spec("kvikio") is None:
        expected, message = ImportError, r'pip install "xclay\[gpu\]"'
    else:  # kvikio imports without a GPU, and would fail on first read
        expected, message = xclay.errors.DeviceError, "no CUDA GPU is usable here"
    with pytest.raises(expected, match=message) as info:
        xclay.open_datacube(path, engine="kvikio")
    assert "libcuda" not in str(info.value)


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_kvikio_engine_reads_checksummed_chunks_without_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compression: Compression
) -> None:
    # The kvikio engine's variables on the CPU: CuPy and kvikIO stand-ins
    # (tests/cuda_standins.py), and zarr's own GPU buffers made to work over the CuPy
    # stand-in, so any zarr read into GPU buffers runs here as on a GPU, up to where
    # memory is. zarr 3.1's crc32c codec (every xclay store has it) makes such a buffer
    # from a NumPy array, with a ZarrUserWarning per chunk: an error here, as in the gpu
    # tests.
    import zarr.core.buffer.gpu

    cuda = cuda_standins.install(monkeypatch)
    monkeypatch.setattr(zarr.core.buffer.gpu, "cp", cuda.cupy)
    cube = random_cube((2, 3, 40, 48), seed=5)
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=16, compression=compression)
    opened = xclay.open_datacube(path, engine="kvikio")
    window = opened["pixels"].isel(time=1, y=slice(5, 37), x=slice(16, 48)).data
    assert isinstance(window, cuda.cupy.ndarray)
    np.testing.assert_array_equal(window.get(), cube["pixels"].values[1, :, 5:37, 16:48])


# --------------------------------------------------------------------------- laziness


def _random_key(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int | slice, ...]:
    key: list[int | slice] = []
    for n in shape:
        if rng.random() < 0.3:
            key.append(int(rng.integers(0, n)))
        else:
            a, b = sorted(rng.integers(0, n + 1, size=2))
            key.append(slice(int(a), int(b), int(rng.integers(1, 3))))
    return tuple(key)


def _assert_same_windows(lazy: xr.Dataset, eager: xr.Dataset, *, seed: int, n: int = 40) -> None:
    """Random basic-index windows (ints, slices, steps) read the same from both cubes."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        key = _random_key(rng, lazy["pixels"].shape)
        np.testing.assert_array_equal(
            lazy["pixels"].variable[key].values,
            eager["pixels"].variable[key].values,
            err_msg=str(key),
        )


def test_lazy_geotiff_stays_on_disk_and_reads_the_same(olinda_tif: Path) -> None:
    import rioxarray

    lazy = xclay.as_datacube(
        raster(rioxarray.open_rasterio(olinda_tif)),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    eager = xclay.as_datacube(
        raster(rioxarray.open_rasterio(olinda_tif)).load(),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    assert not isinstance(lazy["pixels"].variable._data, np.ndarray)
    assert isinstance(eager["pixels"].variable._data, np.ndarray)
    _assert_same_windows(lazy, eager, seed=0)


def test_lazy_one_variable_per_band_dataset_reads_the_same(tmp_path: Path) -> None:
    ds = _odc_stac_like(["red", "green", "blue"])
    ds.to_zarr(tmp_path / "bands.zarr", zarr_format=3, consolidated=False)
    opened = xr.open_zarr(tmp_path / "bands.zarr", chunks=None, consolidated=False)
    lazy = xclay.as_datacube(opened, wavelengths=[0.66, 0.56, 0.49], bands=["blue", "red", "green"])
    eager = xclay.as_datacube(ds, wavelengths=[0.66, 0.56, 0.49], bands=["blue", "red", "green"])
    assert not isinstance(lazy["pixels"].variable._data, np.ndarray)
    _assert_same_windows(lazy, eager, seed=1)
    np.testing.assert_array_equal(lazy["pixels"].values, eager["pixels"].values)


def test_a_cubes_pixels_make_the_same_cube_again(demo_cube_256: xr.Dataset) -> None:
    again = xclay.as_datacube(demo_cube_256["pixels"])
    assert again.attrs["platform"] == "sentinel-2-l2a"
    xr.testing.assert_identical(
        again.drop_attrs(deep=False)["pixels"], demo_cube_256.drop_attrs(deep=False)["pixels"]
    )
    assert again["time_start"].values[0] == np.datetime64("2024-01-01", "ns")


def test_duplicate_band_names_are_refused() -> None:
    ds = _odc_stac_like(["red", "green"])
    with pytest.raises(DatacubeError, match=r"unique; \['red'\]"):
        xclay.as_datacube(ds, wavelengths=[0.6, 0.6], bands=["red", "red"])


def test_nodata_the_dtype_cannot_hold_is_refused() -> None:
    ds = _odc_stac_like(["red"])
    with pytest.raises(DatacubeError, match="nodata -9999 can never occur in uint16"):
        xclay.as_datacube(ds, wavelengths=[0.6], nodata=-9999)


def test_nan_nodata_round_trips_as_valid_json(tmp_path: Path) -> None:
    import json

    cube = random_cube((1, 2, 64, 64), dtype="float32", nodata=float("nan"))
    cube["pixels"].values[0, :, :8, :8] = np.nan
    path = Path(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    meta = json.loads(
        (path / "pixels" / "zarr.json").read_text(), parse_constant=_no_bare_constants
    )
    assert meta["attributes"]["nodata"] == "NaN"
    opened = xclay.open_datacube(path)
    nodata = xclay.datacube.nodata_value(opened["pixels"])
    assert nodata is not None and np.isnan(nodata)
    np.testing.assert_array_equal(opened["pixels"].values, cube["pixels"].values)


def _no_bare_constants(name: str) -> None:
    raise AssertionError(f"bare {name} in JSON: other Zarr readers cannot parse it")


def test_a_blocks_pixels_and_quality_are_computed_together(tmp_path: Path) -> None:
    """A composite's quality comes from the same observations as its pixels: writing a
    block reads each source chunk once, not once for the pixels and again for the quality
    (the ingest read every COG twice)."""
    import threading

    import dask.array as da

    from xclay.datacube import create_datacube_store, write_datacube_block
    from xclay.masks import PixelClass

    reads = []
    lock = threading.Lock()

    def observe(block: np.ndarray) -> np.ndarray:  # stands for reading and decoding a COG
        with lock:
            reads.append(block.shape)
        return block

    cube = xclay.datasets.demo_composite(64, seed=2)
    values = cube["pixels"].values
    source = da.from_array(values, chunks=(1, 10, 32, 32)).map_blocks(
        observe, meta=np.empty((0, 0, 0, 0), values.dtype)
    )
    quality = (source[:, 0] > 0).astype(np.uint8) * np.uint8(PixelClass.CLEAR)
    lazy = cube.assign(
        pixels=(cube["pixels"].dims, source, cube["pixels"].attrs),
        quality=(("time", "y", "x"), quality),
    )
    store = create_datacube_store(lazy, tmp_path / "cube.zarr", chip_size=32)
    write_datacube_block(lazy, store, 0, (0, 64), (0, 64))
    assert len(reads) == 4  # 4 source chunks, each read once
    stored = zarr.open_array(str(tmp_path / "cube.zarr"), path="pixels", mode="r")
    np.testing.assert_array_equal(stored[:], cube["pixels"].values)
    stored_quality = zarr.open_array(str(tmp_path / "cube.zarr"), path="quality", mode="r")
    np.testing.assert_array_equal(stored_quality[:], quality.compute())
