"""Write outputs under a temporary name and move them into place when complete.

A reader (or a resumed run) must never mistake a half-written store or file
for a finished one: everything is written beside the target as
``.<name>.partial-<pid>`` and renamed only after the writer returns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from xclay.errors import OutputExistsError

__all__ = ["atomic_output"]


@contextlib.contextmanager
def atomic_output(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` on success.

    On error the temporary path is removed and ``target`` is left as it was.
    With ``overwrite=True`` an existing ``target`` is replaced only once the
    new output is complete.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or choose another path."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _remove(old)
        target.rename(old)
        tmp.rename(target)
        _remove(old)
    else:
        tmp.rename(target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
