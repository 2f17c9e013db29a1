"""Where data lives: a local path or an object-store URL, resolved once into a
:class:`Location` that reads and writes the same way wherever it points.

A local location works through the file system (writes under a temporary name, flushed,
then renamed: a reader never sees half a file). A remote one (``s3://``, ``gs://``,
``az://``, ``http(s)://``) works through `obstore <https://developmentseed.org/obstore>`_,
the Rust ``object_store`` crate that zarr-python's ``ObjectStore`` wraps: one client per
bucket and settings, shared by every location under it (its connection pool too);
retries with backoff on transient errors (HTTP 5xx, timeouts); one PUT per object, which
the store makes visible whole or not at all. No other module of xclay knows which kind of
location it was handed.

Settings (endpoint, region, anonymous access, ...) come from the environment each
cloud's own tools read (``AWS_*``, ``~/.aws`` profiles, ``GOOGLE_*``, ``AZURE_*``), and
from ``storage_options`` where that is not enough (obstore's configuration keys, e.g.
``{"endpoint": "http://127.0.0.1:9000", "skip_signature": True}``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias
from urllib.parse import urlparse

from xclay.errors import MissingDependencyError, OutputExistsError, StorageError
from xclay.storage.local import atomic_output, write_file, write_file_from

__all__ = [
    "REMOTE_SCHEMES",
    "Location",
    "StorageOptions",
    "Where",
    "is_url",
    "location",
    "use_storage_options",
]

StorageOptions = Mapping[str, Any]

# Schemes obstore serves, by the store class they need (az, abfs: Azure; gs: Google).
REMOTE_SCHEMES = (
    "s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "azure", "adl", "http", "https",
)  # fmt: skip
# fsspec's names for the same stores (xarray users write them)
_SCHEME_ALIASES = {"gcs": "gs", "s3a": "s3"}
_READ_ONLY_SCHEMES = ("http", "https")


def is_url(where: object) -> bool:
    """Whether ``where`` is an object-store or HTTP URL (not a path, not ``file://``).

    Parameters
    ----------
    where
        A path, a URL or a :class:`Location`; anything else is not a URL.
    """
    if not isinstance(where, str):
        return isinstance(where, Location) and not where.is_local
    scheme = urlparse(where).scheme.lower()
    return scheme in REMOTE_SCHEMES


# Storage options every location of this process gets unless given its own (the CLI's
# --storage-option): set with use_storage_options().
_DEFAULT_OPTIONS: dict[str, Any] = {}


@contextlib.contextmanager
def use_storage_options(options: StorageOptions) -> Iterator[None]:
    """Within the block, remote locations made without storage options get ``options``
    (what ``xclay --storage-option KEY=VALUE`` does for a command).

    Parameters
    ----------
    options
        obstore's keys for the schemes in use, plus ``max_retries``/``retry_timeout``.
    """
    old = dict(_DEFAULT_OPTIONS)
    _DEFAULT_OPTIONS.update(options)
    try:
        yield
    finally:
        _DEFAULT_OPTIONS.clear()
        _DEFAULT_OPTIONS.update(old)


def location(where: Where, storage_options: StorageOptions | None = None) -> Location:
    """Resolve ``where`` (a path, a ``file://`` URL, an object-store or HTTP URL, or a
    :class:`Location`) once.

    Parameters
    ----------
    where
        The place. A ``Location`` is returned as it is (``storage_options`` apply only to
        places given as text).
    storage_options
        Settings for a remote place's store, in addition to the environment: obstore's
        configuration keys for its scheme (``endpoint``, ``region``, ``skip_signature``,
        ``access_key_id``, ...). Ignored for local paths.

    Returns
    -------
    Location
        The resolved place; nothing is read or written yet.
    """
    if isinstance(where, Location):
        return where
    text = os.fspath(where)
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        return Location(Path(parsed.path))
    if scheme in REMOTE_SCHEMES:
        scheme = _SCHEME_ALIASES.get(scheme, scheme)
        if not parsed.netloc:
            raise StorageError(
                f"{text}: a {scheme}:// URL needs a bucket or host ({scheme}://BUCKET/PATH)."
            )
        root = f"{scheme}://{parsed.netloc}"
        key = parsed.path.strip("/")
        options = {**_DEFAULT_OPTIONS, **(storage_options or {})}
        return Location(None, root=root, key=key, options=options)
    if scheme and len(scheme) > 1 and "://" in text:
        raise StorageError(
            f"{text}: xclay does not know the {scheme}:// scheme; use a path, file://, "
            "s3://, gs://, az:// or http(s)://."
        )
    return Location(Path(text))


class Location:
    """A place to read and write: a local path, or a key under an object store's root.

    Build one with :func:`location`. Locations are values: ``loc / "name"`` is the
    place below, ``str(loc)`` the path or URL users gave (for messages).

    Parameters
    ----------
    path
        The local path (``None`` for a remote place).
    root
        A remote place's store root, ``scheme://bucket`` (or ``https://host``).
    key
        A remote place's key under the root (no leading slash; ``""`` is the root).
    options
        The storage options its store is built with.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        root: str = "",
        key: str = "",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        self._path = path
        self.root = root
        self.key = key
        self.options: dict[str, Any] = dict(options or {})

    # -- what it is ------------------------------------------------------------

    @property
    def is_local(self) -> bool:
        return self._path is not None

    @property
    def path(self) -> Path:
        """The local path; a remote location has none (a :class:`StorageError`)."""
        if self._path is None:
            raise StorageError(f"{self} is not a local path.")
        return self._path

    @property
    def url(self) -> str:
        """``scheme://bucket/key`` for a remote place, the path for a local one."""
        if self._path is not None:
            return str(self._path)
        return f"{self.root}/{self.key}" if self.key else self.root

    @property
    def scheme(self) -> str:
        return "file" if self._path is not None else self.root.split("://", 1)[0].lower()

    @property
    def name(self) -> str:
        if self._path is not None:
            return self._path.name
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> Location:
        if self._path is not None:
            return Location(self._path.parent)
        return self._remote(self.key.rsplit("/", 1)[0] if "/" in self.key else "")

    def __truediv__(self, name: str) -> Location:
        if self._path is not None:
            return Location(self._path / name)
        name = name.strip("/")
        return self._remote(f"{self.key}/{name}" if self.key else name)

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def with_suffix(self, suffix: str) -> Location:
        return self.with_name(self.stem + suffix)

    def _remote(self, key: str) -> Location:
        return Location(None, root=self.root, key=key, options=self.options)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __fspath__(self) -> str:
        return str(self.path)  # only a local location is a path

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Location) and (self.url, self.options) == (
            other.url,
            other.options,
        )

    def __hash__(self) -> int:
        return hash(self.url)

    def href_from(self, folder: Location) -> str:
        """How a document in ``folder`` links here: a relative href when both are local
        or in one store (STAC catalogs stay movable), else this place's URL."""
        if self._path is not None and folder._path is not None:
            return Path(os.path.relpath(self._path.resolve(), folder._path.resolve())).as_posix()
        if self._path is None and folder._path is None and self.root == folder.root:
            return posixpath.relpath("/" + self.key, "/" + folder.key)
        return self.url

    def to_dict(self) -> dict[str, Any]:
        """The location as plain values (a run's record, a task's arguments)."""
        return {"url": self.url, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Location:
        return location(data["url"], data.get("options") or None)

    # -- reading ---------------------------------------------------------------

    def exists(self) -> bool:
        """Whether a file, a folder, or (remote) any object at or under this key exists."""
        if self._path is not None:
            return self._path.exists()
        return self.is_file() or self.is_dir()

    def is_file(self) -> bool:
        if self._path is not None:
            return self._path.is_file()
        try:
            self._call("head", self.key)
        except FileNotFoundError:
            return False
        return True

    def is_dir(self) -> bool:
        """Whether this is a folder (remote: whether any object lies under ``key/``)."""
        if self._path is not None:
            return self._path.is_dir()
        for _ in self._list(self.key, limit=1):
            return True
        return False

    def read_bytes(self) -> bytes:
        if self._path is not None:
            return self._path.read_bytes()
        result = self._call("get", self.key)
        return bytes(result.bytes())

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def size(self) -> int:
        return int(self.stat()["size"])

    def stat(self) -> dict[str, Any]:
        """What identifies this file's current version: ``size`` (bytes), ``etag`` (None
        locally) and ``last_modified`` (ISO 8601)."""
        if self._path is not None:
            st = self._path.stat()
            modified = dt.datetime.fromtimestamp(st.st_mtime, dt.UTC)
            return {"size": st.st_size, "etag": None, "last_modified": modified.isoformat()}
        return _version(self._call("head", self.key))

    def stream(self) -> tuple[dict[str, Any], Iterator[bytes]]:
        """The file's bytes as they arrive, and the :meth:`stat` of the version being
        read (on object storage, the one this GET returns, which may be newer than an
        earlier HEAD said). A transfer broken beyond the retries is a StorageError."""
        if self._path is not None:
            version = self.stat()
            path = self._path

            def local() -> Iterator[bytes]:
                with path.open("rb") as f:
                    yield from iter(lambda: f.read(1 << 22), b"")

            return version, local()
        result = self._call("get", self.key)
        chunks = iter(result)

        def remote() -> Iterator[bytes]:
            while True:
                try:
                    chunk = next(chunks)
                except StopIteration:
                    return
                except Exception as err:
                    raise _storage_error(self, err) from err
                yield bytes(chunk)

        return _version(result.meta), remote()

    def read_ranges(self, starts: Sequence[int], lengths: Sequence[int]) -> list[bytes]:
        """Byte ranges of a file: one request each, adjacent ones merged (remote), all
        in flight at once."""
        if not starts:
            return []
        if self._path is not None:
            out = []
            fd = os.open(self._path, os.O_RDONLY)
            try:
                for start, length in zip(starts, lengths, strict=True):
                    out.append(os.pread(fd, length, start))
            finally:
                os.close(fd)
            return out
        ends = [s + n for s, n in zip(starts, lengths, strict=True)]
        parts = self._call("get_ranges", self.key, starts=list(starts), ends=ends)
        return [bytes(p) for p in parts]

    def iterdir(self) -> Iterator[Location]:
        """The entries directly below (files and folders), in name order."""
        if self._path is not None:
            if self._path.is_dir():
                yield from (Location(p) for p in sorted(self._path.iterdir()))
            return
        prefix = f"{self.key}/" if self.key else ""
        listing = self._call("list_with_delimiter", prefix or None)
        names = [p.rstrip("/") for p in listing["common_prefixes"]]
        names += [o["path"] for o in listing["objects"]]
        for name in sorted(names):
            yield self._remote(name)

    def files(self) -> Iterator[tuple[Location, int]]:
        """Every file at any depth below, with its size, in name order."""
        if self._path is not None:
            if self._path.is_file():
                yield self, self._path.stat().st_size
                return
            base = self._path
            paths = [Path(folder) / name for folder, _, names in os.walk(base) for name in names]
            for path in sorted(paths, key=lambda p: p.relative_to(base).as_posix()):
                yield Location(path), path.stat().st_size  # key order, as object stores list
            return
        for meta in self._list(self.key + "/" if self.key else ""):
            yield self._remote(meta["path"]), int(meta["size"])

    # -- writing ---------------------------------------------------------------

    def write_bytes(self, data: bytes, *, overwrite: bool = True) -> None:
        """Write a whole file; a reader sees the old one or the new one, never half.

        Parameters
        ----------
        data
            The file's bytes.
        overwrite
            False: refuse (:class:`~xclay.errors.OutputExistsError`) when the file exists,
            checked by the store itself at the write (S3 ``If-None-Match``): of two
            writers, exactly one succeeds.
        """
        self._refuse_read_only()
        if self._path is not None:
            write_file(self._path, data, overwrite=overwrite)
            return
        try:
            self._call("put", self.key, data, mode="overwrite" if overwrite else "create")
        except FileExistsError as err:
            raise OutputExistsError(f"{self} already exists.") from err

    def write_text(self, text: str, *, overwrite: bool = True) -> None:
        self.write_bytes(text.encode("utf-8"), overwrite=overwrite)

    def write_json(self, data: Any, *, overwrite: bool = True) -> None:
        self.write_bytes(
            json.dumps(data, indent=1, default=str).encode("utf-8"), overwrite=overwrite
        )

    def upload(self, source: Path) -> None:
        """Copy a local file here (remote: one PUT, multipart for large files, visible
        only once whole)."""
        self._refuse_read_only()
        if self._path is not None:
            write_file_from(self._path, source)
            return
        with source.open("rb") as f:
            self._call("put", self.key, f, mode="overwrite")

    def download(self, target: Path) -> None:
        """Copy this file to a local path (written under a temporary name first)."""
        if self._path is not None:
            write_file_from(target, self._path)
            return
        tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            _, chunks = self.stream()
            with tmp.open("wb") as f:
                for chunk in chunks:
                    f.write(chunk)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self) -> None:
        """Remove the file, or the folder and everything below it; nothing there: no-op."""
        self._refuse_read_only()
        if self._path is not None:
            if self._path.is_dir() and not self._path.is_symlink():
                shutil.rmtree(self._path)
            elif self._path.exists() or self._path.is_symlink():
                self._path.unlink()
            return
        keys = [m["path"] for m in self._list(self.key + "/" if self.key else "")]
        if self.is_file():
            keys.append(self.key)
        for start in range(0, len(keys), 1000):
            self._call("delete", keys[start : start + 1000])

    def mkdir(self) -> None:
        """Make the folder (and its parents); on object storage folders need no making."""
        if self._path is not None:
            self._path.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def staged(self, *, overwrite: bool) -> Iterator[Path]:
        """A local path to write a file (or a folder) into, moved here whole on success.

        For tools that write files themselves (GDAL, pyarrow): locally the path is a
        temporary name beside the target, renamed into place; remotely a temporary
        file uploaded in one PUT. On error nothing is left here.
        """
        self._refuse_read_only()
        if not overwrite and self.exists():
            raise OutputExistsError(
                f"{self} already exists; pass overwrite=True (CLI: --overwrite) to replace "
                "it, or choose another path."
            )
        if self._path is not None:
            with atomic_output(self._path, overwrite=True) as tmp:
                yield tmp
            return
        with tempfile.TemporaryDirectory(prefix="xclay-") as folder:
            tmp = Path(folder) / (self.name or "object")
            yield tmp
            if tmp.is_dir():
                for path in sorted(tmp.rglob("*")):
                    if path.is_file():
                        (self / path.relative_to(tmp).as_posix()).upload(path)
            else:
                self.upload(tmp)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[Path]:
        """A local path with this file's bytes (remote: downloaded to a temporary file,
        removed after)."""
        if self._path is not None:
            yield self._path
            return
        with tempfile.TemporaryDirectory(prefix="xclay-") as folder:
            tmp = Path(folder) / (self.name or "object")
            self.download(tmp)
            yield tmp

    # -- for other libraries ---------------------------------------------------

    def zarr_store(self, *, read_only: bool = False) -> Any:
        """What zarr-python and xarray open: the local path, or a
        ``zarr.storage.ObjectStore`` over this key's prefix (sharing its client)."""
        if self._path is not None:
            return str(self._path)
        from zarr.storage import ObjectStore

        store = _store_for(self.url, self.options)  # a store rooted at this key
        return ObjectStore(store, read_only=read_only or self.scheme in _READ_ONLY_SCHEMES)

    def arrow(self) -> tuple[Any, str]:
        """What pyarrow opens: ``(filesystem, path)``: ``(None, local path)``, or
        obstore's fsspec filesystem over this place's store and ``bucket/key`` (ranged
        reads: a footer, the row groups and columns asked for)."""
        if self._path is not None:
            return None, str(self._path)
        from obstore.fsspec import FsspecStore

        from xclay.storage.credentials import retry_config, store_config

        config, client = store_config(self.scheme, self.options)
        build: Any = FsspecStore  # its overloads are per scheme; the config is the scheme's
        fs = build(
            self.scheme,
            config=config or None,
            client_options=client or None,
            retry_config=retry_config(self.options),
        )
        return fs, self.url.split("://", 1)[1]

    def gdal_path(self) -> str:
        """The path GDAL (rasterio) opens: local as it is, object stores through GDAL's
        virtual file systems (``/vsis3/``, ``/vsigs/``, ``/vsiaz/``, ``/vsicurl/``)."""
        if self._path is not None:
            return str(self._path)
        scheme = self.scheme
        bucket_and_key = self.url.split("://", 1)[1]
        if scheme in ("s3", "s3a"):
            return f"/vsis3/{bucket_and_key}"
        if scheme == "gs":
            return f"/vsigs/{bucket_and_key}"
        if scheme in ("az", "azure", "abfs", "abfss", "adl"):
            return f"/vsiaz/{bucket_and_key}"
        return f"/vsicurl/{self.url}"

    # -- the store -------------------------------------------------------------

    def _store(self) -> Any:
        return _store_for(self.root, self.options)

    def _list(self, prefix: str, limit: int | None = None) -> Iterator[dict[str, Any]]:
        import obstore

        seen = 0
        try:
            for batch in obstore.list(self._store(), prefix or None, chunk_size=1000):
                for meta in batch:
                    yield dict(meta)
                    seen += 1
                    if limit is not None and seen >= limit:
                        return
        except Exception as err:
            raise _storage_error(self, err) from err

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        import obstore

        try:
            return getattr(obstore, name)(self._store(), *args, **kwargs)
        except Exception as err:
            translated = _storage_error(self, err)
            if isinstance(translated, FileNotFoundError | FileExistsError):
                raise translated from err
            raise translated from err

    def _refuse_read_only(self) -> None:
        if self.scheme in _READ_ONLY_SCHEMES:
            raise StorageError(
                f"{self}: HTTP locations are read-only; write to a path or a bucket "
                "(s3://, gs://, az://)."
            )


