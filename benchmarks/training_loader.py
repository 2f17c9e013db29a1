"""Chips delivered to a training step per second: xclay.training against what users write.

The same pixels (the demo composite: 10 bands of uint16) three ways:

- ``xclay``: :class:`xclay.training.ChipDataset` over the datacube Zarr as xclay writes it
  (one zstd chunk a chip), whole batches read by the batch path, ``DataLoader(batch_size=
  None)``;
- ``rasterio``: a map-style Dataset reading each chip's window (all bands) from the same
  pixels as a GeoTIFF (tiled 512 x 512, DEFLATE, as a COG is), a file handle per worker,
  ``DataLoader(batch_size=B, shuffle=True)``;
- ``xbatcher``: ``xbatcher.BatchGenerator`` (one chip an item) over the datacube opened
  with ``xarray.open_zarr`` (its defaults: dask chunks of the stored chunks), wrapped in
  ``xbatcher.loaders.torch.MapDataset``, ``DataLoader(batch_size=B, shuffle=True)``; and
  the same over the datacube opened without dask (``chunks=None``), its fastest form;
- ``torch_handover``: as many batches of the same size, made in workers and handed over
  as torch hands over tensors (a new shared-memory tensor a batch; nothing read or
  decoded), through the same DataLoader: what a loader whose workers make batches that
  way cannot beat. xclay's workers hand batches over in shared memory made once
  (:mod:`xclay.batchring`).

Each feeds a fixed-cost stand-in training step (the batch made float32 and reduced: every
byte touched, as a model's first layer would) for ``--epochs`` epochs after one warm-up
epoch, with the same ``--workers`` (DataLoader processes) and batch size. The goal is
xclay >= 3x the better of the other two.

    python benchmarks/training_loader.py [--size 2048 --chip 128 --batch 32 --workers 2]
    python benchmarks/training_loader.py --smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import xarray as xr
from _common import median, parse, save

import xclay

GOAL = 3.0


def step(pixels: torch.Tensor) -> float:
    """The stand-in training step: float32, then a reduction over every value."""
    return float(pixels.float().mean())


def run(loader: Any, epochs: int, pixels_of: Any, on_epoch: Any = None) -> dict[str, Any]:
    """Chips per second over ``epochs`` epochs after a warm-up epoch."""
    chips = 0
    for epoch in range(epochs + 1):
        if on_epoch is not None:
            on_epoch(epoch)
        if epoch == 1:
            start = time.perf_counter()
        for batch in loader:
            pixels = pixels_of(batch)
            step(pixels)
            if epoch >= 1:
                chips += int(pixels.shape[0])
    seconds = time.perf_counter() - start
    return {"chips": chips, "seconds": round(seconds, 3), "chips_per_s": round(chips / seconds, 1)}


class WindowDataset(torch.utils.data.Dataset[torch.Tensor]):
    """What users write: one chip a item, a rasterio window read from a GeoTIFF."""

    def __init__(self, path: Path, chip: int) -> None:
        import rasterio

        self.path, self.chip = path, chip
        with rasterio.open(path) as src:
            self.rows, self.cols = src.height // chip, src.width // chip
        self._src: Any = None

    def __len__(self) -> int:
        return self.rows * self.cols

    def __getitem__(self, k: int) -> torch.Tensor:
        import rasterio
        from rasterio.windows import Window

        if self._src is None:  # one handle a worker process
            self._src = rasterio.open(self.path)
        i, j = divmod(k, self.cols)
        window = Window(j * self.chip, i * self.chip, self.chip, self.chip)
        return torch.from_numpy(self._src.read(window=window))


class ReadyBatches(torch.utils.data.IterableDataset[torch.Tensor]):
    """Batches made in a new shared-memory tensor each, as torch's own collate makes them
    in a worker (nothing read or decoded), ``batches`` an epoch split over the
    DataLoader's workers."""

    def __init__(self, batches: int, shape: tuple[int, ...]) -> None:
        self.batches, self.shape = batches, shape

    def __iter__(self) -> Any:
        from xclay.batchring import shared_tensor

        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for _ in range(w, self.batches, n):
            batch = shared_tensor(self.shape, torch.int16)
            batch.fill_(1)
            yield batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=2048, help="demo composite edge (px)")
    p.add_argument("--chip", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--compression",
        default="zstd",
        choices=["zstd", "lz4", "none"],
        help="the datacube's (xclay and xbatcher read the same store)",
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds of every loader in turn")
    p.add_argument("--tag", default="", help="a name for the results file")
    args = parse(p, {"size": 256, "chip": 64, "batch": 4, "workers": 1, "epochs": 1, "repeats": 1})

    import rasterio
    import xbatcher
    from xbatcher.loaders.torch import MapDataset

    from xclay.training import ChipDataset, TrainingConfig

    folder = Path(tempfile.mkdtemp(prefix="xclay-bench-loader-"))
    cube = xclay.datasets.demo_composite(args.size)
    store = xclay.write_datacube(
        cube, folder / "cube.zarr", chip_size=args.chip, compression=args.compression
    )
    pixels = cube["pixels"].values[0]
    tif = folder / "scene.tif"
    with rasterio.open(
        tif,
        "w",
        driver="GTiff",
        width=args.size,
        height=args.size,
        count=pixels.shape[0],
        dtype="uint16",
        crs=cube["spatial_ref"].attrs["crs_wkt"],
        transform=xclay.datacube.datacube_geobox(cube).affine,
        nodata=0,
        tiled=True,
        blockxsize=512 if args.size >= 512 else 256,
        blockysize=512 if args.size >= 512 else 256,
        compress="deflate",
    ) as dst:
        dst.write(pixels)
    del cube, pixels
    seed = torch.Generator().manual_seed(0)
    common = {"num_workers": args.workers}
    loaders: dict[str, tuple[Any, Any, Any]] = {}  # name: loader, its pixels, on_epoch

    t0 = time.perf_counter()
    ours = ChipDataset(store, chip_size=args.chip, config=TrainingConfig(batch_size=args.batch))
    made = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(ours, batch_size=None, **common)
    loaders["xclay"] = (loader, lambda b: b.pixels, ours.set_epoch)

    windows = WindowDataset(tif, args.chip)
    loader = torch.utils.data.DataLoader(
        windows, batch_size=args.batch, shuffle=True, generator=seed, **common
    )
    loaders["rasterio"] = (loader, lambda b: b, None)

    for name, chunks in (("xbatcher", "default"), ("xbatcher_no_dask", None)):
        opened = xr.open_zarr(store, **({} if chunks == "default" else {"chunks": None}))
        generator = xbatcher.BatchGenerator(
            opened["pixels"].isel(time=0), input_dims={"y": args.chip, "x": args.chip}
        )
        loader = torch.utils.data.DataLoader(
            MapDataset(generator), batch_size=args.batch, shuffle=True, generator=seed, **common
        )
        loaders[name] = (loader, lambda b: b, None)

    ready = ReadyBatches(len(ours), (args.batch, 10, args.chip, args.chip))
    loader = torch.utils.data.DataLoader(ready, batch_size=None, **common)
    loaders["torch_handover"] = (loader, lambda b: b, None)

    # Rounds: every loader once a round, in turn, so that a ratio compares runs made
    # minutes apart at most on this shared machine (the median of the rounds' ratios).
    others = [name for name in loaders if name not in ("xclay", "torch_handover")]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in loaders}
    ratios, of_handover = [], []
    for _ in range(args.repeats):
        for name, (loader, pixels_of, on_epoch) in loaders.items():
            runs[name].append(run(loader, args.epochs, pixels_of, on_epoch))
        rate = {name: runs[name][-1]["chips_per_s"] for name in loaders}
        ratios.append(rate["xclay"] / max(rate[name] for name in others))
        of_handover.append(rate["xclay"] / rate["torch_handover"])
    rows = {
        name: {
            "chips_per_s": round(median([r["chips_per_s"] for r in done]), 1),
            "chips_per_s_all": [r["chips_per_s"] for r in done],
        }
        for name, done in runs.items()
    }
    rows["xclay"].update(dataset_s=round(made, 2), chips_an_epoch=len(ours.chips))
    results = {
        "rows": rows,
        "speedup_over_best_other": round(median(ratios), 2),
        "speedup_each_round": [round(r, 2) for r in ratios],
        "over_torch_handover": round(median(of_handover), 2),
        "goal": GOAL,
        "chip_bytes": 10 * args.chip * args.chip * 2,
    }
    print(results, flush=True)
    path = save("training_loader", vars(args), results, variant=args.tag)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
