"""The model card: what produced an embedding set, stored in every output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from xclay.errors import ModelError

__all__ = ["ModelCard"]


@dataclass(frozen=True)
class ModelCard:
    """Describes an encoder as prepared for one datacube.

    Attributes
    ----------
    name, version, family
        Registry name (``"rcf"``, ``"clay-v1.5"``), model version, model family.
    description
        One line on what the model is.
    dim
        Length of one chip's embedding vector.
    output
        Which vector is stored: ``"cls"``, ``"mean"``, ``"patches"`` or ``"pooled"``.
    output_shape
        Shape of one chip's output: ``[dim]``, or ``[rows, cols, dim]`` for
        ``"patches"`` (empty means ``[dim]``).
    normalization
        Per band ``{"mean": m, "std": s}`` applied as ``(value - m) / s``.
    normalization_source
        Where the constants came from: ``"sensor-table:<platform>"``,
        ``"measured"`` (on the cube) or ``"user"``.
    wavelengths
        Per band central wavelength given to the model.
    gsd
        Ground sample distance (m) given to the model.
    patch_size
        Patch size in pixels for patch-based models.
    checkpoint, checkpoint_sha256
        File name and sha256 of the weights (``None`` for weight-free models).
    license
        License of the weights / method.
    params
        Model-specific settings needed to reproduce the embeddings.
    """

    name: str
    version: str
    family: str
    description: str
    dim: int
    output: str
    output_shape: list[int] = field(default_factory=list)
    normalization: dict[str, dict[str, float]] = field(default_factory=dict)
    normalization_source: str = ""
    wavelengths: dict[str, float] = field(default_factory=dict)
    gsd: float | None = None
    patch_size: int | None = None
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    license: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            raise ModelError("a model card needs a name.")
        if self.dim < 1:
            raise ModelError(f"a model card's dim must be positive, got {self.dim}.")

    @property
    def vector_shape(self) -> tuple[int, ...]:
        """Shape of one chip's output (``(dim,)`` unless the model returns patch grids)."""
        return tuple(self.output_shape) if self.output_shape else (self.dim,)

    def replace(self, **changes: Any) -> ModelCard:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compact(self, limit: int = 4096) -> dict[str, Any]:
        """The card for places that only describe the model (GeoTIFF tags, STAC): params
        longer than ``limit`` characters of JSON (rcf's filters) are left out, named in
        ``omitted_params``; their sha256 stays where the model records one."""
        import json

        card = self.to_dict()
        kept, omitted = {}, []
        for key, value in card["params"].items():
            if len(json.dumps(value, default=str)) > limit:
                omitted.append(key)
            else:
                kept[key] = value
        card["params"] = kept
        if omitted:
            card["omitted_params"] = omitted
        return card

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown model card fields {unknown}; is this from a newer xclay?")
        return cls(**data)
