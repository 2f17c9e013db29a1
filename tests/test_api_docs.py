"""Every public function and class has a numpydoc ``Parameters`` section (``Attributes``
for plain records) naming each of its parameters: the API reference's entries
(docs/api.md) and every name in the ``__all__`` of a public module of the package."""

from __future__ import annotations

import enum
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import Any

import pytest

import xclay  # also registers the .clay accessor the reference documents

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SECTION = re.compile(r"^(Parameters|Attributes)\n-+$", re.M)


def _entries() -> list[str]:
    """The reference's autosummary entries, each with its current module."""
    module, found = None, []
    for line in API.read_text().splitlines():
        if m := re.match(r"\.\. currentmodule:: (\S+)", line):
            module = m.group(1)
        elif (m := re.match(r"^   ([A-Za-z_][\w.]*)$", line)) and module:
            found.append(f"{module}.{m.group(1)}")
    return found


def _resolve(dotted: str) -> Any:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise LookupError(dotted)


def _documented(doc: str) -> set[str]:
    """Names a numpydoc section lists: unindented lines (``a, b : type`` or ``**settings``)."""
    names = set()
    for line in doc.splitlines():
        if line and not line[0].isspace() and not line.startswith("-"):
            for name in line.split(" : ")[0].split(","):
                names.add(name.strip().lstrip("*"))
    return names


def _parameters(obj: Any) -> list[str]:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    return [p.name for p in signature.parameters.values() if p.name not in ("self", "cls")]


def _public_names() -> list[str]:
    """Where each name in the ``__all__`` of a public module (no part of its path starts
    with ``_``) is defined, as ``module.qualname``, once each."""
    modules = ["xclay"] + [
        m.name
        for m in pkgutil.walk_packages(xclay.__path__, "xclay.")
        if not any(part.startswith("_") for part in m.name.split("."))
    ]
    found: dict[str, None] = {}
    for name in modules:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            home = getattr(obj, "__module__", None) or ""
            if home.startswith("xclay") and hasattr(obj, "__qualname__"):
                found[f"{home}.{obj.__qualname__}"] = None
    return list(found)


ENTRIES = _entries() + [name for name in _public_names() if name not in set(_entries())]


def test_the_reference_lists_what_it_should() -> None:
    assert len(_entries()) > 100 and len(ENTRIES) > 250
    assert "xclay.embed" in ENTRIES and "xclay.ingest.from_stac" in ENTRIES


@pytest.mark.parametrize("dotted", ENTRIES)
def test_every_parameter_is_documented(dotted: str) -> None:
    obj = _resolve(dotted)
    if not callable(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
        return  # constants and errors take no documented parameters
    if getattr(obj, "_is_protocol", False):
        return  # a protocol is not constructed: its methods say what they take
    if isinstance(obj, type) and issubclass(obj, enum.Enum):
        return  # calling an enum looks a member up: its members are what to document
    parameters = _parameters(obj)
    if not parameters:
        return
    doc = inspect.getdoc(obj) or ""
    assert SECTION.search(doc), f"{dotted} has parameters {parameters} but no Parameters section"
    missing = [p for p in parameters if p not in _documented(doc)]
    assert not missing, f"{dotted}: {missing} not documented"
