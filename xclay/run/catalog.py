"""A run's outputs as STAC: how the field finds and publishes embeddings.

``<outputs.dir>/stac/`` holds, once a run is complete:

- ``collection.json``: a STAC 1.1 Collection with the embeddings extension
  (``emb:type`` chip, ``emb:dimensions``, ``data_type``, ``emb:chip_layout``, links
  ``emb:model`` and ``emb:source-data``), the run's extent and the GeoParquet dataset;
- ``items/<zone>-<date>.json``: one Item per zone and time step (footprint, time,
  ``proj:*`` of the chip grid, ``emb:runtime_parameters``, ``emb:quantization``), with
  the zone's embeddings Zarr, the GeoParquet dataset and any COGs as assets;
- ``model.json``: the encoder as a STAC Item with the ML Model extension (``mlm:``),
  which the collection's ``emb:model`` link points to.

Written as plain JSON (no pystac needed to write; the tests validate with pystac), with
relative links, so the folder can be copied or uploaded as it is. Rewritten whole each
time (after the run, after ``xclay export --format cog``).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import json
import re
from typing import Any

import numpy as np
from affine import Affine

from xclay._version import __version__
from xclay.outputs.export import PARQUET_MEDIA_TYPE
from xclay.run.record import RunRecord
from xclay.run.spec import RunSpec
from xclay.run.state import RunState
from xclay.storage import Location, Where, location

__all__ = ["EMB_EXTENSION", "MLM_EXTENSION", "PROJ_EXTENSION", "write_catalog"]

# The embeddings extension v0.0.1 builds on the STAC 1.0.0 schemas (it pins stac_version
# 1.0.0), so the catalog is STAC 1.0.0; the model's input bands are described with the
# raster extension (on its model asset), one of the ways the ML Model extension accepts.
STAC_VERSION = "1.0.0"
EMB_EXTENSION = "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json"
MLM_EXTENSION = "https://stac-extensions.github.io/mlm/v1.5.2/schema.json"
PROJ_EXTENSION = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
RASTER_EXTENSION = "https://stac-extensions.github.io/raster/v1.1.0/schema.json"
ZARR_TYPE = "application/vnd+zarr"
JSON_TYPE = "application/json"
GEOJSON_TYPE = "application/geo+json"
CATALOG = "stac"


def write_catalog(outdir: Where) -> Location:
    """(Re)write the STAC description of a complete run in ``outdir``.

    Parameters
    ----------
    outdir
        The run's output folder (``outputs.dir``), with its state (``_xclay/run.json``)
        and complete embeddings stores; the catalog is written to its ``stac/`` folder.

    Returns
    -------
    Location
        The collection's place, ``<outdir>/stac/collection.json``.
    """
    from xclay.outputs.export import open_embeddings

    out = location(outdir)
    record = RunState(out).record()
    folder = out / CATALOG
    stores = [record.at(p) for p in record.paths.embeddings]
    zones = [open_embeddings(p) for p in stores]
    first = zones[0]
    card = first.attrs["model"]
    collection_id = _collection_id(record)
    items = []
    for k, (store, emb) in enumerate(zip(stores, zones, strict=True)):
        cell = record.zones[k].cell if k < len(record.zones) else None
        for t in range(emb.sizes["time"]):
            items.append(_item(collection_id, folder, out, store, emb, t, cell, record))
    for old in (folder / "items").iterdir():
        if old.name.endswith(".json"):
            old.remove()
    for item in items:
        (folder / "items" / f"{item['id']}.json").write_json(item)
    (folder / "model.json").write_json(_model_item(collection_id, first, folder, out, record))
    collection = _collection(collection_id, stores, zones, items, folder, record, card)
    path = folder / "collection.json"
    path.write_json(collection)
    return path


# --------------------------------------------------------------------------- collection


def _collection(
    collection_id: str,
    stores: list[Location],
    zones: list[Any],
    items: list[dict[str, Any]],
    folder: Location,
    record: RunRecord,
    card: dict[str, Any],
) -> dict[str, Any]:
    first = zones[0]
    grid = first.attrs["config"]["grid"]
    chip, step = int(grid["chip_size"]), int(grid.get("stride") or grid["chip_size"])
    cube = first.attrs["datacube"]
    west = min(i["bbox"][0] for i in items)
    south = min(i["bbox"][1] for i in items)
    east = max(i["bbox"][2] for i in items)
    north = max(i["bbox"][3] for i in items)
    times = sorted(
        {i["properties"].get("start_datetime") or i["properties"]["datetime"] for i in items}
        | {i["properties"].get("end_datetime") or i["properties"]["datetime"] for i in items}
    )
    spec = record.spec
    name = spec.name or collection_id
    platform = cube.get("platform") or "imagery"
    links = [
        {"rel": "root", "href": "./collection.json", "type": JSON_TYPE},
        {
            "rel": "emb:model",
            "href": "./model.json",
            "type": GEOJSON_TYPE,
            "title": f"{card['name']} (STAC ML Model Item)",
        },
        _source_link(record, folder),
        *({"rel": "item", "href": f"./items/{i['id']}.json", "type": GEOJSON_TYPE} for i in items),
    ]
    return {
        "type": "Collection",
        "stac_version": STAC_VERSION,
        "stac_extensions": [EMB_EXTENSION, PROJ_EXTENSION],
        "id": collection_id,
        "title": f"{card['name']} embeddings of {platform}: {name}",
        "description": (
            f"One {card['dim']}-dimensional {card['name']} embedding per {chip} px chip "
            f"(every {step} px) of {platform} imagery at {cube.get('gsd')} m, written by xclay "
            f"{__version__}. Vectors: an embeddings Zarr per grid (zone) and a GeoParquet 1.1 "
            "dataset, one row per chip."
        ),
        "license": _license(card),
        "keywords": ["embeddings", "foundation model", str(card["name"]), str(platform)],
        "providers": [{"name": f"xclay {__version__}", "roles": ["processor"]}],
        "extent": {
            "spatial": {"bbox": [[west, south, east, north]]},
            "temporal": {"interval": [[times[0], times[-1]]]},
        },
        "emb:type": "chip",
        "emb:dimensions": int(card["dim"]),
        "data_type": "int8" if _stored_quantization(stores[0]) else "float32",
        "gsd": float(cube["gsd"]) * step,
        "emb:chip_layout": {
            "layout_type": "regular_grid",
            "chip_size": [chip, chip],
            "stride": [step, step],
        },
        "emb:temporal_resolution": _temporal_resolution(spec),
        "emb:fit_for_use": ["similarity_search", "classification", "regression", "retrieval"],
        "summaries": {
            "proj:code": sorted({_proj_code(z) for z in zones}),
            "platform": [platform],
        },
        "assets": {
            "geoparquet": {
                "href": _rel(record.at(record.paths.geoparquet), folder),
                "type": PARQUET_MEDIA_TYPE,
                "title": "GeoParquet 1.1 dataset: one row per chip (a folder of parts)",
                "roles": ["data"],
            },
        },
        "links": links,
    }


# --------------------------------------------------------------------------- items


def _item(
    collection_id: str,
    folder: Location,
    out: Location,
    store: Location,
    emb: Any,
    t: int,
    cell: Any,
    record: RunRecord,
) -> dict[str, Any]:
    from xclay.outputs.export import chip_grid_transform

    zone = str(emb.attrs.get("zone") or _proj_code(emb).replace(":", ""))
    day = _day(emb["time"].values[t])
    item_id = f"{collection_id}-{zone}-{day}"
    geometry, bbox = _footprint(emb, cell)
    transform = chip_grid_transform(emb)
    properties: dict[str, Any] = {
        # STAC needs a date: an unknown one is written as 1900-01-01 (xclay reads it as NaT).
        "datetime": _timestamp(emb["time"].values[t]) or "1900-01-01T00:00:00Z",
        "proj:code": _proj_code(emb),
        "proj:shape": [int(emb.sizes["chip_y"]), int(emb.sizes["chip_x"])],
        "proj:transform": [float(v) for v in tuple(transform)[:6]],
        "emb:runtime_parameters": _runtime_parameters(emb),
        "created": _now(),
        "xclay:chips_embedded": _chips_embedded(emb, t),
    }
    for bound in ("time_start", "time_end"):
        if bound in emb.coords and not np.isnat(emb[bound].values[t]):
            key = "start_datetime" if bound == "time_start" else "end_datetime"
            properties[key] = _timestamp(emb[bound].values[t])
    if "start_datetime" in properties and "end_datetime" not in properties:
        properties.pop("start_datetime")
    if "end_datetime" in properties and "start_datetime" not in properties:
        properties.pop("end_datetime")
    if _stored_quantization(store):
        properties["emb:quantization"] = {
            "method": "linear",
            "original_dtype": "float32",
            "quantized_dtype": "int8",
        }
    assets: dict[str, Any] = {
        "embeddings": {
            "href": _rel(store, folder / "items"),
            "type": ZARR_TYPE,
            "title": "embeddings Zarr (v3): embedding(time, chip_y, chip_x, feature)",
            "roles": ["data"],
        },
        "geoparquet": {
            "href": _rel(record.at(record.paths.geoparquet), folder / "items"),
            "type": PARQUET_MEDIA_TYPE,
            "title": "GeoParquet 1.1 dataset of the whole run (a folder of parts)",
            "roles": ["data"],
        },
    }
    for name, path, fields in _exports(out, store, day, emb.sizes["time"]):
        assets[name] = {"href": _rel(path, folder / "items"), **fields}
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [EMB_EXTENSION, PROJ_EXTENSION],
        "id": item_id,
        "collection": collection_id,
        "geometry": geometry,
        "bbox": bbox,
        "properties": properties,
        "assets": assets,
        "links": [
            {"rel": "root", "href": "../collection.json", "type": JSON_TYPE},
            {"rel": "parent", "href": "../collection.json", "type": JSON_TYPE},
            {"rel": "collection", "href": "../collection.json", "type": JSON_TYPE},
        ],
    }


def _chips_embedded(emb: Any, t: int) -> int:
    """Chips a zone embedded at time step ``t``: as the run counted them from its regions'
    results and markers when it marked the store complete (a store an earlier xclay marked
    complete lacks the count: its ``embedded`` array is summed instead)."""
    counted = emb.attrs.get("chips_embedded_by_time")
    if counted is not None and t < len(counted):
        return int(counted[t])
    return int(np.asarray(emb["embedded"].isel(time=t).values).sum())


def _footprint(emb: Any, cell: Any) -> tuple[dict[str, Any], list[float]]:
    """What this item's chips cover, in WGS84 (edges densified): the chip grid's windows;
    when the run tiles by zones, the windows of the chips the zone embeds (those meeting
    its cell, which reach past it by up to a chip), row by row. Computed from the grid,
    in O(rows), never from the chips' stored values."""
    import shapely
    from odc.geo.geom import Geometry

    cube = emb.attrs["datacube"]
    size = int(emb.attrs["config"]["grid"]["chip_size"])
    t = Affine.from_gdal(*cube["geotransform"])
    row_off = np.asarray(emb["row_off"].values, dtype=np.float64)
    col_off = np.asarray(emb["col_off"].values, dtype=np.float64)
    # chip windows along each axis, in the datacube CRS (north-up grids: no rotation)
    xs = np.sort(np.stack([t.c + t.a * col_off, t.c + t.a * (col_off + size)], axis=1), axis=1)
    ys = np.sort(np.stack([t.f + t.e * row_off, t.f + t.e * (row_off + size)], axis=1), axis=1)
    if not cell:
        shape = shapely.box(xs[:, 0].min(), ys[:, 0].min(), xs[:, 1].max(), ys[:, 1].max())
    else:
        from xclay.run.zones import to_native

        native = to_native(cell, cube["crs_wkt"])
        shapely.prepare(native)
        rows = []
        for y0, y1 in ys:
            strip = shapely.intersection(shapely.box(xs[0, 0], y0, xs[-1, 1], y1), native)
            if strip.is_empty:
                continue
            left, _, right, _ = strip.bounds
            meets = (xs[:, 1] >= left) & (xs[:, 0] <= right)  # windows meeting the cell
            if meets.any():
                rows.append(shapely.box(xs[meets, 0].min(), y0, xs[meets, 1].max(), y1))
        shape = shapely.union_all(rows).simplify(0) if rows else shapely.Polygon()
    # A vertex at least every chip's edge: straight edges on the grid are curves in degrees.
    shape = shapely.segmentize(shape, size * abs(t.a))
    lonlat = Geometry(shape, crs=cube["crs_wkt"]).to_crs("EPSG:4326").geom
    geometry = json.loads(shapely.to_geojson(lonlat))
    return geometry, [float(v) for v in lonlat.bounds]


