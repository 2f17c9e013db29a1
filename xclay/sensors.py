"""Sensor constants the Clay v1.5 encoder was trained with, kept as data.

The table (``data/clay-sensors.yaml``) gives per platform the band names, the
ground sample distance, and per band the normalisation mean/std (applied to
raw digital numbers), the physical central wavelength in micrometres (what a
datacube's ``wavelength`` coordinate holds), and where Clay v1.5 was trained
with other values (MODIS in nanometres, Sentinel-1 placeholders), the value
Clay expects (``clay_wavelength``): a quirk of that model, not of the data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from xclay.errors import DatacubeError

__all__ = ["Band", "Sensor", "get_sensor", "list_platforms"]


@dataclass(frozen=True)
class Band:
    """One band of a known platform.

    Attributes
    ----------
    name
        The band's name in the sensor table (and in a datacube's ``band`` coordinate).
    wavelength
        The physical central wavelength, in micrometres: what a datacube's
        ``wavelength`` coordinate holds.
    mean, std
        The normalisation Clay v1.5 was trained with, in the units of the band's stored
        values (raw digital numbers for optical bands): the encoder is fed
        ``(value - mean) / std``.
    clay_wavelength
        The wavelength Clay v1.5 was trained with for this band (nanometres for MODIS,
        placeholders for Sentinel-1); the physical one where the table gives no other.
    """

    name: str
    wavelength: float  # micrometres, physical
    mean: float
    std: float
    clay_wavelength: float  # what Clay v1.5 was trained with for this band (its quirk)


@dataclass(frozen=True)
class Sensor:
    """A platform from the sensor table.

    Attributes
    ----------
    platform
        The platform's key in the sensor table (e.g. ``"sentinel-2-l2a"``).
    gsd
        Ground sample distance in metres.
    bands
        The platform's bands, in the table's order.
    rgb_bands
        Names of the red, green and blue bands (for thumbnails); None for a platform
        without them (Sentinel-1, MODIS).
    """

    platform: str
    gsd: float
    bands: tuple[Band, ...]
    rgb_bands: tuple[str, ...] | None

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def band(self, name: str) -> Band:
        for b in self.bands:
            if b.name == name:
                return b
        raise DatacubeError(
            f"platform {self.platform!r} has no band {name!r}; its bands are "
            f"{', '.join(self.band_names)}. Rename the cube's bands to these names, or pass "
            "wavelengths= and no platform."
        )


@functools.cache
def _table() -> dict[str, Any]:
    text = resources.files("xclay").joinpath("data/clay-sensors.yaml").read_text("utf-8")
    table: dict[str, Any] = yaml.safe_load(text)
    return table


def list_platforms() -> list[str]:
    """Names of the platforms in the sensor table."""
    return sorted(_table())


@functools.cache
def get_sensor(platform: str) -> Sensor:
    """The sensor-table entry for ``platform`` (e.g. ``"sentinel-2-l2a"``).

    Parameters
    ----------
    platform
        A platform key of the sensor table (:func:`list_platforms`), spelt exactly; any
        other is a :class:`~xclay.errors.DatacubeError`.
    """
    table = _table()
    if platform not in table:
        raise DatacubeError(
            f"unknown platform {platform!r}; known platforms: {', '.join(list_platforms())}. "
            "For another sensor pass wavelengths= (micrometres) instead of platform=."
        )
    entry = table[platform]
    bands = tuple(
        Band(
            name=name,
            wavelength=float(b["wavelength"]),
            mean=float(b["mean"]),
            std=float(b["std"]),
            clay_wavelength=float(b.get("clay_wavelength", b["wavelength"])),
        )
        for name, b in entry["bands"].items()
    )
    rgb = entry.get("rgb_bands")
    return Sensor(
        platform=platform,
        gsd=float(entry["gsd"]),
        bands=bands,
        rgb_bands=tuple(rgb) if rgb else None,
    )
