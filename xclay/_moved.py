"""Names of a module that moved, still found at its old home with a warning."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any


def moved(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the old home ``old`` of module ``new``: each name is
    ``new``'s, given with a :class:`DeprecationWarning` naming where it went."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):  # the module's own (its __all__: none), never the new one's
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(new), name)  # AttributeError: never had it
        warnings.warn(f"{old}.{name} moved to {new}.{name}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
