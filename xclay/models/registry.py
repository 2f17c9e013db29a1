"""The model registry: names -> encoders, with the metadata users choose by.

Entries name their implementation by import path, so listing models (and
``import xclay``) never imports torch.
"""

from __future__ import annotations

import importlib
import inspect
import os
from dataclasses import dataclass
from typing import Any

from xclay.errors import ModelError
from xclay.protocols import Encoder

__all__ = ["ModelInfo", "get_model", "get_model_info", "list_models", "register_model"]


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
        Which bands the model accepts.
    normalization
        Where its normalisation constants come from by default.
    """

    name: str
    description: str
    factory: str
    loader: str | None
    needs_checkpoint: bool
    dim: int
    patch_size: int | None
    bands: str
    normalization: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(info: ModelInfo) -> None:
    """Add (or replace) a registry entry."""
    _REGISTRY[info.name] = info


def list_models() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def get_model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; available: {', '.join(list_models())}."
        ) from None


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
    info = get_model_info(name)
    if checkpoint is not None:
        if info.loader is None:
            raise ModelError(f"model {name!r} takes no checkpoint.")
        if options:
            raise ModelError(
                f"options {sorted(options)} cannot be combined with a checkpoint: the checkpoint "
                "fixes the model's settings."
            )
        return _resolve(info.loader)(checkpoint)
    if info.needs_checkpoint:
        return _resolve(info.loader or info.factory)(None)
    factory = _resolve(info.factory)
    allowed = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ModelError(
            f"model {name!r} has no options {unknown}; its options are: {', '.join(allowed)}."
        )
    return factory(**options)


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
        normalization="sensor table for known platforms, else measured on the cube",
    )
)
