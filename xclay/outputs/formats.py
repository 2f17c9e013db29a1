"""The output formats of an embedding set, in one registry.

``xclay export --format`` offers the registered formats and their options, a run's
export step (``xclay export SPEC``) writes any of them, and the run's STAC description
lists what was written, all from here. A format is one class keeping the
:class:`~xclay.protocols.Exporter` protocol: the built-in ones live beside their writers
(:class:`~xclay.outputs.export.GeoParquetExporter`, :class:`~xclay.outputs.cog.CogExporter`);
another package declares its own under the ``xclay.exporters`` entry-point group
(:mod:`xclay.plugins`), found in every process, or registers it in one process with
:func:`register_exporter`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from xclay.errors import ConfigError
from xclay.outputs.cog import CogExporter
from xclay.outputs.export import GeoParquetExporter
from xclay.plugins import Registry
from xclay.protocols import Exporter, ExportOption

__all__ = [
    "DEFAULT_FORMAT",
    "EXPORTERS",
    "check_options",
    "export_formats",
    "export_options",
    "get_exporter",
    "register_exporter",
]

DEFAULT_FORMAT = "geoparquet"


def _adopt(value: Any) -> Exporter:
    if isinstance(value, type):
        value = value()
    if not isinstance(value, Exporter):
        raise TypeError(
            f"a {type(value).__name__} is not an Exporter: it needs name, suffix, media_type, "
            "summary, options, by_region, write() and asset() (xclay.protocols.Exporter)"
        )
    for name, option in value.options.items():
        # One CLI flag serves every format that takes the option: they must agree on it.
        for other in EXPORTERS.registered():
            theirs = other.options.get(name)
            if theirs is not None and other.name != value.name and theirs != option:
                raise TypeError(
                    f"format {value.name!r} declares option {name!r} unlike format "
                    f"{other.name!r} does; give it another name"
                )
    return value


#: The output formats (:mod:`xclay.plugins`): xclay's own and installed ones.
EXPORTERS: Registry[Exporter] = Registry(
    "output format", "xclay.exporters", _adopt, error=ConfigError
)


def register_exporter(exporter: Exporter, *, replace: bool = False) -> None:
    """Offer ``exporter`` as ``xclay export --format <exporter.name>`` and to runs.

    Parameters
    ----------
    exporter
        An object keeping the :class:`~xclay.protocols.Exporter` protocol.
    replace
        Replace a registered format of the same name (otherwise an error).
    """
    EXPORTERS.register(exporter, replace=replace)


def get_exporter(name: str) -> Exporter:
    """The registered output format ``name`` (a :class:`ConfigError` listing them if none).

    Parameters
    ----------
    name
        A format's name, as ``xclay export --format`` takes it (``"geoparquet"``, ``"cog"``,
        or one registered with :func:`register_exporter`).
    """
    return EXPORTERS.get(name)


def export_formats() -> tuple[str, ...]:
    """The registered format names, the default first."""
    return tuple(sorted(EXPORTERS.names(), key=lambda n: (n != DEFAULT_FORMAT, n)))


def export_options() -> dict[str, ExportOption]:
    """Every registered format's options, by name (one CLI flag each)."""
    return {name: opt for e in EXPORTERS.plugins() for name, opt in e.options.items()}


def check_options(exporter: Exporter, given: Mapping[str, Any]) -> dict[str, Any]:
    """The options of ``given`` that ``exporter`` takes; one it does not take, given a
    value other than its default, is a :class:`ConfigError` naming the formats it is for.

    Parameters
    ----------
    exporter
        The output format the options are for (:func:`get_exporter`).
    given
        Option name (as :func:`export_options` names them) to value, e.g. every CLI
        flag's value. A name no registered format takes is a :class:`ConfigError`;
        another format's option left at its default is dropped.

    Returns
    -------
    dict
        The options ``exporter`` takes, with their given values.
    """
    known = export_options()
    taken = {}
    for name, value in given.items():
        if name in exporter.options:
            taken[name] = value
        elif name not in known:
            raise ConfigError(f"unknown export option {name!r}.")
        elif value != known[name].default:
            owners = [e.name for e in EXPORTERS.plugins() if name in e.options]
            raise ConfigError(
                f"--{name.replace('_', '-')} applies to --format {' or '.join(owners)}, "
                f"not {exporter.name}."
            )
    return taken


EXPORTERS.built_in(GeoParquetExporter, CogExporter)
