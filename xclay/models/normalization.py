"""Per-band normalisation ``(value - mean) / std``: from the sensor table,
measured on the cube, or given by the user. Recorded in the model card."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from xclay.errors import ModelError
from xclay.sensors import get_sensor

if TYPE_CHECKING:
    from xclay.protocols import InputSpec, Sampler

__all__ = ["Normalization", "measure_normalization", "resolve_normalization"]

MEASURE_CHIPS = 32


@dataclass(frozen=True)
class Normalization:
    """Mean and std per band name, and where they came from.

    Attributes
    ----------
    bands
        Band names.
    mean, std
        One value per band, in the order of ``bands``, in the units of the cube's
        pixels; every std finite and positive.
    source
        Where they came from: ``"sensor-table:<platform>"``, ``"measured"`` or
        ``"user"`` (or the source a model card records).
    """

    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def __post_init__(self) -> None:
        if not (len(self.bands) == len(self.mean) == len(self.std)):
            raise ModelError("normalisation needs one mean and one std per band.")
        bad = [
            b for b, s in zip(self.bands, self.std, strict=True) if not (np.isfinite(s) and s > 0)
        ]
        if bad:
            raise ModelError(f"normalisation std must be positive; bands {bad} are not.")

    def arrays(self, bands: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and std as float64 arrays in the order of ``bands``."""
        self.check_bands(bands, what="normalisation")
        index = {b: i for i, b in enumerate(self.bands)}
        mean = np.array([self.mean[index[b]] for b in bands], dtype=np.float64)
        std = np.array([self.std[index[b]] for b in bands], dtype=np.float64)
        return mean, std

    def check_bands(self, bands: Sequence[str], *, what: str) -> None:
        missing = [b for b in bands if b not in self.bands]
        if missing:
            raise ModelError(
                f"the {what} covers bands {list(self.bands)}, not the cube's {missing}; "
                "embed cubes with the same bands, or refit without a checkpoint."
            )

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {
            b: {"mean": m, "std": s}
            for b, m, s in zip(self.bands, self.mean, self.std, strict=True)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, Any]], source: str) -> Normalization:
        bands = tuple(data)
        return cls(
            bands=bands,
            mean=tuple(float(data[b]["mean"]) for b in bands),
            std=tuple(float(data[b]["std"]) for b in bands),
            source=source,
        )


def resolve_normalization(
    request: str | Mapping[str, tuple[float, float]],
    spec: InputSpec,
    sample: Sampler,
    seed: int,
) -> Normalization:
    """The normalisation of a cube's bands, as an encoder's ``normalization=`` asks.

    Parameters
    ----------
    request
        ``"auto"``: the sensor table for a known platform whose bands it lists, else
        measured; ``"sensor"``: the sensor table (error if the platform or a band is
        not in it); ``"measured"``; or a user mapping ``band -> (mean, std)`` covering
        every band. Constants from the sensor table are refused for a cube in other units.
    spec
        The cube's :class:`~xclay.protocols.InputSpec`: its platform and band names.
    sample
        Draws the cube's sample chips, ``sample(n, seed)``; used to measure, and to
        check the units of the sensor table's constants.
    seed
        Seed of the sample chips drawn (up to 32 of them).
    """
    if isinstance(request, Mapping):
        missing = [b for b in spec.bands if b not in request]
        if missing:
            raise ModelError(f"normalization= gives no (mean, std) for bands {missing}.")
        return Normalization(
            bands=spec.bands,
            mean=tuple(float(request[b][0]) for b in spec.bands),
            std=tuple(float(request[b][1]) for b in spec.bands),
            source="user",
        )
    if request not in ("auto", "sensor", "measured"):
        raise ModelError(
            f"normalization must be 'auto', 'sensor', 'measured' or a mapping band -> (mean, std), "
            f"got {request!r}."
        )
    if request in ("auto", "sensor") and spec.platform:
        sensor = get_sensor(spec.platform)
        if all(b in sensor.band_names for b in spec.bands):
            norm = Normalization(
                bands=spec.bands,
                mean=tuple(sensor.band(b).mean for b in spec.bands),
                std=tuple(sensor.band(b).std for b in spec.bands),
                source=f"sensor-table:{spec.platform}",
            )
            check_units(norm, spec, sample(MEASURE_CHIPS, seed))
            return norm
    if request == "sensor":
        raise ModelError(
            f"normalization='sensor' needs a platform from the sensor table with bands "
            f"{list(spec.bands)}; the cube's platform is {spec.platform!r}. Use 'auto' or 'measured'."
        )
    return measure_normalization(spec.bands, sample(MEASURE_CHIPS, seed))


# A cube whose values are 10x smaller (or larger) than a sensor's typical values is in
# other units (8-bit, reflectance 0-1, scaled twice): normalising it with that sensor's
# constants would feed the model inputs it never saw.
UNITS_FACTOR = 10.0


def check_units(norm: Normalization, spec: InputSpec, chips: Any) -> None:
    """Refuse sample ``chips`` whose values are not in the units ``norm`` expects: their
    99th percentile over all bands against the bands' typical values (mean + std)."""
    pixels = chips.pixels.numpy()
    valid = chips.valid.numpy()
    if not valid.any():
        return
    values = np.moveaxis(pixels, 1, -1)[valid].astype(np.float64)  # [P, C]
    finite = values[np.isfinite(values).all(axis=1)]
    if finite.size == 0:
        return
    high = float(np.percentile(np.abs(finite), 99))
    low = float(np.percentile(np.abs(finite), 50))
    mean, std = norm.arrays(spec.bands)
    typical = mean + std
    if high * UNITS_FACTOR < float(typical.min()) or low > UNITS_FACTOR * float(typical.max()):
        bigger = low > UNITS_FACTOR * float(typical.max())
        raise ModelError(
            f"the cube's pixels ({spec.dtype}, 99th percentile {high:g}, median {low:g}) are "
            f"{'over' if bigger else 'under'} a tenth of what the {spec.platform} normalisation "
            f"expects (typical values {float(typical.min()):g}-{float(typical.max()):g}): the "
            "data are not in that sensor's units (8-bit? reflectance in 0-1? scaled twice?). "
            "Convert them to the sensor's digital numbers (e.g. reflectance x 10000 for "
            "Sentinel-2 L2A), or embed them without platform= (normalisation measured on the "
            "cube), or give normalization= explicitly."
        )


def measure_normalization(bands: Sequence[str], chips: Any) -> Normalization:
    """Per-band mean and std over the valid pixels of sample ``chips``.

    A band that is constant gets std 1 (centred, not scaled).

    Parameters
    ----------
    bands
        Band names, in the order of the chips' band axis.
    chips
        A :class:`~xclay.protocols.ChipBatch` of sample chips: ``pixels``
        ``[N, C, H, W]`` and ``valid`` ``[N, H, W]``; it needs some valid pixels.
    """
    pixels = chips.pixels.numpy().astype(np.float64)  # [N, C, H, W]
    valid = chips.valid.numpy()  # [N, H, W]
    if not valid.any():
        raise ModelError(
            "cannot measure normalisation: the sample chips have no valid pixels (all nodata)."
        )
    values = np.moveaxis(pixels, 1, -1)[valid]  # [P, C]
    mean = values.mean(axis=0)
    std = values.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant band: centre it, do not divide by zero
    return Normalization(
        bands=tuple(bands),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        source="measured",
    )