def _exports(
    out: Location, store: Location, day: str, steps: int
) -> list[tuple[str, Location, dict[str, Any]]]:
    """Files exported beside the run (``xclay export SPEC --format F``, every format written
    once per store) for this store and time step: ``<store><suffix>`` (or
    ``_<date><suffix>``), and any other ``<store>*<suffix>``; as (asset key, path, the
    format's asset fields)."""
    from xclay.outputs.formats import export_formats, get_exporter

    found = []
    entries = list(out.iterdir())
    for exporter in map(get_exporter, export_formats()):
        if exporter.by_region:
            continue  # the run's own table, an asset of its own
        pattern = f"{store.stem}*{exporter.suffix}"
        for path in (p for p in entries if fnmatch.fnmatchcase(p.name, pattern)):
            rest = path.name[len(store.stem) : -len(exporter.suffix)]
            if steps > 1 and not rest.endswith(day):
                continue
            label = rest.replace(day, "").strip("_-") if steps > 1 else rest.strip("_-")
            key = f"{exporter.name}-{label}" if label else exporter.name
            found.append((key, path, exporter.asset(path.path if path.is_local else path.url)))
    return found


# --------------------------------------------------------------------------- the model


def _model_item(
    collection_id: str, emb: Any, folder: Location, out: Location, record: RunRecord
) -> dict[str, Any]:
    """The encoder as a STAC MLM Item: inputs (bands, chip shape, normalisation), output
    (the vector), and its weights (or, for weight-free models, the run metadata that holds
    what reproduces them)."""
    from xclay.model_card import ModelCard

    card = ModelCard.from_dict(dict(emb.attrs["model"]))
    cube = emb.attrs["datacube"]
    bands = list(cube["bands"])
    chip = int(emb.attrs["config"]["grid"]["chip_size"])
    normalization = card.normalization
    checkpoint = record.paths.checkpoint
    if checkpoint:
        artifact = {
            "href": _rel(record.at(checkpoint), folder),
            "type": "application/octet-stream; application=pytorch",
            "title": f"{card.name} weights ({record.at(checkpoint).name})",
            "roles": ["mlm:model", "mlm:weights"],
            "mlm:artifact_type": "torch.save",
        }
        if card.checkpoint_sha256:
            artifact["description"] = f"sha256 {card.checkpoint_sha256}"
    else:
        metadata = record.at(record.paths.geoparquet) / "_xclay_run.json"
        artifact = {
            "href": _rel(metadata, folder),
            "type": JSON_TYPE,
            "title": f"{card.name}: the model card with everything that reproduces it",
            "roles": ["mlm:model", "metadata"],
            "mlm:artifact_type": "xclay.model_card",
        }
    wavelengths = dict(zip(bands, cube.get("wavelengths") or [], strict=False))
    return {
        "type": "Feature",
        "stac_version": STAC_VERSION,
        "stac_extensions": [MLM_EXTENSION, RASTER_EXTENSION],
        "id": f"{collection_id}-model",
        "geometry": None,
        "properties": {
            "datetime": _now(),
            "description": card.description or card.name,
            "mlm:name": card.name,
            "mlm:architecture": _architecture(card),
            "mlm:tasks": ["similarity-search"],
            "mlm:framework": "PyTorch",
            "mlm:pretrained": bool(checkpoint),
            "mlm:input": [
                {
                    "name": f"{len(bands)}-band {cube.get('platform') or 'imagery'} chips",
                    "bands": bands,
                    "input": {
                        "shape": [-1, len(bands), chip, chip],
                        "dim_order": ["batch", "bands", "height", "width"],
                        "data_type": "float32",
                    },
                    "value_scaling": [
                        {"type": "z-score", "mean": n["mean"], "stddev": n["std"]}
                        for n in (normalization.get(b, {}) for b in bands)
                        if "mean" in n and "std" in n
                    ]
                    or None,
                }
            ],
            "mlm:output": [
                {
                    "name": f"{card.output} embedding",
                    "tasks": ["similarity-search"],
                    "result": {
                        "shape": [-1, *card.vector_shape],
                        "dim_order": ["batch", *_vector_dims(card)],
                        "data_type": "float32",
                    },
                }
            ],
            "xclay:model_card": card.compact(),
        },
        "assets": {
            "model": {
                **artifact,
                "raster:bands": [
                    {
                        "name": b,
                        "data_type": "float32",
                        **(
                            {"description": f"centre wavelength {wavelengths[b]} micrometres"}
                            if b in wavelengths
                            else {}
                        ),
                    }
                    for b in bands
                ],
            }
        },
        "links": [{"rel": "root", "href": "./collection.json", "type": JSON_TYPE}],
    }


