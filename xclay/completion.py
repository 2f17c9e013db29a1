"""Completion of Zarr stores, datacubes and embeddings alike: a store is complete once
marked so (with its final attributes and consolidated metadata); one cut short is not."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from xclay._json import jsonable
from xclay.errors import DataIntegrityError

COMPLETE_ATTR = "xclay_complete"


def mark_complete(path: str | os.PathLike[str], **attrs: Any) -> None:
    """Flag a store (datacube or embeddings) as complete, with final attributes, and
    consolidate its metadata (``xr.open_zarr`` then opens it without a warning, and
    without listing every array on object storage).

    Parameters
    ----------
    path
        The Zarr v3 store (its root group), which must exist and be writable.
    **attrs
        Final attributes to add to the root group's (NumPy values and tuples are made
        JSON types); existing attributes of other names are kept.
    """
    import zarr

    group = zarr.open_group(path, mode="r+", zarr_format=3)
    group.attrs.update(jsonable({**attrs, COMPLETE_ATTR: True}))
    consolidate(path)


def consolidate(path: str | os.PathLike[str]) -> None:
    """Write a Zarr v3 store's consolidated metadata (zarr-python's extension, which
    readers without it ignore).

    Parameters
    ----------
    path
        The Zarr v3 store: its root ``zarr.json`` gets the metadata of every group and
        array below it.
    """
    import warnings

    import zarr

    with warnings.catch_warnings():  # "not part of the Zarr v3 specification (yet)"
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(str(path), zarr_format=3)


def read_metadata(store: str | os.PathLike[str]) -> dict[str, Any]:
    """A store's root ``zarr.json``; a damaged one is a :class:`DataIntegrityError` naming it.

    A missing ``zarr.json`` is not caught: it raises :class:`FileNotFoundError`.

    Parameters
    ----------
    store
        The store's directory on the local filesystem.

    Returns
    -------
    dict
        The parsed ``zarr.json`` (its ``attributes``, and the consolidated metadata
        where there is some).
    """
    import json

    meta = Path(store) / "zarr.json"
    try:
        data: dict[str, Any] = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataIntegrityError(
            f"{meta} is not valid JSON ({err}); the store's metadata is damaged. Rewrite it."
        ) from err
    return data


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether a store exists and was marked complete; a store without the mark (for
    instance one whose creation was cut short) is not.

    Parameters
    ----------
    path
        The store's directory on the local filesystem. No directory, no root
        ``zarr.json``, or one that cannot be read or parsed: False, never an error.
    """
    meta = Path(path) / "zarr.json"
    if not meta.is_file():
        return False
    import json

    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attrs.get(COMPLETE_ATTR) is True
