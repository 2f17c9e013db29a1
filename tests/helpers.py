"""Test helpers: paths to the real data, and seeded synthetic datacubes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

import xclay

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
OLINDA_TIF = SHARED_DATA / "landsat7-olinda" / "L7_ETMs.tif"
OLINDA_DEM = SHARED_DATA / "landsat7-olinda" / "olinda_dem_utm25s.tif"
# ETM+ bands 1, 2, 3, 4, 5, 7 (../shared/data/README.md)
OLINDA_BANDS = ["blue", "green", "red", "nir08", "swir16", "swir22"]
OLINDA_WAVELENGTHS = [0.483, 0.560, 0.662, 0.835, 1.648, 2.206]


def random_cube(
    shape: tuple[int, int, int, int] = (1, 4, 96, 80),
    *,
    dtype: str = "uint16",
    seed: int = 0,
    crs: str = "EPSG:32633",
    origin: tuple[float, float] = (500000.0, 4000000.0),
    res: float = 10.0,
    nodata: float | None = 0,
) -> xr.Dataset:
    """A datacube of seeded random pixels (values 1..9999), on a north-up grid."""
    from affine import Affine
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import xr_coords

    t, b, ny, nx = shape
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        data = rng.uniform(0.01, 1.0, size=shape).astype(dtype)
    else:
        data = rng.integers(1, 10_000, size=shape).astype(dtype)
    gb = GeoBox((ny, nx), Affine(res, 0, origin[0], 0, -res, origin[1]), crs)
    coords = xr_coords(gb, crs_coord_name="spatial_ref")
    da = xr.DataArray(
        data,
        dims=("time", "band", "y", "x"),
        coords={
            "time": np.array(["2024-06-01"] * t, dtype="datetime64[ns]")
            + np.arange(t).astype("timedelta64[D]"),
            "band": [f"b{i}" for i in range(b)],
            "y": coords["y" if "y" in coords else "latitude"].values,
            "x": coords["x" if "x" in coords else "longitude"].values,
            "spatial_ref": coords["spatial_ref"],
        },
    )
    if nodata is not None:
        da.attrs["nodata"] = nodata
    gsd = 11.0 if gb.crs is not None and gb.crs.geographic else None  # ~0.0001 degrees
    return xclay.as_datacube(da, wavelengths=[0.45 + 0.1 * i for i in range(b)], gsd=gsd)


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

    from xclay.batching import make_sampler
    from xclay.chips import ChipGrid, ChipGridSpec
    from xclay.datacube import datacube_geobox
    from xclay.embed import input_spec
    from xclay.readers import WindowSource

    cube = xclay.as_datacube(
        rioxarray.open_rasterio(path), bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS
    )
    source = WindowSource(cube["pixels"], None)
    grid = ChipGrid.from_geobox(datacube_geobox(cube), ChipGridSpec(chip, stride))
    times = cube["time"].values
    batch = make_sampler(source, grid, times)(grid.rows * grid.cols * len(times), 0)
    return batch, input_spec(cube, source, chip, len(batch))
