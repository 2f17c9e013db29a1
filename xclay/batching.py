"""From chip windows to batches: read, check validity, assemble, prefetch.

The hot path reads each chip window straight from the cube's backing array
(NumPy, or the Zarr store through xarray's lazy indexer: basic slices only,
no coordinate lookups) into a slot of a preallocated batch buffer. Buffers
are reused from a fixed pool, so memory stays at ``(prefetch + 2)`` batches
whatever the size of the cube. With ``prefetch > 0`` a background thread
reads the next batches while the encoder works on the current one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import numpy as np
import xarray as xr

from xclay.chips import ChipGrid
from xclay.chunkio import ArrayLayout, DirectWindowReader, UnsupportedLayout
from xclay.datacube import in_memory, nodata_value, store_source
from xclay.errors import DatacubeError
from xclay.masks import PixelClass
from xclay.quality import ChipQuality, QualityFilter

if TYPE_CHECKING:
    import torch

    from xclay.protocols import ChipBatch, Sampler

__all__ = [
    "ArrayWindowReader",
    "BatchPlan",
    "Block",
    "HostBatch",
    "chip_windows",
    "iter_batches",
    "make_sampler",
    "to_chip_batch",
]

log = logging.getLogger(__name__)


class ArrayWindowReader:
    """Reads chip windows from a datacube's ``pixels`` (NumPy, dask or lazily opened Zarr),
    and from its ``quality`` classes when it has them.

    Validity of a pixel: inside the raster, no band equal to the nodata
    value, every band finite, and not of quality class nodata.
    """

    def __init__(self, pixels: xr.DataArray, quality: xr.DataArray | None = None) -> None:
        self._variable = pixels.variable
        self.direct = _direct_reader(pixels, pad=None)
        self._direct_quality = (
            _direct_reader(quality, pad=float(PixelClass.NODATA)) if quality is not None else None
        )
        # Not pixels.data: for a lazily opened cube that would read every pixel.
        self._numpy = pixels.variable._data if in_memory(pixels) else None
        self._quality = quality.variable if quality is not None else None
        self._quality_numpy = (
            quality.variable._data if quality is not None and in_memory(quality) else None
        )
        self.nodata: float | None = nodata_value(pixels)
        self._shape = tuple(int(s) for s in pixels.shape)
        self._dtype = np.dtype(pixels.dtype)
        # Value written where a padded window leaves the raster (masked out anyway).
        if self.nodata is not None:
            self._pad_value: float = self.nodata
        else:
            self._pad_value = float("nan") if self._dtype.kind == "f" else 0.0

    @property
    def shape(self) -> tuple[int, int, int, int]:
        t, b, y, x = self._shape
        return t, b, y, x

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def has_quality(self) -> bool:
        return self._quality is not None

    @classmethod
    def of(cls, cube: xr.Dataset) -> ArrayWindowReader:
        """The reader of a datacube's pixels (and quality classes, if any)."""
        return cls(cube["pixels"], cube["quality"] if "quality" in cube.data_vars else None)

    def read_quality(self, t: int, row: int, col: int, size: int, out: np.ndarray) -> None:
        """Fill ``out`` ``[size, size]`` with quality classes; nodata outside the raster."""
        if self._quality is None:
            raise DatacubeError("this datacube has no quality variable.")
        _, _, ny, nx = self._shape
        r0, r1 = max(row, 0), min(row + size, ny)
        c0, c1 = max(col, 0), min(col + size, nx)
        if self._direct_quality is not None:
            self._direct_quality.read(t, row, col, size, out)
            return
        if r1 - r0 != size or c1 - c0 != size:
            out.fill(PixelClass.NODATA)
        if self._quality_numpy is not None:
            window = self._quality_numpy[t, r0:r1, c0:c1]
        else:
            window = _host(self._quality[t, r0:r1, c0:c1].data)
        out[r0 - row : r1 - row, c0 - col : c1 - col] = window

    def read(self, t: int, row: int, col: int, size: int, out: np.ndarray) -> None:
        if self.direct is not None:
            self.direct.read(t, row, col, size, out)
            return
        _, _, ny, nx = self._shape
        r0, r1 = max(row, 0), min(row + size, ny)
        c0, c1 = max(col, 0), min(col + size, nx)
        if r1 - r0 != size or c1 - c0 != size:
            out.fill(self._pad_value)
        if self._numpy is not None:
            window = self._numpy[t, :, r0:r1, c0:c1]
        else:
            window = _host(self._variable[t, :, r0:r1, c0:c1].data)
        out[:, r0 - row : r1 - row, c0 - col : c1 - col] = window

    def valid(
        self,
        t: int,
        row: int,
        col: int,
        size: int,
        pixels: np.ndarray,
        out: np.ndarray,
        quality: np.ndarray | None = None,
    ) -> None:
        """Fill ``out`` ``[size, size]`` with pixel validity of a window read into ``pixels``
        (and its quality classes, read with :meth:`read_quality`)."""
        _, _, ny, nx = self._shape
        if self.nodata is not None and np.isfinite(self.nodata):
            np.all(pixels != pixels.dtype.type(self.nodata), axis=0, out=out)
        else:
            out.fill(True)
        if self._dtype.kind == "f":
            out &= np.isfinite(pixels).all(axis=0)
        if quality is not None:
            out &= quality != PixelClass.NODATA
        if row < 0 or col < 0 or row + size > ny or col + size > nx:
            inside = np.zeros((size, size), dtype=bool)
            inside[max(0, -row) : min(size, ny - row), max(0, -col) : min(size, nx - col)] = True
            out &= inside