def _architecture(card: Any) -> str:
    family = str(card.family or card.name)
    return {"clay": "ViT (Clay v1.5 MAE encoder)"}.get(family, family)


def _vector_dims(card: Any) -> list[str]:
    return ["embedding"] if len(card.vector_shape) == 1 else ["patch_y", "patch_x", "embedding"]


# --------------------------------------------------------------------------- helpers


def _collection_id(record: RunRecord) -> str:
    name = record.spec.name or f"xclay-{record.fingerprint[:12]}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-") or "xclay"


def _source_link(record: RunRecord, folder: Location) -> dict[str, Any]:
    """Where the imagery came from: the run's STAC items (indexed), else the datacube."""
    items = record.paths.items
    if items:
        return {
            "rel": "emb:source-data",
            "href": _rel(record.at(items), folder),
            "type": PARQUET_MEDIA_TYPE,
            "title": "the STAC items the composites were made from (stac-geoparquet)",
        }
    cube = record.paths.datacubes[0]
    return {
        "rel": "emb:source-data",
        "href": _rel(record.at(cube), folder),
        "type": ZARR_TYPE,
        "title": "the datacube the chips were read from",
    }


def _license(card: dict[str, Any]) -> str:
    text = str(card.get("license") or "")
    return text if re.fullmatch(r"[A-Za-z0-9.+-]+", text) else "other"


