"""The model registry: names -> encoders, with the metadata users choose by.

Entries name their implementation by import path, so listing models (and
``import xclay``) never imports torch.

Other packages add models through the ``xclay.models`` entry-point group (as
xarray backends and zarr codecs register): an entry point names a
:class:`ModelInfo`, a list of them, or a callable returning either. They are
found the first time the registry is asked for a name it lacks or for the list,
in every process, so Dask workers rebuild a plug-in's encoder from its model
card as they rebuild the built-in ones. :func:`register_model` covers the
interactive case (one process).
"""

from __future__ import annotations

import importlib
import inspect
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from xclay.errors import ModelError, PluginWarning
from xclay.model_card import ModelCard
from xclay.protocols import Encoder

__all__ = [
    "ModelInfo",
    "check_model",
    "encoder_from_card",
    "get_model",
    "get_model_info",
    "list_models",
    "load_plugins",
    "register_model",
]

ENTRY_POINT_GROUP = "xclay.models"
BandRequirement = Literal["any", "wavelengths"]
NormalizationSource = Literal["sensor", "measured", "given", "none"]


@dataclass(frozen=True)
class ModelInfo:
    """A registry entry.

    Attributes
    ----------
    name
        Registry name passed to ``embed(model=...)``.
    description
        One line.
    factory
        ``"module:callable"`` building the encoder from options.
    loader
        ``"module:callable"`` building it from a checkpoint path (``None``:
        the model takes no checkpoint).
    needs_checkpoint
        True when the model has no meaning without weights.
    dim
        Embedding length with default options.
    patch_size
        Patch size in pixels (``None`` for models without patches).
    bands
        Which bands the model accepts: ``"any"``, or ``"wavelengths"`` (any band
        whose central wavelength is known: the sensor table or the cube's
        ``wavelength`` coordinate).
    normalization
        Where its normalisation constants may come from, in the order it tries them:
        ``"sensor"`` (the sensor table, for known platforms), ``"measured"`` (on the
        cube's sample chips), ``"given"`` (passed by the user), ``"none"``.
    rebuild
        ``"module:callable"`` rebuilding the exact prepared encoder from a model
        card (and the checkpoint path): how distributed workers get the encoder
        the driver prepared.
    vector_values
        ``"module:callable"`` taking ``(options, chip_size)`` and giving the number of
        values one chip's vector holds with those options (e.g. a patch grid's); where
        the options alone do not fix it (the checkpoint does), an upper bound. ``None``:
        always ``dim``. Runs size their outputs with it before they start.
    """

    name: str
    description: str
    factory: str
    loader: str | None
    needs_checkpoint: bool
    dim: int
    patch_size: int | None
    bands: BandRequirement
    normalization: tuple[NormalizationSource, ...]
    rebuild: str | None = None
    vector_values: str | None = None

    def values_per_chip(self, options: Mapping[str, Any], chip_size: int) -> int:
        """Values one chip's vector holds with ``options`` at ``chip_size`` px (see
        ``vector_values``).

        Parameters
        ----------
        options
            The model's options, as :func:`get_model` takes them.
        chip_size
            Chip edge in pixels.
        """
        if self.vector_values is None:
            return self.dim
        return int(_resolve(self.vector_values)(options, chip_size))

    def __post_init__(self) -> None:
        if self.bands not in get_args(BandRequirement):
            raise ModelError(
                f"ModelInfo {self.name!r}: bands must be one of "
                f"{', '.join(get_args(BandRequirement))}, got {self.bands!r}."
            )
        unknown = [s for s in self.normalization if s not in get_args(NormalizationSource)]
        if unknown or not self.normalization:
            raise ModelError(
                f"ModelInfo {self.name!r}: normalization must be a non-empty tuple of "
                f"{', '.join(get_args(NormalizationSource))}, got {self.normalization!r}."
            )


_REGISTRY: dict[str, ModelInfo] = {}
_BUILT_IN: set[str] = set()
_plugins_loaded = False


