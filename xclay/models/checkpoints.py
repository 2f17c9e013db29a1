"""Reading model weight files safely: ``torch.load(weights_only=True)`` only; a checkpoint
given as a URL is read from its local cached copy (:mod:`xclay.storage.cache`)."""

from __future__ import annotations

import functools
import pickle
import zipfile
from pathlib import Path
from typing import Any

from xclay._hashing import sha256_file
from xclay.errors import CheckpointError
from xclay.storage import Where

__all__ = ["file_sha256", "read_torch_file"]


def file_sha256(path: Where) -> str:
    """sha256 of a checkpoint file, recorded in the model card of every output.

    Parameters
    ----------
    path
        The checkpoint file, or its URL (then its cached copy's bytes:
        :func:`~xclay.storage.cache.local_checkpoint`); it is read in blocks, so memory
        stays flat for large files.

    Returns
    -------
    str
        The hex digest of the file's bytes.
    """
    from xclay.storage.cache import local_checkpoint, recorded_sha256

    file = local_checkpoint(path)
    return recorded_sha256(file) or _sha256_unchanged(file)


@functools.cache
def _memo(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def _sha256_unchanged(file: Path) -> str:
    """A file's sha256, hashed once per process while it is unchanged (a run's start and
    its model card both ask; a 5 GB checkpoint takes seconds)."""
    st = file.stat()
    return _memo(str(file.resolve()), st.st_size, st.st_mtime_ns)


def read_torch_file(path: Where, *, model: str, mmap: bool = False) -> Any:
    """Load a ``torch.save`` file without unpickling arbitrary objects.

    Tensors are loaded onto the CPU, with ``weights_only=True``. Raises
    :class:`CheckpointError` for a missing, truncated or corrupt file, or one that
    needs code execution to load.

    Parameters
    ----------
    path
        The file written by ``torch.save``: a path, or a URL (read through the local
        cache, :func:`~xclay.storage.cache.local_checkpoint`).
    model
        The model the file is for (``"Clay"``, ``"rcf"``), named in the error messages.
    mmap
        Map the file instead of reading it all (a 5 GB checkpoint whose encoder is a
        fifth of it); files in the legacy (non-zip) format are read in full anyway.
        Default False: a plain read.

    Returns
    -------
    Any
        What the file holds, e.g. a state dict, or a dict of tensors and plain values.
    """
    import torch

    from xclay.storage.cache import local_checkpoint

    file = local_checkpoint(path)
    if not file.is_file():
        raise CheckpointError(f"{model} checkpoint {file} does not exist (or is not a file).")
    try:
        if mmap and zipfile.is_zipfile(file):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):  # a class weights_only refuses to build
            raise CheckpointError(
                f"{file} cannot be loaded safely: it holds objects that need code to rebuild "
                f"({str(err).splitlines()[-1][:200]}). xclay never unpickles arbitrary objects; "
                "export the weights as a plain state dict or safetensors."
            ) from err
        raise CheckpointError(
            f"{file} is not a readable {model} checkpoint ({str(err).splitlines()[-1][:200]}); it "
            "may be truncated or corrupt: download or save it again."
        ) from err
    except Exception as err:  # corrupt bytes fail in many ways (IndexError, KeyError, struct.error)
        raise CheckpointError(
            f"{file} is not a readable {model} checkpoint ({type(err).__name__}: {err}); it may be "
            "truncated or corrupt: download or save it again."
        ) from err
