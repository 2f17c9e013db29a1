"""Chips decoupled from storage: any chip size and stride on any chunking (stores written
for other chips, dask-backed cubes from odc-stac or rioxarray) gives exactly the embeddings
of the same cube in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS, random_cube
from xclay.models.rcf import RCFEncoder


def _embed(cube: xr.Dataset, card: dict | None = None, **kw: object) -> xr.Dataset:
    model = (
        RCFEncoder.from_card(card)
        if card is not None
        else xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    )
    return xclay.embed(cube, model=model, device="cpu", progress=False, batch_size=5, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cube() -> xr.Dataset:
    c = random_cube((1, 3, 200, 180), seed=9)
    c["pixels"].values[0, :, :50, :70] = 0  # a nodata corner: some chips skipped
    return c


@pytest.mark.parametrize("shard", [None, 2])
@pytest.mark.parametrize(
    ("chip", "stride", "edges"),
    [
        (16, None, "drop"),  # 16 chips a chunk
        (32, None, "pad"),  # 4 chips a chunk
        (48, None, "pad"),  # across chunks
        (64, None, "drop"),  # one chunk a chip (aligned)
        (96, None, "pad"),  # across chunks
        (128, None, "pad"),  # 4 chunks a chip
        (40, 24, "pad"),  # overlapping, across chunks
    ],
)
def test_any_chip_size_on_a_stored_cube_equals_the_cube_in_memory(
    tmp_path: Path, cube: xr.Dataset, shard: int | None, chip: int, stride: int | None, edges: str
) -> None:
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=64, shard_chips=shard)
    expected = _embed(cube, chip_size=chip, stride=stride, edges=edges)
    got = _embed(
        xclay.open_datacube(path),
        expected.attrs["model"],
        chip_size=chip,
        stride=stride,
        edges=edges,
    )
    assert got.attrs["data_path"]["reader"].startswith("chunk files")
    assert 0 < int(got["embedded"].sum()) < got["embedded"].size
    for name in ("embedding", "embedded", "nodata_fraction"):
        np.testing.assert_array_equal(got[name].values, expected[name].values, err_msg=name)


def test_chips_sharing_a_chunk_decode_it_once(
    tmp_path: Path, cube: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xclay.datacube.chunks as chunks_module

    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=64)
    decoded: list[tuple[str, int]] = []
    real = chunks_module.read_chunk

    def counting(layout, ref, out, decoder):  # type: ignore[no-untyped-def]
        decoded.append((ref.path, ref.offset))
        real(layout, ref, out, decoder)

    monkeypatch.setattr(chunks_module, "read_chunk", counting)
    emb = _embed(xclay.open_datacube(path), chip_size=16, edges="drop")
    assert emb.attrs["data_path"]["layout"] == "up to 16 chips a chunk, each chunk decoded once"
    # 3 x 2 whole chunks hold the 12 x 11 chips; the sampler reads some twice, no more.
    per_chunk = {key: decoded.count(key) for key in set(decoded)}
    assert len(per_chunk) == 3 * 3 and max(per_chunk.values()) <= 2


@pytest.mark.parametrize("cache_chunks", [1, 3])
def test_threads_sharing_a_small_chunk_cache_read_every_window_exactly(
    tmp_path: Path, cube: xr.Dataset, cache_chunks: int
) -> None:
    """Four threads read random windows through one reader whose cache holds 1 or 3
    chunks, so chunks are evicted, and their buffers reused, while other threads copy."""
    from concurrent.futures import ThreadPoolExecutor

    from xclay.batch.readers import store_layouts
    from xclay.datacube.chunks import DirectWindowReader

    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=64, compression="zstd")
    layout, _ = store_layouts(xclay.open_datacube(path))
    reader = DirectWindowReader(layout, pad_value=0, cache_bytes=cache_chunks * layout.chunk_nbytes)
    truth = cube["pixels"].values[0]
    windows = np.random.default_rng(3).integers(-20, 190, size=(3000, 2))

    def read(window: np.ndarray) -> bool:
        row, col = (int(v) for v in window)
        out = np.empty((truth.shape[0], 40, 40), truth.dtype)
        reader.read(0, row, col, 40, out)
        want = np.zeros_like(out)
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + 40, truth.shape[1]), min(col + 40, truth.shape[2])
        if r1 > r0 and c1 > c0:
            want[:, r0 - row : r1 - row, c0 - col : c1 - col] = truth[:, r0:r1, c0:c1]
        return bool(np.array_equal(out, want))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, windows))


def test_layouts_are_described_in_the_data_path(tmp_path: Path, cube: xr.Dataset) -> None:
    path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=64)
    opened = xclay.open_datacube(path)
    layouts = {
        chip: _embed(opened, chip_size=chip, edges="pad").attrs["data_path"]["layout"]
        for chip in (64, 128, 32, 48)
    }
    assert layouts[64] == "one chunk a chip" and layouts[128] == "4 chunks a chip"
    assert layouts[32].startswith("up to 4 chips a chunk")
    assert "across chunks" in layouts[48]


@pytest.mark.parametrize("chunks", [{"y": 64, "x": 64}, {"y": 128, "x": 45}])
def test_dask_backed_cubes_embed_at_any_chip_size(cube: xr.Dataset, chunks: dict) -> None:
    lazy = cube.chunk(chunks)
    expected = _embed(cube, chip_size=32, edges="pad")
    got = _embed(lazy, expected.attrs["model"], chip_size=32, edges="pad")
    assert got.attrs["data_path"]["reader"] == "xarray windows"
    np.testing.assert_array_equal(got["embedding"].values, expected["embedding"].values)


def test_odc_stac_and_rioxarray_cubes_embed_without_rewriting(olinda_tif: Path) -> None:
    pytest.importorskip("odc.stac", reason="needs xclay[io]")
    rioxarray = pytest.importorskip("rioxarray", reason="needs xclay[io]")
    import odc.stac

    from xclay.ingest import stac_item

    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS, id="olinda")
    loaded = odc.stac.load([item], bands=OLINDA_BANDS, chunks={"x": 2048, "y": 2048})
    stac_cube = xclay.as_datacube(loaded, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    tif_cube = xclay.as_datacube(
        rioxarray.open_rasterio(olinda_tif, chunks=128),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    in_memory = xclay.as_datacube(
        rioxarray.open_rasterio(olinda_tif).load(),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    for chip in (32, 64):
        expected = _embed(in_memory, chip_size=chip)
        for lazy in (stac_cube, tif_cube):
            got = _embed(lazy, expected.attrs["model"], chip_size=chip)
            np.testing.assert_array_equal(got["embedding"].values, expected["embedding"].values)
            assert int(got["embedded"].sum()) >= 20