def _host(data: Any) -> np.ndarray:
    """A window as NumPy: CuPy results (engine="kvikio") come back to the host."""
    get = getattr(data, "get", None)
    return np.asarray(get() if callable(get) and not isinstance(data, np.ndarray) else data)


def _direct_reader(da: xr.DataArray, pad: float | None) -> DirectWindowReader | None:
    """Direct chunk reads for a variable opened unchanged from a store xclay can read
    (:mod:`xclay.chunkio`); None (read through xarray) otherwise."""
    source = store_source(da)
    if source is None:
        return None
    try:
        layout = ArrayLayout.open(source)
        if layout.shape != tuple(da.shape) or layout.dtype.newbyteorder("=") != da.dtype:
            return None
        if pad is None:
            nodata = nodata_value(da)
            pad = nodata if nodata is not None else (float("nan") if da.dtype.kind == "f" else 0.0)
        return DirectWindowReader(layout, pad_value=pad)
    except UnsupportedLayout as err:
        log.info("reading %s through zarr: %s", source, err)
        return None


def chip_windows(grid: ChipGrid) -> tuple[np.ndarray, np.ndarray]:
    """Top-left pixel offsets of the chip rows and columns, enumerated by xbatcher.

    xbatcher's :class:`~xbatcher.BatchSchema` walks ``chip_size`` windows with
    an overlap of ``chip_size - stride`` over the raster (for ``edges="pad"``,
    over the raster grown to cover the last windows) without touching pixels.
    The result must equal the chip grid's own layout, whose offsets place every
    footprint and chip id: if the two ever disagree (an xbatcher release that
    changes its edge rule), batching stops here instead of misplacing chips.
    """
    from xbatcher import BatchSchema

    size, step = grid.spec.chip_size, grid.spec.step
    extent = tuple(grid.source.shape)
    if grid.spec.edges == "pad":
        extent = tuple(
            max(n, (count - 1) * step + size)
            for n, count in zip(grid.source.shape, grid.shape, strict=True)
        )
    raster = xr.DataArray(np.broadcast_to(np.uint8(0), extent), dims=("y", "x"))
    schema = BatchSchema(
        raster,
        input_dims={"y": size, "x": size},
        input_overlap={"y": size - step, "x": size - step},
        concat_input_bins=False,
        preload_batch=False,
    )
    windows = [selectors[0] for selectors in schema.selectors.values()]
    rows = np.array(sorted({w["y"].start for w in windows}), dtype=np.int64)
    cols = np.array(sorted({w["x"].start for w in windows}), dtype=np.int64)
    if (
        len(windows) != rows.size * cols.size
        or not np.array_equal(rows, grid.row_offsets)
        or not np.array_equal(cols, grid.col_offsets)
    ):
        raise DatacubeError(
            f"xbatcher enumerates {len(windows)} chip windows ({rows.size} x {cols.size}) "
            f"where the chip grid has {grid.rows} x {grid.cols} (edges={grid.spec.edges!r}); "
            "this xbatcher version cuts windows differently: pin xbatcher to a supported "
            "version (see pyproject.toml)."
        )
    return rows, cols


@dataclass(frozen=True)
class Block:
    """A block of chips: half-open ranges of time steps, chip rows and chip columns."""

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

    @classmethod
    def whole(cls, times: int, grid: ChipGrid) -> Block:
        return cls((0, times), (0, grid.rows), (0, grid.cols))


@dataclass(frozen=True)
class BatchPlan:
    """What to batch: which chips (a block of the grid), how many at once, and the filters."""

    grid: ChipGrid
    block: Block
    batch_size: int
    quality: QualityFilter = field(default_factory=QualityFilter)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DatacubeError(f"batch_size must be >= 1, got {self.batch_size}.")

    @property
    def total_chips(self) -> int:
        t, r, c = self.block.shape
        return t * r * c


