"""The embedding loop: datacube -> chip grid -> batches -> encoder -> embeddings Dataset."""

from __future__ import annotations

import logging
import os
import time as timer
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np
import xarray as xr
from odc.geo.xr import xr_coords

from xclay._json import jsonable
from xclay._progress import progress_bar
from xclay._version import __version__
from xclay.batching import (
    ArrayWindowReader,
    BatchPlan,
    Block,
    HostBatch,
    iter_batches,
    make_sampler,
    to_chip_batch,
)
from xclay.chips import ChipGrid, ChipGridSpec, Edges
from xclay.chunk_batches import DeviceBatch, chunk_batch_source, iter_chunk_batches
from xclay.datacube import (
    as_datacube,
    check_chip_alignment,
    datacube_geobox,
    nodata_value,
    validate_datacube,
)
from xclay.devices import Precision, resolve_device, resolve_dtype
from xclay.errors import DatacubeError, ModelError
from xclay.export import EmbeddingsLayout, VariableSpec
from xclay.masks import PixelClass
from xclay.protocols import Encoder, InputSpec, ReconstructionScorer, Sampler
from xclay.quality import ChipQuality, QualityFilter
from xclay.thumbnails import DEFAULT_SIZE as DEFAULT_THUMBNAIL_SIZE
from xclay.thumbnails import ThumbnailStretch, make_thumbnails, rgb_bands, thumbnail_size

__all__ = ["EMBEDDINGS_CONVENTION", "EmbedConfig", "embed"]

log = logging.getLogger(__name__)

EMBEDDINGS_CONVENTION = "xclay-embeddings/1"
THUMBNAIL_SAMPLE_CHIPS = 64  # chips the thumbnails' colour stretch is fitted on


