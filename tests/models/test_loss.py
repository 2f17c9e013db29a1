"""Per-chip reconstruction loss: Clay's decoder on 75 % masked patches, reproducibly masked.

Random weights saved to temp checkpoints go through the public loader; the
arithmetic is checked against the float64 reference written from the spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import xarray as xr

import xclay
from tests.helpers import random_cube
from xclay.devices import ComputePrecision, Precision
from xclay.embed import EmbedConfig, EmbedSession
from xclay.errors import CheckpointError, ModelError
from xclay.models.clay import ClayV15, PreparedClay, latlon_encoding, time_encoding
from xclay.models.clay_decoder import ClayDecoder, DecoderSize, chip_seeds, mask_permutations
from xclay.models.clay_encoder import ClayEncoder
from xclay.models.registry import encoder_from_card
from xclay.protocols import ChipBatch, InputSpec

from . import clay_reference as ref

WAVES = np.array([0.493, 0.56, 0.665, 0.842, 1.61, 2.19])
SMALL_DECODER = DecoderSize(dim=64, depth=2, heads=4, dim_head=16, mlp_ratio=2)


def _randomise(model: torch.nn.Module) -> None:
    """Biases and norm gains away from their defaults, so every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "net.0.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))


@pytest.fixture(scope="module")
def weights() -> tuple[ClayEncoder, ClayDecoder]:
    torch.manual_seed(11)
    encoder = ClayEncoder.from_size("tiny").eval()
    decoder = ClayDecoder(encoder.dim, SMALL_DECODER).eval()
    _randomise(encoder)
    _randomise(decoder)
    return encoder, decoder


def _checkpoint(
    path: Path,
    weights: tuple[ClayEncoder, ClayDecoder],
    *,
    norm_pix_loss: bool = False,
    decoder: bool = True,
) -> Path:
    encoder, dec = weights
    state = {f"model.encoder.{k}": v for k, v in encoder.state_dict().items()}
    if decoder:
        state.update({f"model.decoder.{k}": v for k, v in dec.state_dict().items()})
    state["model.teacher.cls_token"] = torch.zeros(1, 1, 8)
    torch.save({"state_dict": state, "hyper_parameters": {"norm_pix_loss": norm_pix_loss}}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(
    tmp_path_factory: pytest.TempPathFactory, weights: tuple[ClayEncoder, ClayDecoder]
) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("loss") / "clay.ckpt", weights)


def _batch(n: int, chip: int = 32, seed: int = 0) -> ChipBatch:
    g = torch.Generator().manual_seed(seed)
    return ChipBatch(
        pixels=(500 + 3000 * torch.rand(n, 6, chip, chip, generator=g)).to(torch.uint16),
        valid=torch.ones(n, chip, chip, dtype=torch.bool),
        lonlat=torch.tensor([[-60.5 + i, -3.2 - i] for i in range(n)], dtype=torch.float64),
        time=np.array(["2024-07-02"] * n, dtype="datetime64[ns]"),
        chip_ids=np.array([f"EPSG32720_32px_10m_{1000 * i}_9000000" for i in range(n)]),
    )


def _scorer(path: Path, *, seed: int = 0, chip: int = 32) -> PreparedClay:
    enc = ClayV15.from_checkpoint(path, normalization=dict.fromkeys("abcdef", (1500.0, 900.0)))
    enc.enable_loss(seed)
    spec = InputSpec(None, tuple("abcdef"), tuple(WAVES), 10.0, 0, "uint16", chip)
    return enc.prepare(
        spec, lambda n, s: _batch(n), device=torch.device("cpu"), precision=ComputePrecision("fp32")
    )


def test_masking_is_the_rule_written_in_the_card() -> None:
    ids = ["EPSG32720_256px_10m_0_0", "EPSG32720_256px_10m_2560_0", "EPSG32720_256px_10m_0_0"]
    times = np.array(["2024-07-02T10:30", "2024-07-02T10:30", "NaT"], dtype="datetime64[ns]")
    masked, unmasked = mask_permutations(chip_seeds(ids, times, seed=7), 64)
    assert masked.shape == (3, 48) and unmasked.shape == (3, 16)
    stamps = ["2024-07-02T10:30:00", "2024-07-02T10:30:00", "NaT"]
    for k in range(3):
        order = ref.mask_order(7, ids[k], stamps[k], 64)
        assert masked[k].tolist() == order[:48] and unmasked[k].tolist() == order[48:]
    assert sorted(masked[0].tolist() + unmasked[0].tolist()) == list(range(64))
    assert masked[0].tolist() != masked[1].tolist() != masked[2].tolist()  # chip and time count
    other_seed, _ = mask_permutations(chip_seeds(ids[:1], times[:1], seed=8), 64)
    assert other_seed[0].tolist() != masked[0].tolist()


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_matches_the_float64_reference(
    tmp_path: Path, weights: tuple[ClayEncoder, ClayDecoder], norm_pix_loss: bool
) -> None:
    path = _checkpoint(tmp_path / "c.ckpt", weights, norm_pix_loss=norm_pix_loss)
    scorer = _scorer(path, seed=3)
    batch = _batch(2)
    got = scorer.loss(batch).double().numpy()
    encoder, decoder = weights
    pixels = (batch.pixels.double().numpy() - 1500.0) / 900.0
    assert batch.chip_ids is not None
    orders = [ref.mask_order(3, c, "2024-07-02T00:00:00", 16) for c in batch.chip_ids]
    expect = ref.masked_loss(
        {k: v.double().numpy() for k, v in encoder.state_dict().items()},
        {k: v.double().numpy() for k, v in decoder.state_dict().items()},
        pixels,
        time_encoding(batch.time).astype(np.float64),
        latlon_encoding(batch.lonlat).double().numpy(),
        10.0,
        WAVES,
        orders,
        enc_heads=4,
        dec_heads=4,
        norm_pix_loss=norm_pix_loss,
    )
    assert got.shape == (2,)
    np.testing.assert_allclose(got, expect, rtol=2e-5)
    assert scorer.card.params["loss"]["norm_pix_loss"] is norm_pix_loss


