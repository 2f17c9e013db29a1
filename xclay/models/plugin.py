"""An encoder as a plug-in: one class saying what users choose the model by, and how it is
built, loaded from a checkpoint, rebuilt from a model card, checked and sized.

xclay's own models are such classes (:class:`~xclay.models.rcf.RCFPlugin`,
:class:`~xclay.models.clay.ClayPlugin`), and so is a model of another package, found
through the ``xclay.models`` entry-point group (:mod:`xclay.plugins`). Nothing outside the
class knows a model's options: the CLI and the run spec pass them through
(``--model-option``, ``model.options``) and :meth:`EncoderPlugin.check_options` checks
them.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

from xclay.errors import ModelError
from xclay.model_card import ModelCard
from xclay.protocols import Encoder

__all__ = ["BandRequirement", "EncoderPlugin", "NormalizationSource"]

BandRequirement = Literal["any", "wavelengths"]
NormalizationSource = Literal["sensor", "measured", "given", "none"]
Checkpoint = str | os.PathLike[str] | None


class EncoderPlugin:
    """A registered encoder. Subclass it, set the class attributes, and implement
    :meth:`build` (and :meth:`load`, :meth:`rebuild`, :meth:`check_checkpoint`,
    :meth:`vector_values` where they apply).

    Attributes
    ----------
    name
        Registry name passed to ``embed(model=...)``.
    description
        One line.
    dim
        Embedding length with default options.
    patch_size
        Patch size in pixels (None for models without patches).
    bands
        Which bands the model accepts: ``"any"``, or ``"wavelengths"`` (any band whose
        central wavelength is known: the sensor table or the cube's ``wavelength``
        coordinate).
    normalization
        Where its normalisation constants may come from, in the order it tries them:
        ``"sensor"`` (the sensor table), ``"measured"`` (on the cube's sample chips),
        ``"given"`` (passed by the user), ``"none"``.
    needs_checkpoint
        True when the model has no meaning without weights (:meth:`load` is then used
        even without a checkpoint: it finds its default weights).
    """

    name: str
    description: str
    dim: int
    patch_size: int | None = None
    bands: BandRequirement = "any"
    normalization: tuple[NormalizationSource, ...] = ("measured",)
    needs_checkpoint: bool = False

    # ------------------------------------------------------------------ building

    def build(self, **options: Any) -> Encoder:
        """The encoder with ``options`` and no checkpoint.

        Parameters
        ----------
        **options
            The model's own settings (checked first by :meth:`check_options`).
        """
        raise ModelError(f"model {self.name!r} needs a checkpoint.")

    def load(self, checkpoint: Checkpoint, **options: Any) -> Encoder:
        """The encoder from ``checkpoint`` (weights or a saved fit).

        Parameters
        ----------
        checkpoint
            A path or URL; None for a model that needs weights and finds its default
            ones.
        **options
            The model's own settings that a checkpoint leaves open.
        """
        raise ModelError(f"model {self.name!r} takes no checkpoint.")

    def rebuild(self, card: ModelCard, *, checkpoint: Checkpoint = None) -> Encoder:
        """The exact prepared encoder ``card`` describes: how a Dask worker gets the encoder
        the driver prepared.

        Parameters
        ----------
        card
            The model card of the prepared encoder.
        checkpoint
            The weights the card was made with (a model checks them against the card).
        """
        raise ModelError(f"model {self.name!r} cannot be rebuilt from its model card.")

    # ------------------------------------------------------------------ checking

    @property
    def takes_checkpoint(self) -> bool:
        """Whether the model loads checkpoints (it overrides :meth:`load`)."""
        return type(self).load is not EncoderPlugin.load

    def check_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Refuse a checkpoint that is missing, unreadable or of another architecture
        without loading it (a 5 GB file is mapped, not read); by default nothing is checked.

        Parameters
        ----------
        checkpoint
            As :meth:`load` takes it.
        """

    def check_options(self, options: Mapping[str, Any], *, checkpoint: bool) -> None:
        """Refuse options the model does not take, or values it cannot use, before it is
        built (a :class:`~xclay.errors.ModelError` naming them). By default the names are
        checked against :meth:`option_names`; a model overrides this to check values too.

        Parameters
        ----------
        options
            The options as given (``model.options``, ``--model-option``, ``get_model``'s
            keywords).
        checkpoint
            Whether the model is loaded from a checkpoint.
        """
        allowed = self.option_names(checkpoint=checkpoint)
        if allowed is None:
            return  # any options: the model checks them as it is built
        unknown = sorted(set(options) - set(allowed))
        if not unknown:
            return
        if checkpoint and not allowed:
            raise ModelError(
                f"options {unknown} cannot be combined with a checkpoint: the checkpoint fixes "
                f"model {self.name!r}'s settings."
            )
        raise ModelError(
            f"model {self.name!r} has no options {unknown}; its options are: "
            f"{', '.join(allowed) or 'none'}."
        )

    def option_names(self, *, checkpoint: bool) -> list[str] | None:
        """The options the model takes (None: any); by default the keyword parameters of
        :meth:`build` (or :meth:`load`, with a checkpoint).

        Parameters
        ----------
        checkpoint
            Whether the model is loaded from a checkpoint.
        """
        return keyword_names(self.load if checkpoint else self.build)

    def vector_values(self, options: Mapping[str, Any], chip_size: int) -> int:
        """Values one chip's vector holds with ``options`` at ``chip_size`` px (a patch
        grid's, say); where the options alone do not fix it (the checkpoint does), an upper
        bound. A run sizes its outputs with it before it starts. By default ``dim``.

        Parameters
        ----------
        options
            The model's options.
        chip_size
            Chip edge in pixels.
        """
        return self.dim

    def values_per_chip(self, options: Mapping[str, Any], chip_size: int) -> int:
        """:meth:`vector_values` (the name :class:`~xclay.models.ModelInfo` gave it).

        Parameters
        ----------
        options
            The model's options.
        chip_size
            Chip edge in pixels.
        """
        return int(self.vector_values(options, chip_size))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {getattr(self, 'name', '?')!r}>"


def keyword_names(target: Callable[..., Any], *, skip: int = 0) -> list[str] | None:
    """The names of ``target``'s parameters after the first ``skip`` (``self`` and
    ``checkpoint`` never count); None when it takes ``**kwargs``.

    Parameters
    ----------
    target
        A function, method or class (its ``__init__``).
    skip
        Leading parameters that are not options (a loader's checkpoint path).
    """
    parameters = list(inspect.signature(target).parameters.values())[skip:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [
        p.name
        for p in parameters
        if p.name not in ("self", "checkpoint") and p.kind is not p.VAR_POSITIONAL
    ]


def adopt_encoder(value: Any) -> EncoderPlugin:
    """``value`` as a registered encoder: an :class:`EncoderPlugin` or its class, checked
    for what a registry entry needs (a TypeError saying what is wrong otherwise).

    Parameters
    ----------
    value
        What a registration or an entry point gives.
    """
    if isinstance(value, type) and issubclass(value, EncoderPlugin):
        value = value()
    if not isinstance(value, EncoderPlugin):
        raise TypeError(f"a {type(value).__name__} is not an EncoderPlugin (or its class)")
    missing = [a for a in ("name", "description", "dim") if not hasattr(value, a)]
    if missing:
        raise TypeError(f"{value!r} lacks {', '.join(missing)}")
    problem = declaration_problem(value.bands, value.normalization)
    if problem:
        raise TypeError(f"model {value.name!r}: {problem}")
    return value


def declaration_problem(bands: Any, normalization: Any) -> str | None:
    """What is wrong with a model's declared ``bands`` and ``normalization``, or None.

    Parameters
    ----------
    bands
        As :attr:`EncoderPlugin.bands`.
    normalization
        As :attr:`EncoderPlugin.normalization`.
    """
    if bands not in get_args(BandRequirement):
        return f"bands must be one of {', '.join(get_args(BandRequirement))}, got {bands!r}"
    unknown = [s for s in normalization if s not in get_args(NormalizationSource)]
    if unknown or not normalization:
        return (
            f"normalization must be a non-empty tuple of "
            f"{', '.join(get_args(NormalizationSource))}, got {normalization!r}"
        )
    return None
