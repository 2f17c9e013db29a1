"""Checks that need no pixels, run before any compute (and all of them by ``--dry-run``).

A run that would fail after hours for a reason knowable at the start fails at
the start instead: an output folder it cannot write, a disk too small for the
planned outputs, a checkpoint that is missing, unreadable or of another
architecture, model options the model does not have. (Bands the items lack
and items that cannot be read are found by the plan itself.)
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from xclay.errors import OutputError
from xclay.run.plan import RunPlan
from xclay.run.spec import RunSpec
from xclay.storage import Location

__all__ = ["check_outputs", "estimate_output_bytes", "preflight"]

# zstd on imagery (the demo composite: 1.46x); outputs must fit with this margin.
COMPRESSION = 1.4
MARGIN = 1.1


def preflight(spec: RunSpec, resolved: RunPlan, *, dry_run: bool = False) -> None:
    """Raise the first problem found, in the order: model, outputs.

    Parameters
    ----------
    spec
        The run spec: its model (name, checkpoint, output and options) is checked as the
        registry would build it, without building it, and its ``outputs.dir`` as a place
        to write (:func:`check_outputs`).
    resolved
        The spec's plan (:func:`~xclay.run.plan.plan`), which sizes the outputs
        (:func:`estimate_output_bytes`).
    dry_run
        Write nothing: the output folder is checked through its nearest existing parent.
        Default False: the folder is created and a probe file written in it.
    """
    from xclay.models.registry import check_model

    options = spec.model.encoder_options()
    checkpoint = spec.path(spec.model.checkpoint) if spec.model.checkpoint else None
    check_model(spec.model.name, checkpoint=checkpoint, **options)
    check_outputs(spec.outdir, estimate_output_bytes(spec, resolved), create=not dry_run)


def estimate_output_bytes(spec: RunSpec, resolved: RunPlan) -> int:
    """What a run writes: the datacube (unless it embeds an existing one), compressed,
    and the vectors twice (embeddings Zarr and GeoParquet).

    Parameters
    ----------
    spec
        The run spec: its model (the values of a chip's vector with its options and chip
        size: :meth:`xclay.models.ModelInfo.values_per_chip`) and ``outputs.quantize``
        (int8: one byte a value instead of four).
    resolved
        The spec's plan: its zones' pixels, time steps, bands and dtype size the
        datacube (taken as compressing 1.4 times); its chips count the vectors.

    Returns
    -------
    int
        Estimated bytes: the datacube, plus twice the chips' vectors with about 512
        bytes of geometry and columns each.
    """
    import numpy as np

    from xclay.models import get_model_info

    datacube = 0
    if resolved.source == "stac":
        pixels = sum(int(np.prod(z.geobox.shape)) for z in resolved.zones)
        itemsize = np.dtype(resolved.dtype).itemsize
        datacube = int(pixels * resolved.time_steps * len(resolved.bands) * itemsize / COMPRESSION)
    options = spec.model.encoder_options()
    values = get_model_info(spec.model.name).values_per_chip(options, spec.grid.chip_size)
    per_vector = values * (1 if spec.outputs.quantize else 4) + 512  # + geometry and columns
    return datacube + 2 * resolved.chips * per_vector


def check_outputs(folder: Path | Location, needed: int, *, create: bool = True) -> None:
    """The output folder can be created and written, and its disk has room for ``needed``
    bytes (with a margin); else :class:`~xclay.errors.OutputError`.

    Parameters
    ----------
    folder
        The output folder (``outputs.dir``); it need not exist yet. On object storage
        the check is a write and delete of a probe object (a dry run writes it too: the
        bucket, the credentials and the permission to write are what can fail there),
        and there is no free space to check.
    needed
        Bytes the outputs need (:func:`estimate_output_bytes`); the disk must have 10%
        more than this free.
    create
        Default True: create the folder and write (then remove) a probe file in it.
        False: write nothing; the folder's nearest existing parent must be writable.
    """
    if isinstance(folder, Location) and not folder.is_local:
        probe = folder / f".xclay-write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"xclay")
            probe.remove()
        except OSError as err:
            raise OutputError(
                f"cannot write the outputs: {str(err).rstrip('.')}. Choose another outputs.dir "
                "(CLI: the spec's outputs.dir, or --out), or fix the credentials or the "
                "bucket's permissions. Nothing was run."
            ) from err
        return
    local = folder.path if isinstance(folder, Location) else Path(folder)
    _check_local_outputs(local, needed, create=create)


def _check_local_outputs(folder: Path, needed: int, *, create: bool) -> None:
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        # The same checks with or without create, so a dry run refuses what a run would.
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        if os.statvfs(existing).f_blocks == 0:  # /proc, /sys: no file can be stored there
            raise OSError(
                errno.EINVAL, "a pseudo file system, where no outputs can be stored", str(existing)
            )
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "Permission denied", str(existing))
        if create:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".xclay-write-probe-{os.getpid()}"
            with probe.open("wb") as f:
                f.write(b"xclay")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
            existing = folder
    except OSError as err:
        reason = "it is read-only" if err.errno == errno.EROFS else (err.strerror or str(err))
        if err.filename and Path(err.filename) != folder:
            reason += f" ({err.filename})"
        raise OutputError(
            f"cannot write the outputs in {folder}: {reason}. Choose another outputs.dir (CLI: "
            "the spec's outputs.dir, or --out), or fix its permissions. Nothing was run."
        ) from err
    free = shutil.disk_usage(existing).free
    if free < needed * MARGIN:
        raise OutputError(
            f"the outputs need about {_gib(needed)} and {folder} has {_gib(free)} free; free "
            "space there or choose another outputs.dir. Nothing was run."
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"
