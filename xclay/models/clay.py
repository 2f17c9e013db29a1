"""Clay v1.5 behind xclay's Encoder interface: weights, inputs, precision, outputs.

- Weights: the official Lightning ``clay-v1.5.ckpt`` (its ``model.encoder.*``),
  a plain encoder state dict (``.pt``), or ``.safetensors``; loaded with
  ``weights_only=True`` only; the file's sha256 goes into the model card.
- Inputs: per band ``(value - mean) / std`` (sensor table, measured, or
  given), nodata pixels set to 0 after normalising (the band mean); ``time``
  from the chip's acquisition time (ISO week and hour; zeros when unknown);
  ``latlon`` from the chip centre, latitude first; ``gsd`` and ``waves`` from
  the cube (the sensor table's wavelengths for known platforms).
- Speed: inference mode; bf16 autocast (weights and LayerNorms stay fp32) on
  CUDA and on CPUs with fast bf16; fused attention; the wave-conditioned
  kernel and the position encoding are computed once per cube, not per batch;
  optional ``torch.compile``.
- Outputs: ``"cls"`` (the Clay convention), ``"mean"`` of the patch tokens, or
  ``"patches"`` (the ``(H/8) x (W/8)`` token grid).

Bands the model has never seen still work: the patch embedding generates its
kernel from each band's wavelength, so any set of bands with known central
wavelengths can be embedded. How meaningful the vectors are for a sensor far
from Clay's training data (Sentinel-2, Landsat, NAIP, LINZ, Sentinel-1, MODIS)
is an empirical question: check them on a downstream task.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from xclay.errors import CheckpointError, MissingDependencyError, ModelError
from xclay.model_card import ModelCard
from xclay.models.normalization import Normalization, resolve_normalization
from xclay.models.plugin import EncoderPlugin, keyword_names
from xclay.sensors import get_sensor
from xclay.storage import is_url
from xclay.storage.cache import cache_root, local_checkpoint

if TYPE_CHECKING:
    import torch

    from xclay.devices import ComputePrecision, Precision
    from xclay.models.clay_decoder import ClayDecoder
    from xclay.models.clay_encoder import ClayEncoder
    from xclay.protocols import ChipBatch, InputSpec, Sampler

__all__ = [
    "OFFICIAL_WEIGHTS_URL",
    "ClayPlugin",
    "ClayV15",
    "default_checkpoint_path",
    "latlon_encoding",
    "load_clay_state_dict",
    "time_encoding",
]

log = logging.getLogger(__name__)

OFFICIAL_WEIGHTS_URL = "https://huggingface.co/made-with-clay/Clay/blob/main/v1.5/clay-v1.5.ckpt"
CHECKPOINT_ENV = "XCLAY_CHECKPOINT"
Output = Literal["cls", "mean", "patches"]
_PREFIXES = {
    "encoder": ("model.encoder.", "encoder."),
    "decoder": ("model.decoder.", "decoder."),
}


# --------------------------------------------------------------------------- inputs


def time_encoding(times: np.ndarray) -> np.ndarray:
    """``[B] datetime64 -> [B, 4]`` float32 ``[sin w, cos w, sin h, cos h]``.

    ``w = ISO week * 2 pi / 52``, ``h = hour * 2 pi / 24`` (hour with its
    minutes and seconds as a fraction); a row of zeros where the time is
    unknown (NaT), which Clay reads as "unknown".

    Parameters
    ----------
    times
        ``[B]`` datetime64 times of the chips (UTC, as in xclay's cubes; any unit,
        converted to ns); NaT where unknown.

    Returns
    -------
    numpy.ndarray
        ``[B, 4]`` float32, one row per chip.
    """
    times = np.asarray(times, dtype="datetime64[ns]")
    out = np.zeros((times.shape[0], 4), dtype=np.float64)
    for i, t in enumerate(times):
        if np.isnat(t):
            continue
        when = dt.datetime.fromisoformat(str(t.astype("datetime64[us]")))
        week = when.isocalendar().week * 2 * np.pi / 52
        hour = (when.hour + when.minute / 60 + when.second / 3600) * 2 * np.pi / 24
        out[i] = (np.sin(week), np.cos(week), np.sin(hour), np.cos(hour))
    return out.astype(np.float32)


def latlon_encoding(lonlat: torch.Tensor) -> torch.Tensor:
    """``[B, 2]`` (lon, lat) degrees -> ``[B, 4]`` ``[sin lat, cos lat, sin lon, cos lon]``.

    Latitude first: published Clay embeddings were once made with the two swapped.

    Parameters
    ----------
    lonlat
        ``[B, 2]`` chip centres in degrees, longitude then latitude (as in
        ``ChipBatch.lonlat``); computed in float64.

    Returns
    -------
    torch.Tensor
        ``[B, 4]`` float32, on the device of ``lonlat``.
    """
    import torch

    rad = torch.deg2rad(lonlat.to(torch.float64))
    lon, lat = rad[:, 0], rad[:, 1]
    return torch.stack([lat.sin(), lat.cos(), lon.sin(), lon.cos()], dim=1).to(torch.float32)


# --------------------------------------------------------------------------- checkpoints


def default_checkpoint_path() -> Path:
    """Where xclay looks for the official weights when none are passed:
    ``$XCLAY_CACHE/clay-v1.5.ckpt``, else ``~/.cache/xclay/clay-v1.5.ckpt`` (or ``$XDG_CACHE_HOME``)."""
    return cache_root() / "clay-v1.5.ckpt"


def _locate_checkpoint() -> Path:
    env = os.environ.get(CHECKPOINT_ENV)
    if env and is_url(env):
        return local_checkpoint(env)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise CheckpointError(f"{CHECKPOINT_ENV}={env} does not point to a file.")
        return path
    cached = default_checkpoint_path()
    if cached.is_file():
        return cached
    raise CheckpointError(
        "no Clay v1.5 checkpoint was given and none was found. Download the official weights "
        f"(clay-v1.5.ckpt, 5.2 GB) from {OFFICIAL_WEIGHTS_URL} and pass checkpoint=PATH "
        f"(CLI: --checkpoint PATH), set {CHECKPOINT_ENV}=PATH, or save them as {cached}. "
        "model='rcf' needs no weights."
    )


def load_clay_state_dict(
    path: str | os.PathLike[str], *, part: Literal["encoder", "decoder"] = "encoder"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The encoder's (or decoder's) state dict, prefix stripped, and the checkpoint's
    hyper-parameters.

    Never unpickles arbitrary objects; torch files are memory-mapped where their
    format allows.

    Parameters
    ----------
    path
        A Lightning ``.ckpt`` (``state_dict`` with ``model.encoder.*`` and
        ``model.decoder.*``), a plain state dict (``.pt``; an encoder's keys may
        lack the prefix) or a ``.safetensors`` file (read by its suffix); a path or a
        URL (read from its cached copy).
    part
        Which state dict to return: ``"encoder"`` (default; keys under
        ``model.encoder.`` or ``encoder.``, else all keys as they are) or ``"decoder"``
        (keys under ``model.decoder.`` or ``decoder.``; a file without them is refused).

    Returns
    -------
    tuple of (dict of str to torch.Tensor, dict)
        The state dict with the prefix stripped, and the Lightning checkpoint's
        ``hyper_parameters`` (empty for other files).
    """
    import torch

    from xclay.models.checkpoints import read_torch_file

    file = local_checkpoint(path)
    if file.suffix == ".safetensors":
        raw: Any = _read_safetensors(file)
    else:
        raw = read_torch_file(file, model="Clay", mmap=True)
    hyper: dict[str, Any] = {}
    if isinstance(raw, Mapping) and "state_dict" in raw:
        hyper = dict(raw.get("hyper_parameters") or {})
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(
            f"{file} holds no state dict of tensors; expected the official clay-v1.5.ckpt, an "
            "encoder state dict saved with torch.save, or a .safetensors file."
        )
    for prefix in _PREFIXES[part]:
        if any(k.startswith(prefix) for k in raw):
            return {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}, hyper
    if part == "decoder":
        raise CheckpointError(
            f"{file.name} holds no Clay decoder (no model.decoder.* keys): the per-chip loss needs "
            f"the official checkpoint (clay-v1.5.ckpt, {OFFICIAL_WEIGHTS_URL}), or a state dict "
            "with the decoder under decoder.*. Embeddings alone do not need it."
        )
    return dict(raw), hyper


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"Clay checkpoint {file} does not exist (or is not a file).")
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise MissingDependencyError(
            "reading .safetensors needs the safetensors package: pip install safetensors"
        ) from err
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{file} is not a readable .safetensors file ({err}); it may be truncated or corrupt."
        ) from err


