"""Write outputs under a temporary name and move them into place when complete.

A reader (or a resumed run) must never mistake a half-written store or file
for a finished one: everything is written beside the target as
``.<stem>.partial-<pid><suffix>`` and renamed only after the writer returns. Object storage
has no rename: a store there is written in place and counts as whole only once marked
complete (:mod:`xclay.completion`, its last write), and is removed if its writer fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from xclay.errors import OutputExistsError
from xclay.storage.local import atomic_output
from xclay.storage.location import Location

__all__ = ["atomic_output", "store_output"]


@contextlib.contextmanager
def store_output(target: Location, *, overwrite: bool) -> Iterator[Location]:
    """Yield where to write a Zarr store that must not look whole before it is: locally a
    temporary folder renamed into place (:func:`atomic_output`); on object storage the
    target itself, cleared first when ``overwrite``, removed again if the writer fails
    (the writer marks it complete last).

    Parameters
    ----------
    target
        Where the store goes.
    overwrite
        Replace an existing store; otherwise an existing one is an
        :class:`~xclay.errors.OutputExistsError`.
    """
    if target.is_local:
        with atomic_output(target.path, overwrite=overwrite) as tmp:
            yield Location(tmp)
        return
    if target.exists():
        if not overwrite:
            raise OutputExistsError(
                f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace "
                "it, or choose another path."
            )
        target.remove()
    try:
        yield target
    except BaseException:
        target.remove()
        raise
