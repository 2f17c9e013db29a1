"""Where a datacube variable's data lives, and the engines that may read it: in memory, its
Zarr array read unchanged (direct chunk reads), or only through xarray.

A variable :func:`~xclay.datacube.open_datacube` opens is backed by a :class:`StoreArray`:
xarray's lazily indexed backend array that carries the variable's store and chunk layout.
Indexing it composes a selection without reading; the batch path reads chunk files
directly only while that selection is the whole array (:func:`store_array`), so no
record beside the data (an encoding, a fingerprint of coordinates) can go stale.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.core import indexing
from zarr.core.metadata.v3 import ArrayV3Metadata

from xclay.datacube.chunks import ArrayLayout, TileReader, host_tiles, read_region
from xclay.errors import UnsupportedLayout
from xclay.storage import Location

Engine = Literal["auto", "zarr", "kvikio"]

#: Where a :class:`StoreArray`'s reads land: host (NumPy) or GPU (CuPy) memory.
Device = Literal["host", "cuda"]


class StoreArray(BackendArray):
    """A datacube variable's Zarr array, read lazily: the backend array behind the
    ``pixels`` and ``quality`` of a cube opened by :func:`~xclay.datacube.open_datacube`
    (and ``xr.open_dataset(store, engine="xclay")``).

    On the host, reads go through zarr-python (any indexing xarray asks for). In GPU
    memory (``device="cuda"``), a read takes the whole chunks it touches through the batch
    path's own GPU reader (kvikIO into device buffers, nvCOMP decode:
    :func:`xclay.datacube.gpuchunks.device_tiles`) and cuts the selection there; layouts
    that reader does not cover are read on the host and copied up once.

    Parameters
    ----------
    location
        The array's directory in its store.
    shape, dtype
        The array's, as zarr-python reads it.
    layout
        Its chunk layout, for direct chunk reads; None where xclay's chunk reads do not
        cover it (``unsupported`` says why): zarr-python then reads it.
    device
        Where reads land.
    unsupported
        Why the array has no layout (an :class:`~xclay.errors.UnsupportedLayout`'s words).
    """

    def __init__(
        self,
        location: Location,
        shape: tuple[int, ...],
        dtype: Any,
        layout: ArrayLayout | None,
        device: Device = "host",
        unsupported: str = "",
    ) -> None:
        self.location = location
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.layout = layout
        self.device: Device = device
        self.unsupported = unsupported
        self._local = threading.local()  # the zarr array and the GPU reader: per thread

    @classmethod
    def open(cls, where: Location, device: Device = "host") -> StoreArray:
        """The array at ``where``: its layout read from its metadata, if xclay reads it."""
        import zarr

        array = zarr.open_array(where.zarr_store(read_only=True), mode="r", zarr_format=3)
        layout: ArrayLayout | None = None
        unsupported = "not a Zarr v3 array"
        if isinstance(array.metadata, ArrayV3Metadata):
            try:
                layout, unsupported = ArrayLayout.from_metadata(where, array.metadata), ""
            except UnsupportedLayout as err:
                unsupported = str(err)
        made = cls(where, array.shape, array.dtype, layout, device, unsupported)
        made._local.zarr = array
        return made

    def __getstate__(self) -> dict[str, Any]:
        keep = ("location", "shape", "dtype", "layout", "device", "unsupported")
        return {name: getattr(self, name) for name in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def chunk_layout(self) -> ArrayLayout:
        """The layout for direct chunk reads; :class:`~xclay.errors.UnsupportedLayout`
        (saying why) where there is none."""
        if self.layout is None:
            raise UnsupportedLayout(self.unsupported or "no chunk layout")
        return self.layout

    def __getitem__(self, key: indexing.ExplicitIndexer) -> Any:
        support = (
            indexing.IndexingSupport.OUTER
            if self.device == "host"
            else indexing.IndexingSupport.BASIC
        )
        return indexing.explicit_indexing_adapter(key, self.shape, support, self._read)

    def _read(self, key: tuple[Any, ...]) -> Any:
        if self.device == "host":
            array = self._zarr()
            basic = all(isinstance(k, int | np.integer | slice) for k in key)
            return array[key] if basic else array.oindex[key]
        return self._read_device(key)

    def _zarr(self) -> Any:
        array = getattr(self._local, "zarr", None)
        if array is None:
            import zarr

            store = self.location.zarr_store(read_only=True)
            array = zarr.open_array(store, mode="r", zarr_format=3)
            self._local.zarr = array
        return array

    def _read_device(self, key: tuple[Any, ...]) -> Any:
        import cupy

        tiles = self._device_tiles()
        if tiles is None:  # a layout the GPU route does not read: zarr on the host, copied up
            return cupy.asarray(self._zarr()[key])
        return read_region(self.chunk_layout(), key, tiles, cupy.empty)

    def _device_tiles(self) -> TileReader | None:
        """This thread's GPU reader of whole chunks, made on first use; None where the GPU
        route does not read the layout."""
        if not hasattr(self._local, "tiles"):
            from xclay.datacube.gpuchunks import device_tiles

            try:
                self._local.tiles = device_tiles(self.chunk_layout())
            except UnsupportedLayout:
                self._local.tiles = None
        tiles: TileReader | None = self._local.tiles
        return tiles

    def read_host_tiles(self, key: tuple[Any, ...]) -> np.ndarray:
        """``array[key]`` (integers and slices) read as the GPU route reads it, whole
        chunks assembled, but into host memory: the GPU route's CPU twin."""
        layout = self.chunk_layout()
        result: np.ndarray = read_region(layout, key, host_tiles(layout), np.empty)
        return result


def store_array(da: xr.DataArray) -> StoreArray | None:
    """The :class:`StoreArray` a variable still reads unchanged (the whole array, in its
    order: no selection, transpose or computation applied, nothing loaded), or None: then
    only xarray knows how to read it.

    Parameters
    ----------
    da
        A variable of a datacube: ``pixels`` or ``quality``. Nothing of it is read.
    """
    data = _backend_data(da.variable)
    while isinstance(data, indexing.MemoryCachedArray | indexing.CopyOnWriteArray):
        data = data.array
    if type(data) is not indexing.LazilyIndexedArray or not isinstance(data.array, StoreArray):
        return None
    array = data.array
    whole = len(data.key.tuple) == len(array.shape) and all(
        isinstance(k, slice) and range(*k.indices(n)) == range(n)
        for k, n in zip(data.key.tuple, array.shape, strict=True)
    )
    return array if whole and tuple(da.shape) == array.shape else None


def store_location(da: xr.DataArray) -> Location | None:
    """As :func:`store_array`: the variable's Zarr array as a
    :class:`~xclay.storage.Location` (a local path or a place on object storage, with the
    storage options it was opened with), or None.

    Parameters
    ----------
    da
        A variable of a datacube: ``pixels`` or ``quality``. Nothing of it is read.
    """
    array = store_array(da)
    return array.location if array is not None else None


def store_source(da: xr.DataArray) -> str | None:
    """As :func:`store_location`: the path (or, on object storage, the URL) of the
    variable's Zarr array (a directory of the store), or None.

    Parameters
    ----------
    da
        A variable of a datacube: ``pixels`` or ``quality``. Nothing of it is read.
    """
    where = store_location(da)
    return str(where) if where is not None else None


def in_memory(pixels: xr.DataArray) -> bool:
    """True when the pixels are a NumPy array already (``.data`` would load lazy arrays).

    Parameters
    ----------
    pixels
        Any DataArray (a datacube's ``pixels``, usually); nothing of it is loaded. Lazily
        opened, dask and CuPy data are not in memory in this sense.
    """
    return isinstance(_backend_data(pixels.variable), np.ndarray)


def memory_array(da: xr.DataArray) -> np.ndarray | None:
    """The variable's NumPy array itself when it is in memory (:func:`in_memory`), without
    a copy; None otherwise.

    Parameters
    ----------
    da
        Any DataArray; nothing of it is loaded.
    """
    data = _backend_data(da.variable)
    return data if isinstance(data, np.ndarray) else None


def _backend_data(variable: xr.Variable) -> Any:
    """What a variable wraps, unread. The one place xclay looks under xarray's public API:
    ``Variable.data`` would load a lazily indexed array, and xarray offers no public way
    to reach a variable's backend array (pydata/xarray#11393)."""
    return variable._data
