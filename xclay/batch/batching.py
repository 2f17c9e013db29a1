"""From chip windows to batches: one fill loop for every reader and every device.

A :class:`~xclay.protocols.BatchSource` reads chip windows (all bands, and the
quality classes where the cube has them) into slots of a preallocated batch
buffer; this module does everything else, the same way for every source:

- the block's chip windows, enumerated once per block (xbatcher, checked
  against the chip grid's arithmetic);
- validity (nodata, non-finite values, quality class nodata, pixels past the
  raster), nodata and class fractions, and the quality filter, for a whole
  read at once, with the source's array module: NumPy on the host, CuPy on a
  GPU; that is the only difference between the paths;
- batches of exactly ``batch_size`` accepted chips (the last one may be
  smaller): chips that fail the filter are compacted out in place;
- a fixed pool of buffers (pinned host memory when feeding a GPU; device
  memory for GPU sources), reused only once the consumer's work on them has
  finished (a CUDA event per slot), so memory stays at ``prefetch + 2``
  batches whatever the size of the cube;
- a background thread that reads ``prefetch`` batches ahead of the encoder;
- the hand-off to torch through DLPack (zero-copy on the CPU and on the GPU).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from xclay.batch.chips import ChipGrid
from xclay.devices import torch_dtype
from xclay.errors import DatacubeError, DataIntegrityError
from xclay.masks import PixelClass
from xclay.quality import ChipQuality, QualityFilter

if TYPE_CHECKING:
    import torch

    from xclay.protocols import BatchSource, ChipBatch, Sampler

__all__ = [
    "Batch",
    "BatchPlan",
    "Block",
    "BufferPool",
    "chip_validity",
    "chip_windows",
    "class_fractions",
    "iter_batches",
    "make_sampler",
    "to_chip_batch",
]

log = logging.getLogger(__name__)

# NumPy or CuPy arrays: the fill loop uses only what both modules share.
Array = Any
N_CLASSES = len(PixelClass)


@dataclass(frozen=True)
class Block:
    """A block of chips: half-open ranges of time steps, chip rows and chip columns.

    Each range must have ``0 <= first <= stop`` (an empty range is allowed); anything
    else is a :class:`~xclay.errors.DatacubeError`.

    Parameters
    ----------
    times
        ``(first, stop)`` time-step indices of the cube: the block holds ``first`` up to,
        not including, ``stop``.
    rows, cols
        ``(first, stop)`` chip rows and chip columns of the chip grid (chip indices, not
        pixels), half-open as ``times``.
    """

    times: tuple[int, int]
    rows: tuple[int, int]
    cols: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("times", "rows", "cols"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise DatacubeError(f"block {name} must be a range lo <= hi, got {(lo, hi)}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (
            self.times[1] - self.times[0],
            self.rows[1] - self.rows[0],
            self.cols[1] - self.cols[0],
        )

    @property
    def size(self) -> int:
        t, r, c = self.shape
        return t * r * c

    @classmethod
    def whole(cls, times: int, grid: ChipGrid) -> Block:
        return cls((0, times), (0, grid.rows), (0, grid.cols))


def chip_windows(grid: ChipGrid, block: Block | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel offsets of a block's chip rows and columns, enumerated by xbatcher.

    xbatcher's :class:`~xbatcher.BatchSchema` walks ``chip_size`` windows with
    an overlap of ``chip_size - stride`` over the block's pixel extent (which,
    for ``edges="pad"``, may reach past the raster) without touching pixels.
    It costs what the block costs, not the whole grid. The result must equal
    the chip grid's own arithmetic, which places every footprint and chip id:
    if the two ever disagree (an xbatcher release that changes its edge rule),
    batching stops here instead of misplacing chips.

    Parameters
    ----------
    grid
        The chip grid: chip size, stride and edge rule over the cube's pixel grid.
    block
        The block whose chip rows and columns to enumerate (its time steps play no
        part); ``None``: the whole grid.

    Returns
    -------
    tuple of numpy.ndarray
        Top pixel rows ``(n_rows,)`` and left pixel columns ``(n_cols,)``, int64, of the
        block's chips.
    """
    from xbatcher import BatchSchema

    rows, cols = (block.rows, block.cols) if block is not None else (None, None)
    want_rows, want_cols = grid.offsets(rows, cols)
    if want_rows.size == 0 or want_cols.size == 0:
        return want_rows, want_cols
    size, step = grid.spec.chip_size, grid.spec.step
    origin = (int(want_rows[0]), int(want_cols[0]))
    extent = (int(want_rows[-1]) - origin[0] + size, int(want_cols[-1]) - origin[1] + size)
    raster = xr.DataArray(np.broadcast_to(np.uint8(0), extent), dims=("y", "x"))
    schema = BatchSchema(
        raster,
        input_dims={"y": size, "x": size},
        input_overlap={"y": size - step, "x": size - step},
        concat_input_bins=False,
        preload_batch=False,
    )
    windows = [selectors[0] for selectors in schema.selectors.values()]
    got_rows = np.array(sorted({w["y"].start for w in windows}), dtype=np.int64) + origin[0]
    got_cols = np.array(sorted({w["x"].start for w in windows}), dtype=np.int64) + origin[1]
    if (
        len(windows) != got_rows.size * got_cols.size
        or not np.array_equal(got_rows, want_rows)
        or not np.array_equal(got_cols, want_cols)
    ):
        raise DatacubeError(
            f"xbatcher enumerates {len(windows)} chip windows ({got_rows.size} x "
            f"{got_cols.size}) where the chip grid has {want_rows.size} x {want_cols.size} "
            f"(edges={grid.spec.edges!r}); this xbatcher version cuts windows differently: pin "
            "xbatcher to a supported version (see pyproject.toml)."
        )
    return got_rows, got_cols


