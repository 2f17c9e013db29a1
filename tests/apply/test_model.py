"""Models fitted on embeddings, checked by spatial block cross-validation, kept in files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

import xclay
from tests.apply.conftest import CHIP, points_of, synthetic
from xclay.apply import MapModel, fit, join_labels, load_model
from xclay.apply.checking import CheckingWarning, estimate_block, spatial_folds
from xclay.errors import ConfigError, LabelError, ModelError

pytest.importorskip("geopandas", reason="needs xclay[explore]")

N = 16  # chips a side


def _class_map(seed: int = 0) -> np.ndarray:
    """``[16, 16]`` classes 0..2 in 4 x 4-chip patches (spatially autocorrelated)."""
    patches = np.random.default_rng(seed).integers(0, 3, (4, 4))
    return np.repeat(np.repeat(patches, 4, axis=0), 4, axis=1)


def _chip_points(cube: xr.Dataset, classes: np.ndarray, every: int = 1) -> object:
    """One point at the centre of every ``every``-th chip, labelled with its class."""
    grid_i, grid_j = np.meshgrid(np.arange(0, N, every), np.arange(0, N, every), indexing="ij")
    i, j = grid_i.ravel(), grid_j.ravel()
    names = np.array(["water", "forest", "town"])[classes[i, j]]
    return points_of(cube, i * CHIP + CHIP // 2, j * CHIP + CHIP // 2, names)


@pytest.mark.parametrize("kind", ["linear", "knn", "mlp"])
def test_a_model_learns_what_the_vectors_encode(
    kind: Any, demo_cube: xr.Dataset, demo_emb: xr.Dataset
) -> None:
    classes = _class_map()
    emb = synthetic(demo_emb, classes)
    every: dict[str, dict[str, Any]] = {
        "linear": {"alpha": 0.01},
        "knn": {"k": 3},
        "mlp": {"epochs": 60},
    }
    params = every[kind]
    model = fit(
        emb, _chip_points(demo_cube, classes), column="landcover", model=kind, params=params
    )
    scores = model.scores["out_of_fold"]
    assert scores["accuracy"] > 0.95, scores
    assert np.asarray(scores["confusion"]).sum() == N * N
    assert set(scores["per_class"]) == {"forest", "town", "water"}
    cv = model.scores["cv"]
    assert cv["method"] == "spatial block cross-validation" and cv["folds"] == 5
    assert sum(cv["fold_sizes"]) == N * N
    vectors = emb["embedding"].values[0].reshape(-1, emb.sizes["feature"])
    names = np.asarray(model.classes)[model.predict_vectors(vectors).argmax(axis=1)]
    truth = np.array(["water", "forest", "town"])[classes.ravel()]
    assert (names == truth).mean() > 0.95


def test_labels_unrelated_to_the_vectors_score_at_chance(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset
) -> None:
    emb = synthetic(demo_emb, _class_map(0))
    other = _class_map(7)  # another patchwork: the vectors say nothing of it
    model = fit(emb, _chip_points(demo_cube, other), column="landcover", params={"alpha": 0.01})
    assert model.scores["out_of_fold"]["accuracy"] < 0.7


def test_regression_scores(demo_cube: xr.Dataset, demo_emb: xr.Dataset) -> None:
    rng = np.random.default_rng(0)
    emb = synthetic(demo_emb, _class_map())
    vectors = emb["embedding"].values[0]
    direction = rng.normal(size=vectors.shape[-1])
    value = vectors @ direction  # a linear function of the vectors
    i, j = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    frame = points_of(demo_cube, i.ravel() * CHIP + 8, j.ravel() * CHIP + 8, value.ravel())
    model = fit(emb, frame, column="landcover", model="linear")
    assert model.kind == "ridge" and model.task == "regression"
    assert model.scores["out_of_fold"]["r2"] > 0.9
    assert model.scores["out_of_fold"]["rmse"] < 0.3 * value.std()
    with pytest.raises(ConfigError, match="does not do regression"):
        fit(emb, frame, column="landcover", model="logistic")


def test_the_block_is_the_labels_range() -> None:
    chip = 160.0
    i, j = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    x, y = j.ravel() * chip, -i.ravel() * chip
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 4, (10, 10))
    alike = np.repeat(np.repeat(patches, 4, axis=0), 4, axis=1).ravel()  # 4-chip patches
    block = estimate_block(x, y, alike, classification=True, chip_m=chip, folds=5)
    assert block.range_m is not None and 2 * chip <= block.range_m <= 10 * chip, block
    independent = rng.integers(0, 4, alike.size)
    small = estimate_block(x, y, independent, classification=True, chip_m=chip, folds=5)
    assert small.block_m < block.block_m and small.block_m <= 2 * chip, small
    assert small.sill == pytest.approx(0.375, abs=0.02)  # (1 - 4 * 0.25**2) / 2


def test_folds_keep_blocks_whole_and_near_equal() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 10_000, 500), rng.uniform(0, 10_000, 500)
    fold = spatial_folds(x, y, 1000.0, 5, seed=3)
    block = np.floor((x - x.min()) / 1000).astype(int) * 100 + np.floor(
        (y - y.min()) / 1000
    ).astype(int)
    for b in np.unique(block):
        assert np.unique(fold[block == b]).size == 1
    sizes = np.bincount(fold)
    assert sizes.min() >= 0.8 * sizes.max()
    np.testing.assert_array_equal(fold, spatial_folds(x, y, 1000.0, 5, seed=3))


def test_too_few_blocks_warn_and_too_few_labels_refuse(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset
) -> None:
    emb = synthetic(demo_emb, _class_map())
    classes = _class_map()
    with pytest.warns(CheckingWarning, match="scores may be optimistic"):
        fit(
            emb,
            _chip_points(demo_cube, classes, 2),
            column="landcover",
            block_m=5000,
            params={"alpha": 0.1},
        )
    few = _chip_points(demo_cube, classes, 8)  # 4 labels
    with pytest.raises(LabelError, match="needs at least 10"):
        fit(emb, few, column="landcover")
    one = points_of(demo_cube, np.arange(0, 256, 16), np.arange(0, 256, 16), ["a"] * 16)
    with pytest.raises(LabelError, match="at least 2"):
        fit(emb, one, column="landcover")


def test_a_model_file_round_trips_and_refuses_other_embeddings(
    demo_cube: xr.Dataset, demo_emb: xr.Dataset, tmp_path: Path
) -> None:
    classes = _class_map()
    emb = synthetic(demo_emb, classes)
    labels = join_labels(emb, _chip_points(demo_cube, classes), column="landcover")
    model = emb.clay.fit(labels, model="knn", params={"k": 3})
    path = model.save(tmp_path / "model.json")
    record = json.loads(Path(path).read_text())
    assert record["convention"] == "xclay-map-model/1"
    assert record["embeddings"]["fingerprint"] == model.fingerprint
    assert record["embeddings"]["model"]["name"] == "rcf"
    assert record["scores"]["out_of_fold"]["accuracy"] == model.scores["out_of_fold"]["accuracy"]
    assert record["weights"]["file"] == "model.safetensors"
    again = load_model(path)
    vectors = emb["embedding"].values[0, :4].reshape(-1, emb.sizes["feature"])
    np.testing.assert_array_equal(again.predict_vectors(vectors), model.predict_vectors(vectors))
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "model.json")
    # Embeddings of another encoder (rcf with other filters): refused, naming both.
    other = xclay.embed(
        demo_cube,
        model=xclay.models.get_model("rcf", num_filters=32, sample_chips=8, seed=5),
        chip_size=CHIP,
        progress=False,
    )
    with pytest.raises(ModelError, match="fitted on embeddings of 'rcf'"):
        again.check_embeddings(other)
    again.check_embeddings(emb)
    # Weights from another fit: refused.
    other_fit = MapModel(
        model.kind,
        model.task,
        model.classes,
        model.params,
        {k: v + 1 for k, v in model.weights.items()},
        embeddings=model.embeddings,
    )
    other_fit.save(tmp_path / "other.json")
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "other.safetensors").read_bytes())
    with pytest.raises(ModelError, match="do not match the sha256"):
        load_model(path)
    (tmp_path / "plain.json").write_text("{}")
    with pytest.raises(ModelError, match="not an xclay model file"):
        load_model(tmp_path / "plain.json")
