"""Where datacubes come from: STAC items composited onto a grid, and the built-in demo scene.

Modules, each importing only those above it in this list (and the datacube layer):

- ``items``: STAC items loaded, made from local GeoTIFFs, filtered and described.
- ``grid``: the pixel grid a load goes onto.
- ``composite``: compositing over time, solar days; the median's array kernels (NumPy or
  CuPy).
- ``gpu_composite``: where a composite's arithmetic runs (CPU or CUDA GPU), CuPy imported
  when used.
- ``median``: a median composite of an odc-stac load chunk by chunk, its reads on a pool
  sized for latency.
- ``stac``: :func:`from_stac` and :func:`datacube_template`.
- ``demo``: the synthetic demo composite (public as :mod:`xclay.datasets`).
"""

from xclay.errors import IngestError
from xclay.ingest.composite import Composite
from xclay.ingest.grid import MAX_PIXELS, GridPlan, plan_grid
from xclay.ingest.items import filter_items, item_solar_day, load_items, solar_day, stac_item
from xclay.ingest.stac import datacube_template, from_stac

__all__ = [
    "MAX_PIXELS",
    "Composite",
    "GridPlan",
    "IngestError",
    "datacube_template",
    "filter_items",
    "from_stac",
    "item_solar_day",
    "load_items",
    "plan_grid",
    "solar_day",
    "stac_item",
]