# What a caller may hand in as a place (a Location is passed through as it is).
Where: TypeAlias = str | os.PathLike[str] | Location


# --------------------------------------------------------------------------- stores

_STORES: dict[tuple[str, str], Any] = {}
_STORES_LOCK = threading.Lock()


def _store_for(root: str, options: Mapping[str, Any]) -> Any:
    """One obstore store per root and options, per process (each holds a client and its
    connection pool)."""
    key = (root, json.dumps(options, sort_keys=True, default=str))
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            store = _STORES[key] = _build_store(root, options)
        return store


def _build_store(root: str, options: Mapping[str, Any]) -> Any:
    try:
        from obstore.store import from_url
    except ImportError as err:
        raise MissingDependencyError(
            f'{root}: object storage needs obstore: pip install "xclay[cloud]"'
        ) from err
    from xclay.storage.credentials import retry_config, store_config

    scheme = root.split("://", 1)[0].lower()
    config, client = store_config(scheme, options)
    build: Any = from_url  # its overloads are per scheme; the config is the scheme's
    try:
        return build(
            root,
            config=config or None,
            client_options=client or None,
            retry_config=retry_config(options),
        )
    except Exception as err:
        raise StorageError(f"{root}: cannot set up its store: {_first_line(err)}") from err


def _version(meta: Any) -> dict[str, Any]:
    """An object's size, ETag and modification time, from obstore's metadata."""
    modified = meta.get("last_modified")
    return {
        "size": int(meta["size"]),
        "etag": meta.get("e_tag"),
        "last_modified": modified.isoformat() if isinstance(modified, dt.datetime) else None,
    }


