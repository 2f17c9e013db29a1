"""Plug-ins: named objects of one kind, built in or installed by another package.

One :class:`Registry` serves every kind xclay lets other packages add to, each with its
entry-point group (as xarray's backends and zarr's codecs are found):

- encoders, ``xclay.models`` (:class:`xclay.models.EncoderPlugin`);
- output formats, ``xclay.exporters`` (:class:`xclay.protocols.Exporter`);
- batch sources, ``xclay.sources`` (:class:`xclay.batch.readers.SourcePlugin`);
- sensors, ``xclay.sensors`` (:class:`xclay.sensors.Sensor`).

An installed package declares its plug-in in its ``pyproject.toml``::

    [project.entry-points."xclay.models"]
    band-means = "xclay_bandmeans:BandMeans"

An entry point names a plug-in, its class (made with no arguments), a list of them, or a
function returning either. The entry points are read the first time a registry is asked
for a name it lacks or for its list, in every process: a Dask worker finds a plug-in as
the driver did. A plug-in that fails to load, or that would replace a built-in one, is
left out with a :class:`~xclay.errors.PluginWarning`. :meth:`Registry.register` adds one
in this process only (interactive use, tests).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from xclay.errors import PluginWarning, XClayError

__all__ = ["Registry", "isolated", "reload"]

P = TypeVar("P")
_REGISTRIES: list[Registry[Any]] = []  # every kind's, in the order they were made


class Registry(Generic[P]):
    """The plug-ins of one kind, by name.

    Parameters
    ----------
    kind
        What a plug-in is, for messages (``"model"``, ``"output format"``).
    group
        The entry-point group installed packages declare theirs under.
    adopt
        Turns what an entry point or :meth:`register` gives into a plug-in: the plug-in
        itself, or another spelling of one (a class to instantiate); raises TypeError,
        saying what a plug-in must be, for anything else.
    error
        The error raised for an unknown name or a refused registration.
    name_of
        A plug-in's name (default: its ``name`` attribute).
    """

    def __init__(
        self,
        kind: str,
        group: str,
        adopt: Callable[[Any], P],
        *,
        error: type[XClayError] = XClayError,
        name_of: Callable[[P], str] = lambda plugin: str(plugin.name),  # type: ignore[attr-defined]
    ) -> None:
        self.kind = kind
        self.group = group
        self._adopt = adopt
        self._error = error
        self._name_of = name_of
        self._plugins: dict[str, P] = {}
        self._built_in: set[str] = set()
        self._loaded = False
        _REGISTRIES.append(self)

    # ----------------------------------------------------------------- registering

    def register(self, plugin: Any, *, replace: bool = False) -> P:
        """Add ``plugin`` in this process (other processes find entry points instead).

        Parameters
        ----------
        plugin
            A plug-in of this registry's kind, or its class.
        replace
            Replace a registered plug-in of the same name, built-in ones included;
            otherwise that is an error.

        Returns
        -------
        The plug-in as registered.
        """
        try:
            adopted = self._adopt(plugin)
        except TypeError as err:
            raise self._error(f"cannot register {plugin!r}: {err}.") from None
        name = self._name_of(adopted)
        if name in self._plugins and not replace:
            raise self._error(
                f"a {self.kind} named {name!r} is registered already; pass replace=True to "
                "replace it."
            )
        self._plugins[name] = adopted
        return adopted

    def built_in(self, *plugins: Any) -> None:
        """Register xclay's own plug-ins: an installed package cannot replace them.

        Parameters
        ----------
        *plugins
            The plug-ins, as :meth:`register` takes them.
        """
        for plugin in plugins:
            self._built_in.add(self._name_of(self.register(plugin)))

    def load_entry_points(self, *, again: bool = False) -> list[str]:
        """Register what installed packages declare under this registry's group (once
        per process, unless ``again``).

        Parameters
        ----------
        again
            Read the entry points even if this process already has (after installing a
            plug-in, say).

        Returns
        -------
        list of str
            The names this call registered.
        """
        if self._loaded and not again:
            return []
        self._loaded = True
        from importlib.metadata import entry_points

        added = []
        for point in entry_points(group=self.group):
            where = f"entry point {point.name!r} ({point.value}) of {self.group!r}"
            try:
                found = self._entries(point.load())
            except Exception as err:  # a broken plug-in must not break xclay
                warnings.warn(f"{where} failed to load: {err}", PluginWarning, stacklevel=2)
                continue
            for plugin in found:
                if isinstance(plugin, TypeError):
                    warnings.warn(f"{where}: {plugin}; left out.", PluginWarning, stacklevel=2)
                    continue
                name = self._name_of(plugin)
                if name in self._built_in:
                    warnings.warn(
                        f"{where} would replace the built-in {self.kind} {name!r}: left out.",
                        PluginWarning,
                        stacklevel=2,
                    )
                    continue
                self._plugins[name] = plugin
                added.append(name)
        return added

    def _entries(self, value: Any) -> list[P | TypeError]:
        """The plug-ins an entry point's value gives, each adopted or the reason why not."""
        try:
            return [self._adopt(value)]
        except TypeError as err:
            if isinstance(value, list | tuple):
                return [p for item in value for p in self._entries(item)]
            if callable(value) and not isinstance(value, type):
                return self._entries(value())
            return [err]

    # ----------------------------------------------------------------- looking up

    def get(self, name: str) -> P:
        """The plug-in called ``name``; an unknown name is an error listing the known ones.

        Parameters
        ----------
        name
            A name from :meth:`names`.
        """
        if name not in self._plugins:
            self.load_entry_points()
        try:
            return self._plugins[name]
        except KeyError:
            raise self._error(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}. "
                f"Other packages add theirs through the {self.group!r} entry-point group."
            ) from None

    def names(self) -> list[str]:
        """Every registered name, installed plug-ins included, sorted."""
        self.load_entry_points()
        return sorted(self._plugins)

    def plugins(self) -> list[P]:
        """Every registered plug-in, in the order of :meth:`names`."""
        return [self._plugins[n] for n in self.names()]

    def registered(self) -> list[P]:
        """The plug-ins registered so far, without reading entry points."""
        return list(self._plugins.values())

    def __contains__(self, name: object) -> bool:
        if name not in self._plugins:
            self.load_entry_points()
        return name in self._plugins

    @contextlib.contextmanager
    def isolated(self) -> Iterator[Registry[P]]:
        """Within the block, registrations and entry points read are undone after it (for
        tests that install a plug-in)."""
        saved = (dict(self._plugins), set(self._built_in), self._loaded)
        self._loaded = False
        try:
            yield self
        finally:
            self._plugins, self._built_in, self._loaded = saved


def reload() -> dict[str, list[str]]:
    """Read every kind's entry points again (after installing a plug-in in a running
    process): the names each registry added, by entry-point group."""
    return {r.group: r.load_entry_points(again=True) for r in _REGISTRIES}


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Within the block, every registry's registrations and entry points read are undone
    after it (:meth:`Registry.isolated` for all kinds at once)."""
    with contextlib.ExitStack() as stack:
        for registry in list(_REGISTRIES):
            stack.enter_context(registry.isolated())
        yield
