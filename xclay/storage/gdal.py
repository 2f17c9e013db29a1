"""GDAL settings for reading rasters where they lie: STAC assets on ``https://``, ``s3://``,
``gs://`` or ``az://`` are read by GDAL's virtual file systems (``/vsicurl/``, ``/vsis3/``,
...) through rasterio and odc-stac, as they are, without a download first.

GDAL's defaults suit local files. For a Cloud-Optimized GeoTIFF behind HTTP they cost
requests: GDAL lists the file's folder on open (looking for sidecar files; on a bucket of
a million scenes a LIST of a million keys), probes ``.aux.xml``, ``.ovr`` and ``.msk``
sidecars one HEAD or GET each, speaks HTTP/1.1 (one connection per concurrent read), and
gives up on the first 503 SlowDown an object store answers under load.
:data:`CLOUD_DEFAULTS` says otherwise; :func:`gdal_settings` merges them with what the
user set; :func:`odc_driver` and :func:`gdal_env` apply them to a block of work.

Why a reader driver and not ``odc.stac.configure_rio(cloud_defaults=True, ...)``: in
odc-stac 0.5 ``configure_rio`` sets a process-wide configuration that stays on for every
later load (a global switch), and the settings a lazy load uses are captured when the
load is *built* (``ReaderDriver.capture_env``), stored in its Dask graph and restored
around every chunk read, in whatever thread or Dask worker runs it. That capture drops
the keys odc-stac reserves for its AWS session (``AWS_S3_ENDPOINT``, ``AWS_REGION``,
``AWS_NO_SIGN_REQUEST``, ...) unless they came from ``configure_rio``, so a
``rasterio.Env`` around the load would lose the endpoint of a MinIO or local S3 server.
The driver of :func:`odc_driver` is odc-stac's own rasterio driver whose captured
settings are xclay's: scoped to the one load, carried in its graph to every worker, the
endpoint included, and nothing left switched on after.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from xclay.errors import StorageError

__all__ = ["CLOUD_DEFAULTS", "GdalOptions", "gdal_env", "gdal_settings", "odc_driver"]

# A GDAL configuration option's value as callers may give it (GDAL takes text).
GdalOptions = Mapping[str, str | int | float | bool]

CLOUD_DEFAULTS: Mapping[str, str] = {
    # Open a file without listing its folder (GDAL looks for sidecars in the listing): one
    # request instead of a LIST of the bucket's prefix.
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    # Only these are files on a server: no HEAD/GET for .aux.xml, .ovr, .msk, .imd, ...
    # sidecars of every asset opened.
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.TIF,.TIFF,.jp2,.JP2",
    # HTTP/2 where the server negotiates it (TLS ALPN: S3, GCS, Azure, CDNs), and the
    # concurrent range reads of a file multiplexed on one connection. Over plain http://
    # GDAL stays on HTTP/1.1 ("2" would add an h2c Upgrade to every request, which
    # object stores and proxies do not take up).
    "GDAL_HTTP_VERSION": "2TLS",
    "GDAL_HTTP_MULTIPLEX": "YES",
    # Object stores answer 503 SlowDown (and 429, 500, 502, 504) under load: retry
    # (GDAL backs off exponentially from the delay, with jitter) for a few minutes, as
    # xclay's own object-store reads do, instead of failing the chunk on the first one.
    "GDAL_HTTP_MAX_RETRY": "10",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    # Cache the blocks read from a remote file (25 MB per open file, GDAL's default size):
    # odc-stac reads a COG's tiles window by window, and neighbouring windows share them.
    "VSI_CACHE": "TRUE",
}

# Set for an S3-compatible endpoint that is not AWS (MinIO, Ceph, a local test server):
# GDAL reads neither AWS_ENDPOINT_URL nor ~/.aws/config's endpoint_url.
ENDPOINT_KEYS = ("AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING")

# Credentials are the cloud's (environment, profiles, instance roles): never an option.
_SECRET_KEYS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"})


def gdal_settings(
    gdal_options: GdalOptions | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The GDAL configuration a cloud read runs under: xclay's defaults, the user's
    settings over them.

    From lowest to highest precedence:

    1. :data:`CLOUD_DEFAULTS`;
    2. an S3 endpoint from the environment the AWS tools read (``AWS_ENDPOINT_URL_S3``,
       ``AWS_ENDPOINT_URL``, the profile's ``endpoint_url``) as GDAL spells it:
       ``AWS_S3_ENDPOINT`` (host and port), ``AWS_HTTPS=NO`` for ``http://``,
       ``AWS_VIRTUAL_HOSTING=FALSE`` (bucket in the path, as MinIO and local servers
       serve it);
    3. the user's own environment variables of any of those names, and the options of
       a ``rasterio.Env`` the call runs in;
    4. ``storage_options`` given with the call (``endpoint``, ``skip_signature``,
       ``region``, in obstore's or fsspec's spelling), as GDAL spells them;
    5. ``gdal_options``.

    Parameters
    ----------
    gdal_options
        GDAL configuration options (``{"GDAL_HTTP_MAX_RETRY": 3}``); booleans become
        ``YES``/``NO``, numbers text. Credentials are refused: they come from the
        environment.
    storage_options
        The storage options the call's object-store locations use.

    Returns
    -------
    dict
        Option name -> value, every value text.
    """
    settings: dict[str, str] = dict(CLOUD_DEFAULTS)
    settings.update(_endpoint_settings(_ambient_endpoint()))
    user = {**{k: os.environ[k] for k in settings if k in os.environ}, **_rasterio_env()}
    settings.update({k: v for k, v in user.items() if k in settings})
    settings.update(_storage_settings(storage_options or {}))
    given = {str(k): _text(v) for k, v in (gdal_options or {}).items()}
    secrets = sorted(_SECRET_KEYS & set(given))
    if secrets:
        raise StorageError(
            f"gdal_options {secrets}: credentials are not GDAL options here; set them in the "
            "environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) as the cloud's tools read them."
        )
    settings.update(given)
    return settings


