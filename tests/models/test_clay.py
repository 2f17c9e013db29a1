"""The Clay v1.5 encoder: formulas against a float64 reference, loading, inputs, outputs.

Tests never download: random weights saved to temp files in each format go
through the same loading code users run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

import xclay
from tests.helpers import OLINDA_BANDS, OLINDA_WAVELENGTHS, raster
from xclay.devices import ComputePrecision
from xclay.errors import CheckpointError, ModelError
from xclay.models.clay import (
    ClayV15,
    Output,
    PreparedClay,
    latlon_encoding,
    load_clay_state_dict,
    time_encoding,
)
from xclay.models.clay_encoder import CLAY_SIZES, ClayEncoder, posemb_2d_gsd, wave_encoding
from xclay.protocols import ChipBatch, InputSpec
from xclay.testing import write_clay_checkpoint

from . import clay_reference as ref

WAVES = np.array([0.493, 0.56, 0.665, 0.842, 1.61, 2.19])


def _small(
    depth: int = 2, dim: int = 40, heads: int = 4, dim_head: int = 8, seed: int = 0
) -> ClayEncoder:
    """A small encoder with Clay's structure and random weights (biases and norms too)."""
    torch.manual_seed(seed)
    model = ClayEncoder(dim=dim, depth=depth, heads=heads, dim_head=dim_head, mlp_ratio=2).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "net.0.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))  # LayerNorm gains away from 1
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def _sd64(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------- formulas


def test_wave_encoding_formula() -> None:
    got = wave_encoding(torch.tensor(WAVES, dtype=torch.float32)).double().numpy()
    assert got.shape == (6, 128)
    np.testing.assert_allclose(got, ref.wave_encoding(WAVES), atol=2e-6)
    # omega_0 = 1: the first column is sin(wavelength) itself.
    np.testing.assert_allclose(got[:, 0], np.sin(WAVES), atol=1e-6)


def test_position_encoding_formula_and_token_order() -> None:
    got = posemb_2d_gsd(3, 4, 16, gsd=10.0).double().numpy()
    np.testing.assert_allclose(got, ref.posemb(3, 4, 16, 10.0), atol=1e-5)
    # Token 6 is row 1, column 2 (row-major); omega_0 = gsd.
    assert got[6, 0] == pytest.approx(math.sin(2 * 10.0), abs=1e-6)  # sin(c * omega_0)
    assert got[6, 8] == pytest.approx(math.sin(1 * 10.0), abs=1e-6)  # sin(r * omega_0)


def test_fclayer_is_a_residual_gelu_block() -> None:
    model = _small()
    x = torch.randn(5, 128)
    sd = _sd64(model)
    pe = "patch_embedding.fclayer."
    expect = x.double().numpy() + ref.gelu(
        ref.linear(
            ref.gelu(ref.linear(x.double().numpy(), sd[pe + "l1.weight"], sd[pe + "l1.bias"])),
            sd[pe + "l2.weight"],
            sd[pe + "l2.bias"],
        )
    )
    with torch.no_grad():
        got = model.patch_embedding.fclayer(x).double().numpy()
    assert _rel(got, expect) < 1e-6


def test_weight_generator_and_kernel_reshape_order() -> None:
    model = _small()
    with torch.no_grad():
        kernel, bias = model.patch_kernel(torch.tensor(WAVES, dtype=torch.float32))
    k_ref, b_ref = ref.patch_kernel(_sd64(model), WAVES, model.dim, 8)
    assert tuple(kernel.shape) == (40, 6, 8, 8)
    assert _rel(kernel.double().numpy(), k_ref) < 2e-6
    assert _rel(bias.double().numpy(), b_ref) < 2e-6


def test_patch_embedding_is_a_strided_conv_in_row_major_order() -> None:
    model = _small()
    pixels = torch.randn(2, 6, 16, 24)
    with torch.no_grad():
        kernel, bias = model.patch_kernel(torch.tensor(WAVES, dtype=torch.float32))
        tokens = model.patch_embedding(pixels, kernel, bias).double().numpy()
    assert tokens.shape == (2, 6, 40)  # (16/8) x (24/8) patches
    k, b, x = kernel.double().numpy(), bias.double().numpy(), pixels.double().numpy()
    r, c = 1, 2  # token 1 * 3 + 2 = 5
    expect = np.einsum("chw,dchw->d", x[1, :, 8 * r : 8 * r + 8, 8 * c : 8 * c + 8], k) + b
    np.testing.assert_allclose(tokens[1, 5], expect, rtol=1e-5, atol=1e-5)


def test_one_pre_norm_block_and_the_final_norm() -> None:
    model = _small(depth=1)
    sd = _sd64(model)
    x = torch.randn(2, 7, 40)
    with torch.no_grad():
        got = model.transformer(x).double().numpy()
    xs = x.double().numpy()
    pre = "transformer.layers.0."
    y = ref.layer_norm(xs, sd[pre + "0.norm.weight"], sd[pre + "0.norm.bias"])
    qkv = ref.linear(y, sd[pre + "0.to_qkv.weight"])
    q, k, v = (
        qkv[..., i * 32 : (i + 1) * 32].reshape(2, 7, 4, 8).transpose(0, 2, 1, 3) for i in range(3)
    )
    a = ref.attention(q, k, v).transpose(0, 2, 1, 3).reshape(2, 7, 32)
    xs = xs + ref.linear(a, sd[pre + "0.to_out.weight"])  # x + attn(norm(x))
    y = ref.layer_norm(xs, sd[pre + "1.net.0.weight"], sd[pre + "1.net.0.bias"])
    h = ref.gelu(ref.linear(y, sd[pre + "1.net.1.weight"], sd[pre + "1.net.1.bias"]))
    xs = xs + ref.linear(h, sd[pre + "1.net.3.weight"], sd[pre + "1.net.3.bias"])  # x + net(x)
    expect = ref.layer_norm(xs, sd["transformer.norm.weight"], sd["transformer.norm.bias"])
    assert _rel(got, expect) < 2e-6


def test_whole_forward_matches_the_float64_reference() -> None:
    model = _small(depth=2)
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 6, 16, 16, generator=g)
    time = torch.randn(2, 4, generator=g)
    latlon = torch.randn(2, 4, generator=g)
    with torch.no_grad():
        got = model(
            pixels=pixels,
            time=time,
            latlon=latlon,
            gsd=10.0,
            waves=torch.tensor(WAVES, dtype=torch.float32),
        )
    expect = ref.forward(
        _sd64(model),
        pixels.double().numpy(),
        time.double().numpy(),
        latlon.double().numpy(),
        10.0,
        WAVES,
        heads=4,
    )
    assert got.shape == (2, 5, 40)
    assert _rel(got.double().numpy(), expect) < 2e-6  # float32 rounding (measured ~2e-7)