@dataclass(frozen=True)
class BatchPlan:
    """What to batch: which chips (a block of the grid), how many at once, and the filters.

    Parameters
    ----------
    grid
        The chip grid the block's chips belong to.
    block
        The chips to read: ranges of time steps, chip rows and chip columns.
    batch_size
        The number of *accepted* chips per batch (at least 1), on every path: the
        encoder is always called with ``batch_size`` chips, except the last call of a
        block.
    quality
        Which chips to keep, by their nodata and pixel-class fractions; default
        :class:`~xclay.quality.QualityFilter`'s defaults (at most half the pixels nodata).
    chips
        Block-shaped ``(time, rows, cols)`` bool: the chips to read; the others are
        neither read nor counted. ``None``: every chip of the block.
    """

    grid: ChipGrid
    block: Block
    batch_size: int
    quality: QualityFilter = field(default_factory=QualityFilter)
    chips: np.ndarray | None = None  # block-shaped bool: the chips to read (None: all)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DatacubeError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.chips is not None and self.chips.shape != self.block.shape:
            raise DatacubeError(
                f"chips has shape {self.chips.shape}; the block's is {self.block.shape}."
            )

    @property
    def total_chips(self) -> int:
        return self.block.size if self.chips is None else int(self.chips.sum())


@dataclass
class Batch:
    """Accepted chips of one batch, in a slot of the buffer pool.

    The data is in place when the batch is yielded, and stays valid until the
    consumer asks for the next batch.

    Attributes
    ----------
    pixels
        ``[n, band, y, x]`` chips in the cube's dtype: a NumPy array for host sources,
        a CuPy array for GPU sources (a view of the slot's buffer).
    valid
        ``[n, y, x]`` bool, True where a pixel has data; NumPy or CuPy, as ``pixels``.
    index
        ``[n, 3]`` int64 (NumPy): each chip's ``(t, chip_row, chip_col)`` in the grid.
    scanned
        How many chips were looked at to fill the batch, accepted or filtered out.
    slot
        The buffer pool slot that holds the batch.
    """

    pixels: Array
    valid: Array
    index: np.ndarray
    scanned: int
    slot: int

    def __len__(self) -> int:
        return int(self.index.shape[0])


