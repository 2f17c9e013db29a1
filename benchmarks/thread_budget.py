"""`xclay demo` on the CPU with the thread budget, against torch fixed at one thread and at
every core, on an idle machine and with one core kept busy by another process.

Each run is a fresh process (what a user starts); the variants are interleaved
(A, B, C, A, B, C, ...) so a machine whose speed drifts slows them alike; the
figure is the median wall time of each.

    python benchmarks/thread_budget.py [--repeats 3] [--size 2048]
    python benchmarks/thread_budget.py --smoke      # 256 px, idle machine only, once
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import median, parse, save

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def demo(out: Path, size: int, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "xclay.cli", "demo", "--out", str(out), "--size", str(size),
         "--device", "cpu", "--no-progress"],
        check=True, capture_output=True, env={**os.environ, **env},
    )  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument(
        "--conditions",
        nargs="+",
        choices=["idle", "one core busy"],
        default=["idle", "one core busy"],
    )
    p.add_argument(
        "--variants", nargs="+", choices=["budget", "one", "every"], default=["budget", "one", "every"],
        help="the thread budget, torch with one thread, torch with a thread per core",
    )  # fmt: skip
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false")
    args = parse(
        p,
        {
            "repeats": 1,
            "size": 256,
            "conditions": ["idle"],
            "variants": ["budget"],
            "warm_up": False,
        },
    )
    cores = len(os.sched_getaffinity(0))
    every = {
        "budget": ("budget", {}),
        "one": ("torch 1 thread", {"OMP_NUM_THREADS": "1"}),
        "every": (f"torch {cores} threads", {"OMP_NUM_THREADS": str(cores)}),
    }
    variants = dict(every[v] for v in args.variants)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for condition in args.conditions:
            spinner = None
            if condition != "idle":
                spinner = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=3600)])
                time.sleep(1.0)
            try:
                times: dict[str, list[float]] = {name: [] for name in variants}
                if args.warm_up:
                    demo(Path(tmp) / "warm", args.size, {})
                for _ in range(args.repeats):
                    for name, env in variants.items():
                        times[name].append(demo(Path(tmp) / name.replace(" ", "_"), args.size, env))
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            results[condition] = {
                name: {"median_s": round(median(t), 2), "seconds": [round(v, 2) for v in t]}
                for name, t in times.items()
            }
            print(condition, {n: r["median_s"] for n, r in results[condition].items()}, flush=True)
    path = save("thread_budget", {**vars(args), "cores": cores}, results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
