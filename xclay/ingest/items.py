"""STAC items: loaded (files, collections, searches), made from local GeoTIFFs
(:func:`stac_item`, with rio-stac), filtered by place and time, and described (platform,
band names and metadata, wavelengths, solar day)."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from xclay._hashing import sha256_file
from xclay.errors import IngestError, MissingDependencyError, StorageError
from xclay.ingest.itemfiles import ITEMS_FORMATS, absolute_href, item_batches, items_format
from xclay.sensors import get_sensor, platform_named
from xclay.storage import Location, StorageOptions, location

if TYPE_CHECKING:
    import pystac


def require_io() -> None:
    """Refuse STAC work without odc-stac and pystac (the ``io`` extra), saying how to get them."""
    try:
        import odc.stac  # noqa: F401
        import pystac  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            'STAC ingestion needs odc-stac and pystac: pip install "xclay[io]"'
        ) from err


def load_items(source: Any, *, storage_options: StorageOptions | None = None) -> list[pystac.Item]:
    """Items from a list of Items, an ItemCollection, an ItemSearch, or a path or URL of an
    ItemCollection/FeatureCollection JSON, a catalog.json, an Item JSON, newline-delimited
    JSON or stac-geoparquet.

    Parameters
    ----------
    source
        One Item, an iterable of Items, an ItemCollection, a pystac-client ItemSearch (or
        any object with an ``items()`` method, such as a catalog), or where an item
        collection, item or catalog JSON file, a newline-delimited JSON file (one Item a
        line) or stac-geoparquet (a file, or a folder of them) lies: a path (str or
        path-like), a URL
        (``s3://``, ``gs://``, ``az://``, ``http(s)://``, ``file://``) or a
        :class:`~xclay.storage.Location`; a catalog's items are read recursively.
        Relative asset hrefs are relative to the file, wherever it lies.
    storage_options
        Settings for a URL's store beyond the environment (:func:`xclay.storage.location`).
    """
    require_io()
    import pystac

    if isinstance(source, pystac.Item):
        return [source]
    if isinstance(source, pystac.ItemCollection):
        return list(source)
    if hasattr(source, "items") and callable(source.items) and not isinstance(source, Mapping):
        return list(source.items())  # pystac_client.ItemSearch, or a catalog object
    if isinstance(source, str | os.PathLike | Location):
        return _items_from_file(location(source, storage_options))
    if isinstance(source, Iterable):
        items = list(source)
        bad = [type(i).__name__ for i in items if not isinstance(i, pystac.Item)]
        if bad:
            raise IngestError(f"expected pystac Items, got {sorted(set(bad))}.")
        return items
    raise IngestError(
        f"cannot read STAC items from {type(source).__name__}; pass Items, an ItemCollection, an "
        "ItemSearch, or the path or URL of an item collection or catalog JSON file."
    )


def _items_from_file(path: Location) -> list[pystac.Item]:
    """The items of a file (local or remote): a FeatureCollection (an ItemCollection),
    a JSON array of Features, one Feature, or a catalog or collection (its items,
    recursively); newline-delimited JSON or stac-geoparquet (:mod:`xclay.ingest.itemfiles`).
    Relative asset hrefs are relative to the file, as STAC says (not to the working
    folder)."""
    import pystac

    if items_format(path) != "json":  # stac-geoparquet or newline-delimited JSON
        dicts = (d for batch in item_batches(path) for d in batch)
        return [_item_from_feature(d, k, path, "rows") for k, d in enumerate(dicts)]
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise IngestError(f"STAC file {path} does not exist.") from err
    except IsADirectoryError as err:
        raise IngestError(f"STAC file {path} is a folder, not a JSON file.") from err
    except StorageError:
        raise  # one line naming the URL and why (no such bucket, access denied, ...)
    except OSError as err:
        raise IngestError(f"{path} is not readable ({err}).") from err
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as err:
        raise IngestError(
            f"{path} is not a JSON text file, nor another items file xclay reads; expected "
            f"{ITEMS_FORMATS}."
        ) from err
    except json.JSONDecodeError as err:
        raise IngestError(
            f"{path} is not readable JSON ({err}); expected {ITEMS_FORMATS}."
        ) from err
    features: Any
    kind: str | None
    if isinstance(data, list):
        features, kind = data, "array"
    elif isinstance(data, dict):
        kind = data.get("type")
        if kind in ("Catalog", "Collection"):
            # pystac resolves a catalog's relative hrefs from its own links, and reads its
            # children where they lie through the same kind of location.
            catalog = pystac.read_file(path.url, stac_io=_location_io(path.options))
            return list(catalog.get_items(recursive=True))  # type: ignore[attr-defined]
        if kind == "FeatureCollection":
            features = data.get("features")
            if not isinstance(features, list):
                raise IngestError(f"{path} is a FeatureCollection without a 'features' list.")
        elif kind == "Feature":
            features = [data]
        else:
            raise IngestError(
                f"{path} is a JSON object of type {kind!r}, not a STAC item collection, item "
                "or catalog."
            )
    else:
        raise IngestError(
            f"{path} holds a JSON {type(data).__name__}; expected a STAC item collection, an "
            "array of Items, an Item, or a catalog."
        )
    items = [_item_from_feature(f, k, path, kind) for k, f in enumerate(features)]
    for item in items:
        for asset in item.assets.values():
            asset.href = absolute_href(asset.href, path.url)
    return items


def _location_io(options: Mapping[str, Any]) -> pystac.StacIO:
    """A pystac StacIO that reads every href through :func:`xclay.storage.location` (with
    ``options``): a catalog's children on object storage as its root."""
    from pystac.stac_io import DefaultStacIO

    class LocationIO(DefaultStacIO):
        def read_text_from_href(self, href: str) -> str:
            try:
                return location(href, options).read_text()
            except FileNotFoundError as err:
                raise IngestError(f"STAC file {href} does not exist.") from err

    return LocationIO()


def _item_from_feature(feature: Any, k: int, path: Location, kind: str | None) -> pystac.Item:
    import pystac

    where = f"{path}" if kind == "Feature" else f"entry {k} of {path}"
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        got = feature.get("type") if isinstance(feature, dict) else type(feature).__name__
        raise IngestError(f"{where} is not a STAC Item (a GeoJSON Feature); it is {got!r}.")
    try:
        return pystac.Item.from_dict(feature, preserve_dict=False)
    except Exception as err:  # pystac raises KeyError, TypeError, STACError... on bad Items
        raise IngestError(
            f"{where} is not a valid STAC Item ({type(err).__name__}: {err})."
        ) from err


def stac_item(
    assets: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]],
    *,
    bands: Sequence[str] | None = None,
    wavelengths: Sequence[float] | Mapping[str, float] | None = None,
    datetime: str | dt.datetime | None = None,
    id: str | None = None,
    platform: str | None = None,
    collection: str | None = None,
) -> pystac.Item:
    """A STAC Item for local GeoTIFFs (rio-stac), with band names, wavelengths and checksums.

    Parameters
    ----------
    assets
        One multi-band GeoTIFF, or a mapping band name -> single-band GeoTIFF.
    bands
        Names of the bands of a multi-band file, in order (default ``b1..bN``).
    wavelengths
        Central wavelengths (micrometres), recorded as ``eo:bands`` ``center_wavelength``.
    datetime
        Acquisition time (ISO string or datetime); default: unknown (the
        file's modification time is not an acquisition time), recorded as
        1900-01-01 (before any Earth observation satellite) with
        ``xclay:datetime_unknown``: datacubes made from it, by xclay or by
        ``odc.stac.load`` then :func:`xclay.as_datacube`, have an unknown time
        (NaT), never a real date.
    id, platform, collection
        Item id (default: the first file's stem), ``platform`` property (a
        sensor-table key), collection id.
    """
    try:
        from rio_stac import create_stac_item
    except ImportError as err:
        raise MissingDependencyError(
            'making STAC items from GeoTIFFs needs rio-stac: pip install "xclay[io]"'
        ) from err

    when, unknown = _parse_datetime(datetime)
    files = (
        {"data": Path(assets)}
        if not isinstance(assets, Mapping)
        else {k: Path(v) for k, v in assets.items()}
    )
    for name, path in files.items():
        if not path.is_file():
            raise IngestError(f"GeoTIFF for {name!r} does not exist: {path}.")
    for path in files.values():
        _require_georeferenced(path)
    first = next(iter(files.values()))
    item_id = id or first.stem
    item: pystac.Item | None = None
    for asset_name, path in files.items():
        part = create_stac_item(
            str(path),
            input_datetime=when,
            id=item_id,
            asset_name=asset_name,
            asset_roles=["data"],
            with_proj=True,
            with_raster=True,
            with_eo=True,
        )
        if item is None:
            item = part
        else:
            item.add_asset(asset_name, part.assets[asset_name])
    assert item is not None
    for asset_name, asset in item.assets.items():
        names = [asset_name] if isinstance(assets, Mapping) else list(bands or [])
        eo = asset.extra_fields.get("eo:bands") or []
        if not isinstance(assets, Mapping):
            if bands is not None and len(bands) != len(eo):
                raise IngestError(f"bands= names {len(bands)} bands, {first.name} has {len(eo)}.")
            names = list(bands) if bands is not None else [f"b{i + 1}" for i in range(len(eo))]
        for k, entry in enumerate(eo):
            entry["name"] = names[k]
            entry.pop("description", None)
            wave = _wavelength_for(names[k], k, wavelengths)
            if wave is not None:
                entry["center_wavelength"] = wave
        asset.extra_fields["file:checksum"] = "1220" + sha256_file(Path(asset.href))
    if collection:
        item.collection_id = collection  # an id, without a link rio-stac would leave relative
    if platform:
        item.properties["platform"] = platform
    if unknown:
        item.properties["xclay:datetime_unknown"] = True
    return item


