"""Reading a datacube from object storage: chips/s from a local S3 server behind a proxy
that adds latency to every request, xclay's reader against the raw GETs and zarr-python.

The benchmark starts moto's S3 server (``ThreadedMotoServer``, in a process of its own)
and, for each latency (``--latency``, default 0, 20 and 50 ms), a proxy in front of it
(a threaded HTTP proxy, in a process of its own, that holds each request that long before
forwarding it; it stops when the benchmark does, or after ``--lifetime`` seconds). A zstd
datacube of the demo composite (``--size`` px, 10 bands of uint16, one chunk a chip of
``--chip`` px) is written to a bucket, then read whole through the proxy by:

- ``xclay``: the batch path of an embedding run (:func:`xclay.batch.engines.open_batch_source`
  picks the reader, :func:`xclay.batch.batching.iter_batches` fills batches of
  ``--batch-size`` chips with validity and nodata fractions, one batch read ahead): every
  chunk a batch needs fetched at once (up to 64 requests in flight), checked (crc32c) and
  decoded into the batch buffer;
- ``raw ceiling``: the same objects and byte ranges (a sharded cube: each shard's index,
  then its chunks in one coalesced request), ``--max-in-flight`` GETs in flight at any
  time over the whole cube, with nothing else: no batches, no checks, no decoding;
- ``zarr-python obstore``: zarr-python 3 over its ``ObjectStore`` (obstore's ``S3Store``),
  bulk reads of whole chunks (``array[t, :, rows, :]``, a strip of chunk rows holding about
  a batch of chips), at zarr's default concurrency (``async.concurrency``);
- ``zarr-python fsspec``: the same through ``FsspecStore`` over s3fs (skipped, with the
  reason, where s3fs is not installed);
- ``xarray windows``: ``xr.open_zarr`` (dask-backed, its default) and one
  ``pixels[t, :, y0:y1, x0:x1].values`` per chip, one after another, as chip loops are
  written today; at most ``--window-seconds`` of it.

moto serves a few hundred requests a second (Python, one process: ~330 GETs/s of 100 KB
here), which caps every reader that keeps enough requests in flight; the results say how
many requests each reader made, the CPU time the reading process spent a chip (all its
threads; moto and the proxy run in processes of their own) and the server's own rate
(``server``), so a reader held to the server's pace shows as such. The readers' passes are
interleaved (the machine is shared), the median of ``--repeats`` each. ``--endpoint`` reads from another S3 server (MinIO, a
bucket) instead, with the keys of the environment.

``--run`` also times the end-to-end run (``xclay run``: the real Landsat 7 scene of
../shared/data, rcf): its inputs (STAC items and the GeoTIFF) and outputs on the S3 server
(directly, and behind a 20 ms proxy), against the same run on local disk.

    python benchmarks/object_store.py                 # 0, 20 and 50 ms; every reader
    python benchmarks/object_store.py --run           # and the end-to-end run
    python benchmarks/object_store.py --smoke         # seconds: 256 px, 20 ms
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

HERE = Path(__file__).resolve().parent
KEYS = {
    "AWS_ACCESS_KEY_ID": "xclay-bench",
    "AWS_SECRET_ACCESS_KEY": "xclay-bench-secret",
    "AWS_REGION": "us-east-1",
}
BUCKET = "xclay-bench"
STATS = "/__xclay_proxy__"  # the proxy's own path: its request count, and a reset


# --------------------------------------------------------------------------- servers


def _serve(argv: list[str]) -> None:
    """``--serve moto LIFETIME`` or ``--serve proxy UPSTREAM LATENCY_MS LIFETIME``: run a
    server, print its port, and stop when stdin closes or the lifetime is over."""
    kind, *rest = argv
    lifetime = float(rest[-1])

    def watchdog() -> None:
        with contextlib.suppress(Exception):
            sys.stdin.read()  # returns when the benchmark closes the pipe (or dies)
        os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    threading.Timer(lifetime, lambda: os._exit(3)).start()
    if kind == "moto":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        server.start()
        print(server.get_host_and_port()[1], flush=True)
        threading.Event().wait()
    upstream, latency_ms = rest[0], float(rest[1])
    proxy = _proxy(upstream, latency_ms / 1000.0)
    print(proxy.server_address[1], flush=True)
    proxy.serve_forever()


def _proxy(upstream: str, delay: float) -> ThreadingHTTPServer:
    """A threaded HTTP proxy: each request held ``delay`` seconds, then forwarded over a
    kept-alive connection of its thread; ``GET /__xclay_proxy__`` answers the requests
    counted since the last ``DELETE`` of it."""
    target = urlparse(upstream)
    local = threading.local()
    counted = {"requests": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == STATS:
                self._stats()
                return
            with lock:
                counted["requests"] += 1
            time.sleep(delay)
            body = self._body()
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in ("host", "transfer-encoding", "content-length")
            }
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            for attempt in (0, 1):  # a kept-alive connection the server closed: once more
                conn = getattr(local, "conn", None)
                if conn is None:
                    conn = local.conn = http.client.HTTPConnection(
                        str(target.hostname), target.port, timeout=120
                    )
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    break
                except (ConnectionError, http.client.HTTPException):
                    conn.close()
                    local.conn = None
                    if attempt:
                        raise
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(key, value)
            # A HEAD's length is the object's, not that of the (empty) body.
            length = response.getheader("Content-Length") if self.command == "HEAD" else None
            self.send_header("Content-Length", length or str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_HEAD = do_PUT = do_POST = do_GET

        def do_DELETE(self) -> None:
            if self.path == STATS:
                with lock:
                    counted["requests"] = 0
                self._stats()
                return
            self.do_GET()

        def _body(self) -> bytes:
            """The request's body, sent with a length or in chunks (forwarded with a length)."""
            if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()  # the CRLF after each chunk

        def _stats(self) -> None:
            with lock:
                data = json.dumps(counted).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # socketserver's 5 would turn bursts away

    return Server(("127.0.0.1", 0), Handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The cores the servers (moto and the proxy) run on when --server-cores is given: the
# reader runs on the others, as a reader of a real bucket does not share its cores with it.
SERVER_CORES: set[int] = set()


@contextlib.contextmanager
def _process(*argv: str, lifetime: float) -> Iterator[str]:
    """A server of :func:`_serve` in a process of its own; its endpoint."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", *argv, str(lifetime)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    if SERVER_CORES:
        os.sched_setaffinity(proc.pid, SERVER_CORES)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if not line:
            raise SystemExit(f"the {argv[0]} server did not start (exit {proc.wait()})")
        endpoint = f"http://127.0.0.1:{line}"
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=5).close()
                break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        yield endpoint
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _proxy_requests(endpoint: str, reset: bool = False) -> int:
    request = urllib.request.Request(endpoint + STATS, method="DELETE" if reset else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read())["requests"])


# --------------------------------------------------------------------------- readers


def _chips(shape: tuple[int, ...], chip: int) -> list[tuple[int, int, int]]:
    t, _, ny, nx = shape
    return [(ti, r, c) for ti in range(t) for r in range(0, ny, chip) for c in range(0, nx, chip)]


def _xclay(url: str, endpoint: str, args: Any) -> Callable[[], dict[str, Any]]:
    import torch

    import xclay
    from xclay.batch.batching import BatchPlan, Block, iter_batches
    from xclay.batch.chips import ChipGrid, ChipGridSpec
    from xclay.batch.engines import open_batch_source
    from xclay.datacube import datacube_geobox
    from xclay.devices import ThreadBudget
    from xclay.quality import ChipQuality, QualityFilter

    # Opened once, as a run opens its cube once for all its chips; each pass makes its
    # reader anew (shard indexes are not carried over).
    cube = xclay.open_datacube(url, storage_options={"endpoint": endpoint})
    cpu = torch.device("cpu")
    budget = ThreadBudget.for_device(cpu)
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=args.chip))
    plan = BatchPlan(
        grid,
        Block.whole(cube.sizes["time"], grid),
        args.batch_size,
        QualityFilter(max_nodata=1.0),
    )

    def run() -> dict[str, Any]:
        choice = open_batch_source(
            cube, chip_size=args.chip, engine="zarr", device=cpu, threads=budget
        )
        quality = ChipQuality.empty(plan.block.shape, with_classes=False)
        chips = 0
        for batch in iter_batches(choice.batches, plan, quality, prefetch=2):
            chips += len(batch.index)
        choice.close()
        return {"chips": chips, "reader": choice.batches.name, "fallbacks": choice.fallbacks}

    return run


def _obstore(endpoint: str, prefix: str = "") -> Any:
    from obstore.store import S3Store

    return S3Store(
        BUCKET,
        prefix=prefix or None,
        config={
            "endpoint": endpoint,
            "access_key_id": KEYS["AWS_ACCESS_KEY_ID"],
            "secret_access_key": KEYS["AWS_SECRET_ACCESS_KEY"],
            "region": KEYS["AWS_REGION"],
        },
        client_options={"allow_http": True},
    )


def _raw(url: str, endpoint: str, args: Any) -> Callable[[], dict[str, Any]]:
    """The same objects and ranges as the reader, ``max_in_flight`` GETs at any time."""
    import numpy as np
    import obstore

    from xclay.datacube.chunks import ArrayLayout, ChunkLocator

    layout = ArrayLayout.open(url + "/pixels")
    key = url.split(f"s3://{BUCKET}/", 1)[1] + "/pixels"
    grid = [(t, 0, r // args.chip, c // args.chip) for t, r, c in _chips(layout.shape, args.chip)]
    by_shard: dict[str, list[tuple[int, int]]] = {}
    index_nbytes = 0
    if layout.shard_shape is not None:
        locator = ChunkLocator(layout)
        for ref in locator.find_many(grid):
            assert ref is not None
            name = key + "/" + ref.path.rsplit("/pixels/", 1)[1]
            by_shard.setdefault(name, []).append((ref.offset, int(ref.nbytes or 0)))
        per_shard = np.prod(
            [s // c for s, c in zip(layout.shard_shape, layout.chunk_shape, strict=True)]
        )
        index_nbytes = int(per_shard) * 16 + 4
    names = [f"{key}/{layout.key(g)}" for g in grid]

    def run() -> dict[str, Any]:
        store = _obstore(endpoint)

        async def fetch() -> int:
            gate = asyncio.Semaphore(args.max_in_flight)
            total = 0

            async def whole(name: str) -> None:
                nonlocal total
                async with gate:
                    result = await obstore.get_async(store, name)
                    data = await result.bytes_async()
                total += len(data)  # after the awaits: `total += await ...` loses updates

            async def shard(name: str, ranges: list[tuple[int, int]]) -> None:
                nonlocal total
                async with gate:
                    result = await obstore.get_async(
                        store, name, options={"range": {"suffix": index_nbytes}}
                    )
                    index = await result.bytes_async()
                total += len(index)
                async with gate:
                    parts = await obstore.get_ranges_async(
                        store,
                        name,
                        starts=[o for o, _ in ranges],
                        lengths=[n for _, n in ranges],
                    )
                total += sum(len(p) for p in parts)

            if by_shard:
                await asyncio.gather(*(shard(n, r) for n, r in by_shard.items()))
            else:
                await asyncio.gather(*(whole(n) for n in names))
            return total

        nbytes = asyncio.run(fetch())
        return {"chips": len(grid), "bytes": nbytes}

    return run


def _zarr_bulk(url: str, store: Any, args: Any) -> Callable[[], dict[str, Any]]:
    """Whole chunks in bulk: strips of chunk rows of about a batch of chips each."""
    import zarr

    array = zarr.open_array(store, path="pixels", mode="r", zarr_format=3)  # opened once

    def run() -> dict[str, Any]:
        t, _, ny, nx = array.shape
        per_row = -(-nx // args.chip)
        rows = max(1, args.batch_size // per_row) * args.chip
        chips = 0
        for ti in range(t):
            for r in range(0, ny, rows):
                block = array[ti, :, r : r + rows, :]
                chips += -(-block.shape[-2] // args.chip) * per_row
        return {"chips": chips, "concurrency": zarr.config.get("async.concurrency")}

    return run


def _xarray_windows(store: Any, args: Any) -> Callable[[], dict[str, Any]]:
    import xarray as xr

    ds = xr.open_zarr(store, consolidated=False, zarr_format=3)  # opened once
    pixels = ds["pixels"]
    kind = type(store).__name__

    def run() -> dict[str, Any]:
        start, chips = time.perf_counter(), 0
        for t, r, c in _chips(pixels.shape, args.chip):
            _ = pixels[t, :, r : r + args.chip, c : c + args.chip].values
            chips += 1
            if time.perf_counter() - start > args.window_seconds and chips >= 3:
                break
        return {"chips": chips, "dask": pixels.chunks is not None, "store": kind}

    return run


def _s3fs_store(endpoint: str, path: str) -> Any:
    """zarr's FsspecStore over s3fs, or the reason there is none."""
    try:
        import s3fs  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as err:
        return f"s3fs is not installed ({err}): pip install s3fs (xclay[dev] has it)"
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(
        f"s3://{BUCKET}/{path}",
        read_only=True,
        storage_options={
            "endpoint_url": endpoint,
            "key": KEYS["AWS_ACCESS_KEY_ID"],
            "secret": KEYS["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"region_name": KEYS["AWS_REGION"]},
            "asynchronous": True,
        },
    )


def _variants(
    url: str, path: str, proxy: str, args: Any
) -> dict[str, Callable[[], Callable[[], dict[str, Any]] | str]]:
    """Each reader's setup (opening what it reads), which returns its timed pass or the
    reason it cannot run."""
    from zarr.storage import ObjectStore

    def zarr_store() -> Any:
        return ObjectStore(_obstore(proxy, path), read_only=True)

    def fsspec() -> Callable[[], dict[str, Any]] | str:
        store = _s3fs_store(proxy, path)
        return store if isinstance(store, str) else _zarr_bulk(url, store, args)

    return {
        "xclay": lambda: _xclay(url, proxy, args),
        "raw ceiling": lambda: _raw(url, proxy, args),
        "zarr-python obstore": lambda: _zarr_bulk(url, zarr_store(), args),
        "zarr-python fsspec": fsspec,
        "xarray windows": lambda: _xarray_windows(_xarray_store(proxy, path), args),
    }


def _xarray_store(proxy: str, path: str) -> Any:
    """What users hand ``xr.open_zarr``: the URL with fsspec's storage options (s3fs), or,
    where s3fs is not installed, zarr's ObjectStore."""
    try:
        import s3fs  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        from zarr.storage import ObjectStore

        return ObjectStore(_obstore(proxy, path), read_only=True)
    return _s3fs_store(proxy, path)


# --------------------------------------------------------------------------- measuring


def _measure(
    runs: dict[str, Callable[[], dict[str, Any]]], endpoint: str, repeats: int, warm_up: bool
) -> dict[str, dict[str, Any]]:
    """Each reader's passes, interleaved (A, B, C, A, B, C, ...: the shared machine's pace
    drifts by the minute), after a warm-up pass of each; the median pass of each."""
    if warm_up:
        for fn in runs.values():
            fn()  # imports, connections, thread pools
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    requests: dict[str, list[int]] = {name: [] for name in runs}
    info: dict[str, dict[str, Any]] = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            _proxy_requests(endpoint, reset=True)
            start, start_cpu = time.perf_counter(), time.process_time()
            info[name] = fn()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)  # this process, all threads
            requests[name].append(_proxy_requests(endpoint))
    out = {}
    for name in runs:
        order = sorted(range(repeats), key=lambda i: times[name][i])
        mid = order[len(order) // 2]
        seconds, count = times[name][mid], requests[name][mid]
        out[name] = {
            "chips_per_s": round(info[name]["chips"] / seconds, 1),
            "seconds": round(seconds, 4),
            "seconds_all": [round(t, 4) for t in times[name]],
            "requests": count,
            "requests_per_s": round(count / seconds, 1),
            "client_cpu_ms_per_chip": round(
                1000 * sorted(cpu[name])[len(cpu[name]) // 2] / info[name]["chips"], 3
            ),
            **info[name],
        }
    return out


def _server_rate(endpoint: str, url: str, args: Any) -> dict[str, Any]:
    """The S3 server's own pace: every chunk object of the cube fetched straight from it
    (no proxy), ``max_in_flight`` at a time."""
    run = _raw(url, endpoint, args)
    run()
    start = time.perf_counter()
    info = run()
    seconds = time.perf_counter() - start
    return {
        "chips_per_s": round(info["chips"] / seconds, 1),
        "mb_per_s": round(info["bytes"] / seconds / 1e6, 1),
        "bytes": info["bytes"],
    }


def _goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for latency in sorted({r["latency_ms"] for r in rows}):
        at = {r["variant"]: r for r in rows if r["latency_ms"] == latency and "chips_per_s" in r}
        if "xclay" not in at:
            continue
        x = at["xclay"]["chips_per_s"]
        zarr_best = max(
            (r["chips_per_s"] for v, r in at.items() if v.startswith("zarr-python")), default=None
        )
        goal: dict[str, Any] = {}
        if "raw ceiling" in at:
            goal["of_raw_ceiling"] = round(x / at["raw ceiling"]["chips_per_s"], 3)
        if zarr_best:
            goal["vs_best_zarr_python"] = round(x / zarr_best, 3)
        if "xarray windows" in at:
            goal["vs_xarray_windows"] = round(x / at["xarray windows"]["chips_per_s"], 2)
        out[str(latency)] = goal
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'latency':>8}  {'variant':<22}{'chips/s':>9}{'requests':>9}{'req/s':>8}"
        f"{'cpu ms/chip':>12}"
    ]
    for r in rows:
        if "chips_per_s" not in r:
            lines.append(
                f"{r['latency_ms']:>6} ms  {r['variant']:<22}  skipped: {r['skipped'][:60]}"
            )
            continue
        lines.append(
            f"{r['latency_ms']:>6} ms  {r['variant']:<22}{r['chips_per_s']:>9.1f}"
            f"{r['requests']:>9}{r['requests_per_s']:>8.0f}{r['client_cpu_ms_per_chip']:>12.2f}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- end to end


def _end_to_end(args: Any, server: str, lifetime: float) -> dict[str, Any]:
    """``xclay run`` of the Landsat 7 scene with rcf: on local disk, then with its items,
    GeoTIFF and outputs in a bucket (directly, and behind a 20 ms proxy)."""
    import pystac
    import yaml

    import xclay
    from xclay.ingest.items import stac_item
    from xclay.storage import location

    tif = HERE.parent.parent / "shared" / "data" / "landsat7-olinda" / "L7_ETMs.tif"
    if not tif.is_file():
        return {"skipped": f"needs the Landsat 7 scene at {tif}"}
    bands = ["blue", "green", "red", "nir08", "swir16", "swir22"]
    out: dict[str, Any] = {"scene": str(tif.name), "model": "rcf", "rows": []}
    with tempfile.TemporaryDirectory(prefix="xclay-e2e-") as tmp:
        folder = Path(tmp)
        wavelengths = [0.483, 0.560, 0.662, 0.835, 1.648, 2.206]  # ETM+ 1, 2, 3, 4, 5, 7
        item = stac_item(tif, bands=bands, wavelengths=wavelengths, id="olinda")
        items = folder / "items.json"
        pystac.ItemCollection([item]).save_object(dest_href=str(items))
        remote_items = f"s3://{BUCKET}/e2e/items.json"
        location(f"s3://{BUCKET}/e2e/L7_ETMs.tif").upload(tif)
        remote = json.loads(items.read_text())
        for feature in remote["features"]:
            for asset in feature["assets"].values():
                asset["href"] = f"s3://{BUCKET}/e2e/L7_ETMs.tif"
        location(remote_items).write_text(json.dumps(remote))

        def spec(name: str, items_at: str, outdir: str) -> Path:
            data = {
                "name": name,
                "input": {"stac": {"items": items_at}, "bands": bands},
                "grid": {"resolution": 28.5, "chip_size": args.run_chip, "edges": "pad"},
                "model": {"name": "rcf", "options": {"num_filters": 64, "sample_chips": 16}},
                "compute": {"region_chips": args.run_region_chips, "batch_size": 16},
                "outputs": {"dir": outdir},
            }
            path = folder / f"{name}.yaml"
            path.write_text(yaml.safe_dump(data))
            return path

        def run(label: str, items_at: str, outdir: str, endpoint: str) -> dict[str, Any]:
            env = {**os.environ, **KEYS, "AWS_ENDPOINT_URL": endpoint}
            path = spec(label.replace(" ", "-"), items_at, outdir)
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "xclay.cli", "run", str(path), "--no-progress"],
                capture_output=True,
                text=True,
                env=env,
                cwd=folder,
                timeout=lifetime,
            )
            seconds = time.perf_counter() - start
            row: dict[str, Any] = {"where": label, "seconds": round(seconds, 2)}
            if done.returncode != 0:
                row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
            phases = re.search(r"ingest ([\d.]+) s, embed ([\d.]+) s", done.stdout)
            if phases:
                row["ingest_s"], row["embed_s"] = float(phases[1]), float(phases[2])
            reader = re.search(r"data path\s+(.+)", done.stdout)
            if reader:
                row["data_path"] = reader[1].strip()
            print(f"end to end, {label}: {seconds:.1f} s {row.get('error', '')}", flush=True)
            return row

        out["rows"].append(run("local disk", str(items), str(folder / "local"), server))
        out["rows"].append(run("S3, 0 ms", remote_items, f"s3://{BUCKET}/e2e/out0", server))
        with _process("proxy", server, "20", lifetime=lifetime) as proxy:
            _proxy_requests(proxy, reset=True)
            row = run("S3, 20 ms", remote_items, f"s3://{BUCKET}/e2e/out20", proxy)
            row["requests"] = _proxy_requests(proxy)  # every request of the run, all phases
            out["rows"].append(row)
        if all("error" not in r for r in out["rows"]):
            a = xclay.open_embeddings(folder / "local" / "embeddings.zarr")
            for outdir in ("out0", "out20"):
                b = xclay.open_embeddings(f"s3://{BUCKET}/e2e/{outdir}/embeddings.zarr")
                assert (a["embedding"].values == b["embedding"].values).all(), outdir
            out["same_embeddings"] = True
    return out