# --------------------------------------------------------------------------- errors


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _storage_error(where: Location, err: BaseException) -> Exception:
    """An obstore error as one line naming the URL and why: no such bucket, access
    denied, no credentials, no such object, already exists."""
    from obstore import exceptions as ox

    text = str(err)
    if "NoSuchBucket" in text:
        bucket = where.root.split("://", 1)[1]
        return StorageError(f"{where}: no such bucket {bucket!r} (at this endpoint).")
    if isinstance(err, ox.AlreadyExistsError | ox.PreconditionError):
        return OutputExistsError(f"{where} already exists.")
    if isinstance(err, ox.NotFoundError | FileNotFoundError):
        return _NotFound(f"{where}: no such file or object.")
    if isinstance(err, ox.UnauthenticatedError) or "InvalidAccessKeyId" in text:
        return StorageError(
            f"{where}: the store did not accept the credentials (check AWS_ACCESS_KEY_ID / "
            "AWS_PROFILE, or the cloud's own login)."
        )
    if isinstance(err, ox.PermissionDeniedError) or "AccessDenied" in text:
        return StorageError(
            f"{where}: access denied (the credentials may not read or write there)."
        )
    if "credential" in text.lower() and ("no " in text.lower() or "missing" in text.lower()):
        return StorageError(
            f"{where}: no credentials found; set them as the cloud's tools read them "
            "(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...), or for a "
            "public bucket the storage option skip_signature: true."
        )
    if isinstance(err, ox.UnknownConfigurationKeyError):
        return StorageError(f"{where}: unknown storage option ({_first_line(err)}).")
    if isinstance(err, StorageError | MissingDependencyError):
        return err
    return StorageError(f"{where}: {_first_line(err)}")


class _NotFound(StorageError, FileNotFoundError):
    """A file or object that does not exist (a FileNotFoundError, as locally)."""
