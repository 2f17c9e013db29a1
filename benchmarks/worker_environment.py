"""Small torch operations in a Dask worker: Dask's default environment against xclay's.

Times 500 iterations of elementwise work on 256 x 2048 float32 tensors (2 MiB
temporaries, the shape of rcf's pooling loop) in this process, in a worker of a
LocalCluster started with Dask's defaults (OMP threads 1, MALLOC_TRIM_THRESHOLD_
set), and in one started as `xclay run --cluster local:1` starts them.

    python benchmarks/worker_environment.py
    python benchmarks/worker_environment.py --smoke      # 20 iterations, one round
"""

from __future__ import annotations

import argparse
import time

from _common import parse, save


def small_ops(threads: int = 1, iterations: int = 500) -> float:
    """Microseconds per iteration of x * 1, (r - 1).clamp_min_(0) @ w."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2048, generator=g)
    w = torch.randn(2048, generator=g)
    for _ in range(20):
        (x * 1.0 - 1.0).clamp_min_(0.0) @ w
    start = time.perf_counter()
    for _ in range(iterations):
        (x * 1.0 - 1.0).clamp_min_(0.0) @ w
    return (time.perf_counter() - start) / iterations * 1e6


def _trim() -> str | None:
    import os

    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def main() -> None:
    import statistics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--rounds", type=int, default=7)
    args = parse(p, {"iterations": 20, "rounds": 1})
    n = args.iterations

    import dask
    from distributed import Client, LocalCluster

    from xclay.run.cluster import _worker_environment

    default_env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
    opts = {"n_workers": 1, "threads_per_worker": 1, "processes": True, "dashboard_address": None}
    # xclay's first: a nanny leaves Dask's variables in this process's environment, where
    # every worker started after it would inherit them.
    _worker_environment(1)
    with LocalCluster(**opts) as c2, Client(c2) as xclay_env:
        dask.config.set({"distributed.nanny.pre-spawn-environ": default_env})
        with LocalCluster(**opts) as c1, Client(c1) as dask_default:
            trim = next(
                iter(
                    dask_default.run(
                        lambda: __import__("os").environ.get("MALLOC_TRIM_THRESHOLD_")
                    ).values()
                )
            )
            # Interleaved rounds: this machine's speed drifts; all three see the same drift.
            times: dict[str, list[float]] = {
                "this process": [],
                "worker, Dask defaults": [],
                "worker, xclay environment": [],
            }
            for _ in range(args.rounds):
                times["this process"].append(small_ops(1, n))
                times["worker, Dask defaults"].append(
                    dask_default.submit(small_ops, 1, n, pure=False).result()
                )
                times["worker, xclay environment"].append(
                    xclay_env.submit(small_ops, 1, n, pure=False).result()
                )
    rows = {k: round(statistics.median(v), 1) for k, v in times.items()}
    results = {
        "microseconds_per_iteration_median": rows,
        "rounds": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "dask_default_pre_spawn_environ": default_env,
        "default_worker_MALLOC_TRIM_THRESHOLD_": trim,
    }
    path = save(
        "worker_environment",
        {"iterations": n, "shape": [256, 2048], "threads": 1, "rounds": args.rounds},
        results,
    )
    for name, us in rows.items():
        print(f"{name:28s} {us:9.1f} us per iteration (median of {args.rounds} interleaved rounds)")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