@dataclass
class HostBatch:
    """Chips assembled in host memory: a view of one pooled buffer.

    ``pixels[:n]``/``valid[:n]`` hold the accepted chips, ``index[:n]`` their
    ``(t, chip_row, chip_col)``; ``scanned`` counts all chips looked at to
    fill it (accepted or filtered out).
    """

    pixels: np.ndarray
    valid: np.ndarray
    index: np.ndarray
    scanned: int
    slot: int

    def __len__(self) -> int:
        return int(self.index.shape[0])


class _Pool:
    """Fixed set of reusable batch buffers (pinned host memory when feeding a GPU)."""

    def __init__(
        self, n: int, plan: BatchPlan, bands: int, dtype: np.dtype[Any], pin: bool
    ) -> None:
        size = plan.grid.spec.chip_size
        shape = (plan.batch_size, bands, size, size)
        self.pixels = [_host_buffer(shape, dtype, pin) for _ in range(n)]
        self.valid = [np.empty((plan.batch_size, size, size), dtype=bool) for _ in range(n)]
        self.free: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self.free.put(i)

    @property
    def slots(self) -> int:
        return len(self.pixels)

    def release(self, slot: int) -> None:
        self.free.put(slot)


def _host_buffer(shape: tuple[int, ...], dtype: np.dtype[Any], pin: bool) -> np.ndarray:
    if not pin:
        return np.empty(shape, dtype=dtype)
    import torch

    return torch.empty(shape, dtype=_torch_dtype(dtype), pin_memory=True).numpy()


def iter_batches(
    reader: ArrayWindowReader,
    plan: BatchPlan,
    quality: ChipQuality,
    *,
    prefetch: int = 2,
    pin_memory: bool = False,
) -> Iterator[HostBatch]:
    """Yield batches of the block's accepted chips in (time, chip row, chip col) order.

    Fills ``quality`` for every chip scanned; batches hold the chips that pass
    the plan's :class:`~xclay.quality.QualityFilter`.
    A yielded batch's buffer is reused once the consumer asks for the next
    one: use (or copy) it before then.
    """
    if prefetch < 0:
        raise DatacubeError(f"prefetch must be >= 0, got {prefetch}.")
    pool = _Pool(prefetch + 2, plan, reader.shape[1], reader.dtype, pin_memory)
    if prefetch == 0:
        yield from _recycling(_fill_batches(reader, plan, quality, pool, None), pool)
        return

    def fill(stop: threading.Event) -> Iterator[HostBatch]:
        return _fill_batches(reader, plan, quality, pool, stop)

    yield from _recycling(_prefetched(fill, pool, prefetch), pool)


class BufferPool(Protocol):
    """Reusable batch buffers: a batch's ``slot`` goes back with ``release`` once used."""

    free: queue.Queue[int]

    @property
    def slots(self) -> int: ...

    def release(self, slot: int) -> None: ...


class PooledBatch(Protocol):
    slot: int


B = TypeVar("B", bound=PooledBatch)


def _recycling(batches: Iterator[B], pool: BufferPool) -> Iterator[B]:
    previous: B | None = None
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


def _fill_batches(
    reader: ArrayWindowReader,
    plan: BatchPlan,
    quality: ChipQuality,
    pool: _Pool,
    stop: threading.Event | None,
) -> Iterator[HostBatch]:
    grid = plan.grid
    size = grid.spec.chip_size
    (t0, t1), (r0, r1), (c0, c1) = plan.block.times, plan.block.rows, plan.block.cols
    rows, cols = chip_windows(grid)
    pixels_count = float(size * size)
    classes = np.empty((size, size), dtype=np.uint8) if reader.has_quality else None
    slot = pool.free.get()
    n, scanned = 0, 0
    index = np.empty((plan.batch_size, 3), dtype=np.int64)
    for t in range(t0, t1):
        for i in range(r0, r1):
            for j in range(c0, c1):
                if stop is not None and stop.is_set():
                    return
                row, col = rows[i], cols[j]
                at = (t - t0, i - r0, j - c0)  # where the chip sits in the block's arrays
                buf, valid = pool.pixels[slot][n], pool.valid[slot][n]
                reader.read(t, int(row), int(col), size, buf)
                fractions = None
                if classes is not None and quality.class_fraction is not None:
                    reader.read_quality(t, int(row), int(col), size, classes)
                    counts = np.bincount(classes.ravel(), minlength=len(PixelClass))[
                        : len(PixelClass)
                    ]
                    fractions = counts / pixels_count
                    quality.class_fraction[at] = fractions
                reader.valid(t, int(row), int(col), size, buf, valid, classes)
                fraction = 1.0 - np.count_nonzero(valid) / pixels_count
                quality.nodata_fraction[at] = fraction
                scanned += 1
                if plan.quality.reason(fraction, fractions) >= 0:
                    continue
                index[n] = (t, i, j)
                n += 1
                if n == plan.batch_size:
                    yield HostBatch(
                        pool.pixels[slot], pool.valid[slot], index.copy(), scanned, slot
                    )
                    slot = pool.free.get()
                    n, scanned = 0, 0
    if n or scanned:
        yield HostBatch(
            pool.pixels[slot][:n], pool.valid[slot][:n], index[:n].copy(), scanned, slot
        )
    else:
        pool.free.put(slot)