def detect_size(state: Mapping[str, torch.Tensor]) -> tuple[str, int]:
    """The Clay size name and patch size of an encoder state dict."""
    from xclay.models.clay_encoder import CLAY_SIZES

    needed = (
        "cls_token",
        "transformer.layers.0.0.to_qkv.weight",
        "transformer.layers.0.1.net.1.weight",
    )
    missing = [k for k in needed if k not in state]
    if missing:
        sample = ", ".join(sorted(state)[:5])
        raise CheckpointError(
            f"this is not a Clay encoder state dict: {missing} missing (its keys start: {sample})."
        )
    dim = int(state["cls_token"].shape[-1])
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.layers."))
    inner = int(state["transformer.layers.0.0.to_qkv.weight"].shape[0]) // 3
    hidden = int(state["transformer.layers.0.1.net.1.weight"].shape[0])
    fc = state.get("patch_embedding.weight_generator.fc_weight.weight")
    patch = round((int(fc.shape[0]) / dim) ** 0.5) if fc is not None else 8
    for s in CLAY_SIZES.values():
        if (s.dim, s.depth, s.heads * s.dim_head, s.dim * s.mlp_ratio) == (
            dim,
            depth,
            inner,
            hidden,
        ):
            return s.name, patch
    raise CheckpointError(
        f"the checkpoint's encoder (dim {dim}, depth {depth}, attention width {inner}, MLP width "
        f"{hidden}) is none of the Clay sizes {sorted(CLAY_SIZES)}."
    )


# --------------------------------------------------------------------------- the encoder