def _require_georeferenced(path: Path) -> None:
    """Refuse a GeoTIFF xclay cannot place: no CRS, or no transform (pixel coordinates)."""
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        with rasterio.open(path) as src:
            crs, transform, gcps = src.crs, src.transform, src.gcps[0]
    except RasterioIOError as err:
        raise IngestError(f"{path} is not a raster GDAL can read ({err}).") from err
    fix = (
        f"Give it one (e.g. gdal_edit.py -a_srs EPSG:<code> -a_ullr <ulx> <uly> <lrx> <lry> "
        f"{path}) and make the item again."
    )
    if gcps:
        raise IngestError(
            f"{path} is placed by ground control points, not a transform: warp it first "
            f"(gdalwarp -t_srs EPSG:<code> {path} warped.tif)."
        )
    if crs is None:
        raise IngestError(f"{path} has no CRS, so its pixels cannot be placed on the Earth. {fix}")
    if transform.is_identity:
        raise IngestError(
            f"{path} has no georeferencing (its transform is the identity: pixel coordinates). "
            + fix
        )


def _wavelength_for(
    name: str, index: int, wavelengths: Sequence[float] | Mapping[str, float] | None
) -> float | None:
    if wavelengths is None:
        return None
    if isinstance(wavelengths, Mapping):
        return float(wavelengths[name]) if name in wavelengths else None
    return float(wavelengths[index]) if index < len(wavelengths) else None


