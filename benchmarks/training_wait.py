"""Whether a training step waits for xclay's loader: the step's rate fed by ChipDataset over
its rate on batches already on the device (the goal: >= 0.95 on a GPU).

The step is a fixed stand-in of about ``--step-ms`` milliseconds on the device: the batch
made float32 and reduced, then chained matrix products calibrated to that time, and the
loss read back to the host (a wait for the device every step, as a loop that logs its
loss does). It is fed:

- ``ready``: batches of the dataset already on the device, cycled (the step's own rate);
- ``workers``: :class:`xclay.training.ChipDataset` over the datacube (chips cached after
  the warm-up epoch), ``--workers`` persistent DataLoader processes, pinned memory on a
  GPU, copies to the device that do not block;
- ``kvikio`` (CUDA only): the same dataset reading with ``engine="kvikio"`` straight into
  GPU memory, in the training process.

Each is run for ``--epochs`` epochs after a warm-up epoch; the figure is its chips/s over
``ready``'s.

    python benchmarks/training_wait.py --device cuda [--size 4096 --chip 128 --batch 32]
    python benchmarks/training_wait.py --smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from _common import parse, save

import xclay

GOAL = 0.95


def calibrated_step(device: torch.device, ms: float) -> tuple[Callable[[torch.Tensor], float], int]:
    """The stand-in step of about ``ms`` milliseconds on ``device``, and its products a step."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(512, 512, generator=gen) / 512**0.5).to(device)
    start = torch.randn(256, 512, generator=gen).to(device)

    def products(k: int) -> torch.Tensor:
        y = start
        for _ in range(k):
            y = torch.tanh(y @ weight)
        return y

    def timed(k: int) -> float:
        t0 = time.perf_counter()
        float(products(k).mean())
        return time.perf_counter() - t0

    timed(20)  # warm-up: kernels, allocator
    per = min(timed(50) for _ in range(3)) / 50
    reps = max(1, round(ms / 1000 / per))

    def step(pixels: torch.Tensor) -> float:
        x = pixels.to(device, non_blocking=True).float()
        return float(x.mean() + products(reps).mean())

    return step, reps


def rate(
    batches: Callable[[], Iterable[Any]], step: Callable[[torch.Tensor], float], epochs: int
) -> dict[str, Any]:
    """Chips a second the step takes over ``epochs`` epochs after a warm-up epoch."""
    chips, start = 0, 0.0
    for epoch in range(epochs + 1):
        if epoch == 1:
            start = time.perf_counter()
        for batch in batches():
            pixels = batch.pixels if hasattr(batch, "pixels") else batch
            step(pixels)
            if epoch >= 1:
                chips += int(pixels.shape[0])
    seconds = time.perf_counter() - start
    return {"chips": chips, "seconds": round(seconds, 3), "chips_per_s": round(chips / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="where the step runs (cpu, cuda)")
    p.add_argument("--size", type=int, default=4096, help="demo composite edge (px)")
    p.add_argument("--chip", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=8, help="DataLoader processes")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--step-ms", type=float, default=20.0, help="the stand-in step's time")
    args = parse(
        p, {"size": 256, "chip": 64, "batch": 4, "workers": 1, "epochs": 1, "step_ms": 2.0}
    )

    from xclay.training import ChipDataset, TrainingConfig

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    folder = Path(tempfile.mkdtemp(prefix="xclay-bench-wait-"))
    store = xclay.write_datacube(
        xclay.datasets.demo_composite(args.size), folder / "cube.zarr", chip_size=args.chip
    )
    if not cuda:  # the step's threads and the workers share the cores, not contend for them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) - args.workers))
    step, reps = calibrated_step(device, args.step_ms)
    config = TrainingConfig(batch_size=args.batch, seed=0)
    dataset = ChipDataset(store, chip_size=args.chip, config=config)
    ready = [b.pixels.to(device) for b in dataset]  # one epoch, on the device
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=args.workers,
        pin_memory=cuda,
        persistent_workers=args.workers > 0,
    )

    def fed(loader: Any, dataset: Any) -> Callable[[], Iterable[Any]]:
        epoch = iter(range(1 << 30))

        def batches() -> Iterable[Any]:
            dataset.set_epoch(next(epoch))
            return iter(loader)

        return batches

    rows = {
        "ready": rate(lambda: iter(ready), step, args.epochs),
        "workers": rate(fed(loader, dataset), step, args.epochs),
    }
    if cuda:
        gpu = ChipDataset(
            store,
            chip_size=args.chip,
            config=TrainingConfig(batch_size=args.batch, seed=0, engine="kvikio", device="cuda"),
        )
        direct = torch.utils.data.DataLoader(gpu, batch_size=None, num_workers=0)
        rows["kvikio"] = rate(fed(direct, gpu), step, args.epochs)
    base = rows["ready"]["chips_per_s"]
    of_ready = {name: round(row["chips_per_s"] / base, 3) for name, row in rows.items()}
    results = {
        "rows": rows,
        "of_step_rate": of_ready,
        "goal": GOAL,
        "step_products": reps,
        "chips_an_epoch": len(dataset.chips),
    }
    print(results, flush=True)
    print(f"wrote {save('training_wait', vars(args), results, device=device.type)}")


if __name__ == "__main__":
    main()
