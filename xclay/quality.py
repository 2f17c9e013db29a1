"""Per-chip quality: the fraction of each pixel class, and the filters that decide which
chips are embedded.

Fractions come from the datacube's ``quality`` classes (:mod:`xclay.masks`:
Sentinel-2 SCL, Landsat QA_PIXEL) and from pixel validity (nodata). A
:class:`QualityFilter` holds the thresholds a run applies; a chip is skipped
for the first threshold it fails, in the order nodata, cloud, cloud shadow,
haze, snow, clear, and the run counts the skips per reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from xclay.errors import ConfigError
from xclay.masks import PixelClass
from xclay.settings import Setting, check_fields, declared

__all__ = ["SKIP_REASONS", "ChipQuality", "QualityFilter"]

# Why a chip was not embedded, in the order the filters are checked.
SKIP_REASONS = ("nodata", "cloud", "cloud_shadow", "haze", "snow", "clear")
_MAX_CLASSES = {
    "max_cloud": PixelClass.CLOUD,
    "max_cloud_shadow": PixelClass.CLOUD_SHADOW,
    "max_haze": PixelClass.HAZE,
    "max_snow": PixelClass.SNOW,
}


def _fraction(default: float, doc: str) -> Setting:
    return Setting(default, doc, unit="fraction 0..1", low=0.0, high=1.0, metavar="F")


@dataclass(frozen=True)
class QualityFilter:
    """Which chips to embed, by their pixel-class fractions (each within 0..1).

    The class thresholds need a datacube with a ``quality`` variable
    (:func:`xclay.ingest.from_stac` with a mask); at their defaults (1, 1, 1,
    1 and 0) they let every chip through.

    Parameters
    ----------
    max_nodata
        Skip chips with a larger fraction of nodata pixels (a chip that is all
        nodata is always skipped).
    max_cloud, max_cloud_shadow, max_haze, max_snow
        Skip chips with a larger fraction of cloud, cloud shadow, haze (thin
        cirrus) or snow/ice pixels.
    min_clear
        Skip chips with a smaller fraction of clear pixels.
    """

    max_nodata: float = declared(_fraction(0.5, "skip chips with more nodata"))
    max_cloud: float = declared(_fraction(1.0, "skip chips with more cloud"))
    max_cloud_shadow: float = declared(_fraction(1.0, "skip chips with more cloud shadow"))
    max_haze: float = declared(_fraction(1.0, "skip chips with more haze (thin cirrus)"))
    max_snow: float = declared(_fraction(1.0, "skip chips with more snow or ice"))
    min_clear: float = declared(_fraction(0.0, "skip chips with fewer clear pixels"))

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def of(cls, value: QualityFilter | Mapping[str, float] | None) -> QualityFilter:
        """A filter from itself, a mapping of thresholds (the run spec's ``quality``), or None
        (the defaults)."""
        if value is None:
            return cls()
        if isinstance(value, QualityFilter):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"quality must be a QualityFilter or a mapping of thresholds, got "
                f"{type(value).__name__}."
            )
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise ConfigError(
                f"unknown quality threshold(s) {unknown}; allowed: {', '.join(allowed)}."
            )
        return cls(**{k: float(v) for k, v in value.items()})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def uses_classes(self) -> bool:
        """Whether any threshold needs the cube's quality classes."""
        return self.min_clear > 0.0 or any(getattr(self, n) < 1.0 for n in _MAX_CLASSES)

    def reason(self, nodata_fraction: float, class_fraction: np.ndarray | None) -> int:
        """Index into :data:`SKIP_REASONS` of why a chip is skipped, or -1 if it is embedded.

        ``class_fraction`` is the chip's fraction of each :class:`PixelClass`
        (None: unknown, which passes the class thresholds).
        """
        if nodata_fraction >= 1.0 or nodata_fraction > self.max_nodata:
            return 0
        if class_fraction is None:
            return -1
        for k, (name, cls) in enumerate(_MAX_CLASSES.items(), start=1):
            if class_fraction[cls] > getattr(self, name):
                return k
        if class_fraction[PixelClass.CLEAR] < self.min_clear:
            return len(SKIP_REASONS) - 1
        return -1

    def reasons(self, quality: ChipQuality) -> np.ndarray:
        """Per chip of a block: the index into :data:`SKIP_REASONS` of why it was skipped,
        -1 where it passed (or was not scanned)."""
        return self.reasons_of(quality.nodata_fraction, quality.class_fraction)

    def reasons_of(
        self, nodata_fraction: np.ndarray, class_fraction: np.ndarray | None
    ) -> np.ndarray:
        """:meth:`reason` for many chips at once: ``nodata_fraction`` ``[...]`` and
        ``class_fraction`` ``[..., classes]`` (None, or NaN: unknown, which passes the class
        thresholds); -1 where a chip passes, or was not scanned (NaN nodata fraction)."""
        nodata = np.asarray(nodata_fraction)
        failed = [(nodata >= 1.0) | (nodata > self.max_nodata)]
        if class_fraction is not None:  # NaN (unknown) compares False: passes
            failed += [
                class_fraction[..., cls] > getattr(self, n) for n, cls in _MAX_CLASSES.items()
            ]
            failed.append(class_fraction[..., PixelClass.CLEAR] < self.min_clear)
        out = np.full(nodata.shape, -1, dtype=np.int8)
        for k in reversed(range(len(failed))):  # the first failed check wins
            out[failed[k]] = k
        out[np.isnan(nodata)] = -1
        return out

    def skip_counts(self, quality: ChipQuality) -> dict[str, int]:
        """``chips_skipped_<reason>`` for every reason, over a block."""
        reasons = self.reasons(quality)
        return {
            f"chips_skipped_{name}": int((reasons == k).sum())
            for k, name in enumerate(SKIP_REASONS)
        }


@dataclass
class ChipQuality:
    """Per-chip quality of a block of chips, filled in as chips are read.

    :meth:`empty` makes one for a block, every fraction NaN (not scanned).

    Attributes
    ----------
    nodata_fraction
        ``[time, rows, cols]`` float32, the block's shape: each chip's fraction of
        invalid pixels (nodata, non-finite, quality class nodata, or past the raster).
        NaN until the chip is scanned.
    class_fraction
        ``[time, rows, cols, classes]`` float32: each chip's fraction of each
        :class:`~xclay.masks.PixelClass`, indexed by the class's value; NaN until the
        chip is scanned. None when the cube has no quality variable.
    """

    nodata_fraction: np.ndarray
    class_fraction: np.ndarray | None

    @classmethod
    def empty(cls, shape: tuple[int, int, int], *, with_classes: bool) -> ChipQuality:
        return cls(
            np.full(shape, np.nan, dtype=np.float32),
            np.full((*shape, len(PixelClass)), np.nan, dtype=np.float32) if with_classes else None,
        )

    def fraction(self, cls: PixelClass) -> np.ndarray:
        """``[time, rows, cols]`` fraction of one class (NaN: unknown or not scanned)."""
        if self.class_fraction is None:
            return np.full(self.nodata_fraction.shape, np.nan, dtype=np.float32)
        return self.class_fraction[..., cls]