class ClayPlugin(EncoderPlugin):
    """Clay v1.5 in the model registry: loaded from its checkpoint (always: the official
    weights are found where :meth:`ClayV15.from_checkpoint` looks), rebuilt from its card,
    its options (``size``, ``output``, ``normalization``, ``compile``) checked here."""

    name = "clay-v1.5"
    description = (
        "Clay v1.5 foundation model encoder (ViT-L/8, wavelength-conditioned patch embedding); "
        "official weights: huggingface.co/made-with-clay/Clay, v1.5/clay-v1.5.ckpt."
    )
    dim = 1024
    patch_size = 8
    bands = "wavelengths"
    normalization = ("sensor", "measured", "given")
    needs_checkpoint = True

    def load(self, checkpoint: str | os.PathLike[str] | None, **options: Any) -> ClayV15:
        return ClayV15.from_checkpoint(checkpoint, **options)

    def rebuild(
        self, card: ModelCard, *, checkpoint: str | os.PathLike[str] | None = None
    ) -> ClayV15:
        return ClayV15.from_card(card, checkpoint=checkpoint)

    def check_checkpoint(self, checkpoint: str | os.PathLike[str] | None) -> None:
        ClayV15.check_checkpoint(checkpoint)

    def option_names(self, *, checkpoint: bool) -> list[str] | None:
        return keyword_names(ClayV15.from_checkpoint)

    def check_options(self, options: Mapping[str, Any], *, checkpoint: bool) -> None:
        from xclay.models.clay_encoder import CLAY_SIZES

        super().check_options(options, checkpoint=checkpoint)
        allowed = {"output": get_args(Output), "size": tuple(CLAY_SIZES)}
        for name, choices in allowed.items():
            value = options.get(name)
            if value is not None and value not in choices:
                raise ModelError(
                    f"model {self.name!r}: {name} must be one of {', '.join(choices)}, "
                    f"got {value!r}."
                )

    def vector_values(self, options: Mapping[str, Any], chip_size: int) -> int:
        """The size's width for ``cls`` and ``mean``, one vector per 8 px patch for
        ``patches``; without ``size`` (the checkpoint decides) the widest size's, an upper
        bound."""
        from xclay.models.clay_encoder import CLAY_SIZES, PATCH_SIZE

        size = options.get("size")
        widest = max(s.dim for s in CLAY_SIZES.values())
        dim = CLAY_SIZES[size].dim if size in CLAY_SIZES else widest
        if options.get("output", "cls") == "patches":
            return dim * (chip_size // PATCH_SIZE) ** 2
        return dim


class ClayV15:
    """Clay v1.5 as an xclay encoder.

    Build it with :meth:`from_checkpoint` (or ``xclay.models.get_model("clay-v1.5", ...)``).

    Parameters
    ----------
    model
        The loaded :class:`~xclay.models.clay_encoder.ClayEncoder`.
    size
        Its size name (``large`` for the official v1.5 weights).
    output
        ``"cls"``, ``"mean"`` or ``"patches"``.
    normalization
        ``"auto"`` (sensor table for known platforms, else measured on the cube),
        ``"sensor"``, ``"measured"``, or a mapping ``band -> (mean, std)``.
    compile
        Run the transformer through ``torch.compile``: ``None`` (default) on CUDA, not
        on CPUs; compiled graphs are cached across runs (:func:`compile_cache_dir`), and
        batches padded to one static size so one graph serves every batch.
    static_batch
        Pad every batch to the session's batch size (the padding is never returned), so
        one compiled graph (or CUDA graph) serves them all: ``None`` follows ``compile``.
    precision_check
        Chips (from the cube's sample) on which a fast precision (bf16, tf32, fp8) is
        compared with strict fp32 when the encoder is prepared; the figures go in the
        model card, and fp8 that misses its gate is refused (0: no check).
    checkpoint
        ``(file name, sha256)`` of the weights, for the model card.
    """

    name = "clay-v1.5"

    def __init__(
        self,
        model: ClayEncoder,
        *,
        size: str,
        output: Output = "cls",
        normalization: str | Mapping[str, tuple[float, float]] = "auto",
        compile: bool | None = None,
        precision_check: int = 32,
        static_batch: bool | None = None,
        checkpoint: tuple[str, str] | None = None,
    ) -> None:
        if output not in get_args(Output):
            raise ModelError(f"output must be 'cls', 'mean' or 'patches', got {output!r}.")
        self.model = model.eval()
        self.size = size
        self.output = output
        self.normalization_request = normalization
        self.compile = compile
        self.precision_check = int(precision_check)
        self.static_batch = static_batch
        self.checkpoint = checkpoint
        self.checkpoint_path: Path | None = None
        self.decoder: ClayDecoder | None = None
        self.loss_settings: dict[str, Any] | None = None  # enable_loss(): the decoder's scoring
        # The normalisation: fixed by the first prepare() (or given, from a card).
        self._norm: Normalization | None = None
        # The accuracy check the driver of a run already made (rebuilt from its card):
        # workers record it instead of each embedding the check chips again in fp32.
        self._checked: dict[str, Any] | None = None
        self._prepared: PreparedClay | None = None  # the last prepare()'s (deprecated use)

    @staticmethod
    def check_checkpoint(checkpoint: str | os.PathLike[str] | None = None) -> None:
        """Refuse a checkpoint :meth:`from_checkpoint` could not load (missing, unreadable,
        not a Clay encoder, keys or shapes of another architecture) without loading it: the
        file is mapped, and the model is built on torch's meta device (no memory)."""
        import torch

        from xclay.models.clay_encoder import ClayEncoder

        path = local_checkpoint(checkpoint) if checkpoint is not None else _locate_checkpoint()
        state, _ = load_clay_state_dict(path)
        size, patch = detect_size(state)
        with torch.device("meta"):  # shapes only: no memory
            _verify_encoder_state(path, size, state, ClayEncoder.from_size(size, patch_size=patch))

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike[str] | None = None,
        *,
        size: str | None = None,
        output: Output = "cls",
        normalization: str | Mapping[str, tuple[float, float]] = "auto",
        compile: bool | None = None,
    ) -> ClayV15:
        """Load Clay weights (official ``.ckpt``, ``.pt`` state dict or ``.safetensors``).

        ``checkpoint`` may be a path or a URL (``s3://``, ``gs://``, ``az://``,
        ``http(s)://``: downloaded once into xclay's cache and reused while the remote
        file is unchanged, :func:`~xclay.storage.cache.local_checkpoint`).
        ``checkpoint=None`` looks at ``$XCLAY_CHECKPOINT`` (a path or URL), then the
        cache path (:func:`default_checkpoint_path`). ``size`` (if given) must match
        the checkpoint's.
        """
        from xclay.models.checkpoints import file_sha256
        from xclay.models.clay_encoder import CLAY_SIZES, ClayEncoder

        path = local_checkpoint(checkpoint) if checkpoint is not None else _locate_checkpoint()
        if size is not None and size not in CLAY_SIZES:
            raise ModelError(f"unknown Clay size {size!r}; sizes: {', '.join(CLAY_SIZES)}.")
        state, _ = load_clay_state_dict(path)
        found, patch = detect_size(state)
        if size is not None and found != size:
            raise CheckpointError(
                f"{path.name} holds a {found!r} Clay encoder, not {size!r}; pass size={found!r} "
                "or the checkpoint of the size you want."
            )
        model = ClayEncoder.from_size(found, patch_size=patch)
        _verify_encoder_state(path, found, state, model)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        log.info("loaded Clay %s encoder from %s", found, path)
        encoder = cls(
            model,
            size=found,
            output=output,
            normalization=normalization,
            compile=compile,
            checkpoint=(path.name, file_sha256(path)),
        )
        encoder.checkpoint_path = path
        return encoder

    def enable_loss(self, seed: int = 0) -> None:
        """Load the decoder from the same checkpoint, so :meth:`loss` can score chips.

        ``seed`` enters every chip's masking permutation
        (:mod:`xclay.models.clay_decoder`). Call before :meth:`prepare`.
        """
        from xclay.models.clay_decoder import MASK_RATIO, MASK_RULE

        if self.decoder is None:
            self.decoder, norm_pix_loss = self._load_decoder()
        else:
            norm_pix_loss = bool(self.loss_settings and self.loss_settings["norm_pix_loss"])
        size = self.decoder.size
        self.loss_settings = {
            "seed": int(seed),
            "mask_ratio": MASK_RATIO,
            "mask_rule": MASK_RULE,
            "norm_pix_loss": norm_pix_loss,
            "metric": "mean over the masked patches of each patch's mean L1 error, on the "
            "normalised chip (nodata pixels 0)",
            "decoder": {
                "dim": size.dim,
                "depth": size.depth,
                "heads": size.heads,
                "dim_head": size.dim_head,
                "mlp_ratio": size.mlp_ratio,
            },
        }

    def _load_decoder(self) -> tuple[ClayDecoder, bool]:
        from xclay.models.clay_decoder import ClayDecoder, DecoderSize

        if self.checkpoint_path is None:
            raise ModelError(
                "the per-chip loss needs the decoder of this encoder's checkpoint, but the "
                "encoder was not loaded from a file; build it with ClayV15.from_checkpoint(PATH)."
            )
        path = self.checkpoint_path
        state, hyper = load_clay_state_dict(path, part="decoder")
        try:
            size = DecoderSize.of_state_dict(state, heads=int(hyper.get("decoder_heads", 4)))
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path.name}: not a Clay decoder ({err}).") from err
        decoder = ClayDecoder(self.model.dim, size, patch_size=self.model.patch_size)
        expected = decoder.state_dict()
        wrong = sorted(set(expected) ^ set(state)) or [
            k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)
        ]
        if wrong:
            raise CheckpointError(
                f"{path.name}: the decoder keys or shapes do not match Clay's, e.g. {wrong[:3]}."
            )
        decoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        log.info("loaded Clay decoder (%s) from %s", size, path)
        return decoder.eval(), bool(hyper.get("norm_pix_loss", False))

    def batch_size_hint(self, device: torch.device, chip_size: int, bands: int) -> int:
        """A batch that fills ``device``: see :func:`clay_batch_size`."""
        import torch

        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        return clay_batch_size(self.size, chip_size, bands, free_bytes=free)

    @classmethod
    def from_card(
        cls,
        card: ModelCard | Mapping[str, Any],
        *,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> ClayV15:
        """The encoder a model card describes: same weights (checked by sha256), output and
        normalisation, so every worker of a run embeds exactly as the driver prepared."""
        card = card if isinstance(card, ModelCard) else ModelCard.from_dict(dict(card))
        enc = cls.from_checkpoint(
            checkpoint,
            size=card.params.get("size"),
            output=card.output,  # type: ignore[arg-type]
            normalization={b: (v["mean"], v["std"]) for b, v in card.normalization.items()},
        )
        if card.params.get("loss"):
            enc.enable_loss(seed=int(card.params["loss"]["seed"]))
        if card.params.get("precision_check"):
            enc._checked = dict(card.params["precision_check"])
        if (
            enc.checkpoint
            and card.checkpoint_sha256
            and enc.checkpoint[1] != card.checkpoint_sha256
        ):
            raise CheckpointError(
                f"the checkpoint {enc.checkpoint[0]} (sha256 {enc.checkpoint[1][:12]}...) is not "
                f"the one these embeddings were made with (sha256 "
                f"{card.checkpoint_sha256[:12]}...)."
            )
        return enc

    # -- Encoder protocol ----------------------------------------------------

    @property
    def preferred_precision(self) -> Precision:
        return "bf16"

    @property
    def card(self) -> ModelCard:
        """The model as loaded (the prepared encoder's card adds what preparing fixed)."""
        if self._prepared is not None:
            return self._prepared.card
        return _card(self, None)

    def prepare(
        self,
        spec: InputSpec,
        sample: Sampler,
        *,
        device: torch.device,
        precision: ComputePrecision,
    ) -> PreparedClay:
        """The encoder ready for this cube: normalisation, wave kernel and position
        encoding; the model on ``device`` in ``precision`` (checked against strict fp32 on
        sample chips), with the fastest attention kernel and, on CUDA, compiled for static
        batches. Every attribute of what it returns exists (no half-built state)."""
        import torch

        from xclay.models.clay_encoder import META_DIMS, posemb_2d_gsd

        p = self.model.patch_size
        if spec.chip_size % p:
            lower, upper = spec.chip_size // p * p, -(-spec.chip_size // p) * p
            raise ModelError(
                f"chip_size {spec.chip_size} is not a multiple of Clay's {p} px patches; use "
                f"{lower or upper} or {upper}."
            )
        converted = self.model.converted_to
        if converted is not None and converted != precision.name:
            raise ModelError(
                f"this Clay model's weights were turned into {converted} for inference; load "
                f"it again (ClayV15.from_checkpoint) to run it in {precision.name}."
            )
        if self._norm is None:
            self._norm = resolve_normalization(self.normalization_request, spec, sample, seed=0)
        norm = self._norm
        norm.check_bands(spec.bands, what="Clay normalisation")
        waves, waves_source = _wavelengths(spec)
        self.model.to(device)
        mean, std = norm.arrays(spec.bands)
        with torch.inference_mode():
            kernel, bias = self.model.patch_kernel(
                torch.tensor(waves, dtype=torch.float32, device=device)
            )
            grid = spec.chip_size // p
            position = posemb_2d_gsd(grid, grid, self.model.dim - META_DIMS, spec.gsd, device)
            decoder_state: dict[str, Any] = {}
            if self.decoder is not None:
                self.decoder.to(device)
                projection, decoder_position = self.decoder.prepare(
                    torch.tensor(waves, dtype=torch.float32, device=device), grid, grid, spec.gsd
                )
                decoder_state = {"projection": projection, "decoder_position": decoder_position}
        state = {
            "mean": torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            "std": torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1),
            "kernel": kernel,
            "bias": bias,
            "position": position,
            **decoder_state,
        }

        def prepared(
            precision: ComputePrecision, forward: Any, attention: Any, static: int | None
        ) -> PreparedClay:
            return PreparedClay(
                self,
                norm=norm,
                waves=dict(zip(spec.bands, waves, strict=True)),
                waves_source=waves_source,
                gsd=spec.gsd,
                chip_size=spec.chip_size,
                device=device,
                precision=precision,
                state=state,
                forward=forward,
                attention=attention,
                static_batch=static,
            )

        check = self._check_batch(sample, precision)
        reference = None
        if check is not None:  # strict fp32 first, on the weights as loaded
            strict = prepared(_strict(), self.model.forward_with_kernel, None, None)
            with strict.precision.matmul_mode():
                reference = strict.encode(check).cpu().numpy()
        self._to_precision(precision, device)
        attention = _fastest_attention(self.model, spec, device, precision.dtype)
        compile_on = self.compile if self.compile is not None else device.type == "cuda"
        forward = (
            _compiled(self.model.forward_with_kernel)
            if compile_on
            else self.model.forward_with_kernel
        )
        static = self.static_batch if self.static_batch is not None else compile_on
        ready = prepared(
            precision, forward, attention, (spec.batch_size or None) if static else None
        )
        ready.speed.update(
            {
                "attention": _attention_name(attention),
                "compiled": bool(compile_on),
                **({"fp8_scaling": _fp8_scaling_of(self.model)} if precision.name == "fp8" else {}),
                **({"fp8_emulated": True} if precision.emulated else {}),
            }
        )
        if compile_on:
            with precision.matmul_mode():  # the mode every batch runs in: the same graph
                ready.speed["compile_seconds"] = ready.warm_up()
        if check is not None and reference is not None:
            with precision.matmul_mode():
                fast = ready.encode_in_batches(check)
            ready.speed["precision_check"] = _gate(precision, reference, fast)
        elif self._inherits_check(precision):
            ready.speed["precision_check"] = self._checked
        self._prepared = ready
        return ready

    def encode(self, batch: ChipBatch) -> torch.Tensor:
        """Deprecated: embed with the encoder :meth:`prepare` returns."""
        return self._ready("encode").encode(batch)

    def loss(self, batch: ChipBatch) -> torch.Tensor:
        """Deprecated: score with the encoder :meth:`prepare` returns."""
        return self._ready("loss").loss(batch)

    def _ready(self, what: str) -> PreparedClay:
        import warnings

        if self._prepared is None:
            raise ModelError(f"call prepare() before {what}(): the Clay inputs are not ready.")
        warnings.warn(
            f"ClayV15.{what}() after prepare() is deprecated: call {what}() on the encoder "
            "prepare() returns (prepared = encoder.prepare(...)).",
            DeprecationWarning,
            stacklevel=3,
        )
        return self._prepared

    def _check_batch(self, sample: Sampler, precision: ComputePrecision) -> ChipBatch | None:
        """Sample chips for the precision check (None: no check due)."""
        if (
            precision.name == "fp32"
            or self.precision_check < 1
            or self.model.converted_to is not None
            or self._inherits_check(precision)
        ):
            return None
        return sample(self.precision_check, 0)

    def _inherits_check(self, precision: ComputePrecision) -> bool:
        """Whether the card this encoder was rebuilt from checked this very precision."""
        return self._checked is not None and self._checked.get("precision") == precision.name

    def _to_precision(self, precision: ComputePrecision, device: torch.device) -> None:
        """Weights cast once (no per-batch cast by autocast): bf16 linear layers for bf16,
        FP8 ones for fp8 (LayerNorms stay fp32: autocast runs them in fp32)."""
        import torch
        from torch import nn

        if self.model.converted_to == precision.name:
            return
        if precision.name == "bf16":
            for module in self.model.transformer.modules():
                if isinstance(module, nn.Linear):
                    module.to(torch.bfloat16)
        elif precision.name == "fp8":
            from xclay.models.fp8 import convert_linears, fp8_scaling

            scaling = "row" if precision.emulated else fp8_scaling(device)
            convert_linears(self.model.transformer, scaling=scaling, emulate=precision.emulated)
        if precision.name in ("bf16", "fp8"):
            self.model.converted_to = precision.name


