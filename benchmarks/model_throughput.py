"""Clay encoder throughput in each precision: chips/s, achieved TFLOP/s, and the fraction
of that precision's matrix-multiply peak measured in the same run on the same machine.

Sizes tiny, base and large, chip sizes 128 and 256 px (10 bands), random weights fixed
by seed (throughput does not depend on their values). Each precision gets its own copy
of the same weights, set up exactly as ``xclay.embed`` sets it up (weights cast once,
the fastest attention kernel found by a timed probe, ``torch.compile`` on CUDA by
default, static batches), and its card's figures are reported: attention backend,
compile seconds, and the accuracy check against strict fp32 (cosine min/median and
10-NN recall on ``--check`` chips of distinct spectra; the gate on real imagery is
``benchmarks/precision_gate.py``). Precisions are timed interleaved, so a machine whose
speed drifts slows them alike.

With ``--loss`` it also times the per-chip reconstruction loss (a masked encoder pass
over a quarter of the tokens, then the v1.5 decoder), interleaved with the plain pass.

    python benchmarks/model_throughput.py                          # CPU: fp32, bf16
    python benchmarks/model_throughput.py --sizes large --loss     # + the loss's cost
    python benchmarks/model_throughput.py --device cuda            # fp32 tf32 bf16 fp8
    python benchmarks/model_throughput.py --device cuda --sizes large --chip-sizes 256 \\
        --precisions bf16 fp8 --batch large=auto
    python benchmarks/model_throughput.py --smoke      # Clay tiny, 64 px, batch 2, once

One results file per chip size (``params.chip_size``; each row says it too), named
``model_throughput_<device>[_<tag>]_<chip>px_<date>.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from typing import Any

import numpy as np
import torch
from _common import parse, save

from xclay.devices import ComputePrecision, resolve_precision
from xclay.errors import DeviceError
from xclay.models.clay import ClayV15, PreparedClay
from xclay.models.clay_decoder import ClayDecoder, DecoderSize, count_loss_flops
from xclay.models.clay_encoder import ClayEncoder, count_forward_flops
from xclay.protocols import ChipBatch, InputSpec

DEFAULT_BATCH = {
    "cpu": {"tiny": 16, "base": 4, "large": 2},
    "cuda": {"tiny": 512, "base": 256, "large": 128},
}
DEFAULT_PRECISIONS = {"cpu": ["fp32", "bf16"], "cuda": ["fp32", "tf32", "bf16", "fp8"]}
REFERENCE_FP32_LARGE = 0.55  # chips/s, the reference code on a 2-core CPU (specs/)
BANDS = 10


def matmul_peak(device: torch.device, precision: str, n: int, repeats: int = 10) -> float:
    """Median TFLOP/s of an n x n x n matrix product in ``precision`` on random data
    (fp8: e4m3 operands with per-row scales through ``torch._scaled_mm``, as the
    encoder's FP8 layers multiply)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    mode = ComputePrecision("tf32" if precision == "tf32" else "fp32").matmul_mode()
    if precision == "fp8":
        from xclay.models.fp8 import _scaled_mm, quantize

        (qa, sa), (qb, sb) = quantize(a), quantize(b)

        def product() -> Any:
            return _scaled_mm(qa, qb, sa, sb)
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        a, b = a.to(dtype), b.to(dtype)

        def product() -> Any:
            return a @ b

    with mode:
        for _ in range(3):
            product()
        times = []
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            product()
            _sync(device)
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def chips(n: int, chip: int, device: torch.device, seed: int) -> ChipBatch:
    """``n`` chips, each its own spectrum plus texture (neighbours mean something)."""
    g = torch.Generator().manual_seed(seed)
    spectra = 500 + 3000 * torch.rand(n, BANDS, 1, 1, generator=g)
    texture = 400 * torch.rand(n, BANDS, chip, chip, generator=g)
    return ChipBatch(
        pixels=(spectra + texture).to(torch.uint16).to(device),
        valid=torch.ones(n, chip, chip, dtype=torch.bool, device=device),
        lonlat=torch.tensor([[-60.5 + 0.01 * i, -3.2] for i in range(n)], dtype=torch.float64),
        time=np.array(["2024-07-02"] * n, dtype="datetime64[ns]"),
        chip_ids=np.array([f"EPSG32720_{chip}px_10m_{i}_0" for i in range(n)]),
    )


def measure(
    args: argparse.Namespace,
    device: torch.device,
    size: str,
    chip: int,
    batch_request: int | str,
    precisions: list[str],
    peaks: dict[str, float],
) -> list[dict[str, Any]]:
    """Rows for one model size and chip size, every precision timed interleaved."""
    spec = InputSpec(
        None,
        tuple(f"b{i}" for i in range(BANDS)),
        tuple(0.45 + 0.17 * i for i in range(BANDS)),
        10.0,
        0,
        "uint16",
        chip,
    )
    norm = dict.fromkeys(spec.bands, (2000.0, 1000.0))
    torch.manual_seed(0)
    weights = ClayEncoder.from_size(size).eval()
    decoder = ClayDecoder(weights.dim, DecoderSize()).eval() if args.loss else None
    if batch_request == "auto":
        hint = ClayV15(weights, size=size, normalization=norm)  # reads the size only
        bs = hint.batch_size_hint(device, chip, BANDS)
    else:
        bs = int(batch_request)
    spec = dataclasses.replace(spec, batch_size=bs)
    batch = chips(bs, chip, device, seed=1)
    check = chips(max(args.check, 1), chip, device, seed=2)
    encoders: dict[str, PreparedClay] = {}
    for name in precisions:
        enc = ClayV15(
            copy.deepcopy(weights),  # a precision's set-up converts its own copy
            size=size,
            normalization=norm,
            compile={"auto": None, "on": True, "off": False}[args.compile],
            precision_check=args.check,
        )
        if decoder is not None:
            enc.decoder = copy.deepcopy(decoder)
            enc.enable_loss(0)
        ready = enc.prepare(
            spec,
            lambda k, s: check.rows(0, k),
            device=device,
            precision=resolve_precision(name, device, "bf16"),  # type: ignore[arg-type]
        )
        ready.encode(batch)  # warm-up
        if decoder is not None:
            ready.loss(batch)
        encoders[name] = ready
        _sync(device)
    times: dict[str, list[float]] = {k + w: [] for k in encoders for w in ("", "+loss")}
    for _ in range(args.repeats):
        for name, enc in encoders.items():
            for what, run in (("", enc.encode), ("+loss", enc.loss)):
                if what and decoder is None:
                    continue
                _sync(device)
                start = time.perf_counter()
                run(batch)
                _sync(device)
                times[name + what].append(time.perf_counter() - start)
    flops = count_forward_flops(size, chip, BANDS)
    rows = []
    for name, enc in encoders.items():
        card = enc.card.params
        chips_s = bs / statistics.median(times[name])
        tflops = chips_s * flops / 1e12
        row: dict[str, Any] = {
            "size": size,
            "chip_size": chip,
            "precision": name,
            "batch": bs,
            "chips_per_s": round(chips_s, 3),
            "tflop_per_chip": round(flops / 1e12, 4),
            "achieved_tflops": round(tflops, 4),
            "fraction_of_matmul_peak": round(tflops / peaks[name], 3),
            "attention": card.get("attention"),
            "compiled": card.get("compiled"),
            "compile_seconds": card.get("compile_seconds"),
            "precision_check": card.get("precision_check"),
            "fp8_scaling": card.get("fp8_scaling"),
            "seconds": [round(t, 4) for t in times[name]],
        }
        if decoder is not None:
            loss_flops = count_loss_flops(size, chip, BANDS, DecoderSize())
            ratios = [b / a for a, b in zip(times[name], times[name + "+loss"], strict=True)]
            row |= {
                "loss_chips_per_s": round(bs / statistics.median(times[name + "+loss"]), 3),
                "loss_time_over_embed_time": round(statistics.median(ratios), 3),
                "loss_flops_over_embed_flops": round(loss_flops / flops, 3),
            }
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs="+", default=["tiny", "base", "large"])
    p.add_argument("--chip-sizes", nargs="+", type=int, default=None, help="default 256")
    p.add_argument("--precisions", nargs="+", default=None, help="default: all the device runs")
    p.add_argument(
        "--batch", nargs="*", default=[], help="per-size batch or auto, e.g. large=2 tiny=auto"
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved passes per precision")
    p.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="auto: on CUDA only"
    )
    p.add_argument(
        "--check",
        type=int,
        default=None,
        help="chips compared with strict fp32 per fast precision (default 32 on CUDA, 0 on CPU)",
    )
    p.add_argument("--loss", action="store_true", help="also time the reconstruction loss")
    p.add_argument("--tag", default="", help="added to the results file's name")
    p.add_argument(
        "--matmul-size", type=int, default=None, help="edge of the peak's matrix product"
    )
    args = parse(
        p,
        {"sizes": ["tiny"], "chip_sizes": [64], "repeats": 1, "batch": ["tiny=2"],
         "check": 2, "matmul_size": 256, "compile": "off"},
    )  # fmt: skip
    device = torch.device(args.device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    args.chip_sizes = args.chip_sizes or [256]
    args.check = args.check if args.check is not None else (32 if kind == "cuda" else 0)
    requested = args.precisions or DEFAULT_PRECISIONS[kind]
    precisions = []
    for name in requested:
        try:
            resolve_precision(name, device, "bf16")
        except DeviceError as err:
            print(f"skipping {name}: {err}")
            continue
        precisions.append(name)
    batch_size: dict[str, int | str] = {
        **DEFAULT_BATCH[kind],
        **{k: (v if v == "auto" else int(v)) for k, v in (b.split("=") for b in args.batch)},
    }

    n = args.matmul_size or (8192 if kind == "cuda" else 2048)
    peaks = {name: matmul_peak(device, name, n) for name in precisions}
    print(
        "matmul peak (" + f"{n}^3): " + ", ".join(f"{k} {v:.3f} TFLOP/s" for k, v in peaks.items())
    )
    for chip in args.chip_sizes:
        rows = []
        for size in args.sizes:
            rows += measure(args, device, size, chip, batch_size[size], precisions, peaks)
        out = save_chip_size(args, device, chip, precisions, batch_size, peaks, rows)
        _print(rows)
        print(f"saved {out}")


def save_chip_size(
    args: argparse.Namespace,
    device: torch.device,
    chip: int,
    precisions: list[str],
    batch_size: dict[str, int | str],
    peaks: dict[str, float],
    rows: list[dict[str, Any]],
) -> Any:
    """One results file for one chip size (every row of it at that size)."""
    assert all(r["chip_size"] == chip for r in rows)
    large = {r["precision"]: r["chips_per_s"] for r in rows if r["size"] == "large"}
    reference = chip == 256  # the reference figure is Clay large at 256 px
    results = {
        "chip_size": chip,
        "matmul_peak_tflops": {k: round(v, 4) for k, v in peaks.items()},
        "rows": rows,
        "large_bf16_over_reference_fp32_055": round(large["bf16"] / REFERENCE_FP32_LARGE, 3)
        if reference and "bf16" in large
        else None,
        "large_bf16_over_fp32_same_machine": round(large["bf16"] / large["fp32"], 3)
        if {"bf16", "fp32"} <= set(large)
        else None,
    }
    params = {
        **vars(args),
        "chip_size": chip,
        "precisions": precisions,
        "batch": batch_size,
        "bands": BANDS,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    variant = "_".join(v for v in (args.tag, f"{chip}px") if v)
    out = save("model_throughput", params, results, device=device.type, variant=variant)
    if results["large_bf16_over_reference_fp32_055"] is not None:
        print(
            f"large bf16 / reference fp32 (0.55 chips/s): "
            f"{results['large_bf16_over_reference_fp32_055']}x; bf16 / fp32 here: "
            f"{results['large_bf16_over_fp32_same_machine']}x"
        )
    return out


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'size':6s} {'chip':>4s} {'prec':5s} {'batch':>5s} {'chips/s':>10s} {'TFLOP/s':>8s} "
        f"{'of peak':>7s} {'attention':>9s} {'compile s':>9s}  check (cos min, 10-NN)"
    )
    for r in rows:
        check = r["precision_check"] or {}
        figures = (
            f"{check['cosine_min']:.5f}, {check['knn10_recall']}"
            + ("" if check["passes"] else " FAILS")
            if check
            else "-"
        )
        print(
            f"{r['size']:6s} {r['chip_size']:4d} {r['precision']:5s} {r['batch']:5d} "
            f"{r['chips_per_s']:10.3f} {r['achieved_tflops']:8.3f} "
            f"{r['fraction_of_matmul_peak']:7.2f} {r['attention']!s:>9s} "
            f"{r['compile_seconds'] if r['compile_seconds'] is not None else '-'!s:>9s}  {figures}"
        )
        if "loss_time_over_embed_time" in r:
            print(
                f"       + loss: {r['loss_chips_per_s']:.3f} chips/s, "
                f"{r['loss_time_over_embed_time']:.2f}x the embedding time "
                f"({r['loss_flops_over_embed_flops']:.2f}x its FLOPs)"
            )


if __name__ == "__main__":
    main()
