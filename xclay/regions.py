"""Regions of a run, and the run's state on disk: what is done, what failed, what it is.

A run splits its work into regions that never share a stored chunk:
ingestion writes the datacube in blocks of whole shards, embedding writes
the embeddings Zarr in blocks of whole chunks (and one GeoParquet part per
region). A region counts as done only when its marker exists, and the marker
is written last, after the region's data is durable; so a run killed at any
moment resumes from its markers, and redoes at most the regions in flight.

State lives in ``<outputs.dir>/_xclay/``::

    run.json                   what the run is: fingerprint, spec, plan, model card
    items.json                 the STAC items the plan resolved (workers read them)
    done/<region>.json         a marker per finished region (counts, seconds)
    failed/<region>.json       a marker per failed region (the reason), until retried
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from xclay.errors import XClayError

__all__ = ["Region", "RunState", "RunStateError", "embed_regions", "ingest_regions"]

Phase = Literal["ingest", "embed"]


class RunStateError(XClayError, ValueError):
    """A run's outputs that cannot be resumed with this spec."""


@dataclass(frozen=True)
class Region:
    """One unit of work: a time step and a rectangle (pixels for ingest, chips for embed)."""

    phase: Phase
    index: int
    time: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.phase}-{self.index:06d}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Region:
        return cls(
            phase=data["phase"],
            index=int(data["index"]),
            time=int(data["time"]),
            rows=(int(data["rows"][0]), int(data["rows"][1])),
            cols=(int(data["cols"][0]), int(data["cols"][1])),
        )


def _tiles(times: int, ny: int, nx: int, step: int, phase: Phase) -> list[Region]:
    regions: list[Region] = []
    for t in range(times):
        for y0 in range(0, ny, step):
            for x0 in range(0, nx, step):
                regions.append(
                    Region(
                        phase, len(regions), t, (y0, min(ny, y0 + step)), (x0, min(nx, x0 + step))
                    )
                )
    return regions


def ingest_regions(times: int, shape: tuple[int, int], block_px: int) -> list[Region]:
    """Pixel blocks of ``block_px`` (a whole number of shards or chunks) per time step."""
    return _tiles(times, shape[0], shape[1], block_px, "ingest")


def embed_regions(times: int, chip_shape: tuple[int, int], region_chips: int) -> list[Region]:
    """Chip blocks of ``region_chips x region_chips`` (one embeddings chunk) per time step."""
    return _tiles(times, chip_shape[0], chip_shape[1], region_chips, "embed")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def fingerprint(values: Mapping[str, Any]) -> str:
    """A stable hash of what makes a run's outputs what they are."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


class RunState:
    """The state folder of a run (``<outputs.dir>/_xclay``)."""

    def __init__(self, outdir: str | os.PathLike[str]) -> None:
        self.root = Path(outdir) / "_xclay"

    # -- the run record --------------------------------------------------------

    @property
    def record_path(self) -> Path:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.record_path.is_file()

    def record(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.record_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunStateError(f"cannot read the run state {self.record_path}: {err}.") from err
        return data

    def begin(self, identity: Mapping[str, Any], payload: Mapping[str, Any]) -> bool:
        """Start a run, or resume one with the same identity. Returns True when resuming.

        ``identity``: what would make outputs incompatible if it changed (model,
        checkpoint hash, grid, bands, ...). A different identity is refused.
        """
        key = fingerprint(identity)
        if self.exists():
            old = self.record()
            if old.get("fingerprint") != key:
                changed = sorted(
                    k for k in identity if old.get("identity", {}).get(k) != _plain(identity[k])
                )
                raise RunStateError(
                    f"{self.root.parent} holds outputs of a different run (changed: "
                    f"{', '.join(changed) or 'unknown'}); mixing them would corrupt the outputs. Use "
                    "another outputs.dir, or outputs.overwrite: true to start again."
                )
            self.sweep()
            return True
        write_json_atomic(
            self.record_path, {"fingerprint": key, "identity": _plain(identity), **payload}
        )
        return False

    def update(self, **values: Any) -> None:
        write_json_atomic(self.record_path, {**self.record(), **values})

    def reset(self) -> None:
        if self.root.exists():
            shutil.rmtree(self.root)

    # -- regions ---------------------------------------------------------------

    def _marker(self, kind: str, region: Region) -> Path:
        return self.root / kind / f"{region.name}.json"

    def is_done(self, region: Region) -> bool:
        return self._marker("done", region).is_file()

    def done(self, phase: Phase) -> Iterator[dict[str, Any]]:
        for path in sorted((self.root / "done").glob(f"{phase}-*.json")):
            yield json.loads(path.read_text())

    def failed(self, phase: Phase) -> list[dict[str, Any]]:
        return [
            json.loads(p.read_text())
            for p in sorted((self.root / "failed").glob(f"{phase}-*.json"))
        ]

    def mark_done(self, region: Region, info: Mapping[str, Any]) -> None:
        write_json_atomic(self._marker("done", region), {"region": region.to_dict(), **info})
        self._marker("failed", region).unlink(missing_ok=True)

    def mark_failed(self, region: Region, reason: str) -> None:
        write_json_atomic(
            self._marker("failed", region), {"region": region.to_dict(), "reason": reason}
        )

    def sweep(self) -> None:
        """Remove temporary files a killed process left behind (``.name.partial-<pid>``)."""
        outdir = self.root.parent
        for path in outdir.rglob(".*.partial-*"):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))
