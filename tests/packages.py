"""Plug-in packages installed for a test as pip installs them: a module and its dist-info
folder with ``entry_points.txt``, on this process's path and on its children's (Dask
workers), with every plug-in registry put back afterwards."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from xclay import plugins


@contextlib.contextmanager
def installed(
    site: Path,
    module: str,
    source: str,
    entry_points: Mapping[str, Mapping[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Path]:
    """Install ``module`` (its ``source``) with ``entry_points`` ({group: {name: value}})
    into ``site``; within the block, xclay's registries find them as they would an
    installed package's.

    Parameters
    ----------
    site
        An empty folder: the site-packages of the test.
    module
        The module's name (``xclay_extras``).
    source
        Its code.
    entry_points
        ``{"xclay.sources": {"windows": "xclay_extras:WindowsEngine"}}``.
    monkeypatch
        The test's: the paths it adds are undone with it.
    """
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    name = module.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "\n".join(
            f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
            for group, points in entry_points.items()
        )
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    try:
        with plugins.isolated():
            yield site
    finally:
        sys.modules.pop(module, None)  # the next test imports its own copy


# A package of extras as a user would write one: an output format (every embedded chip's
# vector and centre in one compressed NumPy file) and a read engine (every chip through
# xarray, one window at a time, counting the sources it opens in its process).
EXTRAS = """
from pathlib import Path
from types import MappingProxyType

import numpy as np

import xclay
from xclay.batch.engines import SourceChoice, SourcePlugin
from xclay.batch.readers import WindowSource
from xclay.protocols import ExportOption


class NpzExporter:
    name = "npz"
    suffix = ".npz"
    media_type = "application/x-npz"
    summary = "NumPy arrays: vectors and chip centres"
    options = MappingProxyType(
        {"decimals": ExportOption(None, "npz: round the vectors", type=int, metavar="N")}
    )
    by_region = False

    def write(self, emb, out, *, overwrite, **options):
        ds = emb if not isinstance(emb, (str, Path)) else xclay.open_embeddings(emb)
        out = Path(out)  # this plug-in writes local files only
        if out.exists() and not overwrite:
            raise FileExistsError(out)
        done = ds["embedded"].values
        vectors = ds["embedding"].values[done]
        if options.get("decimals") is not None:
            vectors = vectors.round(options["decimals"])
        np.savez_compressed(out, vectors=vectors, lon=ds["lon"].values, lat=ds["lat"].values)
        return [out]

    def asset(self, path):
        return {"type": self.media_type, "title": "NumPy vectors", "roles": ["data"]}


class WindowsEngine(SourcePlugin):
    name = "windows"
    description = "every chip through xarray, one window at a time"
    opened = 0

    def open(self, cube, *, chip_size, device, threads, stride=None):
        type(self).opened += 1
        source = WindowSource(cube["pixels"], cube.data_vars.get("quality"))
        return SourceChoice(source, source, self.name, [], "through xarray")
"""
EXTRAS_ENTRY_POINTS = {
    "xclay.exporters": {"npz": "xclay_extras:NpzExporter"},
    "xclay.sources": {"windows": "xclay_extras:WindowsEngine"},
}
