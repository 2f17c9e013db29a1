"""The weight-free rcf encoder (MOSAIKS random convolutional features)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xclay
from xclay.devices import ComputePrecision
from xclay.errors import CheckpointError, ModelError
from xclay.models.rcf import RCFEncoder
from xclay.protocols import ChipBatch, Encoder, InputSpec, Sampler

SPEC = InputSpec(
    platform=None,
    bands=("a", "b", "c"),
    wavelengths=(0.5, 0.6, 0.8),
    gsd=10.0,
    nodata=0,
    dtype="uint16",
    chip_size=32,
)


def _chips(n: int, seed: int, *, size: int = 32) -> ChipBatch:
    """Spatially smooth random chips (so patches have structure to whiten)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, size // 4, size // 4, generator=g)
    smooth = F.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)
    pixels = (1000 + 3000 * smooth + 50 * torch.rand(n, 3, size, size, generator=g)).round()
    return ChipBatch(
        pixels=pixels.to(torch.uint16),
        valid=torch.ones(n, size, size, dtype=torch.bool),
        lonlat=torch.zeros(n, 2, dtype=torch.float64),
        time=np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]"),
    )


def _sampler(seed_offset: int = 0) -> Sampler:
    def sample(n: int, seed: int) -> ChipBatch:
        return _chips(n, seed + seed_offset)

    return sample


def _fitted(**options: Any) -> RCFEncoder:
    enc = RCFEncoder(**{"num_filters": 16, "sample_chips": 6, **options})
    enc.prepare(SPEC, _sampler(), device=torch.device("cpu"), precision=ComputePrecision("fp32"))
    return enc


def _reference(enc: RCFEncoder, batch: ChipBatch) -> np.ndarray:
    """MOSAIKS features computed directly in float64: conv2d, ReLU(+/-r - b), masked mean."""
    card = enc.card
    kernels = torch.from_numpy(
        np.frombuffer(__import__("base64").b64decode(card.params["filters"]["base64"]), "<f4")
        .reshape(card.params["filters"]["shape"])
        .astype(np.float64)
    )
    offsets = torch.from_numpy(
        np.frombuffer(
            __import__("base64").b64decode(card.params["offsets"]["base64"]), "<f4"
        ).astype(np.float64)
    )
    mean = torch.tensor([card.normalization[b]["mean"] for b in SPEC.bands], dtype=torch.float64)
    std = torch.tensor([card.normalization[b]["std"] for b in SPEC.bands], dtype=torch.float64)
    x = (batch.pixels.double() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    x = x * batch.valid.unsqueeze(1)
    r = F.conv2d(x, kernels) + offsets.view(1, -1, 1, 1)
    k = enc.kernel_size
    ok = F.max_pool2d((~batch.valid).double().unsqueeze(1), k, stride=1) == 0
    pos = (torch.relu(r - enc.bias) * ok).sum((2, 3)) / ok.sum((2, 3))
    neg = (torch.relu(-r - enc.bias) * ok).sum((2, 3)) / ok.sum((2, 3))
    return torch.cat([pos, neg], 1).numpy()


def test_is_an_encoder_with_a_card() -> None:
    enc = _fitted()
    assert isinstance(enc, Encoder)
    card = enc.card
    assert card.name == "rcf" and card.dim == 32
    assert card.normalization_source == "measured"  # no platform: measured on the cube
    assert set(card.params) >= {"seed", "num_filters", "filters", "offsets", "filters_sha256"}


def test_matches_a_float64_reference_computed_directly() -> None:
    enc = _fitted()
    batch = _chips(3, 99)
    valid = batch.valid.clone()
    valid[1, 10:20, 5:25] = False  # a nodata hole
    valid[2, :, 16:] = False
    batch = ChipBatch(batch.pixels, valid, batch.lonlat, batch.time)
    got = enc.encode(batch).numpy()
    ref = _reference(enc, batch)
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())


def test_values_under_nodata_do_not_leak_into_the_vector() -> None:
    enc = _fitted()
    batch = _chips(1, 5)
    valid = batch.valid.clone()
    valid[0, 8:24, 8:24] = False
    a = enc.encode(ChipBatch(batch.pixels, valid, batch.lonlat, batch.time))
    garbage = batch.pixels.clone()
    garbage[0, :, 8:24, 8:24] = 65000
    b = enc.encode(ChipBatch(garbage, valid, batch.lonlat, batch.time))
    torch.testing.assert_close(a, b)


def test_chip_without_a_valid_window_gets_nan() -> None:
    enc = _fitted()
    batch = _chips(2, 5)
    valid = batch.valid.clone()
    valid[0, :, ::2] = False  # no 3x3 window is all valid
    out = enc.encode(ChipBatch(batch.pixels, valid, batch.lonlat, batch.time))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def test_deterministic_under_a_seed_and_different_across_seeds() -> None:
    batch = _chips(2, 3)
    a, b, c = _fitted(seed=1), _fitted(seed=1), _fitted(seed=2)
    torch.testing.assert_close(a.encode(batch), b.encode(batch), rtol=0, atol=0)
    assert a.card.params["filters_sha256"] == b.card.params["filters_sha256"]
    assert a.card.params["filters_sha256"] != c.card.params["filters_sha256"]
    assert not torch.allclose(a.encode(batch), c.encode(batch))


