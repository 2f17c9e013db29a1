"""The ``.clay`` accessor: a thin facade over xclay's free functions.

Every method is the typed function of the same name with the wrapped object as its
first argument: its signature and documentation are the function's, declared once
(:class:`_OnObject`); the accessor holds nothing but that object.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

import xarray as xr

from xclay.apply.model import fit
from xclay.apply.predict import predict
from xclay.datacube import as_datacube, write_datacube
from xclay.embed import embed
from xclay.explore.search import similar
from xclay.explore.viz import plot_pca, plot_similarity, plot_true_colour
from xclay.outputs.export import to_geoparquet, to_zarr

__all__ = ["ClayDataArrayAccessor", "ClayDatasetAccessor"]

P = ParamSpec("P")
R = TypeVar("R")


class _OnObject(Generic[P, R]):
    """A free function offered as an accessor method: ``ds.clay.f(...)`` is
    ``f(ds, ...)``, with ``f``'s own signature (less its first parameter) and docs."""

    def __init__(self, function: Callable[Concatenate[Any, P], R]) -> None:
        self.function = function
        self.__doc__ = function.__doc__
        self.__name__ = self.__qualname__ = function.__name__
        self.__module__ = function.__module__
        self.__wrapped__ = function
        # On the class it reads as a method: (self, <the function's other parameters>).
        signature = inspect.signature(function)
        own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
        rest = list(signature.parameters.values())[1:]
        self.__signature__ = signature.replace(parameters=[own, *rest])

    def __call__(self, accessor: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        """Called on the class, as a method is: ``ClayDatasetAccessor.embed(ds.clay)``."""
        return self.function(accessor._obj, *args, **kwargs)

    @overload
    def __get__(self, accessor: None, owner: type) -> _OnObject[P, R]: ...

    @overload
    def __get__(self, accessor: object, owner: type) -> Callable[P, R]: ...

    def __get__(self, accessor: object, owner: type) -> _OnObject[P, R] | Callable[P, R]:
        if accessor is None:
            return self
        return functools.partial(self.function, accessor._obj)  # type: ignore[attr-defined]


@xr.register_dataset_accessor("clay")
class ClayDatasetAccessor:
    """``ds.clay``: embed a datacube; write datacubes and embeddings; search and plot them;
    fit a model on embeddings and predict a map.

    Parameters
    ----------
    obj
        The Dataset the accessor is reached from (xarray passes it).
    """

    def __init__(self, obj: xr.Dataset) -> None:
        self._obj = obj

    embed = _OnObject(embed)
    write_datacube = _OnObject(write_datacube)
    to_zarr = _OnObject(to_zarr)
    to_geoparquet = _OnObject(to_geoparquet)

    similar = _OnObject(similar)
    plot_pca = _OnObject(plot_pca)
    plot_similarity = _OnObject(plot_similarity)
    plot_true_colour = _OnObject(plot_true_colour)

    fit = _OnObject(fit)
    predict = _OnObject(predict)


@xr.register_dataarray_accessor("clay")
class ClayDataArrayAccessor:
    """``da.clay``: turn imagery into a datacube, or embed it directly.

    Parameters
    ----------
    obj
        The DataArray the accessor is reached from (xarray passes it).
    """

    def __init__(self, obj: xr.DataArray) -> None:
        self._obj = obj

    as_datacube = _OnObject(as_datacube)
    embed = _OnObject(embed)
