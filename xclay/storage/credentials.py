"""Settings of a remote store, as each cloud's own tools find them.

obstore reads the environment itself (``AWS_*``, ``GOOGLE_*``, ``AZURE_*``); this adds
what the AWS CLI and boto3 users also rely on: a named profile's keys, region and
endpoint from ``~/.aws/credentials`` and ``~/.aws/config`` (``AWS_PROFILE``, else
``default``), and plain HTTP to an ``http://`` endpoint (a local MinIO or moto server)
without a separate switch. Options given by the caller win over both.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CLIENT_OPTIONS",
    "FSSPEC_OPTIONS",
    "RETRY_OPTIONS",
    "obstore_options",
    "retry_config",
    "store_config",
]

# obstore's client options (HTTP); every other storage option is its store's configuration.
CLIENT_OPTIONS = frozenset(
    {
        "allow_http",
        "allow_invalid_certificates",
        "connect_timeout",
        "default_content_type",
        "default_headers",
        "pool_idle_timeout",
        "pool_max_idle_per_host",
        "proxy_url",
        "proxy_ca_certificate",
        "proxy_excludes",
        "randomize_addresses",
        "read_timeout",
        "timeout",
        "user_agent",
    }
)


# How transient faults (HTTP 5xx, timeouts, dropped connections) are retried: exponential
# backoff from 0.1 s, doubling to at most 15 s, up to `max_retries` times and for at most
# `retry_timeout` seconds a request; then the request fails (and with it the region).
RETRY_OPTIONS = {"max_retries": 10, "retry_timeout": 180.0}


def retry_config(options: Mapping[str, Any]) -> dict[str, Any]:
    """obstore's retry configuration from the storage options ``max_retries`` and
    ``retry_timeout`` (seconds), defaults :data:`RETRY_OPTIONS`.

    Parameters
    ----------
    options
        The storage options (other keys are ignored).
    """
    import datetime as dt

    retries = int(options.get("max_retries", RETRY_OPTIONS["max_retries"]))
    seconds = float(options.get("retry_timeout", RETRY_OPTIONS["retry_timeout"]))
    return {"max_retries": retries, "retry_timeout": dt.timedelta(seconds=seconds)}


# s3fs/gcsfs/adlfs spellings (what xarray users pass as storage_options) -> obstore's keys.
FSSPEC_OPTIONS = {
    "anon": "skip_signature",
    "key": "access_key_id",
    "secret": "secret_access_key",
    "endpoint_url": "endpoint",
    "region_name": "region",
    "requester_pays": "request_payer",
    "account_name": "account_name",
    "account_key": "account_key",
    "sas_token": "sas_key",
}


def obstore_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options with fsspec's names (``anon``, ``key``, ``secret``,
    ``endpoint_url``, ``client_kwargs={"endpoint_url": ...}``, ...) spelt as obstore's;
    obstore's own names pass as they are.

    Parameters
    ----------
    options
        Storage options in either spelling.
    """
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key == "client_kwargs" and isinstance(value, Mapping):
            out.update(obstore_options(value))
        elif key == "token" and not isinstance(value, str):
            continue  # gcsfs's token modes ("anon", "google_default", ...) map to nothing
        else:
            out[FSSPEC_OPTIONS.get(key, key)] = value
    return out


def store_config(scheme: str, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The store configuration and client options for a ``scheme`` root.

    Parameters
    ----------
    scheme
        The URL scheme (``s3``, ``gs``, ``az``, ``https``, ...).
    options
        The caller's storage options (obstore's keys for the scheme, client options
        included; the retry options are left to :func:`retry_config`); they take
        precedence.

    Returns
    -------
    tuple of dict
        ``(config, client_options)`` for ``obstore.store.from_url``.
    """
    options = obstore_options(options)
    config = {
        k: v for k, v in options.items() if k not in CLIENT_OPTIONS and k not in RETRY_OPTIONS
    }
    client = {k: v for k, v in options.items() if k in CLIENT_OPTIONS}
    if scheme == "http":
        client.setdefault("allow_http", True)  # an http:// URL asks for plain HTTP
    if scheme in ("s3", "s3a"):
        for key, value in _aws_profile().items():
            config.setdefault(key, value)
        endpoint = str(config.get("endpoint") or _aws_endpoint() or "")
        if endpoint.startswith("http://"):
            client.setdefault("allow_http", True)
        if endpoint and "endpoint" not in config:
            config["endpoint"] = endpoint
    return config, client


def _aws_endpoint() -> str | None:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"):
        if os.environ.get(name):
            return os.environ[name]
    return None


def _aws_profile() -> dict[str, Any]:
    """Keys, region and endpoint of the AWS profile in use, where the environment does
    not give them (the environment wins, as with the AWS CLI)."""
    profile = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    credentials = _ini(
        os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials"
    )
    config = _ini(os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config")
    keys = credentials.get(profile, {})
    settings = config.get(profile if profile == "default" else f"profile {profile}", {})
    out: dict[str, Any] = {}
    if not os.environ.get("AWS_ACCESS_KEY_ID") and keys.get("aws_access_key_id"):
        out["access_key_id"] = keys["aws_access_key_id"]
        out["secret_access_key"] = keys.get("aws_secret_access_key", "")
        if keys.get("aws_session_token"):
            out["token"] = keys["aws_session_token"]
    region_set = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region_set and settings.get("region"):
        out["region"] = settings["region"]
    if not _aws_endpoint() and settings.get("endpoint_url"):
        out["endpoint"] = settings["endpoint_url"]
    return out


def _ini(path: str | os.PathLike[str]) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return {}
    return {name: dict(parser[name]) for name in parser.sections()}
