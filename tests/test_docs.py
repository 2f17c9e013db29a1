"""Every code block of README.md and docs/*.md, run as written.

A page's blocks run in order in one temporary folder and one Python namespace, as a
reader would type them (a notebook's cells, in effect): ``python`` blocks in this process,
``bash``/``sh``/``console`` blocks in a shell with the package's ``xclay`` first on the
PATH, ``yaml`` and ``toml`` blocks parsed (a run spec is also loaded as a spec; ``<!-- file:
NAME -->`` right before a block writes it to ``NAME`` for later blocks; a ``toml`` block's
entry points are installed, as pip would install the package that declares them).
``text`` blocks are output samples, synopses and diagrams: never run. MyST directives
(```` ```{toctree} ````) are not code. A block with no language fails the inventory: say
which it is.

A block that cannot run here carries ``<!-- skip: why -->`` right before it (an HTML
comment: GitHub and MyST show nothing); each one is a skipped test with its reason, so
``pytest -ra`` lists them. Reasons are the network (a STAC API, PyPI, a Dask scheduler or
SLURM), a GPU, or the official 5 GB Clay checkpoint, nothing else.

Files a reader has and this repository does not are stand-ins (``STANDINS``), placed in a
page's folder before its first block: ``clay-v1.5.ckpt`` is Clay v1.5 tiny with a small
decoder, random but seeded, in the official checkpoint's layout (the loader reads the size
from it); ``cube.zarr`` is the demo's datacube (``xclay demo --size 512``); ``scene.tif``,
``scene_SCL.tif``, ``B04.tif`` and ``B08.tif`` are Sentinel-2 L2A-like GeoTIFFs cut from the
demo composite (the real scenes in ../shared/data are 8-bit Landsat 7 numbers, which the
``sentinel-2-l2a`` normalisation the examples name rightly refuses); ``spec.yaml`` is a run
spec over the real Landsat 7 scene of ../shared/data (rcf); ``my_package`` is a band-means
plug-in like the one of tests/models/test_plugins.py; ``landcover.parquet`` and
``landcover.tif`` are labels of the demo composite from its land-cover truth (300 points;
a class raster at 20 m).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import OLINDA_BANDS, OLINDA_TIF, OLINDA_WAVELENGTHS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN = ("python", "bash", "sh", "console")
CHECK = ("yaml", "toml")
TEXT = ("text",)
# What a skip may be for; anything else is a block to fix or a stand-in to add.
SKIP_REASONS = ("needs the network", "needs a GPU", "needs the official")
# How many blocks are skipped: a new skip changes this number, in review.
SKIPPED = 12

# The stand-ins each page's blocks refer to (see the module docstring).
STANDINS: dict[str, tuple[str, ...]] = {
    "README.md": ("scene.tif", "scene_SCL.tif", "clay-v1.5.ckpt"),
    "docs/getting-started.md": ("scene.tif", "clay-v1.5.ckpt"),
    "docs/cli.md": ("cube.zarr", "clay-v1.5.ckpt", "spec.yaml"),
    "docs/run-spec.md": ("spec.yaml", "scene.tif", "B04.tif", "B08.tif"),
    "docs/hpc.md": ("spec.yaml",),
    "docs/models.md": ("cube.zarr", "clay-v1.5.ckpt", "my_package"),
    "docs/gpu.md": ("cube.zarr", "clay-v1.5.ckpt"),
    "docs/cloud.md": ("items.json", "s3"),
    "docs/maps.md": ("cube.zarr", "landcover.parquet", "landcover.tif"),
}
# "s3": a real S3 server on 127.0.0.1 (tests/s3.py) with a bucket "my-bucket", and the
# page's environment pointing at it, as a reader's would point at theirs.
BUCKET = "my-bucket"

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<kind>[\w-]+):\s*(?P<value>.*?)\s*-->\s*$")
MARKERS = ("skip", "file")


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str  # the info string's first word; "" when there is none
    code: str
    skip: str | None = None
    file: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def read_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """A page's fenced blocks, and the problems of its markers (one that is not right
    before a block, or is unknown)."""
    page = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    blocks: list[Block] = []
    problems: list[str] = []
    markers: dict[str, str] = {}
    marker_line = 0
    lines = path.read_text().splitlines()
    k = 0
    while k < len(lines):
        line = lines[k]
        marker = MARKER.match(line)
        opening = FENCE.match(line)
        if marker:
            if marker["kind"] not in MARKERS:
                problems.append(f"{page}:{k + 1}: an unknown marker {marker['kind']!r}")
            if marker["kind"] in markers:
                problems.append(f"{page}:{k + 1}: a second {marker['kind']} marker")
            markers[marker["kind"]] = marker["value"]
            marker_line = k + 1
        elif opening:
            indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
            end = k + 1
            close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            while end < len(lines) and not close.match(lines[end]):
                end += 1
            body = [
                text[len(indent) :] if text.startswith(indent) else text
                for text in lines[k + 1 : end]
            ]
            blocks.append(
                Block(
                    page,
                    k + 1,
                    info.split()[0] if info else "",
                    "\n".join(body) + "\n",
                    skip=markers.get("skip"),
                    file=markers.get("file"),
                )
            )
            markers = {}
            k = end
        elif line.strip() and markers:
            problems.append(f"{page}:{marker_line}: a marker that is not right before a block")
            markers = {}
        k += 1
    if markers:
        problems.append(f"{page}:{marker_line}: a marker at the end of the page")
    return blocks, problems


def _all_blocks() -> list[Block]:
    return [block for path in PAGES for block in read_blocks(path)[0]]


BLOCKS = _all_blocks()
RUNNABLE = [b for b in BLOCKS if b.lang in RUN + CHECK]


# --------------------------------------------------------------------------- stand-ins


def _write_clay_checkpoint(path: Path) -> None:
    """Clay v1.5 tiny and a small decoder, random but seeded, as the official Lightning
    checkpoint lays them out (so ``loss=True`` runs too)."""
    import torch

    from xclay.models.clay_decoder import ClayDecoder, DecoderSize
    from xclay.models.clay_encoder import ClayEncoder

    torch.manual_seed(0)
    encoder = ClayEncoder.from_size("tiny")
    decoder = ClayDecoder(encoder.dim, DecoderSize(dim=64, depth=2, heads=4, dim_head=16))
    state = {f"model.encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"model.decoder.{k}": v for k, v in decoder.state_dict().items()})
    state["model.teacher.cls_token"] = torch.zeros(1, 1, 8)
    hyper = {"model_size": "tiny", "norm_pix_loss": False}
    torch.save({"state_dict": state, "hyper_parameters": hyper}, path)


def _write_scenes(folder: Path) -> None:
    """GeoTIFFs as a Sentinel-2 L2A user has them, cut from the demo composite: a 4-band
    scene, its scene classification (SCL, from the demo's land cover, with a cloud and its
    shadow), and single bands named as in the SAFE format."""
    import numpy as np
    import rioxarray  # noqa: F401  (the .rio accessor)

    import xclay

    size = 512
    cube = xclay.datasets.demo_composite(size)
    pixels = cube["pixels"].isel(time=0).drop_vars(["time", "time_start", "time_end"])
    pixels = pixels.drop_vars("wavelength").rio.write_nodata(0)
    pixels.sel(band=["blue", "green", "red", "nir"]).rio.to_raster(folder / "scene.tif")
    pixels.sel(band=["red"]).rio.to_raster(folder / "B04.tif")
    pixels.sel(band=["nir"]).rio.to_raster(folder / "B08.tif")

    land = xclay.datasets.demo_land_cover(size)
    names = xclay.datasets.LAND_COVER_CLASSES
    codes = {"river": 6, "lake": 6, "bare_soil": 5, "urban": 5, "sand": 5}  # else 4 (vegetation)
    lookup = np.array([codes.get(name, 4) for name in names] + [0] * (256 - len(names)))
    scl = lookup[land].astype("uint8")
    scl[40:160, 300:420] = 9  # a cloud over one chip,
    scl[170:220, 280:400] = 3  # and its shadow
    layer = pixels.isel(band=[0]).copy(data=scl[None])
    layer.rio.write_nodata(0).rio.to_raster(folder / "scene_SCL.tif")


def _write_labels(folder: Path) -> None:
    """Labels of the demo composite (512 px) as a user has them, from its land-cover truth:
    300 points in longitude and latitude (GeoParquet, a ``landcover`` column of names), and
    the class raster on a 20 m grid in WGS84 (GeoTIFF; 255 where unlabelled)."""
    import geopandas as gpd
    import numpy as np
    import rioxarray  # noqa: F401  (the .rio accessor)
    import xarray as xr

    import xclay
    from xclay.datacube import datacube_geobox

    size = 512
    box = datacube_geobox(xclay.datasets.demo_composite(size))
    truth = xclay.datasets.demo_land_cover(size)
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, size, 600), rng.integers(0, size, 600)
    keep = truth[rows, cols] < 255
    rows, cols = rows[keep][:300], cols[keep][:300]
    transform: Any = box.affine
    x, y = transform @ (cols + 0.5, rows + 0.5)
    names = np.array(xclay.datasets.LAND_COVER_CLASSES)[truth[rows, cols]]
    points = gpd.GeoDataFrame(
        {"landcover": names}, geometry=gpd.points_from_xy(x, y), crs=str(box.crs)
    )
    points.to_crs("EPSG:4326").to_parquet(folder / "landcover.parquet")
    xs = box.affine.c + box.affine.a * (np.arange(size) + 0.5)
    ys = box.affine.f + box.affine.e * (np.arange(size) + 0.5)
    raster = xr.DataArray(truth, dims=("y", "x"), coords={"y": ys, "x": xs})
    raster = raster.rio.write_crs(str(box.crs)).rio.write_nodata(255)
    coarse = raster.coarsen(y=2, x=2).max().astype("uint8")  # 20 m, as labels often come
    coarse.rio.write_crs(str(box.crs)).rio.write_nodata(255).rio.to_raster(folder / "landcover.tif")


def _write_spec(folder: Path) -> None:
    """A run spec over the real Landsat 7 scene: items made by ``stac_item``, rcf."""
    import pystac

    from xclay.ingest import stac_item

    item = stac_item(
        OLINDA_TIF, bands=OLINDA_BANDS, wavelengths=OLINDA_WAVELENGTHS, datetime="2001-07-01"
    )
    items = folder / "olinda-items.json"
    pystac.ItemCollection([item]).save_object(dest_href=str(items))
    shutil.copy(items, folder / "items.json")  # hrefs absolute: it works from any folder
    spec = {
        "name": "olinda",
        "input": {"stac": {"items": str(items)}, "bands": OLINDA_BANDS},
        "grid": {"resolution": 30, "chip_size": 64},
        "model": {"name": "rcf", "options": {"num_filters": 64}},
        "outputs": {"dir": "spec-out"},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


# The user's package of models.md (its entry point comes from the page's toml block): each
# band's mean over a chip's valid pixels, over a per-band std fitted on the cube, as the
# plug-in of tests/models/test_plugins.py, but as long as the cube has bands.
PLUGIN = """
import torch

