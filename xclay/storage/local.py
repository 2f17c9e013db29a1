"""Files on the local file system written whole: under a temporary name beside the target,
then renamed into place (a reader never sees half a file or folder)."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from xclay.errors import OutputExistsError

__all__ = ["atomic_output", "write_file", "write_file_from"]


@contextlib.contextmanager
def atomic_output(target: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` on success.

    On error the temporary path is removed and ``target`` is left as it was.
    With ``overwrite=True`` an existing ``target`` is replaced only once the
    new output is complete.

    Parameters
    ----------
    target
        The output's final path.
    overwrite
        Replace an existing ``target``; False: an existing one is an
        :class:`~xclay.errors.OutputExistsError`.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise OutputExistsError(
            f"{target} already exists; pass overwrite=True (CLI: --overwrite) to replace it, "
            "or choose another path."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # The suffix kept last: tools that pick a format by it (PIL, GDAL) write the right one.
    tmp = target.with_name(f".{target.stem}.partial-{os.getpid()}{target.suffix}")
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


def write_file(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` whole: a temporary file, flushed to disk, renamed (``overwrite``) or
    hard-linked (create-only: of two writers exactly one wins) into place.

    Parameters
    ----------
    path
        The file to write.
    data
        Its whole content.
    overwrite
        Replace an existing file; False: an existing one is an
        :class:`~xclay.errors.OutputExistsError`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            tmp.replace(path)
        else:
            try:
                os.link(tmp, path)  # fails if the path exists: of two writers, one wins
            except FileExistsError as err:
                raise OutputExistsError(f"{path} already exists.") from err
    finally:
        tmp.unlink(missing_ok=True)


def write_file_from(path: Path, source: Path) -> None:
    """Copy ``source`` to ``path`` whole (a temporary copy renamed into place).

    Parameters
    ----------
    path
        The file to write (replaced if it exists).
    source
        The file copied.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        shutil.copyfile(source, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
