"""Chips to a training loop: a PyTorch dataset over a datacube's chips.

:class:`ChipDataset` yields whole batches (:class:`TrainingBatch`: pixels, validity, the
chips' grid positions, centres and times, and their targets) read by xclay's batch path:
the chip grid (:class:`~xclay.batch.chips.ChipGrid`), the readers
(:func:`~xclay.batch.engines.open_batch_source`: a datacube store's chunk files read
directly with ``pread``, or ranged GETs on object storage, and decoded into the batch's own
buffer; kvikIO into GPU memory where asked and available), the validity rule and the
quality filter (:mod:`xclay.batch.batching`, :class:`~xclay.quality.QualityFilter`). No
per-chip xarray indexing is on the hot path: a batch is one ``read`` of its windows.

Targets: labels joined to the chip grid (:func:`xclay.apply.join_labels`: points,
polygons or a label raster, one target a chip), or a label raster on any grid put on the
datacube's pixels (nearest neighbour) for segmentation (``per_pixel=True``: a target a
pixel, :data:`IGNORE_INDEX` where unlabelled, torch's cross-entropy default); or none.

Sampling (:class:`TrainingConfig`): ``"random"`` (a seeded permutation each epoch),
``"balanced"`` (chips drawn with replacement, each class equally likely; segmentation: by
each chip's most frequent class) or ``"sequential"`` (grid order, for validation).
Everything is deterministic by ``seed`` and the epoch (:meth:`ChipDataset.set_epoch`).
An epoch's order is split without overlap across distributed ranks (as torch's
``DistributedSampler``: padded by wrapping round so every rank has as many batches, unless
``drop_last``), then across DataLoader workers (whole batches, round robin).

The quality filter needs each chip's nodata and class fractions: the dataset reads its
candidate chips once when it is made (the same fill loop as embedding), and keeps those
that pass.

Decoded chips are kept across epochs (:attr:`TrainingConfig.cache_bytes`): the first
epoch reads and decodes each chip, later ones copy it from a cache in shared memory made
when the dataset is, so it outlives DataLoader workers (new ones are started every epoch
unless ``persistent_workers``) and serves them all. Only chips the batch path checked are
kept; the cache holds what fits, the rest is read every epoch.

DataLoader workers hand batches to the training loop in shared memory each makes once
(:mod:`xclay.batchring`): a batch travels as the number of its slot, not as new
shared-memory tensors torch would make, send and map for each batch; the epoch set by
:meth:`ChipDataset.set_epoch` is in shared memory too, so persistent workers follow it.

Use it with ``torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=N)``.
Needs torch (a core dependency).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import xarray as xr
from torch.utils.data import IterableDataset as _IterableDataset

from xclay.batch.batching import BatchPlan, Block, chip_validity, iter_batches
from xclay.batch.chips import ChipGrid, ChipGridSpec, Edges
from xclay.batchring import BatchRing, RingSlot, shared_memory_free, shared_tensor
from xclay.datacube import datacube_geobox
from xclay.errors import ConfigError, LabelError
from xclay.protocols import SourceFacts
from xclay.quality import ChipQuality, QualityFilter
from xclay.storage import Where

if TYPE_CHECKING:
    import torch

    from xclay.apply.labels import ChipLabels, JoinRule
    from xclay.protocols import BatchSource, ChipBatch

__all__ = ["IGNORE_INDEX", "ChipDataset", "Sampling", "TrainingBatch", "TrainingConfig"]

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # unlabelled pixels: torch.nn.CrossEntropyLoss's default ignore_index
Sampling = Literal["random", "balanced", "sequential"]


@dataclass(frozen=True)
class TrainingConfig:
    """How a :class:`ChipDataset` batches and samples.

    Parameters
    ----------
    batch_size
        Chips a batch (the last batch of a worker may be smaller unless ``drop_last``).
    sampling
        ``"random"``, ``"balanced"`` or ``"sequential"`` (module docstring).
    quality
        Which chips to keep, by their nodata and pixel-class fractions (a
        :class:`~xclay.quality.QualityFilter` or a mapping of thresholds); default: at
        most half the pixels nodata.
    seed
        Seed of the sampling (with the epoch).
    epoch_length
        Chips an epoch draws (over all ranks); default: as many as pass the filter.
    drop_last
        Drop what does not fill a whole batch on each rank (and do not pad ranks).
    engine
        ``"zarr"`` (the host reads chunk files directly, or through xarray), ``"kvikio"``
        (into GPU memory) or ``"auto"``.
    device
        Where batches are read to with ``engine="kvikio"``/``"auto"`` (``"cpu"``,
        ``"cuda"``); host batches stay on the host (move them with
        :meth:`TrainingBatch.to`).
    threads
        Host threads decoding chunks in each process; default: the cores in the main
        process (``num_workers=0``), 1 in each DataLoader worker.
    cache_bytes
        Shared memory for decoded chips kept across epochs (pixels and validity),
        in bytes; default: a quarter of the machine's memory, at most 4 GiB and half of
        what ``/dev/shm`` has free; 0: none.
        Host reads only (``engine="kvikio"`` batches are not cached).
    rank, world_size
        This process's distributed rank and the number of ranks; default: torch.distributed's
        when it is initialised, else 0 and 1.
    """

    batch_size: int = 32
    sampling: Sampling = "random"
    quality: QualityFilter | Mapping[str, float] | None = None
    seed: int = 0
    epoch_length: int | None = None
    drop_last: bool = False
    engine: Literal["auto", "zarr", "kvikio"] = "zarr"
    device: str = "cpu"
    threads: int | None = None
    cache_bytes: int | None = None
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}.")
        if self.sampling not in get_args(Sampling):
            raise ConfigError(
                f"sampling must be one of {get_args(Sampling)}, got {self.sampling!r}."
            )
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ConfigError(f"epoch_length must be positive, got {self.epoch_length!r}.")
        if self.cache_bytes is not None and (
            not isinstance(self.cache_bytes, int) or self.cache_bytes < 0
        ):
            raise ConfigError(
                f"cache_bytes must be a non-negative integer, got {self.cache_bytes!r}."
            )
        if self.world_size is not None and self.world_size < 1:
            raise ConfigError(f"world_size must be positive, got {self.world_size!r}.")
        if self.rank is not None and not 0 <= self.rank < (self.world_size or 1):
            raise ConfigError(
                f"rank must be within [0, world_size), got {self.rank!r} of {self.world_size!r}."
            )
        object.__setattr__(self, "quality", QualityFilter.of(self.quality))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["quality"] = QualityFilter.of(self.quality).to_dict()
        return out


@dataclass
class TrainingBatch:
    """A batch of chips for a training step.

    Attributes
    ----------
    pixels
        ``[B, band, y, x]`` raw pixel values in the cube's dtype (not normalised).
    valid
        ``[B, y, x]`` bool: the pixel has data.
    index
        ``[B, 3]`` int64: each chip's ``(time step, chip row, chip column)`` in the grid.
    lonlat
        ``[B, 2]`` float64 chip centres (longitude, latitude; WGS84).
    time
        ``[B]`` datetime64[ns] of each chip's time step.
    target
        ``[B]`` int64 class indices or float32 values (chip labels), ``[B, y, x]`` int64
        classes (:data:`IGNORE_INDEX` where unlabelled) or float32 values (NaN) for
        segmentation; None without labels.
    """

    pixels: torch.Tensor
    valid: torch.Tensor
    index: torch.Tensor
    lonlat: torch.Tensor
    time: np.ndarray
    target: torch.Tensor | None = None
    # In a DataLoader worker: the slot of the worker's ring the tensors are in; the batch
    # travels as the slot (xclay.batchring).
    _slot: RingSlot | None = field(default=None, init=False, repr=False, compare=False)

    def __reduce__(self) -> tuple[Any, ...]:
        if self._slot is None:
            return (
                TrainingBatch,
                (self.pixels, self.valid, self.index, self.lonlat, self.time, self.target),
            )
        return (_from_slot, (self._slot, self.time, self.target is not None))

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> TrainingBatch:
        """The batch with its tensors on ``device``."""
        return TrainingBatch(
            self.pixels.to(device, non_blocking=non_blocking),
            self.valid.to(device, non_blocking=non_blocking),
            self.index,
            self.lonlat.to(device, non_blocking=non_blocking),
            self.time,
            None if self.target is None else self.target.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> TrainingBatch:
        """The batch in pinned host memory (``DataLoader(pin_memory=True)`` calls this)."""
        return TrainingBatch(
            self.pixels.pin_memory(),
            self.valid.pin_memory(),
            self.index,
            self.lonlat.pin_memory(),
            self.time,
            None if self.target is None else self.target.pin_memory(),
        )

    def chip_batch(self) -> ChipBatch:
        """The batch as an encoder takes it (:class:`~xclay.protocols.ChipBatch`), to embed
        it with a model of :mod:`xclay.models` (fine-tuning, frozen features)."""
        from xclay.protocols import ChipBatch

        return ChipBatch(self.pixels, self.valid, self.lonlat, self.time)


def _from_slot(
    tensors: dict[str, torch.Tensor], time: np.ndarray, has_target: bool
) -> TrainingBatch:
    """A batch handed over in a worker's ring slot (``tensors``: the slot's, unpickled)."""
    return TrainingBatch(
        tensors["pixels"],
        tensors["valid"],
        tensors["index"],
        tensors["lonlat"],
        time,
        tensors["target"] if has_target else None,
    )


def _default_cache_bytes() -> int:
    """A quarter of the machine's memory, at most 4 GiB, and at most half of what shared
    memory has free (a container's ``/dev/shm`` is often small: writing past it is a
    bus error, not a clean failure)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # a platform without these names
        return 0
    budget = min(4 << 30, memory // 4)
    shm = shared_memory_free()
    if shm is not None:  # None: no /dev/shm (macOS: torch shares through files elsewhere)
        budget = min(budget, shm // 2)
    return int(budget)


#: Chips whose centres a dataset works out when it is made (16 bytes a chip).
_CENTRES_AHEAD = 4_000_000


class _CubeFacts(SourceFacts):
    """What a batch needs of the cube without opening a batch source: shape, dtype,
    nodata."""

    def __init__(self, pixels: xr.DataArray) -> None:
        from xclay.datacube import nodata_value

        self._shape = tuple(int(n) for n in pixels.shape)
        self._dtype = np.dtype(pixels.dtype)
        self._nodata = nodata_value(pixels)


#: Reads chips ``rows`` of a batch: their pixels into the first array, their validity into
#: the second.
_Fill = Callable[[np.ndarray, np.ndarray, np.ndarray], None]


class _ChipCache:
    """Decoded chips kept across epochs in shared memory (torch tensors shared before any
    DataLoader worker starts: forked workers write into the same pages, spawned ones get
    them through torch's sharing): their pixels and validity, slot ``i`` for the dataset's
    chip ``i`` while ``i < capacity``; ``ready[i]`` is set after the chip is written.

    Within an epoch a chip is read by one worker (random and sequential sampling); with
    balanced sampling two may read it at once and write the same bytes.
    """

    def __init__(self, capacity: int, bands: int, size: int, dtype: np.dtype[Any]) -> None:
        import torch

        from xclay.devices import torch_dtype

        self.capacity = capacity
        self.ready = shared_tensor((capacity,), torch.uint8).fill_(0)
        self.pixels = shared_tensor((capacity, bands, size, size), torch_dtype(dtype))
        self.valid = shared_tensor((capacity, size, size), torch.bool)

    @classmethod
    def sized(cls, dataset: ChipDataset, budget: int | None) -> _ChipCache | None:
        """A cache for as many of the dataset's chips as ``budget`` bytes hold (None: the
        default budget), or None when there is no room or the cube is not read on the host."""
        if dataset.config.engine != "zarr":
            return None
        budget = _default_cache_bytes() if budget is None else budget
        pixels = dataset.cube["pixels"]
        size, bands = dataset.grid.spec.chip_size, int(pixels.sizes["band"])
        per_chip = size * size * (bands * pixels.dtype.itemsize + 1)  # pixels and validity
        capacity = min(len(dataset.chips), budget // per_chip)
        if capacity < 1:
            return None
        return cls(capacity, bands, size, pixels.dtype)

    def read(self, picked: np.ndarray, pixels: np.ndarray, valid: np.ndarray, fill: _Fill) -> None:
        """Fill ``pixels`` and ``valid`` for the chips ``picked`` (dataset positions): kept
        ones copied, the others read by ``fill`` (and kept where there is room)."""
        ready = self.ready.numpy()
        slots = np.asarray(picked)
        kept = slots < self.capacity
        kept[kept] = ready[slots[kept]] == 1
        missing = np.flatnonzero(~kept)
        if len(missing) == len(slots):
            fill(missing, pixels, valid)
        elif len(missing):
            got = np.empty((len(missing), *pixels.shape[1:]), dtype=pixels.dtype)
            got_valid = np.empty((len(missing), *valid.shape[1:]), dtype=valid.dtype)
            fill(missing, got, got_valid)
            pixels[missing], valid[missing] = got, got_valid
        if len(missing):
            self._keep(slots[missing], pixels[missing], valid[missing])
        hits = np.flatnonzero(kept)
        if len(hits):
            pixels[hits] = self.pixels.numpy()[slots[hits]]
            valid[hits] = self.valid.numpy()[slots[hits]]

    def _keep(self, slots: np.ndarray, pixels: np.ndarray, valid: np.ndarray) -> None:
        room = slots < self.capacity
        if room.any():
            self.pixels.numpy()[slots[room]] = pixels[room]
            self.valid.numpy()[slots[room]] = valid[room]
            self.ready.numpy()[slots[room]] = 1  # after the bytes: a reader sees whole chips


def _host_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor to read a batch into: in a DataLoader worker, in shared memory from
    the start (as torch's own collate allocates), so handing it to the main process copies
    nothing."""
    import torch.utils.data

    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return shared_tensor(shape, dtype)


@dataclass
class _Targets:
    """What a chip's target is: a chip label, a window of a label raster, or nothing."""

    kind: Literal["none", "chip", "pixel"]
    chip: np.ndarray | None = None  # [candidates] per chip
    raster: xr.DataArray | None = None  # [1, 1, y, x] on the cube's grid (pixel)
    classes: tuple[str, ...] | None = None
    regression: bool = False
    balance: np.ndarray | None = field(default=None, repr=False)  # [candidates] class a chip


class ChipDataset(_IterableDataset["TrainingBatch"]):
    """Batches of a datacube's chips with their targets, for ``DataLoader(batch_size=None)``.

    Parameters
    ----------
    cube
        A datacube (:func:`xclay.open_datacube`) or the path or URL of one.
    labels
        Labels joined already (:class:`~xclay.apply.labels.ChipLabels`, joined to this
        chip grid), anything :func:`xclay.apply.join_labels` takes (points, polygons, a
        label raster: one target a chip), or with ``per_pixel=True`` a label raster (a
        DataArray or a GeoTIFF, any grid); None: no targets.
    chip_size, stride, edges
        The chip grid (:class:`~xclay.batch.chips.ChipGridSpec`).
    column, rule, min_cover
        How vector labels join to chips (:func:`xclay.apply.join_labels`).
    per_pixel
        ``labels`` is a raster of a target a pixel (segmentation).
    config
        Batching, sampling, quality filter, seed, reader and distribution
        (:class:`TrainingConfig`).
    """

    def __init__(
        self,
        cube: xr.Dataset | Where,
        labels: Any = None,
        *,
        chip_size: int = 256,
        stride: int | None = None,
        edges: Edges = "drop",
        column: str | None = None,
        rule: JoinRule = "auto",
        min_cover: float = 0.5,
        per_pixel: bool = False,
        config: TrainingConfig | None = None,
    ) -> None:
        import torch

        from xclay.datacube import open_datacube

        self.config = config or TrainingConfig()
        self._where = None if isinstance(cube, xr.Dataset) else cube
        self.cube = cube if isinstance(cube, xr.Dataset) else open_datacube(cube)
        self.grid = ChipGrid.from_geobox(
            datacube_geobox(self.cube), ChipGridSpec(chip_size, stride, edges)
        )
        self.times = np.asarray(self.cube["time"].values, dtype="datetime64[ns]")
        # In shared memory: persistent DataLoader workers see the epoch the loop sets.
        self._epoch = shared_tensor((1,), torch.int64).fill_(0)
        self._source: BatchSource | None = None
        self._source_pid = -1
        self._ring: BatchRing | None = None  # a DataLoader worker's (xclay.batchring)
        self._ring_pid = -1
        chips, targets = self._candidates(labels, column, rule, min_cover, per_pixel)
        self.scanned = len(chips)
        keep = self._passing(chips)
        self.chips = chips[keep]
        self.targets = targets
        if targets.chip is not None:
            targets.chip = targets.chip[keep]
        if targets.balance is not None:
            targets.balance = targets.balance[keep]
        if not len(self.chips):
            raise LabelError(
                f"no chip passes the quality filter ({self.scanned} looked at): loosen "
                "TrainingConfig.quality, or check the labels lie over data."
            )
        log.info("%d of %d chips pass the quality filter", len(self.chips), self.scanned)
        self.cache = _ChipCache.sized(self, self.config.cache_bytes)
        self._facts = _CubeFacts(self.cube["pixels"])
        self._has_quality = "quality" in self.cube.data_vars
        # Chip centres worked out once here, not in every worker of every epoch.
        self._centres = self._centres_of(self.chips) if len(self.chips) <= _CENTRES_AHEAD else None

    # -- what there is -----------------------------------------------------------

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names of the targets, in index order (None: values, or no labels)."""
        return self.targets.classes

    def prepare_encoder(self, encoder: Any, *, device: str = "cpu", precision: str = "fp32") -> Any:
        """Get an encoder of :mod:`xclay.models` ready for this datacube's chips (its
        normalisation, wavelengths, fitted filters), as an embedding run does, so batches'
        :meth:`TrainingBatch.chip_batch` can go through ``encoder.encode`` (frozen features,
        a head trained on them).

        Parameters
        ----------
        encoder
            An :class:`~xclay.protocols.Encoder` (``xclay.models.get_model(...)``).
        device
            Where it computes (``"cpu"``, ``"cuda"``, ``"auto"``).
        precision
            ``"fp32"``, ``"bf16"``, ``"auto"``... (:func:`xclay.devices.resolve_precision`).

        Returns
        -------
        Encoder
            The encoder ready for these chips (what ``encoder.prepare`` returns: a new
            object for Clay, or ``encoder`` itself); call ``encode`` on it.
        """
        from xclay.batch.batching import make_sampler
        from xclay.devices import resolve_device, resolve_precision
        from xclay.embed import input_spec

        dev = resolve_device(device)
        source = self._open_source(in_worker=False)
        spec = input_spec(self.cube, source, self.grid.spec.chip_size, self.config.batch_size)
        sampler = make_sampler(source, self.grid, self.times)
        chosen = resolve_precision(precision, dev, encoder.preferred_precision)  # type: ignore[arg-type]
        prepared = encoder.prepare(spec, sampler, device=dev, precision=chosen)
        return encoder if prepared is None else prepared

    @property
    def epoch(self) -> int:
        """The epoch the next iteration draws (:meth:`set_epoch`)."""
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration draws (the order depends on the seed and it), in
        this process and in DataLoader workers, persistent ones too."""
        self._epoch[0] = int(epoch)

    def _rank(self) -> tuple[int, int]:
        if self.config.world_size is not None:
            return int(self.config.rank or 0), int(self.config.world_size)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
        return 0, 1

    def epoch_order(self, epoch: int | None = None) -> np.ndarray:
        """Indices into :attr:`chips` this rank reads in an epoch, in order (all workers).

        Parameters
        ----------
        epoch
            The epoch; default: the one set by :meth:`set_epoch`.
        """
        epoch = self.epoch if epoch is None else int(epoch)
        n = len(self.chips)
        length = self.config.epoch_length or n
        rng = np.random.default_rng([self.config.seed, epoch])
        if self.config.sampling == "sequential":
            order = np.arange(length) % n
        elif self.config.sampling == "random":
            order = np.concatenate([rng.permutation(n) for _ in range(-(-length // n))])[:length]
        else:
            balance = self.targets.balance
            if balance is None:
                raise ConfigError(
                    "sampling='balanced' needs class labels (chip classes, or a class raster)."
                )
            counts = np.bincount(balance)
            weight = 1.0 / counts[balance]
            order = rng.choice(n, size=length, replace=True, p=weight / weight.sum())
        rank, world = self._rank()
        if self.config.drop_last:
            order = order[: len(order) // world * world]
        else:
            total = -(-len(order) // world) * world
            order = np.resize(order, total)  # wraps round: every rank as many chips
        mine: np.ndarray = order[rank::world]
        return mine

    def _batches(self, epoch: int | None = None) -> list[np.ndarray]:
        order = self.epoch_order(epoch)
        size = self.config.batch_size
        batches = [order[k : k + size] for k in range(0, len(order), size)]
        if self.config.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return batches

    def __len__(self) -> int:
        """Batches an epoch gives this rank (all its DataLoader workers together)."""
        return len(self._batches())

    def __iter__(self) -> Iterator[TrainingBatch]:
        import torch.utils.data

        worker = torch.utils.data.get_worker_info()
        w, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        for batch in self._batches()[w::workers]:
            yield self._read(worker is not None, batch)

    # -- reading -----------------------------------------------------------------

    def _open_source(self, in_worker: bool) -> BatchSource:
        """The batch source of this process (opened once per process: DataLoader workers
        each open their own)."""
        if self._source is not None and self._source_pid == os.getpid():
            return self._source
        from xclay.batch.engines import open_batch_source
        from xclay.devices import ThreadBudget, available_cores, resolve_device

        threads = self.config.threads or (1 if in_worker else available_cores())
        budget = ThreadBudget(cores=available_cores(), torch=1, decode=threads, io=threads)
        device = resolve_device(self.config.device)
        choice = open_batch_source(
            self.cube,
            chip_size=self.grid.spec.chip_size,
            engine=self.config.engine,
            device=device,
            threads=budget,
            stride=self.grid.spec.step,
        )
        self._source, self._source_pid = choice.batches, os.getpid()
        return choice.batches

    def _centres_of(self, chips: np.ndarray) -> np.ndarray:
        lon, lat = self.grid.lonlat_of(chips[:, 1], chips[:, 2])
        centres: np.ndarray = np.stack([lon, lat], axis=-1).astype(np.float64)
        return centres

    def _lonlat(self, picked: np.ndarray, chips: np.ndarray) -> np.ndarray:
        if self._centres is not None:
            return np.ascontiguousarray(self._centres[picked])
        return self._centres_of(chips)

    def _windows(self, chips: np.ndarray) -> np.ndarray:
        step = self.grid.spec.step
        return np.stack([chips[:, 0], chips[:, 1] * step, chips[:, 2] * step], axis=1)

    def _read(self, in_worker: bool, picked: np.ndarray) -> TrainingBatch:
        """Batch ``picked`` (positions in :attr:`chips`). With the cache, the batch source
        is opened only when a chip is not kept yet (a DataLoader worker of a later epoch
        may never open it)."""
        import torch

        from xclay.devices import torch_dtype

        chips = self.chips[picked]
        windows = self._windows(chips)
        size = self.grid.spec.chip_size
        cache = self.cache
        source = None if cache is not None else self._open_source(in_worker)
        facts: SourceFacts | BatchSource = source if source is not None else self._facts
        _, bands, ny, nx = facts.shape
        xp = source.xp if source is not None else np
        has_quality = source.has_quality if source is not None else self._has_quality
        n = len(chips)
        ring = self._worker_ring(bands, facts.dtype) if in_worker and xp is np else None
        held = ring.claim_batch(n) if ring is not None else None  # None: fresh tensors
        if held is not None:
            into = held.views()
            pixels_t, valid_t = into["pixels"], into["valid"]
            pixels, valid = pixels_t.numpy(), valid_t.numpy()
        elif xp is np:
            pixels_t = _host_tensor((n, bands, size, size), torch_dtype(facts.dtype))
            valid_t = _host_tensor((n, size, size), torch.bool)
            pixels, valid = pixels_t.numpy(), valid_t.numpy()
        else:
            pixels = xp.empty((n, bands, size, size), dtype=facts.dtype)
            valid = xp.empty((n, size, size), dtype=bool)

        def fill(rows: np.ndarray, into: Any, into_valid: Any) -> None:
            read = source if source is not None else self._open_source(in_worker)
            at = windows[rows]
            classes = xp.empty((len(at), size, size), dtype=np.uint8) if has_quality else None
            read.read(at, into, classes)
            outside = (np.maximum(0, at[:, 1] + size - ny), np.maximum(0, at[:, 2] + size - nx))
            chip_validity(xp, into, classes, facts.nodata, into_valid, outside)

        try:
            if cache is not None:
                cache.read(picked, pixels, valid, fill)
            else:
                fill(np.arange(n), pixels, valid)
            index = torch.from_numpy(np.ascontiguousarray(chips))
            lonlat = torch.from_numpy(self._lonlat(picked, chips))
            target = self._target(picked, windows)
            if held is not None:
                into["index"].copy_(index)
                into["lonlat"].copy_(lonlat)
                index, lonlat = into["index"], into["lonlat"]
                if target is not None:
                    target = into["target"].copy_(target)
        except BaseException:
            if held is not None:
                held.unclaim()
            raise
        if xp is not np:
            pixels_t = torch.utils.dlpack.from_dlpack(pixels)
            valid_t = torch.utils.dlpack.from_dlpack(valid)
        batch = TrainingBatch(
            pixels=pixels_t,
            valid=valid_t,
            index=index,
            lonlat=lonlat,
            time=self.times[chips[:, 0]],
            target=target,
        )
        batch._slot = held
        return batch

    def _worker_ring(self, bands: int, dtype: np.dtype[Any]) -> BatchRing | None:
        """This DataLoader worker's ring (made on its first batch; None where no two
        batches fit in shared memory)."""
        if self._ring_pid == os.getpid():
            return self._ring
        import torch

        from xclay.devices import torch_dtype

        b, size = self.config.batch_size, self.grid.spec.chip_size
        fields: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
            "pixels": (torch_dtype(dtype), (b, bands, size, size)),
            "valid": (torch.bool, (b, size, size)),
            "index": (torch.int64, (b, 3)),
            "lonlat": (torch.float64, (b, 2)),
        }
        targets = self.targets
        if targets.kind != "none":
            kind = torch.float32 if targets.regression else torch.int64
            fields["target"] = (kind, (b,) if targets.kind == "chip" else (b, size, size))
        self._ring, self._ring_pid = BatchRing.fitting(fields), os.getpid()
        return self._ring

    def _target(self, picked: np.ndarray, windows: np.ndarray) -> torch.Tensor | None:
        import torch

        targets = self.targets
        if targets.kind == "none":
            return None
        if targets.kind == "chip":
            assert targets.chip is not None
            values = targets.chip[picked]
            if targets.regression:
                return torch.from_numpy(values.astype(np.float32))
            return torch.from_numpy(values.astype(np.int64))
        assert targets.raster is not None
        from xclay.batch.readers import WindowSource

        size = self.grid.spec.chip_size
        raster = targets.raster
        out = np.empty((len(windows), 1, size, size), dtype=raster.dtype)
        at_zero = windows.copy()
        at_zero[:, 0] = 0  # one label raster for every time step
        WindowSource(raster).read(at_zero, out, None)
        if targets.regression:
            return torch.from_numpy(out[:, 0].astype(np.float32))
        return torch.from_numpy(out[:, 0].astype(np.int64))

    # -- which chips ---------------------------------------------------------------

    def _candidates(
        self, labels: Any, column: str | None, rule: JoinRule, min_cover: float, per_pixel: bool
    ) -> tuple[np.ndarray, _Targets]:
        """``[n, 3]`` (time step, chip row, chip col) of the chips to sample from, and their
        targets."""
        steps = len(self.times)
        if labels is None:
            t, i, j = np.meshgrid(
                np.arange(steps),
                np.arange(self.grid.rows),
                np.arange(self.grid.cols),
                indexing="ij",
            )
            chips = np.stack([t.ravel(), i.ravel(), j.ravel()], axis=1).astype(np.int64)
            return chips, _Targets("none")
        if per_pixel:
            return self._pixel_candidates(labels)
        from xclay.apply.labels import ChipLabels, join_labels

        joined: ChipLabels
        if isinstance(labels, ChipLabels):
            joined = labels
            step = self.grid.spec.step
            if joined.chip_size != self.grid.spec.chip_size or (
                len(joined) and not np.array_equal(joined.row_off, joined.row * step)
            ):
                raise LabelError(
                    "these labels were joined to another chip grid; join them to this one "
                    "(join_labels(dataset.grid, ...)) or pass the labels themselves."
                )
        else:
            joined = join_labels(
                self.grid,
                labels,
                column=column,
                rule=rule,
                min_cover=min_cover,
            )
        per_step = np.stack([joined.row, joined.col], axis=1)
        chips = np.concatenate(
            [np.column_stack([np.full(len(joined), t), per_step]) for t in range(steps)]
        ).astype(np.int64)
        values = np.tile(joined.target, steps)
        regression = joined.classes is None
        return chips, _Targets(
            "chip",
            chip=values,
            classes=joined.classes,
            regression=regression,
            balance=None if regression else values.astype(np.int64),
        )

    def _pixel_candidates(self, labels: Any) -> tuple[np.ndarray, _Targets]:
        from xclay.apply.labels import ChipWindows, _raster_on_grid, read_labels

        raster = read_labels(labels)
        if not isinstance(raster, xr.DataArray):
            raise LabelError("per_pixel=True needs a label raster (a DataArray or a GeoTIFF).")
        band = raster.squeeze(drop=True)
        if band.ndim != 2:
            raise LabelError(f"a label raster must have one band; this one has dims {raster.dims}.")
        regression = np.dtype(band.dtype).kind == "f"
        grid = self.grid
        ny, nx = grid.source.shape
        whole = ChipWindows(
            grid.source.affine,
            grid.crs,
            (int(ny), int(nx)),
            1,
            np.zeros(1, np.int64),
            np.zeros(1, np.int64),
        )
        part, (r0, c0) = _raster_on_grid(whole, band, regression)
        on_grid = np.full((int(ny), int(nx)), np.nan)
        on_grid[r0 : r0 + part.shape[0], c0 : c0 + part.shape[1]] = part
        classes: tuple[str, ...] | None = None
        if regression:
            values: np.ndarray = on_grid.astype(np.float32)
        else:
            found = np.unique(on_grid[np.isfinite(on_grid)])
            classes = tuple(str(int(v)) if float(v).is_integer() else str(v) for v in found)
            values = np.full(on_grid.shape, IGNORE_INDEX, dtype=np.int16)
            ok = np.isfinite(on_grid)
            values[ok] = np.searchsorted(found, on_grid[ok]).astype(np.int16)
        nodata = np.nan if regression else IGNORE_INDEX
        da = xr.DataArray(
            values[None, None], dims=("time", "band", "y", "x"), attrs={"nodata": nodata}
        )
        # Chips with any labelled pixel, each step; balanced by each chip's commonest class.
        size, step = grid.spec.chip_size, grid.spec.step
        labelled = np.isfinite(on_grid)
        rows, cols, common = [], [], []
        for i in range(grid.rows):
            for j in range(grid.cols):
                window = labelled[i * step : i * step + size, j * step : j * step + size]
                if window.any():
                    rows.append(i)
                    cols.append(j)
                    if not regression:
                        codes = values[i * step : i * step + size, j * step : j * step + size]
                        common.append(int(np.bincount(codes[codes >= 0]).argmax()))
        if not rows:
            raise LabelError("the label raster does not reach any chip of the datacube.")
        steps = len(self.times)
        per_step = np.stack([rows, cols], axis=1)
        chips = np.concatenate(
            [np.column_stack([np.full(len(rows), t), per_step]) for t in range(steps)]
        ).astype(np.int64)
        balance = None if regression else np.tile(np.asarray(common, dtype=np.int64), steps)
        return chips, _Targets(
            "pixel", raster=da, classes=classes, regression=regression, balance=balance
        )

    def _passing(self, chips: np.ndarray) -> np.ndarray:
        """``[n]`` bool: the chips that pass the quality filter, from one read of them
        (the fill loop that embedding runs, every chip let through to be measured)."""
        quality_filter = QualityFilter.of(self.config.quality)
        steps = len(self.times)
        wanted = np.zeros((steps, self.grid.rows, self.grid.cols), dtype=bool)
        wanted[chips[:, 0], chips[:, 1], chips[:, 2]] = True
        source = self._open_source(in_worker=False)
        if quality_filter.uses_classes and not source.has_quality:
            raise ConfigError(
                "quality thresholds on cloud, cloud shadow, haze, snow or clear need a datacube "
                "with a 'quality' variable of pixel classes; this one has none."
            )
        plan = BatchPlan(
            self.grid,
            Block.whole(steps, self.grid),
            batch_size=64,
            quality=QualityFilter(max_nodata=1.0),
            chips=wanted,
        )
        quality = ChipQuality.empty(wanted.shape, with_classes=source.has_quality)
        for _ in iter_batches(source, plan, quality, prefetch=0):
            pass
        t, i, j = chips[:, 0], chips[:, 1], chips[:, 2]
        fractions = quality.class_fraction[t, i, j] if quality.class_fraction is not None else None
        reasons = quality_filter.reasons_of(quality.nodata_fraction[t, i, j], fractions)
        self.nodata_fraction = quality.nodata_fraction[t, i, j]
        passing: np.ndarray = reasons < 0
        return passing

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_source"], state["_source_pid"] = None, -1  # each process opens its own
        state["_ring"], state["_ring_pid"] = None, -1  # each worker makes its own
        return state