# What an item with an unknown acquisition date says (STAC requires a datetime): a time
# before any Earth observation satellite, read back as unknown (NaT) by as_datacube.
UNKNOWN_DATETIME = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)


def _parse_datetime(value: str | dt.datetime | None) -> tuple[dt.datetime, bool]:
    if value is None:
        return UNKNOWN_DATETIME, True
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value, False


def filter_items(
    items: Sequence[pystac.Item], *, bbox: Sequence[float] | None, datetime: str | None
) -> list[pystac.Item]:
    """Items intersecting ``bbox`` (lon/lat) and within ``datetime``, in their order.

    Parameters
    ----------
    items
        The STAC items to filter.
    bbox
        Area (west, south, east, north) in degrees; ``None``: anywhere. Items without a
        bbox are kept.
    datetime
        ``"start/end"`` (ISO dates or datetimes, ``..`` or empty for an open end; a single
        date is that whole day), ends included; ``None``: any time. Items without a time,
        or whose time is unknown (``xclay:datetime_unknown``), are kept.
    """
    start, end = parse_time_range(datetime)
    out = []
    for item in items:
        if bbox is not None and item.bbox is not None:
            w, s, e, n = item.bbox
            if w > bbox[2] or e < bbox[0] or s > bbox[3] or n < bbox[1]:
                continue
        when = item.datetime or item.common_metadata.start_datetime
        if item.properties.get("xclay:datetime_unknown"):
            when = None  # an unknown date is not outside any range
        if when is not None and (
            (start is not None and when < start) or (end is not None and when > end)
        ):
            continue
        out.append(item)
    return out