_DONE = object()


def _prefetched(
    fill: Callable[[threading.Event], Iterator[B]], pool: BufferPool, depth: int
) -> Iterator[B]:
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
        # Unblock a producer waiting for a free buffer or a queue slot, then wait for it.
        for i in range(pool.slots):
            pool.free.put(i)
        while thread.is_alive():
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.1)
        thread.join()


def to_chip_batch(
    host: HostBatch | Any,
    lonlat: np.ndarray,
    times: np.ndarray,
    device: torch.device,
    chip_ids: np.ndarray | None = None,
) -> ChipBatch:
    """Hand a batch to torch: a host batch through DLPack (zero-copy on CPU, then an async
    copy from pinned memory on CUDA); a device batch
    (:class:`xclay.chunk_batches.DeviceBatch`) as it is.

    ``lonlat`` is ``(rows, cols, 2)`` chip centres, ``times`` ``(time,)`` datetime64,
    ``chip_ids`` ``(rows, cols)`` (optional).
    """
    import torch

    from xclay.protocols import ChipBatch

    t, i, j = host.index[:, 0], host.index[:, 1], host.index[:, 2]
    pixels: torch.Tensor = (
        torch.from_dlpack(host.pixels) if isinstance(host.pixels, np.ndarray) else host.pixels
    )
    valid: torch.Tensor = (
        torch.from_dlpack(host.valid) if isinstance(host.valid, np.ndarray) else host.valid
    )
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


def make_sampler(
    reader: ArrayWindowReader,
    grid: ChipGrid,
    lonlat: np.ndarray,
    times: np.ndarray,
) -> Sampler:
    """A reproducible source of sample chips for fitting (rcf filters, measured normalisation).

    ``sample(n, seed)`` draws chips uniformly over (time, row, col) with the
    seed and returns up to ``n`` of them with at most half their pixels
    nodata (fewer if the cube has fewer such chips), as a CPU ChipBatch.
    """

    def sample(n: int, seed: int) -> ChipBatch:
        import torch

        from xclay.protocols import ChipBatch

        size = grid.spec.chip_size
        total = len(times) * grid.rows * grid.cols
        rng = np.random.default_rng(seed)
        # Candidates beyond n leave room for chips that are mostly nodata.
        order = rng.choice(total, size=min(total, 8 * n), replace=False)
        bands = reader.shape[1]
        pixels = np.empty((n, bands, size, size), dtype=reader.dtype)
        valid = np.empty((n, size, size), dtype=bool)
        classes = np.empty((size, size), dtype=np.uint8) if reader.has_quality else None
        picked: list[tuple[int, int, int]] = []
        for flat in order:
            if len(picked) == n:
                break
            t, rest = divmod(int(flat), grid.rows * grid.cols)
            i, j = divmod(rest, grid.cols)
            row, col = int(grid.row_offsets[i]), int(grid.col_offsets[j])
            k = len(picked)
            reader.read(t, row, col, size, pixels[k])
            if classes is not None:
                reader.read_quality(t, row, col, size, classes)
            reader.valid(t, row, col, size, pixels[k], valid[k], classes)
            if valid[k].mean() >= 0.5:
                picked.append((t, i, j))
        if not picked:
            raise DatacubeError(
                "no chip of the cube has at least half of its pixels valid: nothing to fit or "
                "measure on. Check the nodata value and the masks."
            )
        k = len(picked)
        idx = np.array(picked)
        return ChipBatch(
            pixels=torch.from_numpy(pixels[:k].copy()),
            valid=torch.from_numpy(valid[:k].copy()),
            lonlat=torch.from_numpy(lonlat[idx[:, 1], idx[:, 2]].astype(np.float64)),
            time=np.asarray(times)[idx[:, 0]],
        )

    return sample


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    import torch

    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError as err:
        raise DatacubeError(
            f"pixels of dtype {dtype} cannot be handed to torch; convert the cube to "
            "uint16, int16 or float32."
        ) from err
