"""Built-in data that needs no download (the public face of :mod:`xclay.ingest.demo`).

``xclay.datasets.demo_composite()`` is the seeded, synthetic Sentinel-2 L2A-style
composite the README, the notebooks and ``xclay demo`` embed;
``demo_land_cover()`` is its land-cover map, for probes.
"""

from xclay.ingest.demo import DEMO_BANDS, LAND_COVER_CLASSES, demo_composite, demo_land_cover

__all__ = ["DEMO_BANDS", "LAND_COVER_CLASSES", "demo_composite", "demo_land_cover"]
