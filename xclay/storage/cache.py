"""Local copies of remote files that are read whole, by libraries that want a path: model
checkpoints (``torch.load`` maps the file; a 5 GB Clay checkpoint is read at every model
load, by every worker of a run).

A remote file is downloaded once into the cache folder (``$XCLAY_CACHE``, else
``$XDG_CACHE_HOME/xclay``, else ``~/.cache/xclay``)::

    checkpoints/<sha256 of the URL>/<the file's name>
    checkpoints/<sha256 of the URL>/source.json    url, size, etag, last_modified, sha256

and used again while it is still the remote file and still whole: one HEAD tells the
remote object's size and ETag (and modification time), which must be those recorded,
and the local copy must be the one downloaded: its size and modification time those
recorded then (a 5 GB file is not hashed again at every load), or, where they changed,
its sha256 the one recorded (a cached file damaged or edited is downloaded again). A download goes to a temporary name in the
same folder, is checked (its length against the object's), and is renamed into place;
processes that share the cache take a lock on the folder (``flock``), so two of them
download a file once, and never leave a partial file under the file's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xclay._hashing import sha256_file
from xclay.errors import CheckpointError, StorageError
from xclay.storage.location import Location, StorageOptions, Where, location

__all__ = ["cache_root", "cached_file", "local_checkpoint"]

log = logging.getLogger(__name__)

RECORD = "source.json"


def cache_root() -> Path:
    """xclay's cache folder: ``$XCLAY_CACHE``, else ``$XDG_CACHE_HOME/xclay``, else
    ``~/.cache/xclay``."""
    base = os.environ.get("XCLAY_CACHE")
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "xclay"


def local_checkpoint(where: Where, storage_options: StorageOptions | None = None) -> Path:
    """A model checkpoint as a local file: a path as it is, a URL (``s3://``, ``gs://``,
    ``az://``, ``http(s)://``) through the cache (:func:`cached_file`).

    Parameters
    ----------
    where
        The checkpoint's path, URL or :class:`~xclay.storage.Location`.
    storage_options
        Settings for a URL's store beyond the environment.

    Returns
    -------
    pathlib.Path
        The local file (a remote one's cached copy, named as the remote file).
    """
    try:
        return cached_file(where, storage_options, kind="checkpoints")
    except FileNotFoundError as err:
        raise CheckpointError(f"checkpoint {where} does not exist (no such object).") from err


def cached_file(
    where: Where, storage_options: StorageOptions | None = None, *, kind: str = "files"
) -> Path:
    """A local copy of a remote file, downloaded once and reused while it is current.

    Parameters
    ----------
    where
        A path (returned as it is), a URL or a :class:`~xclay.storage.Location`.
    storage_options
        Settings for a URL's store beyond the environment.
    kind
        The cache's subfolder (``checkpoints``, ...).

    Returns
    -------
    pathlib.Path
        ``cache_root()/kind/<sha256 of the URL>/<file name>``: a whole copy of the remote
        file as it is now (its size and ETag checked with one HEAD; its bytes with the
        sha256 recorded when it was downloaded).
    """
    loc = location(where, storage_options)
    if loc.is_local:
        return loc.path
    folder = cache_root() / kind / hashlib.sha256(loc.url.encode("utf-8")).hexdigest()
    target = folder / (loc.name or "object")
    remote = loc.stat()
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".lock"):
        if _current(target, folder / RECORD, loc.url, remote):
            log.debug("%s: using the cached copy %s", loc, target)
            return target
        log.info("%s: downloading to the cache (%d bytes)", loc, remote["size"])
        _download(loc, target, folder / RECORD)
    return target


def recorded_sha256(path: Path) -> str | None:
    """The sha256 of a cached copy, as recorded when it was downloaded, while the file is
    unchanged since (its size and modification time); None for any other file.

    Parameters
    ----------
    path
        A local file (a cached copy from :func:`cached_file`, or any other).
    """
    try:
        recorded = json.loads((path.parent / RECORD).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return None
    if recorded.get("local") != [st.st_size, st.st_mtime_ns]:
        return None
    sha = recorded.get("sha256")
    return str(sha) if sha else None


def _current(target: Path, record: Path, url: str, remote: dict[str, Any]) -> bool:
    """Whether the cached copy is the remote object as it is now, and whole."""
    try:
        recorded = json.loads(record.read_text())
        size = target.stat().st_size
    except (OSError, ValueError):
        return False
    if recorded.get("url") != url or any(recorded.get(k) != v for k, v in remote.items()):
        return False  # another object under this URL now
    if size != remote["size"]:
        log.warning("%s: the cached copy %s is damaged; downloading it again", url, target)
        return False
    if recorded_sha256(target) is not None:
        return True  # the file as downloaded, untouched since
    if sha256_file(target) != recorded.get("sha256"):
        log.warning("%s: the cached copy %s is damaged; downloading it again", url, target)
        return False
    return True


def _download(loc: Location, target: Path, record: Path) -> None:
    """GET the object into a temporary file beside ``target``, hashing it on the way; then
    rename it into place and record what it is."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    digest = hashlib.sha256()
    written = 0
    try:
        got, chunks = loc.stream()  # the version this GET returns (it may be newer)
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
                digest.update(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        if written != got["size"]:
            raise StorageError(
                f"{loc}: the download ended after {written} of {got['size']} bytes; try again."
            )
        tmp.replace(target)
        st = target.stat()
        entry = {
            "url": loc.url,
            **got,
            "sha256": digest.hexdigest(),
            "local": [st.st_size, st.st_mtime_ns],
        }
        staged = record.with_name(f".{record.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        staged.write_text(json.dumps(entry, indent=1))
        staged.replace(record)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` between processes (where the file system has flock;
    without it, concurrent downloads still never leave a partial file in place)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        yield
        return
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts)
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
