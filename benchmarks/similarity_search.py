"""Exact similarity search at a million chips: queries per second on one machine.

Builds a :class:`xclay.explore.SimilarityIndex` of random 1024-d vectors (Clay
large's width; search cost does not depend on the values), then times one
query at a time (``search``: scores every chip, returns the top k as a
GeoDataFrame) and batches of queries (``search_many``: one matrix product).

    python benchmarks/similarity_search.py [--rows 1000000 --dim 1024 --batch 64]
    python benchmarks/similarity_search.py --smoke      # 2,000 rows of 64-d
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import median, parse, save, timed

from xclay.explore import SimilarityIndex


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--batch", type=int, default=64, help="queries per search_many call")
    p.add_argument("--repeats", type=int, default=10)
    args = parse(p, {"rows": 2000, "dim": 64, "batch": 4, "repeats": 1})

    rng = np.random.default_rng(0)
    vectors = np.empty((args.rows, args.dim), dtype=np.float32)
    for start in range(0, args.rows, 100_000):  # fill in blocks: no float64 temporaries
        stop = min(start + 100_000, args.rows)
        vectors[start:stop] = rng.standard_normal((stop - start, args.dim), dtype=np.float32)
    t0 = time.perf_counter()
    index = SimilarityIndex.from_vectors(vectors)
    build = time.perf_counter() - t0
    del vectors

    queries = rng.standard_normal((args.batch, args.dim), dtype=np.float32)
    index.search(queries[0], k=args.k)  # warm-up
    single, _ = timed(lambda: index.search(queries[1], k=args.k), args.repeats)
    index.search_many(queries, k=args.k)
    batched, _ = timed(lambda: index.search_many(queries, k=args.k), max(3, args.repeats // 3))

    # Exactness: the batched answer equals a float64 brute force for the first query.
    best, _ = index.search_many(queries[:1], k=args.k)
    unit = queries[0].astype(np.float64) / np.linalg.norm(queries[0])
    exact = np.argsort(-(index.unit[:, :] @ unit))[: args.k]
    results = {
        "index_build_s": round(build, 2),
        "index_bytes": int(index.unit.nbytes),
        "single_query_s_median": round(median(single), 4),
        "single_queries_per_s": round(1.0 / median(single), 2),
        "batched_call_s_median": round(median(batched), 3),
        "batched_queries_per_s": round(args.batch / median(batched), 1),
        "top_k_equals_float64_brute_force": bool(list(best[0]) == list(exact)),
    }
    path = save("similarity_search", vars(args), results)
    for key, value in results.items():
        print(f"{key:34s} {value}")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
