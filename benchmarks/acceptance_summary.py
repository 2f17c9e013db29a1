"""The GPU goals against the results of one code (the last step of gpu_acceptance.sh).

Reads the result JSONs in the results folder that carry the given code hash
(benchmarks/code_hash.sh; default: this tree's) and holds each figure to its goal:

- Clay large 256 px, end to end from zstd with engine kvikio / encoder alone >= 0.95
- reads of 256 px chunks, kvikio / raw reads >= 0.8, zstd and uncompressed
- Clay large 256 px encoder throughput: bf16 >= 800 chips/s, fp8 >= 1,200 chips/s with
  its accuracy check passing
- the precision gate on real imagery passes; the gpu tests pass; the cluster's
  embeddings are the in-process run's
- a training step fed by ChipDataset (DataLoader workers; kvikIO in process) / the same
  step on batches already on the GPU >= 0.95

A figure counts only where its file says it is what the goal names: a CUDA device, the
chip size (``params.chip_size``, and every row's), the engine that actually read the
chips (``params.engine``), the model and the compression. Anything else is "not
measured", with the reason.

    python benchmarks/acceptance_summary.py [--code HASH] [--results DIR]
    python benchmarks/acceptance_summary.py --smoke      # this tree's CPU smoke results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import code_hash, parse, results_dir, save

CHIP = 256


def load(folder: Path, code: str) -> dict[str, list[dict[str, Any]]]:
    """This code's results in ``folder``, by benchmark name (markers left out)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("code") == code and "benchmark" in data:
            data["_file"] = path.name
            out.setdefault(data["benchmark"], []).append(data)
    return out


def on_gpu(result: dict[str, Any]) -> bool:
    name = str(result.get("context", {}).get("device_name") or "cpu")
    return not name.startswith("cpu")


def goal(name: str, figure: float | None, target: float | None, why: str = "") -> dict[str, Any]:
    met = None if figure is None or target is None else bool(figure >= target)
    return {"goal": name, "figure": figure, "target": target, "met": met, "note": why}


def pipeline(results: list[dict[str, Any]]) -> dict[str, Any]:
    name = "Clay large 256 px end to end (zstd, kvikio) / encoder alone"
    why = "no result"
    for r in results:
        p = r["params"]
        if not on_gpu(r):
            why = f"{r['_file']}: not a CUDA result"
        elif p.get("chip_size") != CHIP or p.get("model") != "clay-large":
            why = f"{r['_file']}: {p.get('model')} at {p.get('chip_size')} px"
        elif p.get("compression") != "zstd" or p.get("engine") != "kvikio":
            why = f"{r['_file']}: {p.get('compression')}, engine used {p.get('engine')}"
        else:
            return goal(name, r["results"]["pipeline_efficiency"], 0.95, r["_file"])
    return goal(name, None, 0.95, why)


def reads(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for compression in ("zstd", "none"):
        name = f"reads, {CHIP} px {compression}: kvikio / raw reads"
        found = goal(name, None, 0.8, "no result")
        for r in results:
            rows = [
                row
                for row in r["results"]["rows"]
                if int(row["layout"].split()[0]) == CHIP
                and f", {compression}," in row["layout"]
                and "chips_per_s" in row
            ]
            kvikio = next((row for row in rows if row["variant"] == "kvikio"), None)
            raw = next((row for row in rows if row["variant"].startswith("raw reads")), None)
            if not on_gpu(r):
                found["note"] = f"{r['_file']}: not a CUDA result"
            elif kvikio is None or raw is None:
                found["note"] = f"{r['_file']}: no kvikio or raw-read row at {CHIP} px"
            else:
                found = goal(
                    name, round(kvikio["chips_per_s"] / raw["chips_per_s"], 3), 0.8, r["_file"]
                )
        out.append(found)
    return out


def throughput(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = {"bf16": 800.0, "fp8": 1200.0}
    out = {
        p: goal(f"Clay large {CHIP} px {p}, chips/s", None, t, "no result")
        for p, t in targets.items()
    }
    for r in results:
        if r["params"].get("chip_size") != CHIP or r["results"].get("chip_size") != CHIP:
            continue  # one chip size a file: this file is another size's
        if not on_gpu(r):
            for g in out.values():
                g["note"] = f"{r['_file']}: not a CUDA result"
            continue
        for row in r["results"]["rows"]:
            if row["size"] != "large" or row["chip_size"] != CHIP or row["precision"] not in out:
                continue
            check = row.get("precision_check") or {}
            fine = row["precision"] == "bf16" or bool(check.get("passes"))
            g = goal(out[row["precision"]]["goal"], row["chips_per_s"], targets[row["precision"]])
            g["note"] = r["_file"] + ("" if fine else ": its accuracy check did not pass")
            if not fine:
                g["met"] = False
            out[row["precision"]] = g
    return list(out.values())


def training(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for feed in ("workers", "kvikio"):
        name = f"training step fed by ChipDataset ({feed}) / on ready batches"
        found = goal(name, None, 0.95, "no result")
        for r in results:
            figure = r["results"]["of_step_rate"].get(feed)
            if not on_gpu(r):
                found = goal(name, None, 0.95, f"{r['_file']}: not a CUDA result")
            elif figure is not None:
                found = goal(name, figure, 0.95, r["_file"])
        out.append(found)
    return out


def passes(name: str, results: list[dict[str, Any]], test: Any) -> dict[str, Any]:
    g = {"goal": name, "figure": None, "target": True, "met": None, "note": "no result"}
    for r in results:
        ok = bool(test(r["results"]))
        g = {"goal": name, "figure": ok, "target": True, "met": ok if on_gpu(r) else None,
             "note": r["_file"] + ("" if on_gpu(r) else ": not a CUDA result")}  # fmt: skip
    return g


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--code", default=None, help="the code hash (default: this tree's)")
    p.add_argument("--results", type=Path, default=None, help="default: the results folder")
    args = parse(p, {})
    code = args.code or code_hash()
    folder = args.results or results_dir()
    found = load(folder, code)
    goals = [
        passes(
            "gpu tests pass",
            found.get("gpu_tests", []),
            lambda r: r.get("returncode") == 0 and not r.get("failed") and not r.get("errors"),
        ),
        pipeline(found.get("embed_pipeline", [])),
        *reads(found.get("read_engines", [])),
        *throughput(found.get("model_throughput", [])),
        passes(
            "precision gate on real imagery",
            found.get("precision_gate", []),
            lambda r: all(row["passes"] for row in r["rows"]),
        ),
        passes(
            "cluster run's embeddings = in-process run's",
            found.get("cluster_run", []),
            lambda r: r["same_embeddings"],
        ),
        *training(found.get("training_wait", [])),
    ]
    out = save("acceptance_summary", {"code": code, "results": str(folder)}, {"goals": goals})
    for g in goals:
        state = {True: "met", False: "NOT MET", None: "not measured"}[g["met"]]
        figure = "-" if g["figure"] is None else g["figure"]
        print(f"{g['goal']:62s} {figure!s:>8s} (goal {g['target']}): {state}  {g['note']}")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
