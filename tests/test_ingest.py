"""STAC ingestion with real GeoTIFFs and real STAC items (rio-stac, odc-stac)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    from pystac import Item

pystac = pytest.importorskip("pystac", reason="needs xclay[io]")
rasterio = pytest.importorskip("rasterio", reason="needs xclay[io]")
pytest.importorskip("odc.stac", reason="needs xclay[io]")

from affine import Affine

import xclay
from xclay.datacube import datacube_geobox
from xclay.ingest import IngestError, from_stac, load_items, plan_grid, stac_item
from xclay.masks import PixelClass

from .helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS, raster

S2_BANDS = ["blue", "green", "red", "nir"]
ORIGIN = (500000.0, 9650000.0)  # UTM 20S, near Manaus

# the items, the pixels [date, band, y, x] and the SCL [date, y, x]
S2Series = tuple[list["Item"], np.ndarray, np.ndarray]


def write_tif(
    path: Path,
    data: np.ndarray,
    *,
    crs: str = "EPSG:32720",
    res: float = 10.0,
    origin: tuple[float, float] = ORIGIN,
    nodata: float | None = None,
) -> Path:
    data = data if data.ndim == 3 else data[None]
    with rasterio.open(
        path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
        dtype=data.dtype, crs=crs, transform=Affine(res, 0, origin[0], 0, -res, origin[1]), nodata=nodata,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def s2_series(
    tmp_path_factory: pytest.TempPathFactory,
) -> S2Series:
    """Three Sentinel-2-like dates, per-band assets and an SCL mask, 40 x 48 px at 10 m.

    Returns the items, the pixels [date, band, y, x] and the SCL [date, y, x].
    """
    folder = tmp_path_factory.mktemp("s2")
    rng = np.random.default_rng(4)
    pixels = rng.integers(100, 5000, size=(3, 4, 40, 48)).astype(np.uint16)
    scl = np.full((3, 40, 48), 4, dtype=np.uint8)  # vegetation
    scl[0, :20, :] = 9  # date 0: cloud over the top half
    scl[1, :, :10] = 3  # date 1: shadow over the left strip
    scl[2, 30:, 30:] = 0  # date 2: no data in a corner
    scl[:, 35:, :5] = 8  # every date cloudy in the bottom-left corner
    pixels[2, :, 30:, 30:] = 0
    items = []
    for d, day in enumerate(["2024-03-01", "2024-03-11", "2024-03-21"]):
        assets = {
            b: write_tif(folder / f"{day}_{b}.tif", pixels[d, k], nodata=0)
            for k, b in enumerate(S2_BANDS)
        }
        assets["scl"] = write_tif(folder / f"{day}_scl.tif", scl[d], res=10.0)
        item = stac_item(
            assets, datetime=f"{day}T14:00:00Z", id=f"S2_{day}", collection="sentinel-2-l2a"
        )
        items.append(item)
    return items, pixels, scl


def test_stac_item_from_one_multiband_geotiff(olinda_tif: Path) -> None:
    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    eo = item.assets["data"].extra_fields["eo:bands"]
    assert [b["name"] for b in eo] == OLINDA_BANDS
    assert [b["center_wavelength"] for b in eo] == OLINDA_WAVELENGTHS
    assert item.properties["proj:epsg"] == 31985 or item.properties.get("proj:code") == "EPSG:31985"
    assert item.properties["xclay:datetime_unknown"] is True
    import hashlib

    assert (
        item.assets["data"].extra_fields["file:checksum"]
        == "1220" + hashlib.sha256(olinda_tif.read_bytes()).hexdigest()
    )


def test_olinda_from_stac_equals_the_geotiff_on_its_own_grid(olinda_tif: Path) -> None:
    import rioxarray

    item = stac_item(olinda_tif, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS)
    cube = from_stac([item], bands=OLINDA_BANDS, resolution=28.5)
    direct = xclay.as_datacube(
        raster(rioxarray.open_rasterio(olinda_tif)),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    assert datacube_geobox(cube) == datacube_geobox(direct)  # the file's grid, exactly
    np.testing.assert_array_equal(cube["pixels"].values, direct["pixels"].values)
    np.testing.assert_allclose(cube["wavelength"].values, OLINDA_WAVELENGTHS)
    assert np.isnat(cube["time"].values[0])  # the file records no date
    source = cube.attrs["provenance"]["sources"][0]
    assert source["id"] == "L7_ETMs" and len(source["assets"]["data"]["sha256"]) == 64


def test_median_composite_leaves_out_masked_observations(s2_series: S2Series) -> None:
    items, pixels, scl = s2_series
    cube = from_stac(items, bands=S2_BANDS, resolution=10.0, composite="median")
    assert cube.attrs["platform"] == "sentinel-2-l2a"
    np.testing.assert_allclose(cube["wavelength"].values, [0.493, 0.56, 0.665, 0.842])
    got = cube["pixels"].values[0]
    quality = cube["quality"].values[0]
    clear = ~np.isin(scl, [0, 1, 3, 8, 9, 10]) & (pixels != 0).all(axis=1)
    for y, x in [(5, 5), (25, 5), (25, 25), (35, 35), (38, 2), (10, 40)]:
        obs = pixels[clear[:, y, x], :, y, x]
        if len(obs):
            np.testing.assert_array_equal(
                got[:, y, x], np.round(np.median(obs.astype(float), axis=0))
            )
            assert quality[y, x] == PixelClass.CLEAR
        else:
            assert (got[:, y, x] == 0).all() and quality[y, x] == PixelClass.NODATA
    assert (quality[35:, :5] == PixelClass.NODATA).all()  # cloudy on every date
    assert cube["time"].values[0] == np.datetime64(
        "2024-03-11T14:00", "ns"
    )  # midpoint of the items
    assert [s["id"] for s in cube.attrs["provenance"]["sources"]] == [
        "S2_2024-03-01",
        "S2_2024-03-11",
        "S2_2024-03-21",
    ]


def test_first_valid_composite_takes_the_earliest_clear_observation(s2_series: S2Series) -> None:
    items, pixels, _scl = s2_series
    cube = from_stac(items, bands=S2_BANDS, resolution=10.0, composite="first-valid")
    got = cube["pixels"].values[0]
    np.testing.assert_array_equal(got[:, 5, 20], pixels[1, :, 5, 20])  # date 0 cloudy there
    np.testing.assert_array_equal(got[:, 25, 5], pixels[0, :, 25, 5])  # date 0 clear
    np.testing.assert_array_equal(
        got[:, 5, 5], pixels[2, :, 5, 5]
    )  # cloud, then shadow, then clear
    assert (got[:, 38, 2] == 0).all() and cube["quality"].values[0, 38, 2] == PixelClass.NODATA


def test_no_composite_keeps_each_acquisition_with_its_mask(
    s2_series: S2Series, tmp_path: Path
) -> None:
    items, pixels, _scl = s2_series
    cube = from_stac(items, bands=S2_BANDS, resolution=10.0, composite="none")
    assert cube.sizes["time"] == 3
    np.testing.assert_array_equal(cube["pixels"].values, pixels)
    assert (cube["quality"].values[0, :20] == PixelClass.CLOUD).all()
    assert (cube["quality"].values[1, 20:35, :10] == PixelClass.CLOUD_SHADOW).all()
    cube_path = xclay.write_datacube(cube, tmp_path / "c.zarr", chip_size=16)
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    emb = xclay.embed(
        xclay.open_datacube(cube_path),
        model=model,
        chip_size=16,
        quality={"max_cloud": 0.5},
        progress=False,
    )
    cloud = emb["cloud_fraction"].values
    assert cloud[0, 0, 0] == 1.0 and not emb["embedded"].values[0, 0, 0]  # date 0, top-left chip
    assert emb.attrs["run"]["chips_skipped_cloud"] >= 3


def test_resampled_onto_a_coarser_grid_in_another_crs(s2_series: S2Series) -> None:
    items, _, _ = s2_series
    cube = from_stac(items, bands=S2_BANDS, resolution=20.0, crs="EPSG:32721", composite="median")
    gb = datacube_geobox(cube)
    assert gb.crs is not None
    assert gb.crs.epsg == 32721 and gb.resolution.x == 20
    values = cube["pixels"].values[0]
    quality = cube["quality"].values[0]
    data = quality == PixelClass.CLEAR
    assert data.mean() > 0.5  # the scene, reprojected, covers most of its bounding grid
    # Nearest resampling keeps source values: every composite value is a median of them.
    assert values[:, data].min() >= 100 and values[:, data].max() <= 5000
    assert (values[:, quality == PixelClass.NODATA] == 0).all()


def test_items_from_files_and_catalogs(s2_series: S2Series, tmp_path: Path) -> None:
    items, _, _ = s2_series
    collection = pystac.ItemCollection(items)
    collection.save_object(dest_href=str(tmp_path / "items.json"))
    assert [i.id for i in load_items(tmp_path / "items.json")] == [i.id for i in items]
    catalog = pystac.Catalog("test", "test catalog")
    for item in items:
        catalog.add_item(item.clone())
    catalog.normalize_and_save(
        str(tmp_path / "catalog"), catalog_type=pystac.CatalogType.SELF_CONTAINED
    )
    assert sorted(i.id for i in load_items(tmp_path / "catalog" / "catalog.json")) == sorted(
        i.id for i in items
    )


def test_missing_band_lists_what_the_items_have(s2_series: S2Series) -> None:
    items, _, _ = s2_series
    with pytest.raises(
        IngestError,
        match=r"bands \['swir16'\] are not in every item; the items have \['blue', 'green', 'nir', 'red', 'scl'\]",
    ):
        from_stac(items, bands=["red", "swir16"], resolution=10.0)


def test_empty_search(s2_series: S2Series) -> None:
    items, _, _ = s2_series
    with pytest.raises(IngestError, match="the search is empty"):
        from_stac(items, bands=S2_BANDS, resolution=10.0, datetime="2020-01-01/2020-12-31")
    with pytest.raises(IngestError, match="matched nothing"):
        from_stac([], bands=S2_BANDS, resolution=10.0)


def test_asset_pointing_nowhere(s2_series: S2Series) -> None:
    items, _, _ = s2_series
    broken = items[0].clone()
    broken.assets["red"].href = "/data/not/here/red.tif"
    with pytest.raises(
        IngestError,
        match=r"asset 'red' of item 'S2_2024-03-01' points to /data/not/here/red\.tif, which does not exist",
    ):
        from_stac([broken], bands=S2_BANDS, resolution=10.0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"resolution": 0.0001}, "below a centimetre; is it in degrees"),
        ({"resolution": 10.0, "crs": "EPSG:4326"}, "means 10.0-degree pixels"),
        ({"resolution": 0.01, "max_pixels": 10_000}, "more than max_pixels"),
    ],
)
def test_absurd_grids_are_refused_before_reading(
    s2_series: S2Series, kw: dict, message: str
) -> None:
    items, _, _ = s2_series
    with pytest.raises(IngestError, match=message):
        plan_grid(items, **kw)


def test_mixed_resolutions_and_crs_land_on_one_grid(tmp_path: Path) -> None:
    from pyproj import Transformer

    # Item A: red at 10 m and nir at 20 m (UTM 20S); item B: both at 10 m in UTM 21S.
    red_a = np.full((40, 40), 1000, dtype=np.uint16)
    nir_a = np.full((20, 20), 3000, dtype=np.uint16)
    a = stac_item(
        {"red": write_tif(tmp_path / "a_red.tif", red_a, nodata=0),
         "nir": write_tif(tmp_path / "a_nir.tif", nir_a, res=20.0, nodata=0)},
        datetime="2024-05-01", id="A", wavelengths={"red": 0.665, "nir": 0.842},
    )  # fmt: skip
    x21, y21 = Transformer.from_crs("EPSG:32720", "EPSG:32721", always_xy=True).transform(*ORIGIN)
    red_b = np.full((40, 40), 1200, dtype=np.uint16)
    nir_b = np.full((40, 40), 3200, dtype=np.uint16)
    b = stac_item(
        {"red": write_tif(tmp_path / "b_red.tif", red_b, crs="EPSG:32721", origin=(x21 + 150, y21), nodata=0),
         "nir": write_tif(tmp_path / "b_nir.tif", nir_b, crs="EPSG:32721", origin=(x21 + 150, y21), nodata=0)},
        datetime="2024-05-11", id="B", wavelengths={"red": 0.665, "nir": 0.842},
    )  # fmt: skip
    cube = from_stac(
        [a, b], bands=["red", "nir"], resolution=10.0, crs="EPSG:32720", composite="none"
    )
    gb = datacube_geobox(cube)
    assert gb.crs is not None
    assert gb.crs.epsg == 32720 and gb.resolution.x == 10
    px = cube["pixels"].values  # [time, band, y, x]
    first = px[0][:, (px[0] != 0).all(axis=0)]
    assert set(np.unique(first[0])) == {1000} and set(np.unique(first[1])) == {
        3000
    }  # 20 m nir upsampled
    second = px[1][:, (px[1] != 0).all(axis=0)]
    assert set(np.unique(second[0])) == {1200} and set(np.unique(second[1])) == {
        3200
    }  # reprojected
    assert first.shape[1] > 1000 and second.shape[1] > 1000


@pytest.mark.parametrize(
    ("bbox", "day"),
    [
        ([-35.0, -8.1, -34.8, -7.9], 1),  # Olinda, UTC-2.3 h: 10:40 on the 1st
        ([170.0, -10.0, 172.0, -9.0], 2),  # 171 E, UTC+11.4 h: 00:24 on the 2nd
        ([175.0, -10.0, -177.0, -9.0], 2),  # across the antimeridian, centre 179 E
    ],
)
def test_the_solar_day_is_at_the_item_centre(bbox: list[float], day: int) -> None:
    import datetime as dt

    from xclay.ingest import item_solar_day

    item = pystac.Item(
        "x", None, bbox, dt.datetime(2024, 1, 1, 13, 0, tzinfo=dt.UTC), properties={}
    )
    assert item_solar_day(item) == dt.date(2024, 1, day)
