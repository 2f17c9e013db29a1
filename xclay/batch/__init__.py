"""The batch path: from a datacube's storage to batches of chips on the compute device.

- ``chips``: the chip grid (windows, ids, footprints) over a datacube's pixel grid.
- ``chunkio``: Zarr v3 chunk files read directly (layouts, shards, checksums), on a
  local disk or, a batch's chunks gathered, on object storage.
- ``readahead``: on object storage, the coming windows' chunks fetched while a read
  decodes.
- ``readers``: the :class:`~xclay.protocols.BatchSource` readers on the host (xarray
  windows, chunk files) and the choice of reader for a run.
- ``gpu``: kvikIO reads into GPU memory, nvCOMP decode there.
- ``batching``: the one fill loop, batch buffers and pool, chip validity.

It may import the ground modules (errors, masks, quality, sensors, devices, protocols)
and :mod:`xclay.datacube`; never the embedding loop, the outputs or runs.
"""
