"""Content hashes recorded in provenance (local assets, checkpoints)."""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["sha256_file"]


def sha256_file(path: Path, *, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in blocks (memory stays flat for 5 GB checkpoints)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()
