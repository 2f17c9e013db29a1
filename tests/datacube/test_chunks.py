"""Direct chunk reads (xclay.datacube.chunks) give exactly what zarr gives, for every layout xclay
writes, and step aside for layouts they do not know."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

import xclay
from tests.helpers import random_cube
from xclay.batch.readers import ChunkSource, store_layouts
from xclay.datacube import Compression
from xclay.datacube.chunks import ArrayLayout, DirectWindowReader, UnsupportedLayout, crc32c
from xclay.errors import DataIntegrityError

WINDOWS = [  # (row, col, size): aligned, several chunks, unaligned, past the edges, outside
    (0, 0, 32),
    (32, 64, 32),
    (0, 0, 64),
    (7, 13, 32),
    (-16, -16, 32),
    (80, 100, 32),
    (200, 200, 32),
]


def _expected(values: np.ndarray, t: int, row: int, col: int, size: int, pad: float) -> np.ndarray:
    ny, nx = values.shape[-2:]
    out = np.full((*values.shape[1:-2], size, size), pad, dtype=values.dtype)
    r0, r1, c0, c1 = max(row, 0), min(row + size, ny), max(col, 0), min(col + size, nx)
    if r0 < r1 and c0 < c1:
        out[..., r0 - row : r1 - row, c0 - col : c1 - col] = values[t, ..., r0:r1, c0:c1]
    return out


@pytest.fixture(scope="module")
def cube() -> xr.Dataset:
    c = random_cube((2, 3, 96, 112), seed=5)
    c["pixels"].values[1, :, 32:64, 32:64] = 0  # one chunk all nodata: zarr may not write it
    return c


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("shard", [None, 2])
def test_every_layout_reads_like_zarr(
    tmp_path: Path, cube: xr.Dataset, compression: Compression, shard: int | None
) -> None:
    path = xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=32, compression=compression, shard_chips=shard
    )
    layout = ArrayLayout.open(path / "pixels")
    assert layout.compressor == {"none": None, "zstd": "zstd", "lz4": "blosc"}[compression]
    assert layout.chunk_shape == (1, 3, 32, 32)
    assert (layout.shard_shape is not None) == (shard is not None)
    reader = DirectWindowReader(layout, pad_value=0)
    values = cube["pixels"].values
    for t in (0, 1):
        for row, col, size in WINDOWS:
            out = np.empty((3, size, size), dtype=values.dtype)
            reader.read(t, row, col, size, out)
            np.testing.assert_array_equal(out, _expected(values, t, row, col, size, 0))


def test_a_missing_chunk_is_damage_not_the_fill_value(tmp_path: Path, cube: xr.Dataset) -> None:
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32, compression="none")
    # Every chunk is written, the all-nodata one too (zarr would leave it out by default).
    assert (path / "pixels" / "c" / "1" / "0" / "1" / "1").is_file()
    (path / "pixels" / "c" / "0" / "0" / "1" / "2").unlink()
    out = np.empty((3, 32, 32), dtype=np.uint16)
    reader = DirectWindowReader(ArrayLayout.open(path / "pixels"), pad_value=0)
    with pytest.raises(DataIntegrityError, match=r"c/0/0/1/2: chunk \(0, 0, 1, 2\) is missing"):
        reader.read(0, 32, 64, 32, out)


def test_stores_that_leave_out_chunks_read_them_as_the_fill_value(tmp_path: Path) -> None:
    values = np.zeros((1, 2, 8, 8), dtype=np.uint16)
    values[0, :, :4, :4] = 7
    array = zarr.create_array(
        tmp_path / "z.zarr", shape=values.shape, chunks=(1, 2, 4, 4), dtype="uint16",
        fill_value=0,
    )  # fmt: skip
    array[:] = values  # zarr writes only the chunk that is not all fill value
    layout = ArrayLayout.open(tmp_path / "z.zarr")
    assert not layout.every_chunk_written and not layout.checksum
    out = np.empty((2, 8, 8), dtype=np.uint16)
    DirectWindowReader(layout, pad_value=0).read(0, 0, 0, 8, out)
    np.testing.assert_array_equal(out, values[0])


def test_corrupt_and_truncated_files_are_errors_not_garbage(
    tmp_path: Path, cube: xr.Dataset
) -> None:
    sharded = xclay.write_datacube(cube, tmp_path / "s.zarr", chip_size=32, shard_chips=2)
    shard = sharded / "pixels" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index
    shard.write_bytes(bytes(data))
    out = np.empty((3, 32, 32), dtype=np.uint16)
    with pytest.raises(DataIntegrityError, match="shard index checksum does not match"):
        DirectWindowReader(ArrayLayout.open(sharded / "pixels"), pad_value=0).read(0, 0, 0, 32, out)
    plain = xclay.write_datacube(cube, tmp_path / "p.zarr", chip_size=32, compression="none")
    chunk = plain / "pixels" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(DataIntegrityError, match="chunk cut short"):
        DirectWindowReader(ArrayLayout.open(plain / "pixels"), pad_value=0).read(0, 0, 0, 32, out)


def test_quality_classes_read_directly(tmp_path: Path) -> None:
    c = random_cube((1, 2, 64, 64))
    q = xr.DataArray(
        np.random.default_rng(0).integers(0, 6, (64, 64), dtype=np.uint8), dims=("y", "x")
    )
    cube = xclay.as_datacube(c, quality=q)
    opened = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "q.zarr", chip_size=32))
    source = ChunkSource(*store_layouts(opened), nodata=0)
    pixels = np.empty((1, 2, 32, 32), dtype=np.uint16)
    classes = np.empty((1, 32, 32), dtype=np.uint8)
    source.read(np.array([[0, -8, 40]]), pixels, classes)
    expected = np.full((32, 32), 1, dtype=np.uint8)  # outside the raster: class nodata
    expected[8:, :24] = q.values[0:24, 40:64]
    np.testing.assert_array_equal(classes[0], expected)


def test_big_endian_chunks_are_swapped(tmp_path: Path) -> None:
    from zarr.codecs import BytesCodec

    values = np.arange(2 * 3 * 8 * 8, dtype=np.uint16).reshape(2, 3, 8, 8)
    array = zarr.create_array(
        tmp_path / "be.zarr", shape=values.shape, chunks=(1, 3, 4, 4), dtype="uint16",
        serializer=BytesCodec(endian="big"), compressors=None, fill_value=0,
    )  # fmt: skip
    array[:] = values
    layout = ArrayLayout.open(tmp_path / "be.zarr")
    assert layout.dtype.byteorder == ">"
    out = np.empty((3, 8, 8), dtype=np.uint16)
    DirectWindowReader(layout, pad_value=0).read(1, 0, 0, 8, out)
    np.testing.assert_array_equal(out, values[1])


def test_unknown_layouts_step_aside(tmp_path: Path) -> None:
    from zarr.codecs import GzipCodec

    array = zarr.create_array(
        tmp_path / "g.zarr", shape=(1, 2, 8, 8), chunks=(1, 2, 4, 4), dtype="uint16",
        compressors=[GzipCodec()], fill_value=0,
    )  # fmt: skip
    array[:] = 1
    with pytest.raises(UnsupportedLayout, match="gzip"):
        ArrayLayout.open(tmp_path / "g.zarr")
    with pytest.raises(UnsupportedLayout, match=r"no readable zarr\.json"):
        ArrayLayout.open(tmp_path / "missing.zarr")


def test_selections_are_not_read_from_the_store(tmp_path: Path, cube: xr.Dataset) -> None:
    opened = xclay.open_datacube(xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=32))
    assert store_layouts(opened)[0].shape == (2, 3, 96, 112)
    # The store's chunk order is not a reordered variable's; a crop is not the store's grid.
    for selection in (opened.isel(band=[2, 0, 1]), opened.isel(x=slice(32, None))):
        with pytest.raises(UnsupportedLayout, match="not read unchanged"):
            store_layouts(selection)


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("shard", [None, 2])
def test_a_flipped_byte_in_any_chunk_is_caught(
    tmp_path: Path, cube: xr.Dataset, compression: Compression, shard: int | None
) -> None:
    from xclay.datacube.chunks import ChunkLocator

    path = xclay.write_datacube(
        cube, tmp_path / "c.zarr", chip_size=32, compression=compression, shard_chips=shard
    )
    layout = ArrayLayout.open(path / "pixels")
    assert layout.checksum and layout.every_chunk_written
    ref = ChunkLocator(layout).find((1, 0, 2, 1))
    assert ref is not None
    data = bytearray(Path(ref.path).read_bytes())
    start = ref.offset
    size = ref.nbytes if ref.nbytes is not None else len(data)
    data[start + size // 2] ^= 0x01  # one bit, in the middle of the chunk's bytes
    Path(ref.path).write_bytes(bytes(data))
    out = np.empty((3, 32, 32), dtype=np.uint16)
    reader = DirectWindowReader(layout, pad_value=0)
    with pytest.raises(DataIntegrityError, match="checksum does not match"):
        reader.read(1, 64, 32, 32, out)
    reader.read(1, 0, 0, 32, out)  # the other chunks still read
    np.testing.assert_array_equal(out, cube["pixels"].values[1, :, :32, :32])


def test_crc32c_is_castagnolis() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    data = np.random.default_rng(0).integers(0, 256, 100_003, dtype=np.uint8)
    import google_crc32c

    assert crc32c(data) == google_crc32c.value(data.tobytes())
    assert crc32c(memoryview(data.tobytes())[5:]) == google_crc32c.value(data.tobytes()[5:])
