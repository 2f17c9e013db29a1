"""An encoder from outside the package: a model installed as a package of its own that
declares itself under the ``xclay.models`` entry-point group, found by name in this
process and on the processes of a Dask ``LocalCluster``, and checked by
:func:`xclay.testing.check_encoder`, which also catches encoders that break the contract."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import xclay
from tests.packages import installed
from xclay.errors import ModelError, PluginWarning
from xclay.models.rcf import RCFPlugin
from xclay.models.registry import check_model
from xclay.run.cluster import NO_DASHBOARD
from xclay.testing import check_encoder, synthetic_cube

# A package as a user would write it: band means of the normalised chip, as an encoder.
PLUGIN = '''
import numpy as np
import torch

from xclay.models import EncoderPlugin, ModelCard, ModelInfo


class BandMeans:
    """Each band's mean over the chip's valid pixels, scaled by a fitted per-band std."""

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)
        self._std = None

    @property
    def preferred_precision(self):
        return "fp32"

    @property
    def card(self) -> ModelCard:
        return ModelCard(
            name="band-means", version="1", family="test", description="band means",
            dim=DIM, output="pooled",
            params={"scale": self.scale, "std": None if self._std is None else self._std.tolist()},
        )

    def prepare(self, spec, sample, *, device, precision) -> None:
        if self._std is None:  # fitted on the cube's sample, as real models fit normalisation
            chips = sample(8, 0).pixels.double()
            self._std = chips.std(dim=(0, 2, 3)).clamp_min(1.0)
        self._device = device

    def encode(self, batch):
        x = batch.pixels.to(self._device, torch.float64) / self._std.to(self._device)[:, None, None]
        valid = batch.valid.to(self._device)[:, None]
        mean = (x * valid).sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp_min(1)
        return (self.scale * mean).float()

    @classmethod
    def from_card(cls, card, *, checkpoint=None):
        card = card if isinstance(card, ModelCard) else ModelCard.from_dict(dict(card))
        enc = cls(scale=card.params["scale"])
        enc._std = torch.tensor(card.params["std"], dtype=torch.float64)
        return enc


DIM = 4


class BandMeansModel(EncoderPlugin):
    name = "band-means"
    description = "per-band means (a test plug-in)"
    dim = DIM

    def build(self, scale=1.0):
        return BandMeans(scale)

    def rebuild(self, card, *, checkpoint=None):
        return BandMeans.from_card(card)


class Clash(BandMeansModel):
    name = "rcf"  # would shadow a built-in model


# the earlier way: import paths (deprecated, still taken)
INFO = ModelInfo(
    name="band-means-info", description="per-band means (a test plug-in)",
    factory="xclay_bandmeans:BandMeans", loader=None, needs_checkpoint=False, dim=DIM,
    patch_size=None, bands="any", normalization=("measured",),
    rebuild="xclay_bandmeans:BandMeans.from_card",
)
NOT_A_MODEL = 3
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The plug-in installed the way pip installs a package (tests/packages.py)."""
    points = {"xclay.models": {"band-means": "xclay_bandmeans:BandMeansModel"}}
    with installed(tmp_path / "site", "xclay_bandmeans", PLUGIN, points, monkeypatch) as site:
        yield site


def _cube(tmp_path: Path) -> Path:
    cube = synthetic_cube((1, 4, 64, 64), seed=5)
    return xclay.write_datacube(cube, tmp_path / "cube.zarr", chip_size=16)


def test_a_plugin_is_found_by_name_and_keeps_the_contract(plugin: Path) -> None:
    assert "band-means" in xclay.models.list_models()
    card = check_encoder("band-means")
    assert card.name == "band-means" and card.dim == 4