@contextlib.contextmanager
def gdal_env(settings: Mapping[str, str]) -> Iterator[None]:
    """Run a block of rasterio work in this thread under ``settings``
    (:func:`gdal_settings`); GDAL's configuration is as it was after.

    Parameters
    ----------
    settings
        GDAL configuration options.
    """
    import rasterio

    with rasterio.Env(**settings):
        yield


def odc_driver(settings: Mapping[str, str]) -> Any:
    """odc-stac's rasterio reader driver, reading under ``settings``: pass it as
    ``odc.stac.load(..., driver=odc_driver(settings))``.

    The settings are captured into the load's Dask graph and set around every chunk read
    (in any thread, on any Dask worker); settings of a surrounding ``rasterio.Env`` or of
    ``odc.stac.configure_rio`` for other options are kept.

    Parameters
    ----------
    settings
        GDAL configuration options (:func:`gdal_settings`).

    Returns
    -------
    odc.loader.RioDriver
        The driver; it pickles (to Dask workers) as its settings.
    """
    from odc.loader import RioDriver

    class SettingsDriver(RioDriver):
        def __init__(self, values: Mapping[str, str]) -> None:
            super().__init__()
            self.settings = dict(values)

        def capture_env(self) -> dict[str, Any]:
            captured: dict[str, Any] = super().capture_env()
            return {**captured, **self.settings}

        def __reduce__(self) -> tuple[Any, tuple[dict[str, str]]]:
            return odc_driver, (self.settings,)

    return SettingsDriver(settings)


def _text(value: str | int | float | bool) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    return str(value)


def _ambient_endpoint() -> str:
    """The S3 endpoint the environment and the AWS profile give (not AWS's own)."""
    from xclay.storage.credentials import store_config

    config, _ = store_config("s3", {})
    return str(config.get("endpoint") or "")


def _endpoint_settings(endpoint: str) -> dict[str, str]:
    if not endpoint:
        return {}
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    host = parsed.netloc + parsed.path.rstrip("/")
    return {
        "AWS_S3_ENDPOINT": host,
        "AWS_HTTPS": "NO" if parsed.scheme == "http" else "YES",
        "AWS_VIRTUAL_HOSTING": "FALSE",
    }


def _storage_settings(storage_options: Mapping[str, Any]) -> dict[str, str]:
    from xclay.storage.credentials import obstore_options

    options = obstore_options(storage_options)
    out = _endpoint_settings(str(options.get("endpoint") or ""))
    if str(options.get("skip_signature", "")).lower() in ("true", "1", "yes"):
        out["AWS_NO_SIGN_REQUEST"] = "YES"
    if options.get("region"):
        out["AWS_REGION"] = str(options["region"])
    return out


def _rasterio_env() -> dict[str, str]:
    """The options of the rasterio.Env this thread runs in, if any."""
    try:
        import rasterio.env
    except ImportError:
        return {}
    if not rasterio.env.hasenv():
        return {}
    return {str(k): _text(v) for k, v in rasterio.env.getenv().items()}
