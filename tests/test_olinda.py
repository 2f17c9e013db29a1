"""Real imagery: Landsat 7 over Olinda, Brazil (../shared/data/landsat7-olinda).

Published embedding sets have shipped chips with wrong footprints and
swapped lat/lon; here every chip's footprint is checked against the source
GeoTIFF's own transform, read with rasterio, not with xclay's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import xarray as xr

if TYPE_CHECKING:
    import geopandas as gpd

rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
rioxarray = pytest.importorskip("rioxarray", reason="needs xclay[io]")

import shapely
from affine import Affine
from pyproj import Transformer

import xclay

from .helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS, raster

CHIP = 32

# the embeddings, and the GeoDataFrame read back from their GeoParquet
Olinda = tuple[xr.Dataset, "gpd.GeoDataFrame"]


@pytest.fixture(scope="module")
def olinda(olinda_tif: Path, tmp_path_factory: pytest.TempPathFactory) -> Olinda:
    import geopandas as gpd
    import rioxarray

    cube = xclay.as_datacube(
        raster(rioxarray.open_rasterio(olinda_tif)),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    model = xclay.models.get_model("rcf", num_filters=32, sample_chips=16)
    emb = xclay.embed(
        cube, model=model, chip_size=CHIP, edges="pad", quality={"max_nodata": 1.0}, progress=False
    )
    path = xclay.to_geoparquet(emb, tmp_path_factory.mktemp("olinda") / "olinda.parquet")
    return emb, gpd.read_parquet(path)


def test_every_chip_footprint_is_the_source_pixel_window(olinda_tif: Path, olinda: Olinda) -> None:
    emb, gdf = olinda
    with rasterio.open(olinda_tif) as src:
        to_wgs84 = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True)
        assert len(gdf) == emb.sizes["chip_y"] * emb.sizes["chip_x"] == 11 * 11
        for row in gdf.itertuples():
            # The window's own transform: the raster's, shifted to the window's first pixel.
            t = src.transform @ Affine.translation(row.col_off, row.row_off)
            corners_px = [(0, 0), (0, CHIP), (CHIP, CHIP), (CHIP, 0), (0, 0)]
            xs, ys = zip(*[t @ c for c in corners_px], strict=True)
            lon, lat = to_wgs84.transform(np.array(xs), np.array(ys))
            got = np.asarray(shapely.get_coordinates(row.geometry))
            np.testing.assert_allclose(got, np.column_stack([lon, lat]), rtol=0, atol=1e-7)
            native = np.asarray(shapely.get_coordinates(shapely.from_wkb(row.native_footprint)))
            np.testing.assert_allclose(native, np.column_stack([xs, ys]), rtol=0, atol=1e-6)


def test_chips_lie_over_olinda_latitude_first(olinda: Olinda) -> None:
    emb, gdf = olinda
    # Olinda, Pernambuco: about 8.0 S, 34.9 W.
    assert gdf["centre_lat"].between(-8.2, -7.8).all()
    assert gdf["centre_lon"].between(-35.05, -34.75).all()
    lon, lat = shapely.centroid(gdf.geometry.union_all()).coords[0]
    assert lat == pytest.approx(-8.0, abs=0.1) and lon == pytest.approx(-34.9, abs=0.1)
    # Centre columns agree with the footprint centroids (no lat/lon swap anywhere).
    centroids = shapely.get_coordinates(shapely.centroid(gdf.geometry.values))
    np.testing.assert_allclose(gdf["centre_lat"], centroids[:, 1], atol=1e-6)
    np.testing.assert_allclose(gdf["centre_lon"], centroids[:, 0], atol=1e-6)
    np.testing.assert_allclose(np.sort(emb["lat"].values.ravel()), np.sort(gdf["centre_lat"]))


def test_padded_edge_chips_count_their_outside_as_nodata(olinda: Olinda) -> None:
    emb, _gdf = olinda
    # 352 x 349 px in 32 px chips: the last row holds 0 rows of data beyond 352 = 11 * 32 exactly,
    # the last column 349 - 320 = 29 of 32 columns.
    last_col = emb["nodata_fraction"].values[0, :, -1]
    np.testing.assert_allclose(last_col, 3 / 32, atol=1e-6)
    assert (emb["nodata_fraction"].values[0, :, :-1] == 0).all()  # the file has no nodata value


def test_embeddings_separate_land_from_sea(olinda: Olinda) -> None:
    """The Atlantic is east of Olinda: chips over sea must embed unlike chips over land."""
    _emb, gdf = olinda
    vec = np.stack(gdf["embedding"].to_numpy())
    east = gdf["col_off"] >= 320  # the easternmost column: open sea
    west = gdf["col_off"] <= 32
    v = vec / np.linalg.norm(vec, axis=1, keepdims=True)
    within = (v[east] @ v[east].T).mean()
    across = (v[east] @ v[west].T).mean()
    assert within > across


def test_int8_vectors_keep_the_direction_of_real_imagery_vectors(
    olinda: Olinda, tmp_path: Path
) -> None:
    emb, _gdf = olinda
    vectors = emb["embedding"].values[emb["embedded"].values]
    path = xclay.to_zarr(emb, tmp_path / "i8.zarr", quantize="int8")
    restored = xclay.open_embeddings(path)["embedding"].values[emb["embedded"].values]
    cosine = (vectors * restored).sum(-1) / (
        np.linalg.norm(vectors, axis=-1) * np.linalg.norm(restored, axis=-1)
    )
    assert cosine.min() >= 0.995  # the goal for compact vectors, on every chip
    table = xclay.read_geoparquet(
        xclay.to_geoparquet(emb, tmp_path / "i8.parquet", quantize="int8")
    )
    from_parquet = np.asarray(table["embedding"].combine_chunks().values).reshape(len(cosine), -1)
    np.testing.assert_allclose(from_parquet, restored, rtol=0, atol=1e-6 * np.abs(vectors).max())
