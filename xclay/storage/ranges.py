"""Many byte ranges of many files at once: what a reader of chunked data needs from storage.

A batch of chips needs dozens of byte ranges (chunks, or ranges of shard files). On a
local disk each is one ``pread``, microseconds. On object storage each is an HTTP request
of tens of milliseconds, most of it waiting: read one after another, a batch of 64 chunks
at 20 ms a request takes 1.3 s. :func:`read_ranges` puts every range of a call in flight
at once (up to ``max_in_flight`` requests), the ranges of one object through obstore's
``get_ranges`` (ranges less than ``coalesce`` bytes apart become one request), and the
objects concurrently, on one event loop thread that xclay keeps for this: concurrency
sized for the store's latency, not for this machine's cores.

A file or object that does not exist reads as ``None`` (its ranges), for the caller to
call damage or a fill value; any other failure (after the store's retries) is a
:class:`~xclay.errors.StorageError` naming the URL.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from xclay.storage.location import Location, _storage_error, _store_for

if TYPE_CHECKING:
    from obstore import GetOptions

__all__ = ["MAX_IN_FLIGHT", "ByteRange", "gathers", "read_ranges"]

# Requests in flight at once: enough to hide 50 ms of latency behind ~1 GB/s of 1 MB
# chunks; an object store serves thousands per second and prefix.
MAX_IN_FLIGHT = 64
# Ranges of one object closer than this become one request (obstore's default): on object
# storage a request costs more than a megabyte of transfer.
COALESCE_BYTES = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class ByteRange:
    """Bytes of one file or object.

    Attributes
    ----------
    where
        The file or object.
    start
        The first byte (from 0); negative: the range is the last ``-start`` bytes (the
        whole file if it is shorter), ``length`` ignored.
    length
        How many bytes; ``None``: to the end of the file (the whole file from 0).
    """

    where: Location
    start: int = 0
    length: int | None = None


def read_ranges(
    ranges: Sequence[ByteRange],
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
    coalesce: int = COALESCE_BYTES,
) -> list[Any]:
    """The bytes of every range, all in flight at once.

    Parameters
    ----------
    ranges
        What to read, local and remote alike (local ones are read with ``pread``, one
        after another: microseconds each).
    max_in_flight
        Requests to object storage in flight at once, at most.
    coalesce
        Ranges of one object less than this many bytes apart are fetched in one request.

    Returns
    -------
    list
        One bytes-like object per range (``bytes``, or obstore's zero-copy ``Bytes``), in
        the order asked; ``None`` for a range of a file or object that does not exist. A
        range reaching past the end of its file comes back short.
    """
    out: list[Any] = [None] * len(ranges)
    remote: dict[Location, list[int]] = {}
    for i, r in enumerate(ranges):
        if r.where.is_local:
            out[i] = _read_local(r)
        else:
            remote.setdefault(r.where, []).append(i)
    if remote:
        fetched = _run(_fetch(ranges, remote, max(1, max_in_flight), coalesce))
        for i, data in fetched.items():
            out[i] = data
    return out


def _read_local(r: ByteRange) -> bytes | None:
    try:
        fd = os.open(r.where.path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    try:
        if r.start < 0:
            size = os.fstat(fd).st_size
            start = max(0, size + r.start)
            return os.pread(fd, size - start, start)
        length = r.length if r.length is not None else os.fstat(fd).st_size - r.start
        return os.pread(fd, max(0, length), r.start)
    finally:
        os.close(fd)


async def _fetch(
    ranges: Sequence[ByteRange],
    objects: dict[Location, list[int]],
    max_in_flight: int,
    coalesce: int,
) -> dict[int, Any]:
    import obstore
    from obstore.exceptions import NotFoundError

    gate = asyncio.Semaphore(max_in_flight)
    out: dict[int, Any] = {}

    async def whole_or_open_ended(where: Location, i: int) -> None:
        r = ranges[i]
        store = _store_for(where.root, where.options)
        options: GetOptions | None = None
        if r.start < 0:
            options = {"range": {"suffix": -r.start}}
        elif r.start > 0:
            options = {"range": {"offset": r.start}}
        async with gate:
            result = await obstore.get_async(store, where.key, options=options)
            out[i] = await result.bytes_async()

    async def bounded(where: Location, idx: list[int]) -> None:
        store = _store_for(where.root, where.options)
        starts = [ranges[i].start for i in idx]
        lengths = [int(ranges[i].length or 0) for i in idx]
        async with gate:
            if len(idx) == 1:
                parts = [
                    await obstore.get_range_async(
                        store, where.key, start=starts[0], length=lengths[0]
                    )
                ]
            else:
                parts = await obstore.get_ranges_async(
                    store, where.key, starts=starts, lengths=lengths, coalesce=coalesce
                )
        out.update(zip(idx, parts, strict=True))

    async def one_object(where: Location, idx: list[int]) -> None:
        ranged = [i for i in idx if ranges[i].start >= 0 and ranges[i].length is not None]
        rest = [i for i in idx if i not in set(ranged)]
        jobs = [whole_or_open_ended(where, i) for i in rest]
        if ranged:
            jobs.append(bounded(where, ranged))
        try:
            await asyncio.gather(*jobs)
        except (NotFoundError, FileNotFoundError):
            for i in idx:
                out[i] = None
        except Exception as err:
            raise _storage_error(where, err) from err

    await asyncio.gather(*(one_object(where, idx) for where, idx in objects.items()))
    return out


# --------------------------------------------------------------------------- the loop


class _Loop:
    """One event loop on a daemon thread, for every async request of this process (made
    again in a child process after a fork: threads do not survive it)."""

    _lock = threading.Lock()
    _loop: asyncio.AbstractEventLoop | None = None
    _pid = 0

    @classmethod
    def get(cls) -> asyncio.AbstractEventLoop:
        with cls._lock:
            if cls._loop is None or cls._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="xclay-ranges", daemon=True)
                thread.start()
                cls._loop, cls._pid = loop, os.getpid()
            return cls._loop


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the loop thread and wait for its result here."""
    return asyncio.run_coroutine_threadsafe(coro, _Loop.get()).result()


def gathers(where: Location) -> bool:
    """Whether reads at ``where`` pay a round trip each (object storage), so that a reader
    should gather the ranges it will need and read them together (:func:`read_ranges`);
    False for a local disk, where a read when needed, straight into its buffer, is best.

    Parameters
    ----------
    where
        The store or file read.
    """
    return not where.is_local
