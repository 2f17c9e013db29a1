"""Settings, each declared once: a field of a frozen dataclass whose type is the field's
annotation and whose default, allowed values, unit and one-line description are a
:class:`Setting` in the field's metadata (``chip_size: int = declared(CHIP_SIZE)``).

Everything that takes settings reads that declaration: the dataclass's own check
(:func:`check_fields`, from its ``__post_init__``), the run spec's sections
(:func:`read_section`), the CLI's flags and their help (:func:`add_flags`,
:func:`flag_values`), :func:`xclay.embed`'s keywords, and the table of settings in
docs/run-spec.md (:func:`markdown_rows`). A setting shared by several places (the chip
size is a chip grid's, a run's and ``embed()``'s) is one :class:`Setting` object used by
each dataclass that holds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin

from xclay.errors import ConfigError

__all__ = [
    "Setting",
    "add_flags",
    "check_fields",
    "check_value",
    "declared",
    "documented",
    "flag_values",
    "markdown_rows",
    "read_section",
    "settings_of",
]


@dataclass(frozen=True)
class Setting:
    """One setting's declaration beyond its name and type (which are its field's).

    Parameters
    ----------
    default
        Its value when not given (a mutable default is copied for each instance).
    doc
        What it does, in one line (the CLI's help, the docs' table, the messages).
    unit
        Its unit (``"px"``, ``"chips"``, ``"s"``), shown with the default.
    low, high
        Inclusive bounds of a number.
    positive
        A number that must be above zero.
    choices
        Allowed values beyond what the type says, or a function giving them when asked
        (registered models, sensors); ``Literal`` types need none.
    flag
        Offered on the command line (``--chip-size``) where the dataclass's flags are.
    coerce
        Turns a spelling users write into the stored value before the check (YAML's
        ``true`` for thumbnails -> 64 px, an EPSG number -> ``"EPSG:n"``); a ValueError
        it raises says what is wrong (``"must be ..."``), and is reported with the name.
    metavar
        The CLI's name for the value (``PX``, ``N``).
    const
        The value of the flag given without one (``--thumbnails`` alone: 64); None: the
        flag needs a value.
    see
        A page of the docs that says more (``"models.md#precision-and-speed"``): linked
        from the table of settings.
    """

    default: Any
    doc: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    positive: bool = False
    choices: tuple[Any, ...] | Callable[[], Sequence[Any]] | None = None
    flag: bool = True
    coerce: Callable[[Any], Any] | None = None
    metavar: str | None = None
    const: Any = None
    see: str = ""

    def allowed(self) -> tuple[Any, ...] | None:
        if self.choices is None:
            return None
        return tuple(self.choices() if callable(self.choices) else self.choices)


def declared(setting: Setting) -> Any:
    """A dataclass field declared by ``setting`` (``chip_size: int = declared(CHIP_SIZE)``).

    Parameters
    ----------
    setting
        The field's declaration: its default, and what the checks, the run spec, the CLI
        and the docs read.
    """
    if isinstance(setting.default, dict | list | set):
        default = setting.default
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"setting": setting}
        )
    return dataclasses.field(default=setting.default, metadata={"setting": setting})


# --------------------------------------------------------------------------- the schema


def settings_of(cls: type) -> list[tuple[str, Any, Setting]]:
    """The settings a dataclass declares: ``(name, type, Setting)`` in field order."""
    hints = typing.get_type_hints(cls)
    return [
        (f.name, hints[f.name], f.metadata["setting"])
        for f in dataclasses.fields(cls)
        if "setting" in f.metadata
    ]


def check_fields(instance: Any, *, prefix: str = "") -> None:
    """Check every declared setting of a dataclass instance (its ``__post_init__`` calls
    this); a wrong value is a :class:`~xclay.errors.ConfigError` naming it.

    Parameters
    ----------
    instance
        A dataclass instance whose fields are declared with :meth:`Setting.field`.
    prefix
        Put before each name in messages (``"grid."``).
    """
    for name, hint, setting in settings_of(type(instance)):
        value = getattr(instance, name)
        checked = check_value(hint, setting, value, f"{prefix}{name}")
        if checked is not value:  # coerced, or an int stored as the float it stands for
            object.__setattr__(instance, name, checked)


def check_value(hint: Any, setting: Setting, value: Any, where: str) -> Any:
    """``value`` checked against its type and declaration; returns it as stored (coerced).

    Parameters
    ----------
    hint
        The field's type (``int``, ``float | None``, ``Literal["drop", "pad"]``, ...).
    setting
        Its declaration.
    value
        What was given.
    where
        Its name in messages (``"grid.chip_size"``, ``"chip_size"``).
    """
    if setting.coerce is not None:
        try:
            value = setting.coerce(value)
        except ValueError as err:  # the coercion's own word on what is wrong
            raise ConfigError(f"{where}: {str(err).rstrip('.')}.") from err
    if type(value) is type(setting.default) and value == setting.default:
        return value  # the declared default holds (an empty name, no stride)
    problem = _problem(hint, value)
    if problem is None and value is not None:
        problem = _bounds(setting, value)
    allowed = setting.allowed() if problem is None and value is not None else None
    if allowed is not None and value not in allowed:
        problem = f"must be one of {', '.join(map(repr, allowed))}, got {value!r}"
    if problem is not None:
        raise ConfigError(f"{where}: {problem}.")
    if isinstance(value, list) and _is_tuple(hint):
        return tuple(value)
    whole = isinstance(value, int) and not isinstance(value, bool)
    if whole and _accepts(hint, float) and not _accepts(hint, int):
        return float(value)
    return value


def _problem(hint: Any, value: Any) -> str | None:
    """Why ``value`` is not of type ``hint`` (None: it is)."""
    options = _union(hint)
    if value is None:
        return None if type(None) in options else "is required (null is not allowed)"
    literals = [v for o in options if get_origin(o) is Literal for v in get_args(o)]
    if literals and value in literals and not isinstance(value, bool):
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return None
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return None if math.isfinite(value) else f"must be a finite number, got {value!r}"
        if option is str and isinstance(value, str) and value:
            return None
        if _is_tuple(option) and isinstance(value, list | tuple):
            inner = get_args(option)[0]
            if all(_problem(inner, v) is None for v in value):
                return None
        if get_origin(option) in (dict, Mapping) and isinstance(value, Mapping):
            key_type, value_type = get_args(option) or (Any, Any)
            if all(
                (key_type is Any or _problem(key_type, k) is None)
                and (value_type is Any or _problem(value_type, v) is None)
                for k, v in value.items()
            ):
                return None
        if option is Any:
            return None
    return f"must be {_describe(options)}, got {value!r}"


def _bounds(setting: Setting, value: Any) -> str | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    if setting.positive and value <= 0:
        return f"must be positive, got {value!r}"
    low, high = setting.low, setting.high
    if low is not None and high is not None and not low <= value <= high:
        return f"must be within [{low:g}, {high:g}], got {value!r}"
    if low is not None and value < low:
        return f"must be at least {low:g}, got {value!r}"
    if high is not None and value > high:
        return f"must be at most {high:g}, got {value!r}"
    return None


def _union(hint: Any) -> tuple[Any, ...]:
    if get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(o for a in get_args(hint) for o in _union(a))
    return (hint,)


def _is_tuple(hint: Any) -> bool:
    return any(get_origin(o) is tuple for o in _union(hint))


def _accepts(hint: Any, kind: type) -> bool:
    return kind in _union(hint)


def _describe(options: tuple[Any, ...]) -> str:
    words = {
        int: "an integer",
        float: "a number",
        bool: "true or false",
        str: "a non-empty string",
    }
    parts: list[str] = []
    literals: list[Any] = []
    for option in options:
        if option is type(None):
            continue
        if get_origin(option) is Literal:
            literals += list(get_args(option))
        elif _is_tuple(option):
            parts.append("a list of names")
        elif get_origin(option) in (dict, Mapping):
            parts.append("a mapping")
        else:
            parts.append(words.get(option, getattr(option, "__name__", str(option))))
    if literals:
        parts.append(f"one of {', '.join(map(repr, literals))}")
    return " or ".join(parts) or "given"


# --------------------------------------------------------------------------- run spec


def read_section(
    cls: type[Any], data: Any, where: str, *, required: Sequence[str] = (), **given: Any
) -> Any:
    """A settings dataclass from a run spec's section (a mapping, or None for defaults).

    Parameters
    ----------
    cls
        The section's dataclass.
    data
        The section as read from YAML.
    where
        Its name in messages (``"grid"``).
    required
        Fields that must be given.
    **given
        Fields set by the caller, not read from ``data`` (nested sections already read).

    Returns
    -------
    object
        The section; a wrong value is a :class:`~xclay.errors.ConfigError` naming
        ``where.field``, what was given and what is allowed.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: must be a mapping of settings, got {type(data).__name__}.")
    dot = f"{where}." if where else ""
    fields = {name: (hint, setting) for name, hint, setting in settings_of(cls)}
    allowed = set(fields) | set(given)
    unknown = sorted(set(data) - allowed)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{dot}{unknown[0]}: unknown setting{hint}; allowed: {', '.join(sorted(allowed))}."
        )
    missing = [name for name in required if data.get(name) is None]
    if missing:
        raise ConfigError(f"{dot}{missing[0]}: required setting is missing.")
    values = {
        name: check_value(hint, setting, data[name], f"{dot}{name}")
        for name, (hint, setting) in fields.items()
        if name in data
    }
    return cls(**values, **given)


