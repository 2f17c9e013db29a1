"""What an embedding writes and what reads it back.

- ``embeddings``: the embeddings Dataset's schema, built block by block and checked.
- ``export``: the embeddings Zarr (whole or by regions) and GeoParquet 1.1.
- ``cog``: Cloud-Optimized GeoTIFFs of embeddings (features or PCA).
- ``formats``: the registry of output formats (:class:`~xclay.protocols.Exporter`), read
  by ``xclay export`` and runs.
- ``thumbnails``: per-chip true-colour previews.
- ``quantize``: int8 vectors with a scale per chip.

It may import the batch path (chip geometry), :mod:`xclay.datacube`, the model card
and the ground modules; never the embedding loop or runs.
"""
