"""Where a Clay-large block spends its time on this machine, and which attention to use.

One transformer block of Clay large at 256 px (1025 tokens), batch 2, bf16:
its four linear layers, PyTorch's fused ``scaled_dot_product_attention``, and
attention written as explicit matmuls with an fp32 softmax; GFLOP/s of each.
Variants are interleaved; medians of ``--repeats``.

    python benchmarks/attention_kernels.py
    python benchmarks/attention_kernels.py --smoke      # batch 1, once
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from _common import parse, save


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = parse(p, {"batch": 1, "repeats": 1})
    b, n, dim, heads, dh, mlp = args.batch, 1025, 1024, 16, 64, 4096
    g = torch.Generator().manual_seed(0)
    dt = torch.bfloat16
    x = torch.randn(b, n, dim, generator=g).to(dt)
    w = {k: (torch.randn(o, i, generator=g) / i**0.5).to(dt) for k, (o, i) in
         {"qkv": (3 * dim, dim), "out": (dim, dim), "fc1": (mlp, dim), "fc2": (dim, mlp)}.items()}  # fmt: skip
    h = torch.randn(b, n, mlp, generator=g).to(dt)
    q, k, v = (torch.randn(b, heads, n, dh, generator=g).to(dt) for _ in range(3))

    def linears() -> None:
        F.linear(x, w["qkv"]), F.linear(x, w["out"]), F.linear(x, w["fc1"]), F.linear(h, w["fc2"])

    def fused() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def explicit() -> torch.Tensor:
        a = torch.softmax((q @ k.transpose(-1, -2)).float() * dh**-0.5, dim=-1).to(dt)
        return a @ v

    flops = {
        "linears": 2 * b * n * (dim * 3 * dim + dim * dim + 2 * dim * mlp),
        "fused_attention": 4 * b * heads * n * n * dh,
        "explicit_attention": 4 * b * heads * n * n * dh,
    }
    fns = {"linears": linears, "fused_attention": fused, "explicit_attention": explicit}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        err = {
            k: float((f().double() - ref).norm() / ref.norm())
            for k, f in (("fused_attention", fused), ("explicit_attention", explicit))
        }
        for f in fns.values():
            f()
        for _ in range(args.repeats):
            for name, f in fns.items():
                start = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - start)
    rows = {
        name: {
            "ms": round(1e3 * statistics.median(t), 2),
            "gflops": round(flops[name] / statistics.median(t) / 1e9, 1),
            "seconds": [round(s, 4) for s in t],
        }
        for name, t in times.items()
    }
    results = {"rows": rows, "relative_error_vs_float64": err}
    path = save(
        "attention_kernels",
        {**vars(args), "tokens": n, "dim": dim, "heads": heads, "dtype": "bf16"},
        results,
    )
    for name, r in rows.items():
        print(f"{name:20s} {r['ms']:9.1f} ms {r['gflops']:8.1f} GFLOP/s")
    print(f"relative error vs float64: {err}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
