"""Clay encoder speed of this checkout against an earlier commit, on this machine.

Each round times ``ClayV15.encode`` in a fresh process for the earlier commit (checked
out into a temporary git worktree) and then for this checkout, alternating, so a
machine whose speed drifts slows both alike: random weights, 10 bands, one warm-up
batch, then ``--batches`` timed batches; the figure is chips/s from their median.

    python benchmarks/encoder_ab.py --base 31e549d                 # Clay large, 256 px, bf16
    python benchmarks/encoder_ab.py --base 31e549d --size tiny --batch 16 --rounds 3
    python benchmarks/encoder_ab.py --smoke      # HEAD against this checkout, Clay tiny, 64 px
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import parse  # imports no xclay: a measuring child imports its checkout's

ROOT = Path(__file__).resolve().parents[1]


def measure(checkout: str, size: str, chip: int, batch: int, precision: str, n: int) -> float:
    """chips/s of ``encode`` with the xclay of ``checkout`` (run in a child process)."""
    sys.path.insert(0, checkout)
    import numpy as np
    import torch

    import xclay
    from xclay.models.clay import ClayV15
    from xclay.models.clay_encoder import ClayEncoder
    from xclay.protocols import ChipBatch, InputSpec

    assert xclay.__file__.startswith(checkout), xclay.__file__
    torch.manual_seed(0)
    bands = 10
    spec = InputSpec(
        None,
        tuple(f"b{i}" for i in range(bands)),
        tuple(0.45 + 0.17 * i for i in range(bands)),
        10.0,
        0,
        "uint16",
        chip,
    )
    g = torch.Generator().manual_seed(1)
    chips = ChipBatch(
        pixels=(500 + 3000 * torch.rand(batch, bands, chip, chip, generator=g)).to(torch.uint16),
        valid=torch.ones(batch, chip, chip, dtype=torch.bool),
        lonlat=torch.tensor([[-60.5, -3.2]] * batch, dtype=torch.float64),
        time=np.array(["2024-07-02"] * batch, dtype="datetime64[ns]"),
    )
    enc = ClayV15(
        ClayEncoder.from_size(size).eval(),
        size=size,
        normalization=dict.fromkeys(spec.bands, (2000.0, 1000.0)),
        compile=False,
    )
    cpu = torch.device("cpu")
    if "precision" in inspect.signature(enc.prepare).parameters:  # since the precisions
        from xclay.devices import ComputePrecision

        enc.precision_check = 0
        # since prepare() returns the encoder it made ready (before: None, enc itself)
        ready = enc.prepare(
            spec, lambda k, s: chips, device=cpu, precision=ComputePrecision(precision)
        )
    else:  # before: a torch dtype
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        ready = enc.prepare(spec, lambda k, s: chips, device=cpu, dtype=dtype)
    ready = ready or enc
    ready.encode(chips)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        ready.encode(chips)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", default=None, help="the earlier commit (required)")
    p.add_argument("--size", default="large")
    p.add_argument("--chip-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--batches", type=int, default=4, help="timed batches a measurement")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child process
    args = parse(
        p,
        {"base": "HEAD", "size": "tiny", "chip_size": 64, "batch": 2, "batches": 1, "rounds": 1},
    )
    if args.base is None:
        p.error("--base is required")
    if args.measure:
        rate = measure(
            args.measure, args.size, args.chip_size, args.batch, args.precision, args.batches
        )
        print(json.dumps({"chips_per_s": rate}))
        return
    from _common import require, save  # imports xclay: only here, never in a measuring child

    require(ROOT / ".git", "a git checkout (the earlier commit is checked out beside it)")

    base_rev = subprocess.run(
        ["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, text=True,
        capture_output=True,
    ).stdout.strip()  # fmt: skip
    here_rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, text=True,
        capture_output=True,
    ).stdout.strip()  # fmt: skip
    rates: dict[str, list[float]] = {"base": [], "here": []}
    with tempfile.TemporaryDirectory() as tmp:
        base = str(Path(tmp) / "base")
        subprocess.run(["git", "worktree", "add", "--detach", base, base_rev], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
        try:
            for _ in range(args.rounds):
                for name, checkout in (("base", base), ("here", str(ROOT))):
                    child = [*sys.argv[1:], "--measure", checkout]
                    out = subprocess.run(
                        [sys.executable, __file__, *child], check=True, text=True,
                        capture_output=True,
                    ).stdout  # fmt: skip
                    rates[name].append(json.loads(out.strip().splitlines()[-1])["chips_per_s"])
                    print(f"{name:4s} {rates[name][-1]:.4f} chips/s")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip
    ratio = statistics.median(rates["here"]) / statistics.median(rates["base"])
    results = {
        "base": base_rev,
        "here": here_rev,
        "chips_per_s": {k: [round(v, 4) for v in vs] for k, vs in rates.items()},
        "here_over_base": round(ratio, 3),
    }
    params = {k: v for k, v in vars(args).items() if k != "measure"}
    out = save("encoder_ab", params, results, variant=f"{args.size}-{args.precision}")
    print(f"{here_rev} / {base_rev}: {ratio:.3f}x (median of {args.rounds} rounds); saved {out}")


if __name__ == "__main__":
    main()
