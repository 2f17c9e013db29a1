"""Reading ahead on object storage: the chunks of the windows a batch loop will ask for
next, in flight while it decodes the ones it asked for.

Gathering a batch's chunks at once (:func:`xclay.datacube.chunks.gather`) hides the
latency of each request behind the others, but a reader that fetches a batch, decodes it,
and only then fetches the next leaves the store idle while it decodes, and waits a full
round trip at the start of every batch. The fill loop knows the order in which it will
read every window of a block (:func:`xclay.batch.batching.iter_batches` tells a source
that can use it, through ``expect``); with it, :class:`ReadAhead` keeps the chunks of the
next windows (at least as many as one read asks for, and at least half of
:data:`~xclay.storage.ranges.MAX_IN_FLIGHT`) being fetched by background threads, so
that each read finds its chunks arrived, or arriving.

Reads that do not follow the order given (other callers, a loop stopped and started
again) are not served from it: the caller gathers their chunks itself.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from xclay.datacube.chunks import DirectWindowReader, Gathered, gather
from xclay.storage.ranges import MAX_IN_FLIGHT

__all__ = ["ReadAhead"]


@dataclass
class _Round:
    """One background gather: the chunks of windows ``start:end`` of the plan."""

    start: int
    end: int
    result: Future[list[Gathered]]


class ReadAhead:
    """The chunks of the coming windows, fetched before they are asked for.

    Parameters
    ----------
    readers
        The arrays' window readers (pixels, and quality where the cube has it); every
        read-ahead fetches the chunks of each.
    """

    def __init__(self, readers: list[DirectWindowReader]) -> None:
        self._readers = readers
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="xclay-readahead")
        self._plan: np.ndarray | None = None
        self._pos = 0  # the first window of the plan not read yet
        self._requested = 0  # the first window of the plan not being fetched yet
        self._rounds: list[_Round] = []

    def expect(self, windows: np.ndarray) -> None:
        """The windows ``(t, row, col)`` that the coming reads will ask for, in order
        (what was expected before and not read is dropped)."""
        self._drop()
        self._plan = np.asarray(windows, dtype=np.int64).reshape(-1, 3)

    def take(self, windows: np.ndarray, size: int) -> list[Gathered] | None:
        """For each reader, the stored bytes of the chunks ``windows`` (of ``size`` px)
        need, fetched ahead (waiting for those still arriving), and the fetches of the
        next windows started; None when ``windows`` are not the next of the plan (the
        plan is then dropped)."""
        plan, n = self._plan, len(windows)
        if plan is None or not np.array_equal(plan[self._pos : self._pos + n], windows):
            self._drop()
            return None
        a, b = self._pos, self._pos + n
        self._request(a, b, size)
        self._request(b, min(len(plan), b + max(n, MAX_IN_FLIGHT // 2)), size)
        merged: list[Gathered] = [{} for _ in self._readers]
        for r in self._rounds:
            if r.start < b and r.end > a:
                for mine, got in zip(merged, r.result.result(), strict=True):
                    mine.update(got)
        self._pos = b
        self._rounds = [r for r in self._rounds if r.end > b]
        return merged

    def close(self) -> None:
        self._drop()
        self._pool.shutdown(wait=True)

    def _request(self, start: int, end: int, size: int) -> None:
        assert self._plan is not None
        start = max(start, self._requested)
        if start >= end:
            return
        windows = self._plan[start:end]
        wants = [(reader, windows, size) for reader in self._readers]
        self._rounds.append(_Round(start, end, self._pool.submit(gather, wants)))
        self._requested = end

    def _drop(self) -> None:
        for r in self._rounds:
            r.result.cancel()  # one already running finishes; nobody waits for it
        self._rounds.clear()
        self._plan, self._pos, self._requested = None, 0, 0