@dataclass(frozen=True)
class EmbedConfig:
    """Settings of an embedding run (stored in every output).

    Attributes
    ----------
    grid
        Chip size, stride and edge policy.
    batch_size
        Chips per encoder call.
    quality
        Which chips to embed, by their nodata and pixel-class fractions.
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"``.
    precision
        ``"fp32"``, ``"bf16"`` or ``"auto"`` (the model's preference where the
        device runs it fast).
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
    device: str = "cpu"
    precision: Precision = "auto"
    prefetch: int = 2
    thumbnails: int = 0
    thumbnail_stretch: ThumbnailStretch | None = None
    loss: bool = False
    loss_seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise DatacubeError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.prefetch < 0:
            raise DatacubeError(f"prefetch must be >= 0, got {self.prefetch}.")
        if isinstance(self.thumbnails, bool) or not isinstance(self.thumbnails, int):
            raise DatacubeError(
                f"thumbnails must be an edge in pixels (0: none), got {self.thumbnails!r}."
            )
        if self.thumbnails < 0:
            raise DatacubeError(f"thumbnails must be >= 0 px, got {self.thumbnails}.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise DatacubeError(
                f"precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}."
            )

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


def embed(
    cube: xr.Dataset | xr.DataArray,
    *,
    model: str | Encoder = "rcf",
    checkpoint: str | os.PathLike[str] | None = None,
    chip_size: int = 256,
    stride: int | None = None,
    edges: Edges = "drop",
    batch_size: int | Literal["auto"] = 16,
    quality: QualityFilter | Mapping[str, float] | None = None,
    device: str = "cpu",
    precision: Precision = "auto",
    prefetch: int = 2,
    thumbnails: bool | int = False,
    loss: bool = False,
    progress: bool | None = None,
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
    chip_size, stride, edges
        The chip grid (pixels; ``stride=None`` means no overlap; ``edges``
        ``"drop"`` or ``"pad"``).
    batch_size
        Chips per encoder call; ``"auto"``: what fills the device (the
        encoder's hint from free GPU memory or CPU work, else 16).
    quality
        Which chips to embed: a :class:`~xclay.quality.QualityFilter` or a
        mapping of its thresholds, e.g. ``{"max_nodata": 0.2, "max_cloud":
        0.1, "min_clear": 0.8}`` (fractions 0..1; default: at most half nodata).
        Class thresholds need a cube with quality classes.
    device, precision
        Where and in which precision the encoder runs.
    prefetch
        Batches read ahead while the encoder runs (0: no background reading).
    thumbnails
        Store a true-colour preview of every embedded chip: ``True`` (64 px)
        or an edge in pixels (at most the chip size); see :mod:`xclay.thumbnails`.
    loss
        Also score every embedded chip with the model's masked-reconstruction
        loss (``clay-v1.5``: loads the decoder from the same checkpoint; for
        the large model it costs about a quarter of an embedding pass).
    progress
        Show a progress bar (``None``: only on an interactive terminal).

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
    encoder = _resolve_encoder(model, checkpoint)
    if batch_size == "auto":
        batch_size = _auto_batch_size(encoder, cube, chip_size, device)
    config = EmbedConfig(
        grid=ChipGridSpec(chip_size=chip_size, stride=stride, edges=edges),
        batch_size=batch_size,
        quality=QualityFilter.of(quality),
        device=device,
        precision=precision,
        prefetch=prefetch,
        thumbnails=thumbnail_edge(thumbnails),
        loss=loss,
    )
    return embed_with_config(cube, encoder, config, progress=progress)


def thumbnail_edge(value: bool | int) -> int:
    """``thumbnails=`` as an edge in pixels: True -> 64, False -> 0 (none)."""
    if value is True:
        return DEFAULT_THUMBNAIL_SIZE
    if value is False or value is None:
        return 0
    return int(value)


def embed_with_config(
    cube: xr.Dataset | xr.DataArray,
    encoder: Encoder,
    config: EmbedConfig,
    *,
    progress: bool | None = None,
) -> xr.Dataset:
    """:func:`embed` with its settings grouped in an :class:`EmbedConfig`."""
    session = EmbedSession(cube, encoder, config)
    return session.dataset(session.embed_block(progress=progress))


@dataclass
class BlockResult:
    """The embeddings and quality of a block of chips."""

    block: Block
    vectors: np.ndarray  # [time, rows, cols, *vector_shape] float32, NaN where not embedded
    quality: ChipQuality
    embedded: np.ndarray  # [time, rows, cols] bool
    counts: dict[str, int]
    seconds: float
    thumbnails: np.ndarray | None = None  # [time, rows, cols, size, size, 4] uint8
    loss: np.ndarray | None = None  # [time, rows, cols] float32, NaN where not scored


class EmbedSession:
    """An encoder prepared for one datacube: embeds the whole chip grid or any block of it.

    Preparing (normalisation, rcf filters, Clay's wave kernel) happens once,
    here; distributed runs rebuild the prepared encoder on every worker from
    its model card and embed their own blocks.
    """

    def __init__(
        self, cube: xr.Dataset | xr.DataArray, encoder: Encoder, config: EmbedConfig
    ) -> None:
        self.cube = _as_cube(cube)
        self.config = config
        self.encoder = encoder
        self.grid = ChipGrid.from_geobox(datacube_geobox(self.cube), config.grid)
        check_chip_alignment(self.cube, self.grid.spec.chip_size, self.grid.spec.step)
        self.reader = ArrayWindowReader.of(self.cube)
        self.device = resolve_device(config.device)
        # engine="kvikio" on a GPU: batches of chip chunks read and decoded in GPU memory.
        self.chunks = chunk_batch_source(self.cube, self.grid.spec.chip_size, self.device)
        if config.quality.uses_classes and not self.reader.has_quality:
            raise DatacubeError(
                "quality thresholds on cloud, cloud shadow, haze, snow or clear need a datacube "
                "with a 'quality' variable of pixel classes; this one has none. Ingest with a "
                "mask (xclay.ingest.from_stac(mask='auto')) or use only max_nodata."
            )
        dtype = resolve_dtype(config.precision, self.device, encoder.preferred_precision)
        self.times = np.asarray(self.cube["time"].values, dtype="datetime64[ns]")
        lon, lat = self.grid.centres_lonlat()
        self.lonlat = np.stack([lon, lat], axis=-1)
        self.chip_ids = self.grid.chip_ids()
        spec = InputSpec(
            platform=self.cube.attrs.get("platform") or None,
            bands=tuple(str(b) for b in self.cube["band"].values),
            wavelengths=tuple(float(w) for w in self.cube["wavelength"].values),
            gsd=float(self.cube.attrs["gsd"]),
            nodata=self.reader.nodata,
            dtype=str(self.reader.dtype),
            chip_size=self.grid.spec.chip_size,
        )
        sampler = make_sampler(self.reader, self.grid, self.lonlat, self.times)
        self._thumbnail_bands: list[int] = []
        if config.thumbnails:
            self.config = config = self._with_thumbnail_stretch(config, spec, sampler)
        if config.loss:
            if not isinstance(encoder, ReconstructionScorer):
                raise ModelError(
                    f"model {encoder.card.name!r} has no decoder to compute a reconstruction "
                    "loss; loss=True needs model='clay-v1.5'."
                )
            encoder.enable_loss(config.loss_seed)
        encoder.prepare(spec, sampler, device=self.device, dtype=dtype)
        self.card = encoder.card

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

    def embed_block(
        self, block: Block | None = None, *, progress: bool | None = None
    ) -> BlockResult:
        """Embed the chips of ``block`` (default: all)."""
        block = block or self.whole
        card, config = self.card, self.config
        plan = BatchPlan(
            grid=self.grid,
            block=block,
            batch_size=config.batch_size,
            quality=config.quality,
        )
        shape = block.shape
        vectors = np.full((*shape, *card.vector_shape), np.nan, dtype=np.float32)
        edge = self.thumbnail_size
        thumbs = np.zeros((*shape, edge, edge, 4), dtype=np.uint8) if edge else None
        losses = np.full(shape, np.nan, dtype=np.float32) if config.loss else None
        quality = ChipQuality.empty(shape, with_classes=self.reader.has_quality)
        t0, r0, c0 = block.times[0], block.rows[0], block.cols[0]
        start = timer.perf_counter()
        with progress_bar(plan.total_chips, progress, desc="embed", unit="chip") as bar:
            for host in self._batches(plan, quality):
                if len(host):
                    batch = to_chip_batch(host, self.lonlat, self.times, self.device, self.chip_ids)
                    out = self.encoder.encode(batch)
                    if tuple(out.shape) != (len(host), *card.vector_shape):
                        raise ModelError(
                            f"encoder {card.name!r} returned shape {tuple(out.shape)} for "
                            f"{len(host)} chips; expected {(len(host), *card.vector_shape)}."
                        )
                    t, i, j = host.index.T
                    vectors[t - t0, i - r0, j - c0] = out.float().cpu().numpy()
                    if losses is not None and isinstance(self.encoder, ReconstructionScorer):
                        scores = self.encoder.loss(batch)
                        losses[t - t0, i - r0, j - c0] = scores.float().cpu().numpy()
                    if thumbs is not None and config.thumbnail_stretch is not None:
                        thumbs[t - t0, i - r0, j - c0] = make_thumbnails(
                            batch.pixels,
                            batch.valid,
                            self._thumbnail_bands,
                            config.thumbnail_stretch,
                            edge,
                        )
                bar.update(host.scanned)
        seconds = timer.perf_counter() - start
        embedded = np.asarray(np.isfinite(vectors).all(axis=tuple(range(3, vectors.ndim))))
        passed = np.isfinite(quality.nodata_fraction) & (config.quality.reasons(quality) < 0)
        counts = {
            "chips_total": int(np.prod(shape)),
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
        return BlockResult(block, vectors, quality, embedded, counts, seconds, thumbs, losses)

    def _batches(self, plan: BatchPlan, quality: ChipQuality) -> Iterator[HostBatch | DeviceBatch]:
        if self.chunks is not None:
            return iter_chunk_batches(self.chunks, plan, quality, prefetch=self.config.prefetch)
        return iter_batches(
            self.reader,
            plan,
            quality,
            prefetch=self.config.prefetch,
            pin_memory=self.device.type == "cuda",
        )

    def dataset(self, result: BlockResult) -> xr.Dataset:
        """The embeddings Dataset of a block (the whole grid's coords, cut to the block)."""
        return _embeddings_dataset(self, result)

    def layout(self) -> EmbeddingsLayout:
        """The whole grid's embeddings, without data: coords, attributes, and each variable's
        dims, dtype and attributes (for :func:`xclay.export.create_embeddings_store`)."""
        empty = BlockResult(
            block=Block((0, 0), (0, 0), (0, 0)),
            vectors=np.zeros((0, 0, 0, *self.card.vector_shape), dtype=np.float32),
            quality=ChipQuality.empty((0, 0, 0), with_classes=self.reader.has_quality),
            embedded=np.zeros((0, 0, 0), dtype=bool),
            counts={},
            seconds=0.0,
            thumbnails=np.zeros((0, 0, 0, self.thumbnail_size, self.thumbnail_size, 4), np.uint8)
            if self.thumbnail_size
            else None,
            loss=np.zeros((0, 0, 0), np.float32) if self.config.loss else None,
        )
        variables = {
            name: VariableSpec(
                dims=tuple(dims),
                dtype=str(np.asarray(values).dtype),
                attrs=dict(attrs),
                chip_shape=tuple(int(n) for n in np.shape(values)[3:]),
            )
            for name, (dims, values, attrs) in _data_vars(
                empty, self.card.name, self.config.thumbnail_stretch
            ).items()
        }
        coords = xr.Dataset(
            coords=_embeddings_coords(self, self.whole), attrs=_embeddings_attrs(self, {})
        )
        return EmbeddingsLayout(coords=coords, variables=variables)


def _class_fractions(quality: ChipQuality, dims: tuple[str, ...]) -> dict[str, Any]:
    """``<class>_fraction`` variables (cloud, cloud_shadow, haze, snow, clear); NaN when unknown."""
    out = {}
    for cls in (
        PixelClass.CLOUD,
        PixelClass.CLOUD_SHADOW,
        PixelClass.HAZE,
        PixelClass.SNOW,
        PixelClass.CLEAR,
    ):
        name = cls.name.lower()
        values = quality.fraction(cls)
        out[f"{name}_fraction"] = (
            dims,
            values,
            {
                "long_name": f"fraction of chip pixels of quality class {name} "
                "(NaN: the cube has no quality classes)",
                "units": "1",
            },
        )
    return out


def _auto_batch_size(
    encoder: Encoder, cube: xr.Dataset | xr.DataArray, chip_size: int, device: str
) -> int:
    hint = getattr(encoder, "batch_size_hint", None)
    if hint is None:
        return 16
    bands = cube.sizes["band"]
    size = int(hint(resolve_device(device), chip_size, bands))
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


def _embeddings_dataset(session: EmbedSession, result: BlockResult) -> xr.Dataset:
    ds = xr.Dataset(
        _data_vars(result, session.card.name, session.config.thumbnail_stretch),
        coords=_embeddings_coords(session, result.block),
        attrs=_embeddings_attrs(session, result.counts),
    )
    return ds


_DIMS3 = ("time", "chip_y", "chip_x")
_VAR_ATTRS: dict[str, dict[str, Any]] = {
    "nodata_fraction": {"long_name": "fraction of chip pixels without data", "units": "1"},
    "embedded": {"long_name": "chip was embedded (passed the filters, vector valid)"},
    "loss": {
        "long_name": "masked-reconstruction loss of the chip: mean L1 error over its 75 % "
        "masked patches, normalised units (model attrs: params.loss)",
        "units": "1",
    },
}


def _data_vars(
    result: BlockResult, model_name: str, stretch: ThumbnailStretch | None
) -> dict[str, Any]:
    vectors = result.vectors
    patch_dims = ("patch_y", "patch_x") if vectors.ndim == 6 else ()
    extra: dict[str, Any] = {}
    if result.loss is not None:
        extra["loss"] = (_DIMS3, result.loss, _VAR_ATTRS["loss"])
    if result.thumbnails is not None and stretch is not None:
        extra["thumbnail"] = (
            (*_DIMS3, "thumb_y", "thumb_x", "rgba"),
            result.thumbnails,
            {
                "long_name": "true-colour preview of the chip (RGBA; alpha: valid fraction)",
                "bands": list(stretch.bands),
                "stretch_low": list(stretch.low),
                "stretch_high": list(stretch.high),
            },
        )
    return {
        "embedding": (
            (*_DIMS3, *patch_dims, "feature"),
            vectors,
            {"grid_mapping": "spatial_ref", "long_name": f"{model_name} chip embedding"},
        ),
        "nodata_fraction": (_DIMS3, result.quality.nodata_fraction, _VAR_ATTRS["nodata_fraction"]),
        **_class_fractions(result.quality, _DIMS3),
        "embedded": (_DIMS3, result.embedded, _VAR_ATTRS["embedded"]),
        **extra,
    }


def _embeddings_coords(session: EmbedSession, block: Block) -> dict[str, Any]:
    grid, cube = session.grid, session.cube
    (t0, t1), (r0, r1), (c0, c1) = block.times, block.rows, block.cols
    centres = xr_coords(grid.geobox(), crs_coord_name="spatial_ref")
    coords: dict[str, Any] = {
        "time": session.times[t0:t1],
        "chip_y": (
            "chip_y",
            centres["y"].values[r0:r1],
            {"units": "metre", "long_name": "chip centre y (datacube CRS)"},
        ),
        "chip_x": (
            "chip_x",
            centres["x"].values[c0:c1],
            {"units": "metre", "long_name": "chip centre x (datacube CRS)"},
        ),
        "feature": np.arange(session.card.dim, dtype=np.int32),
        "spatial_ref": centres["spatial_ref"],
        "chip_id": (("chip_y", "chip_x"), grid.chip_ids()[r0:r1, c0:c1]),
        "lat": (
            ("chip_y", "chip_x"),
            session.lonlat[r0:r1, c0:c1, 1],
            {"units": "degrees_north", "long_name": "chip centre latitude (WGS84)"},
        ),
        "lon": (
            ("chip_y", "chip_x"),
            session.lonlat[r0:r1, c0:c1, 0],
            {"units": "degrees_east", "long_name": "chip centre longitude (WGS84)"},
        ),
        "row_off": (
            "chip_y",
            grid.row_offsets[r0:r1],
            {"long_name": "top pixel row of the chip window in the datacube"},
        ),
        "col_off": (
            "chip_x",
            grid.col_offsets[c0:c1],
            {"long_name": "left pixel column of the chip window in the datacube"},
        ),
    }
    for extra in ("time_start", "time_end"):
        if extra in cube.coords:
            coords[extra] = ("time", cube[extra].values[t0:t1])
    return coords


def _embeddings_attrs(session: EmbedSession, counts: dict[str, int]) -> dict[str, Any]:
    cube, grid = session.cube, session.grid
    t = grid.source.affine
    return {
        "convention": EMBEDDINGS_CONVENTION,
        "model": session.card.to_dict(),
        "config": session.config.to_dict(),
        "datacube": {
            "platform": cube.attrs.get("platform", ""),
            "gsd": float(cube.attrs["gsd"]),
            "bands": [str(b) for b in cube["band"].values],
            "wavelengths": [float(w) for w in cube["wavelength"].values],
            "crs_wkt": grid.crs.to_wkt(),
            "geotransform": [t.c, t.a, t.b, t.f, t.d, t.e],
            "shape": [int(s) for s in grid.source.shape],
            "nodata": nodata_value(cube["pixels"]),
            "dtype": str(cube["pixels"].dtype),
            "provenance": cube.attrs.get("provenance", {}),
        },
        "run": counts,
        "xclay_version": __version__,
    }
