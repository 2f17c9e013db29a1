"""The accuracy gate of the fast precisions on real imagery: how Clay's embeddings in
bf16, tf32 and FP8 agree with strict fp32.

Clay with the large model's shapes (random weights fixed by ``--seeds``: the gate is a
property of the arithmetic, not of trained weights) embeds every chip of the Landsat 7
scene over Olinda (../shared/data) at each ``--chips SIZE:STRIDE``, in strict fp32 and
in each precision, exactly as a run sets the encoder up (weights cast once; FP8: e4m3
operands with per-row scales, fp32 accumulation). Per precision: cosine similarity per
chip (min, median) and 10-nearest-neighbour recall over the chip set, against the gates
(bf16/tf32 cosine min >= 0.999; fp8 cosine min >= 0.995 and 10-NN recall >= 0.95).

On a CPU, FP8 is emulated (the same quantised operands multiplied in fp32: what the
tests run); on an FP8 GPU both the tensor-core and the emulated products are measured.

    python benchmarks/precision_gate.py                           # CPU: bf16, fp8 (emulated)
    python benchmarks/precision_gate.py --device cuda             # + tf32, fp8 on tensor cores
    python benchmarks/precision_gate.py --chips 32:16 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import save

from xclay.devices import ComputePrecision, resolve_precision
from xclay.errors import DeviceError
from xclay.models.agreement import GATES, agreement
from xclay.models.clay import ClayV15
from xclay.models.clay_encoder import ClayEncoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import OLINDA_TIF, olinda_chips  # noqa: E402


def precisions_for(device: torch.device) -> list[ComputePrecision]:
    """Every fast precision this device computes, FP8 emulated as well where it has FP8."""
    out = []
    for name in ("tf32", "bf16", "fp8"):
        try:
            out.append(resolve_precision(name, device, "bf16"))  # type: ignore[arg-type]
        except DeviceError:
            continue
    return [*out, ComputePrecision("fp8", emulated=True)]


def embed(
    weights: ClayEncoder, chips: Any, spec: Any, device: torch.device, precision: ComputePrecision
) -> tuple[Any, float]:
    """Embeddings of ``chips`` in ``precision`` (the encoder set up as a run sets it up, no
    check of its own) and the seconds it took."""
    enc = ClayV15(
        copy.deepcopy(weights),
        size="large",
        normalization="measured",
        precision_check=0,
        compile=False,
    )
    enc.prepare(spec, lambda n, s: chips, device=device, precision=precision)
    start = time.perf_counter()
    parts = [enc.encode(chips.rows(i, i + 64)).cpu() for i in range(0, len(chips), 64)]
    return torch.cat(parts).numpy(), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--chips", nargs="+", default=["32:16", "64:32", "128:32"], help="SIZE:STRIDE px"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    args = p.parse_args()
    if not OLINDA_TIF.is_file():
        raise SystemExit(f"needs the real scene at {OLINDA_TIF}")
    device = torch.device(args.device)
    rows = []
    for layout in args.chips:
        size, stride = (int(v) for v in layout.split(":"))
        chips, spec = olinda_chips(OLINDA_TIF, size, stride)
        chips = dataclasses.replace(
            chips, pixels=chips.pixels.to(device), valid=chips.valid.to(device)
        )
        for seed in args.seeds:
            torch.manual_seed(seed)
            weights = ClayEncoder.from_size("large").eval()
            strict, strict_s = embed(weights, chips, spec, device, ComputePrecision("fp32"))
            for precision in precisions_for(device):
                vectors, seconds = embed(weights, chips, spec, device, precision)
                figures = agreement(strict, vectors, precision.name).to_dict()
                rows.append(
                    {
                        **figures,
                        "chip_size": size,
                        "stride": stride,
                        "seed": seed,
                        "precision": precision.name + (" emulated" if precision.emulated else ""),
                        "seconds": round(seconds, 2),
                        "fp32_seconds": round(strict_s, 2),
                    }
                )
                r = rows[-1]
                print(
                    f"{size:3d}:{stride:<3d} seed {seed} {r['precision']:13s} {r['chips']:4d} chips"
                    f"  cosine min {r['cosine_min']:.5f} median {r['cosine_median']:.5f}"
                    f"  10-NN {r['knn10_recall']:.3f}  {'passes' if r['passes'] else 'FAILS'}"
                )
    params = {
        **vars(args),
        "scene": "landsat7-olinda (Landsat 7 ETM+, 6 bands, 28.5 m)",
        "model": "Clay v1.5 large shapes, random weights (seeds), normalisation measured",
        "gates": GATES,
    }
    out = save("precision_gate", params, {"rows": rows}, device=device.type)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
