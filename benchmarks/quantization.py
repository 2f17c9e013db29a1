"""int8 vectors: storage saved, and how close they stay to float32, on real imagery.

Embeds the Landsat 7 Olinda scene (../shared/data) with rcf, writes the
embeddings as float32 and as int8 (one scale per vector) to Zarr and
GeoParquet, and reports bytes on disk, the cosine similarity of every
restored vector to its float32 original, and how many of each chip's 10
nearest neighbours (cosine) survive quantisation.

    python benchmarks/quantization.py [--chip-size 16 --stride 8 --filters 512]
    python benchmarks/quantization.py --smoke      # 32 px chips, 32 filters
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import parse, require, save

import xclay

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.helpers import OLINDA_BANDS, OLINDA_TIF, OLINDA_WAVELENGTHS  # noqa: E402


def _bytes(path: Path, names: tuple[str, ...] | None = None) -> int:
    """Bytes of files under ``path`` (only the chunks of ``names`` for a Zarr store)."""
    if path.is_file():
        return path.stat().st_size
    roots = [path / n / "c" for n in names] if names else [path]
    return sum(f.stat().st_size for r in roots for f in r.rglob("*") if f.is_file())


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _neighbours(v: np.ndarray, k: int) -> np.ndarray:
    sim = _unit(v) @ _unit(v).T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1)[:, :k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chip-size", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--filters", type=int, default=512, help="rcf filters (dim = 2 x filters)")
    args = parse(p, {"chip_size": 32, "stride": 32, "filters": 32})
    require(OLINDA_TIF, "the real scene (../shared/data)")
    import rioxarray

    cube = xclay.as_datacube(
        rioxarray.open_rasterio(OLINDA_TIF), bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS
    )
    model = xclay.models.get_model("rcf", num_filters=args.filters)
    emb = xclay.embed(
        cube, model=model, chip_size=args.chip_size, stride=args.stride, progress=False
    )
    embedded = emb["embedded"].values
    vectors = emb["embedding"].values[embedded]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        f32_zarr = xclay.to_zarr(emb, out / "f32.zarr")
        i8_zarr = xclay.to_zarr(emb, out / "i8.zarr", quantize="int8")
        f32_pq = xclay.to_geoparquet(emb, out / "f32.parquet")
        i8_pq = xclay.to_geoparquet(emb, out / "i8.parquet", quantize="int8")
        restored = xclay.open_embeddings(i8_zarr)["embedding"].values[embedded]
        sizes = {
            "zarr_float32_vector_bytes": _bytes(f32_zarr, ("embedding",)),
            "zarr_int8_vector_bytes": _bytes(i8_zarr, ("embedding", "embedding_scale")),
            "zarr_float32_store_bytes": _bytes(f32_zarr),
            "zarr_int8_store_bytes": _bytes(i8_zarr),
            "geoparquet_float32_bytes": _bytes(f32_pq),
            "geoparquet_int8_bytes": _bytes(i8_pq),
        }
    cosine = (_unit(vectors) * _unit(restored)).sum(axis=1)
    k = 10
    before, after = _neighbours(vectors, k), _neighbours(restored, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(before, after, strict=True)])
    results = {
        "chips": int(vectors.shape[0]),
        "dim": int(vectors.shape[1]),
        **sizes,
        "zarr_vector_ratio": sizes["zarr_float32_vector_bytes"] / sizes["zarr_int8_vector_bytes"],
        "geoparquet_ratio": sizes["geoparquet_float32_bytes"] / sizes["geoparquet_int8_bytes"],
        "cosine_min": float(cosine.min()),
        "cosine_p01": float(np.percentile(cosine, 1)),
        "cosine_mean": float(cosine.mean()),
        f"knn{k}_recall": float(recall),
    }
    params = {
        "scene": "landsat7-olinda",
        "model": f"rcf num_filters={args.filters}",
        "chip_size": args.chip_size,
        "stride": args.stride,
    }
    path = save("quantization", params, results)
    for key, value in results.items():
        print(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
