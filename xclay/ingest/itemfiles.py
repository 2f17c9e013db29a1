"""STAC items files read as streams: JSON, newline-delimited JSON and stac-geoparquet.

A world's catalogue (a year of Sentinel-2 over the land: ~1.5 million items) comes the
way the ecosystem ships large item collections: stac-geoparquet (one row per item, the
item's properties as columns; a file, or a folder of files) or newline-delimited JSON
(one item a line). :func:`item_batches` reads either a batch at a time, so no process
holds the whole catalogue; an ItemCollection JSON (a FeatureCollection, an array of
items, one item) or a static catalog is read whole, as before. Every item comes out as
a STAC Item dict with its asset hrefs absolute (relative ones are relative to the file
they were read from).

What is not an items file is one :class:`~xclay.errors.IngestError` line saying which
formats are read (:data:`ITEMS_FORMATS`).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from xclay.errors import IngestError, StorageError
from xclay.storage import Location

__all__ = [
    "ITEMS_FORMATS",
    "ItemBatch",
    "ItemsFormat",
    "absolute_href",
    "item_batches",
    "items_format",
]

ItemsFormat = Literal["json", "ndjson", "parquet"]

ITEMS_FORMATS = (
    "a STAC ItemCollection (GeoJSON FeatureCollection) JSON, a JSON array of Items, an Item "
    "JSON, a static catalog.json, newline-delimited JSON (one Item a line: .ndjson, .jsonl) "
    "or stac-geoparquet (a .parquet file, or a folder of them)"
)
BATCH = 2048  # items a batch: a few MB of JSON, whatever the catalogue's size

_PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")
_NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".geojsonl", ".geojsons", ".ldjson")
_PARQUET_MAGIC = b"PAR1"
# An absolute path or a URL (a one-letter scheme, C:\\ ..., is a Windows drive: relative).
_ABSOLUTE_HREF = re.compile(r"^(/|[A-Za-z][A-Za-z0-9+.-]+://)")
# stac-geoparquet's top-level columns; every other column is a property.
_TOP_LEVEL = ("type", "stac_version", "stac_extensions", "id", "geometry", "bbox", "links",
              "assets", "collection")  # fmt: skip


def items_format(path: Location) -> ItemsFormat:
    """How the items at ``path`` are stored: ``"parquet"`` (stac-geoparquet: a file whose
    bytes start with Parquet's magic, or a folder), ``"ndjson"`` (one JSON Item a line) or
    ``"json"`` (one JSON document).

    Parameters
    ----------
    path
        A file or folder (local or on object storage). A missing one is an
        :class:`~xclay.errors.IngestError`.
    """
    suffix = path.suffix.lower()
    if suffix in _PARQUET_SUFFIXES:
        return "parquet"
    if suffix in _NDJSON_SUFFIXES:
        return "ndjson"
    if path.scheme not in ("http", "https") and path.is_dir():  # HTTP has no folders
        return "parquet"
    head = _head(path)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    first = head.lstrip().split(b"\n", 1)[0]
    if first.startswith(b"{"):
        try:
            doc = json.loads(first)
        except ValueError:
            return "json"  # an indented document: its first line is not a whole object
        if isinstance(doc, dict) and doc.get("type") == "Feature":
            return "ndjson"
    return "json"


def _head(path: Location, size: int = 1 << 16) -> bytes:
    """The first bytes of a file (a missing or unreadable one named in one line)."""
    try:
        if path.is_local:
            with path.path.open("rb") as f:
                return f.read(size)
        length = min(size, path.size())
        return path.read_ranges([0], [length])[0] if length else b""
    except FileNotFoundError as err:
        raise IngestError(f"STAC file {path} does not exist.") from err
    except StorageError:
        raise  # one line naming the URL and why (no such bucket, access denied, ...)
    except OSError as err:
        raise IngestError(f"{path} is not readable ({err}).") from err


def item_batches(path: Location, *, batch: int = BATCH) -> Iterator[list[dict[str, Any]]]:
    """The items of a newline-delimited JSON or stac-geoparquet file (or folder), ``batch``
    at a time, as STAC Item dicts with absolute asset hrefs.

    Parameters
    ----------
    path
        An items file of format ``"ndjson"`` or ``"parquet"`` (:func:`items_format`); a
        folder is read as stac-geoparquet (its ``.parquet`` files, in name order).
    batch
        Items a batch.

    Yields
    ------
    list of dict
        The next items, in the file's order. A line or row that is not a STAC Item is an
        :class:`~xclay.errors.IngestError` naming it.
    """
    kind = items_format(path)
    if kind == "ndjson":
        yield from _ndjson_batches(path, batch)
    elif kind == "parquet":
        yield from _parquet_batches(path, batch)
    else:
        raise IngestError(
            f"{path} is one JSON document, not a stream of items; read it with "
            "xclay.ingest.load_items."
        )


def absolute_href(href: str, base: str | os.PathLike[str]) -> str:
    """``href`` as an absolute path or URL: a relative one is taken relative to the
    document ``base`` it was read from (a file path or URL), as STAC resolves links.

    Parameters
    ----------
    href
        An asset href: a URL (``https://``, ``s3://``, ``file://``), an absolute path, or a
        path relative to ``base``'s folder.
    base
        The path or URL of the JSON document holding ``href``.
    """
    if _ABSOLUTE_HREF.match(href):  # most hrefs of a large catalogue: no parsing
        return href
    parsed = urlparse(href)
    if (parsed.scheme and len(parsed.scheme) > 1) or Path(href).is_absolute():
        return href  # a URL (a one-letter scheme is a Windows drive) or an absolute path
    base = os.fspath(base)
    if "://" in base:
        url = urlparse(base)
        if url.scheme == "file":
            return os.path.normpath(Path(url.path).parent / href)
        # urljoin joins only the schemes it knows (http, https, ...): for s3://, gs://,
        # az:// it would return the relative href as it is.
        folder = posixpath.dirname(url.path) or "/"
        return f"{url.scheme}://{url.netloc}{posixpath.normpath(posixpath.join(folder, href))}"
    return os.path.normpath(Path(base).absolute().parent / href)


# --------------------------------------------------------------------------- NDJSON


class ItemBatch(list[dict[str, Any]]):
    """A batch of item dicts that keeps each item's JSON text as read, where the dict is
    exactly that text (no href was made absolute): an index stores the text as it is
    instead of encoding the dict again.

    Attributes
    ----------
    texts
        Per item, its JSON text, or None where the dict differs from it.
    """

    texts: list[str | None]

    def __init__(self) -> None:
        super().__init__()
        self.texts = []


def _ndjson_batches(path: Location, batch: int) -> Iterator[list[dict[str, Any]]]:
    try:
        _, chunks = path.stream()
    except FileNotFoundError as err:
        raise IngestError(f"STAC file {path} does not exist.") from err
    out = ItemBatch()
    rest = b""
    number = 0
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        for line in lines:
            number += 1
            if _ndjson_item(out, line, number, path) and len(out) >= batch:
                yield out
                out = ItemBatch()
    if rest.strip():
        _ndjson_item(out, rest, number + 1, path)
    if out:
        yield out


def _ndjson_item(out: ItemBatch, line: bytes, number: int, path: Location) -> bool:
    """Append line ``number``'s item to ``out`` (with its text); False for a blank line."""
    if not line.strip():
        return False
    try:
        text = line.decode()
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise IngestError(
            f"line {number} of {path} is not JSON ({err}); expected newline-delimited JSON, "
            "one STAC Item a line."
        ) from err
    relative = isinstance(doc, dict) and _relative_hrefs(doc)
    out.append(checked_item(doc, f"line {number} of {path}", path.url if relative else None))
    out.texts.append(None if relative else text)
    return True


def _relative_hrefs(doc: dict[str, Any]) -> bool:
    """Whether an item has an asset href that :func:`checked_item` would change."""
    assets = doc.get("assets")
    if not isinstance(assets, dict):
        return False
    for asset in assets.values():
        href = asset.get("href") if isinstance(asset, dict) else None
        if isinstance(href, str) and not _ABSOLUTE_HREF.match(href):
            return True
    return False


def checked_item(doc: Any, where: str, base: str | None) -> dict[str, Any]:
    """An item dict as read: a GeoJSON Feature with an id and properties, its asset
    hrefs made absolute against ``base`` (the file it was read from); anything else an
    :class:`~xclay.errors.IngestError` naming ``where``.

    Parameters
    ----------
    doc
        A parsed JSON value that should be a STAC Item.
    where
        How to name it in an error (``"line 3 of items.ndjson"``).
    base
        The path or URL of the document it was read from; None when its hrefs are known
        to be absolute already.
    """
    if not isinstance(doc, dict) or doc.get("type") != "Feature":
        got = doc.get("type") if isinstance(doc, dict) else type(doc).__name__
        raise IngestError(f"{where} is not a STAC Item (a GeoJSON Feature); it is {got!r}.")
    if not isinstance(doc.get("id"), str) or not isinstance(doc.get("properties"), dict):
        raise IngestError(f"{where} is not a valid STAC Item: it needs an 'id' and 'properties'.")
    assets = doc.get("assets") or {}
    if not isinstance(assets, dict):
        raise IngestError(f"{where} is not a valid STAC Item: its 'assets' is not an object.")
    if base is not None:
        for asset in assets.values():
            if isinstance(asset, dict) and isinstance(asset.get("href"), str):
                asset["href"] = absolute_href(asset["href"], base)
    return doc


# --------------------------------------------------------------------------- stac-geoparquet


def _parquet_files(path: Location) -> list[Location]:
    if not path.is_dir():
        return [path]
    files = [p for p, _ in path.files() if p.suffix.lower() in _PARQUET_SUFFIXES and not _hidden(p)]
    if not files:
        raise IngestError(
            f"{path} is a folder without .parquet files; an items folder holds stac-geoparquet "
            f"files. Expected {ITEMS_FORMATS}."
        )
    return files


def _hidden(path: Location) -> bool:
    return path.name.startswith((".", "_"))


def _parquet_batches(path: Location, batch: int) -> Iterator[list[dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in _parquet_files(path):
        fs, where = file.arrow()
        try:
            reader = pq.ParquetFile(where, filesystem=fs)
        except FileNotFoundError as err:
            raise IngestError(f"STAC file {file} does not exist.") from err
        except (pa.ArrowException, OSError) as err:
            raise IngestError(
                f"{file} is not a readable Parquet file ({_first_line(err)}); expected "
                f"{ITEMS_FORMATS}."
            ) from err
        names = set(reader.schema_arrow.names)
        missing = [c for c in ("id", "geometry") if c not in names]
        if missing:
            raise IngestError(
                f"{file} is a Parquet file without stac-geoparquet's columns {missing} (it has "
                f"{sorted(names)[:8]}); expected stac-geoparquet: one row per STAC Item, "
                "'id', 'geometry' (WKB), 'assets' and the properties as columns."
            )
        try:
            for table in reader.iter_batches(batch_size=batch):
                yield _rows_to_items(table, file)
        except (pa.ArrowException, OSError) as err:
            raise IngestError(f"{file} is damaged ({_first_line(err)}).") from err


def _rows_to_items(table: Any, file: Location) -> list[dict[str, Any]]:
    """stac-geoparquet rows as STAC Item dicts: geometry from WKB, bbox from its struct
    (or list), properties from the other columns; null fields left out."""
    import shapely

    names = table.schema.names
    wkb = table.column("geometry").to_pylist()
    geoms = shapely.from_wkb(wkb)
    geojson = [None if g is None else json.loads(g) for g in shapely.to_geojson(geoms)]
    columns = {n: table.column(n).to_pylist() for n in names if n != "geometry"}
    out = []
    for k in range(table.num_rows):
        properties = {
            n: _plain(columns[n][k]) for n in names if n not in _TOP_LEVEL and n in columns
        }
        doc: dict[str, Any] = {
            "type": "Feature",
            "stac_version": columns["stac_version"][k] if "stac_version" in columns else "1.0.0",
            "stac_extensions": (columns["stac_extensions"][k] or [])
            if "stac_extensions" in columns
            else [],
            "id": columns["id"][k],
            "geometry": geojson[k],
            "properties": {n: v for n, v in properties.items() if v is not None},
            "links": _dropped_nulls(columns["links"][k] or []) if "links" in columns else [],
            "assets": _dropped_nulls(columns["assets"][k] or {}) if "assets" in columns else {},
        }
        bbox = _bbox(columns["bbox"][k]) if "bbox" in columns else None
        if bbox is not None:
            doc["bbox"] = bbox
        elif geoms[k] is not None:
            doc["bbox"] = [float(v) for v in shapely.bounds(geoms[k])]
        if "collection" in columns and columns["collection"][k] is not None:
            doc["collection"] = columns["collection"][k]
        out.append(checked_item(doc, f"row {doc['id']!r} of {file}", file.url))
    return out


def _bbox(value: Any) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        keys = ("xmin", "ymin", "zmin", "xmax", "ymax", "zmax")
        values = [float(value[k]) for k in keys if value.get(k) is not None]
        return values if len(values) in (4, 6) else None
    return [float(v) for v in value]


def _plain(value: Any) -> Any:
    """A column's value as JSON has it: times as RFC 3339 text, nulls dropped inside."""
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        import shapely

        try:  # a geometry property (proj:geometry) stored as WKB
            return json.loads(shapely.to_geojson(shapely.from_wkb(value)))
        except Exception:  # not WKB: bytes have no JSON form
            return None
    if isinstance(value, dict | list):
        return _dropped_nulls(value)
    return value


def _dropped_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _dropped_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_dropped_nulls(v) for v in value]
    return _plain(value) if isinstance(value, dt.date | bytes) else value


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
