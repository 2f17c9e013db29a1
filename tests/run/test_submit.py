"""Bounded submission: a window of regions in flight on a real Dask cluster, results folded
into a tally as they arrive, a bit per region in the driver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from xclay.run.cluster import NO_DASHBOARD
from xclay.run.state import Region, RegionSet, embed_regions
from xclay.run.submit import Tally, execute, window

distributed = pytest.importorskip("distributed", reason="needs xclay[dask]")


def _region_task(outdir: Any, region: dict[str, Any]) -> dict[str, Any]:
    """A task standing for a region's: it takes a while and reports the region's counts."""
    time.sleep(0.01)
    r = Region.from_dict(region)
    chips = (r.rows[1] - r.rows[0]) * (r.cols[1] - r.cols[0])
    return {"region": r.name, "status": "done", "counts": {"chips_total": chips,
            "chips_embedded": chips - (r.index % 2)}}  # fmt: skip


def _regions() -> Iterator[Region]:
    return embed_regions(0, 2, (40, 50), 4)  # 2 time steps x 10 x 13 regions: 260


def _held(dask_scheduler: Any) -> int:
    """Regions in flight on the scheduler: tasks a client wants that have not finished. A
    finished one can stay wanted a moment after its result was folded: distributed sends
    a future's release one event-loop turn after it was asked for, so the next region's
    submission can reach the scheduler first."""
    return sum(1 for ts in dask_scheduler.tasks.values() if ts.who_wants and ts.state != "memory")


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, **NO_DASHBOARD
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


def test_the_scheduler_holds_at_most_the_window(client: Any) -> None:
    held: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            held.append(client.run_on_scheduler(_held))

    watcher = threading.Thread(target=watch)
    watcher.start()
    tally = Tally()
    in_flight: list[int] = []
    try:
        execute(_region_task, _regions(), "out", client, tally, in_flight=3,
                on_submit=in_flight.append)  # fmt: skip
    finally:
        stop.set()
        watcher.join()
    assert tally.done == 260 and len(tally.folded) == 260
    assert max(in_flight) == 3 and max(held) <= 3 and len(held) > 20, (max(held), len(held))
    assert tally.counts["chips_total"] == 2 * 40 * 50
    assert tally.counts["chips_embedded"] == 2 * 40 * 50 - 130
    assert sum(tally.embedded_by_step.values()) == tally.counts["chips_embedded"]
    assert tally.parts == 260


def test_the_window_is_sized_from_the_cluster(client: Any) -> None:
    assert window(client, None) == 2 * 2  # two workers of one thread: two regions each
    assert window(client, 7) == 7
    tally = Tally()
    execute(_region_task, _regions(), "out", client, tally)
    assert tally.done == 260


def test_in_this_process_regions_run_one_after_another() -> None:
    tally = Tally()
    seen: list[str] = []
    execute(_region_task, _regions(), "out", None, tally, on_done=lambda r: seen.append(r.name))
    assert seen == [r.name for r in _regions()] and tally.done == 260


def test_a_region_is_folded_once_and_lost_tasks_are_counted() -> None:
    tally = Tally()
    region = next(_regions())
    result = _region_task("out", region.to_dict())
    tally.add(region, result)
    tally.fold(region, {"region": region.to_dict(), **result})  # its marker, read back
    assert tally.done == 1 and tally.counts["chips_total"] == 16
    tally.add(region, {"region": "?", "status": "failed", "reason": "KilledWorker: w"})
    tally.add(region, {"region": region.name, "status": "failed", "reason": "bad"})
    assert tally.lost == ["KilledWorker: w"] and tally.lost_count == 1 and tally.failed == 1


def test_a_region_set_is_a_bit_per_region() -> None:
    done = RegionSet(iter(["embed-z00-0000003", "embed-z02-0001999"]))
    done.add(2, 1999)
    assert len(done) == 2
    assert "embed-z00-0000003" in done and Region("embed", 2, 1999, 0, (0, 1), (0, 1)) in done
    assert "embed-z00-0000004" not in done and "embed-z01-0000003" not in done
    assert "embed-z02-0009999" not in done


def test_a_local_cluster_leaves_port_8787_to_others() -> None:
    """`--cluster local:N` starts no dashboard and puts the scheduler's HTTP server on a
    free port: with 8787 taken (another run's cluster, a notebook's dashboard), no
    warning (an error here) and the cluster works."""
    import contextlib
    import socket

    from xclay.run.cluster import client_for

    with socket.socket() as taken:
        with contextlib.suppress(OSError):  # held by someone else already: the same case
            taken.bind(("", 8787))
            taken.listen()
        client, threads = client_for("local:1", None, "cpu", threads=1)
        try:
            assert client.submit(sum, [1, 2]).result() == 3
            port = client.cluster.scheduler.http_server.port
            assert port != 8787 and threads == 1
        finally:
            cluster = client.cluster
            client.close()
            cluster.close()
