"""A datacube variable knows its store: the lazily indexed StoreArray behind ``pixels`` and
``quality`` carries the chunk layout, is found only while the variable reads the whole
store unchanged, travels to other processes, and reads (as the GPU route reads, whole
chunks assembled) exactly what zarr-python reads."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

import xclay
from tests.helpers import random_cube
from xclay.batch.readers import ChunkSource, store_layouts
from xclay.datacube import StoreArray, store_array
from xclay.datacube.chunks import ArrayLayout, UnsupportedLayout


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cube = random_cube((3, 4, 70, 90), seed=11)  # edges not on chunk boundaries
    classes = np.random.default_rng(3).integers(0, 6, (3, 70, 90)).astype("uint8")
    cube["quality"] = (("time", "y", "x"), classes)
    path = tmp_path_factory.mktemp("source") / "c.zarr"
    return xclay.write_datacube(cube, path, chip_size=32, shard_chips=2)


def test_an_opened_variable_carries_its_store_and_layout(stored: Path) -> None:
    cube = xclay.open_datacube(stored)
    for name in ("pixels", "quality"):
        array = store_array(cube[name])
        assert isinstance(array, StoreArray)
        assert array.location.path == stored / name
        assert array.chunk_layout().shape == cube[name].shape
        assert array.chunk_layout().shard_shape is not None
    assert cube["pixels"].encoding.get("xclay_store") is None  # no side channel
    # what the batch path reads: the layouts the variables carry
    pixels, quality = store_layouts(cube)
    assert pixels.location.path == stored / "pixels"
    assert quality is not None and quality.location.path == stored / "quality"


def test_the_store_is_found_only_while_the_variable_is_the_whole_store(stored: Path) -> None:
    cube = xclay.open_datacube(stored)
    pixels = cube["pixels"]
    nx = pixels.sizes["x"]
    assert store_array(pixels.copy(deep=False)) is not None
    assert store_array(pixels.isel(x=slice(0, nx))) is not None  # a selection of everything
    assert store_array(cube.assign_coords(x=cube.x + 5.0)["pixels"]) is not None  # data unchanged
    changed = {
        "a window": pixels.isel(x=slice(0, 64)),
        "a step": pixels.isel(y=slice(None, None, 2)),
        "reversed": pixels.isel(x=slice(None, None, -1)),
        "one time step": pixels.isel(time=[0, 1, 2]),
        "transposed": pixels.transpose("time", "band", "x", "y"),
        "computed": pixels + 0,
        "cast": pixels.astype("float32"),
        "chunked with dask": pixels.chunk({"time": 1}),
        "loaded": pixels.copy(deep=False).load(),
    }
    for what, da in changed.items():
        assert store_array(da) is None, what
    # loading a variable in place forgets its store too: it may then be changed in memory
    cube["pixels"].load()
    assert store_array(cube["pixels"]) is None


def test_the_store_travels_with_the_variable(stored: Path) -> None:
    """Pickled (as Dask sends a cube to a worker), the variable still knows its store."""
    cube = pickle.loads(pickle.dumps(xclay.open_datacube(stored)))
    array = store_array(cube["pixels"])
    assert array is not None and array.location.path == stored / "pixels"
    expected = zarr.open_array(stored / "pixels", mode="r")[:]
    np.testing.assert_array_equal(cube["pixels"].values, expected)


def test_xarray_opens_a_datacube_by_the_engine_name(stored: Path) -> None:
    """The backend is installed as an xarray engine: ``engine="xclay"``."""
    assert "xclay" in xr.backends.list_engines()
    cube = xr.open_dataset(stored, engine="xclay")
    assert store_array(cube["pixels"]) is not None
    np.testing.assert_array_equal(
        cube["pixels"].values, zarr.open_array(stored / "pixels", mode="r")[:]
    )
    # and xarray's own zarr engine still reads the store as it always did
    plain = xr.open_zarr(stored, chunks=None, mask_and_scale={"pixels": False})
    xr.testing.assert_equal(plain["pixels"], cube["pixels"])
    assert store_array(plain["pixels"]) is None


def _random_key(
    rng: random.Random,
    shape: tuple[int, ...],
    steps: tuple[int | None, ...] = (None, 1, 2, 3, -1, -2),
) -> tuple[Any, ...]:
    key: list[Any] = []
    for n in shape:
        if rng.random() < 0.2:
            key.append(rng.randrange(-n, n))
            continue
        start = rng.choice([None, rng.randrange(-n, n)])
        stop = rng.choice([None, rng.randrange(-n - 2, n + 2)])
        key.append(slice(start, stop, rng.choice(steps)))
    return tuple(key)


@pytest.mark.parametrize("name", ["pixels", "quality"])
def test_the_gpu_routes_assembly_reads_what_zarr_reads(stored: Path, name: str) -> None:
    """The GPU route's CPU twin: whole chunks read (here into host buffers), assembled and
    cut to any selection of integers and slices (any step, either way, past the edges),
    give exactly zarr-python's values."""
    cube = xclay.open_datacube(stored)
    array = store_array(cube[name])
    assert array is not None
    values = np.asarray(zarr.open_array(stored / name, mode="r")[:])
    rng = random.Random(7)
    for _ in range(150):
        key = _random_key(rng, values.shape)
        got = array.read_host_tiles(key)
        np.testing.assert_array_equal(got, values[key], err_msg=str(key))
        assert got.shape == values[key].shape and got.dtype == values.dtype


