"""Completion of Zarr stores, datacubes and embeddings alike: a store is complete once
marked so (with its final attributes and consolidated metadata); one cut short is not."""

from __future__ import annotations

from typing import Any

from xclay._json import jsonable
from xclay.errors import DataIntegrityError
from xclay.storage import Where, location

COMPLETE_ATTR = "xclay_complete"


def mark_complete(path: Where, **attrs: Any) -> None:
    """Flag a store (datacube or embeddings) as complete, with final attributes, and
    consolidate its metadata (``xr.open_zarr`` then opens it without a warning, and
    without listing every array on object storage).

    Parameters
    ----------
    path
        The Zarr v3 store (its root group; a path or URL), which must exist and be
        writable.
    **attrs
        Final attributes to add to the root group's (NumPy values and tuples are made
        JSON types); existing attributes of other names are kept.
    """
    import zarr

    store = location(path).zarr_store()
    group = zarr.open_group(store, mode="r+", zarr_format=3)
    group.attrs.update(jsonable({**attrs, COMPLETE_ATTR: True}))
    consolidate(path)


def consolidate(path: Where) -> None:
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
        zarr.consolidate_metadata(location(path).zarr_store(), zarr_format=3)


def read_metadata(store: Where) -> dict[str, Any]:
    """A store's root ``zarr.json``; a damaged one is a :class:`DataIntegrityError` naming it.

    A missing ``zarr.json`` is not caught: it raises :class:`FileNotFoundError`.

    Parameters
    ----------
    store
        The store (a path or URL).

    Returns
    -------
    dict
        The parsed ``zarr.json`` (its ``attributes``, and the consolidated metadata
        where there is some).
    """
    import json

    meta = location(store) / "zarr.json"
    try:
        data: dict[str, Any] = json.loads(meta.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise DataIntegrityError(
            f"{meta} is not valid JSON ({err}); the store's metadata is damaged. Rewrite it."
        ) from err
    return data


def is_complete(path: Where) -> bool:
    """Whether a store exists and was marked complete; a store without the mark (for
    instance one whose creation was cut short) is not.

    Parameters
    ----------
    path
        The store (a path or URL). No store, no root ``zarr.json``, or one that cannot be
        read or parsed: False, never an error (a store that cannot be reached at all
        raises its :class:`~xclay.errors.StorageError`).
    """
    import json

    meta = location(path) / "zarr.json"
    try:
        attrs = json.loads(meta.read_bytes()).get("attributes", {})
    except FileNotFoundError:
        return False
    except (ValueError, UnicodeDecodeError, IsADirectoryError, NotADirectoryError):
        return False
    return attrs.get(COMPLETE_ATTR) is True