def test_tiny_size_forward_matches_the_reference(tiny: ClayEncoder) -> None:
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(1, 6, 32, 32, generator=g)
    time, latlon = torch.randn(1, 4, generator=g), torch.randn(1, 4, generator=g)
    with torch.no_grad():
        got = tiny(
            pixels=pixels,
            time=time,
            latlon=latlon,
            gsd=30.0,
            waves=torch.tensor(WAVES, dtype=torch.float32),
        )
    expect = ref.forward(
        _sd64(tiny),
        pixels.double().numpy(),
        time.double().numpy(),
        latlon.double().numpy(),
        30.0,
        WAVES,
        heads=4,
    )
    assert _rel(got.double().numpy(), expect) < 2e-6


def test_state_dict_is_the_official_layout() -> None:
    sd = ClayEncoder.from_size("tiny").state_dict()
    assert tuple(sd["cls_token"].shape) == (1, 1, 192)
    assert tuple(sd["patch_embedding.weight_generator.fc_weight.weight"].shape) == (
        8 * 8 * 192,
        128,
    )
    assert tuple(sd["patch_embedding.weight_generator.fc_bias.weight"].shape) == (192, 128)
    assert tuple(sd["patch_embedding.weight_generator.encoder.layers.0.linear1.weight"].shape) == (
        2048,
        128,
    )
    assert tuple(sd["transformer.layers.5.0.to_qkv.weight"].shape) == (3 * 4 * 48, 192)
    assert tuple(sd["transformer.layers.5.1.net.3.weight"].shape) == (192, 384)
    assert "transformer.layers.6.0.norm.weight" not in sd
    assert not any(k.endswith(("to_qkv.bias", "to_out.bias")) for k in sd)
    counts = {
        name: sum(p.numel() for p in ClayEncoder.from_size(name).parameters())
        for name in ("tiny", "large")
    }
    assert counts == {"tiny": 4_030_592, "large": 311_442_944}  # the spec: 4.0 M and 311.4 M
    assert CLAY_SIZES["large"] == CLAY_SIZES["large"].__class__("large", 1024, 24, 16, 64, 4)


