"""End-to-end chips/s against encoder-only chips/s: how much the data path costs.

End to end: ``xclay.embed`` on a datacube opened lazily from Zarr on disk
(read, validity, batch assembly, encode, results into the output arrays).
Encoder only: the same encoder on the same batches, already in memory.
Pipeline efficiency = end-to-end / encoder-only (1.0: the data path is free).

On a shared machine whose speed drifts, end-to-end and encoder-only runs are
interleaved and the efficiency is the median of the pairs. Beside it, a
drift-proof decomposition: the data path alone (the same ``embed`` call with
an encoder that does no work, no prefetch) in ms/chip, and the efficiency it
implies with no overlap at all, ``t_enc / (t_enc + t_data)``, a lower bound.
The data path is timed twice, interleaved: with direct chunk reads
(:mod:`xclay.datacube.chunks`, the default for stores xclay wrote) and through
xarray and zarr-python.

    python benchmarks/embed_pipeline.py                 # demo cube 2048 px, rcf, 256 px chips
    python benchmarks/embed_pipeline.py --compression none --prefetch 0
    python benchmarks/embed_pipeline.py --device cuda --model clay-large   # kvikio on a GPU
    python benchmarks/embed_pipeline.py --smoke      # 512 px cube, 128 px chips, one pair

End to end is a session's steady state, as a run's worker sees it: the encoder is
prepared once (:class:`xclay.embed.EmbedSession`: normalisation, precision check,
compilation; timed apart as ``prepare_s``), then each measurement embeds every chip of
the cube and builds its Dataset. ``params.engine`` is the engine that read the chips
(``engine_requested`` the one asked for).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import median, parse, save, timed, used_engine

import xclay
from xclay.batch.batching import BatchPlan, Block, iter_batches, to_chip_batch
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.batch.readers import WindowSource
from xclay.datacube import datacube_geobox
from xclay.embed import EmbedSession, embed_config
from xclay.model_card import ModelCard
from xclay.quality import ChipQuality


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=int, default=2048, help="demo cube edge in pixels")
    p.add_argument("--chip-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="rcf", help="registry name, or clay-<size> (random weights)")
    p.add_argument("--compression", choices=("zstd", "lz4", "none"), default="zstd")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved end-to-end/encoder pairs")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--engine",
        choices=("zarr", "kvikio", "auto"),
        default="auto",
        help="how the end-to-end runs read chips (kvikio: into GPU memory; auto: kvikio on a GPU)",
    )
    p.add_argument(
        "--cube",
        type=Path,
        default=None,
        help="keep the demo datacube here and reuse it when it exists (several runs, one cube)",
    )
    p.add_argument("--data-repeats", type=int, default=7, help="timings of the data path alone")
    p.add_argument("--filters", type=int, default=None, help="rcf's filters (default: rcf's)")
    args = parse(
        p,
        {"size": 512, "chip_size": 128, "batch_size": 4, "repeats": 1, "data_repeats": 1,
         "model": "rcf", "filters": 16, "cube": None},
    )  # fmt: skip

    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.cube or Path(tmp) / "cube.zarr"
        if not (path / "zarr.json").is_file():
            xclay.write_datacube(
                xclay.datasets.demo_composite(args.size),
                path,
                chip_size=args.chip_size,
                compression=args.compression,
            )
        cube = xclay.open_datacube(path)
        encoder = _encoder(args.model, args.filters)
        options = {
            "chip_size": args.chip_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "engine": args.engine,
            "progress": False,
        }
        # One whole embed call first (warm-up; fits rcf once), timed: open, prepare, embed.
        embed_call_s, emb = timed(
            lambda: xclay.embed(cube, model=encoder, prefetch=args.prefetch, **options), 1
        )
        chips = emb.attrs["run"]["chips_embedded"]
        start = time.perf_counter()
        opened = xclay.open_datacube(path)
        session = EmbedSession(
            opened,
            encoder,
            embed_config(
                opened,
                encoder,
                chip_size=args.chip_size,
                batch_size=args.batch_size,
                device=args.device,
                engine=args.engine,
                prefetch=args.prefetch,
            ),
        )
        prepare_s = time.perf_counter() - start

        def end_to_end() -> object:
            return session.dataset(session.embed_block(progress=False))

        emb = end_to_end()
        assert emb.attrs["run"]["chips_embedded"] == chips
        data_path = session.data_path

        # The same batches, read once into memory: the encoder alone.
        grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip_size=args.chip_size))
        plan = BatchPlan(grid=grid, block=Block.whole(1, grid), batch_size=args.batch_size)
        lon, lat = grid.centres_lonlat()
        lonlat = np.stack([lon, lat], -1)
        fraction = ChipQuality.empty((1, grid.rows, grid.cols), with_classes=False)
        batches = [
            to_chip_batch(_copy(h), lonlat, cube["time"].values, device)
            for h in iter_batches(WindowSource(cube["pixels"]), plan, fraction, prefetch=0)
            if len(h)
        ]
        assert sum(len(b) for b in batches) == chips

        def encoder_only() -> None:
            for b in batches:
                encoder.encode(b)
            if device.type == "cuda":
                torch.cuda.synchronize()

        encoder_only()
        data_times, zarr_times = [], []
        for _ in range(args.data_repeats):
            for through_zarr, times in ((False, data_times), (True, zarr_times)):
                opened = _opened(path, through_zarr)
                engine = "zarr" if through_zarr else args.engine
                times += timed(
                    lambda c=opened, e=engine: xclay.embed(
                        c, model=NullEncoder(), prefetch=0, **{**options, "engine": e}
                    ),
                    1,
                )[0]
        # Interleaved (A, B, A, B, ...): a machine whose speed drifts slows both sides alike.
        e2e_times, enc_times = [], []
        for _ in range(args.repeats):
            e2e_times += timed(end_to_end, 1)[0]
            enc_times += timed(encoder_only, 1)[0]
        session.close()

    e2e = chips / median(e2e_times)
    enc = chips / median(enc_times)
    efficiency = median([b / a for a, b in zip(e2e_times, enc_times, strict=True)])
    data_ms = 1e3 * median(data_times) / chips
    zarr_ms = 1e3 * median(zarr_times) / chips
    enc_ms = 1e3 / enc
    results = {
        "chips": chips,
        "data_path_ms_per_chip": round(data_ms, 3),
        "data_path_through_zarr_ms_per_chip": round(zarr_ms, 3),
        "direct_reads_speedup": round(zarr_ms / data_ms, 2),
        "encoder_ms_per_chip": round(enc_ms, 3),
        "efficiency_lower_bound_no_overlap": round(enc_ms / (enc_ms + data_ms), 3),
        "end_to_end_chips_per_s": round(e2e, 3),
        "encoder_only_chips_per_s": round(enc, 3),
        "pipeline_efficiency": round(efficiency, 3),
        "efficiency_per_pair": [round(b / a, 3) for a, b in zip(e2e_times, enc_times, strict=True)],
        "data_path": data_path,
        "prepare_s": round(prepare_s, 3),
        "embed_call_s": round(embed_call_s[0], 3),
        "end_to_end_seconds": [round(t, 3) for t in e2e_times],
        "encoder_only_seconds": [round(t, 3) for t in enc_times],
    }
    params = {
        **used_engine(vars(args), data_path["engine"]),
        "cube": str(args.cube) if args.cube else None,
        "cube_shape": list(cube["pixels"].shape),
        "dtype": str(cube["pixels"].dtype),
        "embedding_dim": encoder.card.dim,
        "torch_threads": torch.get_num_threads(),
    }
    variant = f"{args.model}_{args.compression}_prefetch{args.prefetch}"
    if data_path["engine"] != "zarr":
        variant += f"_{data_path['engine']}"
    out = save("embed_pipeline", params, results, device=device.type, variant=variant)
    print(f"{'':24s}{'chips/s':>10s}")
    print(f"{'end to end':24s}{e2e:10.2f}")
    print(f"{'encoder only':24s}{enc:10.2f}")
    print(
        f"pipeline efficiency     {efficiency:10.3f}   (median of {args.repeats} interleaved pairs; "
        f"{chips} chips, {args.compression}, prefetch {args.prefetch})"
    )
    print(f"data path alone         {data_ms:10.2f} ms/chip  (encoder: {enc_ms:.1f} ms/chip)")
    print(
        f"  through zarr-python   {zarr_ms:10.2f} ms/chip  ({zarr_ms / data_ms:.1f}x the direct reads)"
    )
    print(f"lower bound, no overlap {enc_ms / (enc_ms + data_ms):10.3f}")
    print(
        f"data path               {data_path['reader']}; fallbacks: {data_path['fallbacks'] or 'none'}"
    )
    print(f"saved {out}")


def _opened(path: Path, through_zarr: bool):
    """The cube opened lazily; ``through_zarr``: every time step selected by a list (a
    selection, so the variables no longer read their store unchanged), so every read goes
    through xarray and zarr-python rather than :mod:`xclay.datacube.chunks`."""
    cube = xclay.open_datacube(path)
    if through_zarr:
        cube = cube.isel(time=list(range(cube.sizes["time"])))
    return cube


def _encoder(name: str, filters: int | None = None):
    """A registry model, or ``clay-<size>``: Clay with random weights (speed does not depend on them)."""
    if name.startswith("clay-") and name != "clay-v1.5":
        from xclay.models.clay import ClayV15
        from xclay.models.clay_encoder import ClayEncoder

        torch.manual_seed(0)
        size = name.removeprefix("clay-")
        return ClayV15(ClayEncoder.from_size(size), size=size)
    if name == "rcf" and filters:
        return xclay.models.get_model(name, num_filters=filters)
    return xclay.models.get_model(name)


class NullEncoder:
    """Does no work: what is left of an embed call is the data path."""

    preferred_precision = "fp32"

    @property
    def card(self) -> ModelCard:
        return ModelCard(
            name="null", version="0", family="none", description="no-op", dim=1, output="pooled"
        )

    def prepare(self, spec, sample, *, device, precision) -> None:
        pass

    def encode(self, batch):
        return torch.zeros(len(batch), 1)


def _copy(host):  # the pool reuses buffers: keep a copy of each batch
    from dataclasses import replace

    return replace(
        host, pixels=host.pixels.copy(), valid=host.valid.copy(), index=host.index.copy()
    )


if __name__ == "__main__":
    main()
