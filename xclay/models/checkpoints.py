"""Reading model weight files safely: ``torch.load(weights_only=True)`` only."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from xclay._hashing import sha256_file
from xclay.errors import CheckpointError

__all__ = ["file_sha256", "read_torch_file"]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a checkpoint file, recorded in the model card of every output."""
    return sha256_file(Path(path))


def read_torch_file(path: str | os.PathLike[str], *, model: str, mmap: bool = False) -> Any:
    """Load a ``torch.save`` file without unpickling arbitrary objects.

    ``mmap=True`` maps the file instead of reading it all (a 5 GB checkpoint
    whose encoder is a fifth of it), falling back to a plain read for files
    in the legacy (non-zip) format.

    Raises :class:`CheckpointError` for a missing, truncated or corrupt file,
    or one that needs code execution to load.
    """
    import torch

    file = Path(path)
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