# --------------------------------------------------------------------------- inputs


def test_time_encoding_iso_week_and_hour() -> None:
    t = np.array(["2024-07-02T00:00", "2023-01-01T18:30", "NaT"], dtype="datetime64[ns]")
    enc = time_encoding(t)
    w = 27 * 2 * np.pi / 52  # 2024-07-02 is in ISO week 27
    np.testing.assert_allclose(enc[0], [np.sin(w), np.cos(w), 0.0, 1.0], atol=1e-6)
    w, h = 52 * 2 * np.pi / 52, 18.5 * 2 * np.pi / 24  # 2023-01-01 belongs to ISO week 52 of 2022
    np.testing.assert_allclose(enc[1], [np.sin(w), np.cos(w), np.sin(h), np.cos(h)], atol=1e-6)
    np.testing.assert_array_equal(enc[2], np.zeros(4))  # unknown


def test_latlon_encoding_latitude_first_south_and_west() -> None:
    lonlat = torch.tensor([[-60.5, -3.2], [-34.9, -8.0]], dtype=torch.float64)
    enc = latlon_encoding(lonlat).double().numpy()
    lat, lon = np.deg2rad(-3.2), np.deg2rad(-60.5)
    np.testing.assert_allclose(
        enc[0], [np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)], atol=1e-7
    )
    assert enc[0, 0] < 0 and enc[0, 2] < 0  # south of the equator, west of Greenwich
    assert abs(enc[1, 0]) < abs(enc[1, 2])  # |sin 8 S| < |sin 34.9 W|: latitude is first


# --------------------------------------------------------------------------- checkpoints


def _write(model: ClayEncoder, path: Path, fmt: str) -> Path:
    return write_clay_checkpoint(path, model=model, fmt=fmt)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny() -> ClayEncoder:
    torch.manual_seed(7)
    return ClayEncoder.from_size("tiny").eval()


@pytest.mark.parametrize("fmt", ["ckpt", "pt", "safetensors"])
def test_every_checkpoint_format_loads_through_the_registry(
    tmp_path: Path, tiny: ClayEncoder, fmt: str
) -> None:
    from xclay.models.checkpoints import file_sha256

    path = _write(tiny, tmp_path / f"clay-tiny.{fmt}", fmt)
    enc = xclay.models.get_model("clay-v1.5", checkpoint=path)
    assert isinstance(enc, ClayV15) and enc.size == "tiny"
    for k, v in tiny.state_dict().items():
        torch.testing.assert_close(enc.model.state_dict()[k], v, rtol=0, atol=0)
    card = enc.card
    assert card.checkpoint == path.name and card.checkpoint_sha256 == file_sha256(path)
    assert card.dim == 192 and card.patch_size == 8


def test_lightning_checkpoint_keeps_its_hyper_parameters(tmp_path: Path, tiny: ClayEncoder) -> None:
    state, hyper = load_clay_state_dict(_write(tiny, tmp_path / "c.ckpt", "ckpt"))
    assert hyper["norm_pix_loss"] is False
    assert set(state) == set(tiny.state_dict())  # decoder and teacher left out


