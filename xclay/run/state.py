"""Regions of a run, and the run's state on disk: what is done, what failed, what it is.

A run splits its work into regions that never share a stored chunk:
ingestion writes a zone's datacube in blocks of whole shards, embedding
writes its embeddings Zarr in blocks of whole chunks (and one GeoParquet part
per region). Regions are computed from grid arithmetic, never listed. A region
counts as done only when its marker exists, and the marker is written last,
after the region's data is durable; so a run killed at any moment resumes
from its markers, and redoes at most the regions in flight.

State lives in ``<outputs.dir>/_xclay/`` (a folder, or a prefix on object storage)::

    run.json                         what the run is: fingerprint, spec, plan, zones, model card
    done/<phase>/<zone>/<bucket>/<region>.json    a marker per finished region (counts, seconds)
    failed/<phase>/<zone>/<bucket>/<region>.json  a marker per failed region, until retried

Markers sit in buckets of 1,000 regions, so no folder grows with the area;
resuming lists the marker folders (one entry per finished region) and never
walks the outputs. A done marker is written create-only (on S3 a conditional PUT): when
two workers finish the same region (a task run twice after a lost worker), both wrote
the same bytes, exactly one marker write wins and the other is told the region is done.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from xclay._json import plain
from xclay.errors import OutputExistsError, RunStateError
from xclay.run.record import RunRecord
from xclay.storage import Location, Where, location

__all__ = [
    "Region",
    "RegionSet",
    "RunState",
    "RunStateError",
    "embed_regions",
    "ingest_regions",
]

Phase = Literal["ingest", "embed"]
BUCKET = 1000  # markers per folder
MARKER_READS = 32  # markers read at once from object storage


@dataclass(frozen=True)
class Region:
    """One unit of work: a zone, a time step and a rectangle (pixels for ingest, chips for
    embed) of that zone's grid.

    Attributes
    ----------
    phase
        ``"ingest"`` or ``"embed"``.
    zone
        The zone's index in the run's zones.
    index
        The region's number within its phase and zone, over all time steps; with the
        phase and zone it names the region (:attr:`name`).
    time
        The time step's index.
    rows, cols
        The rectangle's ``(start, stop)`` rows and columns (stop excluded): pixels of the
        zone's grid for ingest, chips of its chip grid for embed.
    """

    phase: Phase
    zone: int
    index: int
    time: int
    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def name(self) -> str:
        return f"{self.phase}-z{self.zone:02d}-{self.index:07d}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Region:
        return cls(
            phase=data["phase"],
            zone=int(data.get("zone", 0)),
            index=int(data["index"]),
            time=int(data["time"]),
            rows=(int(data["rows"][0]), int(data["rows"][1])),
            cols=(int(data["cols"][0]), int(data["cols"][1])),
        )


class RegionSet:
    """Regions of a phase by zone and number, a bit each (a world's 590,000 regions: 74 KB).

    Parameters
    ----------
    names
        Region names (``embed-z03-0012345``) to start with.
    """

    def __init__(self, names: Iterator[str] | None = None) -> None:
        self._bits: dict[int, np.ndarray] = {}
        self._count = 0
        for name in names or ():
            zone, index = parse_name(name)
            self.add(zone, index)

    def add(self, zone: int, index: int) -> None:
        bits = self._bits.get(zone)
        if bits is None or index >= bits.size:
            grown = np.zeros(max(index + 1, 2 * (bits.size if bits is not None else 1024)), bool)
            if bits is not None:
                grown[: bits.size] = bits
            self._bits[zone] = bits = grown
        if not bits[index]:
            bits[index] = True
            self._count += 1

    def __contains__(self, region: object) -> bool:
        if isinstance(region, Region):
            zone, index = region.zone, region.index
        elif isinstance(region, str):
            zone, index = parse_name(region)
        else:
            return False
        bits = self._bits.get(zone)
        return bits is not None and index < bits.size and bool(bits[index])

    def __len__(self) -> int:
        return self._count


def parse_name(name: str) -> tuple[int, int]:
    """The zone and number of a region's name (``embed-z03-0012345``: zone 3, region 12345)."""
    _, zone, index = name.rsplit("-", 2)
    return int(zone.lstrip("z")), int(index)


def _tiles(zone: int, times: int, ny: int, nx: int, step: int, phase: Phase) -> Iterator[Region]:
    index = 0
    for t in range(times):
        for y0 in range(0, ny, step):
            for x0 in range(0, nx, step):
                yield Region(
                    phase, zone, index, t, (y0, min(ny, y0 + step)), (x0, min(nx, x0 + step))
                )
                index += 1


def ingest_regions(
    zone: int, times: int, shape: tuple[int, int], block_px: int
) -> Iterator[Region]:
    """Pixel blocks of ``block_px`` per time step of a zone.

    Parameters
    ----------
    zone
        The zone's index in the run's zones.
    times
        The number of time steps of the zone's datacube.
    shape
        The zone's pixel grid, ``(rows, cols)``.
    block_px
        A block's edge in pixels: a whole number of the datacube's shards, so that no two
        regions write one shard. Blocks at the grid's last rows and columns are cut to it.

    Returns
    -------
    Iterator of Region
        The ``"ingest"`` regions, made as they are asked for: time step by time step, then
        row by row, numbered in that order.
    """
    return _tiles(zone, times, shape[0], shape[1], block_px, "ingest")


def embed_regions(
    zone: int, times: int, chip_shape: tuple[int, int], region_chips: int
) -> Iterator[Region]:
    """Chip blocks of ``region_chips x region_chips`` per time step of a zone.

    Parameters
    ----------
    zone
        The zone's index in the run's zones.
    times
        The number of time steps of the zone's datacube.
    chip_shape
        The zone's chip grid, ``(rows, cols)`` of chips.
    region_chips
        A block's edge in chips (``compute.region_chips``): one chunk of the embeddings
        Zarr. Blocks at the chip grid's last rows and columns are cut to it.

    Returns
    -------
    Iterator of Region
        The ``"embed"`` regions, made as they are asked for: time step by time step, then
        row by row, numbered in that order.
    """
    return _tiles(zone, times, chip_shape[0], chip_shape[1], region_chips, "embed")


def write_json_atomic(path: Where, data: Any) -> None:
    """Write JSON whole: locally under a temporary name, flushed, then renamed into
    place; on object storage in one PUT."""
    location(path).write_json(data)


def fingerprint(values: Mapping[str, Any]) -> str:
    """A stable hash of what makes a run's outputs what they are."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


class RunState:
    """The state folder of a run (``<outputs.dir>/_xclay``).

    Parameters
    ----------
    outdir
        The run's output folder (``outputs.dir``); the state lives in its ``_xclay``
        folder, which need not exist yet.
    """

    def __init__(self, outdir: Where) -> None:
        self.root = location(outdir) / "_xclay"

    # -- the run record --------------------------------------------------------

    @property
    def record_path(self) -> Location:
        return self.root / "run.json"

    def exists(self) -> bool:
        return self.record_path.is_file()

    def _raw(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.record_path.read_bytes())
        except (OSError, json.JSONDecodeError) as err:
            raise RunStateError(f"cannot read the run state {self.record_path}: {err}.") from err
        return data

    def record(self) -> RunRecord:
        """The run's record (:class:`~xclay.run.record.RunRecord`)."""
        return RunRecord.from_dict(self._raw(), source=str(self.record_path))

    def begin(self, record: RunRecord) -> bool:
        """Start a run, or resume one with the same identity. Returns True when resuming.

        ``record.identity``: what would make outputs incompatible if it changed (model,
        checkpoint hash, grid, bands, items, ...); a different identity is refused. The
        record's fingerprint is made from it here.
        """
        identity = record.identity
        if self.check(identity):
            self.sweep()
            return True
        record = replace(record, fingerprint=fingerprint(identity), identity=plain(identity))
        try:  # create-only: of two drivers starting at once, one begins, the other resumes
            self.record_path.write_json(record.to_dict(), overwrite=False)
        except OutputExistsError:
            return self.check(identity)
        return False

    def check(self, identity: Mapping[str, Any]) -> bool:
        """Whether a run with ``identity`` would resume this state (True) or start afresh
        (False, no state yet); a different run's state is a :class:`RunStateError`.
        Writes nothing."""
        if not self.exists():
            return False
        old = self._raw()
        if old.get("fingerprint") != fingerprint(identity):
            changed = sorted(
                k for k in identity if old.get("identity", {}).get(k) != plain(identity[k])
            )
            raise RunStateError(
                f"{self.root.parent} holds outputs of a different run (changed: "
                f"{', '.join(changed) or 'unknown'}); mixing them would corrupt the outputs. Use "
                "another outputs.dir, or outputs.overwrite: true (CLI: --overwrite) to start "
                "again."
            )
        return True

    def update(self, **values: Any) -> None:
        """Record more of what the run fixed (fields of :class:`RunRecord`)."""
        self.record_path.write_json(replace(self.record(), **values).to_dict())

    def reset(self) -> None:
        self.root.remove()

    # -- regions ---------------------------------------------------------------

    def _marker(self, kind: str, region: Region) -> Location:
        bucket = f"{region.index // BUCKET:05d}"
        return (
            self.root / kind / region.phase / f"z{region.zone:02d}" / bucket / f"{region.name}.json"
        )

    def is_done(self, region: Region) -> bool:
        return self._marker("done", region).is_file()

    def done_names(self, phase: Phase) -> set[str]:
        """Names of the finished regions of a phase: one listing per bucket folder."""
        return {p.stem for p in self._markers("done", phase)}

    def _markers(self, kind: str, phase: Phase) -> Iterator[Location]:
        """The markers of a kind and phase: one listing (paginated on object storage),
        in zone, bucket and region order."""
        for marker, _ in (self.root / kind / phase).files():
            if marker.name.endswith(".json") and not marker.name.startswith("."):
                yield marker

    def done_regions(self, phase: Phase) -> RegionSet:
        """The finished regions of a phase, a bit each: one listing of the markers."""
        return RegionSet(p.stem for p in self._markers("done", phase))

    def done(self, phase: Phase, *, skip: RegionSet | None = None) -> Iterator[dict[str, Any]]:
        """The done markers of a phase (but those of the regions in ``skip``), read as they
        are listed: a few at a time in flight on object storage."""
        wanted = (p for p in self._markers("done", phase) if skip is None or p.stem not in skip)
        if self.root.is_local:
            for path in wanted:
                yield json.loads(path.read_bytes())
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(MARKER_READS) as pool:
            while chunk := list(itertools.islice(wanted, 4 * MARKER_READS)):
                for raw in pool.map(lambda p: p.read_bytes(), chunk):
                    yield json.loads(raw)

    def failed(self, phase: Phase) -> list[dict[str, Any]]:
        return [json.loads(p.read_bytes()) for p in self._markers("failed", phase)]

    def mark_done(self, region: Region, info: Mapping[str, Any]) -> None:
        """Record a region as done (after its data is written); when another worker
        recorded it first, its marker is kept: both wrote the same region."""
        with contextlib.suppress(OutputExistsError):
            self._marker("done", region).write_json(
                {"region": region.to_dict(), **info}, overwrite=False
            )
        self._marker("failed", region).remove()

    def mark_failed(self, region: Region, reason: str) -> None:
        self._marker("failed", region).write_json({"region": region.to_dict(), "reason": reason})

    def sweep(self, *folders: Location) -> None:
        """Remove temporary files a killed process left behind (``.name.partial-<pid>``):
        in the state folder, the outputs folder itself, and ``folders`` (flat folders such
        as the GeoParquet parts'); never inside the stores, whose files a run does not
        write under temporary names. Object storage has none: an object appears whole."""
        if not self.root.is_local:
            return
        outdir = self.root.parent.path
        places = [outdir, *(f.path for f in folders if f.is_local)]
        if self.root.path.is_dir():
            places += [Path(d) for d, _, _ in os.walk(self.root.path)]
        for place in places:
            if not place.is_dir():
                continue
            for path in place.glob(".*.partial-*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
