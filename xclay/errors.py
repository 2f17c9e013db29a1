"""Every error xclay raises on purpose.

Each class also inherits the built-in exception a caller would naturally
catch (``ValueError``, ``FileNotFoundError``, ...), so ``except ValueError``
keeps working. Messages say what was wrong and what to do next.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ChunkingError",
    "ConfigError",
    "DataIntegrityError",
    "DataIntegrityWarning",
    "DataPathWarning",
    "DatacubeError",
    "DeviceError",
    "IngestError",
    "LabelError",
    "MissingDependencyError",
    "ModelError",
    "OutputError",
    "OutputExistsError",
    "PluginWarning",
    "PrecisionWarning",
    "RunStateError",
    "SpecError",
    "StorageError",
    "UnsupportedLayout",
    "XClayError",
    "XClayWarning",
]


class XClayError(Exception):
    """Base class of all xclay errors."""


class ConfigError(XClayError, ValueError):
    """A setting that is not allowed (batch size, precision, engine, quality thresholds,
    chip grid): names the setting, what was given and what is allowed."""


class SpecError(ConfigError):
    """A run spec that is malformed: names the file, the field and what is allowed."""


class IngestError(XClayError, ValueError):
    """STAC items that cannot make the requested datacube."""


class LabelError(XClayError, ValueError):
    """Labels that cannot be joined to chips or fitted: a file without a CRS, a missing
    column, no label inside the chip grid, too few labels or classes to check a model."""


class RunStateError(XClayError, ValueError):
    """A run's outputs that cannot be resumed with this spec."""


class UnsupportedLayout(XClayError):
    """A store's layout that direct chunk reads do not handle: read it through zarr
    (callers catch it and fall back, saying so)."""


class DatacubeError(XClayError, ValueError):
    """A datacube does not follow the convention (dims, CRS, bands, dtype)."""


class ChunkingError(DatacubeError):
    """A datacube's chunks do not line up with the requested chip grid."""


class ModelError(XClayError, ValueError):
    """An unknown model, or a model asked to do something it cannot."""


class CheckpointError(XClayError, ValueError):
    """A checkpoint that is missing, corrupt, or for another model."""


class DataIntegrityError(XClayError, OSError):
    """Stored data that is damaged: a checksum that does not match, a chunk cut short or
    missing. The message names the file (and byte range) and how to repair it."""


class DeviceError(XClayError, RuntimeError):
    """A device (CUDA GPU) was asked for and is not usable here."""


class MissingDependencyError(XClayError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


class OutputError(XClayError, OSError):
    """Outputs that cannot be written where asked: a read-only folder, a disk too small."""


class OutputExistsError(XClayError, FileExistsError):
    """An output path already exists and overwriting was not asked for."""


class StorageError(XClayError, OSError):
    """A location that cannot be read or written: no such bucket, access denied, no
    credentials, a scheme xclay does not know. The message names the URL and why."""


class XClayWarning(UserWarning):
    """Base class of the warnings xclay gives a user (filter them by this category)."""


class DataPathWarning(XClayWarning):
    """The data path took a slower road than the one asked for (no nvCOMP, no GPUDirect
    Storage, a layout the fast path cannot read); the message says why and what to do."""


class PluginWarning(XClayWarning):
    """A model plug-in (``xclay.models`` entry point) that could not be registered."""


class PrecisionWarning(XClayWarning):
    """A fast precision (bf16, tf32) changed the embeddings more than its gate allows,
    against strict fp32 on sample chips; the model card records the figures."""


class DataIntegrityWarning(XClayWarning):
    """Data that cannot be checked (a datacube written without checksums): damage in it
    would go unnoticed."""
