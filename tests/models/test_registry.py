"""The model registry."""

from __future__ import annotations

from pathlib import Path

import pytest

from xclay.errors import ModelError
from xclay.models import get_model, get_model_info, list_models
from xclay.protocols import Encoder


def test_rcf_is_registered_with_its_metadata() -> None:
    assert "rcf" in list_models()
    info = get_model_info("rcf")
    assert info.needs_checkpoint is False and info.dim == 1024 and info.bands == "any"


def test_get_model_builds_an_encoder_with_options() -> None:
    enc = get_model("rcf", num_filters=8, seed=3)
    assert isinstance(enc, Encoder)
    assert enc.card.dim == 16 and enc.card.params["seed"] == 3


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ModelError, match=r"unknown model .clay-v9.; available: .*rcf"):
        get_model("clay-v9")


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(
        ModelError, match="has no options \\['filters'\\]; its options are: num_filters"
    ):
        get_model("rcf", filters=3)


def test_options_and_checkpoint_do_not_mix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot be combined with a checkpoint"):
        get_model("rcf", checkpoint=tmp_path / "x.pt", seed=1)


def test_registry_metadata_is_typed_not_prose() -> None:
    from xclay.models import ModelInfo

    clay = get_model_info("clay-v1.5")
    assert clay.bands == "wavelengths" and clay.normalization == ("sensor", "measured", "given")
    fields = {
        "name": "m", "description": "d", "factory": "a:b", "loader": None,
        "needs_checkpoint": False, "dim": 4, "patch_size": None, "bands": "any",
    }  # fmt: skip
    with pytest.raises(ModelError, match="normalization must be a non-empty tuple of sensor"):
        ModelInfo(**fields, normalization="measured on the cube")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="bands must be one of any, wavelengths"):
        ModelInfo(**{**fields, "bands": "all of them"}, normalization=("measured",))  # type: ignore[arg-type]