def test_a_layout_xclay_does_not_read_is_read_by_zarr(tmp_path: Path) -> None:
    """An array of another tool's layout (gzip) opens, reads through zarr-python, and its
    variable says why the batch path cannot read it directly."""
    cube = random_cube((1, 2, 40, 40), seed=2)
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=20)
    values = cube["pixels"].values
    pixels = zarr.open_array(path / "pixels", mode="r")
    meta = pixels.metadata.to_dict()
    meta["codecs"] = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "gzip"}]
    other = zarr.create_array(
        tmp_path / "other.zarr", shape=pixels.shape, chunks=(1, 2, 20, 20), dtype=pixels.dtype,
        compressors=[zarr.codecs.GzipCodec()], fill_value=0,
    )  # fmt: skip
    other[:] = values
    with pytest.raises(UnsupportedLayout, match="gzip"):
        ArrayLayout.open(tmp_path / "other.zarr")
    array = StoreArray.open(xclay.storage.location(tmp_path / "other.zarr"))
    assert array.layout is None and "gzip" in array.unsupported
    with pytest.raises(UnsupportedLayout, match="gzip"):
        array.chunk_layout()
    np.testing.assert_array_equal(
        xr.Variable(("t", "b", "y", "x"), xr.core.indexing.LazilyIndexedArray(array)).values,
        values,
    )


def test_chunk_source_reads_the_layout_the_variable_carries(stored: Path) -> None:
    cube = xclay.open_datacube(stored)
    source = ChunkSource(*store_layouts(cube), nodata=None)
    windows = np.array([[0, 0, 0], [2, 64, 64], [1, 32, 0]])
    pixels = np.empty((3, 4, 32, 32), dtype=cube["pixels"].dtype)
    classes = np.empty((3, 32, 32), dtype="uint8")
    source.read(windows, pixels, classes)
    stored_pixels = zarr.open_array(stored / "pixels", mode="r")
    np.testing.assert_array_equal(pixels[0], stored_pixels[0, :, 0:32, 0:32])
    np.testing.assert_array_equal(pixels[2], stored_pixels[1, :, 32:64, 0:32])
    np.testing.assert_array_equal(classes[1, :6, :26], cube["quality"].values[2, 64:70, 64:90])


def test_the_old_module_paths_still_work_with_a_warning() -> None:
    from xclay.batch import chunkio
    from xclay.batch import gpu as old_gpu
    from xclay.datacube import chunks, gpuchunks

    with pytest.warns(DeprecationWarning, match="xclay.datacube.chunks.ArrayLayout"):
        assert chunkio.ArrayLayout is chunks.ArrayLayout
    with pytest.warns(DeprecationWarning, match="xclay.datacube.gpuchunks.KvikioChunkSource"):
        assert old_gpu.KvikioChunkSource is gpuchunks.KvikioChunkSource
    with pytest.raises(AttributeError):
        chunkio.no_such_name  # noqa: B018


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["pixels", "quality"])
def test_the_gpu_route_reads_what_zarr_reads(stored: Path, name: str) -> None:
    """On a CUDA GPU, the same selections through open_datacube(engine="kvikio"): whole
    chunks read by the batch path's kvikIO reader, cut on the device."""
    import cupy

    cube = xclay.open_datacube(stored, engine="kvikio")
    array = store_array(cube[name])
    assert array is not None and array.device == "cuda"
    values = np.asarray(zarr.open_array(stored / name, mode="r")[:])
    rng = random.Random(8)
    for _ in range(40):
        key = _random_key(rng, values.shape, steps=(None, 1, 2, 3))
        got = cube[name].variable[key].data
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_array_equal(got.get(), values[key], err_msg=str(key))