# --------------------------------------------------------------------------- command line


def add_flags(
    parser: Any,
    cls: type,
    *,
    names: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> None:
    """Add a ``--flag`` for each setting of ``cls`` declared with ``flag=True`` (or each of
    ``names``): its type, choices and help (with the default) from the declaration.

    Parameters
    ----------
    parser
        An ``argparse`` parser or argument group.
    cls
        A settings dataclass.
    names
        Only these settings, in this order.
    exclude
        Leave these out (they have a place of their own, in another group).
    """
    fields = {name: (hint, setting) for name, hint, setting in settings_of(cls)}
    for name in names if names is not None else fields:
        hint, setting = fields[name]
        if name in exclude or (names is None and not setting.flag):
            continue
        options = _union(hint)
        literals = [v for o in options if get_origin(o) is Literal for v in get_args(o)]
        default = setting.default
        shown = _shown(default, setting.unit)
        kwargs: dict[str, Any] = {
            "dest": name,
            "default": default,
            "help": f"{setting.doc} (default {shown})",
            "metavar": setting.metavar,
        }
        if bool in options and len([o for o in options if o is not type(None)]) == 1:
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                action="store_true",
                dest=name,
                default=default,
                help=f"{setting.doc} (default {shown})",
            )
            continue
        if literals and all(o is type(None) or get_origin(o) is Literal for o in options):
            kwargs["choices"] = literals
            kwargs.pop("metavar")
        else:
            kwargs["type"] = _cli_type(hint, setting, f"--{name.replace('_', '-')}")
        if setting.const is not None:
            kwargs.update(nargs="?", const=setting.const)
        parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def flag_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of ``cls``'s settings in parsed arguments (those ``add_flags`` added).

    Parameters
    ----------
    args
        What ``argparse`` parsed.
    cls
        A settings dataclass.
    """
    return {name: getattr(args, name) for name, _, _ in settings_of(cls) if hasattr(args, name)}


def _cli_type(hint: Any, setting: Setting, flag: str) -> Callable[[str], Any]:
    options = _union(hint)
    literals = [v for o in options if get_origin(o) is Literal for v in get_args(o)]

    def parse(text: str) -> Any:
        if text in literals:
            return text
        if text.lower() == "none" and type(None) in options:
            return None
        value: Any = text
        for kind in (int, float):
            if kind in options:
                try:
                    value = kind(text)
                    break
                except ValueError:
                    continue
        try:
            return check_value(hint, setting, value, flag)
        except ConfigError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[1].rstrip(".")) from None

    parse.__name__ = _describe(options)
    return parse


def _shown(default: Any, unit: str) -> str:
    if default is None:
        return "none"
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, float):
        return f"{default:g}{' ' + unit if unit else ''}"
    return f"{default}{' ' + unit if unit else ''}"


# --------------------------------------------------------------------------- docs


def markdown_rows(cls: type, prefix: str) -> list[str]:
    """The rows of docs/run-spec.md's table of fields for a section: ``| `prefix.name` |
    `default` | doc (unit) |``.

    Parameters
    ----------
    cls
        A settings dataclass.
    prefix
        The section's name in a spec (``"grid"``).
    """
    rows = []
    for name, hint, setting in settings_of(cls):
        default = setting.default
        shown = "required" if default is dataclasses.MISSING else f"`{_yaml(default)}`"
        allowed = setting.allowed() if not callable(setting.choices) else None
        options = [o for o in _union(hint) if o is not type(None)]
        only_literals = all(get_origin(o) is Literal for o in options)
        literals = [v for o in options if get_origin(o) is Literal for v in get_args(o)]
        choices = allowed or (literals if only_literals else [])
        tail = f"; one of {', '.join(f'`{_yaml(c)}`' for c in choices)}" if choices else ""
        unit = f" ({setting.unit})" if setting.unit else ""
        see = f" ([more]({setting.see}))" if setting.see else ""
        key = f"{prefix}.{name}" if prefix else name
        rows.append(f"| `{key}` | {shown} | {setting.doc}{unit}{tail}{see} |")
    return rows


def documented(**others: str) -> Callable[[type], type]:
    """A class decorator that writes a settings dataclass's numpydoc ``Parameters``
    section from its declarations (each setting's ``doc``, unit and default), so the API
    reference says what the table, the CLI and the messages say, from the one place.

    Parameters
    ----------
    **others
        What a field that is not a declared setting is (``stac="..."``), by name.
    """

    def document(cls: type) -> type:
        declarations = {name: setting for name, _, setting in settings_of(cls)}
        lines = ["Parameters", "----------"]
        for field in dataclasses.fields(cls):
            setting = declarations.get(field.name)
            if setting is not None:
                default = setting.default
                given = default is dataclasses.MISSING or default is None
                shown = "" if given else f" Default: ``{_yaml(default)}``."
                unit = f" ({setting.unit})" if setting.unit else ""
                text = f"{setting.doc[:1].upper()}{setting.doc[1:]}{unit}.{shown}"
            elif field.name in others:
                text = others[field.name]
            else:
                raise TypeError(f"{cls.__name__}.{field.name} is neither declared nor described")
            lines += [field.name, f"    {text}"]
        summary = inspect.cleandoc(cls.__doc__ or "")
        cls.__doc__ = f"{summary}\n\n" + "\n".join(lines) + "\n"
        return cls

    return document


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if value == "":
        return '""'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)
