"""Runs: a spec in, a continent's embeddings out, region by region, resumably.

The layers, each importing only those below it:

- :mod:`~xclay.run.spec`: run specs (YAML) and their validation;
- :mod:`~xclay.run.items`: the run's STAC items, indexed once, in one sidecar;
- :mod:`~xclay.run.zones`: the grids an area is cut into (one CRS, or UTM zones);
- :mod:`~xclay.run.plan`: what a run will do, from metadata and arithmetic alone;
- :mod:`~xclay.run.state`: regions, markers, resuming;
- :mod:`~xclay.run.tasks`: one region's work, on a worker;
- :mod:`~xclay.run.phases`: the driver: ingest, embed, export, the report;
- :mod:`~xclay.run.cluster`: Dask clusters set up for xclay.
"""

from xclay.run.cluster import client_for, warm_workers
from xclay.run.phases import RunReport, embed_step, export_step, ingest, run
from xclay.run.plan import RunPlan, plan
from xclay.run.spec import RunSpec, SpecError, load_spec

__all__ = [
    "RunPlan",
    "RunReport",
    "RunSpec",
    "SpecError",
    "client_for",
    "embed_step",
    "export_step",
    "ingest",
    "load_spec",
    "plan",
    "run",
    "warm_workers",
]
