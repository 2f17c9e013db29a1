"""Opening datacube stores lazily (host arrays, or GPU arrays through kvikIO)."""

from __future__ import annotations

import warnings

import xarray as xr

from xclay.completion import is_complete, read_metadata
from xclay.datacube.source import STORE_ENCODING, Engine, _coords_fingerprint
from xclay.datacube.store import GDAL_CRS_ATTR, INTEGRITY_ATTR
from xclay.datacube.validate import validate_datacube
from xclay.errors import DatacubeError, DataIntegrityError, DataIntegrityWarning
from xclay.storage import StorageOptions, Where, location


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
        straight into GPU memory and decodes zstd there (:mod:`xclay.batch.gpu`).
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
        cube = xr.open_zarr(
            store.zarr_store(read_only=True),
            chunks=None,
            consolidated=False,
            zarr_format=3,
            mask_and_scale={"pixels": False},
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
        if resolved == "kvikio":
            from xclay.datacube.gpu import gpu_variable

            cube[name] = cube[name].copy(data=gpu_variable(store, name, cube[name]))
        # Where its chunks are, for direct reads (xclay.batch.chunkio) and the GPU path.
        cube[name].encoding[STORE_ENCODING] = {
            "path": str(store / name),
            "location": (store / name).to_dict(),
            "coords": _coords_fingerprint(cube[name]),
        }
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