@pytest.mark.slow
def test_a_plugin_runs_on_a_local_cluster(plugin: Path, tmp_path: Path) -> None:
    pytest.importorskip("distributed", reason="needs xclay[dask]")
    from distributed import Client, LocalCluster

    from xclay.run import RunSpec, run

    store = _cube(tmp_path)
    local = xclay.embed(
        xclay.open_datacube(store), model="band-means", chip_size=16, progress=False
    )

    spec = RunSpec.from_dict(
        {
            "input": {"datacube": str(store)},
            "grid": {"chip_size": 16},
            "model": {"name": "band-means"},
            "compute": {"region_chips": 4},
            "outputs": {"dir": str(tmp_path / "out")},
        }
    )
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, **NO_DASHBOARD) as cluster,
        Client(cluster) as client,
    ):
        # the workers are other processes: they found the plug-in themselves
        found = client.run(lambda: "band-means" in __import__("xclay").models.list_models())
        assert all(found.values()) and len(found) == 2
        report = run(spec, client=client, progress=False)
    assert report.status == "complete", report.failed
    remote = xclay.open_embeddings(tmp_path / "out" / "embeddings.zarr")
    np.testing.assert_allclose(
        remote["embedding"].values, local["embedding"].values, rtol=0, atol=1e-6
    )


def test_an_encoder_that_breaks_the_contract_is_named(plugin: Path) -> None:
    import xclay_bandmeans  # type: ignore[import-not-found]

    # the plug-in is written at run time, so mypy sees its class as Any
    class Leaky(xclay_bandmeans.BandMeans):  # type: ignore[misc]
        """Its vectors depend on the other chips of the batch."""

        def encode(self, batch):  # type: ignore[no-untyped-def]
            out = super().encode(batch)
            return out - out.mean(dim=0, keepdim=True)

    with pytest.raises(AssertionError, match="a batch of 1 instead of 4 gives other vectors"):
        check_encoder(Leaky)


def test_a_broken_plugin_is_left_out_with_a_warning(plugin: Path) -> None:
    (plugin / "xclay_bandmeans-0.1.dist-info" / "entry_points.txt").write_text(
        "[xclay.models]\nband-means = xclay_bandmeans:MISSING\nclash = xclay_bandmeans:Clash\n"
        "three = xclay_bandmeans:NOT_A_MODEL\n"
    )
    with pytest.warns(PluginWarning) as caught:
        names = xclay.models.list_models()
    messages = " ".join(str(w.message) for w in caught)
    assert "'band-means'" in messages and "failed to load" in messages
    assert "would replace the built-in model 'rcf'" in messages
    assert "a int is not an EncoderPlugin" in messages
    assert "band-means" not in names
    assert isinstance(xclay.models.get_model_info("rcf"), RCFPlugin)


def test_a_model_declared_by_import_paths_still_works_deprecated(plugin: Path) -> None:
    (plugin / "xclay_bandmeans-0.1.dist-info" / "entry_points.txt").write_text(
        "[xclay.models]\ninfo = xclay_bandmeans:INFO\n"
    )
    with pytest.warns(DeprecationWarning, match="a model is now a class, an EncoderPlugin"):
        assert "band-means-info" in xclay.models.list_models()
    encoder = xclay.models.get_model("band-means-info", scale=2.0)
    assert encoder.scale == 2.0  # type: ignore[attr-defined]
    with pytest.raises(ModelError, match="has no options \\['size'\\]; its options are: scale"):
        xclay.models.get_model("band-means-info", size=3)


def test_a_plugin_checks_its_own_options(plugin: Path) -> None:
    with pytest.raises(ModelError, match="'band-means' has no options \\['size'\\]"):
        xclay.models.get_model("band-means", size=3)
    with pytest.raises(ModelError, match="'band-means' takes no checkpoint"):
        xclay.models.get_model("band-means", checkpoint="x.pt")
    with pytest.raises(ModelError, match=r"'clay-v1\.5': output must be one of cls, mean, patches"):
        check_model("clay-v1.5", output="tokens")


@pytest.mark.parametrize("name", ["rcf", "clay-v1.5"])
def test_the_built_in_models_keep_the_contract(name: str, tmp_path: Path) -> None:
    from xclay.testing import write_clay_checkpoint

    checkpoint = (
        write_clay_checkpoint(tmp_path / "clay.ckpt", seed=3) if name == "clay-v1.5" else None
    )
    card = check_encoder(name, checkpoint=checkpoint)
    assert card.name == name