def test_other_size_is_named(tmp_path: Path, tiny: ClayEncoder) -> None:
    path = _write(tiny, tmp_path / "c.pt", "pt")
    with pytest.raises(CheckpointError, match="holds a 'tiny' Clay encoder, not 'large'"):
        xclay.models.get_model("clay-v1.5", checkpoint=path, size="large")


def test_mismatched_keys_are_listed(tmp_path: Path, tiny: ClayEncoder) -> None:
    sd = dict(tiny.state_dict())
    sd.pop("transformer.layers.3.1.net.3.bias")
    sd["transformer.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "c.pt")
    with pytest.raises(
        CheckpointError,
        match=r"1 tensors missing \(e.g. transformer.layers.3.1.net.3.bias\); 1 unexpected "
        r"\(e.g. transformer.extra.weight\)",
    ):
        xclay.models.get_model("clay-v1.5", checkpoint=tmp_path / "c.pt")


def test_not_a_clay_state_dict(tmp_path: Path) -> None:
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="not a Clay encoder state dict"):
        xclay.models.get_model("clay-v1.5", checkpoint=tmp_path / "c.pt")


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_truncated_checkpoints_are_refused(tmp_path: Path, tiny: ClayEncoder, fmt: str) -> None:
    path = _write(tiny, tmp_path / f"c.{fmt}", fmt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        xclay.models.get_model("clay-v1.5", checkpoint=path)


def test_missing_checkpoint_says_where_the_weights_are(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XCLAY_CHECKPOINT", raising=False)
    monkeypatch.setenv("XCLAY_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        xclay.models.get_model("clay-v1.5")
    message = str(info.value)
    assert "huggingface.co/made-with-clay/Clay" in message
    assert "XCLAY_CHECKPOINT" in message and str(tmp_path / "clay-v1.5.ckpt") in message
    assert "model='rcf' needs no weights" in message
    with pytest.raises(CheckpointError, match="does not exist"):
        xclay.models.get_model("clay-v1.5", checkpoint=tmp_path / "nope.ckpt")


def test_checkpoint_found_through_env_and_cache(
    tmp_path: Path, tiny: ClayEncoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tiny, tmp_path / "mine.ckpt", "ckpt")
    monkeypatch.setenv("XCLAY_CHECKPOINT", str(path))
    assert xclay.models.get_model("clay-v1.5").card.checkpoint == "mine.ckpt"
    monkeypatch.delenv("XCLAY_CHECKPOINT")
    monkeypatch.setenv("XCLAY_CACHE", str(tmp_path))
    _write(tiny, tmp_path / "clay-v1.5.ckpt", "ckpt")
    assert xclay.models.get_model("clay-v1.5").card.checkpoint == "clay-v1.5.ckpt"
    monkeypatch.setenv("XCLAY_CHECKPOINT", str(tmp_path / "gone.ckpt"))
    with pytest.raises(CheckpointError, match="does not point to a file"):
        xclay.models.get_model("clay-v1.5")


# --------------------------------------------------------------------------- the encoder in xclay


def _spec(
    chip: int = 32,
    platform: str | None = None,
    bands: Sequence[str] = ("a", "b", "c", "d", "e", "f"),
) -> InputSpec:
    return InputSpec(platform, tuple(bands), tuple(WAVES[: len(bands)]), 10.0, 0, "uint16", chip)


def _batch(n: int = 3, chip: int = 32, bands: int = 6, seed: int = 0) -> ChipBatch:
    g = torch.Generator().manual_seed(seed)
    return ChipBatch(
        pixels=(500 + 3000 * torch.rand(n, bands, chip, chip, generator=g)).to(torch.uint16),
        valid=torch.ones(n, chip, chip, dtype=torch.bool),
        lonlat=torch.tensor([[-60.5 + i, -3.2 - i] for i in range(n)], dtype=torch.float64),
        time=np.array(["2024-07-02"] * n, dtype="datetime64[ns]"),
    )


def _prepared(
    model: ClayEncoder, output: Output = "cls", precision: str = "fp32", chip: int = 32
) -> PreparedClay:
    enc = ClayV15(
        model, size="tiny", output=output, normalization=dict.fromkeys("abcdef", (1500.0, 900.0))
    )
    return enc.prepare(
        _spec(chip),
        lambda n, s: _batch(n),
        device=torch.device("cpu"),
        precision=ComputePrecision(precision),  # type: ignore[arg-type]
    )


def test_encode_builds_inputs_as_specified(tiny: ClayEncoder) -> None:
    enc = _prepared(tiny)
    batch = _batch()
    valid = batch.valid.clone()
    valid[0, :4, :4] = False
    batch = ChipBatch(batch.pixels, valid, batch.lonlat, batch.time)
    got = enc.encode(batch)
    # The same forward with inputs made by hand from the spec.
    x = (batch.pixels.double() - 1500.0) / 900.0
    x = x * valid[:, None]
    lat, lon = np.deg2rad(batch.lonlat[:, 1].numpy()), np.deg2rad(batch.lonlat[:, 0].numpy())
    latlon = torch.tensor(
        np.stack([np.sin(lat), np.cos(lat), np.sin(lon), np.cos(lon)], 1), dtype=torch.float32
    )
    w = 27 * 2 * np.pi / 52
    time = torch.tensor([[np.sin(w), np.cos(w), 0.0, 1.0]] * 3, dtype=torch.float32)
    with torch.no_grad():
        expect = tiny(
            pixels=x.float(),
            time=time,
            latlon=latlon,
            gsd=10.0,
            waves=torch.tensor(WAVES, dtype=torch.float32),
        )
    torch.testing.assert_close(got, expect[:, 0], rtol=1e-5, atol=1e-5)


def test_outputs_cls_mean_patches(tiny: ClayEncoder) -> None:
    batch = _batch()
    cls = _prepared(tiny, "cls").encode(batch)
    mean = _prepared(tiny, "mean").encode(batch)
    patches = _prepared(tiny, "patches").encode(batch)
    assert cls.shape == (3, 192) and mean.shape == (3, 192) and patches.shape == (3, 4, 4, 192)
    torch.testing.assert_close(patches.mean(dim=(1, 2)), mean, rtol=1e-5, atol=1e-5)
    assert _prepared(tiny, "patches").card.output_shape == [4, 4, 192]


def test_chip_size_must_be_a_multiple_of_the_patch_size(tiny: ClayEncoder) -> None:
    enc = ClayV15(tiny, size="tiny")
    with pytest.raises(
        ModelError, match="chip_size 100 is not a multiple of Clay's 8 px patches; use 96 or 104"
    ):
        enc.prepare(
            _spec(100),
            lambda n, s: _batch(n),
            device=torch.device("cpu"),
            precision=ComputePrecision("fp32"),
        )


def test_known_platform_uses_the_sensor_table(tiny: ClayEncoder) -> None:
    enc = ClayV15(tiny, size="tiny")
    spec = InputSpec("landsat-c2l2-sr", ("red", "nir08"), (0.6, 0.9), 30.0, 0, "uint16", 32)
    enc.prepare(
        spec,
        lambda n, s: _batch(n, bands=2),
        device=torch.device("cpu"),
        precision=ComputePrecision("fp32"),
    )
    card = enc.card
    assert card.normalization_source == "sensor-table:landsat-c2l2-sr"
    assert card.normalization["red"] == {"mean": 13705.0, "std": 9578.0}
    assert card.wavelengths == {"red": 0.65, "nir08": 0.86}  # the table's, not the cube's
    assert card.params["waves_source"] == "sensor-table:landsat-c2l2-sr"


def test_unknown_sensor_normalisation_is_measured(tiny: ClayEncoder) -> None:
    enc = ClayV15(tiny, size="tiny")
    enc.prepare(
        _spec(),
        lambda n, s: _batch(n),
        device=torch.device("cpu"),
        precision=ComputePrecision("fp32"),
    )
    card = enc.card
    assert card.normalization_source == "measured"
    assert card.normalization["a"]["mean"] == pytest.approx(2000, rel=0.05)
    assert card.params["waves_source"] == "cube wavelength coords"


def test_embed_with_clay_end_to_end(
    tmp_path: Path, tiny: ClayEncoder, demo_cube_256: xr.Dataset
) -> None:
    path = _write(tiny, tmp_path / "tiny.ckpt", "ckpt")
    emb = xclay.embed(
        demo_cube_256, model="clay-v1.5", checkpoint=path, chip_size=64, progress=False
    )
    assert emb["embedding"].shape == (1, 4, 4, 192)
    assert emb.attrs["model"]["name"] == "clay-v1.5"
    assert emb.attrs["model"]["checkpoint"] == "tiny.ckpt"
    assert emb.attrs["model"]["params"]["precision"] in ("bf16", "fp32")
    patches = xclay.embed(
        demo_cube_256,
        model=xclay.models.get_model("clay-v1.5", checkpoint=path, output="patches"),
        chip_size=64,
        progress=False,
    )
    assert patches["embedding"].dims == (
        "time",
        "chip_y",
        "chip_x",
        "patch_y",
        "patch_x",
        "feature",
    )
    assert patches["embedding"].shape == (1, 4, 4, 8, 8, 192)
    back = xclay.open_embeddings(xclay.to_zarr(patches, tmp_path / "p.zarr"))
    np.testing.assert_array_equal(back["embedding"].values, patches["embedding"].values)
    import geopandas as gpd

    gdf = gpd.read_parquet(xclay.to_geoparquet(patches, tmp_path / "p.parquet"))
    np.testing.assert_allclose(
        np.stack(gdf["embedding"].to_numpy())[0],
        patches["embedding"].values[0, 0, 0].mean(axis=(0, 1)),
        rtol=1e-5,
    )


def test_bf16_stays_faithful_on_real_imagery(olinda_tif: Path) -> None:
    import rioxarray

    cube = xclay.as_datacube(
        raster(rioxarray.open_rasterio(olinda_tif)),
        bands=OLINDA_BANDS,
        wavelengths=OLINDA_WAVELENGTHS,
    )
    torch.manual_seed(11)
    model = ClayEncoder.from_size("base").eval()
    runs = {}
    for precision in ("fp32", "bf16"):
        enc = ClayV15(model, size="base")
        runs[precision] = xclay.embed(
            cube, model=enc, chip_size=64, precision=precision, progress=False
        )
    a = torch.from_numpy(runs["fp32"]["embedding"].values.reshape(-1, 768))
    b = torch.from_numpy(runs["bf16"]["embedding"].values.reshape(-1, 768))
    cos = F.cosine_similarity(a, b, dim=1)
    assert len(cos) == 25 and (cos >= 0.999).all(), cos.min()
    assert runs["bf16"].attrs["model"]["params"]["precision"] == "bf16"


def test_batch_size_fills_the_device() -> None:
    from xclay.models.clay import clay_batch_size

    # CPU: about a teraflop per batch.
    assert clay_batch_size("large", 256, 10, free_bytes=None) == 2
    assert clay_batch_size("base", 256, 10, free_bytes=None) == 4
    assert clay_batch_size("tiny", 256, 10, free_bytes=None) == 32
    # GPU: a power of two that fits 40 % of the free memory.
    big = clay_batch_size("large", 256, 10, free_bytes=78 * 2**30)
    small = clay_batch_size("large", 256, 10, free_bytes=8 * 2**30)
    assert big & (big - 1) == 0 and small & (small - 1) == 0
    assert 128 <= big <= 1024 and small < big
    assert clay_batch_size("large", 256, 10, free_bytes=2**20) == 1


def test_auto_batch_size_through_embed(tiny: ClayEncoder, demo_cube_256: xr.Dataset) -> None:
    enc = ClayV15(tiny, size="tiny")
    emb = xclay.embed(demo_cube_256, model=enc, chip_size=64, batch_size="auto", progress=False)
    assert emb.attrs["config"]["batch_size"] == 32
    assert emb.attrs["run"]["chips_embedded"] == 16