class BufferPool:
    """A fixed set of reusable batch buffers in the source's memory.

    A slot goes back with :meth:`release` once the consumer has queued its work
    on it. A session keeps one pool for all its blocks (:meth:`lease` it for each
    block's fill loop): batch buffers are hundreds of MB, and fresh ones would
    be faulted in (or pinned) again for every region.

    Parameters
    ----------
    xp
        The source's array module: ``numpy`` (host buffers) or ``cupy`` (device
        buffers).
    slots
        How many batch buffers to make (:func:`iter_batches` makes ``prefetch + 2``).
    shape
        ``(batch_size, bands, chip_size, chip_size)``: each slot's pixel buffer; its
        validity (bool) and class (uint8) buffers are ``(batch_size, chip_size,
        chip_size)``.
    dtype
        The pixels' dtype (the cube's).
    with_classes
        Also make a buffer of quality classes per slot (the source reads a ``quality``
        variable).
    pin
        Host pixel buffers in pinned (page-locked) memory, for copies to a GPU; no
        effect on device buffers. Default: ordinary host memory.
    cuda_events
        The consumer computes on a CUDA device: a released slot is taken again only
        after the work queued on it has finished (an event recorded on the consumer's
        stream), since neither kvikIO writes nor host writes to pinned memory are
        ordered on a CUDA stream. Default: a slot is free as soon as it is released.
    """

    def __init__(
        self,
        xp: Any,
        slots: int,
        shape: tuple[int, int, int, int],
        dtype: np.dtype[Any],
        *,
        with_classes: bool,
        pin: bool = False,
        cuda_events: bool = False,
    ) -> None:
        n, _bands, size, _ = shape
        self.xp = xp
        self.pixels = [_buffer(xp, shape, dtype, pin) for _ in range(slots)]
        self.valid = [xp.empty((n, size, size), dtype=bool) for _ in range(slots)]
        self.classes = [
            xp.empty((n, size, size), dtype=np.uint8) for _ in range(slots if with_classes else 0)
        ]
        self._events: list[Any] = [None] * slots
        self._cuda_events = cuda_events
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(slots):
            self.free.put(i)
        self.key = (xp, slots, shape, np.dtype(dtype), with_classes, pin, cuda_events)
        self._leased = False
        self._lock = threading.Lock()

    def lease(self) -> bool:
        """Take the pool for one fill loop with every slot free (a slot's pending CUDA
        event still guards it); False while another loop holds it (one that was never
        closed, after an error): that caller makes a pool of its own."""
        with self._lock:
            if self._leased:
                return False
            self._leased = True
        while not self.free.empty():
            self.free.get_nowait()
        for i in range(self.slots):
            self.free.put(i)
        return True

    def end_lease(self) -> None:
        with self._lock:
            self._leased = False

    @property
    def slots(self) -> int:
        return len(self.pixels)

    def take(self) -> int:
        slot = self.free.get()
        event, self._events[slot] = self._events[slot], None
        if event is not None:
            event.synchronize()
        return slot

    def release(self, slot: int) -> None:
        if self._cuda_events:
            import torch

            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
            self._events[slot] = event
        self.free.put(slot)

    def unblock(self) -> None:
        """Wake a producer waiting for a slot (when the consumer stops early)."""
        for i in range(self.slots):
            self.free.put(i)


def _buffer(xp: Any, shape: tuple[int, ...], dtype: np.dtype[Any], pin: bool) -> Array:
    if xp is not np or not pin:
        return xp.empty(shape, dtype=dtype)
    import torch

    return torch.empty(shape, dtype=torch_dtype(dtype), pin_memory=True).numpy()


# --------------------------------------------------------------------------- validity


