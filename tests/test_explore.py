"""Similar chips by cosine similarity, from every source; and the plots that show them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import xclay
from xclay.errors import DatacubeError
from xclay.explore import SimilarityIndex, similar

from .helpers import random_cube


@pytest.fixture(scope="module")
def emb(demo_cube_256: xr.Dataset) -> xr.Dataset:
    cube = demo_cube_256.copy(deep=True)
    cube["pixels"].values[0, :, :32, :32] = 0  # chip (0, 0): not embedded
    model = xclay.models.get_model("rcf", num_filters=16, sample_chips=8)
    return xclay.embed(cube, model=model, chip_size=32, progress=False)


def _brute_force(emb: xr.Dataset, i: int, j: int) -> tuple[list[str], np.ndarray]:
    """Every other embedded chip ranked by cosine similarity to chip (i, j), in float64."""
    v = emb["embedding"].values[0].astype(np.float64)
    ok = emb["embedded"].values[0]
    q = v[i, j] / np.linalg.norm(v[i, j])
    ids, sims = [], []
    for a, b in zip(*np.nonzero(ok), strict=True):
        if (a, b) != (i, j):
            ids.append(str(emb["chip_id"].values[a, b]))
            sims.append(float(v[a, b] @ q / np.linalg.norm(v[a, b])))
    order = np.argsort(sims)[::-1]
    return [ids[k] for k in order], np.asarray(sims)[order]


def test_similar_chips_are_the_brute_force_ranking(emb: xr.Dataset) -> None:
    import geopandas as gpd

    query = str(emb["chip_id"].values[3, 5])
    result = emb.clay.similar(query, k=7)
    assert isinstance(result, gpd.GeoDataFrame) and result.crs.to_epsg() == 4326
    ids, sims = _brute_force(emb, 3, 5)
    assert list(result["chip_id"]) == ids[:7] and query not in list(result["chip_id"])
    np.testing.assert_allclose(result["similarity"], sims[:7], rtol=1e-5)
    assert list(result["rank"]) == list(range(1, 8))
    assert result.geometry.is_valid.all() and not result.geometry.is_empty.any()
    with_self = similar(emb, query, k=1, include_query=True)
    assert with_self["chip_id"][0] == query and with_self["similarity"][0] == pytest.approx(1.0)


def test_every_source_gives_the_same_answer(tmp_path: Path, emb: xr.Dataset) -> None:
    query = str(emb["chip_id"].values[6, 2])
    expected = similar(emb, query, k=5)
    zarr_path = xclay.to_zarr(emb, tmp_path / "e.zarr")
    parquet = xclay.to_geoparquet(emb, tmp_path / "e.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    for k, rows in enumerate(((0, 4), (4, 8))):
        xclay.to_geoparquet(emb.isel(chip_y=slice(*rows)), folder / f"part-{k}.parquet")
    for source in (zarr_path, parquet, folder):
        got = similar(source, query, k=5)
        assert list(got["id"]) == list(expected["id"]), source
        np.testing.assert_allclose(got["similarity"], expected["similarity"], rtol=1e-6)
        assert got.geometry.geom_equals_exact(expected.geometry, tolerance=1e-9).all()
    # int8 vectors: the same neighbours, similarities within quantisation error
    int8 = similar(xclay.to_geoparquet(emb, tmp_path / "q.parquet", quantize="int8"), query, k=5)
    assert set(int8["id"][:3]) <= set(expected["id"])
    np.testing.assert_allclose(int8["similarity"], expected["similarity"], atol=2e-3)


def test_query_by_point_and_by_vector(emb: xr.Dataset) -> None:
    index = SimilarityIndex.open(emb)
    lon, lat = float(emb["lon"].values[2, 4]), float(emb["lat"].values[2, 4])
    by_point = index.search((lon + 1e-4, lat - 1e-4), k=4)
    by_id = index.search(str(emb["chip_id"].values[2, 4]), k=4)
    assert list(by_point["id"]) == list(by_id["id"])
    vector = emb["embedding"].values[0, 2, 4] * 3.0  # scale does not matter
    by_vector = index.search(vector, k=1)
    assert by_vector["chip_id"][0] == emb["chip_id"].values[2, 4]
    assert by_vector["similarity"][0] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(DatacubeError, match="no embedded chip covers"):
        index.search((lon + 1.0, lat), k=3)  # a degree east: off the scene
    with pytest.raises(DatacubeError, match="longitude first"):
        index.search((lat, 200.0), k=3)
    with pytest.raises(DatacubeError, match="no embedded chip has the id"):
        index.search("EPSG32720_32px_10m_0_0", k=3)
    with pytest.raises(DatacubeError, match="must have 32 elements"):
        index.search(np.ones(5), k=3)


def test_many_queries_at_once_match_one_at_a_time(emb: xr.Dataset) -> None:
    index = SimilarityIndex.open(emb)
    queries = index.unit[[0, 5, 9]] * np.array([[1.0], [2.0], [0.5]], dtype=np.float32)
    best, sims = index.search_many(queries, k=4)
    assert best.shape == sims.shape == (3, 4)
    for q in range(3):
        one = index.search(queries[q], k=4)
        assert list(index.rows["id"][best[q]]) == list(one["id"])
        np.testing.assert_allclose(sims[q], one["similarity"], rtol=1e-6)


def test_a_chip_with_several_times_needs_a_time() -> None:
    cube = random_cube((2, 3, 64, 64))
    model = xclay.models.get_model("rcf", num_filters=8, sample_chips=4)
    emb = xclay.embed(cube, model=model, chip_size=32, progress=False)
    chip = str(emb["chip_id"].values[0, 1])
    with pytest.raises(DatacubeError, match=r"has several times .* pass time="):
        similar(emb, chip, k=2)
    later = similar(emb, chip, k=7, time=emb["time"].values[1])
    assert len(later) == 7  # 8 rows, the query left out
    assert not ((later["chip_id"] == chip) & (later["time"] == emb["time"].values[1])).any()


def test_plots_draw_what_they_say(
    tmp_path: Path, emb: xr.Dataset, demo_cube_256: xr.Dataset
) -> None:
    import matplotlib.pyplot as plt

    from xclay.explore.viz import pca_colour, plot_side_by_side

    ax = emb.clay.plot_pca()
    np.testing.assert_array_equal(ax.images[0].get_array(), pca_colour(emb))
    left, right, _, top = ax.images[0].get_extent()
    gb = xclay.datacube.datacube_geobox(demo_cube_256)
    assert (left, top) == pytest.approx((gb.affine.c, gb.affine.f))  # chips start at the corner
    assert right - left == pytest.approx(8 * 32 * 10)
    query = str(emb["chip_id"].values[3, 5])
    heat = emb.clay.plot_similarity(query)
    grid = np.asarray(heat.images[0].get_array())
    index = SimilarityIndex.open(emb)
    assert grid[3, 5] == pytest.approx(1.0, abs=1e-6)
    assert np.nanmax(grid) == pytest.approx(1.0, abs=1e-6)
    assert np.isnan(grid[0, 0])  # not embedded
    np.testing.assert_allclose(np.sort(grid[np.isfinite(grid)]), np.sort(index.scores(query)))
    fig = plot_side_by_side(demo_cube_256, emb)
    assert len(fig.axes) == 2
    fig.savefig(tmp_path / "side.png")
    assert (tmp_path / "side.png").stat().st_size > 10_000
    plt.close("all")