def test_same_chip_same_vector_whatever_the_batch() -> None:
    enc = _fitted()
    batch = _chips(5, 11)
    whole = enc.encode(batch)
    for k in range(5):
        one = ChipBatch(
            batch.pixels[k : k + 1],
            batch.valid[k : k + 1],
            batch.lonlat[k : k + 1],
            batch.time[k : k + 1],
        )
        torch.testing.assert_close(enc.encode(one)[0], whole[k], rtol=0, atol=0)


def test_rebuilt_from_its_card_gives_identical_vectors() -> None:
    enc = _fitted()
    again = RCFEncoder.from_card(enc.card.to_dict())
    again.prepare(
        SPEC,
        _sampler(seed_offset=1000),
        device=torch.device("cpu"),
        precision=ComputePrecision("fp32"),
    )
    batch = _chips(3, 4)
    torch.testing.assert_close(again.encode(batch), enc.encode(batch), rtol=0, atol=0)
    assert again.card.params["filters_sha256"] == enc.card.params["filters_sha256"]


def test_checkpoint_round_trip_through_the_registry(tmp_path: Path) -> None:
    enc = _fitted()
    path = enc.save(tmp_path / "rcf.pt")
    loaded = xclay.models.get_model("rcf", checkpoint=path)
    loaded.prepare(
        SPEC,
        _sampler(seed_offset=500),
        device=torch.device("cpu"),
        precision=ComputePrecision("fp32"),
    )
    batch = _chips(2, 8)
    torch.testing.assert_close(loaded.encode(batch), enc.encode(batch), rtol=0, atol=0)
    card = loaded.card
    assert card.checkpoint == "rcf.pt" and len(card.checkpoint_sha256 or "") == 64


def test_checkpoint_for_other_bands_is_refused(tmp_path: Path) -> None:
    path = _fitted().save(tmp_path / "rcf.pt")
    loaded = xclay.models.get_model("rcf", checkpoint=path)
    other = InputSpec(None, ("a", "b", "x"), (0.5, 0.6, 0.9), 10.0, 0, "uint16", 32)
    with pytest.raises(ModelError, match=r"not the cube's \['x'\]"):
        loaded.prepare(
            other, _sampler(), device=torch.device("cpu"), precision=ComputePrecision("fp32")
        )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"not a zip file at all", "truncated or corrupt"),
        ("other-format", "is not an rcf checkpoint"),
    ],
)
def test_bad_checkpoints_get_clear_errors(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "rcf.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "other-format":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=message):
        xclay.models.get_model("rcf", checkpoint=path)


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    path = _fitted().save(tmp_path / "rcf.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        xclay.models.get_model("rcf", checkpoint=path)


def test_bf16_stays_close_to_fp32() -> None:
    enc = _fitted(num_filters=64)
    batch = _chips(4, 21)
    fp32 = enc.encode(batch)
    enc.prepare(SPEC, _sampler(), device=torch.device("cpu"), precision=ComputePrecision("bf16"))
    bf16 = enc.encode(batch)
    cos = F.cosine_similarity(fp32, bf16, dim=1)
    assert (cos > 0.995).all(), cos


def test_sensor_table_normalisation_for_known_platforms() -> None:
    spec = InputSpec("sentinel-2-l2a", ("red", "nir"), (0.665, 0.842), 10.0, 0, "uint16", 32)
    enc = RCFEncoder(num_filters=8, sample_chips=4)

    def sample(n: int, seed: int) -> ChipBatch:
        c = _chips(n, seed)
        return ChipBatch(c.pixels[:, :2], c.valid, c.lonlat, c.time)

    enc.prepare(spec, sample, device=torch.device("cpu"), precision=ComputePrecision("fp32"))
    assert enc.card.normalization_source == "sensor-table:sentinel-2-l2a"
    assert enc.card.normalization["red"] == {"mean": 1552.0, "std": 1888.0}


def test_too_few_valid_windows_is_a_clear_error() -> None:
    def sample(n: int, seed: int) -> ChipBatch:
        c = _chips(n, seed)
        valid = torch.zeros_like(c.valid)
        valid[:, :3, :3] = True  # one valid 3x3 window per chip
        return ChipBatch(c.pixels, valid, c.lonlat, c.time)

    enc = RCFEncoder(
        num_filters=16, sample_chips=4, normalization={"a": (0, 1), "b": (0, 1), "c": (0, 1)}
    )
    with pytest.raises(ModelError, match="mostly nodata"):
        enc.prepare(SPEC, sample, device=torch.device("cpu"), precision=ComputePrecision("fp32"))


def test_encode_before_prepare_is_refused() -> None:
    with pytest.raises(ModelError, match="call prepare"):
        RCFEncoder(num_filters=4).encode(_chips(1, 0))


def test_checkpoint_needing_code_execution_is_refused(tmp_path: Path) -> None:
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"format": "xclay-rcf/1", "settings": argparse.Namespace(num_filters=4)}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        xclay.models.get_model("rcf", checkpoint=path)