from xclay.models import EncoderPlugin, ModelCard


class BandMeans:
    def __init__(self):
        self._std = None

    @property
    def preferred_precision(self):
        return "fp32"

    @property
    def card(self):
        std = None if self._std is None else self._std.tolist()
        return ModelCard(
            name="band-means", version="1", family="docs", description="band means",
            dim=4 if std is None else len(std), output="pooled", params={"std": std},
        )

    def prepare(self, spec, sample, *, device, precision):
        if self._std is None:
            self._std = sample(8, 0).pixels.double().std(dim=(0, 2, 3)).clamp_min(1.0)
        self._device = device

    def encode(self, batch):
        x = batch.pixels.to(self._device, torch.float64) / self._std.to(self._device)[:, None, None]
        valid = batch.valid.to(self._device)[:, None]
        return ((x * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp_min(1)).float()

    @classmethod
    def from_card(cls, card, *, checkpoint=None):
        card = card if isinstance(card, ModelCard) else ModelCard.from_dict(dict(card))
        encoder = cls()
        encoder._std = torch.tensor(card.params["std"], dtype=torch.float64)
        return encoder


class BandMeansModel(EncoderPlugin):
    name = "band-means"
    description = "per-band means"
    dim = 4

    def build(self):
        return BandMeans()

    def rebuild(self, card, *, checkpoint=None):
        return BandMeans.from_card(card)
"""


def _write_plugin(folder: Path) -> None:
    package = folder / "my_package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(PLUGIN)


@dataclass
class Demo:
    folder: Path
    stdout: str


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """``xclay demo --size 512``, as a user runs it."""
    folder = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "xclay.cli", "demo", "--size", "512", "--no-progress"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return Demo(folder / "xclay-demo", done.stdout)


@pytest.fixture(scope="module")
def standins(tmp_path_factory: pytest.TempPathFactory, demo: Demo) -> Path:
    if not OLINDA_TIF.is_file():
        pytest.skip(f"real test data not found at {OLINDA_TIF} (../shared/data is absent)")
    pytest.importorskip("rioxarray", reason="the docs' examples need xclay[io]")
    pytest.importorskip("distributed", reason="the docs' examples need xclay[dask]")
    folder = tmp_path_factory.mktemp("standins")
    _write_clay_checkpoint(folder / "clay-v1.5.ckpt")
    _write_scenes(folder)
    _write_spec(folder)
    _write_plugin(folder)
    _write_labels(folder)
    shutil.copytree(demo.folder / "cube.zarr", folder / "cube.zarr")
    return folder


# --------------------------------------------------------------------------- pages


@dataclass
class Page:
    """A page's folder, namespace and environment, shared by its blocks in order."""

    folder: Path
    site: Path  # where its toml blocks install entry points (on sys.path and PYTHONPATH)
    env: dict[str, str]
    namespace: dict[str, Any] = field(default_factory=dict)
    ran: set[int] = field(default_factory=set)
    failed: int | None = None


@pytest.fixture(scope="module")
def pages(
    tmp_path_factory: pytest.TempPathFactory, standins: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Page]]:
    """Each page's state, made on its first block; what a page changes in this process
    (the model registry, sys.path) is undone after the module."""
    from xclay import plugins

    made: dict[str, Page] = {}
    patch = pytest.MonkeyPatch()
    registries = plugins.isolated()
    registries.__enter__()
    cache = tmp_path_factory.mktemp("xclay-cache")

    def get(name: str) -> Page:
        if name not in made:
            folder = tmp_path_factory.mktemp(re.sub(r"\W", "-", name))
            site = tmp_path_factory.mktemp("site")
            extra: dict[str, str] = {}
            for standin in STANDINS.get(name, ()):
                if standin == "s3":
                    extra.update(_bucket(request))
                    continue
                source, target = standins / standin, folder / standin
                if source.is_dir() and standin.endswith(".zarr"):
                    shutil.copytree(source, target)
                elif source.is_dir():
                    shutil.copytree(source, site / standin)
                else:
                    target.symlink_to(source)
            env = {
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "PYTHONPATH": str(site),
                "XCLAY_CACHE": str(cache),
                "MPLBACKEND": "Agg",
                **extra,
            }
            made[name] = Page(folder, site, env)
        return made[name]

    yield get
    patch.undo()
    registries.__exit__(None, None, None)
    for module in [m for m in sys.modules if m.partition(".")[0] == "my_package"]:
        del sys.modules[module]


