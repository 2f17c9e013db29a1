"""The embedding loop: datacube -> chip grid -> batches -> encoder -> embeddings Dataset."""

from __future__ import annotations

import logging
import os
import time as timer
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, TypedDict, Unpack

import numpy as np
import xarray as xr

from xclay._json import jsonable
from xclay._progress import progress_bar
from xclay.batch.batching import (
    Batch,
    BatchPlan,
    Block,
    BufferPool,
    batch_buffers,
    iter_batches,
    make_sampler,
    to_chip_batch,
)
from xclay.batch.chips import CHIP_SIZE, EDGES, STRIDE, ChipGrid, ChipGridSpec, Edges
from xclay.batch.engines import Engine, engine_names, open_batch_source
from xclay.datacube import (
    as_datacube,
    datacube_geobox,
    validate_datacube,
)
from xclay.devices import Precision, ThreadBudget, resolve_device, resolve_precision
from xclay.errors import ConfigError, DatacubeError, ModelError
from xclay.outputs.embeddings import (
    EMBEDDINGS_CONVENTION,
    BlockGeometry,
    BlockResult,
    EmbeddingsContext,
    chip_coordinates,
    data_variables,
    embeddings_attrs,
    embeddings_dataset,
    grid_coords,
)
from xclay.outputs.export import EmbeddingsLayout, VariableSpec
from xclay.outputs.thumbnails import DEFAULT_SIZE as DEFAULT_THUMBNAIL_SIZE
from xclay.outputs.thumbnails import ThumbnailStretch, make_thumbnails, rgb_bands, thumbnail_size
from xclay.protocols import (
    BatchSource,
    Encoder,
    InputSpec,
    ReconstructionScorer,
    Sampler,
    SizesItsBatches,
)
from xclay.quality import ChipQuality, QualityFilter
from xclay.settings import Setting, check_fields, declared

__all__ = [
    "EMBEDDINGS_CONVENTION",
    "EmbedConfig",
    "EmbedOptions",
    "EmbedSettings",
    "embed",
    "embed_config",
    "embed_with_config",
    "input_spec",
]

log = logging.getLogger(__name__)

THUMBNAIL_SAMPLE_CHIPS = 64  # chips the thumbnails' colour stretch is fitted on


def thumbnail_edge(value: bool | int) -> int:
    """``thumbnails=`` as an edge in pixels: True -> 64, False -> 0 (none).

    Parameters
    ----------
    value
        ``True``, ``False``/``None``, or an edge in pixels.
    """
    if value is True:
        return DEFAULT_THUMBNAIL_SIZE
    if value is False or value is None:
        return 0
    return value  # an edge in pixels (checked as an integer by its setting)


# The embedding's settings, declared once (xclay.settings): embed()'s keywords, a run
# spec's grid:/compute:/outputs: fields and the CLI's flags all read these (the chip
# grid's are in xclay.batch.chips, the quality filter's in xclay.quality).
BATCH_SIZE = Setting(
    "auto",
    "chips per encoder call; auto: sized by the model for the device (from free memory on a GPU)",
    positive=True,
    metavar="N",
)
DEVICE = Setting(
    "auto",
    "where the encoder runs: auto (a CUDA GPU when there is one), cpu, cuda or cuda:N",
    coerce=lambda v: _device(v),
)
ENGINE = Setting(
    "auto",
    "how chips are read: zarr (host), kvikio (into GPU memory, decoded there; needs a CUDA "
    "device), auto (kvikio on a GPU where kvikIO is installed), or an installed engine",
    choices=engine_names,
    see="gpu.md",
)
PRECISION = Setting(
    "auto",
    "auto (the model's fast precision on this device), fp32, bf16; on NVIDIA GPUs also tf32 "
    "and fp8, each checked against fp32 on sample chips",
    see="models.md#precision-and-speed",
)
PREFETCH = Setting(
    2, "batches read ahead while the encoder runs (0: none)", low=0, high=64, metavar="N"
)
THUMBNAILS = Setting(
    0,
    f"a true-colour preview per chip, this many pixels wide (true: {DEFAULT_THUMBNAIL_SIZE}; "
    "0: none)",
    unit="px",
    low=0,
    coerce=thumbnail_edge,
    metavar="PX",
    const=DEFAULT_THUMBNAIL_SIZE,
    see="schemas.md#thumbnails-thumbnailstrue-or-an-edge-in-px",
)
LOSS = Setting(
    False,
    "score each chip with the model's masked-reconstruction loss (loads the decoder)",
    see="models.md#reconstruction-loss-losstrue",
)


