"""Reading a datacube into (GPU) memory: the engines side by side, with the raw ceiling.

For each layout (chunk size 128/256/512 px = chip size, uncompressed or zstd,
one file per chunk or sharded), every chip of the cube is read ``--passes``
times per repeat (so each measurement covers thousands of chip reads), batch
by batch through the one fill loop (:func:`xclay.batch.batching.iter_batches`:
validity and nodata fractions included), into the memory the encoder reads
from. The batch sources side by side:

- ``zarr-python + copy``: per chip through xarray and zarr-python into a
  (pinned) host batch, then one host-to-device copy per batch;
- ``xclay host, 1 thread + copy``: direct chunk reads (:mod:`xclay.datacube.chunks`)
  in the reading thread, then the same copy;
- ``xclay host, N threads + copy``: the same with the decode threads the
  thread budget gives this machine (the ``zarr`` engine's default);
- ``kvikio``: chunks read with kvikIO into GPU memory, zstd decoded there by
  nvCOMP straight into the batch (GPU only; the ``kvikio`` engine);
- ``kvikio, host decode``: the same reads with zstd decoded on the host (GPU only);
- ceilings measured in the same run: ``raw reads`` (the same chunk bytes read
  with no Zarr, no decode and no validity: kvikIO into GPU memory with its
  thread pool, or ``preadv`` on a CPU) and, on a GPU, a device-to-device copy
  of the same bytes.

GB/s counts decoded pixel bytes. Files are in the page cache unless
``--cold`` (each pass first asks the kernel to drop the store's pages). On a
machine without CUDA the GPU rows are skipped and "copy" is no copy.

    python benchmarks/read_engines.py                       # all layouts, 2048 px demo cube
    python benchmarks/read_engines.py --size 4096 --cold    # on a GPU machine
    python benchmarks/read_engines.py --variants kvikio raw     # the GPU engine and its ceiling
    python benchmarks/read_engines.py --smoke      # a 512 px cube, 128 px chunks, zstd

Each row says what read the chips: ``engine`` (``zarr``, ``kvikio``, or ``ceiling``),
``reader`` (the batch source as it described itself: threads, decode on the GPU or the
host) and the ``fallbacks`` it reported.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import median, parse, save

import xclay
from xclay.batch.batching import BatchPlan, Block, batch_buffers, iter_batches
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.batch.readers import ChunkSource, WindowSource, store_layouts
from xclay.datacube import datacube_geobox
from xclay.datacube.chunks import ArrayLayout, ChipChunks
from xclay.datacube.gpu import importable
from xclay.devices import ThreadBudget
from xclay.quality import ChipQuality, QualityFilter


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048, help="demo cube edge in pixels")
    p.add_argument("--chunks", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--compression", nargs="+", default=["none", "zstd"])
    p.add_argument("--shards", type=int, nargs="+", default=[0, 4], help="0: unsharded")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--passes", type=int, default=1, help="reads of every chip per measurement")
    p.add_argument("--cold", action="store_true", help="drop the store from the page cache")
    p.add_argument("--tag", default="", help="added to the result file's name")
    p.add_argument(
        "--chip-sizes",
        type=int,
        nargs="*",
        default=[],
        help="also read chips of these sizes from each layout (chips decoupled from chunks)",
    )
    p.add_argument(
        "--no-checksum-cost",
        dest="checksum_cost",
        action="store_false",
        help="skip the paired timing of the host reads with and without chunk checksums",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="which readers and ceilings to time (default: all)",
    )
    args = parse(
        p,
        {"size": 512, "chunks": [128], "compression": ["zstd"], "shards": [0, 2],
         "repeats": 1, "passes": 1, "chip_sizes": [64]},
    )  # fmt: skip

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kvikio = False
    if cuda:
        from xclay.datacube.gpu import kvikio_usable

        kvikio = kvikio_usable()
    cube = xclay.datasets.demo_composite(args.size)
    rows: list[dict[str, Any]] = []
    costs: list[dict[str, Any]] = []
    sizes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunks:
            for compression in args.compression:
                for shard in args.shards:
                    path = xclay.write_datacube(
                        cube,
                        Path(tmp) / f"c{chunk}_{compression}_{shard}.zarr",
                        chip_size=chunk,
                        compression=compression,
                        shard_chips=shard or None,
                    )
                    layout = f"{chunk} px, {compression}, {'sharded' if shard else 'unsharded'}"
                    rows += _measure(path, layout, chunk, device, kvikio, args)
                    print(_table([r for r in rows if r["layout"] == layout]), flush=True)
                    if args.chip_sizes:
                        sizes.append(_chip_sizes(path, layout, chunk, args))
                        print(json.dumps(sizes[-1]), flush=True)
                    if args.checksum_cost:
                        twin = _without_checksums(
                            cube, Path(tmp) / f"u{chunk}_{compression}_{shard}.zarr",
                            chunk, compression, shard,
                        )  # fmt: skip
                        costs.append(_checksum_cost(path, twin, layout, chunk, args))
                        print(json.dumps(costs[-1]), flush=True)
    results = {"rows": rows, "checksum_cost": costs, "chip_sizes": sizes}
    params = {
        **vars(args),
        "cube_shape": list(cube["pixels"].shape),
        "dtype": str(cube["pixels"].dtype),
        "device": str(device),
        "kvikio": kvikio,
    }
    out = save("read_engines", params, results, device=device.type, variant=args.tag)
    print()
    print(_table(rows))
    print(f"saved {out}")


# --variants: each reader and ceiling, and the engine it stands for.
VARIANTS = {
    "zarr-python": "zarr",
    "host-1": "zarr",
    "host-n": "zarr",
    "kvikio": "kvikio",
    "kvikio-host-decode": "kvikio",
    "xarray-gpu": "kvikio",
    "cupy-xarray": "cupy-xarray",
    "raw": "ceiling",
    "device-copy": "ceiling",
}


def _measure(
    path: Path, layout: str, chunk: int, device: torch.device, kvikio: bool, args: Any
) -> list[dict[str, Any]]:
    opened = xclay.open_datacube(path)
    grid = ChipGrid.from_geobox(datacube_geobox(opened), ChipGridSpec(chip_size=chunk))
    plan = BatchPlan(
        grid,
        Block.whole(opened.sizes["time"], grid),
        args.batch_size,
        QualityFilter(max_nodata=1.0),
    )
    chips = plan.total_chips * args.passes
    nbytes = chips * opened.sizes["band"] * chunk * chunk * opened["pixels"].dtype.itemsize
    cuda = device.type == "cuda"
    budget = ThreadBudget.for_device(device)

    def batches(source: Any, pin: bool = False) -> Iterator[Any]:
        for _ in range(args.passes):
            quality = ChipQuality.empty(plan.block.shape, with_classes=False)
            yield from iter_batches(source, plan, quality, prefetch=0, pin_memory=pin)

    readers: dict[str, dict[str, Any]] = {}  # per variant: how its source described itself

    def seen(variant: str, source: Any) -> None:
        readers[variant] = {
            "reader": source.name,
            "fallbacks": list(getattr(source, "fallbacks", [])),
        }

    def host(kind: str) -> Callable[[], None]:
        def run() -> None:
            cube = xclay.open_datacube(path)
            if kind == "zarr":  # xarray's lazy indexing: zarr-python reads every window
                source: Any = WindowSource(cube["pixels"])
            else:
                threads = 1 if kind == "1" else budget.decode
                source = ChunkSource(*store_layouts(cube), nodata=None, threads=threads)
            seen({"zarr": "zarr-python", "1": "host-1"}.get(kind, "host-n"), source)
            for b in batches(source, pin=cuda):
                if cuda:
                    torch.from_numpy(b.pixels).to(device, non_blocking=True)
            if cuda:
                torch.cuda.synchronize()
            source.close()

        return run

    def gpu(decode: str) -> Callable[[], None]:
        from xclay.datacube.gpuchunks import KvikioChunkSource

        def run() -> None:
            layouts = store_layouts(xclay.open_datacube(path))
            host = ChunkSource(*layouts, nodata=None, threads=budget.decode)
            source = KvikioChunkSource(
                *layouts, chip_size=chunk, nodata=None, threads=budget, host=host, decode=decode
            )  # type: ignore[arg-type]
            seen("kvikio" if decode == "auto" else "kvikio-host-decode", source)
            for _ in batches(source):
                pass
            source.close()
            host.close()

        return run

    def xarray_gpu(opener: str) -> Callable[[], None]:
        """The whole cube read into GPU memory through xarray, a time step at a time: xclay's
        own route (``open_datacube(engine="kvikio")``: the batch path's kvikIO reader) or
        cupy-xarray's ``kvikio`` backend (zarr-python's codecs over GPU buffers)."""

        def run() -> None:
            if opener == "xclay":
                cube = xclay.open_datacube(path, engine="kvikio")
            else:
                import xarray as xr

                cube = xr.open_dataset(path, engine="kvikio", mask_and_scale=False)
            for _ in range(args.passes):
                for t in range(cube.sizes["time"]):
                    cube["pixels"][t].data.sum()  # CuPy data either way
            torch.cuda.synchronize()

        return run

    cupy_xarray = kvikio and importable("cupy_xarray")
    variants: list[tuple[str, str, Callable[[], None] | None]] = [
        ("zarr-python", "zarr-python + copy", host("zarr")),
        ("host-1", "xclay host, 1 thread + copy", host("1")),
        ("host-n", f"xclay host, {budget.decode} threads + copy", host("n")),
        ("kvikio", "kvikio", gpu("auto") if kvikio else None),
        (
            "kvikio-host-decode",
            "kvikio, host decode",
            gpu("host") if kvikio and "zstd" in layout else None,
        ),
        ("xarray-gpu", "xarray, xclay GPU route", xarray_gpu("xclay") if kvikio else None),
        ("cupy-xarray", "xarray, cupy-xarray kvikio", xarray_gpu("cupy") if cupy_xarray else None),
        (
            "raw",
            "raw reads (ceiling)",
            _raw_reads(path, chunk, device, kvikio, args.passes, budget),
        ),
        ("device-copy", "device copy (ceiling)", _device_copy(nbytes) if cuda else None),
    ]
    out = []
    for key, name, fn in variants:
        if key not in args.variants:
            continue
        row: dict[str, Any] = {"layout": layout, "variant": name, "engine": VARIANTS[key]}
        if fn is None:
            nothing_to_decode = kvikio and name == "kvikio, host decode"
            row["skipped"] = (
                "uncompressed: nothing to decode"
                if nothing_to_decode
                else "needs CUDA, kvikio and cupy-xarray"
                if key == "cupy-xarray"
                else "needs CUDA and kvikio"
            )
            out.append(row)
            continue
        fn()  # warm-up: imports, thread pools, page cache (unless --cold)
        times = []
        for _ in range(args.repeats):
            if args.cold:
                _drop_page_cache(path)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds = median(times)
        row.update(
            chips=chips,
            seconds=round(seconds, 4),
            chips_per_s=round(chips / seconds, 1),
            gb_per_s=round(nbytes / seconds / 1e9, 3),
            seconds_all=[round(t, 4) for t in times],
            **readers.get(key, {"reader": name, "fallbacks": []}),
        )
        out.append(row)
    return out


def _chip_sizes(path: Path, layout: str, chunk: int, args: Any) -> dict[str, Any]:
    """Chips of other sizes than the chunks (smaller, larger, not aligned) read from the same
    store through the fill loop, interleaved with the aligned size; the cost of a size is
    its time per pixel delivered over the aligned size's (median of paired ratios)."""
    cube = xclay.open_datacube(path)
    source = ChunkSource(*store_layouts(cube), nodata=None, threads=1)
    sizes = sorted({chunk, *args.chip_sizes})
    seconds: dict[int, list[float]] = {s: [] for s in sizes}
    pixels: dict[int, int] = {}
    buffers: dict[int, Any] = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for size in sizes:
            grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=size))
            plan = BatchPlan(
                grid, Block.whole(1, grid), args.batch_size, QualityFilter(max_nodata=1.0)
            )
            pixels[size] = plan.total_chips * size * size * args.passes
            if size not in buffers:  # as a session: made once (faulted in while warming up)
                buffers[size] = batch_buffers(source, plan, prefetch=0)
            start = time.perf_counter()
            for _ in range(args.passes):
                # The cache of decoded chunks must not carry the last pass's chunks
                # over (a run reads each chip once).
                source.clear_cache()
                quality = ChipQuality.empty(plan.block.shape, with_classes=False)
                for _ in iter_batches(source, plan, quality, prefetch=0, buffers=buffers[size]):
                    pass
            seconds[size].append(time.perf_counter() - start)
    source.close()
    out: dict[str, Any] = {"layout": layout, "sizes": {}}
    for size in sizes:
        ratios = [
            (t / pixels[size]) / (a / pixels[chunk])
            for t, a in zip(seconds[size][1:], seconds[chunk][1:], strict=True)
        ]
        out["sizes"][str(size)] = {
            "mpixels_per_s": round(pixels[size] / median(seconds[size][1:]) / 1e6, 1),
            "cost_vs_aligned": round(median(ratios), 3),
        }
    return out


