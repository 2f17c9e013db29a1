"""The pixel grid a load goes onto: the items' common CRS (else the area's UTM zone),
the requested resolution, cropped to the area; refused when it is a units mistake."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xclay.errors import IngestError
from xclay.ingest.items import union_bbox

if TYPE_CHECKING:
    import pystac
    from odc.geo.geobox import GeoBox


MAX_PIXELS = 250_000_000_000  # ~ Africa at 10 m; beyond this a request is a units mistake


@dataclass(frozen=True)
class GridPlan:
    """The pixel grid a request resolves to, before any pixel is read.

    Its ``pixels`` property is the grid's number of pixels.

    Attributes
    ----------
    geobox
        The pixel grid (an ``odc.geo`` GeoBox): CRS, resolution and extent.
    items
        The ids of the STAC items the grid is for, in their order.
    bbox_lonlat
        The area (west, south, east, north) in degrees: the requested bbox, else the
        union of the items' bboxes.
    """

    geobox: GeoBox
    items: tuple[str, ...]
    bbox_lonlat: tuple[float, float, float, float]

    @property
    def pixels(self) -> int:
        ny, nx = self.geobox.shape
        return int(ny) * int(nx)


def plan_grid(
    items: Sequence[pystac.Item],
    *,
    resolution: float,
    crs: str | int | None = None,
    bbox: Sequence[float] | None = None,
    max_pixels: int = MAX_PIXELS,
) -> GridPlan:
    """The grid of a request: CRS (given, the items' common one, or the UTM zone of the
    area's centre), extent (``bbox`` in lon/lat, else the items' union), resolution.

    Parameters
    ----------
    items
        The STAC items the grid is for; at least one.
    resolution
        Pixel size in the target CRS's units (metres for a projected CRS, degrees for a
        geographic one). When it equals the items' own resolution in their shared CRS
        and grid, the grid is their own pixel grid, without resampling.
    crs
        Target CRS (anything ``odc.geo.CRS`` reads: ``"EPSG:32633"``, ``32633``); default
        the items' common ``proj:epsg`` or ``proj:code``, else the UTM zone of the
        area's centre.
    bbox
        Area (west, south, east, north) in degrees; default the items' union.
    max_pixels
        Refuse grids with more pixels than this (a units mistake, not a request).

    Returns
    -------
    GridPlan
        The grid (``geobox``), the ids of ``items`` and the area in lon/lat.
    """
    from odc.geo import CRS
    from odc.geo.geobox import GeoBox
    from odc.geo.geom import BoundingBox

    if not items:
        raise IngestError("no STAC items: the search or file matched nothing.")
    area = tuple(float(v) for v in bbox) if bbox is not None else union_bbox(items)
    if len(area) != 4 or not (area[0] < area[2] and area[1] < area[3]):
        raise IngestError(f"bbox must be [west, south, east, north] in degrees, got {list(area)}.")
    if crs is not None:
        target = CRS(crs)
    else:
        epsgs = {i.properties.get("proj:epsg") for i in items}
        codes = {i.properties.get("proj:code") for i in items} - {None}
        if len(epsgs) == 1 and None not in epsgs:
            target = CRS(f"EPSG:{epsgs.pop()}")
        elif len(codes) == 1:
            target = CRS(codes.pop())
        else:
            target = CRS.utm((area[0] + area[2]) / 2, (area[1] + area[3]) / 2)
    if not (isinstance(resolution, int | float) and math.isfinite(resolution) and resolution > 0):
        raise IngestError(f"resolution must be a positive number, got {resolution!r}.")
    if target.geographic and resolution >= 1:
        raise IngestError(
            f"resolution {resolution} in the geographic CRS {target} means {resolution}-degree "
            "pixels; give the resolution in degrees (e.g. 0.0001) or choose a projected CRS."
        )
    if not target.geographic and resolution < 0.01:
        raise IngestError(
            f"resolution {resolution} m in {target} is below a centimetre; is it in degrees? "
            "Give metres for a projected CRS."
        )
    native = _native_geobox(items, target)
    if native is not None and math.isclose(abs(native.resolution.x), resolution, rel_tol=1e-9):
        # Same CRS and resolution as the items: their own pixel grid, exactly (no resampling).
        geobox = (
            native
            if bbox is None
            else _crop(native, BoundingBox(*area, crs="EPSG:4326").to_crs(target))
        )
    else:
        extent = BoundingBox(*area, crs="EPSG:4326").to_crs(target)
        geobox = GeoBox.from_bbox(extent, crs=target, resolution=resolution)
    ny, nx = geobox.shape
    if ny * nx > max_pixels:
        raise IngestError(
            f"the requested grid is {ny:,} x {nx:,} px ({ny * nx:.2e} pixels) at resolution "
            f"{resolution} in {target}: more than max_pixels={max_pixels:.1e}. Check the "
            "resolution and its units, or split the area into regions."
        )
    west, south, east, north = area
    return GridPlan(
        geobox=geobox, items=tuple(i.id for i in items), bbox_lonlat=(west, south, east, north)
    )


def _native_geobox(items: Sequence[pystac.Item], target: Any) -> GeoBox | None:
    """The union of the items' own pixel grids, exactly, when they share ``target``'s CRS
    and one grid (``proj:transform``, ``proj:shape``); else None."""
    from affine import Affine
    from odc.geo import CRS
    from odc.geo.geobox import GeoBox

    base: Affine | None = None
    windows = []
    for item in items:
        p = item.properties
        code = p.get("proj:code") or (f"EPSG:{p['proj:epsg']}" if p.get("proj:epsg") else None)
        transform, shape = p.get("proj:transform"), p.get("proj:shape")
        if code is None or transform is None or shape is None or CRS(code) != target:
            return None
        t = Affine(*(float(v) for v in transform[:6]))
        if base is None:
            base = t
        if (t.a, t.b, t.d, t.e) != (base.a, base.b, base.d, base.e):
            return None  # another resolution or rotation
        col, row = (t.c - base.c) / base.a, (t.f - base.f) / base.e
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None  # another grid phase
        windows.append((round(row), round(col), int(shape[0]), int(shape[1])))
    assert base is not None
    r0 = min(w[0] for w in windows)
    c0 = min(w[1] for w in windows)
    r1 = max(w[0] + w[2] for w in windows)
    c1 = max(w[1] + w[3] for w in windows)
    return GeoBox((r1 - r0, c1 - c0), base @ Affine.translation(c0, r0), target)


def _crop(geobox: GeoBox, extent: Any) -> GeoBox:
    """The whole pixels of ``geobox`` that cover ``extent`` (in its CRS)."""
    inverse = ~geobox.affine
    cols, rows = zip(
        *(
            inverse @ (x, y)
            for x in (extent.left, extent.right)
            for y in (extent.bottom, extent.top)
        ),
        strict=True,
    )
    ny, nx = geobox.shape
    r0, r1 = max(0, math.floor(min(rows))), min(ny, math.ceil(max(rows)))
    c0, c1 = max(0, math.floor(min(cols))), min(nx, math.ceil(max(cols)))
    if r1 <= r0 or c1 <= c0:
        raise IngestError("the bbox does not overlap the items' pixels.")
    return geobox[r0:r1, c0:c1]
