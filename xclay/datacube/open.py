"""Opening datacube stores lazily (host arrays, or GPU arrays through kvikIO), and the
xarray backend that does it (``xr.open_dataset(store, engine="xclay")``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import Any

import xarray as xr
from xarray.backends import BackendEntrypoint

from xclay.completion import is_complete, read_metadata
from xclay.datacube.source import Device, Engine, StoreArray
from xclay.datacube.store import GDAL_CRS_ATTR, INTEGRITY_ATTR
from xclay.datacube.validate import validate_datacube
from xclay.errors import DatacubeError, DataIntegrityError, DataIntegrityWarning
from xclay.storage import Location, StorageOptions, Where, location

#: The variables whose data is a :class:`~xclay.datacube.source.StoreArray`.
STORE_BACKED = ("pixels", "quality")


class DatacubeBackend(BackendEntrypoint):
    r"""xarray's backend for xclay datacubes: ``xr.open_dataset(store, engine="xclay")``.

    The store is opened as xarray's Zarr backend opens it (coordinates, attributes, time
    decoding), but ``pixels`` are never masked into floats, and ``pixels`` and ``quality``
    are lazily indexed :class:`~xclay.datacube.source.StoreArray`\ s: they carry their
    store and chunk layout, read on the host through zarr-python or, with
    ``device="cuda"``, into GPU memory through the batch path's kvikIO reader. Checks of
    the datacube convention are :func:`open_datacube`'s.
    """

    description = "xclay datacubes (Zarr v3): pixels and quality backed by their chunk layout"
    url = "https://xclay.readthedocs.io/en/latest/api.html"

    def open_dataset(  # type: ignore[override]
        self,
        filename_or_obj: str | os.PathLike[Any] | Location,
        *,
        drop_variables: str | Iterable[str] | None = None,
        device: Device = "host",
        storage_options: StorageOptions | None = None,
    ) -> xr.Dataset:
        store = location(filename_or_obj, storage_options)
        cube = xr.open_dataset(
            store.zarr_store(read_only=True),
            engine="zarr",
            chunks=None,
            cache=False,
            consolidated=False,
            zarr_format=3,
            mask_and_scale={"pixels": False},
            drop_variables=drop_variables,
        )
        for name in STORE_BACKED:
            if name not in cube.data_vars:
                continue
            array = StoreArray.open(store / name, device)
            if array.dtype != cube[name].dtype or array.shape != cube[name].shape:
                continue  # xarray decoded it (a mask into floats): its own reads stay
            data = xr.core.indexing.LazilyIndexedArray(array)
            cube[name] = cube[name].copy(data=data)
        result: xr.Dataset = cube
        return result

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        return False  # Zarr stores are xarray's own; asked for by name only


def open_datacube(
    path: Where, *, engine: Engine = "zarr", storage_options: StorageOptions | None = None
) -> xr.Dataset:
    """Open a datacube Zarr lazily: nothing is read until pixels are used.

    Parameters
    ----------
    path
        A store written by :func:`write_datacube`: a path, or a URL (``s3://``,
        ``gs://``, ``az://``, ``https://``).
    engine
        ``"zarr"``: host (NumPy) arrays. ``"kvikio"``: ``pixels`` and
        ``quality`` read into GPU memory through kvikIO (GPUDirect Storage
        where the system has it) as CuPy arrays, basic slices only; embedding
        such a cube on a CUDA device reads whole batches of chip chunks
        straight into GPU memory and decodes zstd there (:mod:`xclay.datacube.gpuchunks`).
        Needs CUDA and ``xclay[gpu]``. ``"auto"``: kvikio where it can run,
        else zarr.
    storage_options
        Settings for object storage beyond the environment (:func:`xclay.storage.location`).
    """
    resolved = _resolve_engine(engine)
    store = location(path, storage_options)
    if not (store / "zarr.json").is_file():
        raise FileNotFoundError(
            f"no datacube at {store}: expected a Zarr v3 store written by xclay.write_datacube."
        )
    read_metadata(store)
    if not is_complete(store):
        raise DatacubeError(
            f"the datacube at {store} is incomplete (a run was interrupted while writing it); "
            "resume the run (xclay run SPEC) or rewrite it."
        )
    # Never mask pixels into floats: nodata stays a value, named in pixels.attrs["nodata"].
    try:
        cube = xr.open_dataset(
            str(store),
            engine=DatacubeBackend,
            chunks=None,
            device="cuda" if resolved == "kvikio" else "host",
            storage_options=store.options,
        )
    except (ValueError, KeyError, TypeError) as err:  # a damaged zarr.json, in any of its forms
        raise DataIntegrityError(
            f"the datacube at {store} cannot be opened ({type(err).__name__}: {err}); its "
            "metadata (zarr.json) is damaged. Rewrite the datacube."
        ) from err
    if "pixels" not in cube.data_vars:
        what = "an embeddings Zarr" if "embedding" in cube.data_vars else "a Zarr store"
        raise DatacubeError(
            f"{store} is {what} without pixels, not a datacube; give the datacube Zarr (written "
            "by xclay.write_datacube, xclay ingest or a run: <outputs.dir>/cube.zarr)."
        )
    validate_datacube(cube)
    unchecked = []
    for name in ("pixels", "quality"):
        if name not in cube.data_vars:
            continue
        cube[name].attrs.pop(GDAL_CRS_ATTR, None)
        integrity = cube[name].attrs.pop(INTEGRITY_ATTR, None)
        cube[name].encoding[INTEGRITY_ATTR] = integrity
        if not integrity:
            unchecked.append(name)
    if unchecked:
        warnings.warn(
            f"the datacube at {store} was written without chunk checksums (by an earlier xclay "
            f"or another tool): damage to {' and '.join(unchecked)} cannot be detected, and a lost chunk "
            "reads as its fill value. Rewrite it with xclay.write_datacube to check every read.",
            DataIntegrityWarning,
            stacklevel=2,
        )
    result: xr.Dataset = cube
    return result


def _resolve_engine(engine: str) -> str:
    if engine not in ("auto", "zarr", "kvikio"):
        raise DatacubeError(f"engine must be 'auto', 'zarr' or 'kvikio', got {engine!r}.")
    from xclay.datacube import gpu

    if engine == "auto":
        return "kvikio" if gpu.kvikio_usable() else "zarr"
    if engine == "kvikio":
        gpu.require_kvikio()
    return engine