def chip_validity(
    xp: Any,
    pixels: Array,
    classes: Array | None,
    nodata: float | None,
    out: Array,
    outside: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """``out[k, y, x]``: pixel ``(y, x)`` of chip ``k`` has data.

    A pixel is valid when no band equals ``nodata``, every band is finite, its
    quality class is not nodata, and it lies inside the raster. The result is
    written into ``out``.

    Parameters
    ----------
    xp
        The arrays' module: ``numpy`` or ``cupy``.
    pixels
        ``[k, band, y, x]`` chips in the cube's dtype.
    classes
        ``[k, y, x]`` uint8 quality classes (:class:`~xclay.masks.PixelClass`);
        ``None`` when the cube has none.
    nodata
        The pixels' nodata value; ``None`` or a non-finite value: no value is compared
        (non-finite float values are invalid anyway).
    out
        ``[k, y, x]`` bool array the validity is written into.
    outside
        Per chip, how many of its last rows and of its last columns reach past the
        raster (``edges="pad"``): two ``(k,)`` int NumPy arrays. ``None``: every chip
        lies inside the raster.
    """
    if nodata is not None and np.isfinite(nodata):
        xp.all(pixels != pixels.dtype.type(nodata), axis=1, out=out)
    else:
        out.fill(True)
    if pixels.dtype.kind == "f":
        out &= xp.isfinite(pixels).all(axis=1)
    if classes is not None:
        out &= classes != PixelClass.NODATA
    if outside is not None:
        rows_out, cols_out = outside
        size = out.shape[-1]
        if rows_out.any() or cols_out.any():
            ramp = xp.arange(size)
            keep_rows = ramp[None, :] < xp.asarray(size - rows_out)[:, None]
            keep_cols = ramp[None, :] < xp.asarray(size - cols_out)[:, None]
            out &= keep_rows[:, :, None] & keep_cols[:, None, :]


def class_fractions(xp: Any, classes: Array) -> Array:
    """``[k, N_CLASSES]`` float64 fraction of each :class:`PixelClass` in each chip
    (codes outside the known classes count towards no class).

    Parameters
    ----------
    xp
        The module of ``classes`` (``numpy`` or ``cupy``); the result is of the same.
    classes
        ``[k, y, x]`` uint8 quality class codes of ``k`` chips.
    """
    k = classes.shape[0]
    area = classes.shape[1] * classes.shape[2]
    codes = xp.minimum(classes.reshape(k, -1), N_CLASSES).astype(np.int32)
    codes += (xp.arange(k, dtype=np.int32) * (N_CLASSES + 1))[:, None]
    counts = xp.bincount(codes.ravel(), minlength=k * (N_CLASSES + 1))
    return counts.reshape(k, N_CLASSES + 1)[:, :N_CLASSES] / float(area)


def _host(a: Array) -> np.ndarray:
    """A small array (fractions, flags) on the host: CuPy results come back."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


# --------------------------------------------------------------------------- the fill loop


def iter_batches(
    source: BatchSource,
    plan: BatchPlan,
    quality: ChipQuality,
    *,
    prefetch: int = 2,
    pin_memory: bool = False,
    cuda_events: bool = False,
    buffers: BufferPool | None = None,
) -> Generator[Batch, None, None]:
    """Yield batches of the block's accepted chips in (time, chip row, chip col) order.

    Batches hold the chips that pass the plan's :class:`~xclay.quality.QualityFilter`,
    exactly ``plan.batch_size`` of them except in the last batch. A yielded batch's
    buffer is reused once the consumer asks for the next one: use (or copy) it
    before then.

    Parameters
    ----------
    source
        The reader of chip windows (a :class:`~xclay.protocols.BatchSource`); its array
        module decides where the buffers are and where validity is computed.
    plan
        Which chips to read (a block of the grid), the batch size and the quality filter.
    quality
        Block-shaped per-chip quality, filled in (nodata and class fractions) for every
        chip scanned.
    prefetch
        How many batches a background thread reads ahead of the consumer (at least 0;
        0: no thread, chips are read when the consumer asks). Memory holds
        ``prefetch + 2`` batches.
    pin_memory
        Host buffers in pinned memory (feeding a GPU).
    cuda_events
        The consumer computes on a CUDA device: a buffer is reused only once the work
        queued on it has finished (see :class:`BufferPool`).
    buffers
        A pool from :func:`batch_buffers` to reuse; ``None``, or a pool that does not
        fit ``source`` and ``plan`` or that another loop holds: a new pool is made.
    """
    if prefetch < 0:
        raise DatacubeError(f"prefetch must be >= 0, got {prefetch}.")
    key = _buffers_key(source, plan, prefetch, pin_memory, cuda_events)
    pool = buffers
    if pool is None or pool.key != key or not pool.lease():  # none fits, or it is busy
        pool = batch_buffers(source, plan, prefetch, pin_memory, cuda_events)
        pool.lease()
    try:
        if prefetch == 0:
            yield from _recycling(_fill(source, plan, quality, pool, None), pool)
            return

        def fill(stop: threading.Event) -> Iterator[Batch]:
            with source.reading_stream():
                yield from _fill(source, plan, quality, pool, stop)

        yield from _recycling(_prefetched(fill, pool, prefetch), pool)
    finally:
        pool.end_lease()


def _buffers_key(
    source: BatchSource, plan: BatchPlan, prefetch: int, pin: bool, cuda_events: bool
) -> tuple[Any, ...]:
    size = plan.grid.spec.chip_size
    shape = (plan.batch_size, source.shape[1], size, size)
    dtype = np.dtype(source.dtype)
    return (source.xp, prefetch + 2, shape, dtype, source.has_quality, pin, cuda_events)


def batch_buffers(
    source: BatchSource,
    plan: BatchPlan,
    prefetch: int = 2,
    pin_memory: bool = False,
    cuda_events: bool = False,
) -> BufferPool:
    """The buffers :func:`iter_batches` fills for ``source`` and ``plan``'s batches (a
    session makes them once and passes them to every block's loop)."""
    size = plan.grid.spec.chip_size
    return BufferPool(
        source.xp,
        prefetch + 2,
        (plan.batch_size, source.shape[1], size, size),
        source.dtype,
        with_classes=source.has_quality,
        pin=pin_memory,
        cuda_events=cuda_events,
    )


def _fill(
    source: BatchSource,
    plan: BatchPlan,
    quality: ChipQuality,
    pool: BufferPool,
    stop: threading.Event | None,
) -> Iterator[Batch]:
    xp = source.xp
    grid, block, capacity = plan.grid, plan.block, plan.batch_size
    size = grid.spec.chip_size
    _, _, ny, nx = source.shape
    row_off, col_off = chip_windows(grid, block)
    (t0, t1), (r0, r1), (c0, c1) = block.times, block.rows, block.cols
    tt, ii, jj = np.meshgrid(
        np.arange(t0, t1), np.arange(r0, r1), np.arange(c0, c1), indexing="ij", copy=False
    )
    order = np.stack([tt.ravel(), ii.ravel(), jj.ravel()], axis=1)
    if plan.chips is not None:
        order = order[plan.chips.ravel()]
    expect = getattr(source, "expect", None)
    if expect is not None:  # the reads' windows in order: a remote source fetches ahead
        expect(np.stack([order[:, 0], row_off[order[:, 1] - r0], col_off[order[:, 2] - c0]], 1))
    with_classes = source.has_quality
    slot = pool.take()
    index = np.empty((capacity, 3), dtype=np.int64)
    n, scanned, pos = 0, 0, 0
    while pos < len(order):
        if stop is not None and stop.is_set():
            pool.release(slot)
            return
        chips = order[pos : pos + capacity - n]
        pos += len(chips)
        k = len(chips)
        windows = np.stack(
            [chips[:, 0], row_off[chips[:, 1] - r0], col_off[chips[:, 2] - c0]], axis=1
        )
        pixels = pool.pixels[slot][n : n + k]
        classes = pool.classes[slot][n : n + k] if with_classes else None
        valid = pool.valid[slot][n : n + k]
        source.read(windows, pixels, classes)
        outside = (
            np.maximum(0, windows[:, 1] + size - ny),
            np.maximum(0, windows[:, 2] + size - nx),
        )
        chip_validity(xp, pixels, classes, source.nodata, valid, outside)
        nodata_fraction = 1.0 - _host(valid.sum(axis=(1, 2))) / float(size * size)
        fractions = _host(class_fractions(xp, classes)) if classes is not None else None
        at = (chips[:, 0] - t0, chips[:, 1] - r0, chips[:, 2] - c0)
        quality.nodata_fraction[at] = nodata_fraction
        if fractions is not None and quality.class_fraction is not None:
            quality.class_fraction[at] = fractions
        keep = plan.quality.reasons_of(nodata_fraction, fractions) < 0
        kept = int(keep.sum())
        if kept < k and kept:
            chosen = xp.asarray(np.flatnonzero(keep))
            pixels[:kept] = pixels[chosen]
            valid[:kept] = valid[chosen]
        _wait_for_stream(xp)
        index[n : n + kept] = chips[keep]
        n += kept
        scanned += k
        if n == capacity:
            yield Batch(
                pool.pixels[slot][:n], pool.valid[slot][:n], index[:n].copy(), scanned, slot
            )
            slot = pool.take()
            n, scanned = 0, 0
    if n or scanned:
        yield Batch(pool.pixels[slot][:n], pool.valid[slot][:n], index[:n].copy(), scanned, slot)
    else:
        pool.release(slot)


def _wait_for_stream(xp: Any) -> None:
    """Wait for the work a read's chips queued on the current CUDA stream (validity, the
    compaction; nothing to wait for on the host). Both hand-overs that follow need it done:
    the slot's next read lands with kvikIO, outside any stream, over chips the compaction
    may still be moving, and a full batch goes to the consumer, which reads it on its own
    stream (torch's, through DLPack, or CuPy's in its thread)."""
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _recycling(batches: Iterator[Batch], pool: BufferPool) -> Iterator[Batch]:
    previous: Batch | None = None
    try:
        for batch in batches:
            if previous is not None:
                pool.release(previous.slot)
            previous = batch
            yield batch
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


_DONE = object()


def _prefetched(
    fill: Callable[[threading.Event], Iterator[Batch]], pool: BufferPool, depth: int
) -> Iterator[Batch]:
    """Run ``fill`` (a batch producer) in a thread, ``depth`` batches ahead of the consumer."""
    ready: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in fill(stop):
                while not stop.is_set():
                    try:
                        ready.put(batch, timeout=0.1)
                        break
                    except queue.Full:
                        continue
            ready.put(_DONE)
        except BaseException as err:  # re-raised in the consumer's thread
            ready.put(err)

    thread = threading.Thread(target=produce, name="xclay-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = ready.get()
            if item is _DONE:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        pool.unblock()  # a producer waiting for a free buffer wakes up and sees the stop
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()


# --------------------------------------------------------------------------- to torch


def to_chip_batch(
    batch: Batch,
    lonlat: np.ndarray,
    times: np.ndarray,
    device: torch.device,
    chip_ids: np.ndarray | None = None,
    origin: tuple[int, int] = (0, 0),
) -> ChipBatch:
    """Hand a batch to torch through DLPack: zero-copy for NumPy (CPU) and CuPy (GPU)
    buffers; host buffers feeding a GPU are copied asynchronously from pinned memory.

    Parameters
    ----------
    batch
        A batch from :func:`iter_batches`.
    lonlat
        ``(rows, cols, 2)`` chip centres in WGS84 degrees, longitude first, of a block
        of the grid whose first chip is at ``origin``.
    times
        The cube's ``(time,)`` datetime64 time steps.
    device
        The torch device the encoder runs on: pixels and validity are moved there
        when their buffers are elsewhere (chip centres always are).
    chip_ids
        ``(rows, cols)`` chip ids of the same block as ``lonlat``; ``None``: the batch
        carries no ids.
    origin
        ``(chip row, chip column)`` of the block's first chip in the grid; default
        ``(0, 0)``: the block starts at the grid's first chip.

    Returns
    -------
    ChipBatch
        The batch's pixels and validity, chip centres and times, and chip ids.
    """
    import torch

    from xclay.protocols import ChipBatch

    t = batch.index[:, 0]
    i, j = batch.index[:, 1] - origin[0], batch.index[:, 2] - origin[1]
    pixels: torch.Tensor = torch.utils.dlpack.from_dlpack(batch.pixels)
    valid: torch.Tensor = torch.utils.dlpack.from_dlpack(batch.valid)
    if pixels.device != device:
        pixels = pixels.to(device, non_blocking=True)
        valid = valid.to(device, non_blocking=True)
    return ChipBatch(
        pixels=pixels,
        valid=valid,
        lonlat=torch.from_numpy(np.ascontiguousarray(lonlat[i, j], dtype=np.float64)).to(device),
        time=np.asarray(times)[t],
        chip_ids=None if chip_ids is None else chip_ids[i, j],
    )


def make_sampler(source: BatchSource, grid: ChipGrid, times: np.ndarray) -> Sampler:
    """A reproducible source of sample chips for fitting (rcf filters, measured normalisation).

    ``sample(n, seed)`` draws chips uniformly over (time, row, col) with the
    seed and returns up to ``n`` of them with at most half their pixels
    nodata, as a CPU ChipBatch. It looks at no more than ``8 * n`` candidate
    chips, so it may return fewer than ``n`` even where the cube has more such
    chips; chips whose chunks cannot be read are left out of the sample.

    Parameters
    ----------
    source
        The reader of chip windows; it must read into host memory (NumPy buffers).
    grid
        The cube's chip grid: chip size, stride and the chip centres' coordinates. The
        sample is drawn from all of its chips.
    times
        The cube's ``(time,)`` datetime64 time steps; the sample draws from every one
        and each chip carries its own.

    Returns
    -------
    Sampler
        ``sample(n, seed)``: the sampled chips' pixels, validity, chip centres and
        times (no chip ids). It raises :class:`~xclay.errors.DatacubeError` when no
        chip it looks at has at least half of its pixels valid.
    """

    def sample(n: int, seed: int) -> ChipBatch:
        import torch

        from xclay.protocols import ChipBatch

        size = grid.spec.chip_size
        total = len(times) * grid.rows * grid.cols
        rng = np.random.default_rng(seed)
        # Candidates beyond n leave room for chips that are mostly nodata.
        order = rng.choice(total, size=min(total, 8 * n), replace=False)
        t, rest = np.divmod(order.astype(np.int64), grid.rows * grid.cols)
        i, j = np.divmod(rest, grid.cols)
        step = grid.spec.step
        windows = np.stack([t, i * step, j * step], axis=1)
        _, bands, ny, nx = source.shape
        pixels = np.empty((n, bands, size, size), dtype=source.dtype)
        valid = np.empty((n, size, size), dtype=bool)
        picked: list[int] = []
        damaged: list[str] = []  # why each unreadable candidate could not be read
        looked = 0
        # Read candidates a few at a time, in order, until n are mostly valid.
        for start in range(0, len(order), max(1, min(n, 64))):
            if len(picked) == n:
                break
            todo = windows[start : start + max(1, min(n, 64))]
            px = np.empty((len(todo), bands, size, size), dtype=source.dtype)
            ok = np.empty((len(todo), size, size), dtype=bool)
            cl = np.empty((len(todo), size, size), np.uint8) if source.has_quality else None
            readable = _read_what_can_be_read(source, todo, px, cl, damaged)
            looked += len(todo)
            outside = (
                np.maximum(0, todo[:, 1] + size - ny),
                np.maximum(0, todo[:, 2] + size - nx),
            )
            chip_validity(np, px, cl, source.nodata, ok, outside)
            ok &= readable[:, None, None]
            for k in np.flatnonzero(ok.mean(axis=(1, 2)) >= 0.5)[: n - len(picked)]:
                pixels[len(picked)], valid[len(picked)] = px[k], ok[k]
                picked.append(start + int(k))
        if not picked and damaged:
            raise DataIntegrityError(
                f"the datacube is damaged: {len(damaged)} of the {looked} chips sampled could "
                f"not be read (first: {damaged[0]}), and no readable one has half of its "
                "pixels valid. Rewrite the datacube (or rerun the ingest that wrote it)."
            )
        if not picked:
            raise DatacubeError(
                "no chip of the cube has at least half of its pixels valid: nothing to fit or "
                "measure on. Check the nodata value and the masks."
            )
        if damaged:
            log.warning(
                "%d sampled chips could not be read and were left out (first: %s); the "
                "regions holding them will fail, naming the damage",
                len(damaged),
                damaged[0],
            )
        chosen = np.asarray(picked)
        lon, lat = grid.lonlat_of(i[chosen], j[chosen])
        m = len(picked)
        return ChipBatch(
            pixels=torch.from_numpy(pixels[:m].copy()),
            valid=torch.from_numpy(valid[:m].copy()),
            lonlat=torch.from_numpy(np.stack([lon, lat], axis=-1).astype(np.float64)),
            time=np.asarray(times)[t[chosen]],
        )

    return sample


def _read_what_can_be_read(
    source: BatchSource,
    windows: np.ndarray,
    pixels: np.ndarray,
    classes: np.ndarray | None,
    damaged: list[str],
) -> np.ndarray:
    """Read sample windows; a window whose chunks cannot be read (corrupt, truncated) is
    left out of the sample rather than stopping the fit (its reason added to ``damaged``):
    the region holding it fails on its own when it is embedded, naming the chunk."""
    try:
        source.read(windows, pixels, classes)
        return np.ones(len(windows), dtype=bool)
    except (OSError, RuntimeError, ValueError):  # I/O, and decoders' errors on bad bytes
        readable = np.ones(len(windows), dtype=bool)
        for k in range(len(windows)):
            try:
                source.read(
                    windows[k : k + 1],
                    pixels[k : k + 1],
                    None if classes is None else classes[k : k + 1],
                )
            except (OSError, RuntimeError, ValueError) as err:
                damaged.append(str(err))
                readable[k] = False
        return readable
