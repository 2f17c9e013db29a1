"""kvikIO handles for a location: what reads a file's bytes straight into GPU memory.

A local file is a ``kvikio.CuFile`` (GPUDirect Storage where the system has it). An S3
object or an HTTP(S) URL is a ``kvikio.RemoteFile`` (libcurl, ranged GETs on kvikIO's
thread pool, into host or device memory). kvikIO reads S3 settings only from its
arguments and the environment, and not all that obstore reads (the region only from
``AWS_DEFAULT_REGION``), so the handle is given the settings of the location's own store:
its storage options, then the environment and AWS profile as
:func:`xclay.storage.credentials.store_config` finds them. kvikIO reads no other object
store (``gs://``, ``az://``): :func:`kvikio_unreadable` says so, for the caller to take
another path.
"""

from __future__ import annotations

import os
from typing import Any

from xclay.storage.location import Location

__all__ = ["kvikio_file", "kvikio_unreadable"]

_S3 = ("s3", "s3a")
_HTTP = ("http", "https")


def kvikio_unreadable(where: Location) -> str | None:
    """Why kvikIO cannot read ``where``, or None when it can (local files, S3, HTTP).

    Parameters
    ----------
    where
        The file or object to read.
    """
    if where.is_local or where.scheme in _S3 + _HTTP:
        return None
    return f"kvikIO reads local files, S3 and HTTP(S), not {where.scheme}:// objects"


def kvikio_file(kvikio: Any, where: Location, nbytes: int | None = None) -> Any:
    """A kvikIO handle that reads ``where``: ``pread(buf, size, file_offset)`` into host or
    device memory, returning a future of the bytes read.

    Parameters
    ----------
    kvikio
        The imported ``kvikio`` module.
    where
        A local file, an S3 object or an HTTP(S) URL (:func:`kvikio_unreadable` is None).
    nbytes
        For a remote file: its size, or at least the end of every range that will be
        read from it (kvikIO refuses reads past it); ``None``: asked of the server (one
        ``HEAD`` request). Ignored for local files.

    Returns
    -------
    kvikio.CuFile or kvikio.RemoteFile
        Close it after use (``close()``).
    """
    if where.is_local:
        return kvikio.CuFile(where.path, "r")
    reason = kvikio_unreadable(where)
    if reason is not None:
        raise ValueError(f"{where}: {reason}.")
    if where.scheme in _HTTP:
        return kvikio.RemoteFile.open_http(where.url, nbytes)
    settings = _s3_settings(where)
    bucket_and_key = where.url.split("://", 1)[1]
    if settings["skip_signature"]:  # a public bucket: plain HTTP GETs, nothing signed
        endpoint = settings["endpoint"] or f"https://s3.{settings['region']}.amazonaws.com"
        return kvikio.RemoteFile.open_http(f"{endpoint.rstrip('/')}/{bucket_and_key}", nbytes)
    return kvikio.RemoteFile.open_s3_url(
        f"s3://{bucket_and_key}",
        nbytes,
        aws_region_name=settings["region"],
        aws_access_key_id=settings["access_key_id"],
        aws_secret_access_key=settings["secret_access_key"],
        aws_endpoint_url=settings["endpoint"],
        aws_session_token=settings["token"],
    )


def _s3_settings(where: Location) -> dict[str, Any]:
    """Region, endpoint, keys and anonymity of an S3 location, as its obstore store has them
    (storage options first, then the environment and the AWS profile)."""
    from xclay.storage.credentials import store_config

    config, _ = store_config(where.scheme, where.options)
    plain = {str(k).lower().removeprefix("aws_"): v for k, v in config.items()}
    env = os.environ.get

    def setting(name: str, *variables: str) -> str | None:
        value = plain.get(name)
        if value is None:
            value = next((env(v) for v in variables if env(v)), None)
        return str(value) if value is not None else None

    skip = str(plain.get("skip_signature", env("AWS_SKIP_SIGNATURE") or "")).lower()
    return {
        "region": setting("region", "AWS_REGION", "AWS_DEFAULT_REGION") or "us-east-1",
        "endpoint": setting("endpoint", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        "access_key_id": setting("access_key_id", "AWS_ACCESS_KEY_ID"),
        "secret_access_key": setting("secret_access_key", "AWS_SECRET_ACCESS_KEY"),
        "token": setting("token", "AWS_SESSION_TOKEN") or setting("session_token"),
        "skip_signature": skip in ("1", "true", "yes"),
    }
