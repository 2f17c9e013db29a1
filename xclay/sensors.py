"""Sensors: each platform one entry (a :class:`Sensor`) in one registry.

xclay's own come from the sensor table: the constants the Clay v1.5 encoder was trained
with, kept as data, and what STAC items of the platform look like.

The table (``data/clay-sensors.yaml``) gives per platform the band names, the
ground sample distance, and per band the normalisation mean/std (applied to
raw digital numbers), the physical central wavelength in micrometres (what a
datacube's ``wavelength`` coordinate holds), and where Clay v1.5 was trained
with other values (MODIS in nanometres, Sentinel-1 placeholders), the value
Clay expects (``clay_wavelength``): a quirk of that model, not of the data; and the STAC
collection ids that hold the platform's items and the mask they carry. Another package
adds a sensor (a :class:`Sensor`) under the ``xclay.sensors`` entry-point group
(:mod:`xclay.plugins`): its bands, wavelengths and normalisation, its collections and its
mask (a :class:`~xclay.masks.MaskKind`, its decoder included) are then known to
ingestion, the datacube convention and the models alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml

from xclay.errors import DatacubeError
from xclay.masks import MASK_KINDS, MaskKind
from xclay.plugins import Registry

__all__ = [
    "SENSORS",
    "Band",
    "Sensor",
    "get_sensor",
    "list_platforms",
    "mask_of",
    "platform_named",
]


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
    collections
        STAC collection ids whose items are this platform's (``sentinel-2-c1-l2a``);
        default none.
    mask
        The mask its items carry, used with ``mask: auto``; default none.
    """

    platform: str
    gsd: float
    bands: tuple[Band, ...]
    rgb_bands: tuple[str, ...] | None
    collections: tuple[str, ...] = ()
    mask: MaskKind | None = None

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


def _adopt(value: Any) -> Sensor:
    if not isinstance(value, Sensor):
        raise TypeError(f"a {type(value).__name__} is not a Sensor")
    return value


#: The sensors (:mod:`xclay.plugins`): the sensor table's and installed ones.
SENSORS: Registry[Sensor] = Registry(
    "platform", "xclay.sensors", _adopt, error=DatacubeError, name_of=lambda s: s.platform
)


def _from_table(platform: str, entry: dict[str, Any]) -> Sensor:
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
        collections=tuple(entry.get("collections", ())),
        mask=MASK_KINDS[entry["mask"]] if entry.get("mask") else None,
    )


def _load_table() -> None:
    text = resources.files("xclay").joinpath("data/clay-sensors.yaml").read_text("utf-8")
    table: dict[str, Any] = yaml.safe_load(text)
    SENSORS.built_in(*(_from_table(name, entry) for name, entry in table.items()))


_load_table()


def list_platforms() -> list[str]:
    """Names of the known platforms: the sensor table's and installed sensors'."""
    return SENSORS.names()


def get_sensor(platform: str) -> Sensor:
    """The sensor of ``platform`` (e.g. ``"sentinel-2-l2a"``).

    Parameters
    ----------
    platform
        A platform key (:func:`list_platforms`), spelt exactly; any other is a
        :class:`~xclay.errors.DatacubeError`.
    """
    if platform not in SENSORS:
        raise DatacubeError(
            f"unknown platform {platform!r}; known platforms: {', '.join(list_platforms())}. "
            "For another sensor pass wavelengths= (micrometres) instead of platform=."
        )
    return SENSORS.get(platform)


def platform_named(name: str | None) -> str | None:
    """The platform a STAC item's ``platform`` property or collection id names: a platform
    key itself, or a collection id a sensor lists; None for any other.

    Parameters
    ----------
    name
        A platform key or a STAC collection id (``sentinel-2-c1-l2a``).
    """
    if not name:
        return None
    if name in SENSORS:
        return name
    return next((s.platform for s in SENSORS.plugins() if name in s.collections), None)


def mask_of(platform: str | None) -> MaskKind | None:
    """The mask a platform's items carry (``mask: auto``), None when it has none or the
    platform is unknown.

    Parameters
    ----------
    platform
        A platform key, or None.
    """
    if not platform or platform not in SENSORS:
        return None
    return SENSORS.get(platform).mask
