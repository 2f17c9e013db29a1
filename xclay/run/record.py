"""What a run is, as its state folder records it (``_xclay/run.json``): written and read
here only, and typed, so the driver, the tasks and the catalog read fields, not dicts.

The record holds the spec, a summary of the plan, the zones and time steps, where each
output goes, and what the run fixed as it went: the item index's sha256, the stores it
created, the model card and embedding configuration of the encoder it prepared, and the
reference to its metadata file. Its JSON is the file's format (earlier runs' records
read back the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xclay._json import jsonable
from xclay.embed import EmbedConfig
from xclay.errors import RunStateError
from xclay.model_card import ModelCard
from xclay.run.spec import RunSpec
from xclay.run.zones import Zone
from xclay.storage import Location, location

__all__ = ["PlanSummary", "RunPaths", "RunRecord"]


@dataclass(frozen=True)
class PlanSummary:
    """The plan as a run records it (counts, not lists that grow with the area).

    Attributes
    ----------
    source
        ``"stac"`` or ``"datacube"``.
    items
        How many STAC items (0 for a datacube).
    bands
        Band names, in the datacube's order.
    platform
        Sensor-table key, or None.
    crs
        The grids' CRS (or ``"utm"``-tiled zones' first), as a string.
    zones
        The zones' tags.
    tiled
        Whether the area is tiled by UTM zone.
    resolution
        Pixel size in the grids' units.
    time_steps
        Time steps of the datacube.
    chips
        Chips over all zones and time steps.
    area_km2
        The area in square kilometres.
    bytes_estimate
        Bytes of pixels read and written.
    dtype
        The pixels' dtype name.
    bbox_lonlat
        The area in degrees (west, south, east, north).
    """

    source: str
    items: int
    bands: tuple[str, ...]
    platform: str | None
    crs: str | None
    zones: tuple[str, ...]
    tiled: bool
    resolution: float
    time_steps: int
    chips: int
    area_km2: float
    bytes_estimate: int
    dtype: str
    bbox_lonlat: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = jsonable(dataclasses.asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanSummary:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for name in ("bands", "zones", "bbox_lonlat"):
            values[name] = tuple(values.get(name) or ())
        return cls(**values)


@dataclass(frozen=True)
class RunPaths:
    """Where a run's outputs go (paths or URLs).

    Attributes
    ----------
    datacubes
        One datacube store per zone (the input's, for a run over a datacube).
    embeddings
        One embeddings store per zone.
    geoparquet
        The GeoParquet folder of parts.
    items
        The item index sidecar (None for a datacube input).
    checkpoint
        The model's checkpoint (None without one).
    """

    datacubes: tuple[str, ...]
    embeddings: tuple[str, ...]
    geoparquet: str
    items: str | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """A run's record (``_xclay/run.json``).

    Attributes
    ----------
    fingerprint
        The hash of ``identity``: what must not change for a rerun to resume.
    identity
        What it hashes (spec fields, checkpoint sha256, items, zones), kept to say what
        changed when a rerun is refused.
    spec
        The run's spec.
    plan
        The plan's summary.
    zones
        The grids, one datacube and embeddings store each.
    days
        With ``composite: none``: the time steps' solar days and first acquisitions
        (ISO strings, in order); None otherwise.
    time_range
        The composite's time range (ISO strings), or None.
    paths
        Where each output goes.
    torch_threads
        Torch threads a task uses (None: the worker's own).
    items_sha256
        The item index's sha256, once written.
    created
        Zones whose stores the run has created, by kind (``datacubes``, ``embeddings``).
    card
        The prepared encoder's model card, once prepared.
    embed_config
        The embedding's configuration as prepared.
    run_metadata
        The run's metadata file (``file``, ``sha256``) the GeoParquet parts refer to.
    """

    fingerprint: str
    identity: Mapping[str, Any]
    spec: RunSpec
    plan: PlanSummary
    zones: tuple[Zone, ...]
    paths: RunPaths
    days: tuple[tuple[str, str], ...] | None = None
    time_range: tuple[str, str] | None = None
    torch_threads: int | None = None
    items_sha256: str | None = None
    created: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    card: ModelCard | None = None
    embed_config: EmbedConfig | None = None
    run_metadata: Mapping[str, str] | None = None

    # -- what tasks ask of it ---------------------------------------------------------

    def at(self, where: str) -> Location:
        """A location of the record, with the run's storage options."""
        return location(where, dict(self.spec.storage) or None)

    def solar_days(self) -> dict[np.datetime64, np.datetime64] | None:
        """The time steps' solar days -> first acquisitions (``composite: none``)."""
        if self.days is None:
            return None
        return {np.datetime64(d, "D"): np.datetime64(t, "ns") for d, t in self.days}

    def composite_range(self) -> tuple[np.datetime64, np.datetime64] | None:
        if self.time_range is None:
            return None
        return np.datetime64(self.time_range[0], "ns"), np.datetime64(self.time_range[1], "ns")

    def has_created(self, kind: str, zone: int) -> bool:
        return zone in self.created.get(kind, ())

    # -- the file's format --------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "identity": dict(self.identity),
            "spec": self.spec.to_dict(),
            "plan": self.plan.to_dict(),
            "zones": [z.to_dict() for z in self.zones],
            "days": [list(d) for d in self.days] if self.days is not None else None,
            "time_range": list(self.time_range) if self.time_range else None,
            "paths": {
                "datacubes": list(self.paths.datacubes),
                "embeddings": list(self.paths.embeddings),
                "geoparquet": self.paths.geoparquet,
                "items": self.paths.items,
                "checkpoint": self.paths.checkpoint,
            },
            "torch_threads": self.torch_threads,
            "items_sha256": self.items_sha256,
            "created": {k: list(v) for k, v in self.created.items()},
        }
        if self.card is not None:
            out["card"] = self.card.to_dict()
        if self.embed_config is not None:
            out["embed_config"] = self.embed_config.to_dict()
        if self.run_metadata is not None:
            out["run_metadata"] = dict(self.run_metadata)
        result: dict[str, Any] = jsonable(out)
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "run.json") -> RunRecord:
        """A record read back; one that cannot be is a :class:`RunStateError`."""
        try:
            paths = data["paths"]
            return cls(
                fingerprint=str(data["fingerprint"]),
                identity=dict(data.get("identity") or {}),
                spec=RunSpec.from_dict(data["spec"], source=source),
                plan=PlanSummary.from_dict(data["plan"]),
                zones=tuple(Zone.from_dict(z) for z in data["zones"]),
                paths=RunPaths(
                    datacubes=tuple(paths["datacubes"]),
                    embeddings=tuple(paths["embeddings"]),
                    geoparquet=paths["geoparquet"],
                    items=paths.get("items"),
                    checkpoint=paths.get("checkpoint"),
                ),
                days=tuple((str(d), str(t)) for d, t in data["days"])
                if data.get("days") is not None
                else None,
                time_range=(str(data["time_range"][0]), str(data["time_range"][1]))
                if data.get("time_range")
                else None,
                torch_threads=data.get("torch_threads"),
                items_sha256=data.get("items_sha256"),
                created={
                    k: tuple(int(z) for z in v) for k, v in (data.get("created") or {}).items()
                },
                card=ModelCard.from_dict(dict(data["card"])) if data.get("card") else None,
                embed_config=EmbedConfig.from_dict(dict(data["embed_config"]))
                if data.get("embed_config")
                else None,
                run_metadata=dict(data["run_metadata"]) if data.get("run_metadata") else None,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RunStateError(
                f"{source} is not a run record this xclay reads ({type(err).__name__}: {err}); "
                "start the run again with outputs.overwrite: true, or in another folder."
            ) from err
