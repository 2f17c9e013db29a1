"""Wall-clock time of `xclay demo` (the README's first command, after set-up).

python benchmarks/demo_wallclock.py [--repeats 3]
python benchmarks/demo_wallclock.py --smoke     # a 256 px scene, once
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time

from _common import median, parse, save


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--size", type=int, default=None, help="scene edge (default: the demo's)")
    args = parse(p, {"repeats": 1, "size": 256})
    size = ["--size", str(args.size)] if args.size else []
    seconds, chips_per_s = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            run = subprocess.run(
                [sys.executable, "-m", "xclay.cli", "demo", "--out", out, "--no-progress", *size],
                capture_output=True,
                text=True,
                check=True,
            )
            seconds.append(time.perf_counter() - start)
        chips_per_s.append(float(re.search(r"([\d.]+) chips/s", run.stdout).group(1)))
    results = {
        "wall_seconds": [round(s, 2) for s in seconds],
        "median_wall_seconds": round(median(seconds), 2),
        "embed_chips_per_s": chips_per_s,
    }
    path = save("demo_wallclock", {"command": "xclay demo", **vars(args)}, results)
    print(
        f"xclay demo: median {median(seconds):.1f} s over {args.repeats} runs {results['wall_seconds']}"
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
