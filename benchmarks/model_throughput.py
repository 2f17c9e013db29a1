"""Clay encoder throughput: chips/s, achieved TFLOP/s, and the fraction of the
matrix-multiply peak measured in the same run on the same machine.

Sizes tiny, base and large at 256 px (10 bands), fp32 and bf16 (autocast),
random weights (throughput does not depend on their values). fp32 and bf16
runs are interleaved so a machine whose speed drifts slows both alike.

With ``--loss`` it also times the per-chip reconstruction loss (a masked
encoder pass over a quarter of the tokens, then the v1.5 decoder: 512 wide,
4 blocks), interleaved with the plain encoder pass, and reports its cost
relative to embedding.

    python benchmarks/model_throughput.py                       # CPU, all sizes
    python benchmarks/model_throughput.py --sizes large --loss  # + the loss's cost
    python benchmarks/model_throughput.py --device cuda --batch large=128 base=256 tiny=512
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from _common import save

from xclay.models.clay import ClayV15
from xclay.models.clay_decoder import ClayDecoder, DecoderSize, count_loss_flops
from xclay.models.clay_encoder import ClayEncoder, count_forward_flops
from xclay.protocols import ChipBatch, InputSpec

DEFAULT_BATCH = {
    "cpu": {"tiny": 16, "base": 4, "large": 2},
    "cuda": {"tiny": 512, "base": 256, "large": 128},
}
REFERENCE_FP32_LARGE = (
    0.55  # chips/s, the reference code on a 2-core CPU (specs/clay-v1.5-encoder.md)
)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Median TFLOP/s of an n x n x n matrix product on random data."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=["tiny", "base", "large"])
    p.add_argument("--chip-size", type=int, default=256)
    p.add_argument("--batch", nargs="*", default=[], help="per-size batch, e.g. large=2 tiny=16")
    p.add_argument("--repeats", type=int, default=3, help="interleaved fp32/bf16 pairs per size")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    p.add_argument("--loss", action="store_true", help="also time the reconstruction loss")
    args = p.parse_args()
    device = torch.device(args.device)
    batch_size = {
        **DEFAULT_BATCH["cuda" if device.type == "cuda" else "cpu"],
        **{k: int(v) for k, v in (b.split("=") for b in args.batch)},
    }

    n = 8192 if device.type == "cuda" else 2048
    peaks = {
        "fp32": matmul_peak(device, torch.float32, n),
        "bf16": matmul_peak(device, torch.bfloat16, n),
    }
    rows = []
    for size in args.sizes:
        torch.manual_seed(0)
        bs, chip, bands = batch_size[size], args.chip_size, 10
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
        batch = ChipBatch(
            pixels=(500 + 3000 * torch.rand(bs, bands, chip, chip, generator=g))
            .to(torch.uint16)
            .to(device),
            valid=torch.ones(bs, chip, chip, dtype=torch.bool, device=device),
            lonlat=torch.tensor([[-60.5, -3.2]] * bs, dtype=torch.float64),
            time=np.array(["2024-07-02"] * bs, dtype="datetime64[ns]"),
            chip_ids=np.array([f"EPSG32720_{chip}px_10m_{i}_0" for i in range(bs)]),
        )
        norm = dict.fromkeys(spec.bands, (2000.0, 1000.0))
        encoders = {}
        model = ClayEncoder.from_size(size)
        decoder = ClayDecoder(model.dim, DecoderSize()) if args.loss else None
        for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            enc = ClayV15(model, size=size, normalization=norm, compile=args.compile)
            if decoder is not None:
                enc.decoder = decoder.eval()
                enc.enable_loss(0)
            enc.prepare(spec, lambda k, s, b=batch: b, device=device, dtype=dtype)
            enc.encode(batch)  # warm-up (and compilation)
            if decoder is not None:
                enc.loss(batch)
            encoders[precision] = enc
            _sync(device)
        times: dict[str, list[float]] = {"fp32": [], "bf16": [], "fp32+loss": [], "bf16+loss": []}
        for _ in range(args.repeats):
            for precision, enc in encoders.items():
                for what, run in (("", enc.encode), ("+loss", enc.loss)):
                    if what and decoder is None:
                        continue
                    _sync(device)
                    start = time.perf_counter()
                    run(batch)
                    _sync(device)
                    times[precision + what].append(time.perf_counter() - start)
        flops = count_forward_flops(size, chip, bands)
        loss_flops = count_loss_flops(size, chip, bands, DecoderSize())
        for precision in ("fp32", "bf16"):
            chips_s = bs / statistics.median(times[precision])
            tflops = chips_s * flops / 1e12
            loss_cost = {}
            if decoder is not None:
                ratios = [
                    b / a for a, b in zip(times[precision], times[precision + "+loss"], strict=True)
                ]
                loss_cost = {
                    "loss_chips_per_s": round(
                        bs / statistics.median(times[precision + "+loss"]), 3
                    ),
                    "loss_time_over_embed_time": round(statistics.median(ratios), 3),
                    "loss_flops_over_embed_flops": round(loss_flops / flops, 3),
                    "loss_seconds": [round(t, 3) for t in times[precision + "+loss"]],
                }
            rows.append(
                {
                    **loss_cost,
                    "size": size,
                    "precision": precision,
                    "batch": bs,
                    "chips_per_s": round(chips_s, 3),
                    "tflop_per_chip": round(flops / 1e12, 4),
                    "achieved_tflops": round(tflops, 4),
                    "fraction_of_matmul_peak": round(tflops / peaks[precision], 3),
                    "seconds": [round(t, 3) for t in times[precision]],
                }
            )
        del encoders, model
    large = {r["precision"]: r["chips_per_s"] for r in rows if r["size"] == "large"}
    results = {
        "matmul_peak_tflops": {k: round(v, 4) for k, v in peaks.items()},
        "rows": rows,
        "large_bf16_over_reference_fp32_055": round(large["bf16"] / REFERENCE_FP32_LARGE, 3)
        if large
        else None,
        "large_bf16_over_fp32_same_machine": round(large["bf16"] / large["fp32"], 3)
        if large
        else None,
    }
    params = {
        **vars(args),
        "batch": batch_size,
        "bands": 10,
        "torch_threads": torch.get_num_threads(),
    }
    out = save("model_throughput", params, results, device=device.type)
    print(
        f"matmul peak: fp32 {peaks['fp32']:.3f} TFLOP/s, bf16 {peaks['bf16']:.3f} TFLOP/s ({n}^3)"
    )
    print(f"{'size':6s} {'prec':5s} {'batch':>5s} {'chips/s':>9s} {'TFLOP/s':>8s} {'of peak':>8s}")
    for r in rows:
        print(
            f"{r['size']:6s} {r['precision']:5s} {r['batch']:5d} {r['chips_per_s']:9.3f} {r['achieved_tflops']:8.3f} {r['fraction_of_matmul_peak']:8.2f}"
        )
        if "loss_time_over_embed_time" in r:
            print(
                f"       + loss: {r['loss_chips_per_s']:.3f} chips/s, "
                f"{r['loss_time_over_embed_time']:.2f}x the embedding time "
                f"({r['loss_flops_over_embed_flops']:.2f}x its FLOPs)"
            )
    if large:
        print(
            f"large bf16 / reference fp32 (0.55 chips/s): {results['large_bf16_over_reference_fp32_055']}x; bf16 / fp32 here: {results['large_bf16_over_fp32_same_machine']}x"
        )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
