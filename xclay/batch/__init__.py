"""The batch path: from a datacube's storage to batches of chips on the compute device.

- ``chips``: the chip grid (windows, ids, footprints) over a datacube's pixel grid.
- ``readahead``: on object storage, the coming windows' chunks fetched while a read
  decodes.
- ``readers``: the :class:`~xclay.protocols.BatchSource` readers on the host (xarray
  windows, chunk files); their chunk reads, host and GPU, are the datacube's own
  (:mod:`xclay.datacube.chunks`, :mod:`xclay.datacube.gpuchunks`), and so are the layouts,
  which the variables of an opened cube carry (:func:`~xclay.batch.readers.store_layouts`).
- ``batching``: the one fill loop, batch buffers and pool, chip validity.

It may import the ground modules (errors, masks, quality, sensors, devices, protocols)
and :mod:`xclay.datacube`; never the embedding loop, the outputs or runs.
"""