def _two_chip_cube() -> xr.Dataset:
    cube = random_cube((1, 6, 64, 128), seed=4)  # chip (0, 1): uniform noise
    cube["pixels"].values[0, :, :, :64] = 2000  # chip (0, 0): constant
    return xclay.as_datacube(cube, wavelengths=list(WAVES))


def test_constant_and_noise_chips_score_differently(ckpt: Path) -> None:
    emb = xclay.embed(
        _two_chip_cube(),
        model="clay-v1.5",
        checkpoint=ckpt,
        chip_size=64,
        loss=True,
        progress=False,
    )
    constant, noise = emb["loss"].values[0, 0]
    assert np.isfinite([constant, noise]).all() and constant >= 0 and noise >= 0
    assert abs(constant - noise) > 0.1 * max(constant, noise)


def test_same_chip_same_loss_across_batch_sizes_and_reruns(
    ckpt: Path, demo_cube_256: xr.Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Bit for bit needs the same torch threads in every run: fixed, so the thread budget
    # (which follows other processes' load) does not change them between runs.
    monkeypatch.setenv("OMP_NUM_THREADS", "2")

    def losses(batch_size: int, precision: Precision = "fp32") -> np.ndarray:
        emb = xclay.embed(
            demo_cube_256,
            model="clay-v1.5",
            checkpoint=ckpt,
            chip_size=64,
            batch_size=batch_size,
            precision=precision,
            loss=True,
            progress=False,
        )
        return emb["loss"].values

    one = losses(1)
    assert np.isfinite(one[demo_valid(demo_cube_256)]).all()
    np.testing.assert_allclose(losses(3), one, rtol=1e-5)
    np.testing.assert_allclose(losses(16), one, rtol=1e-5)
    np.testing.assert_array_equal(losses(3), losses(3))  # reruns: bit for bit
    np.testing.assert_allclose(losses(4, "bf16"), one, rtol=0.05)


def demo_valid(cube: xr.Dataset) -> np.ndarray:
    """Chips of the 256 px demo embedded at 64 px (at most half nodata)."""
    model = xclay.models.get_model("rcf", num_filters=4, sample_chips=4)
    return xclay.embed(cube, model=model, chip_size=64, progress=False)["embedded"].values


def test_loss_in_both_outputs_and_rebuilt_from_the_card(
    tmp_path: Path, ckpt: Path, demo_cube_256: xr.Dataset
) -> None:
    cube = demo_cube_256.copy(deep=True)
    cube["pixels"].values[0, :, :64, :64] = 0  # not embedded: no loss
    kw: dict[str, Any] = {
        "model": "clay-v1.5",
        "checkpoint": ckpt,
        "chip_size": 64,
        "progress": False,
    }
    emb = xclay.embed(cube, loss=True, precision="fp32", **kw)
    plain = xclay.embed(cube, precision="fp32", **kw)
    np.testing.assert_array_equal(emb["embedding"].values, plain["embedding"].values)
    assert "loss" not in plain
    loss, embedded = emb["loss"].values, emb["embedded"].values
    assert np.isnan(loss[~embedded]).all() and np.isfinite(loss[embedded]).all()
    params = emb.attrs["model"]["params"]["loss"]
    assert params["seed"] == 0 and params["mask_ratio"] == 0.75 and "sha256" in params["mask_rule"]
    assert params["decoder"] == {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16, "mlp_ratio": 2}

    back = xclay.open_embeddings(xclay.to_zarr(emb, tmp_path / "e.zarr"))
    np.testing.assert_array_equal(back["loss"].values, loss)
    table = pq.read_table(xclay.to_geoparquet(emb, tmp_path / "e.parquet"))
    np.testing.assert_allclose(table["loss"].to_numpy(), loss[embedded])

    # A worker rebuilds the scorer from the card alone and gets the same losses.
    rebuilt = encoder_from_card(emb.attrs["model"], checkpoint=ckpt)
    config = EmbedConfig.from_dict(emb.attrs["config"])
    again = EmbedSession(cube, rebuilt, config).embed_block(progress=False)
    assert again.loss is not None
    np.testing.assert_array_equal(again.loss, loss)


def test_loss_needs_a_decoder(
    tmp_path: Path, weights: tuple[ClayEncoder, ClayDecoder], demo_cube_256: xr.Dataset
) -> None:
    rcf = xclay.models.get_model("rcf", num_filters=4, sample_chips=4)
    with pytest.raises(ModelError, match=r"has no decoder .* needs model=.clay-v1.5."):
        xclay.embed(demo_cube_256, model=rcf, chip_size=64, loss=True, progress=False)
    encoder_only = _checkpoint(tmp_path / "enc.ckpt", weights, decoder=False)
    kw: dict[str, Any] = {
        "model": "clay-v1.5",
        "checkpoint": encoder_only,
        "chip_size": 64,
        "progress": False,
    }
    xclay.embed(demo_cube_256, **kw)  # embeddings alone never need the decoder
    with pytest.raises(CheckpointError, match="holds no Clay decoder"):
        xclay.embed(demo_cube_256, loss=True, **kw)
