"""Labels joined to chips: each format written by geopandas or rasterio, any CRS, every rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from tests.apply.conftest import CHIP, SIZE, points_of
from xclay.apply.labels import join_labels, read_labels
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.datacube import datacube_geobox
from xclay.errors import LabelError

gpd = pytest.importorskip("geopandas", reason="needs xclay[explore]")
shapely = pytest.importorskip("shapely")

FORMATS = {
    "geoparquet": ("labels.parquet", lambda frame, path: frame.to_parquet(path)),
    "geojson": ("labels.geojson", lambda frame, path: frame.to_file(path, driver="GeoJSON")),
    "geopackage": ("labels.gpkg", lambda frame, path: frame.to_file(path, driver="GPKG")),
    "shapefile": ("labels.shp", lambda frame, path: frame.to_file(path)),
}


def _sample(truth: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, SIZE, 4 * n), rng.integers(0, SIZE, 4 * n)
    keep = truth[rows, cols] < 255
    return rows[keep][:n], cols[keep][:n]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_points_in_every_format_and_crs_label_the_chip_that_holds_them(
    fmt: str, demo_cube: xr.Dataset, demo_emb: xr.Dataset, truth: np.ndarray, tmp_path: Path
) -> None:
    # One point per chip, somewhere inside it, so each chip's label is that point's class.
    rng = np.random.default_rng(1)
    i, j = np.divmod(rng.choice((SIZE // CHIP) ** 2, 40, replace=False), SIZE // CHIP)
    rows, cols = i * CHIP + rng.integers(0, CHIP, 40), j * CHIP + rng.integers(0, CHIP, 40)
    names = np.array([f"class {v}" for v in truth[rows, cols]])
    frame = points_of(demo_cube, rows, cols, names).to_crs(
        "EPSG:4326" if fmt != "shapefile" else "EPSG:3857"
    )
    name, write = FORMATS[fmt]
    write(frame, tmp_path / name)
    joined = join_labels(demo_emb, tmp_path / name, column="landcover")
    assert len(joined) == 40 and joined.rule == "point"
    got = dict(zip(joined.chip_id.tolist(), np.asarray(joined.classes)[joined.target], strict=True))
    ids = demo_emb["chip_id"].values
    want = {str(ids[a, b]): n for a, b, n in zip(i, j, names, strict=True)}
    assert got == want
    np.testing.assert_array_equal(joined.row_off, joined.row * CHIP)
    assert (joined.support == 1).all()


def test_several_points_in_a_chip_vote_and_points_outside_are_counted(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset
) -> None:
    rows = np.array([1, 2, 3, 4, 40, -50])
    cols = np.array([1, 2, 3, 4, 40, 10])
    frame = points_of(demo_cube, rows, cols, ["a", "b", "b", "b", "a", "a"])
    joined = join_labels(demo_emb, frame, column="landcover")
    df = joined.to_dataframe().set_index("chip_id")
    first = str(demo_emb["chip_id"].values[0, 0])
    assert df.loc[first, "label"] == "b" and df.loc[first, "support"] == pytest.approx(0.75)
    assert len(joined) == 2
    assert joined.dropped["outside the chips"] == 1
    assert joined.dropped["sharing a chip with another point"] == 3


def test_point_values_average_in_a_chip(demo_cube: xr.Dataset, demo_emb: xr.Dataset) -> None:
    frame = points_of(demo_cube, np.array([0, 5, 20]), np.array([0, 5, 20]), [1.0, 3.0, 7.5])
    joined = join_labels(demo_emb, frame, column="landcover")
    assert joined.task == "regression" and joined.classes is None
    np.testing.assert_allclose(sorted(joined.target), [2.0, 7.5])


def _chip_box(cube: xr.Dataset, i: int, j: int, top: float = 0, bottom: float = 1) -> object:
    """A rectangle over chip (i, j) from ``top`` to ``bottom`` of its height (fractions)."""
    t = datacube_geobox(cube).affine
    x0, y0 = t @ (j * CHIP, i * CHIP + top * CHIP)
    x1, y1 = t @ ((j + 1) * CHIP, i * CHIP + bottom * CHIP)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def test_polygons_label_chips_they_cover_enough(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset, tmp_path: Path
) -> None:
    crs = str(datacube_geobox(demo_cube).crs)
    shapes = [
        _chip_box(demo_cube, 2, 3, 0.0, 0.6),  # 60 % water
        _chip_box(demo_cube, 2, 3, 0.6, 1.0),  # 40 % forest
        _chip_box(demo_cube, 5, 5, 0.0, 0.3),  # 30 % + 30 % overlapping forest: 30 %
        _chip_box(demo_cube, 5, 5, 0.0, 0.3),
        _chip_box(demo_cube, 7, 1, 0.0, 1.0),  # a whole chip
    ]
    frame = gpd.GeoDataFrame(
        {"landcover": ["water", "forest", "forest", "forest", "forest"]}, geometry=shapes, crs=crs
    ).to_crs("EPSG:4326")
    frame.to_file(tmp_path / "polygons.gpkg", driver="GPKG")
    joined = join_labels(demo_emb, tmp_path / "polygons.gpkg", column="landcover")
    assert joined.rule == "cover"
    df = joined.to_dataframe().set_index("chip_id")
    ids = demo_emb["chip_id"].values
    assert df.loc[str(ids[2, 3]), "label"] == "water"
    assert df.loc[str(ids[2, 3]), "support"] == pytest.approx(0.6, abs=0.01)
    assert df.loc[str(ids[7, 1]), "label"] == "forest"
    assert str(ids[5, 5]) not in df.index  # covered 30 % only (overlaps count once)
    stricter = join_labels(demo_emb, frame, column="landcover", min_cover=0.7)
    assert set(stricter.chip_id.tolist()) == {str(ids[7, 1])}


def _write_raster(
    path: Path, values: np.ndarray, transform: object, crs: str, nodata: float
) -> None:
    rasterio = pytest.importorskip("rasterio")
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=values.shape[1],
        height=values.shape[0],
        count=1,
        dtype=values.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(values[None])


def test_a_class_raster_on_another_grid_joins_by_majority(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset, truth: np.ndarray, tmp_path: Path
) -> None:
    from affine import Affine

    box = datacube_geobox(demo_cube)
    # The truth at 5 m (each pixel split in four), shifted by a whole 10 m pixel.
    fine = np.repeat(np.repeat(truth, 2, axis=0), 2, axis=1)
    t = box.affine
    _write_raster(
        tmp_path / "truth.tif", fine, Affine(5.0, 0, t.c, 0, -5.0, t.f), str(box.crs), 255
    )
    joined = join_labels(demo_emb, tmp_path / "truth.tif")
    assert joined.rule == "majority"
    for k in range(len(joined)):
        window = truth[
            joined.row_off[k] : joined.row_off[k] + CHIP,
            joined.col_off[k] : joined.col_off[k] + CHIP,
        ]
        valid = window[window < 255]
        votes = np.bincount(valid, minlength=10)
        assert joined.classes is not None
        assert joined.classes[joined.target[k]] == str(votes.argmax())
        assert joined.support[k] == pytest.approx(votes.max() / valid.size)


def test_a_value_raster_in_another_crs_joins_by_mean(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset, tmp_path: Path
) -> None:
    rioxarray = pytest.importorskip("rioxarray")
    box = datacube_geobox(demo_cube)
    rows = np.arange(SIZE, dtype=np.float32)[:, None] * np.ones(SIZE, np.float32)[None, :]
    da = xr.DataArray(
        rows, dims=("y", "x"), coords={"y": demo_cube["y"].values, "x": demo_cube["x"].values}
    )
    da = da.rio.write_crs(str(box.crs)).rio.write_nodata(np.nan)
    pytest.importorskip("odc.geo.xr")
    degrees = da.odc.reproject("EPSG:4326", resampling="bilinear", dst_nodata=np.nan)
    degrees.rio.write_nodata(np.nan).rio.to_raster(tmp_path / "rows.tif")
    assert rioxarray.open_rasterio(tmp_path / "rows.tif").rio.crs.to_epsg() == 4326
    joined = join_labels(demo_emb, tmp_path / "rows.tif", rule="mean", min_cover=0.9)
    assert joined.task == "regression" and len(joined) > 100
    # The mean pixel row of a chip is its centre row, within the reprojection's blur.
    np.testing.assert_allclose(joined.target, joined.row_off + (CHIP - 1) / 2, atol=1.5)


def test_joins_to_a_chip_grid_without_embeddings(demo_cube: xr.Dataset, truth: np.ndarray) -> None:
    grid = ChipGrid.from_geobox(datacube_geobox(demo_cube), ChipGridSpec(32, 16))
    rows, cols = _sample(truth, 50, 3)
    joined = join_labels(
        grid, points_of(demo_cube, rows, cols, truth[rows, cols].astype(int)), column="landcover"
    )
    # Overlapping chips: each point goes to the chip whose centre is nearest.
    nearest_i = np.abs(grid.row_offsets[None, :] + 16 - (rows[:, None] + 0.5)).argmin(axis=1)
    nearest_j = np.abs(grid.col_offsets[None, :] + 16 - (cols[:, None] + 0.5)).argmin(axis=1)
    assert set(zip(joined.row.tolist(), joined.col.tolist(), strict=True)) == set(
        zip(nearest_i.tolist(), nearest_j.tolist(), strict=True)
    )
    assert (
        joined.chip_id[0]
        == grid.chip_ids((joined.row[0], joined.row[0] + 1), (joined.col[0], joined.col[0] + 1))[
            0, 0
        ]
    )


def test_bad_labels_are_worded(demo_cube: xr.Dataset, demo_emb: xr.Dataset, tmp_path: Path) -> None:
    frame = points_of(demo_cube, np.array([3]), np.array([3]), ["a"])
    with pytest.raises(LabelError, match="no column 'kind'"):
        join_labels(demo_emb, frame, column="kind")
    with pytest.raises(LabelError, match="need the column"):
        join_labels(demo_emb, frame)
    with pytest.raises(LabelError, match="no CRS"):
        read_labels(frame.set_crs(None, allow_override=True))
    far = frame.to_crs("EPSG:4326")
    far.geometry = gpd.points_from_xy([10.0], [50.0])
    with pytest.raises(LabelError, match=r"no label falls on a chip .*1 outside the chips"):
        join_labels(demo_emb, far, column="landcover")
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.raises(LabelError, match="suffix"):
        read_labels(tmp_path / "labels.csv")
    with pytest.raises(FileNotFoundError, match="no label file"):
        read_labels(tmp_path / "none.gpkg")
    (tmp_path / "bad.gpkg").write_text("not a geopackage")
    with pytest.raises(LabelError, match="cannot read it"):
        read_labels(tmp_path / "bad.gpkg")
    with pytest.raises(LabelError, match="rule 'cover' needs polygon"):
        join_labels(demo_emb, frame, column="landcover", rule="cover")
