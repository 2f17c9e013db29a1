"""Running a spec: ingest, embed and export, region by region, resumably, on any cluster.

The driver plans the run (:mod:`xclay.run.plan`), records it, creates each
zone's stores from metadata alone, and hands regions to tasks
(:mod:`xclay.run.tasks`): in this process, or on a Dask cluster. Nothing the
driver holds grows with the chips of the area: grids are rows plus columns,
regions are computed and resumed from one listing of the markers, and the
run's metadata is written once, not per part.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xclay._progress import LOG_EVERY, Progress
from xclay.errors import ConfigError, OutputExistsError, XClayError
from xclay.outputs.export import RUN_COMPLETE, RUN_METADATA
from xclay.outputs.formats import DEFAULT_FORMAT
from xclay.run.plan import RunPlan, plan
from xclay.run.preflight import preflight
from xclay.run.record import PlanSummary, RunPaths, RunRecord
from xclay.run.spec import RunSpec
from xclay.run.state import Region, RegionSet, RunState, embed_regions, ingest_regions
from xclay.run.submit import Tally
from xclay.storage import Location, Where, location
from xclay.storage.atomic import store_output

__all__ = ["RunReport", "check_start", "embed_step", "export_step", "ingest", "run"]

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    """What a run did (or, when incomplete, how far it got and what failed).

    Attributes
    ----------
    plan
        The plan the run followed.
    outputs
        Output name -> path: ``datacube``, ``embeddings`` (one path per zone, joined with
        commas), ``geoparquet``, ``items`` (STAC input only) and, when no region failed,
        ``stac`` (the catalog's collection).
    seconds
        Wall-clock seconds per phase (``plan``, ``ingest``, ``embed``) that ran.
    run
        Chip counts summed over the finished embedding regions (``chips_total``,
        ``chips_embedded``, ``chips_skipped_nodata``, ...); empty before any.
    status
        ``"complete"``, or ``"incomplete"`` when regions failed.
    failed
        One entry per failed region: its ``region`` name (``"?"`` for a lost task) and the
        first line of its ``reason``.
    resumed
        Whether the run resumed a previous run of the same spec (keeping its finished
        regions).
    data_path
        How the regions read their chips (``readers``) and every slower road they had
        to take (``fallbacks``), over all workers.
    model
        The encoder as prepared: name and embedding length; empty when nothing was
        embedded.
    here
        Chip counts of the regions this call did (``run`` sums every finished region,
        those of the runs it resumed too); the throughput is this call's.
    """

    plan: RunPlan
    outputs: dict[str, str]
    seconds: dict[str, float]
    run: dict[str, int]
    status: Literal["complete", "incomplete"] = "complete"
    failed: list[dict[str, str]] = field(default_factory=list)
    resumed: bool = False
    data_path: dict[str, list[str]] = field(default_factory=dict)
    model: str = ""  # the encoder as prepared: name and embedding length
    here: dict[str, int] = field(default_factory=dict)

    def describe(self, *, retry: str = "rerun the same spec") -> str:
        """The report as lines of text (the plan is described by ``plan.describe()``).

        Parameters
        ----------
        retry
            How to retry failed regions, as the report words it (``xclay embed`` says
            "rerun the same command": it has no spec file).
        """
        r = self.run
        embed_s = self.seconds.get("embed", 0.0)
        lines = []
        if self.resumed:
            lines.append(
                "  resumed     a previous run of this spec: its finished regions were kept"
            )
        if self.model:
            lines.append(f"  model       {self.model}")
        if r:
            lines.append(
                f"  chips       {r['chips_embedded']:,} embedded of {r['chips_total']:,}; skipped "
                f"{r['chips_skipped_nodata']} (nodata), {r.get('chips_skipped_cloud', 0)} (cloud), "
                f"{r['chips_failed']} (no valid window)"
            )
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items())
        embedded_here = self.here.get("chips_embedded", 0)
        if "embed" in self.seconds and embedded_here:
            rate = f"{embedded_here / max(embed_s, 1e-9):.1f} chips/s embedding"
            if self.resumed:
                rate += f" ({embedded_here:,} chips embedded by this run)"
            lines.append(f"  throughput  {rate}; {timings}")
        elif self.resumed and "embed" in self.seconds:
            lines.append(f"  throughput  nothing left to embed; {timings}")
        else:
            lines.append(f"  time        {timings}")
        lines += [f"  {k:11s} {v}" for k, v in self.outputs.items()]
        if self.data_path.get("readers"):
            lines.append(f"  data path   {'; '.join(self.data_path['readers'])}")
        for reason in self.data_path.get("fallbacks", []):
            lines.append(f"  SLOWER      {reason}")
        if self.plan.items is not None:
            lines.append(
                f"  provenance  {len(self.plan.items):,} STAC items in {self.outputs.get('items')}; "
                "each row lists its own"
            )
        if self.failed:
            lines.append(
                f"  INCOMPLETE  {len(self.failed)} region(s) failed; {retry} to retry them:"
            )
            lines += [f"    {f['region']}: {f['reason']}" for f in self.failed[:10]]
        return "\n".join(lines)


# --------------------------------------------------------------------------- the run's record


def _paths(spec: RunSpec, resolved: RunPlan) -> RunPaths:
    """Where each output goes: one datacube and one embeddings store per zone (suffixed with
    the zone when there are several), one GeoParquet folder, the items sidecar."""

    def per_zone(path: Location) -> tuple[str, ...]:
        if len(resolved.zones) == 1:
            return (path.url,)
        return tuple(
            path.with_name(f"{path.stem}-{z.tag}{path.suffix}").url for z in resolved.zones
        )

    checkpoint = spec.path(spec.model.checkpoint) if spec.model.checkpoint else None
    return RunPaths(
        datacubes=per_zone(spec.datacube_path)
        if spec.input.datacube is None
        else (spec.datacube_path.url,),
        embeddings=per_zone(spec.embeddings_path),
        geoparquet=spec.geoparquet_path.url,
        items=spec.items_path.url if resolved.items is not None else None,
        checkpoint=checkpoint.url if checkpoint else None,
    )


def _identity(spec: RunSpec, resolved: RunPlan) -> dict[str, Any]:
    """What must not change between a run and its resumption (else outputs would mix)."""
    from xclay.models.checkpoints import file_sha256

    checkpoint = spec.path(spec.model.checkpoint) if spec.model.checkpoint else None
    items = resolved.items
    return {
        "input": dataclasses.asdict(spec.input),
        "grid": dataclasses.asdict(spec.grid),
        "model": {
            "name": spec.model.name,
            "output": spec.model.options.get("output"),  # as runs before model.options
            "options": spec.model.options,
            "checkpoint_sha256": file_sha256(checkpoint)
            if checkpoint and checkpoint.is_file()
            else None,
        },
        "quality": dataclasses.asdict(spec.quality),
        "region_chips": spec.compute.region_chips,
        "precision": spec.compute.precision,
        "stored": {
            "quantize": spec.outputs.quantize,
            "thumbnails": spec.outputs.thumbnails,
            "loss": spec.outputs.loss,
        },
        "items": items.ids_sha256 if items is not None else None,
        "zones": [z.to_dict() for z in resolved.zones],
    }


def _outputs(spec: RunSpec, paths: RunPaths) -> list[Location]:
    where = [
        *paths.embeddings,
        paths.geoparquet,
        *([paths.items] if paths.items else []),
        *(paths.datacubes if spec.input.datacube is None else ()),
    ]
    return [location(p, spec.storage) for p in where]


def check_start(spec: RunSpec, resolved: RunPlan) -> bool:
    """What starting the run would find in ``outputs.dir``, checked without writing (a dry
    run's check): True when it would resume a run of this spec, False when it would start
    afresh; outputs of another run, or files in the way, raise as the run would.

    Parameters
    ----------
    spec
        The run spec (its ``outputs.dir`` and ``outputs.overwrite``).
    resolved
        Its plan (:func:`~xclay.run.plan.plan`).

    Returns
    -------
    bool
        Whether the run would resume a previous run of the same spec.
    """
    if spec.outputs.overwrite:
        return False
    state = RunState(spec.outdir)
    if state.check(_identity(spec, resolved)):
        return True
    for path in _outputs(spec, _paths(spec, resolved)):
        if path.exists():
            raise OutputExistsError(
                f"{path} already exists and is not from a run of this spec; set "
                "outputs.overwrite: true (CLI: --overwrite) or choose another outputs.dir. "
                "Nothing was run."
            )
    return False


def _start(spec: RunSpec, resolved: RunPlan, torch_threads: int | None) -> tuple[RunState, bool]:
    """The run state, begun or resumed; on overwrite, previous outputs are removed first."""
    state = RunState(spec.outdir)
    paths = _paths(spec, resolved)
    if spec.outputs.overwrite:
        for path in _outputs(spec, paths):
            path.remove()
        state.reset()
    else:
        check_start(spec, resolved)
    record = RunRecord(
        fingerprint="",
        identity=_identity(spec, resolved),
        spec=spec,
        plan=PlanSummary.from_dict(resolved.to_dict()),
        zones=tuple(resolved.zones),
        paths=paths,
        days=tuple((str(d), str(t)) for d, t in resolved.days.items())
        if resolved.days is not None
        else None,
        time_range=(str(resolved.time_range[0]), str(resolved.time_range[1]))
        if resolved.time_range
        else None,
    )
    resumed = state.begin(record)
    state.update(torch_threads=torch_threads)
    state.sweep(location(paths.geoparquet, spec.storage))
    items = location(paths.items, spec.storage) if paths.items else None
    if resolved.items is not None and items is not None and not items.is_file():
        sha = resolved.items.save(items)
        state.update(items_sha256=sha)
    return state, resumed


def _created(state: RunState, kind: str, zone: int) -> bool:
    """Whether the run created a zone's store (recorded once its creation returned: a
    store on object storage cannot be created under a temporary name)."""
    return state.record().has_created(kind, zone)


def _mark_created(state: RunState, kind: str, zone: int) -> None:
    created = dict(state.record().created)
    created[kind] = tuple(sorted({*created.get(kind, ()), zone}))
    state.update(created=created)


# --------------------------------------------------------------------------- execution


@dataclass
class _Here:
    """How this process shows its progress, and what it did (the report's throughput counts
    this process's chips, not those of the runs it resumed); each phase's tally, once
    folded with the markers of the regions done before."""

    progress: bool | None
    every: float = LOG_EVERY
    counts: dict[str, int] = field(default_factory=dict)
    tallies: dict[str, Tally] = field(default_factory=dict)

    def add(self, counts: dict[str, int]) -> None:
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)


def _execute(
    fn: Callable[[Any, dict[str, Any]], dict[str, Any]],
    regions: Callable[[], Iterator[Region]],
    outdir: Location,
    client: Any,
    desc: str,
    here: _Here,
    tally: Tally,
    units: tuple[str, Callable[[Region], int]] | None = None,
    in_flight: int | None = None,
) -> None:
    """Run ``fn(outdir, region)`` for each region, folding the results into ``tally``: as
    tasks on the Dask client, a window of them in flight (:mod:`xclay.run.submit`), or
    here; progress is counted in ``units`` (a name and a region's size in it; default
    regions). ``regions`` makes the regions afresh each time it is called: once to count
    them, once to run them (nothing holds them all)."""
    from xclay.run.submit import execute
    from xclay.run.tasks import reporting_chips

    unit, size = units or ("region", lambda region: 1)
    task_outdir: Any = outdir.to_dict() if outdir.options else outdir.url
    count = total = 0
    for region in regions():
        count += 1
        total += size(region)
    before = dict(tally.counts)
    with Progress(
        total, regions=count, progress=here.progress, desc=desc, unit=unit, every=here.every
    ) as shown:
        if client is not None:
            from xclay.run.cluster import warm_workers

            warm_workers(client)
        chips = reporting_chips(shown.advance) if client is None else contextlib.nullcontext()
        with chips:
            execute(
                fn,
                regions(),
                task_outdir,
                client,
                tally,
                in_flight=in_flight,
                on_done=lambda region: shown.region_done(size(region)),
            )
    here.add({k: v - before.get(k, 0) for k, v in tally.counts.items()})


def _fold_earlier(state: RunState, phase: Literal["ingest", "embed"], tally: Tally) -> None:
    """Fold into ``tally`` the markers of the regions done before this process (a run it
    resumes), or whose result it lost: the tally then counts every finished region."""
    for marker in state.done(phase, skip=tally.folded):
        tally.fold(Region.from_dict(marker["region"]), marker)


def _region_chips(region: Region) -> int:
    """The chips of an embed region's rectangle (what its progress counts)."""
    return (region.rows[1] - region.rows[0]) * (region.cols[1] - region.cols[0])


def _failures(
    state: RunState, phase: Literal["ingest", "embed"], tally: Tally
) -> list[dict[str, str]]:
    recorded = [
        {
            "region": Region.from_dict(f["region"]).name,
            "reason": f["reason"].splitlines()[0],
        }
        for f in state.failed(phase)
    ]
    return recorded + [{"region": "?", "reason": reason} for reason in tally.lost]


def _todo(
    regions: Callable[[], Iterator[Region]], done: RegionSet, keep: Callable[[Region], bool]
) -> Callable[[], Iterator[Region]]:
    """The regions left to do, made afresh each time they are asked for."""
    return lambda: (r for r in regions() if r not in done and keep(r))


def _in_cell(
    resolved: RunPlan, block: Callable[[Region], tuple[float, float, float, float]]
) -> Callable[[Region], bool]:
    """Whether a region's native extent meets its zone's cell (regions wholly outside the
    cell hold no chip of the zone, so they are not run)."""
    import shapely

    cells = [z.cell_native() for z in resolved.zones]

    def keep(region: Region) -> bool:
        cell = cells[region.zone]
        return cell is None or bool(shapely.intersects(shapely.box(*block(region)), cell))

    return keep


def _shape(geobox: Any) -> tuple[int, int]:
    ny, nx = geobox.shape
    return int(ny), int(nx)


def _pixel_bounds(
    resolved: RunPlan, rows: tuple[int, int], cols: tuple[int, int], zone: int
) -> tuple[float, float, float, float]:
    t = resolved.zones[zone].geobox.affine
    xs = (t.c + t.a * cols[0], t.c + t.a * cols[1])
    ys = (t.f + t.e * rows[0], t.f + t.e * rows[1])
    return min(xs), min(ys), max(xs), max(ys)


# --------------------------------------------------------------------------- ingest


def _ingest_phase(
    spec: RunSpec, resolved: RunPlan, state: RunState, client: Any, here: _Here
) -> list[dict[str, str]]:
    from xclay.completion import is_complete, mark_complete
    from xclay.datacube import create_datacube_store
    from xclay.errors import IngestError
    from xclay.run.tasks import ingest_region

    if resolved.source == "datacube":
        return []
    record = state.record()
    paths = [location(p, spec.storage) for p in record.paths.datacubes]
    zones = [k for k, path in enumerate(paths) if not is_complete(path)]
    if not zones:
        return []
    shard = spec.grid.shard_chips or spec.compute.region_chips
    for k in zones:
        if not _created(state, "datacubes", k):
            template = _template(spec, resolved, k, record)
            with store_output(paths[k], overwrite=True) as tmp:  # never a half-created store
                create_datacube_store(
                    template,
                    tmp,
                    chip_size=spec.grid.chip_size,
                    shard_chips=shard,
                    compression=spec.grid.compression,
                )
            _mark_created(state, "datacubes", k)
    # Blocks of whole shards: no two tasks write one shard.
    block = spec.grid.chip_size * shard * max(1, -(-spec.compute.region_chips // shard))

    def regions() -> Iterator[Region]:
        for k in zones:
            shape = _shape(resolved.zones[k].geobox)
            yield from ingest_regions(k, resolved.time_steps, shape, block)

    keep = _in_cell(resolved, lambda r: _pixel_bounds(resolved, r.rows, r.cols, r.zone))
    todo = _todo(regions, state.done_regions("ingest"), keep)
    tally = Tally()
    in_flight = spec.compute.regions_in_flight
    _execute(ingest_region, todo, spec.outdir, client, "ingest", here, tally, None, in_flight)
    here.tallies["ingest"] = tally
    failed = _failures(state, "ingest", tally)
    if failed:
        return failed
    if not _any_valid(state, tally):
        for k in zones:
            paths[k].remove()
        state.reset()
        raise IngestError(
            "the region has no valid pixel (every pixel is nodata, or masked as nodata); "
            "nothing was written. Check the area, the time range and the masks."
        )
    for k in zones:
        mark_complete(paths[k])
    return []


def _any_valid(state: RunState, tally: Tally) -> bool:
    """Whether an ingested block has a valid pixel: this process's, else one of those done
    before it (their markers read until one has)."""
    if any(tally.any_valid.values()):
        return True
    return any(bool(m.get("any_valid")) for m in state.done("ingest", skip=tally.folded))


def _template(spec: RunSpec, resolved: RunPlan, zone: int, record: RunRecord) -> Any:
    """A zone's datacube, described from item metadata (one item per collection) and grid
    arithmetic; provenance points to the run's item sidecar instead of copying it."""
    from xclay.ingest import datacube_template

    index = resolved.items
    assert index is not None
    store = record.paths.datacubes[zone]
    items_file = record.paths.items
    assert items_file is not None
    provenance = {
        "items": {
            "count": len(index),
            "file": location(items_file).href_from(location(store)),
            "sha256": record.items_sha256,
        },
        "stac": {
            "bands": list(resolved.bands),
            "composite": spec.input.composite,
            "datetime": spec.input.datetime,
            "bbox": list(resolved.bbox_lonlat),
            "crs": resolved.zones[zone].crs,
            "resolution": resolved.resolution,
        },
    }
    cube = datacube_template(
        index.representatives(),  # one item per collection: all it reads of the items
        bands=resolved.bands,
        geobox=resolved.zones[zone].geobox,
        composite=spec.input.composite,
        mask=spec.input.mask,
        platform=resolved.platform,
        wavelengths=spec.input.wavelengths,
        time_range=resolved.time_range,
        days=resolved.days,
        provenance=provenance,
    )
    cube.attrs["run_spec"] = spec.to_dict()
    return cube


# --------------------------------------------------------------------------- embed


def _embed_phase(
    spec: RunSpec, resolved: RunPlan, state: RunState, client: Any, here: _Here
) -> list[dict[str, str]]:
    from xclay.completion import is_complete, mark_complete
    from xclay.run.tasks import embed_region

    record = state.record()
    paths = [location(p, spec.storage) for p in record.paths.embeddings]
    zones = [k for k, path in enumerate(paths) if not is_complete(path)]
    if not zones:
        return []
    sessions = _prepare(spec, resolved, state)
    record = state.record()
    spec.geoparquet_path.mkdir()
    if record.run_metadata is None:
        state.update(run_metadata=_write_run_metadata(spec, resolved, record, sessions))
    for k in zones:
        if not _created(state, "embeddings", k):
            layout = sessions[k].layout()
            if spec.outputs.quantize:
                layout = layout.quantized(spec.outputs.quantize)
            layout.coords.attrs.update(
                {
                    "run_spec": spec.to_dict(),
                    "run_plan": resolved.to_dict(),
                    "zone": resolved.zones[k].tag,
                }
            )
            with store_output(paths[k], overwrite=True) as tmp:
                from xclay.outputs.export import create_embeddings_store

                create_embeddings_store(layout, tmp, region_chips=spec.compute.region_chips)
            _mark_created(state, "embeddings", k)
    grids = {k: sessions[k].grid for k in zones}
    for session in sessions.values():
        session.close()

    def regions() -> Iterator[Region]:
        for k in zones:
            yield from embed_regions(
                k, resolved.time_steps, grids[k].shape, spec.compute.region_chips
            )

    def chip_bounds(region: Region) -> tuple[float, float, float, float]:
        grid = grids[region.zone]
        step, size = grid.spec.step, grid.spec.chip_size
        rows = (region.rows[0] * step, (region.rows[1] - 1) * step + size)
        cols = (region.cols[0] * step, (region.cols[1] - 1) * step + size)
        return _pixel_bounds(resolved, rows, cols, region.zone)

    todo = _todo(regions, state.done_regions("embed"), _in_cell(resolved, chip_bounds))
    tally = Tally()
    chips = ("chip", _region_chips)
    in_flight = spec.compute.regions_in_flight
    _execute(embed_region, todo, spec.outdir, client, "embed", here, tally, chips, in_flight)
    _fold_earlier(state, "embed", tally)  # the regions of the runs it resumes: their markers
    here.tallies["embed"] = tally
    failed = _failures(state, "embed", tally)
    if failed:
        return failed
    for k in zones:
        mark_complete(
            paths[k],
            run=tally.by_zone.get(k, {}),
            chips_embedded_by_time=[
                tally.embedded_by_step.get((k, t), 0) for t in range(resolved.time_steps)
            ],
            run_data_path={"readers": list(tally.readers), "fallbacks": list(tally.fallbacks)},
        )
    (spec.geoparquet_path / RUN_COMPLETE).write_json({"run": tally.counts, "parts": tally.parts})
    return []


def _prepare(spec: RunSpec, resolved: RunPlan, state: RunState) -> dict[int, Any]:
    """An embedding session per zone, with one encoder prepared once for the whole run (on
    the first zone's chips) and recorded, so every zone and worker embeds with the same
    model card."""
    from xclay.datacube import open_datacube
    from xclay.embed import EmbedSession
    from xclay.models.registry import encoder_from_card

    record = state.record()
    cubes = [open_datacube(location(p, spec.storage)) for p in record.paths.datacubes]
    if record.card is not None and record.embed_config is not None:  # resuming: as prepared
        config = record.embed_config
        given = record.paths.checkpoint
        checkpoint = location(given, spec.storage) if given else None
        encoder = encoder_from_card(record.card.to_dict(), checkpoint=checkpoint)
    else:
        encoder = _encoder(spec)
        config = _embed_config(spec, cubes[0], encoder)
    sessions = {0: EmbedSession(cubes[0], encoder, config)}
    if record.card is None:
        # The session's config: with what preparing fixed (the thumbnails' stretch).
        state.update(card=sessions[0].card, embed_config=sessions[0].config)
    config = sessions[0].config
    for k in range(1, len(cubes)):
        sessions[k] = EmbedSession(cubes[k], encoder, config)  # prepared once: not refitted
    return sessions


def _write_run_metadata(
    spec: RunSpec, resolved: RunPlan, record: RunRecord, sessions: dict[int, Any]
) -> dict[str, str]:
    """The run's metadata, once, in the GeoParquet folder; parts refer to it by sha256."""
    from xclay._json import jsonable

    first = sessions[0].dataset_attrs()
    metadata = {
        "model": first["model"],
        "config": first["config"],
        "datacube": first["datacube"],
        "zones": {
            resolved.zones[k].tag: session.dataset_attrs()["datacube"]
            for k, session in sessions.items()
        },
        "items": {
            "file": location(record.paths.items).name,
            "sha256": record.items_sha256,
        }
        if record.paths.items
        else None,
        "run_spec": spec.to_dict(),
        "run_plan": resolved.to_dict(),
    }
    data = json.dumps(jsonable(metadata), indent=1, sort_keys=True).encode()
    (spec.geoparquet_path / RUN_METADATA).write_bytes(data)
    return {"file": RUN_METADATA, "sha256": hashlib.sha256(data).hexdigest()}


def _encoder(spec: RunSpec) -> Any:
    from xclay.models import get_model

    options = spec.model.encoder_options()
    checkpoint = spec.path(spec.model.checkpoint) if spec.model.checkpoint else None
    return get_model(spec.model.name, checkpoint=checkpoint, **options)


def _embed_config(spec: RunSpec, cube: Any, encoder: Any) -> Any:
    """The embedding's configuration from the spec: each of embed()'s settings from the
    section of the spec that holds it (both read one declaration of it)."""
    from xclay.embed import EmbedOptions, embed_config

    names = [f.name for f in dataclasses.fields(EmbedOptions)]
    sections = (spec.grid, spec.compute, spec.outputs)
    settings = {n: getattr(s, n) for s in sections for n in names if hasattr(s, n)}
    return embed_config(cube, encoder, quality=spec.quality, **settings)


def _finished(record: RunRecord, here: _Here) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Chip counts and data paths over every finished embedding region: this call's embed
    tally (folded with the markers of the runs it resumed), else what the complete stores
    say (a rerun of a finished run embeds nothing)."""
    tally = here.tallies.get("embed")
    if tally is not None:
        readers = {"readers": list(tally.readers), "fallbacks": list(tally.fallbacks)}
        return dict(tally.counts), readers
    from xclay.completion import COMPLETE_ATTR, read_metadata

    total: dict[str, int] = {}
    paths: dict[str, dict[str, None]] = {"readers": {}, "fallbacks": {}}
    for store in record.paths.embeddings:
        try:
            attrs = read_metadata(record.at(store)).get("attributes", {})
        except FileNotFoundError:
            continue
        if not attrs.get(COMPLETE_ATTR):
            continue
        for key, value in (attrs.get("run") or {}).items():
            total[key] = total.get(key, 0) + int(value)
        for kind, values in (attrs.get("run_data_path") or {}).items():
            paths.setdefault(kind, {}).update(dict.fromkeys(values))
    return total, {k: list(v) for k, v in paths.items()}


def _report(
    spec: RunSpec,
    resolved: RunPlan,
    state: RunState,
    seconds: dict[str, float],
    failed: list[dict[str, str]],
    resumed: bool,
    here: _Here,
) -> RunReport:
    record = state.record()
    paths = record.paths
    card = record.card
    model = f"{card.name} ({card.dim}-d)" if card else ""
    counts, data_path = _finished(record, here)
    outputs = {
        "datacube": ", ".join(paths.datacubes),
        "embeddings": ", ".join(paths.embeddings),
        "geoparquet": paths.geoparquet,
    }
    if paths.items:
        outputs["items"] = paths.items
    if not failed:
        from xclay.run.catalog import CATALOG

        outputs["stac"] = str(spec.outdir / CATALOG / "collection.json")
    return RunReport(
        plan=resolved,
        outputs=outputs,
        seconds=seconds,
        run=counts,
        status="incomplete" if failed else "complete",
        failed=failed,
        resumed=resumed,
        data_path=data_path,
        model=model,
        here=dict(here.counts),
    )


# --------------------------------------------------------------------------- entry points


def run(
    spec: RunSpec,
    *,
    client: Any = None,
    progress: bool | None = None,
    torch_threads: int | None = None,
    resolved: RunPlan | None = None,
    log_every: float = LOG_EVERY,
) -> RunReport:
    """Ingest, embed and export as the spec says, region by region, resumably.

    Parameters
    ----------
    spec
        A validated run spec (:func:`xclay.run.load_spec`).
    client
        A ``distributed.Client``: regions run as tasks on its workers. ``None``:
        in this process, one after another.
    progress
        Progress: ``None`` (default) a bar on an interactive terminal and a line every
        ``log_every`` seconds otherwise (a batch job's log); ``True`` a bar; ``False``
        nothing.
    torch_threads
        Threads for torch in each task (e.g. cores / workers on a local cluster).
    resolved
        The spec's plan, when the caller has made it already (``xclay run`` prints it
        before running); default: planned here.
    log_every
        Seconds between progress lines in a log (default 30).

    A rerun of the same spec resumes: finished regions are kept, failed and
    missing ones are done. The report's ``status`` is ``"incomplete"`` when
    regions failed; nothing half-written is ever marked complete.
    """
    seconds: dict[str, float] = {}
    here = _Here(progress, log_every)
    start = time.perf_counter()
    first = "plan" if resolved is None else "preflight"
    resolved = resolved or plan(spec)
    preflight(spec, resolved)
    state, resumed = _start(spec, resolved, torch_threads)
    seconds[first] = time.perf_counter() - start
    for phase, step in (("ingest", _ingest_phase), ("embed", _embed_phase)):
        start = time.perf_counter()
        failed = step(spec, resolved, state, client, here)
        seconds[phase] = time.perf_counter() - start
        if failed:
            return _report(spec, resolved, state, seconds, failed, resumed, here)
    _describe(spec)
    return _report(spec, resolved, state, seconds, [], resumed, here)


def _describe(spec: RunSpec) -> None:
    """The STAC description of the finished run's outputs (xclay.run.catalog)."""
    from xclay.run.catalog import write_catalog

    write_catalog(spec.outdir)


def ingest(
    spec: RunSpec,
    *,
    client: Any = None,
    progress: bool | None = None,
    resolved: RunPlan | None = None,
    log_every: float = LOG_EVERY,
) -> RunReport:
    """Step 1 alone: STAC items -> datacube Zarr (resumable, like :func:`run`).

    Parameters
    ----------
    spec
        A validated run spec (:func:`xclay.run.load_spec`); with an input datacube there
        is nothing to ingest.
    client
        A ``distributed.Client``: regions run as tasks on its workers. ``None``:
        in this process, one after another.
    progress
        Progress: ``None`` (default) a bar on an interactive terminal and a line every
        ``log_every`` seconds otherwise (a batch job's log); ``True`` a bar; ``False``
        nothing.
    resolved
        The spec's plan, when the caller has made it already (``xclay run`` prints it
        before running); default: planned here.
    log_every
        Seconds between progress lines in a log (default 30).

    Returns
    -------
    RunReport
        What the step did; ``status`` is ``"incomplete"`` when regions failed.
    """
    here = _Here(progress, log_every)
    resolved = resolved or plan(spec)
    preflight(spec, resolved)
    state, resumed = _start(spec, resolved, None)
    start = time.perf_counter()
    failed = _ingest_phase(spec, resolved, state, client, here)
    seconds = {"ingest": time.perf_counter() - start}
    return _report(spec, resolved, state, seconds, failed, resumed, here)


def embed_step(
    spec: RunSpec,
    *,
    client: Any = None,
    progress: bool | None = None,
    resolved: RunPlan | None = None,
    log_every: float = LOG_EVERY,
) -> RunReport:
    """Step 2 alone: datacube Zarr -> embeddings Zarr and GeoParquet parts (after step 1).

    Parameters
    ----------
    spec
        A validated run spec (:func:`xclay.run.load_spec`); its datacubes must be
        complete (ingested, or the input datacube).
    client
        A ``distributed.Client``: regions run as tasks on its workers. ``None``:
        in this process, one after another.
    progress
        Progress: ``None`` (default) a bar on an interactive terminal and a line every
        ``log_every`` seconds otherwise (a batch job's log); ``True`` a bar; ``False``
        nothing.
    resolved
        The spec's plan, when the caller has made it already (``xclay run`` prints it
        before running); default: planned here.
    log_every
        Seconds between progress lines in a log (default 30).

    Returns
    -------
    RunReport
        What the step did; ``status`` is ``"incomplete"`` when regions failed. When none
        failed, the run's STAC description is written too.
    """
    from xclay.completion import is_complete

    here = _Here(progress, log_every)
    resolved = resolved or plan(spec)
    preflight(spec, resolved)
    state, resumed = _start(spec, resolved, None)
    cubes = state.record().paths.datacubes
    missing = [c for c in cubes if not is_complete(location(c, spec.storage))]
    if missing:
        raise XClayError(
            f"{', '.join(missing)} is not a complete datacube yet; run xclay ingest first."
        )
    start = time.perf_counter()
    failed = _embed_phase(spec, resolved, state, client, here)
    seconds = {"embed": time.perf_counter() - start}
    if not failed:
        _describe(spec)
    return _report(spec, resolved, state, seconds, failed, resumed, here)


def export_step(
    spec: RunSpec,
    format: str = DEFAULT_FORMAT,
    *,
    out: Where | None = None,
    overwrite: bool = False,
    **options: Any,
) -> list[Path | str]:
    """Step 3 alone: (re)write a finished run's outputs in an output format.

    Parameters
    ----------
    spec
        The run's spec; its embeddings Zarr(s) must be complete.
    format
        A registered output format (:func:`xclay.outputs.formats.export_formats`). The run's
        own table (``geoparquet``) is rewritten part by part with the spec's settings; any
        other format is written once per embeddings store, ``<store><suffix>``.
    out
        The folder for a per-store format's files, a path or URL (default: the run's
        folder, where the run's STAC description finds them).
    overwrite
        Replace existing files of a per-store format.
    **options
        The format's options (``pca``, ``dtype`` for ``cog``).

    Returns
    -------
    list of Path or str
        The files (or, for the run's table, its folder) written: paths, or URLs.
    """
    from xclay.outputs.formats import check_options, get_exporter

    exporter = get_exporter(format)
    options = check_options(exporter, options)
    record = RunState(spec.outdir).record()
    if exporter.by_region:
        if any(value != exporter.options[name].default for name, value in options.items()):
            raise ConfigError(
                f"a run's {exporter.name} parts follow its spec ({', '.join(options)} under "
                "outputs:); change the spec instead of passing options."
            )
        parts = _rewrite_parts(spec, record)
        written: list[Path | str] = [parts.path if parts.is_local else parts.url]
    else:
        folder = location(out, spec.storage) if out is not None else spec.outdir
        folder.mkdir()
        written = []
        for store in (location(p, spec.storage) for p in record.paths.embeddings):
            target = folder / f"{store.stem}{exporter.suffix}"
            given = target.path if target.is_local else target.url
            written += exporter.write(store.url, given, overwrite=overwrite, **options)
    _describe(spec)
    return written


def _rewrite_parts(spec: RunSpec, record: RunRecord) -> Location:
    """The run's GeoParquet parts written afresh from its complete embeddings Zarr(s)."""
    from xclay.outputs.export import open_embeddings
    from xclay.run.tasks import part_path, write_part

    out = spec.geoparquet_path
    out.mkdir()
    for k, path in enumerate(record.paths.embeddings):
        emb = open_embeddings(location(path, spec.storage))
        shape = (emb.sizes["chip_y"], emb.sizes["chip_x"])
        for region in embed_regions(k, emb.sizes["time"], shape, spec.compute.region_chips):
            part = emb.isel(
                time=slice(region.time, region.time + 1),
                chip_y=slice(*region.rows),
                chip_x=slice(*region.cols),
            )
            ds = part.load()
            if bool(ds["embedded"].any()):
                write_part(spec.outdir.url, record, region, ds, None)
            else:
                part_path(record, region).remove()
    return out
