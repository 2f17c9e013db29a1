"""A datacube in a bucket is read as one on disk, only with its requests gathered: against a
real S3 server on 127.0.0.1 (moto's, tests/s3.py), through a proxy that logs each request
and, where a test asks, holds it for a while (as a distant store would).

The host reader fetches every chunk a batch needs at once (one round of requests; a
sharded store's indexes once, before), coalesces the ranges of a shard, checks and decodes
them as local ones, and names damage by URL; a remote cube is read so without being asked
and without a warning. The GPU reader's kvikIO ``RemoteFile`` reads run here on the CPU
stand-ins of tests/cuda_standins.py, whose ``RemoteFile`` makes the same HTTP requests."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("obstore", reason="needs xclay[cloud]")

import xclay
from tests import cuda_standins
from tests.datacube.test_chunks import WINDOWS  # the same windows, read from a bucket
from tests.helpers import random_cube
from tests.s3 import S3Server
from xclay.batch.batching import BatchPlan, Block, iter_batches
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.batch.engines import open_batch_source
from xclay.batch.readers import ChunkSource, store_layouts
from xclay.datacube import Compression, datacube_geobox
from xclay.devices import ThreadBudget
from xclay.errors import DataIntegrityError
from xclay.protocols import BatchSource
from xclay.quality import ChipQuality, QualityFilter
from xclay.storage import location

CHIP = 32


# --------------------------------------------------------------------------- the proxy


@dataclass
class Proxy:
    """A logging proxy in front of the S3 server: every request (method, path, Range
    header), the most of them in flight at once, and a delay held on each."""

    upstream: str
    delay: float = 0.0
    log: list[tuple[str, str, str]] = field(default_factory=list)
    most_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.log.append(
                (handler.command, handler.path.split("?")[0], handler.headers.get("Range", ""))
            )
            self._in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self._in_flight)
        try:
            time.sleep(self.delay)
            body = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
            target = urlparse(self.upstream)
            conn = http.client.HTTPConnection(str(target.hostname), target.port, timeout=60)
            headers = {k: v for k, v in handler.headers.items() if k.lower() != "host"}
            conn.request(handler.command, handler.path, body=body or None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            handler.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    handler.send_header(key, value)
            # A HEAD's length is the object's, not that of the (empty) body.
            head = handler.command == "HEAD"
            length = response.getheader("Content-Length") if head else None
            handler.send_header("Content-Length", length or str(len(data)))
            handler.end_headers()
            if handler.command != "HEAD":
                handler.wfile.write(data)
            conn.close()
        finally:
            with self._lock:
                self._in_flight -= 1

    def gets(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return [entry for entry in self.log if entry[0] == "GET"]

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self.most_in_flight = 0


@pytest.fixture
def proxy(s3: S3Server) -> Iterator[tuple[Proxy, str]]:
    """The proxy, and its endpoint (give it as the storage option ``endpoint``)."""
    state = Proxy(s3.endpoint)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.forward(self)

        do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256  # socketserver's 5 would hold back concurrent connections

    server = Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------- helpers


def _cube() -> xr.Dataset:
    cube = random_cube((2, 3, 96, 112), seed=5)
    rng = np.random.default_rng(5)
    classes = rng.integers(0, 6, size=(96, 112)).astype(np.uint8)
    return xclay.as_datacube(cube, quality=xr.DataArray(classes, dims=("y", "x")))


def _expected(values: np.ndarray, t: int, row: int, col: int, size: int, pad: float) -> np.ndarray:
    ny, nx = values.shape[-2:]
    out = np.full((*values.shape[1:-2], size, size), pad, dtype=values.dtype)
    r0, r1, c0, c1 = max(row, 0), min(row + size, ny), max(col, 0), min(col + size, nx)
    if r0 < r1 and c0 < c1:
        out[..., r0 - row : r1 - row, c0 - col : c1 - col] = values[t, ..., r0:r1, c0:c1]
    return out


def _batches(
    source: BatchSource, plan: BatchPlan, prefetch: int = 1
) -> list[tuple[np.ndarray, ...]]:
    quality = ChipQuality.empty(plan.block.shape, with_classes=source.has_quality)
    out: list[tuple[np.ndarray, ...]] = []
    for b in iter_batches(source, plan, quality, prefetch=prefetch):
        pixels = b.pixels.get() if hasattr(b.pixels, "get") else np.asarray(b.pixels)
        valid = b.valid.get() if hasattr(b.valid, "get") else np.asarray(b.valid)
        out.append((pixels.copy(), valid.copy(), b.index.copy()))
    return out


def _aligned(count: int, cols: int = 3) -> np.ndarray:
    return np.array([[0, (k // cols) * CHIP, (k % cols) * CHIP] for k in range(count)])


# --------------------------------------------------------------------------- host reads


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("shard", [None, 2])
def test_a_cube_in_a_bucket_reads_as_on_disk(
    s3: S3Server, tmp_path: Path, compression: Compression, shard: int | None
) -> None:
    cube = _cube()
    url = xclay.write_datacube(
        cube,
        f"s3://{s3.bucket()}/c.zarr",
        chip_size=CHIP,
        compression=compression,
        shard_chips=shard,
    )
    opened = xclay.open_datacube(url)
    # Chosen without being asked, and without a DataPathWarning (warnings are errors here).
    import torch

    choice = open_batch_source(
        opened,
        chip_size=CHIP,
        engine="auto",
        device=torch.device("cpu"),
        threads=ThreadBudget(cores=2, torch=1, decode=2, io=2),
    )
    source = choice.batches
    assert isinstance(source, ChunkSource) and choice.fallbacks == []
    assert source.name.startswith("chunk objects") and source.has_quality
    values, classes = cube["pixels"].values, cube["quality"].values
    for t in (0, 1):
        for row, col, size in WINDOWS:
            pixels = np.empty((2, 3, size, size), dtype=np.uint16)
            quality = np.empty((2, size, size), dtype=np.uint8)
            windows = np.array([[t, row, col], [t, row + 16, col]])
            source.read(windows, pixels, quality)
            for k, (_, r, c) in enumerate(windows.tolist()):
                np.testing.assert_array_equal(pixels[k], _expected(values, t, r, c, size, 0))
                np.testing.assert_array_equal(quality[k], _expected(classes, t, r, c, size, 1))
    choice.close()


def test_a_batch_is_one_round_of_requests_all_in_flight(
    s3: S3Server, proxy: tuple[Proxy, str]
) -> None:
    log, endpoint = proxy
    url = xclay.write_datacube(_cube(), f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP)
    opened = xclay.open_datacube(url, storage_options={"endpoint": endpoint})
    source = ChunkSource(*store_layouts(opened), nodata=0)  # one thread: no pool to hide in
    windows = _aligned(9)
    pixels = np.empty((9, 3, CHIP, CHIP), dtype=np.uint16)
    quality = np.empty((9, CHIP, CHIP), dtype=np.uint8)
    log.reset()
    log.delay = 0.3
    start = time.perf_counter()
    source.read(windows, pixels, quality)
    seconds = time.perf_counter() - start
    gets = log.gets()
    assert len(gets) == 18  # one whole-object GET per chunk, pixels and quality
    assert log.most_in_flight == 18 and seconds < 18 * 0.3 / 3, (log.most_in_flight, seconds)
    assert sum("/c.zarr/pixels/c/" in path for _, path, _ in gets) == 9
    np.testing.assert_array_equal(pixels[4], _cube()["pixels"].values[0, :, 32:64, 32:64])


def test_a_shard_index_is_fetched_once_and_its_ranges_coalesced(
    s3: S3Server, proxy: tuple[Proxy, str]
) -> None:
    log, endpoint = proxy
    url = xclay.write_datacube(
        _cube(), f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP, shard_chips=2, compression="zstd"
    )
    opened = xclay.open_datacube(url, storage_options={"endpoint": endpoint})
    source = ChunkSource(store_layouts(opened)[0], None, nodata=0, threads=2)
    pixels = np.empty((4, 3, CHIP, CHIP), dtype=np.uint16)
    windows = np.array([[0, 0, 0], [0, 0, 32], [0, 32, 0], [0, 32, 32]])  # one whole shard
    log.reset()
    source.read(windows, pixels, None)
    ranges = [r for _, _, r in log.gets()]
    index = [r for r in ranges if r.startswith("bytes=-")]
    assert len(index) == 1 and len(ranges) == 2  # the index, then its 4 chunks in one GET
    log.reset()
    more = np.array([[0, 32, 0], [1, 0, 0], [1, 0, 32]])  # shard (0, 0, 0, 0) again, and another
    source.read(more, pixels[:3], None)
    ranges = [r for _, _, r in log.gets()]
    assert sum(r.startswith("bytes=-") for r in ranges) == 1  # only the new shard's index
    values = _cube()["pixels"].values
    np.testing.assert_array_equal(pixels[2], values[1, :, 0:32, 32:64])


def test_a_batch_loop_reads_ahead(s3: S3Server, proxy: tuple[Proxy, str], tmp_path: Path) -> None:
    """The fill loop tells the reader its order: the next reads' chunks are fetched while
    a read decodes, each chunk once, and the batches are the ones read from disk."""
    log, endpoint = proxy
    cube = _cube()
    url = xclay.write_datacube(cube, f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP)
    local = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=CHIP)
    opened = xclay.open_datacube(url, storage_options={"endpoint": endpoint})
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=CHIP, edges="pad"))
    plan = BatchPlan(grid, Block.whole(2, grid), 4, QualityFilter(max_nodata=1.0))
    source = ChunkSource(*store_layouts(opened), nodata=0)
    log.reset()
    log.delay = 0.2
    got = _batches(source, plan, prefetch=0)  # reads in this thread: only reading ahead overlaps
    source.close()
    assert log.most_in_flight > 2 * 4, log.most_in_flight  # more than one read's chunks
    assert len(log.gets()) == 2 * 2 * 3 * 4  # every chunk of both arrays, once
    expected = _batches(ChunkSource(*store_layouts(xclay.open_datacube(local)), nodata=0), plan)
    assert len(got) == len(expected) == 6
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_reads_out_of_the_order_expected_are_read_all_the_same(s3: S3Server) -> None:
    cube = _cube()
    url = xclay.write_datacube(cube, f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP, shard_chips=2)
    source = ChunkSource(*store_layouts(xclay.open_datacube(url)), nodata=0, threads=2)
    order = _aligned(12, cols=4)
    source.expect(order)
    pixels = np.empty((4, 3, CHIP, CHIP), dtype=np.uint16)
    values = cube["pixels"].values
    for windows in (order[:4], order[6:10], order[4:8], np.array([[1, 7, 9]] * 4)):
        source.read(windows, pixels, None)
        for k, (t, r, c) in enumerate(windows.tolist()):
            np.testing.assert_array_equal(pixels[k], _expected(values, t, r, c, CHIP, 0))
    source.close()


def test_damage_in_a_bucket_is_named_by_its_url(s3: S3Server) -> None:
    bucket = s3.bucket()
    cube = _cube()
    url = xclay.write_datacube(cube, f"s3://{bucket}/c.zarr", chip_size=CHIP, compression="zstd")
    sharded = xclay.write_datacube(
        cube, f"s3://{bucket}/s.zarr", chip_size=CHIP, shard_chips=2, compression="zstd"
    )
    chunk = location(url) / "pixels" / "c" / "0" / "0" / "1" / "1"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    (location(url) / "pixels" / "c" / "1" / "0" / "0" / "2").remove()
    source = ChunkSource(*store_layouts(xclay.open_datacube(url)), nodata=0)
    out = np.empty((1, 3, CHIP, CHIP), dtype=np.uint16)
    with pytest.raises(DataIntegrityError, match=f"{chunk}: the chunk's checksum does not match"):
        source.read(np.array([[0, 32, 32]]), out, None)
    with pytest.raises(
        DataIntegrityError, match=rf"s3://{bucket}/c.zarr/pixels/c/1/0/0/2: chunk \(1, 0, 0, 2\) "
    ):
        source.read(np.array([[1, 0, 64]]), out, None)
    source.read(np.array([[0, 0, 0]]), out, None)  # the other chunks still read
    np.testing.assert_array_equal(out[0], cube["pixels"].values[0, :, :32, :32])

    shards = location(sharded) / "pixels" / "c"
    (shards / "0" / "0" / "1" / "0").remove()
    index = shards / "1" / "0" / "0" / "0"
    data = bytearray(index.read_bytes())
    data[-10] ^= 0xFF
    index.write_bytes(bytes(data))
    source = ChunkSource(*store_layouts(xclay.open_datacube(sharded)), nodata=0)
    with pytest.raises(DataIntegrityError, match=f"{index}: the shard index checksum"):
        source.read(np.array([[1, 0, 0]]), out, None)
    with pytest.raises(DataIntegrityError, match=rf"{shards}/0/0/1/0: chunk \(0, 0, 2, 0\) is"):
        source.read(np.array([[0, 64, 0]]), out, None)


def test_embedding_a_cube_in_a_bucket_reads_its_chunks(s3: S3Server, tmp_path: Path) -> None:
    cube = _cube()
    remote = xclay.write_datacube(cube, f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP)
    local = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=CHIP)

    def embed(where: Any) -> xr.Dataset:
        model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
        return xclay.embed(xclay.open_datacube(where), model=model, chip_size=CHIP, progress=False)

    a, b = embed(remote), embed(local)
    assert a.attrs["data_path"]["reader"].startswith("chunk objects")
    assert a.attrs["data_path"]["fallbacks"] == []
    np.testing.assert_array_equal(a["embedding"].values, b["embedding"].values)
    np.testing.assert_array_equal(a["nodata_fraction"].values, b["nodata_fraction"].values)


# --------------------------------------------------------------------------- GPU reads


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("shard", [None, 2])
def test_kvikio_reads_a_cube_in_a_bucket_with_remote_files(
    s3: S3Server,
    monkeypatch: pytest.MonkeyPatch,
    compression: Compression,
    shard: int | None,
) -> None:
    from xclay.datacube.gpuchunks import KvikioChunkSource

    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)  # kvikIO's only region variable
    cube = _cube()
    url = xclay.write_datacube(
        cube,
        f"s3://{s3.bucket()}/c.zarr",
        chip_size=CHIP,
        compression=compression,
        shard_chips=shard,
    )
    layouts = store_layouts(xclay.open_datacube(url))
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=CHIP, edges="pad"))
    plan = BatchPlan(grid, Block.whole(2, grid), 5, QualityFilter(max_nodata=1.0))
    host = ChunkSource(*layouts, nodata=0)
    expected = _batches(host, plan)
    installed = cuda_standins.install(monkeypatch)
    threads = ThreadBudget(cores=2, torch=1, decode=1, io=2)
    gpu = KvikioChunkSource(*layouts, chip_size=CHIP, nodata=0, threads=threads, host=host)
    assert not gpu.fallbacks  # no GPUDirect Storage complaint: it is not a local read
    got = _batches(gpu, plan)
    assert len(got) == len(expected) == 5
    for a, b in zip(got, expected, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    requests = installed.kvikio.requests
    assert requests and all(u.startswith(f"{s3.endpoint}/") for _, u, _ in requests)
    heads = [r for r in requests if r[0] == "HEAD"]
    gets = [r for r in requests if r[0] == "GET"]
    if shard:  # sizes from the shard indexes: no HEAD, one ranged GET per chunk
        assert not heads and len(gets) == 2 * 2 * 3 * 4  # 2 arrays, 2 times, 3 x 4 chips
    else:  # a chunk object's size is asked of the server
        assert len(heads) == len(gets) == 2 * 2 * 3 * 4
    assert installed.kvikio.closed == len(installed.kvikio.opened)


def test_kvikio_names_a_missing_chunk_object_by_its_url(
    s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xclay.datacube.gpuchunks import KvikioChunkSource

    url = xclay.write_datacube(_cube(), f"s3://{s3.bucket()}/c.zarr", chip_size=CHIP)
    layouts = store_layouts(xclay.open_datacube(url))
    (location(url) / "pixels" / "c" / "0" / "0" / "1" / "2").remove()
    host = ChunkSource(*layouts, nodata=0)
    cuda_standins.install(monkeypatch)
    threads = ThreadBudget(cores=2, torch=1, decode=1, io=2)
    gpu = KvikioChunkSource(layouts[0], None, chip_size=CHIP, nodata=0, threads=threads, host=host)
    import cupy

    pixels = cupy.empty((2, 3, CHIP, CHIP), dtype=cupy.uint16)
    with pytest.raises(DataIntegrityError, match=f"{url}/pixels/c/0/0/1/2: the chunk .* missing"):
        gpu.read(np.array([[0, 0, 0], [0, 32, 64]]), pixels, None)