def parse_time_range(value: str | None) -> tuple[dt.datetime | None, dt.datetime | None]:
    """``"start/end"`` (ISO dates or datetimes, ``..`` or empty for an open end; a single
    date is that whole day) as UTC datetimes, None for an open end or no range."""
    if not value:
        return None, None
    parts = value.split("/") if "/" in value else [value, value]
    if len(parts) != 2:
        raise IngestError(
            f"datetime must be 'start/end' (ISO dates, '..' for open), got {value!r}."
        )

    def parse(text: str, end: bool) -> dt.datetime | None:
        if text in ("", ".."):
            return None
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as err:
            raise IngestError(
                f"cannot read {text!r} in datetime {value!r}; use ISO dates."
            ) from err
        if len(text) == 10 and end:  # a date alone ends at the end of that day
            when = when + dt.timedelta(days=1) - dt.timedelta(microseconds=1)
        return when if when.tzinfo else when.replace(tzinfo=dt.UTC)

    return parse(parts[0], False), parse(parts[1], True)


def solar_day(when: dt.datetime, lon: float) -> dt.date:
    """The day of an acquisition in local solar time at longitude ``lon`` (UTC shifted by
    ``lon / 15`` hours): one orbit's passes over an area fall on one solar day.

    Parameters
    ----------
    when
        The acquisition time; a naive datetime is taken as UTC.
    lon
        Longitude in degrees east (negative to the west of Greenwich).
    """
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return (when + dt.timedelta(hours=lon / 15.0)).date()


def item_solar_day(item: pystac.Item) -> dt.date | None:
    """An item's solar day, at its own centre (so every region groups it the same way).

    Parameters
    ----------
    item
        A STAC item. Its time is its ``datetime``, else its ``start_datetime``; its
        longitude is the middle of its bbox's west and east edges (0, the UTC day, when
        it has no bbox).

    Returns
    -------
    datetime.date or None
        The :func:`solar_day` of the item's time at that longitude; ``None`` when the
        item has no time.
    """
    when = item.datetime or item.common_metadata.start_datetime
    if when is None:
        return None
    return solar_day(when, bbox_centre_lon(item.bbox))


