"""Regions to tasks, a window at a time, and what they did folded as it arrives.

A world run has some 590,000 regions a phase. They are never all submitted: on a Dask
cluster a sliding window of regions is in flight (:func:`window`: by default two per
worker thread, read again as workers come and go), each result folded into a
:class:`Tally` as it arrives and then dropped, and the next region submitted. So the
driver and the scheduler hold at most the window's tasks, and the driver a bit per region
(:class:`RegionSet`), whatever the area. Retries are Dask's (a task whose worker died is
run again elsewhere); a region's marker, written by its task, is what makes it done
(:mod:`xclay.run.state`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from xclay.run.state import Region, RegionSet

__all__ = ["Tally", "execute", "window"]

log = logging.getLogger(__name__)

PER_THREAD = 2  # regions in flight a worker thread: one running, one waiting
RESIZE_EVERY = 10.0  # seconds between readings of the cluster's size
LOST_KEPT = 100  # reasons of lost tasks kept for the report (their count is kept whole)


@dataclass
class Tally:
    """What a phase's regions did, folded from their results (or, for regions done before
    this process, their done markers): sums, not lists of regions.

    Attributes
    ----------
    counts
        Chip counts summed over the regions (``chips_total``, ``chips_embedded``, ...).
    by_zone
        The same per zone.
    embedded_by_step
        Chips embedded per ``(zone, time step)`` (what each STAC item of the run says).
    any_valid
        Per zone, whether an ingested block had a valid pixel.
    parts
        Regions that wrote a GeoParquet part (those with a chip embedded).
    readers, fallbacks
        How regions read their chips, and every slower road taken (distinct values).
    done, failed
        Regions done and failed, as results arrived.
    lost, lost_count
        Reasons of tasks lost without a result (their workers kept dying), the first
        :data:`LOST_KEPT`; and how many were lost in all.
    folded
        The regions whose results are in the tally.
    """

    counts: dict[str, int] = field(default_factory=dict)
    by_zone: dict[int, dict[str, int]] = field(default_factory=dict)
    embedded_by_step: dict[tuple[int, int], int] = field(default_factory=dict)
    any_valid: dict[int, bool] = field(default_factory=dict)
    parts: int = 0
    readers: dict[str, None] = field(default_factory=dict)
    fallbacks: dict[str, None] = field(default_factory=dict)
    done: int = 0
    failed: int = 0
    lost: list[str] = field(default_factory=list)
    lost_count: int = 0
    folded: RegionSet = field(default_factory=RegionSet)

    def add(self, region: Region, result: Mapping[str, Any]) -> None:
        """Fold a task's result (its status and what its region did)."""
        status = result.get("status", "done")
        if status == "failed":
            if result.get("region") == "?":
                self.lost_count += 1
                if len(self.lost) < LOST_KEPT:
                    self.lost.append(str(result.get("reason", "")))
            else:
                self.failed += 1
            return
        self.fold(region, result)

    def fold(self, region: Region, info: Mapping[str, Any]) -> None:
        """Fold what a done region did (a result, or its marker read back).

        Parameters
        ----------
        region
            The region.
        info
            Its result or marker: ``counts`` and ``data_path`` (embed), ``any_valid``
            (ingest).
        """
        if region in self.folded:
            return  # its marker and its result: once
        self.folded.add(region.zone, region.index)
        self.done += 1
        counts = info.get("counts") or {}
        zone = self.by_zone.setdefault(region.zone, {})
        for key, value in counts.items():
            self.counts[key] = self.counts.get(key, 0) + int(value)
            zone[key] = zone.get(key, 0) + int(value)
        embedded = int(counts.get("chips_embedded", 0))
        if counts:
            step = (region.zone, region.time)
            self.embedded_by_step[step] = self.embedded_by_step.get(step, 0) + embedded
            self.parts += embedded > 0
        if "any_valid" in info:
            self.any_valid[region.zone] = self.any_valid.get(region.zone, False) or bool(
                info["any_valid"]
            )
        path = info.get("data_path") or {}
        if path.get("reader"):
            self.readers[f"{path['reader']} on {path.get('device', '?')}"] = None
        for reason in path.get("fallbacks", []):
            self.fallbacks[reason] = None


def window(client: Any, given: int | None) -> int:
    """Regions in flight on ``client``'s cluster: ``given``, else :data:`PER_THREAD` per
    worker thread (at least 2).

    Parameters
    ----------
    client
        A ``distributed.Client``.
    given
        ``compute.regions_in_flight`` (None: sized from the cluster).
    """
    if given:
        return int(given)
    workers = client.scheduler_info().get("workers", {})
    threads = sum(int(w.get("nthreads", 1)) for w in workers.values())
    return max(2, PER_THREAD * threads)


def execute(
    fn: Callable[[Any, dict[str, Any]], dict[str, Any]],
    regions: Iterator[Region],
    task_outdir: Any,
    client: Any,
    tally: Tally,
    *,
    in_flight: int | None = None,
    on_done: Callable[[Region], None] | None = None,
    on_submit: Callable[[int], None] | None = None,
) -> None:
    """Run ``fn(task_outdir, region)`` for each region, folding each result into ``tally``:
    here one after another (``client`` None), or on a Dask cluster with a window of
    regions in flight.

    Parameters
    ----------
    fn
        The task (:func:`~xclay.run.tasks.ingest_region`, :func:`~xclay.run.tasks.
        embed_region`).
    regions
        The regions to do, made as they are asked for.
    task_outdir
        The run's output folder as tasks take it (a URL, or a location as plain values).
    client
        A ``distributed.Client``, or None.
    tally
        Where results are folded.
    in_flight
        Regions in flight (None: :func:`window`).
    on_done
        Called with each region once its result is folded (progress).
    on_submit
        Called with the number of tasks in flight after each submission (benchmarks count
        them).
    """
    if client is None:
        for region in regions:
            tally.add(region, fn(task_outdir, region.to_dict()))
            if on_done is not None:
                on_done(region)
        return
    from distributed import as_completed

    size = window(client, in_flight)
    sized = time.monotonic()
    pending: dict[str, Region] = {}
    completed: Any = as_completed  # distributed ships no types
    queue: Any = completed()

    def submit() -> bool:
        region = next(regions, None)
        if region is None:
            return False
        future = client.submit(fn, task_outdir, region.to_dict(), pure=False)
        pending[future.key] = region
        queue.add(future)
        if on_submit is not None:
            on_submit(len(pending))
        return True

    while len(pending) < size and submit():
        pass
    for future in queue:
        region = pending.pop(future.key)
        try:
            result = future.result()
        except Exception as err:  # its workers kept dying (KilledWorker), or similar
            result = {"region": "?", "status": "failed", "reason": f"{type(err).__name__}: {err}"}
        future.release()
        tally.add(region, result)
        if on_done is not None:
            on_done(region)
        if in_flight is None and time.monotonic() - sized > RESIZE_EVERY:
            size, sized = window(client, None), time.monotonic()  # workers come and go
        while len(pending) < size and submit():
            pass
