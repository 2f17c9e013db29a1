"""The model registry: names -> encoders (:class:`~xclay.models.plugin.EncoderPlugin`
classes), with the functions users build and check models by.

A model's class imports torch only when it builds the model, so listing models (and
``import xclay``) never imports torch.

Other packages add models through the ``xclay.models`` entry-point group
(:mod:`xclay.plugins`), found in every process, so Dask workers rebuild a plug-in's
encoder from its model card as they rebuild the built-in ones. :func:`register_model`
covers the interactive case (one process). :class:`ModelInfo`, the earlier way to
declare a model (four ``"module:callable"`` strings), is still taken, deprecated.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xclay.errors import ModelError
from xclay.model_card import ModelCard
from xclay.models.plugin import (
    BandRequirement,
    EncoderPlugin,
    NormalizationSource,
    adopt_encoder,
    declaration_problem,
    keyword_names,
)
from xclay.plugins import Registry
from xclay.protocols import Encoder

__all__ = [
    "MODELS",
    "EncoderPlugin",
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


@dataclass(frozen=True)
class ModelInfo:
    """A model declared by import paths (deprecated: subclass
    :class:`~xclay.models.plugin.EncoderPlugin`; a ModelInfo is still registered, as one).

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
        problem = declaration_problem(self.bands, self.normalization)
        if problem:
            raise ModelError(f"ModelInfo {self.name!r}: {problem}.")


class _Declared(EncoderPlugin):
    """A :class:`ModelInfo` as a plug-in: its import paths resolved when first used."""

    def __init__(self, info: ModelInfo) -> None:
        self.info = info
        self.name = info.name
        self.description = info.description
        self.dim = info.dim
        self.patch_size = info.patch_size
        self.bands = info.bands
        self.normalization = info.normalization
        self.needs_checkpoint = info.needs_checkpoint

    @property
    def takes_checkpoint(self) -> bool:
        return self.info.loader is not None

    def build(self, **options: Any) -> Encoder:
        result: Encoder = _resolve(self.info.factory)(**options)
        return result

    def load(self, checkpoint: str | os.PathLike[str] | None, **options: Any) -> Encoder:
        if self.info.loader is None:
            return super().load(checkpoint, **options)
        result: Encoder = _resolve(self.info.loader)(checkpoint, **options)
        return result

    def rebuild(
        self, card: ModelCard, *, checkpoint: str | os.PathLike[str] | None = None
    ) -> Encoder:
        if self.info.rebuild is None:
            return super().rebuild(card, checkpoint=checkpoint)
        result: Encoder = _resolve(self.info.rebuild)(card, checkpoint=checkpoint)
        return result

    def check_checkpoint(self, checkpoint: str | os.PathLike[str] | None) -> None:
        module, _, attr = (self.info.loader or self.info.factory).partition(":")
        owner = _resolve(f"{module}:{attr.rsplit('.', 1)[0]}") if "." in attr else None
        check = getattr(owner, "check_checkpoint", None)
        if check is not None:
            check(checkpoint)

    def option_names(self, *, checkpoint: bool) -> list[str] | None:
        loads = checkpoint and self.info.loader is not None
        target = _resolve(self.info.loader if loads and self.info.loader else self.info.factory)
        return keyword_names(target, skip=1 if loads else 0)  # a loader's first: the path

    def vector_values(self, options: Mapping[str, Any], chip_size: int) -> int:
        return self.info.values_per_chip(options, chip_size)


def _adopt(value: Any) -> EncoderPlugin:
    if isinstance(value, ModelInfo):
        warnings.warn(
            f"ModelInfo {value.name!r}: a model is now a class, an EncoderPlugin "
            "(xclay.models.EncoderPlugin; docs/models.md#adding-a-model); ModelInfo will go.",
            DeprecationWarning,
            stacklevel=4,
        )
        return _Declared(value)
    return adopt_encoder(value)


#: The registered encoders (:mod:`xclay.plugins`): xclay's own and installed ones.
MODELS: Registry[EncoderPlugin] = Registry("model", ENTRY_POINT_GROUP, _adopt, error=ModelError)


def register_model(info: EncoderPlugin | type[EncoderPlugin] | ModelInfo) -> None:
    """Add (or replace) a model in this process (other processes, such as Dask workers,
    find models declared as ``xclay.models`` entry points instead).

    Parameters
    ----------
    info
        The model: an :class:`EncoderPlugin` or its class (a :class:`ModelInfo` is taken,
        deprecated). It replaces any model of the same name, built-in ones included;
        anything else is refused with a :class:`~xclay.errors.ModelError`.
    """
    MODELS.register(info, replace=True)


def list_models() -> list[str]:
    """Names of the registered models (built-in, plug-ins, and registered here)."""
    return MODELS.names()


def get_model_info(name: str) -> EncoderPlugin:
    """The registered model ``name``: what it is, and how it is built and checked.

    Parameters
    ----------
    name
        A registry name (as :func:`list_models` lists them). A name not yet
        registered makes the registry load the installed plug-ins first; one still
        unknown is refused with a :class:`~xclay.errors.ModelError` listing the
        available names.
    """
    return MODELS.get(name)


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
    return MODELS.load_entry_points(again=again)


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
        The model's own settings (e.g. ``num_filters=`` for ``rcf``), checked by the
        model (:meth:`EncoderPlugin.check_options`); unknown names are refused with the
        list of valid ones.
    """
    plugin, loads = _checked(name, checkpoint, options)
    return plugin.load(checkpoint, **options) if loads else plugin.build(**options)


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
        model's :meth:`~EncoderPlugin.check_checkpoint`. ``None``: a model that
        needs weights checks those it would find (Clay: ``$XCLAY_CHECKPOINT``, then the
        cache path); other models check none.
    **options
        The model's own settings, checked by the model.
    """
    plugin, loads = _checked(name, checkpoint, options)
    if loads:
        plugin.check_checkpoint(checkpoint)


def _checked(
    name: str, checkpoint: str | os.PathLike[str] | None, options: Mapping[str, Any]
) -> tuple[EncoderPlugin, bool]:
    plugin = get_model_info(name)
    loads = checkpoint is not None or plugin.needs_checkpoint
    if loads and not plugin.takes_checkpoint:
        raise ModelError(f"model {name!r} takes no checkpoint.")
    plugin.check_options(options, checkpoint=loads)
    return plugin, loads


def encoder_from_card(
    card: ModelCard | Mapping[str, Any], *, checkpoint: str | os.PathLike[str] | None = None
) -> Encoder:
    """Rebuild the prepared encoder a model card describes (same filters, normalisation,
    output), e.g. on a worker of a distributed run.

    Parameters
    ----------
    card
        The :class:`~xclay.model_card.ModelCard` of an output, or its dict form; its
        ``name`` picks the model, whose :meth:`~EncoderPlugin.rebuild` builds the encoder.
    checkpoint
        Passed to :meth:`~EncoderPlugin.rebuild`: the weights the card was made with. Clay
        checks them against the card's sha256 and, given ``None``, looks where
        :meth:`~xclay.models.clay.ClayV15.from_checkpoint` does; ``rcf`` ignores it
        (its filters are in the card).
    """
    card = card if isinstance(card, ModelCard) else ModelCard.from_dict(dict(card))
    return get_model_info(card.name).rebuild(card, checkpoint=checkpoint)


def _resolve(target: str) -> Any:
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


from xclay.models.clay import ClayPlugin  # noqa: E402  (they import this module's base)
from xclay.models.rcf import RCFPlugin  # noqa: E402

MODELS.built_in(RCFPlugin, ClayPlugin)