def _without_checksums(cube: Any, path: Path, chunk: int, compression: str, shard: int) -> Path:
    """The same datacube written as before checksums (no crc32c codec, empty chunks left
    out): the baseline of the checksums' cost."""
    from unittest import mock

    from zarr.codecs import Crc32cCodec

    import xclay.datacube.store as dc

    real = dc._compressors

    def plain(compression: Any) -> Any:
        return [c for c in real(compression) if not isinstance(c, Crc32cCodec)] or None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xclay.errors.DataIntegrityWarning)
        with mock.patch.object(dc, "_compressors", plain), mock.patch.object(dc, "INTEGRITY", {}):
            return xclay.write_datacube(
                cube, path, chip_size=chunk, compression=compression, shard_chips=shard or None
            )


def _checksum_cost(
    checked: Path, plain: Path, layout: str, chunk: int, args: Any
) -> dict[str, Any]:
    """Host chunk reads (the fill loop, one thread) of the same cube with and without
    checksums, interleaved; the cost is the median of the paired time ratios."""
    times: dict[str, list[float]] = {"checked": [], "plain": []}
    sources = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", xclay.errors.DataIntegrityWarning)
        for name, path in (("checked", checked), ("plain", plain)):
            cube = xclay.open_datacube(path)
            sources[name] = (cube, ChunkSource(*store_layouts(cube), nodata=None, threads=1))
    grid = ChipGrid.from_geobox(
        datacube_geobox(sources["checked"][0]), ChipGridSpec(chip_size=chunk)
    )
    plan = BatchPlan(grid, Block.whole(1, grid), args.batch_size, QualityFilter(max_nodata=1.0))
    for _ in range(args.repeats + 1):  # the first pair warms up
        for name, (_, source) in sources.items():
            start = time.perf_counter()
            for _ in range(args.passes):
                quality = ChipQuality.empty(plan.block.shape, with_classes=False)
                for _ in iter_batches(source, plan, quality, prefetch=0):
                    pass
            times[name].append(time.perf_counter() - start)
    for _, source in sources.values():
        source.close()
    ratios = [a / b for a, b in zip(times["checked"][1:], times["plain"][1:], strict=True)]
    return {
        "layout": layout,
        "checked_s": round(median(times["checked"][1:]), 4),
        "plain_s": round(median(times["plain"][1:]), 4),
        "cost": round(median(ratios) - 1.0, 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def _raw_reads(
    path: Path, chunk: int, device: torch.device, kvikio: bool, passes: int, budget: ThreadBudget
) -> Callable[[], None]:
    """Every chunk's stored bytes read into one buffer: no Zarr, no decode, no validity."""
    layout = ArrayLayout.open(path / "pixels")
    chunks = ChipChunks(layout, chunk)
    t, _, ny, nx = layout.shape
    windows = [
        (ti, r, c)
        for ti in range(t)
        for r in range(0, ny - chunk + 1, chunk)
        for c in range(0, nx - chunk + 1, chunk)
    ]
    refs = [ref for ref in chunks.plan(windows)[0] if ref is not None]
    sizes = [
        ref.nbytes if ref.nbytes is not None else Path(ref.path).stat().st_size for ref in refs
    ]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if kvikio:
        import cupy
        import kvikio as kv

        kv.defaults.set("num_threads", budget.io)
        buffer = cupy.empty(int(starts[-1]), dtype=cupy.uint8)

        def run() -> None:
            for _ in range(passes):
                handles: dict[str, Any] = {}
                futures = []
                for i, ref in enumerate(refs):
                    f = handles.get(ref.path) or handles.setdefault(
                        ref.path, kv.CuFile(ref.path, "r")
                    )
                    futures.append(f.pread(buffer[starts[i] : starts[i + 1]], sizes[i], ref.offset))
                for fut in futures:
                    fut.get()
                for f in handles.values():
                    f.close()

        return run
    host = np.empty(int(starts[-1]), dtype=np.uint8)

    def run_host() -> None:
        for _ in range(passes):
            for i, ref in enumerate(refs):
                fd = os.open(ref.path, os.O_RDONLY)
                try:
                    os.preadv(fd, [memoryview(host[starts[i] : starts[i + 1]])], ref.offset)
                finally:
                    os.close(fd)

    return run_host


def _device_copy(nbytes: int) -> Callable[[], None]:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)
        torch.cuda.synchronize()

    return run


def _drop_page_cache(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'layout':30s} {'variant':32s} {'chips/s':>10s} {'GB/s':>8s}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['layout']:30s} {r['variant']:32s} {'skipped: ' + r['skipped']}")
        else:
            lines.append(
                f"{r['layout']:30s} {r['variant']:32s} {r['chips_per_s']:10.1f} {r['gb_per_s']:8.3f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
