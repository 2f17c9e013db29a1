"""Test helpers: paths to the real data, and seeded synthetic datacubes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xarray as xr

import xclay
from xclay.testing import synthetic_cube

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OLINDA_TIF = SHARED_DATA / "landsat7-olinda" / "L7_ETMs.tif"
OLINDA_DEM = SHARED_DATA / "landsat7-olinda" / "olinda_dem_utm25s.tif"
# ETM+ bands 1, 2, 3, 4, 5, 7 (../shared/data/README.md)
OLINDA_BANDS = ["blue", "green", "red", "nir08", "swir16", "swir22"]
OLINDA_WAVELENGTHS = [0.483, 0.560, 0.662, 0.835, 1.648, 2.206]


def raster(opened: Any) -> xr.DataArray:
    """What ``rioxarray.open_rasterio`` gives for a single GeoTIFF (typed as one)."""
    assert isinstance(opened, xr.DataArray), type(opened)
    return opened


# the synthetic datacube users' own tests get too
random_cube = synthetic_cube


STAC_SCHEMAS = Path(__file__).resolve().parent / "stac_schemas"


def stac_validator() -> Any:
    """pystac's validator with every schema it may need preloaded from tests/stac_schemas:
    a schema missing there would be fetched from the internet, which these machines do not
    reach, and the validation would fail."""
    import json

    from pystac.validation import JsonSchemaSTACValidator

    validator = JsonSchemaSTACValidator()
    for path in STAC_SCHEMAS.rglob("*"):
        if path.is_file() and path.name != "SOURCES.md":
            relative = path.relative_to(STAC_SCHEMAS).as_posix()
            scheme = "http" if relative.startswith("json-schema.org/") else "https"
            validator.schema_cache[f"{scheme}://{relative}"] = json.loads(path.read_text())
    return validator


def validate_stac(path: Path, validator: Any) -> list[str]:
    """Validate a STAC JSON file; returns the schemas it was checked against."""
    import json

    import pystac.validation

    data = json.loads(path.read_text())
    schemas: list[str] = pystac.validation.validate_dict(data, href=str(path), validator=validator)
    return schemas


def olinda_chips(path: Path, chip: int, stride: int | None = None) -> tuple[Any, Any]:
    """Every chip of the Olinda scene (in the sampler's order) as a ``ChipBatch``, and the
    ``InputSpec`` an encoder gets for it (needs rioxarray)."""
    import rioxarray

    from xclay.batch.batching import make_sampler
    from xclay.batch.chips import ChipGrid, ChipGridSpec
    from xclay.batch.readers import WindowSource
    from xclay.datacube import datacube_geobox
    from xclay.embed import input_spec

    cube = xclay.as_datacube(
        raster(rioxarray.open_rasterio(path)), bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS
    )
    source = WindowSource(cube["pixels"], None)
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip, stride))
    times = cube["time"].values
    batch = make_sampler(source, grid, times)(grid.rows * grid.cols * len(times), 0)
    return batch, input_spec(cube, source, chip, len(batch))


_STAC_TOP_LEVEL = ("type", "stac_version", "stac_extensions", "id", "geometry", "bbox", "links",
                   "assets", "collection")  # fmt: skip
_STAC_TIMES = ("datetime", "start_datetime", "end_datetime", "created", "updated")


def write_stac_geoparquet(items: list[dict[str, Any]], path: Path) -> Path:
    """Write STAC Item dicts as stac-geoparquet, laid out as its specification says (one
    row per item; ``geometry`` WKB; ``bbox`` a struct of xmin, ymin, xmax, ymax; ``assets``
    a struct of asset structs; ``links`` a list of structs; each property a column, times
    as timestamps), with GeoParquet 1.1 metadata: a file as other tools write them."""
    import datetime as dt
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely
    import shapely.geometry

    rows = []
    for item in items:
        geometry = item.get("geometry")
        row: dict[str, Any] = {
            "type": "Feature",
            "stac_version": item.get("stac_version", "1.0.0"),
            "stac_extensions": item.get("stac_extensions", []),
            "id": item["id"],
            "geometry": shapely.to_wkb(shapely.geometry.shape(geometry)) if geometry else None,
            "bbox": dict(zip(("xmin", "ymin", "xmax", "ymax"), item["bbox"], strict=True)),
            "links": item.get("links", []),
            "assets": item.get("assets", {}),
            "collection": item.get("collection"),
        }
        for key, value in item["properties"].items():
            if key in _STAC_TIMES and isinstance(value, str):
                value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
            row[key] = value
        rows.append(row)
    names = list(dict.fromkeys(k for row in rows for k in row))  # every row's columns
    table = pa.Table.from_pylist([{k: row.get(k) for k in names} for row in rows])
    geo = {
        "version": "1.1.0",
        "primary_column": "geometry",
        "columns": {
            "geometry": {
                "encoding": "WKB",
                "geometry_types": [],
                "covering": {"bbox": {k: ["bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
            }
        },
    }
    pq.write_table(table.replace_schema_metadata({"geo": json.dumps(geo)}), path)
    return path