def bbox_centre_lon(bbox: Sequence[float] | None) -> float:
    """The longitude midway between a bbox's west and east edges (4 values, or 6 with
    heights; one crossing the antimeridian has west > east, RFC 7946); 0 without one.

    Parameters
    ----------
    bbox
        A STAC bbox, or None.
    """
    if not bbox:
        return 0.0
    west, east = float(bbox[0]), float(bbox[len(bbox) // 2])
    if west > east:
        east += 360.0
    return ((west + east) / 2 + 180.0) % 360.0 - 180.0


def platform_of(items: Sequence[pystac.Item]) -> str | None:
    """The sensor-table key of the items: the first item's ``platform`` property or
    collection id that names a known platform (a sensor's key, or a collection id it
    lists: :func:`xclay.sensors.platform_named`); None when none does."""
    for item in items:
        for candidate in (item.properties.get("platform"), item.collection_id):
            platform = platform_named(candidate)
            if platform is not None:
                return platform
    return None


def band_names(items: Sequence[pystac.Item]) -> dict[str, set[str]]:
    """Per item, the names a band can be asked by (:func:`asset_band_names`)."""
    return {
        item.id: asset_band_names({k: a.extra_fields for k, a in item.assets.items()})
        for item in items
    }


def asset_band_names(assets: Mapping[str, Any]) -> set[str]:
    """The names an item's bands can be asked by: the keys of its one-band assets, and
    ``eo:bands`` names and common names.

    Parameters
    ----------
    assets
        An item's assets as JSON: key -> the asset's fields (``eo:bands`` among them).
    """
    names: set[str] = set()
    for key, asset in assets.items():
        eo = (asset.get("eo:bands") if isinstance(asset, dict) else None) or []
        if len(eo) <= 1:
            names.add(key)
        for entry in eo:
            if isinstance(entry, dict):
                name, common = entry.get("name"), entry.get("common_name")
                if name:
                    names.add(name)
                if common:
                    names.add(common)
    return names


def require_bands(items: Sequence[pystac.Item], bands: Sequence[str]) -> dict[str, set[str]]:
    """Refuse ``bands`` that not every item has, naming those the items share; return
    :func:`band_names` of the items."""
    available = band_names(items)
    require_shared_bands(set.intersection(*available.values()) if available else set(), bands)
    return available


def require_shared_bands(shared: set[str], bands: Sequence[str]) -> None:
    """Refuse ``bands`` not among the names every item has (``shared``), naming those.

    Parameters
    ----------
    shared
        The band names every item has (the intersection of :func:`asset_band_names`).
    bands
        The bands asked for.
    """
    missing = [b for b in bands if b not in shared]
    if missing:
        raise IngestError(
            f"bands {missing} are not in every item; the items have {sorted(shared)}."
        )


def band_metadata(items: Sequence[pystac.Item], bands: Sequence[str]) -> tuple[Any, float | None]:
    """The dtype and nodata value odc-stac will load ``bands`` with (from one item per
    collection); different nodata values across bands or collections are an error."""
    import odc.stac

    require_bands(items, bands)
    seen: dict[str | None, pystac.Item] = {}
    for item in items:
        seen.setdefault(item.collection_id, item)
    dtypes, nodatas = [], set()
    for item in seen.values():
        try:
            meta = odc.stac.extract_collection_metadata(item).resolve_bands(list(bands))
        except ValueError as err:  # odc-stac's word for metadata it cannot use
            raise IngestError(_unusable_item(item, err)) from err
        for band in bands:
            band_meta = meta[band]
            dtypes.append(np.dtype(getattr(band_meta, "data_type", None) or "float32"))
            value = getattr(band_meta, "nodata", None)
            if value is not None:
                nodatas.add(float(value))
    if len(nodatas) > 1:
        raise IngestError(f"the bands declare different nodata values {sorted(nodatas)}; pass one.")
    return np.result_type(*dtypes), (nodatas.pop() if nodatas else None)


def _unusable_item(item: pystac.Item, err: ValueError) -> str:
    text = str(err)
    if "projection extension" in text:
        return (
            f"item {item.id!r} does not say where its pixels are (its assets lack the "
            "projection extension's shape, transform and CRS: an image without a CRS). "
            "Georeference the image and make the item again (xclay.ingest.stac_item refuses "
            "images it cannot place)."
        )
    return f"odc-stac cannot use item {item.id!r}: {text}"


def item_wavelengths(
    items: Sequence[pystac.Item], bands: Sequence[str], platform: str | None
) -> list[float] | None:
    """Central wavelengths (micrometres) of ``bands`` from the items' ``eo:bands``; None
    when the platform's sensor table knows every band (:func:`xclay.as_datacube` takes them
    from there) or when the items do not give them all."""
    if platform:
        sensor = get_sensor(platform)
        if all(b in sensor.band_names for b in bands):
            return None  # as_datacube takes them from the sensor table
    waves: dict[str, float] = {}
    for item in items:
        for key, asset in item.assets.items():
            eo = asset.extra_fields.get("eo:bands") or []
            for entry in eo:
                wave = entry.get("center_wavelength")
                if wave is None:
                    continue
                names = {entry.get("name"), entry.get("common_name")} | (
                    {key} if len(eo) == 1 else set()
                )
                for name in names - {None}:
                    waves.setdefault(str(name), float(wave))
    if all(b in waves for b in bands):
        return [waves[b] for b in bands]
    return None  # as_datacube will ask for them by name


def check_local_hrefs(items: Sequence[pystac.Item], bands: Sequence[str]) -> None:
    """Refuse items whose local asset files for ``bands`` are missing, naming the first.

    Remote assets (``https://``, ``s3://``, ... URLs, and GDAL's ``/vsi...`` paths) are
    not checked here: GDAL reads them as they are, and a missing one fails its read
    naming the href.
    """
    for item in items:
        for key, asset in item.assets.items():
            eo_names = {e.get("name") for e in asset.extra_fields.get("eo:bands") or []}
            if key not in bands and not eo_names & set(bands):
                continue
            href = asset.get_absolute_href() or asset.href
            parsed = urlparse(href)
            if href.startswith("/vsi"):
                continue  # a GDAL virtual file system path (/vsis3/, /vsicurl/, /vsizip/)
            if parsed.scheme in ("", "file") and not Path(parsed.path).is_file():
                raise IngestError(
                    f"asset {key!r} of item {item.id!r} points to {href}, which does not exist. "
                    "Fix the item's href (or the catalog's location) before ingesting."
                )


def union_bbox(items: Sequence[pystac.Item]) -> tuple[float, float, float, float]:
    """The (west, south, east, north) degrees that hold every item's bbox."""
    boxes = np.array([i.bbox for i in items if i.bbox], dtype=float)
    if boxes.size == 0:
        raise IngestError("the items have no bbox; pass bbox= (west, south, east, north).")
    return (boxes[:, 0].min(), boxes[:, 1].min(), boxes[:, 2].max(), boxes[:, 3].max())