class PreparedClay:
    """Clay v1.5 ready for one cube (what :meth:`ClayV15.prepare` returns): every input
    the batches need is fixed here, once.

    Parameters
    ----------
    loaded
        The encoder as loaded (its model, output, decoder and loss settings).
    norm
        The normalisation, per band.
    waves
        Band -> central wavelength (micrometres).
    waves_source
        Where the wavelengths came from.
    gsd
        The cube's pixel size in metres.
    chip_size
        Chip edge in pixels.
    device
        Where the model runs.
    precision
        The precision it runs in.
    state
        Tensors fixed for the cube: ``mean``, ``std``, the patch ``kernel`` and ``bias``,
        the ``position`` encoding (and the decoder's ``projection`` and
        ``decoder_position`` with a loss).
    forward
        The model's forward (compiled or not).
    attention
        The SDPA backend picked on this device (None: torch's default).
    static_batch
        Pad every batch to this many chips (one compiled graph); None: no padding.
    """

    name = ClayV15.name

    def __init__(
        self,
        loaded: ClayV15,
        *,
        norm: Normalization,
        waves: dict[str, float],
        waves_source: str,
        gsd: float,
        chip_size: int,
        device: torch.device,
        precision: ComputePrecision,
        state: dict[str, torch.Tensor],
        forward: Any,
        attention: Any,
        static_batch: int | None,
    ) -> None:
        self.loaded = loaded
        self.norm = norm
        self.waves = waves
        self.waves_source = waves_source
        self.gsd = gsd
        self.chip_size = chip_size
        self.device = device
        self.precision = precision
        self.state = state
        self.forward = forward
        self.attention = attention
        self.static_batch = static_batch
        self.speed: dict[str, Any] = {}  # how the fast path was set up, for the card

    @property
    def output(self) -> Output:
        return self.loaded.output

    @property
    def preferred_precision(self) -> Precision:
        return self.loaded.preferred_precision

    @property
    def card(self) -> ModelCard:
        return _card(self.loaded, self)

    def prepare(
        self,
        spec: InputSpec,
        sample: Sampler,
        *,
        device: torch.device,
        precision: ComputePrecision,
    ) -> PreparedClay:
        """The same model prepared for another cube (:meth:`ClayV15.prepare`)."""
        return self.loaded.prepare(spec, sample, device=device, precision=precision)

    def batch_size_hint(self, device: torch.device, chip_size: int, bands: int) -> int:
        return self.loaded.batch_size_hint(device, chip_size, bands)

    def enable_loss(self, seed: int = 0) -> None:
        raise ModelError(
            "enable_loss() goes before prepare(): call it on the encoder as loaded, then "
            "prepare it again."
        )

    def encode(self, batch: ChipBatch) -> torch.Tensor:
        """``[B, dim]`` (cls, mean) or ``[B, H/8, W/8, dim]`` (patches), float32."""
        x, time, latlon = self._inputs(batch)
        n = x.shape[0]
        if self.static_batch and n < self.static_batch:  # one graph for every batch
            x, time, latlon = (_pad_rows(t, self.static_batch) for t in (x, time, latlon))
        with self._inference():
            tokens = self.forward(x, time, latlon, *self._prepared_inputs())
        tokens = tokens[:n].float()  # the padding is never returned
        if self.output == "cls":
            result: torch.Tensor = tokens[:, 0]
            return result
        if self.output == "mean":
            result = tokens[:, 1:].mean(dim=1)
            return result
        grid = x.shape[-1] // self.loaded.model.patch_size
        result = tokens[:, 1:].reshape(tokens.shape[0], -1, grid, tokens.shape[-1])
        return result

    def encode_in_batches(self, batch: ChipBatch) -> np.ndarray:
        """:meth:`encode` in slices of the static batch (no new graph for the check)."""
        step = self.static_batch or len(batch)
        parts = [
            self.encode(batch.rows(i, i + step)).cpu().numpy() for i in range(0, len(batch), step)
        ]
        return np.concatenate(parts)

    def warm_up(self) -> float:
        """Compile (or load from the cache) the graph of the static batch, through
        :meth:`encode` itself so the graph is the one every batch replays: seconds taken."""
        import time

        import torch

        from xclay.protocols import ChipBatch

        n, chip = self.static_batch or 1, self.chip_size
        blank = ChipBatch(
            pixels=torch.zeros((n, len(self.waves), chip, chip), device=self.device),
            valid=torch.ones((n, chip, chip), dtype=torch.bool, device=self.device),
            lonlat=torch.zeros((n, 2), dtype=torch.float64),
            time=np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]"),
        )
        start = time.perf_counter()
        self.encode(blank)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        log.info("torch.compile and warm-up: %.1f s", seconds)
        return round(seconds, 2)

    def _prepared_inputs(self) -> tuple[float, Any, Any, Any]:
        """What :meth:`ClayV15.prepare` fixed for every batch: the cube's gsd, the
        patch-embedding kernel and bias generated for its wavelengths, and the position
        encoding."""
        state = self.state
        return float(self.gsd), state["kernel"], state["bias"], state["position"]

    def loss(self, batch: ChipBatch) -> torch.Tensor:
        """``[B]`` float32: each chip's masked-reconstruction loss (after
        :meth:`ClayV15.enable_loss`).

        The encoder sees the chip's unmasked quarter of patches, the decoder
        reconstructs all of them; the loss is the mean L1 error over the
        masked patches of the normalised chip.
        """
        import torch

        from xclay.models.clay_decoder import chip_seeds, mask_permutations, reconstruction_loss

        decoder, settings = self.loaded.decoder, self.loaded.loss_settings
        if decoder is None or settings is None or "projection" not in self.state:
            raise ModelError("call enable_loss() before prepare() to score chips with the decoder.")
        if batch.chip_ids is None:
            raise ModelError("the loss needs each chip's id (ChipBatch.chip_ids) for its mask.")
        x, time, latlon = self._inputs(batch)
        p = self.loaded.model.patch_size
        n_patches = (x.shape[-2] // p) * (x.shape[-1] // p)
        seeds = chip_seeds([str(c) for c in batch.chip_ids], batch.time, settings["seed"])
        masked_np, unmasked_np = mask_permutations(seeds, n_patches)
        masked = torch.from_numpy(masked_np).to(x.device)
        unmasked = torch.from_numpy(unmasked_np).to(x.device)
        with self._inference():
            encoded = self.loaded.model.forward_with_kernel(
                x, time, latlon, *self._prepared_inputs(), keep=unmasked
            )
            predicted = decoder(
                encoded,
                unmasked,
                masked,
                time,
                latlon,
                self.state["decoder_position"],
                self.state["projection"],
            )
            return reconstruction_loss(
                predicted, x, masked, p, norm_pix_loss=settings["norm_pix_loss"]
            )

    def _inputs(self, batch: ChipBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised pixels (nodata 0), time and latlon encodings, on the device."""
        import torch

        device = self.device
        x = (batch.pixels.to(device=device, dtype=torch.float32) - self.state["mean"]) / self.state[
            "std"
        ]
        x = x.masked_fill(~batch.valid.to(device).unsqueeze(1), 0.0)
        time = torch.from_numpy(time_encoding(batch.time)).to(device)
        return x, time, latlon_encoding(batch.lonlat).to(device)

    def _inference(self) -> Any:
        """Inference mode, in bf16 autocast when the model runs in bf16, with the attention
        kernel picked for this device. The precision's matmul mode is the caller's: the
        embedding session enters it once for every batch (:mod:`xclay.embed`)."""
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self.precision.dtype == torch.bfloat16:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.attention is not None:
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(self.attention))
        return stack


def _card(loaded: ClayV15, prepared: PreparedClay | None) -> ModelCard:
    """Clay's model card: the model as loaded, and (prepared) what preparing fixed."""
    from xclay.models.clay_encoder import CLAY_SIZES

    s = CLAY_SIZES[loaded.size]
    grid = (prepared.chip_size if prepared else 0) // loaded.model.patch_size
    shape = [grid, grid, s.dim] if loaded.output == "patches" and grid else [s.dim]
    norm = prepared.norm if prepared else loaded._norm
    checkpoint = loaded.checkpoint
    return ModelCard(
        name=loaded.name,
        version="1.5",
        family="clay",
        description=(
            f"Clay v1.5 foundation model encoder ({loaded.size}: ViT with a wavelength-"
            f"conditioned {loaded.model.patch_size} px patch embedding); {loaded.output} token(s)."
        ),
        dim=s.dim,
        output=loaded.output,
        output_shape=shape,
        normalization=norm.to_dict() if norm else {},
        normalization_source=norm.source if norm else "",
        wavelengths=dict(prepared.waves) if prepared else {},
        gsd=prepared.gsd if prepared else None,
        patch_size=loaded.model.patch_size,
        checkpoint=checkpoint[0] if checkpoint else None,
        checkpoint_sha256=checkpoint[1] if checkpoint else None,
        license="Apache-2.0 (Clay model weights and code)",
        params={
            "size": loaded.size,
            "dim": s.dim,
            "depth": s.depth,
            "heads": s.heads,
            "dim_head": s.dim_head,
            "mlp_ratio": s.mlp_ratio,
            "waves_source": prepared.waves_source if prepared else "",
            "precision": prepared.precision.name if prepared else None,
            **(prepared.speed if prepared else {}),
            "time_encoding": (
                "[sin w, cos w, sin h, cos h], w = ISO week * 2 pi / 52, h = hour * 2 pi / 24 "
                "of the chip's time (a composite's midpoint); zeros when unknown"
            ),
            "latlon_encoding": "[sin lat, cos lat, sin lon, cos lon] of the chip centre, radians",
            "nodata": "pixels set to 0 after normalisation (the band mean)",
            **({"loss": loaded.loss_settings} if loaded.loss_settings else {}),
        },
    )


def _gate(precision: ComputePrecision, reference: np.ndarray, fast: np.ndarray) -> dict[str, Any]:
    """How the fast precision agrees with strict fp32 on the check chips (for the card);
    fp8 that misses its gate is refused (it would change the embeddings), bf16/tf32 warn."""
    import warnings

    from xclay.errors import PrecisionWarning
    from xclay.models.agreement import agreement

    rows = np.isfinite(reference.reshape(len(reference), -1)).all(axis=1)
    result = agreement(reference[rows], fast[rows], precision.name)
    if result.failures:
        message = (
            f"{precision.name} changes these embeddings more than its gate allows, against "
            f"strict fp32 on {result.chips} sample chips: {'; '.join(result.failures)}."
        )
        if precision.name == "fp8":
            raise ModelError(message + " Use precision='bf16'.")
        warnings.warn(message, PrecisionWarning, stacklevel=4)
    checked: dict[str, Any] = result.to_dict()
    return checked


def clay_batch_size(size: str, chip_size: int, bands: int, *, free_bytes: int | None) -> int:
    """Chips per batch that keep the device busy.

    GPU (``free_bytes`` given): the largest power of two whose inference
    activations (bf16, one layer at a time, fused attention: no L x L matrix)
    and input pixels fit in 40 % of the free memory, at most 1024. CPU: about
    a teraflop of work per batch, at least 2 and at most 32 chips; beyond that
    the CPU's throughput does not grow.
    """
    from xclay.models.clay_encoder import CLAY_SIZES, count_forward_flops

    s = CLAY_SIZES[size]
    if free_bytes is None:
        per_chip = count_forward_flops(size, chip_size, bands)
        return int(max(2, min(32, 1e12 // per_chip)))
    tokens = (chip_size // 8) ** 2 + 1
    inner = s.heads * s.dim_head
    # residual stream, norm output, q/k/v, attention output, MLP hidden (bf16), x2 for temporaries
    activations = tokens * (2 * s.dim + 4 * inner + s.dim * s.mlp_ratio) * 2 * 2
    pixels = bands * chip_size * chip_size * (4 + 2)  # normalised fp32 + raw
    fits = int(0.4 * free_bytes // (activations + pixels))
    if fits < 1:
        return 1
    return int(min(1024, 2 ** (fits.bit_length() - 1)))


def _verify_encoder_state(
    path: Path, size: str, state: Mapping[str, Any], model: ClayEncoder
) -> None:
    """Refuse a state dict whose keys or tensor shapes are not ``model``'s (the one check of
    :meth:`ClayV15.check_checkpoint` and :meth:`ClayV15.from_checkpoint`)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or wrong:
        problems = [
            f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} of other shapes (e.g. {wrong[0]})" if wrong else "",
        ]
        raise CheckpointError(
            f"{path.name} is not a Clay v1.5 {size} encoder: "
            + "; ".join(p for p in problems if p)
            + ". Use the official clay-v1.5.ckpt or a state dict saved from xclay's ClayEncoder."
        )


def _wavelengths(spec: InputSpec) -> tuple[list[float], str]:
    """The sensor table's wavelengths for a known platform's bands, else the cube's."""
    if spec.platform:
        sensor = get_sensor(spec.platform)
        if all(b in sensor.band_names for b in spec.bands):
            # What Clay saw in training for this platform (MODIS in nm: see the sensor table).
            return [
                sensor.band(b).clay_wavelength for b in spec.bands
            ], f"sensor-table:{spec.platform}"
    return [float(w) for w in spec.wavelengths], "cube wavelength coords"


def _strict() -> ComputePrecision:
    from xclay.devices import ComputePrecision

    return ComputePrecision("fp32")


def _fp8_scaling_of(model: ClayEncoder) -> str | None:
    from xclay.models.fp8 import FP8Linear

    for module in model.modules():
        if isinstance(module, FP8Linear):
            return f"per {module.scaling}"
    return None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    import torch

    return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def compile_cache_dir() -> Path:
    """Where compiled graphs are kept across runs and Dask workers:
    ``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``<xclay cache>/inductor``."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return Path(env) if env else default_checkpoint_path().parent / "inductor"


def _compiled(function: Any) -> Any:
    import torch

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    return torch.compile(function, dynamic=False)


def _fastest_attention(
    model: ClayEncoder, spec: InputSpec, device: torch.device, dtype: torch.dtype
) -> Any:
    """The fastest scaled-dot-product-attention kernel for this model's shapes on a CUDA
    device (flash, cuDNN, memory-efficient), by timing each; None (torch's choice) on a
    CPU or when none of them runs."""
    if device.type != "cuda":
        return None
    import time

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    attention = model.transformer.layers[0][0]  # type: ignore[index]
    heads = int(attention.heads)
    dim_head = attention.to_out.in_features // heads
    tokens = (spec.chip_size // model.patch_size) ** 2 + 1
    batch = max(1, min(spec.batch_size or 32, 64))
    q = torch.randn(batch, heads, tokens, dim_head, device=device, dtype=dtype)
    best, best_time = None, float("inf")
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
    ):
        try:
            with sdpa_kernel(backend), torch.inference_mode():
                for _ in range(2):
                    F.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(5):
                    F.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize(device)
        except RuntimeError:
            continue
        elapsed = time.perf_counter() - start
        if elapsed < best_time:
            best, best_time = backend, elapsed
    return best


def _attention_name(backend: Any) -> str:
    if backend is None:
        return "default"
    return str(getattr(backend, "name", backend)).lower().replace("_attention", "")
