"""The chip grid: counts, windows, footprints, centres, ids."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from xclay.batch.chips import ChipGrid, ChipGridSpec, window_corners
from xclay.datacube.geometry import crs_tag
from xclay.errors import ConfigError, DatacubeError


def _grid(ny: int = 100, nx: int = 70, *, crs: str = "EPSG:32720", **spec: object) -> ChipGrid:
    gb = GeoBox((ny, nx), Affine(10, 0, 300000, 0, -10, 9600000), crs)
    return ChipGrid.from_geobox(gb, ChipGridSpec(**spec))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "size", "stride", "edges", "expected"),
    [
        (100, 32, None, "drop", 3),  # 0, 32, 64 (96 + 32 > 100)
        (100, 32, None, "pad", 4),  # ... and 96, padded
        (96, 32, None, "pad", 3),  # exact fit: no padded chip
        (100, 32, 16, "drop", 5),  # 0, 16, ..., 64
        (100, 32, 16, "pad", 6),  # ... and 80 (80 + 32 > 100)
        (20, 32, None, "pad", 1),  # smaller than a chip: one padded chip
    ],
)
def test_chip_counts(n: int, size: int, stride: int | None, edges: str, expected: int) -> None:
    grid = _grid(n, n, chip_size=size, stride=stride, edges=edges)
    assert grid.rows == grid.cols == expected
    offsets = grid.row_offsets
    assert offsets[-1] < n
    if edges == "pad":
        assert offsets[-1] + size >= n  # every pixel is covered
    else:
        assert offsets[-1] + size <= n  # no window leaves the raster


@pytest.mark.parametrize(
    ("size", "stride", "edges", "expected"),
    [
        (32, None, "drop", (4, 6)),  # 100 - 96, 70 - 64
        (32, 16, "drop", (4, 6)),  # the last window ends at 96 and 64 too
        (25, None, "drop", (0, 20)),  # 100 = 4 x 25: no rows left out
        (32, None, "pad", (0, 0)),
    ],
)
def test_pixels_left_out_at_the_edges(
    size: int, stride: int | None, edges: str, expected: tuple[int, int]
) -> None:
    grid = _grid(100, 70, chip_size=size, stride=stride, edges=edges)
    assert grid.left_out == expected
    covered = np.zeros((100, 70), bool)  # the same count by marking each window's pixels
    for r in grid.row_offsets:
        for c in grid.col_offsets:
            covered[r : r + size, c : c + size] = True
    assert (100 - covered.any(1).sum(), 70 - covered.any(0).sum()) == expected
    note = grid.describe_left_out()
    assert (note is None) == (expected == (0, 0))
    if note:
        assert f"{expected[1]} px columns" in note and "edges='pad'" in note


def test_too_small_for_drop_says_what_to_do() -> None:
    with pytest.raises(DatacubeError, match="edges='pad' or a chip_size of at most 20"):
        _grid(20, 30, chip_size=32)


@pytest.mark.parametrize("bad", [{"chip_size": 0}, {"stride": -1}, {"edges": "wrap"}])
def test_spec_validation(bad: dict) -> None:
    with pytest.raises(ConfigError):
        ChipGridSpec(**bad)


def test_spec_round_trips_through_dict() -> None:
    spec = ChipGridSpec(chip_size=64, stride=32, edges="pad")
    assert ChipGridSpec.from_dict(spec.to_dict()) == spec


def test_centres_and_corners_follow_the_transform() -> None:
    grid = _grid(chip_size=32)
    y, x = grid.centres()
    np.testing.assert_allclose(x, 300000 + 10 * (np.array([0, 32]) + 16))
    np.testing.assert_allclose(y, 9600000 - 10 * (np.array([0, 32, 64]) + 16))
    corners = grid.corners_native()
    assert corners.shape == (3, 2, 5, 2)
    ring = corners[1, 1]
    np.testing.assert_allclose(ring[0], [300320, 9599680])  # top-left of row 1, col 1
    np.testing.assert_allclose(ring[2], [300640, 9599360])  # bottom-right
    np.testing.assert_allclose(ring[0], ring[-1])


def test_lonlat_centres_south_and_west_match_pyproj() -> None:
    grid = _grid(chip_size=32)
    lon, lat = grid.centres_lonlat()
    y, x = grid.centres()
    tr = Transformer.from_crs("EPSG:32720", "EPSG:4326", always_xy=True)
    lon_ref, lat_ref = tr.transform(x[None, :].repeat(3, 0), y[:, None].repeat(2, 1))
    np.testing.assert_allclose(lon, lon_ref, atol=1e-12)
    np.testing.assert_allclose(lat, lat_ref, atol=1e-12)
    assert (lat < 0).all() and (lon < 0).all()  # south of the equator, west of Greenwich
    assert -5 < lat.mean() < -3 and -65 < lon.mean() < -63


def test_footprint_ring_is_counter_clockwise_on_the_map() -> None:
    import shapely

    ring = _grid(chip_size=32).corners_lonlat()[0, 0]
    assert shapely.Polygon(ring).exterior.is_ccw


def test_chip_ids_are_deterministic_unique_and_readable() -> None:
    ids = _grid(chip_size=32).chip_ids()
    assert ids.shape == (3, 2)
    assert len(set(ids.ravel())) == 6
    assert ids[0, 0] == "EPSG32720_32px_10m_300000_9600000"
    assert ids[1, 1] == "EPSG32720_32px_10m_300320_9599680"
    np.testing.assert_array_equal(ids, _grid(chip_size=32).chip_ids())


def test_chip_grid_as_a_raster() -> None:
    grid = _grid(chip_size=32, stride=16)
    gb = grid.geobox()
    assert gb.shape == (grid.rows, grid.cols)
    assert gb.resolution.x == 160 and gb.resolution.y == -160
    # The raster's cell centres are the chip centres.
    y, x = grid.centres()
    centre = gb.affine @ (0.5, 0.5)
    assert centre == pytest.approx((x[0], y[0]))


def test_window_corners_of_a_rotated_grid() -> None:
    t = Affine(10, 2, 100, 3, -10, 200)
    ring = window_corners(t, np.array(4), np.array(6), 2)
    assert tuple(ring[0]) == pytest.approx(t @ (6, 4))
    assert tuple(ring[2]) == pytest.approx(t @ (8, 6))


def test_crs_tag_without_epsg_is_a_stable_hash() -> None:
    from odc.geo import CRS

    custom = CRS("+proj=aea +lat_1=29.5 +lat_2=45.5 +lon_0=-96 +datum=WGS84")
    assert crs_tag(CRS("EPSG:4326")) == "EPSG4326"
    tag = crs_tag(custom)
    assert tag.startswith("CRS") and tag == crs_tag(custom)


@pytest.mark.parametrize(
    "spec", [{"chip_size": 16}, {"chip_size": 16, "stride": 8, "edges": "pad"}]
)
def test_a_blocks_windows_ids_and_footprints_are_its_part_of_the_whole(spec: dict) -> None:
    grid = _grid(160, 120, **spec)
    rows, cols = (2, grid.rows - 1), (1, 5)
    r, c = slice(*rows), slice(*cols)
    whole_rows, whole_cols = grid.offsets()
    part_rows, part_cols = grid.offsets(rows, cols)
    np.testing.assert_array_equal(part_rows, whole_rows[r])
    np.testing.assert_array_equal(part_cols, whole_cols[c])
    np.testing.assert_array_equal(grid.chip_ids(rows, cols), grid.chip_ids()[r, c])
    np.testing.assert_array_equal(grid.corners_native(rows, cols), grid.corners_native()[r, c])
    np.testing.assert_array_equal(grid.corners_lonlat(rows, cols), grid.corners_lonlat()[r, c])
    lon, lat = grid.centres_lonlat(rows, cols)
    whole_lon, whole_lat = grid.centres_lonlat()
    np.testing.assert_array_equal(lon, whole_lon[r, c])
    np.testing.assert_array_equal(lat, whole_lat[r, c])
    ii, jj = np.meshgrid(np.arange(*rows), np.arange(*cols), indexing="ij")
    one_by_one = grid.lonlat_of(ii.ravel(), jj.ravel())
    np.testing.assert_array_equal(one_by_one[0], whole_lon[r, c].ravel())
    with pytest.raises(DatacubeError, match="outside"):
        grid.chip_ids((0, grid.rows + 1), (0, 1))
