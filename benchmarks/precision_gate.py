"""The accuracy gate of the fast precisions on real imagery: how Clay's embeddings in
bf16, tf32 and FP8 agree with strict fp32.

Clay with the large model's shapes (random weights fixed by ``--seeds``: the gate is a
property of the arithmetic, not of trained weights) embeds every chip of a 256 x 256 px
cut of the Landsat 7 scene over Olinda (``benchmarks/data/gate_chips.npz``: real pixels,
in the repository, read with NumPy alone; ``--write-chips`` cuts it again from
../shared/data) at each ``--chips SIZE:STRIDE``, in strict fp32 and
in each precision, exactly as a run sets the encoder up (weights cast once; FP8: e4m3
operands with per-row scales, fp32 accumulation). Per precision: cosine similarity per
chip (min, median) and 10-nearest-neighbour recall over the chip set, against the gates
(bf16/tf32 cosine min >= 0.999; fp8 cosine min >= 0.995 and 10-NN recall >= 0.95).

On a CPU, FP8 is emulated (the same quantised operands multiplied in fp32: what the
tests run); on an FP8 GPU both the tensor-core and the emulated products are measured.

    python benchmarks/precision_gate.py                           # CPU: bf16, fp8 (emulated)
    python benchmarks/precision_gate.py --device cuda             # + tf32, fp8 on tensor cores
    python benchmarks/precision_gate.py --chips 32:16 --seeds 0 1 2
    python benchmarks/precision_gate.py --smoke      # Clay tiny shapes, 64 px chips
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from _common import HERE, parse, save

import xclay
from xclay.devices import ComputePrecision, resolve_precision
from xclay.errors import DeviceError
from xclay.models.agreement import GATES, agreement
from xclay.models.clay import ClayV15
from xclay.models.clay_encoder import ClayEncoder

CHIPS = HERE / "data" / "gate_chips.npz"
SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "landsat7-olinda" / "L7_ETMs.tif"
# ETM+ bands 1, 2, 3, 4, 5, 7 (../shared/data/README.md)
BANDS = ["blue", "green", "red", "nir08", "swir16", "swir22"]
WAVELENGTHS = [0.483, 0.560, 0.662, 0.835, 1.648, 2.206]
CUT = (48, 46, 256)  # first row, first column, edge: the middle of the 352 x 349 px scene


def write_chips(path: Path = CHIPS) -> Path:
    """Cut the gate's pixels from the Landsat scene in ../shared/data (needs rioxarray)."""
    import rioxarray

    scene = rioxarray.open_rasterio(SCENE)
    r, c, n = CUT
    cut = scene.isel(y=slice(r, r + n), x=slice(c, c + n))
    transform = cut.rio.transform()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        pixels=np.asarray(cut.values, dtype=np.uint8),
        transform=np.array(transform[:6], dtype=np.float64),
        crs=np.array(str(cut.rio.crs)),
        bands=np.array(BANDS),
        wavelengths=np.array(WAVELENGTHS),
        source=np.array(
            f"{SCENE.name} (../shared/data/landsat7-olinda: Landsat 7 ETM+, Olinda, from the "
            f"R package stars, Apache-2.0; imagery courtesy of the U.S. Geological Survey), "
            f"rows {r}:{r + n}, columns {c}:{c + n}"
        ),
    )
    return path


def gate_cube(path: Path = CHIPS) -> xr.Dataset:
    """The gate's datacube from the array file: NumPy, odc-geo and xclay only."""
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    with np.load(path) as stored:
        pixels, transform = stored["pixels"], stored["transform"]
        crs, bands = str(stored["crs"]), [str(b) for b in stored["bands"]]
        waves = [float(w) for w in stored["wavelengths"]]
    geobox = GeoBox(pixels.shape[1:], Affine(*transform), crs)
    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    raster = xr.DataArray(
        pixels,
        dims=("band", "y", "x"),
        coords={"band": bands, "y": coords["y"], "x": coords["x"],
                "spatial_ref": coords["spatial_ref"]},
    )  # fmt: skip
    return xclay.as_datacube(raster, bands=bands, wavelengths=waves)


def gate_chips(size: int, stride: int, path: Path = CHIPS) -> tuple[Any, Any]:
    """Every chip of the gate's cut (in the sampler's order) as a ``ChipBatch``, and the
    ``InputSpec`` an encoder gets for it."""
    from xclay.batch.batching import make_sampler
    from xclay.batch.chips import ChipGrid, ChipGridSpec
    from xclay.batch.readers import WindowSource
    from xclay.datacube import datacube_geobox
    from xclay.embed import input_spec

    cube = gate_cube(path)
    source = WindowSource(cube["pixels"], None)
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(size, stride))
    times = cube["time"].values
    batch = make_sampler(source, grid, times)(grid.rows * grid.cols * len(times), 0)
    return batch, input_spec(cube, source, size, len(batch))


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
    weights: ClayEncoder,
    chips: Any,
    spec: Any,
    device: torch.device,
    precision: ComputePrecision,
    size: str = "large",
) -> tuple[Any, float]:
    """Embeddings of ``chips`` in ``precision`` (the encoder set up as a run sets it up, no
    check of its own) and the seconds it took."""
    enc = ClayV15(
        copy.deepcopy(weights),
        size=size,
        normalization="measured",
        precision_check=0,
        compile=False,
    )
    ready = enc.prepare(spec, lambda n, s: chips, device=device, precision=precision)
    start = time.perf_counter()
    parts = [ready.encode(chips.rows(i, i + 64)).cpu() for i in range(0, len(chips), 64)]
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
    p.add_argument("--size", default="large", help="Clay's model size (its shapes)")
    p.add_argument(
        "--write-chips", action="store_true", help=f"cut {CHIPS.name} again from {SCENE}"
    )
    args = parse(p, {"chips": ["64:64"], "size": "tiny", "write_chips": False})
    if args.write_chips:
        print(f"wrote {write_chips()}")
        return
    device = torch.device(args.device)
    rows = []
    layouts = []
    for layout in args.chips:
        size, stride = (int(v) for v in layout.split(":"))
        chips, spec = gate_chips(size, stride)
        chips = dataclasses.replace(
            chips, pixels=chips.pixels.to(device), valid=chips.valid.to(device)
        )
        layouts.append((size, stride, chips, spec))
    for seed in args.seeds:
        torch.manual_seed(seed)
        weights = ClayEncoder.from_size(args.size).eval()  # made once a seed: seconds for large
        for size, stride, chips, spec in layouts:
            strict, strict_s = embed(
                weights, chips, spec, device, ComputePrecision("fp32"), args.size
            )
            for precision in precisions_for(device):
                vectors, seconds = embed(weights, chips, spec, device, precision, args.size)
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
        "scene": "landsat7-olinda (Landsat 7 ETM+, 6 bands, 28.5 m), 256 x 256 px cut",
        "chips_file": str(CHIPS.relative_to(HERE.parent)),
        "model": f"Clay v1.5 {args.size} shapes, random weights (seeds), normalisation measured",
        "gates": GATES,
    }
    out = save("precision_gate", params, {"rows": rows}, device=device.type)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