# --------------------------------------------------------------------------- main

VARIANTS = ["xclay", "raw ceiling", "zarr-python obstore", "zarr-python fsspec", "xarray windows"]


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        _serve(sys.argv[2:])
        return
    sys.path.insert(0, str(HERE))
    from _common import SKIPPED, parse, save

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=4096, help="demo cube edge in pixels")
    p.add_argument("--chip", type=int, default=128, help="chip (and chunk) edge in pixels")
    p.add_argument("--shard", type=int, default=0, help="chips a shard edge (0: unsharded)")
    p.add_argument("--latency", type=float, nargs="+", default=[0, 20, 50], help="ms a request")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-in-flight", type=int, default=64, help="the raw ceiling's GETs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window-seconds", type=float, default=20.0, help="xarray windows' budget")
    p.add_argument("--endpoint", default="", help="an S3 server to use instead of moto's")
    p.add_argument("--lifetime", type=float, default=3600.0, help="servers stop after it (s)")
    p.add_argument("--run", action="store_true", help="also the end-to-end run")
    p.add_argument("--run-chip", type=int, default=32, help="the end-to-end run's chip size")
    p.add_argument("--run-region-chips", type=int, default=4, help="its regions' edge in chips")
    p.add_argument(
        "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="which readers"
    )
    p.add_argument("--tag", default="", help="added to the result file's name")
    p.add_argument(
        "--server-cores",
        type=int,
        default=0,
        help="run moto and the proxy on this many cores and the readers on the others "
        "(0: all share every core)",
    )
    args = parse(
        p,
        {"size": 256, "chip": 64, "latency": [20], "repeats": 1, "window_seconds": 0.5,
         "batch_size": 16, "lifetime": 300.0},
    )  # fmt: skip
    try:
        import obstore  # noqa: F401

        if not args.endpoint:
            import moto.server  # noqa: F401
    except ImportError as err:
        print(f"skipped: needs obstore and moto[server] (xclay[dev]): {err}", flush=True)
        raise SystemExit(SKIPPED) from err
    os.environ.update(KEYS)
    cores = sorted(os.sched_getaffinity(0))
    if args.server_cores:
        if args.server_cores >= len(cores):
            raise SystemExit(f"--server-cores {args.server_cores}: this machine has {len(cores)}")
        SERVER_CORES.update(cores[: args.server_cores])
        os.sched_setaffinity(0, set(cores[args.server_cores :]))  # the readers' cores

    import xclay
    from xclay.storage import location

    with contextlib.ExitStack() as stack:
        server = args.endpoint or stack.enter_context(_process("moto", lifetime=args.lifetime))
        os.environ["AWS_ENDPOINT_URL"] = server
        with contextlib.suppress(Exception):
            urllib.request.urlopen(
                urllib.request.Request(f"{server}/{BUCKET}", method="PUT"), timeout=30
            ).close()
        cube = xclay.datasets.demo_composite(args.size)
        path = f"cube-{args.size}-{args.chip}-{args.shard}.zarr"
        url = f"s3://{BUCKET}/{path}"
        if not location(url).is_dir():
            xclay.write_datacube(
                cube,
                url,
                chip_size=args.chip,
                compression="zstd",
                shard_chips=args.shard or None,
            )
        stored = sum(n for _, n in (location(url) / "pixels").files())
        server_rate = _server_rate(server, url, args)
        print(f"server, straight: {server_rate}", flush=True)
        rows: list[dict[str, Any]] = []
        for latency in [int(x) if float(x).is_integer() else x for x in args.latency]:
            with _process("proxy", server, str(latency), lifetime=args.lifetime) as proxy:
                setups = _variants(url, path, proxy, args)
                made = {name: setups[name]() for name in args.variants}  # opened: not timed
                runs = {n: fn for n, fn in made.items() if not isinstance(fn, str)}
                windows = runs.pop("xarray windows", None)  # one pass, timed by its chips
                measured = _measure(runs, proxy, args.repeats, warm_up=True)
                if windows is not None:
                    measured.update(_measure({"xarray windows": windows}, proxy, 1, False))
                for name, fn in made.items():
                    row: dict[str, Any] = {"latency_ms": latency, "variant": name}
                    if isinstance(fn, str):
                        row["skipped"] = fn
                    else:
                        row.update(measured[name])
                    rows.append(row)
                    print(_table([row]).splitlines()[-1], flush=True)
        e2e = _end_to_end(args, server, args.lifetime) if args.run else None
    results = {
        "rows": rows,
        "goals": _goals(rows),
        "server": {"kind": "given" if args.endpoint else "moto ThreadedMotoServer", **server_rate},
        "end_to_end": e2e,
    }
    params = {
        **vars(args),
        "server_cores_used": sorted(SERVER_CORES),
        "cube_shape": list(cube["pixels"].shape),
        "dtype": str(cube["pixels"].dtype),
        "compression": "zstd",
        "stored_bytes": stored,
        "chips": len(_chips(tuple(cube["pixels"].shape), args.chip)),
    }
    out = save("object_store", params, results, variant=args.tag)
    print()
    print(_table(rows))
    print(json.dumps(results["goals"], indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
