"""Built-in data that needs no download: the demo composite.

:func:`demo_composite` draws a seeded, synthetic Sentinel-2 L2A-style annual
composite over the Amazon basin (UTM zone 20S, near 3.2 S 60.5 W): tropical
forest with canopy texture, a meandering white-water river with sand bars,
a floodplain of flooded forest and black-water oxbow lakes, a tributary,
"fishbone" deforestation along a road (pasture, bare soil and regrowth
lots), a riverside town, campinarana/savanna patches, and holes where the
composite found no cloud-free view (nodata 0 in every band). Reflectances
are L2A digital numbers (reflectance x 10000) with plausible spectra per
land-cover class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr
from odc.geo.geobox import GeoBox
from pyproj import Transformer

from xclay.errors import ConfigError

__all__ = ["DEMO_BANDS", "LAND_COVER_CLASSES", "demo_composite", "demo_land_cover"]

DEMO_BANDS = (
    "blue",
    "green",
    "red",
    "rededge1",
    "rededge2",
    "rededge3",
    "nir",
    "nir08",
    "swir16",
    "swir22",
)
DEMO_CRS = "EPSG:32720"  # WGS 84 / UTM zone 20S
DEMO_CENTRE_LONLAT = (-60.5, -3.2)
NODATA = 0

# Surface reflectance x 10000 per class, bands in DEMO_BANDS order
# (B2, B3, B4, B5, B6, B7, B8, B8A, B11, B12).
_SPECTRA = {
    "forest": (220, 450, 260, 760, 2300, 2850, 3050, 3150, 1500, 620),
    "flooded_forest": (260, 480, 330, 780, 1850, 2250, 2400, 2450, 1150, 460),
    "river": (620, 920, 960, 900, 620, 520, 470, 420, 140, 80),
    "lake": (330, 420, 280, 230, 170, 140, 120, 110, 50, 30),
    "pasture": (450, 760, 700, 1250, 2250, 2600, 2800, 2900, 2600, 1600),
    "bare_soil": (900, 1250, 1550, 1850, 2050, 2250, 2350, 2450, 3300, 2750),
    "regrowth": (280, 560, 340, 920, 2500, 3000, 3300, 3350, 1800, 800),
    "savanna": (520, 820, 920, 1350, 1950, 2250, 2450, 2550, 2950, 2050),
    "urban": (1150, 1250, 1350, 1500, 1700, 1800, 1900, 1950, 2350, 2150),
    "sand": (1500, 1800, 2100, 2300, 2450, 2550, 2650, 2700, 3100, 2600),
}
LAND_COVER_CLASSES = tuple(_SPECTRA)
_CLASS = {name: i for i, name in enumerate(LAND_COVER_CLASSES)}


@dataclass(frozen=True)
class _Scene:
    classes: np.ndarray  # [y, x] uint8 land-cover class index
    gaps: np.ndarray  # [y, x] bool: no cloud-free view (nodata)


def demo_composite(
    size: int = 2048,
    *,
    seed: int = 0,
    year: int = 2024,
    resolution: float = 10.0,
    gap_fraction: float = 0.03,
) -> xr.Dataset:
    """A synthetic Sentinel-2 L2A annual composite, as a datacube.

    Parameters
    ----------
    size
        Edge of the square scene in pixels (2048 px = 20.48 km at 10 m).
    seed
        Everything is drawn from this seed: same seed, same pixels.
    year
        The composite spans this calendar year (time = its midpoint, with
        ``time_start``/``time_end``).
    resolution
        Pixel size in metres.
    gap_fraction
        Approximate fraction of pixels with no cloud-free view (nodata).

    Returns
    -------
    xarray.Dataset
        A datacube: ``pixels(time=1, band=10, y, x)`` uint16, nodata 0,
        platform ``sentinel-2-l2a``, CRS EPSG:32720, chip-aligned origin.
    """
    from xclay.datacube import as_datacube

    if size < 16:
        raise ConfigError(f"the demo scene needs at least 16 pixels a side, got size={size}.")
    scene = _scene(size, seed, gap_fraction)
    rng = np.random.default_rng([seed, 1])
    pixels = _reflectance(scene, rng)
    geobox = _geobox(size, resolution)
    from odc.geo.xr import xr_coords

    coords = xr_coords(geobox, crs_coord_name="spatial_ref")
    da = xr.DataArray(
        pixels,
        dims=("band", "y", "x"),
        coords={
            "band": np.array(DEMO_BANDS, dtype=object),
            "y": coords["y"],
            "x": coords["x"],
            "spatial_ref": coords["spatial_ref"],
        },
        attrs={"nodata": NODATA, "grid_mapping": "spatial_ref"},
    )
    return as_datacube(
        da,
        platform="sentinel-2-l2a",
        time=(f"{year}-01-01T00:00:00", f"{year + 1}-01-01T00:00:00"),
        provenance={
            "generator": f"xclay.datasets.demo_composite(size={size}, seed={seed}, year={year})",
            "synthetic": True,
            "description": "synthetic Sentinel-2 L2A-style annual composite, Amazon basin",
        },
    )


def demo_land_cover(size: int = 2048, *, seed: int = 0, gap_fraction: float = 0.03) -> np.ndarray:
    """The land-cover class map behind :func:`demo_composite` (same size and seed).

    Parameters
    ----------
    size
        Edge of the square scene in pixels, as in :func:`demo_composite`.
    seed
        The seed the scene is drawn from, as in :func:`demo_composite`.
    gap_fraction
        Approximate fraction of pixels with no cloud-free view (nodata), as in
        :func:`demo_composite`.

    Returns
    -------
    numpy.ndarray
        ``[y, x]`` uint8 indices into :data:`LAND_COVER_CLASSES`; 255 where the
        composite has a gap (nodata).
    """
    scene = _scene(size, seed, gap_fraction)
    return np.where(scene.gaps, np.uint8(255), scene.classes)


# --------------------------------------------------------------------------- scene


def _scene(n: int, seed: int, gap_fraction: float) -> _Scene:
    rng = np.random.default_rng([seed, 0])
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    classes = np.full((n, n), _CLASS["forest"], dtype=np.uint8)

    # Campinarana / savanna on poor sandy soils: large, smooth patches.
    savanna = _smooth_noise(rng, (n, n), n / 10) > 1.3
    classes[savanna] = _CLASS["savanna"]

    # Fishbone deforestation along a road (drawn before the rivers, which cut through it).
    _fishbone(classes, rng, xx, yy)

    # Main river: meanders west to east; floodplain, oxbow lakes, sand bars.
    wander = _smooth_noise(rng, (1, n), n / 6)[0] * n * 0.05
    phase = rng.uniform(0, 2 * np.pi, size=2)
    centre = (
        n * 0.58
        + n * 0.08 * np.sin(2 * np.pi * xx[0] / (n * 0.7) + phase[0])
        + n * 0.03 * np.sin(2 * np.pi * xx[0] / (n * 0.23) + phase[1])
        + wander
    )
    width = 0.012 * n + 0.004 * n * (1 + np.sin(2 * np.pi * xx[0] / n + phase[1]))
    dist = np.abs(yy - centre[None, :])
    plain_noise = _smooth_noise(rng, (n, n), n / 40)
    floodplain = dist < width[None, :] / 2 + n * (0.05 + 0.02 * plain_noise)
    classes[floodplain] = _CLASS["flooded_forest"]
    lakes = floodplain & (dist > width[None, :]) & (_smooth_noise(rng, (n, n), n / 60) > 1.6)
    classes[lakes] = _CLASS["lake"]
    river = dist < width[None, :] / 2
    classes[river] = _CLASS["river"]
    bars = (
        river & (dist > width[None, :] / 2 - 0.004 * n) & (_smooth_noise(rng, (n, n), n / 80) > 1.0)
    )
    classes[bars] = _CLASS["sand"]

    # A tributary from the north joining the main river.
    x0 = n * rng.uniform(0.25, 0.4)
    trib_x = x0 + n * 0.04 * np.sin(2 * np.pi * yy[:, 0] / (n * 0.3) + phase[0])
    trib_width = max(2.0, 0.004 * n)
    join = centre[int(np.clip(x0, 0, n - 1))]
    trib = (np.abs(xx - trib_x[:, None]) < trib_width / 2) & (yy < join)
    classes[trib] = _CLASS["river"]

    # A town on the northern bank of the main river.
    tx = int(n * rng.uniform(0.6, 0.8))
    ty = float(centre[tx] - width[tx] - n * 0.03)
    radius = n * 0.035 * (1 + 0.3 * _smooth_noise(rng, (n, n), n / 50))
    town = (np.hypot(xx - tx, yy - ty) < radius) & ~river
    classes[town] = _CLASS["urban"]
    streets = town & ((xx.astype(np.int32) % 12 < 1) | (yy.astype(np.int32) % 12 < 1))
    classes[streets] = _CLASS["bare_soil"]

    # Gaps: where the year's composite found no cloud-free view.
    clouds = _smooth_noise(rng, (n, n), n / 30)
    threshold = np.quantile(clouds, 1.0 - gap_fraction) if gap_fraction > 0 else np.inf
    gaps = clouds > threshold
    return _Scene(classes=classes, gaps=gaps)


def _fishbone(
    classes: np.ndarray, rng: np.random.Generator, xx: np.ndarray, yy: np.ndarray
) -> None:
    """Settlement roads: a main road, side roads ~2 km apart, and farm lots cleared
    from each side road into the forest to a depth that varies lot by lot (older,
    deeper clearings near the main road)."""
    n = classes.shape[0]
    angle = rng.uniform(np.pi / 8, np.pi / 3)
    ox, oy = n * rng.uniform(0.2, 0.4), n * rng.uniform(0.15, 0.35)
    u = (xx - ox) * np.cos(angle) + (yy - oy) * np.sin(angle)  # along the main road
    v = -(xx - ox) * np.sin(angle) + (yy - oy) * np.cos(angle)  # across it
    along = (u > -n * 0.05) & (u < n * 0.95)
    spacing = max(12.0, n * 0.1)
    k = np.round(u / spacing)
    du = u - k * spacing  # signed distance along the main road to the nearest side road
    n_side = int(4 * n / spacing) + 1
    reach = rng.uniform(0.1, 0.35, size=n_side) * n
    side_reach = reach[np.clip(k.astype(np.int64) + n_side // 2, 0, n_side - 1)]
    on_side = along & (np.abs(v) < side_reach)
    lot_width = max(3.0, n * 0.012)  # frontage of one farm along its side road
    lot = np.floor(v / lot_width) * 7919 + k * 104729 + np.sign(du) * 15485863
    salt = int(rng.integers(1 << 30))
    draw = _hash_uniform(lot, salt)
    age = np.clip(1.2 - np.abs(v) / np.maximum(side_reach, 1.0), 0.2, 1.0)
    depth = spacing * 0.45 * age * (0.3 + 0.7 * _hash_uniform(lot, salt + 1))
    cleared = on_side & (np.abs(du) < depth) & (draw < 0.85)
    kind = _hash_uniform(lot, salt + 2)
    far = np.abs(du) > 0.7 * depth  # the back of a lot is often abandoned, regrowing
    classes[cleared & (kind < 0.6) & ~far] = _CLASS["pasture"]
    classes[cleared & (kind >= 0.6) & (kind < 0.75) & ~far] = _CLASS["bare_soil"]
    classes[cleared & ((kind >= 0.75) | far)] = _CLASS["regrowth"]
    road_width = max(1.0, n * 0.0012)
    roads = (along & (np.abs(v) < road_width)) | (on_side & (np.abs(du) < road_width / 2 + 0.5))
    classes[roads] = _CLASS["bare_soil"]


def _reflectance(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    n = scene.classes.shape[0]
    spectra = np.array([_SPECTRA[c] for c in LAND_COVER_CLASSES], dtype=np.float32)  # [K, 10]
    img = spectra[scene.classes]  # [y, x, 10]
    # Smooth variation (soil moisture, canopy density, turbidity) and fine canopy texture.
    broad = _smooth_noise(rng, (n, n), n / 25).astype(np.float32)
    fine = _smooth_noise(rng, (n, n), 1.5).astype(np.float32)
    img *= (1.0 + 0.07 * broad + 0.05 * fine)[..., None]
    veg = np.isin(scene.classes, [_CLASS[c] for c in ("forest", "flooded_forest", "regrowth")])
    nir_like = np.array([0, 0, 0, 0.5, 1, 1, 1, 1, 0.3, 0.1], dtype=np.float32)
    img[veg] *= 1.0 + 0.08 * fine[veg][:, None] * nir_like[None, :]
    img += rng.normal(0.0, 25.0, size=img.shape).astype(np.float32)  # sensor noise, ~0.25 %
    out = np.clip(np.rint(img), 1, 15000).astype(np.uint16)
    out[scene.gaps] = NODATA
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))  # [band, y, x]


def _geobox(n: int, resolution: float) -> GeoBox:
    from affine import Affine

    to_utm = Transformer.from_crs("EPSG:4326", DEMO_CRS, always_xy=True)
    cx, cy = to_utm.transform(*DEMO_CENTRE_LONLAT)
    snap = 2560.0  # origin on a 2.56 km lattice: 256-px chips of 10 m line up across scenes
    left = np.floor((cx - n * resolution / 2) / snap) * snap
    top = np.ceil((cy + n * resolution / 2) / snap) * snap
    return GeoBox(
        (n, n), Affine(resolution, 0.0, float(left), 0.0, -resolution, float(top)), DEMO_CRS
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Gaussian random field with correlation length ``scale`` pixels, zero mean, unit std."""
    noise = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2.0 * (np.pi * scale) ** 2 * (fx**2 + fy**2))
    field = np.fft.irfft2(np.fft.rfft2(noise) * kernel, s=shape)
    std = field.std()
    result: np.ndarray = (field - field.mean()) / (std if std > 0 else 1.0)
    return result


def _hash_uniform(keys: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic uniform [0, 1) value per integer key (one draw per lot)."""
    k = (keys.astype(np.int64) + np.int64(salt)).astype(np.uint64)
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xFF51AFD7ED558CCD)
    k ^= k >> np.uint64(33)
    k *= np.uint64(0xC4CEB9FE1A85EC53)
    k ^= k >> np.uint64(33)
    return (k >> np.uint64(11)).astype(np.float64) / float(1 << 53)
