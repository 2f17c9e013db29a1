"""A run on a Dask cluster of GPU workers gives the embeddings the same run gives in one process.

A small datacube (the demo composite) is embedded twice by a run (``xclay.run.run``, what
``xclay run`` calls): once in this process, once on a local cluster started here (as
``xclay run --scheduler ADDRESS`` would),
one worker per GPU (dask-cuda's ``LocalCUDACluster``, dashboard off). The two
embeddings Zarr stores are compared value for value (the figure: the largest absolute
difference, and whether they are identical), and the chips each embedded must match.

Without CUDA or dask-cuda (``--smoke``, the acceptance script's dry run) the cluster is
a CPU ``LocalCluster`` of one worker: the same path, and the same comparison.

    python benchmarks/cluster_run.py                    # on a GPU machine with dask-cuda
    python benchmarks/cluster_run.py --smoke            # on the CPU: a LocalCluster
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from _common import parse, save

import xclay
from xclay.datasets import demo_composite


def start_cluster(gpu: bool) -> tuple[Any, Any, str]:
    """A local cluster: one worker per GPU (dask-cuda) or one CPU worker; no dashboard."""
    from distributed import Client, LocalCluster

    if gpu:
        import torch
        from dask_cuda import LocalCUDACluster

        workers = torch.cuda.device_count()
        cluster: Any = LocalCUDACluster(n_workers=workers, dashboard_address=None)
        kind = f"LocalCUDACluster, {workers} worker(s), one per GPU"
    else:
        cluster = LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        )
        kind = "LocalCluster, 1 CPU worker"
    return cluster, Client(cluster), kind


def xclay_run(spec: Path, client: Any = None) -> float:
    """``xclay run SPEC`` (``--scheduler``: with ``client``) through the API the command
    calls; its seconds."""
    from xclay.run import load_spec, run

    start = time.perf_counter()
    report = run(load_spec(spec), client=client, progress=False)
    if report.status != "complete":
        raise SystemExit(f"the run of {spec} ended {report.status}: {report.failed}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=1024, help="demo datacube edge in pixels")
    p.add_argument("--chip-size", type=int, default=128)
    p.add_argument("--region-chips", type=int, default=2)
    p.add_argument("--model", default="rcf")
    p.add_argument("--filters", type=int, default=64, help="rcf filters (vectors of twice that)")
    p.add_argument(
        "--device", default=None, help="the runs' compute.device (default: cuda with a GPU)"
    )
    args = parse(p, {"size": 256, "chip_size": 64, "filters": 16, "device": "cpu"})
    import torch

    gpu = args.device != "cpu" and torch.cuda.is_available()
    if args.device not in (None, "cpu") and not gpu:
        raise SystemExit(f"--device {args.device}: no CUDA GPU here")
    if gpu:
        try:
            import dask_cuda  # noqa: F401
        except ImportError as err:
            raise SystemExit(
                f"dask-cuda is not installed ({err}); the wheels: benchmarks/gpu_wheels.txt"
            ) from err
    device = args.device or ("cuda" if gpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cube = xclay.write_datacube(
            demo_composite(args.size), folder / "cube.zarr", chip_size=args.chip_size
        )
        specs = {}
        for name in ("in_process", "cluster"):
            spec = {
                "input": {"datacube": str(cube)},
                "grid": {"chip_size": args.chip_size},
                "model": {"name": args.model}
                | ({"options": {"num_filters": args.filters}} if args.model == "rcf" else {}),
                "compute": {"device": device, "region_chips": args.region_chips},
                "outputs": {"dir": str(folder / name)},
            }
            specs[name] = folder / f"{name}.yaml"
            specs[name].write_text(yaml.safe_dump(spec))
        seconds = {"in_process": xclay_run(specs["in_process"])}
        cluster, client, kind = start_cluster(gpu)
        try:
            workers = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
            seconds["cluster"] = xclay_run(specs["cluster"], client)
        finally:
            client.close()
            cluster.close()
        here = xclay.open_embeddings(folder / "in_process" / "embeddings.zarr")
        there = xclay.open_embeddings(folder / "cluster" / "embeddings.zarr")
        a, b = here["embedding"].values, there["embedding"].values
        embedded = here["embedded"].values
        same_chips = bool(np.array_equal(embedded, there["embedded"].values))
        diff = float(np.nanmax(np.abs(a - b))) if a.shape == b.shape else float("inf")
        scale = float(np.nanmax(np.abs(a))) or 1.0
        results = {
            "cluster": kind,
            "workers_cuda_visible_devices": workers,
            "chips_embedded": int(embedded.sum()),
            "same_chips": same_chips,
            "identical": bool(same_chips and np.array_equal(a, b, equal_nan=True)),
            "max_abs_difference": diff,
            "max_relative_difference": diff / scale,
            "same_embeddings": bool(same_chips and diff <= 1e-6 * scale),
            "seconds": {k: round(v, 2) for k, v in seconds.items()},
            "data_path": here.attrs.get("data_path"),
        }
    out = save(
        "cluster_run", {**vars(args), "device": device}, results, device=device.split(":")[0]
    )
    print(f"{kind}: {results['chips_embedded']} chips, identical: {results['identical']}, "
          f"max |difference| {diff:.3g} (relative {diff / scale:.3g}); "
          f"in process {seconds['in_process']:.1f} s, cluster {seconds['cluster']:.1f} s")  # fmt: skip
    print(f"saved {out}")
    if not results["same_embeddings"]:
        raise SystemExit("the cluster's embeddings differ from the in-process run's")


if __name__ == "__main__":
    main()