def _temporal_resolution(spec: RunSpec) -> str:
    composite = spec.input.composite
    if composite == "none":
        return "single_acquisition"
    return "multi_temporal" if composite else "unknown"


def _stored_quantization(store: Location) -> bool:
    meta = (store / "zarr.json").read_json()
    return bool(meta.get("attributes", {}).get("quantization"))


def _proj_code(emb: Any) -> str:
    from pyproj import CRS

    crs = CRS.from_wkt(emb.attrs["datacube"]["crs_wkt"])
    code = crs.to_epsg()
    return f"EPSG:{code}" if code else crs.to_string()


def _runtime_parameters(emb: Any) -> dict[str, Any]:
    config = emb.attrs["config"]
    cube = emb.attrs["datacube"]
    return {
        "chip_size": config["grid"]["chip_size"],
        "stride": config["grid"].get("stride") or config["grid"]["chip_size"],
        "edges": config["grid"].get("edges"),
        "bands": list(cube["bands"]),
        "wavelengths_um": list(cube["wavelengths"]),
        "gsd_m": cube["gsd"],
        "quality": config.get("quality"),
        "precision": config.get("precision"),
        "batch_size": config.get("batch_size"),
    }


def _rel(path: Location, start: Location) -> str:
    return path.href_from(start)


def _day(value: Any) -> str:
    day = np.datetime64(value, "D")
    return "unknown-date" if np.isnat(day) else str(day)


def _timestamp(value: Any) -> str | None:
    stamp = np.datetime64(value, "s")
    return None if np.isnat(stamp) else f"{stamp}Z"


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