def _device(value: Any) -> Any:
    """A device as given, refused here when it is not one of the spellings xclay knows."""
    if isinstance(value, str) and (
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    ):
        return value
    raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")


@dataclass(frozen=True)
class EmbedOptions:
    """The settings of an embedding as users give them (:func:`embed`'s keywords), each
    declared once; :func:`embed_config` resolves them for a cube and an encoder into an
    :class:`EmbedConfig`.

    Parameters
    ----------
    chip_size, stride, edges
        The chip grid (:class:`~xclay.batch.chips.ChipGridSpec`).
    batch_size
        Chips per encoder call, or ``"auto"``.
    quality
        Which chips to embed (:class:`~xclay.quality.QualityFilter`).
    device, engine, precision, prefetch
        Where and how the encoder runs and the chips are read.
    thumbnails
        Edge in pixels of a preview per chip (``True``: 64; 0: none).
    loss
        Score each chip with the model's masked-reconstruction loss.
    """

    chip_size: int = declared(CHIP_SIZE)
    stride: int | None = declared(STRIDE)
    edges: Edges = declared(EDGES)
    batch_size: int | Literal["auto"] = declared(BATCH_SIZE)
    quality: QualityFilter = field(default_factory=QualityFilter)
    device: str = declared(DEVICE)
    engine: Engine = declared(ENGINE)
    precision: Precision = declared(PRECISION)
    prefetch: int = declared(PREFETCH)
    thumbnails: int = declared(THUMBNAILS)
    loss: bool = declared(LOSS)

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "quality", QualityFilter.of(self.quality))

    @classmethod
    def of(cls, settings: Mapping[str, Any], caller: str = "embed") -> EmbedOptions:
        """The options from keyword settings; an unknown one is a TypeError, as for any
        function, naming the close ones."""
        import difflib

        known = [f.name for f in fields(cls)]
        for name in settings:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise TypeError(
                    f"{caller}() got an unexpected keyword argument {name!r}{hint}; the "
                    f"settings are {', '.join(known)}."
                )
        return cls(**settings)


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of an embedding run (stored in every output).

    Attributes
    ----------
    grid
        Chip size, stride and edge policy.
    batch_size
        Chips per encoder call (chips that pass the quality filter; only a
        block's last call may have fewer).
    quality
        Which chips to embed, by their nodata and pixel-class fractions.
    device
        ``"auto"`` (CUDA when usable, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    engine
        How chips are read: ``"zarr"`` (on the host: straight from the chunk
        files where xclay can, else through xarray), ``"kvikio"`` (into GPU
        memory, decoded there; needs a CUDA device), or ``"auto"`` (kvikio when
        the encoder runs on a CUDA GPU and kvikIO is installed, else zarr).
    precision
        ``"auto"`` (the model's preference where the device runs it fast: bf16
        for Clay on CUDA and on CPUs with AMX/AVX512-BF16), ``"fp32"`` (strict),
        ``"bf16"``, or on NVIDIA GPUs ``"tf32"`` and ``"fp8"`` (compute
        capability 8.9+). A fast precision is checked against strict fp32 on
        sample chips when the encoder is prepared (:mod:`xclay.models.agreement`).
    prefetch
        Batches read ahead in a background thread (0: read in the loop).
    thumbnails
        Edge in pixels of a true-colour preview stored per chip (0: none).
    thumbnail_stretch
        The thumbnails' colour scale (None: fitted on sample chips when the
        run is prepared, then stored here).
    loss
        Score every chip with the model's masked-reconstruction loss (models
        with a decoder: Clay).
    loss_seed
        Seed of the loss's per-chip masking (see :mod:`xclay.models.clay_decoder`).
    """

    grid: ChipGridSpec = field(default_factory=ChipGridSpec)
    batch_size: int = 16
    quality: QualityFilter = field(default_factory=QualityFilter)
    device: str = declared(DEVICE)
    engine: Engine = declared(ENGINE)
    precision: Precision = declared(PRECISION)
    prefetch: int = declared(PREFETCH)
    thumbnails: int = declared(THUMBNAILS)
    thumbnail_stretch: ThumbnailStretch | None = None
    loss: bool = declared(LOSS)
    loss_seed: int = 0

    def __post_init__(self) -> None:
        check_fields(self)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise ConfigError(f"batch_size: must be an integer, got {self.batch_size!r}.")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be positive, got {self.batch_size}.")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = jsonable(asdict(self))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbedConfig:
        data = dict(data)
        data["grid"] = ChipGridSpec.from_dict(data.get("grid", {}))
        data["quality"] = QualityFilter.of(data.get("quality"))
        if data.get("thumbnail_stretch") is not None:
            data["thumbnail_stretch"] = ThumbnailStretch.from_dict(data["thumbnail_stretch"])
        return cls(**data)


class EmbedSettings(TypedDict, total=False):
    """The settings of an embedding, as keywords of :func:`embed` and :func:`embed_config`,
    for static typing: :class:`EmbedOptions` declares them (defaults, checks, docs), and a
    test holds these keys and types to its fields. :func:`embed` documents them."""

    chip_size: int
    stride: int | None
    edges: Edges
    batch_size: int | Literal["auto"]
    quality: QualityFilter | Mapping[str, float] | None
    device: str
    engine: Engine
    precision: Precision
    prefetch: int
    thumbnails: bool | int
    loss: bool


def embed(
    cube: xr.Dataset | xr.DataArray,
    *,
    model: str | Encoder = "rcf",
    checkpoint: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    **settings: Unpack[EmbedSettings],
) -> xr.Dataset:
    """Embed every chip of a datacube.

    Parameters
    ----------
    cube
        A datacube (:func:`xclay.as_datacube`, :func:`xclay.open_datacube`);
        lazily opened cubes are read one batch at a time.
    model
        A registry name (:func:`xclay.models.list_models`) or an encoder.
    checkpoint
        Weights for ``model`` (a path); see :func:`xclay.models.get_model`.
    progress
        Show a progress bar (``None``: only on an interactive terminal).
    **settings
        The embedding's settings (:class:`EmbedSettings`):

        ``chip_size``, ``stride``, ``edges``
            The chip grid (pixels, default 256; ``stride=None`` means no overlap;
            ``edges`` ``"drop"`` (default) or ``"pad"``).
        ``batch_size``
            Chips per encoder call; ``"auto"`` (default): what fills the device (the
            encoder's hint from free GPU memory or CPU work, else 16).
        ``quality``
            Which chips to embed: a :class:`~xclay.quality.QualityFilter` or a
            mapping of its thresholds, e.g. ``{"max_nodata": 0.2, "max_cloud":
            0.1, "min_clear": 0.8}`` (fractions 0..1; default: at most half nodata).
            Class thresholds need a cube with quality classes.
        ``device``, ``precision``
            Where and in which precision the encoder runs (``"auto"``: a CUDA GPU
            when there is one, else the CPU; the model's fast precision there).
        ``engine``
            How chips are read: ``"auto"`` (GPU reads with kvikIO when the encoder
            runs on a GPU and kvikIO is installed, else host reads), ``"zarr"`` or
            ``"kvikio"``; a slower path than asked for is a
            :class:`~xclay.errors.DataPathWarning`.
        ``prefetch``
            Batches read ahead while the encoder runs (default 2; 0: no background
            reading).
        ``thumbnails``
            Store a true-colour preview of every embedded chip: ``True`` (64 px)
            or an edge in pixels (at most the chip size); see
            :mod:`xclay.outputs.thumbnails`.
        ``loss``
            Also score every embedded chip with the model's masked-reconstruction
            loss (``clay-v1.5``: loads the decoder from the same checkpoint; for
            the large model it costs about a quarter of an embedding pass).

    Returns
    -------
    xarray.Dataset
        ``embedding(time, chip_y, chip_x, feature)`` float32 (with ``patch_y,
        patch_x`` before ``feature`` for models returning patch grids; NaN where a chip
        was not embedded), ``nodata_fraction`` and ``cloud_fraction``
        (time, chip_y, chip_x), ``embedded`` (bool); chip centres as
        ``chip_y``/``chip_x`` in the cube's CRS with a ``spatial_ref`` grid
        mapping, ``lat``/``lon`` centres, ``chip_id``, pixel offsets; the model
        card, the config and the datacube's description in ``attrs``.
    """
    EmbedOptions.of(settings, "embed")  # an unknown or wrong setting before the model loads
    encoder = _resolve_encoder(model, checkpoint)
    config = embed_config(cube, encoder, **settings)
    return embed_with_config(cube, encoder, config, progress=progress)


def embed_config(
    cube: xr.Dataset | xr.DataArray, encoder: Encoder, **settings: Unpack[EmbedSettings]
) -> EmbedConfig:
    """The :class:`EmbedConfig` of :func:`embed`'s settings for ``encoder`` on ``cube``.

    The one builder of the configuration (``embed`` and runs both use it):
    ``batch_size="auto"`` sized for the device, ``thumbnails`` as an edge in pixels,
    ``quality`` as a filter.

    Parameters
    ----------
    cube
        The datacube to be embedded (``batch_size="auto"`` reads its chip shape).
    encoder
        The encoder that will embed it.
    **settings
        :class:`EmbedSettings`, as :func:`embed` documents them.
    """
    options = EmbedOptions.of(settings, "embed_config")
    config = EmbedConfig(
        grid=ChipGridSpec(options.chip_size, options.stride, options.edges),
        quality=options.quality,
        device=options.device,
        engine=options.engine,
        precision=options.precision,
        prefetch=options.prefetch,
        thumbnails=options.thumbnails,
        loss=options.loss,
    )
    batch_size = options.batch_size
    if batch_size == "auto":
        batch_size = _auto_batch_size(encoder, cube, config.grid.chip_size, config.device)
    return replace(config, batch_size=batch_size)


def embed_with_config(
    cube: xr.Dataset | xr.DataArray,
    encoder: Encoder,
    config: EmbedConfig,
    *,
    progress: bool | None = None,
) -> xr.Dataset:
    """:func:`embed` with its settings grouped in an :class:`EmbedConfig` (from
    :func:`embed_config`, or stored in an embeddings' ``attrs["config"]``:
    ``EmbedConfig.from_dict``), and a prepared or new ``encoder``.

    Parameters
    ----------
    cube
        A datacube, or its ``pixels``.
    encoder
        The encoder (e.g. :func:`xclay.models.get_model`).
    config
        Every setting of the embedding.
    progress
        Show a progress bar (``None``: when interactive).

    Returns
    -------
    xarray.Dataset
        As :func:`embed` returns.
    """
    session = EmbedSession(cube, encoder, config)
    try:
        return session.dataset(session.embed_block(progress=progress))
    finally:
        session.close()


class EmbedSession:
    """An encoder prepared for one datacube: embeds the whole chip grid or any block of it.

    Preparing (normalisation, rcf filters, Clay's wave kernel), choosing the
    batch source (engine, device, threads) and enumerating nothing of the
    grid happen once, here; :meth:`embed_block` then costs what its block
    costs. Distributed runs rebuild the prepared encoder on every worker from
    its model card and embed their own blocks.

    Parameters
    ----------
    cube
        A datacube, or its ``pixels``; it is validated here.
    encoder
        The encoder (e.g. :func:`xclay.models.get_model`); it is prepared for
        ``cube`` in place.
    config
        Every setting of the embedding (:func:`embed_config`).
    """

    def __init__(
        self, cube: xr.Dataset | xr.DataArray, encoder: Encoder, config: EmbedConfig
    ) -> None:
        self.cube = _as_cube(cube)
        self.config = config
        self.encoder = encoder
        self.grid = ChipGrid.from_geobox(datacube_geobox(self.cube), config.grid)
        self.device = resolve_device(config.device)
        self.threads = ThreadBudget.for_device(self.device)
        self.sources = open_batch_source(
            self.cube,
            chip_size=self.grid.spec.chip_size,
            engine=config.engine,
            device=self.device,
            threads=self.threads,
            stride=self.grid.spec.step,
        )
        host = self.sources.host
        if config.quality.uses_classes and not host.has_quality:
            raise DatacubeError(
                "quality thresholds on cloud, cloud shadow, haze, snow or clear need a datacube "
                "with a 'quality' variable of pixel classes; this one has none. Ingest with a "
                "mask (xclay.ingest.from_stac(mask='auto')) or use only max_nodata."
            )
        precision = resolve_precision(config.precision, self.device, encoder.preferred_precision)
        self.precision = precision
        self.times = np.asarray(self.cube["time"].values, dtype="datetime64[ns]")
        spec = input_spec(self.cube, host, self.grid.spec.chip_size, config.batch_size)
        sampler = make_sampler(host, self.grid, self.times)
        self._thumbnail_bands: list[int] = []
        with self.threads.applied():
            if config.thumbnails:
                self.config = config = self._with_thumbnail_stretch(config, spec, sampler)
            if config.loss:
                if not isinstance(encoder, ReconstructionScorer):
                    raise ModelError(
                        f"model {encoder.card.name!r} has no decoder to compute a reconstruction "
                        "loss; loss=True needs model='clay-v1.5'."
                    )
                encoder.enable_loss(config.loss_seed)
            # What prepare returns is the encoder ready for this cube (None, from an older
            # plug-in: the encoder itself is).
            prepared = encoder.prepare(spec, sampler, device=self.device, precision=precision)
            self.encoder = prepared if prepared is not None else encoder
        self.card = self.encoder.card
        self._buffers: BufferPool | None = None

    def _with_thumbnail_stretch(
        self, config: EmbedConfig, spec: InputSpec, sampler: Sampler
    ) -> EmbedConfig:
        stretch = config.thumbnail_stretch
        if stretch is None:
            rgb = rgb_bands(spec.bands, spec.wavelengths, spec.platform)
            sample = sampler(THUMBNAIL_SAMPLE_CHIPS, 0)
            stretch = ThumbnailStretch.fit(
                sample.pixels.numpy(), sample.valid.numpy(), spec.bands, rgb
            )
        missing = [b for b in stretch.bands if b not in spec.bands]
        if missing:
            raise DatacubeError(
                f"the thumbnail bands {missing} are not bands of this cube {list(spec.bands)}."
            )
        self._thumbnail_bands = [spec.bands.index(b) for b in stretch.bands]
        return replace(config, thumbnail_stretch=stretch)

    @property
    def thumbnail_size(self) -> int:
        """Edge of the stored thumbnails (0: none)."""
        if not self.config.thumbnails:
            return 0
        return thumbnail_size(self.config.thumbnails, self.grid.spec.chip_size)

    @property
    def whole(self) -> Block:
        return Block.whole(len(self.times), self.grid)

    @property
    def data_path(self) -> dict[str, Any]:
        """How chips are read, for reports and outputs: engine, reader, threads, fallbacks."""
        return {
            "engine": self.sources.engine,
            "reader": self.sources.batches.name,
            "layout": self.sources.layout,
            "device": str(self.device),
            "threads": {"torch": self.threads.torch, "decode": self.threads.decode},
            "fallbacks": list(self.sources.fallbacks),
        }

    def close(self) -> None:
        """Stop the readers' threads and free the batch buffers (a session used after
        this reopens nothing)."""
        self.sources.close()
        self._buffers = None

    def embed_block(
        self,
        block: Block | None = None,
        *,
        chips: np.ndarray | None = None,
        progress: bool | None = None,
        on_chips: Callable[[int], None] | None = None,
    ) -> BlockResult:
        """Embed the chips of ``block`` (default: all); ``chips`` (block-shaped bool) limits
        them further (a zone's share of its grid): the others are neither read nor
        counted, and stay not embedded. ``on_chips(n)`` is called as each batch of ``n``
        chips is done (a run's progress)."""
        block = block or self.whole
        card, config = self.card, self.config
        plan = BatchPlan(
            grid=self.grid,
            block=block,
            batch_size=config.batch_size,
            quality=config.quality,
            chips=chips,
        )
        shape = block.shape
        geometry = BlockGeometry.of(self.grid, block)
        vectors = np.full((*shape, *card.vector_shape), np.nan, dtype=np.float32)
        edge = self.thumbnail_size
        thumbs = np.zeros((*shape, edge, edge, 4), dtype=np.uint8) if edge else None
        losses = np.full(shape, np.nan, dtype=np.float32) if config.loss else None
        quality = ChipQuality.empty(shape, with_classes=self.sources.batches.has_quality)
        t0, r0, c0 = block.times[0], block.rows[0], block.cols[0]
        start = timer.perf_counter()
        with (
            self.threads.applied(),
            progress_bar(plan.total_chips, progress, desc="embed", unit="chip") as bar,
        ):
            for batch in self._batches(plan, quality):
                if len(batch):
                    chip_batch = to_chip_batch(
                        batch,
                        geometry.lonlat,
                        self.times,
                        self.device,
                        geometry.chip_ids,
                        origin=(r0, c0),
                    )
                    with self.precision.matmul_mode():
                        out = self.encoder.encode(chip_batch)
                    if tuple(out.shape) != (len(batch), *card.vector_shape):
                        raise ModelError(
                            f"encoder {card.name!r} returned shape {tuple(out.shape)} for "
                            f"{len(batch)} chips; expected {(len(batch), *card.vector_shape)}."
                        )
                    t, i, j = batch.index.T
                    vectors[t - t0, i - r0, j - c0] = out.float().cpu().numpy()
                    if losses is not None and isinstance(self.encoder, ReconstructionScorer):
                        with self.precision.matmul_mode():
                            scores = self.encoder.loss(chip_batch)
                        losses[t - t0, i - r0, j - c0] = scores.float().cpu().numpy()
                    if thumbs is not None and config.thumbnail_stretch is not None:
                        thumbs[t - t0, i - r0, j - c0] = make_thumbnails(
                            chip_batch.pixels,
                            chip_batch.valid,
                            self._thumbnail_bands,
                            config.thumbnail_stretch,
                            edge,
                        )
                bar.update(batch.scanned)
                if on_chips is not None:
                    on_chips(batch.scanned)
        seconds = timer.perf_counter() - start
        embedded = np.asarray(np.isfinite(vectors).all(axis=tuple(range(3, vectors.ndim))))
        passed = np.isfinite(quality.nodata_fraction) & (config.quality.reasons(quality) < 0)
        counts = {
            "chips_total": plan.total_chips,
            "chips_embedded": int(embedded.sum()),
            **config.quality.skip_counts(quality),
            "chips_failed": int((passed & ~embedded).sum()),
        }
        log.info(
            "embedded %d of %d chips in %.1f s (%.1f chips/s)",
            counts["chips_embedded"],
            counts["chips_total"],
            seconds,
            counts["chips_embedded"] / max(seconds, 1e-9),
        )
        if thumbs is not None:
            thumbs[~embedded] = 0  # chips without a vector get no preview
        if losses is not None:
            losses[~embedded] = np.nan
        return BlockResult(block, vectors, quality, embedded, counts, thumbs, losses, geometry)

    def _batches(self, plan: BatchPlan, quality: ChipQuality) -> Iterator[Batch]:
        on_gpu = self.device.type == "cuda"
        source, prefetch = self.sources.batches, self.config.prefetch
        if self._buffers is None:  # made once: every block's loop reuses them
            self._buffers = batch_buffers(source, plan, prefetch, on_gpu, on_gpu)
        return iter_batches(
            source,
            plan,
            quality,
            prefetch=prefetch,
            pin_memory=on_gpu,
            cuda_events=on_gpu,
            buffers=self._buffers,
        )

    @property
    def context(self) -> EmbeddingsContext:
        """What the embeddings Datasets of every block of this session share."""
        return EmbeddingsContext(
            cube=self.cube,
            grid=self.grid,
            times=self.times,
            card=self.card,
            config=self.config.to_dict(),
            stretch=self.config.thumbnail_stretch,
            data_path=self.data_path,
        )

    def dataset(self, result: BlockResult) -> xr.Dataset:
        """The embeddings Dataset of a block (its own coords, computed for the block)."""
        return embeddings_dataset(self.context, result)

    def dataset_attrs(self) -> dict[str, Any]:
        """The attributes every embeddings Dataset of this session carries (model card,
        config, datacube, data path), without a block's counts."""
        return embeddings_attrs(self.context, {})

    def layout(self) -> EmbeddingsLayout:
        """The whole grid's embeddings, without data: the grid's 1-D coords and the
        attributes, and each variable's dims, dtype and attributes (per-chip coordinates
        such as ``lat``/``lon``/``chip_id`` included, which regions write as they go), for
        :func:`xclay.outputs.export.create_embeddings_store`. Costs the grid's rows plus columns,
        not its chips."""
        empty_block = Block((0, 0), (0, 0), (0, 0))
        empty = BlockResult(
            block=empty_block,
            vectors=np.zeros((0, 0, 0, *self.card.vector_shape), dtype=np.float32),
            quality=ChipQuality.empty((0, 0, 0), with_classes=self.sources.host.has_quality),
            embedded=np.zeros((0, 0, 0), dtype=bool),
            counts={},
            thumbnails=np.zeros((0, 0, 0, self.thumbnail_size, self.thumbnail_size, 4), np.uint8)
            if self.thumbnail_size
            else None,
            loss=np.zeros((0, 0, 0), np.float32) if self.config.loss else None,
            geometry=BlockGeometry.of(self.grid, empty_block),
        )
        variables = {
            name: VariableSpec(
                dims=tuple(dims),
                dtype=str(np.asarray(values).dtype),
                attrs=dict(attrs),
                chip_shape=tuple(int(n) for n in np.shape(values)[3:]),
            )
            for name, (dims, values, attrs) in data_variables(
                empty, self.card.name, self.config.thumbnail_stretch, self.grid.crs
            ).items()
        }
        for name, (dims, values, attrs) in chip_coordinates(
            BlockGeometry.of(self.grid, empty_block)
        ).items():
            variables[name] = VariableSpec(
                dims=tuple(dims),
                dtype="str" if name == "chip_id" else str(np.asarray(values).dtype),
                attrs=dict(attrs),
                coordinate=True,
            )
        context = self.context
        coords = xr.Dataset(
            coords=grid_coords(context, self.whole), attrs=embeddings_attrs(context, {})
        )
        return EmbeddingsLayout(coords=coords, variables=variables)


def input_spec(
    cube: xr.Dataset, source: BatchSource, chip_size: int, batch_size: int = 0
) -> InputSpec:
    """What an encoder is told about ``cube`` when its chips are read through ``source``.

    Parameters
    ----------
    cube
        A validated datacube: its bands, wavelengths, ``gsd`` and ``platform``
        attributes are passed on.
    source
        The batch source that reads its chips: it gives the pixels' nodata value
        and dtype.
    chip_size
        Chip edge in pixels.
    batch_size
        Chips per ``encode`` call at most; default 0: not known.
    """
    return InputSpec(
        platform=cube.attrs.get("platform") or None,
        bands=tuple(str(b) for b in cube["band"].values),
        wavelengths=tuple(float(w) for w in cube["wavelength"].values),
        gsd=float(cube.attrs["gsd"]),
        nodata=source.nodata,
        dtype=str(source.dtype),
        chip_size=chip_size,
        batch_size=batch_size,
    )


def _auto_batch_size(
    encoder: Encoder, cube: xr.Dataset | xr.DataArray, chip_size: int, device: str
) -> int:
    if not isinstance(encoder, SizesItsBatches):
        return 16
    bands = cube.sizes["band"]
    size = int(encoder.batch_size_hint(resolve_device(device), chip_size, bands))
    log.info("batch_size='auto': %d chips per batch", size)
    return size


def _resolve_encoder(model: str | Encoder, checkpoint: str | os.PathLike[str] | None) -> Encoder:
    from xclay.models.registry import get_model

    if isinstance(model, str):
        return get_model(model, checkpoint=checkpoint)
    if checkpoint is not None:
        raise ModelError("pass checkpoint= with a model name, not with an encoder instance.")
    if not isinstance(model, Encoder):
        raise ModelError(
            f"model must be a registry name or an encoder (prepare/encode/card), got "
            f"{type(model).__name__}."
        )
    return model


def _as_cube(obj: xr.Dataset | xr.DataArray) -> xr.Dataset:
    if isinstance(obj, xr.DataArray):
        return as_datacube(obj)
    validate_datacube(obj)
    return obj