def _bucket(request: pytest.FixtureRequest) -> dict[str, str]:
    """The S3 server's environment, with the docs' bucket made on it (once)."""
    import urllib.error
    import urllib.request

    from tests.s3 import S3Server

    server: S3Server = request.getfixturevalue("s3_server")
    put = urllib.request.Request(f"{server.endpoint}/{BUCKET}", method="PUT")
    try:
        urllib.request.urlopen(put, timeout=30).close()
    except urllib.error.HTTPError as err:  # made by an earlier page
        if err.code != 409:
            raise
    return server.env


def _run(block: Block, page: Page, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(page.folder)
    if block.lang == "python":
        _run_python(block, page, monkeypatch)
    elif block.lang in ("bash", "sh", "console"):
        _run_shell(block, page)
    elif block.lang == "yaml":
        _check_yaml(block, page)
    elif block.lang == "toml":
        _check_toml(block, page, monkeypatch)
    if block.file:
        (page.folder / block.file).write_text(block.code)


def _run_python(block: Block, page: Page, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(page.site))
    monkeypatch.setenv("XCLAY_CACHE", page.env["XCLAY_CACHE"])
    for name, value in page.env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    before = set(page.namespace)
    code = compile("\n" * block.line + block.code, str(ROOT / block.page), "exec")
    with redirect_stdout(StringIO()):
        exec(code, page.namespace)
        # a block that defines tests (models.md) is run as pytest would run them
        for name in sorted(set(page.namespace) - before):
            if name.startswith("test_") and callable(page.namespace[name]):
                page.namespace[name]()
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


def _run_shell(block: Block, page: Page) -> None:
    code = block.code
    if block.lang == "console":  # commands after a prompt; the rest is their output
        code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ "))
    done = subprocess.run(
        ["bash", "-euxo", "pipefail", "-c", code],
        cwd=page.folder,
        env=page.env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        pytest.fail(
            f"{block.id} exited with {done.returncode}:\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-5000:]}",
            pytrace=False,
        )


def _check_yaml(block: Block, page: Page) -> None:
    data = yaml.safe_load(block.code)
    if isinstance(data, dict) and {"input", "outputs"} <= set(data):  # a run spec
        from xclay.run import load_spec

        spec = page.folder / f".block-{block.line}.yaml"
        spec.write_text(block.code)
        load_spec(spec)


def _check_toml(block: Block, page: Page, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyproject's entry points installed as pip installs them: a dist-info folder."""
    data = tomllib.loads(block.code)
    groups = data.get("project", {}).get("entry-points", {})
    if not groups:
        return
    name = re.sub(r"\W", "_", f"docs-{block.line}")
    info = page.site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    entries = [
        f"[{group}]\n" + "".join(f"{key} = {value}\n" for key, value in points.items())
        for group, points in groups.items()
    ]
    (info / "entry_points.txt").write_text("\n".join(entries))
    from xclay import plugins

    monkeypatch.syspath_prepend(str(page.site))
    plugins.reload()


# --------------------------------------------------------------------------- tests


def test_every_block_says_what_it_is() -> None:
    """Each block is run, checked, or an output sample (``text``); markers sit right
    before a block; a skip gives one of the allowed reasons, and the skips are counted."""
    problems = [p for path in PAGES for p in read_blocks(path)[1]]
    for block in BLOCKS:
        if block.lang.startswith("{"):
            continue  # a MyST directive
        if block.lang not in RUN + CHECK + TEXT:
            problems.append(f"{block.id}: a ```{block.lang} block; ```text for an output sample")
        if block.skip is not None and not block.skip.startswith(SKIP_REASONS):
            problems.append(f"{block.id}: skip reason {block.skip!r}: not one of {SKIP_REASONS}")
        if (block.skip or block.file) and block.lang not in RUN + CHECK:
            problems.append(f"{block.id}: a marker on a block that is never run")
    assert not problems, "\n".join(problems)
    skipped = [f"{b.id}: {b.skip}" for b in RUNNABLE if b.skip]
    assert len(skipped) == SKIPPED, "\n".join(skipped)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs_as_written(
    block: Block, pages: Callable[[str], Page], monkeypatch: pytest.MonkeyPatch
) -> None:
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    page = pages(block.page)
    # the page's blocks before this one first, when it is run on its own (pytest -k)
    for earlier in [b for b in RUNNABLE if b.page == block.page and b.line <= block.line]:
        if earlier.skip or earlier.line in page.ran:
            continue
        if page.failed is not None:
            pytest.fail(f"not run: the block at line {page.failed} of {block.page} failed")
        page.ran.add(earlier.line)
        try:
            _run(earlier, page, monkeypatch)
        except BaseException:
            page.failed = earlier.line
            raise


def test_markers_belong_to_the_block_after_them(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- skip: needs a GPU -->\n\n```bash\nnvidia-smi\n```\n\n"
        "<!-- file: spec.yaml -->\n```yaml\na: 1\n```\n\n````\nno language\n```\n````\n"
        "<!-- skip: a marker -->\nwith text after it\n\n<!-- skpi: typo -->\n```text\n```\n"
    )
    blocks, problems = read_blocks(page)
    assert [(b.line, b.lang, b.skip, b.file) for b in blocks] == [
        (5, "bash", "needs a GPU", None),
        (10, "yaml", None, "spec.yaml"),
        (14, "", None, None),
        (22, "text", None, None),
    ]
    assert blocks[0].code == "nvidia-smi\n" and blocks[2].code == "no language\n```\n"
    assert problems == [
        "page.md:18: a marker that is not right before a block",
        "page.md:21: an unknown marker 'skpi'",
    ]


def test_the_readme_shows_what_the_demo_prints(demo: Demo) -> None:
    """The README's sample of ``xclay demo``'s output has the lines the demo prints."""
    sample = next(b for b in BLOCKS if b.page == "README.md" and "xclay demo:" in b.code)
    assert sample.lang == "text"
    labels = [line.split()[0] for line in sample.code.strip().splitlines()]
    assert labels == [line.split()[0] for line in demo.stdout.strip().splitlines()], demo.stdout


def test_the_cli_page_names_every_default() -> None:
    """docs/cli.md renders each command's help (``{xclay-cli}``): every option with a
    default says what it is."""
    import argparse

    from xclay.cli import _parser

    missing = []
    for action in _parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                for option in command._actions:
                    default = option.default not in (None, False, argparse.SUPPRESS)
                    if default and option.option_strings and "default" not in (option.help or ""):
                        missing.append(f"xclay {name} {option.option_strings[0]}: {option.help}")
    assert not missing, "\n".join(missing)


def test_one_row_is_one_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from xclay.cli import main

    assert main(["demo", "--size", "256", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    assert "(1 row)" in capsys.readouterr().out  # one chip of 256 px
