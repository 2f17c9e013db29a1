"""xclay: satellite imagery composites -> foundation-model embeddings, at planetary scale.

``import xclay`` registers the ``.clay`` accessor on xarray Datasets and
DataArrays; it imports no torch, cupy or kvikio (those load when used).
"""

from xclay import accessor as _accessor  # registers .clay
from xclay import datasets, models
from xclay._version import __version__
from xclay.batch.chips import ChipGrid, ChipGridSpec
from xclay.datacube import as_datacube, open_datacube, validate_datacube, write_datacube
from xclay.embed import EmbedConfig, embed, embed_config, embed_with_config
from xclay.outputs.export import open_embeddings, read_geoparquet, to_geoparquet, to_zarr
from xclay.quality import QualityFilter

del _accessor

__all__ = [
    "ChipGrid",
    "ChipGridSpec",
    "EmbedConfig",
    "QualityFilter",
    "__version__",
    "as_datacube",
    "datasets",
    "embed",
    "embed_config",
    "embed_with_config",
    "models",
    "open_datacube",
    "open_embeddings",
    "read_geoparquet",
    "to_geoparquet",
    "to_zarr",
    "validate_datacube",
    "write_datacube",
]
