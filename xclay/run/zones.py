"""Zones: the pixel grids a run's area is cut into, one datacube each.

A run over one CRS has one zone: its grid (the items' own, or the bbox in the
requested CRS). An area crossing UTM zones is tiled into the standard 6-degree
zones, split at the equator (EPSG:326zz north, 327zz south): each cell is
embedded on its own UTM grid at native resolution, so no chip is resampled
across a zone and every chip is a square of the ground.

Grids are anchored on a lattice: their origin is a multiple of the chip step
(``stride x resolution``) in the zone's coordinates, so a chip's window, and
its id, are the same in every run that covers it, whatever the run's bbox.

At a seam two rotated grids meet, and squares cannot meet exactly along a
meridian. xclay keeps coverage: a zone embeds every chip of its grid whose
footprint intersects its cell (the cell: the zone's part of the area). So
every point of the area is inside at least one embedded chip, and each chip
is embedded once, by its own zone. Each zone's chips reach past the seam by
up to a chip's width (a little more where its grid is turned against the
meridian), so the strip where both zones have chips is up to two chips wide. Each row of the
GeoParquet says which zone embedded it (``native_crs``; its chip id starts
with the zone's CRS) and whether its centre lies in that zone
(``centre_in_zone``, :meth:`Zone.owns`): keeping those rows keeps one zone's
chips on each side of the seam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from affine import Affine
from odc.geo.geobox import GeoBox

from xclay.datacube.geometry import crs_tag

__all__ = ["Zone", "single_zone", "utm_cells", "utm_zones"]

UTM_SOUTH, UTM_NORTH = -80.0, 84.0  # the latitudes UTM is defined for


@dataclass(frozen=True)
class Zone:
    """One grid of a run: a datacube and its embeddings.

    Parameters
    ----------
    tag
        Names its stores and parts (``EPSG32719``).
    geobox
        The zone's pixel grid.
    cell
        The lon/lat polygon (shapely) the zone owns; default ``None``: all of its grid,
        when the run has one zone.
    """

    tag: str
    geobox: GeoBox
    cell: Any = None

    @property
    def crs(self) -> str:
        return str(self.geobox.crs)

    def cell_native(self) -> Any:
        """The cell in the zone's own CRS (edges densified: meridians and parallels are
        curves on a transverse Mercator grid); None when the zone owns its whole grid."""
        return None if self.cell is None else to_native(self.cell, self.crs)

    def owns(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Whether points (chip centres, degrees) lie in this zone's own UTM zone: its
        6-degree band of longitude and its hemisphere, west edge and equator included
        (north), east edge excluded (but at 180 degrees). Every point of the Earth between
        80 S and 84 N lies in exactly one zone, so keeping the chips whose centre their
        own zone owns keeps each chip of a seam's overlap once (docs/run-spec.md). A zone
        that owns its whole grid (no cell) owns every point.

        Parameters
        ----------
        lon, lat
            ``[...]`` longitudes and latitudes in degrees.

        Returns
        -------
        numpy.ndarray
            Booleans of the points' shape.
        """
        lon, lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
        if self.cell is None:
            return np.ones(np.broadcast(lon, lat).shape, dtype=bool)
        epsg = self.geobox.crs.epsg if self.geobox.crs is not None else None
        if epsg is None or not (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760):
            import shapely

            return np.asarray(shapely.contains_xy(self.cell, lon, lat), dtype=bool)
        zone = epsg % 100
        west, east = -180.0 + 6.0 * (zone - 1), -180.0 + 6.0 * zone
        across = (lon >= west) & ((lon < east) | ((zone == 60) & (lon <= east)))
        hemisphere = lat >= 0.0 if epsg < 32700 else lat < 0.0
        return np.asarray(across & hemisphere, dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        import shapely

        t = self.geobox.affine
        return {
            "tag": self.tag,
            "crs": self.crs,
            "shape": [int(n) for n in self.geobox.shape],
            "affine": [t.a, t.b, t.c, t.d, t.e, t.f],
            "cell": shapely.to_wkt(self.cell) if self.cell is not None else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Zone:
        import shapely

        geobox = GeoBox(tuple(data["shape"]), Affine(*data["affine"][:6]), data["crs"])
        cell = shapely.from_wkt(data["cell"]) if data.get("cell") else None
        return cls(data["tag"], geobox, cell)


def single_zone(geobox: GeoBox) -> list[Zone]:
    """A run on one grid.

    Parameters
    ----------
    geobox
        The run's pixel grid; it must have a CRS, which names the zone (``EPSG32633``).

    Returns
    -------
    list of Zone
        One zone that owns its whole grid (no cell).
    """
    assert geobox.crs is not None
    return [Zone(crs_tag(geobox.crs), geobox, None)]


def utm_cells(bbox: tuple[float, float, float, float]) -> list[tuple[str, Any]]:
    """The UTM zone cells a lon/lat bbox covers: ``(EPSG code, lon/lat polygon)``, west to
    east, north before south.

    Parameters
    ----------
    bbox
        The area (west, south, east, north) in degrees, within UTM's latitudes (80 S to
        84 N); otherwise ``ValueError``.

    Returns
    -------
    list of tuple
        Per cell (the part of ``bbox`` in one 6-degree UTM zone, north or south of the
        equator), its code (``"EPSG:32633"``) and its shapely box in lon/lat.
    """
    import shapely

    west, south, east, north = bbox
    if south < UTM_SOUTH or north > UTM_NORTH:
        raise ValueError(
            f"the area reaches latitude {south if south < UTM_SOUTH else north}; UTM zones "
            f"cover {UTM_SOUTH} to {UTM_NORTH}. Give grid.crs (e.g. EPSG:3413 or EPSG:3031 for "
            "the poles) or a smaller bbox."
        )
    cells = []
    first = math.floor((west + 180.0) / 6.0) + 1
    last = math.ceil((east + 180.0) / 6.0)
    for zone in range(max(1, first), min(60, last) + 1):
        lo, hi = -180.0 + 6.0 * (zone - 1), -180.0 + 6.0 * zone
        w, e = max(west, lo), min(east, hi)
        if w >= e:
            continue
        for code, s, n in (
            (32600 + zone, max(south, 0.0), north),
            (32700 + zone, south, min(north, 0.0)),
        ):
            if s < n:
                cells.append((f"EPSG:{code}", shapely.box(w, s, e, n)))
    return cells


def utm_zones(bbox: tuple[float, float, float, float], resolution: float, step: int) -> list[Zone]:
    """The area in a lon/lat ``bbox`` tiled by UTM zone: one grid per cell, covering it.

    Parameters
    ----------
    bbox
        The area (west, south, east, north) in degrees, within UTM's latitudes (80 S to
        84 N); otherwise ``ValueError``.
    resolution
        Pixel size in metres.
    step
        The chip step in pixels (the stride, else the chip size): each grid's origin is
        a multiple of ``step * resolution`` in its zone's coordinates.

    Returns
    -------
    list of Zone
        One zone per cell (the part of a 6-degree UTM zone north or south of the equator
        in ``bbox``), west to east, north before south.
    """
    zones = []
    for code, cell in utm_cells(bbox):
        geobox = lattice_geobox(cell, code, resolution, step)
        zones.append(Zone(crs_tag_of(code), geobox, cell))
    return zones


def lattice_geobox(cell: Any, crs: str, resolution: float, step: int) -> GeoBox:
    """The smallest grid in ``crs`` with ``resolution`` pixels whose origin lies on the
    lattice of ``step * resolution`` and which covers the lon/lat polygon ``cell``."""
    x0, y0, x1, y1 = to_native(cell, crs).bounds
    size = step * resolution
    x0, x1 = math.floor(x0 / size) * size, math.ceil(x1 / size) * size
    y0, y1 = math.floor(y0 / size) * size, math.ceil(y1 / size) * size
    shape = (round((y1 - y0) / resolution), round((x1 - x0) / resolution))
    return GeoBox(shape, Affine(resolution, 0.0, x0, 0.0, -resolution, y1), crs)


def crs_tag_of(code: str) -> str:
    from odc.geo import CRS

    return crs_tag(CRS(code))


def to_native(cell: Any, crs: str, points_per_edge: int = 64) -> Any:
    """A lon/lat polygon in ``crs``, its edges densified to ``points_per_edge`` points."""
    import shapely
    from pyproj import Transformer

    ring = np.asarray(cell.exterior.coords)
    dense = np.concatenate(
        [np.linspace(ring[k], ring[k + 1], points_per_edge + 1)[:-1] for k in range(len(ring) - 1)]
    )
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(
        dense[:, 0], dense[:, 1]
    )
    return shapely.Polygon(np.stack([x, y], axis=1))
