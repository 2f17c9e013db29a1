"""rcf feature pooling: the textbook formulation against the one xclay uses.

Textbook: ``r = conv2d(x, filters)`` over the whole chip, then
``mean(relu(r - b))`` and ``mean(relu(-r - b))``: three passes over a
``[K, H, W]`` response map that does not fit in cache (132 MB per 256 px
chip at K = 512). xclay: ``[K, C k k] @ [C k k, chunk]`` products over chunks
of 2048 positions, each pooled while it is in cache
(``xclay.models.rcf.RCFEncoder.encode``). Both compute the same numbers
(checked here); runs are interleaved so a drifting machine slows both alike.

    python benchmarks/rcf_kernels.py [--filters 512] [--repeats 5]
    python benchmarks/rcf_kernels.py --smoke      # 16 filters, 2 chips of 64 px, once
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from _common import median, parse, save, timed

from xclay.devices import ComputePrecision
from xclay.models.rcf import RCFEncoder
from xclay.protocols import ChipBatch, InputSpec


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--filters", type=int, default=512)
    p.add_argument("--chip-size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = parse(p, {"filters": 16, "chip_size": 64, "batch": 2, "repeats": 1})

    g = torch.Generator().manual_seed(0)
    n, size, bands = args.batch, args.chip_size, 10
    pixels = (1000 + 3000 * torch.rand(n, bands, size, size, generator=g)).to(torch.uint16)
    batch = ChipBatch(
        pixels=pixels,
        valid=torch.ones(n, size, size, dtype=torch.bool),
        lonlat=torch.zeros(n, 2, dtype=torch.float64),
        time=np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]"),
    )
    spec = InputSpec(
        None,
        tuple(f"b{i}" for i in range(bands)),
        tuple(0.5 + 0.1 * i for i in range(bands)),
        10.0,
        0,
        "uint16",
        size,
    )
    encoder = RCFEncoder(num_filters=args.filters, sample_chips=4)
    encoder.prepare(
        spec, lambda k, seed: batch, device=torch.device("cpu"), precision=ComputePrecision("fp32")
    )
    tensors = encoder._tensors
    k = encoder.kernel_size
    kernels = tensors["weights"].reshape(args.filters, bands, k, k)
    offsets = tensors["offsets"].reshape(-1)

    def textbook() -> torch.Tensor:
        x = (batch.pixels.float() - tensors["mean"]) / tensors["std"]
        r = F.conv2d(x, kernels, bias=offsets)
        return torch.cat(
            [torch.relu(r - encoder.bias).mean((2, 3)), torch.relu(-r - encoder.bias).mean((2, 3))],
            1,
        )

    def xclay_rcf() -> torch.Tensor:
        return encoder.encode(batch)

    with torch.inference_mode():
        a, b = textbook(), xclay_rcf()
        rel = float((a - b).abs().max() / a.abs().max())
        assert rel < 1e-4, rel
        t_text, t_ours = [], []
        for _ in range(args.repeats):
            t_text += timed(textbook, 1)[0]
            t_ours += timed(xclay_rcf, 1)[0]
    results = {
        "textbook_chips_per_s": round(n / median(t_text), 2),
        "xclay_chips_per_s": round(n / median(t_ours), 2),
        "speedup_median_of_pairs": round(
            median([x / y for x, y in zip(t_text, t_ours, strict=True)]), 2
        ),
        "max_relative_difference": rel,
        "textbook_seconds": [round(t, 3) for t in t_text],
        "xclay_seconds": [round(t, 3) for t in t_ours],
    }
    path = save("rcf_kernels", {**vars(args), "torch_threads": torch.get_num_threads()}, results)
    print(f"textbook conv2d + relu + mean  {results['textbook_chips_per_s']:8.2f} chips/s")
    print(f"xclay chunked matmul + pool    {results['xclay_chips_per_s']:8.2f} chips/s")
    print(
        f"speed-up (median of pairs)     {results['speedup_median_of_pairs']:8.2f}x   max rel diff {rel:.1e}"
    )
    print(f"saved {path}")


if __name__ == "__main__":
    main()