def register_model(info: ModelInfo) -> None:
    """Add (or replace) a registry entry in this process (other processes, such as Dask
    workers, find models declared as ``xclay.models`` entry points instead).

    Parameters
    ----------
    info
        The entry; it replaces any entry of the same ``info.name``, built-in ones
        included. Anything but a :class:`ModelInfo` is refused with a
        :class:`~xclay.errors.ModelError`.
    """
    if not isinstance(info, ModelInfo):
        raise ModelError(f"register_model takes a ModelInfo, got {type(info).__name__}.")
    _REGISTRY[info.name] = info


def list_models() -> list[str]:
    """Names of the registered models (built-in, plug-ins, and registered here)."""
    load_plugins()
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``.

    Parameters
    ----------
    name
        A registry name (as :func:`list_models` lists them). A name not yet
        registered makes the registry load the installed plug-ins first; one still
        unknown is refused with a :class:`~xclay.errors.ModelError` listing the
        available names.
    """
    if name not in _REGISTRY:
        load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; available: {', '.join(list_models())}. Models from "
            f"other packages are found through the {ENTRY_POINT_GROUP!r} entry-point group."
        ) from None


def load_plugins(*, again: bool = False) -> list[str]:
    """Register the models installed packages declare under the ``xclay.models``
    entry-point group (once per process, unless ``again``). A plug-in that fails to
    load, or that would replace a built-in model, is left out with a
    :class:`~xclay.errors.PluginWarning` naming it.

    Parameters
    ----------
    again
        Read the entry points even if this process already has (e.g. after installing
        a plug-in). By default only the first call reads them; later calls add nothing.

    Returns
    -------
    list of str
        The names of the models this call registered (empty when it read nothing).
    """
    global _plugins_loaded
    if _plugins_loaded and not again:
        return []
    _plugins_loaded = True
    from importlib.metadata import entry_points

    added = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {point.name!r} ({point.value}) of {ENTRY_POINT_GROUP!r}"
        try:
            value = point.load()
            infos = value() if callable(value) and not isinstance(value, ModelInfo) else value
            infos = [infos] if isinstance(infos, ModelInfo) else list(_iterable(infos))
        except Exception as err:  # a broken plug-in must not break xclay
            warnings.warn(f"{where} failed to load: {err}", PluginWarning, stacklevel=2)
            continue
        for info in infos:
            if not isinstance(info, ModelInfo):
                warnings.warn(
                    f"{where} gave a {type(info).__name__}, not a ModelInfo: left out.",
                    PluginWarning,
                    stacklevel=2,
                )
            elif info.name in _BUILT_IN:
                warnings.warn(
                    f"{where} would replace the built-in model {info.name!r}: left out.",
                    PluginWarning,
                    stacklevel=2,
                )
            else:
                _REGISTRY[info.name] = info
                added.append(info.name)
    return added


def _iterable(value: Any) -> Iterable[Any]:
    if not isinstance(value, Iterable) or isinstance(value, str | bytes):
        raise TypeError(f"expected a ModelInfo or a list of them, got {type(value).__name__}")
    return value


def get_model(
    name: str, *, checkpoint: str | os.PathLike[str] | None = None, **options: Any
) -> Encoder:
    """Build a registered encoder.

    Parameters
    ----------
    name
        A name from :func:`list_models`.
    checkpoint
        Weights (or fitted filters) to load. Required by models that need
        weights; optional for ``rcf`` (a saved fit, so other cubes get
        comparable vectors).
    **options
        The model's own settings (e.g. ``num_filters=`` for ``rcf``); unknown
        names are refused with the list of valid ones.
    """
    target, use_loader = _builder(name, checkpoint, options)
    result: Encoder = target(checkpoint, **options) if use_loader else target(**options)
    return result


def check_model(
    name: str, *, checkpoint: str | os.PathLike[str] | None = None, **options: Any
) -> None:
    """What :func:`get_model` would refuse, found without building the model: an unknown
    name or option, and a checkpoint that is missing, unreadable or of another architecture
    (read as far as its header and tensor shapes; a 5 GB checkpoint is mapped, not read).

    Parameters
    ----------
    name
        A name from :func:`list_models`.
    checkpoint
        The weights (or fitted filters) :func:`get_model` would load, checked by the
        model class's ``check_checkpoint`` where it has one. ``None``: a model that
        needs weights checks those it would find (Clay: ``$XCLAY_CHECKPOINT``, then the
        cache path); other models check none.
    **options
        The model's own settings, checked by name against what the model takes.
    """
    info = get_model_info(name)
    _builder(name, checkpoint, options)
    loader = info.loader or info.factory
    module, _, attr = loader.partition(":")
    owner = _resolve(f"{module}:{attr.rsplit('.', 1)[0]}") if "." in attr else None
    check = getattr(owner, "check_checkpoint", None)
    if check is not None and (info.needs_checkpoint or checkpoint is not None):
        check(checkpoint)


def _builder(
    name: str, checkpoint: str | os.PathLike[str] | None, options: Mapping[str, Any]
) -> tuple[Any, bool]:
    info = get_model_info(name)
    use_loader = checkpoint is not None or info.needs_checkpoint
    if use_loader and info.loader is None:
        raise ModelError(f"model {name!r} takes no checkpoint.")
    target = _resolve(info.loader if use_loader and info.loader else info.factory)
    allowed = [p for p in inspect.signature(target).parameters if p != "self"]
    if use_loader:
        allowed = allowed[1:]  # the first parameter is the checkpoint path
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        if use_loader and not allowed:
            raise ModelError(
                f"options {unknown} cannot be combined with a checkpoint: the checkpoint fixes "
                f"model {name!r}'s settings."
            )
        raise ModelError(
            f"model {name!r} has no options {unknown}; its options are: {', '.join(allowed)}."
        )
    return target, use_loader


def encoder_from_card(
    card: ModelCard | Mapping[str, Any], *, checkpoint: str | os.PathLike[str] | None = None
) -> Encoder:
    """Rebuild the prepared encoder a model card describes (same filters, normalisation,
    output), e.g. on a worker of a distributed run.

    Parameters
    ----------
    card
        The :class:`~xclay.model_card.ModelCard` of an output, or its dict form; its
        ``name`` picks the registry entry, whose ``rebuild`` callable builds the encoder.
    checkpoint
        Passed to the entry's ``rebuild``: the weights the card was made with. Clay
        checks them against the card's sha256 and, given ``None``, looks where
        :meth:`~xclay.models.clay.ClayV15.from_checkpoint` does; ``rcf`` ignores it
        (its filters are in the card).
    """
    card = card if isinstance(card, ModelCard) else ModelCard.from_dict(dict(card))
    info = get_model_info(card.name)
    if info.rebuild is None:
        raise ModelError(f"model {card.name!r} cannot be rebuilt from its model card.")
    result: Encoder = _resolve(info.rebuild)(card, checkpoint=checkpoint)
    return result


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


register_model(
    ModelInfo(
        name="rcf",
        description=(
            "Random convolutional features (MOSAIKS, Rolf et al. 2021): weight-free, fitted on "
            "the cube from a seed; 2 x num_filters dims."
        ),
        factory="xclay.models.rcf:RCFEncoder",
        loader="xclay.models.rcf:RCFEncoder.from_checkpoint",
        needs_checkpoint=False,
        dim=1024,
        patch_size=None,
        bands="any",
        normalization=("sensor", "measured"),
        rebuild="xclay.models.rcf:RCFEncoder.from_card",
        vector_values="xclay.models.rcf:vector_values",
    )
)

register_model(
    ModelInfo(
        name="clay-v1.5",
        description=(
            "Clay v1.5 foundation model encoder (ViT-L/8, wavelength-conditioned patch embedding); "
            "official weights: huggingface.co/made-with-clay/Clay, v1.5/clay-v1.5.ckpt."
        ),
        factory="xclay.models.clay:ClayV15.from_checkpoint",
        loader="xclay.models.clay:ClayV15.from_checkpoint",
        needs_checkpoint=True,
        dim=1024,
        patch_size=8,
        bands="wavelengths",
        normalization=("sensor", "measured", "given"),
        rebuild="xclay.models.clay:ClayV15.from_card",
        vector_values="xclay.models.clay:vector_values",
    )
)

_BUILT_IN.update(_REGISTRY)
