"""Light models on embeddings, fitted and checked by spatial cross-validation, and kept in a
file with their scores and the identity of the embeddings they were fitted on.

Models (``model=``):

``"linear"``
    Multinomial logistic regression (classes; L2 penalty, L-BFGS) or ridge regression
    (values; closed form by SVD), on standardised features: ``"logistic"`` and ``"ridge"``
    name them directly.
``"knn"``
    k nearest neighbours by cosine similarity of standardised features: the share of the k
    nearest labelled chips in each class, or their mean value.
``"mlp"``
    A small head in torch: Linear(dim, hidden), ReLU, Linear(hidden, outputs); AdamW, full
    batch, a fixed number of epochs (``params``: ``hidden`` 256, ``epochs`` 300, ``lr``
    1e-3, ``weight_decay`` 1e-4).

Every model is torch (a CPU or a GPU, the same code), with NumPy in and out, so a map is
predicted the same way on either.

The penalty (``alpha``) or ``k`` is chosen from a short list by an inner cross-validation
over the same spatial blocks within each training fold (accuracy for classes, mean squared
error for values); the held-out fold never informs it. ``params`` fixes it instead.

A model file is JSON (kind, task, classes, the chosen parameters, the cross-validation
scores, the labels joined, the embeddings' model card and fingerprint) beside a
safetensors file of its weights (named in the JSON, with its sha256). A model refuses
embeddings of another encoder (:meth:`MapModel.check_embeddings`): the fingerprint is a
sha256 of the card's fields that define the vector space (name, version, family, dim,
output, output shape, patch size, checkpoint sha256 and the model's parameters).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import xarray as xr

from xclay._json import plain
from xclay._version import __version__
from xclay.apply.checking import (
    classification_scores,
    estimate_block,
    inner_groups,
    regression_scores,
    spatial_folds,
)
from xclay.apply.labels import ChipLabels, JoinRule, Labels, Task, join_labels
from xclay.errors import ConfigError, LabelError, ModelError
from xclay.storage import StorageOptions, Where, location

if TYPE_CHECKING:
    import torch

__all__ = [
    "MODEL_CONVENTION",
    "MapModel",
    "ModelKind",
    "embeddings_fingerprint",
    "fit",
    "label_vectors",
    "load_model",
]

log = logging.getLogger(__name__)

MODEL_CONVENTION = "xclay-map-model/1"
ModelKind = Literal["linear", "logistic", "ridge", "knn", "mlp"]
_IDENTITY = (
    "name",
    "version",
    "family",
    "dim",
    "output",
    "output_shape",
    "patch_size",
    "checkpoint_sha256",
    "params",
)
_INNER_FOLDS = 3
_THREADED_VALUES = 20_000_000  # label vector values above which fitting uses threads
_PREDICT_ROWS = 16384  # vectors per forward pass (bounds a k-NN's similarity matrix)


def embeddings_fingerprint(card: Mapping[str, Any]) -> str:
    """sha256 of the model card fields that define an embedding space (module docstring).

    Parameters
    ----------
    card
        A model card as stored in the embeddings' ``model`` attribute.
    """
    identity = plain({k: card.get(k) for k in _IDENTITY})
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- estimators


class _Estimator:
    """One kind of model: its candidate parameters, fitting and forward pass (torch)."""

    tasks: tuple[str, ...] = ("classification", "regression")

    def grid(self, n: int) -> list[dict[str, Any]]:
        return [{}]

    def fit(
        self, z: torch.Tensor, y: torch.Tensor, outputs: int, params: dict[str, Any], seed: int
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(
        self, w: Mapping[str, torch.Tensor], z: torch.Tensor, params: Mapping[str, Any]
    ) -> torch.Tensor:
        """The model on raw vectors, with :meth:`raw`'s weights."""
        raise NotImplementedError

    def raw(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights that take raw vectors: the standardisation (``mean``, ``std``) folded
        into the first linear map where there is one (one pass over the vectors less)."""
        return w


def _folded(
    weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((x - mean) / std) @ weight + bias`` as ``x @ weight' + bias'`` (``weight`` is
    ``[dim, out]``, or ``[dim]``)."""
    scaled = weight / (std[:, None] if weight.ndim == 2 else std)
    return scaled, bias - mean @ scaled


class _Logistic(_Estimator):
    tasks = ("classification",)

    def grid(self, n: int) -> list[dict[str, Any]]:
        return [{"alpha": a} for a in (1.0, 0.1, 0.01)]

    def fit(
        self, z: torch.Tensor, y: torch.Tensor, outputs: int, params: dict[str, Any], seed: int
    ) -> dict[str, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        alpha = float(params["alpha"])
        basis = None
        if z.shape[1] > z.shape[0]:
            # The penalised optimum lies in the span of the training vectors: fit in those
            # coordinates (n values a chip instead of dim), the same model, much cheaper.
            u, s, basis = torch.linalg.svd(z, full_matrices=False)
            z = u * s
        weight = torch.zeros(z.shape[1], outputs, dtype=z.dtype, device=z.device)
        bias = torch.zeros(outputs, dtype=z.dtype, device=z.device)
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        optimiser = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=200,
            history_size=20,
            tolerance_grad=1e-6,
            line_search_fn="strong_wolfe",
        )
        target = y.long()

        def closure() -> torch.Tensor:
            optimiser.zero_grad()
            loss = F.cross_entropy(z @ weight + bias, target) + 0.5 * alpha * (weight**2).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        with torch.enable_grad():
            optimiser.step(closure)  # type: ignore[no-untyped-call]
        found = weight.detach() if basis is None else basis.T @ weight.detach()
        return {"weight": found, "bias": bias.detach()}

    def forward(
        self, w: Mapping[str, torch.Tensor], z: torch.Tensor, params: Mapping[str, Any]
    ) -> torch.Tensor:
        return (z @ w["weight"] + w["bias"]).softmax(dim=1)

    def raw(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = _folded(w["weight"], w["bias"], w["mean"], w["std"])
        return {"weight": weight, "bias": bias}


class _Ridge(_Estimator):
    tasks = ("regression",)

    def grid(self, n: int) -> list[dict[str, Any]]:
        return [{"alpha": float(a)} for a in np.logspace(-3, 3, 7)]

    def fit(
        self, z: torch.Tensor, y: torch.Tensor, outputs: int, params: dict[str, Any], seed: int
    ) -> dict[str, torch.Tensor]:
        import torch

        n = z.shape[0]
        y_mean = y.mean()
        u, s, vt = torch.linalg.svd(z, full_matrices=False)
        shrink = s / (s**2 + float(params["alpha"]) * n)
        weight = vt.T @ (shrink * (u.T @ (y - y_mean)))
        return {"weight": weight, "bias": y_mean.reshape(1)}

    def forward(
        self, w: Mapping[str, torch.Tensor], z: torch.Tensor, params: Mapping[str, Any]
    ) -> torch.Tensor:
        return z @ w["weight"] + w["bias"]

    def raw(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight, bias = _folded(w["weight"], w["bias"], w["mean"], w["std"])
        return {"weight": weight, "bias": bias}


class _KNN(_Estimator):
    def grid(self, n: int) -> list[dict[str, Any]]:
        return [{"k": k} for k in (1, 3, 5, 10, 20) if k <= max(1, n)]

    def fit(
        self, z: torch.Tensor, y: torch.Tensor, outputs: int, params: dict[str, Any], seed: int
    ) -> dict[str, torch.Tensor]:
        import torch

        unit = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if outputs > 1:
            values = torch.nn.functional.one_hot(y.long(), outputs).to(z.dtype)
        else:
            values = y.reshape(-1, 1).to(z.dtype)
        return {"train": unit, "values": values}

    def forward(
        self, w: Mapping[str, torch.Tensor], z: torch.Tensor, params: Mapping[str, Any]
    ) -> torch.Tensor:
        import torch

        # The cosine similarity of the standardised vector to each labelled one, ranked: a
        # row's norm does not change its ranking, and the standardisation folds into the
        # labelled vectors, so one matrix product and a bias rank them (no pass over z).
        scaled = (w["train"] / w["std"]).T
        bias = -(w["mean"] / w["std"]) @ w["train"].T
        k = min(int(params["k"]), w["train"].shape[0])
        nearest = torch.addmm(bias, torch.nan_to_num(z), scaled).topk(k, dim=1).indices
        out = w["values"][nearest].mean(dim=1)
        return out if out.shape[1] > 1 else out[:, 0]


class _MLP(_Estimator):
    defaults: Mapping[str, Any] = {"hidden": 256, "epochs": 300, "lr": 1e-3, "weight_decay": 1e-4}

    def grid(self, n: int) -> list[dict[str, Any]]:
        return [dict(self.defaults)]

    def fit(
        self, z: torch.Tensor, y: torch.Tensor, outputs: int, params: dict[str, Any], seed: int
    ) -> dict[str, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        p = {**self.defaults, **params}
        hidden = int(p["hidden"])
        generator = torch.Generator(device="cpu").manual_seed(seed)
        dim = z.shape[1]

        def init(rows: int, cols: int) -> torch.Tensor:
            bound = 1.0 / float(np.sqrt(cols))
            t = (torch.rand(rows, cols, generator=generator, dtype=torch.float32) * 2 - 1) * bound
            return t.to(device=z.device, dtype=z.dtype).requires_grad_(True)

        w = {
            "w1": init(hidden, dim),
            "b1": init(1, hidden)[0].detach().requires_grad_(True),
            "w2": init(outputs, hidden),
            "b2": init(1, outputs)[0].detach().requires_grad_(True),
        }
        optimiser = torch.optim.AdamW(
            list(w.values()), lr=float(p["lr"]), weight_decay=float(p["weight_decay"])
        )
        with torch.enable_grad():
            for _ in range(int(p["epochs"])):
                optimiser.zero_grad()
                out = self._logits(w, z)
                if outputs > 1:
                    loss = F.cross_entropy(out, y.long())
                else:
                    loss = F.mse_loss(out[:, 0], y)
                loss.backward()  # type: ignore[no-untyped-call]
                optimiser.step()
        return {k: v.detach() for k, v in w.items()}

    @staticmethod
    def _logits(w: Mapping[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        hidden = (z @ w["w1"].T + w["b1"]).relu()
        return hidden @ w["w2"].T + w["b2"]

    def forward(
        self, w: Mapping[str, torch.Tensor], z: torch.Tensor, params: Mapping[str, Any]
    ) -> torch.Tensor:
        out = self._logits(w, z)
        return out.softmax(dim=1) if out.shape[1] > 1 else out[:, 0]

    def raw(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first, b1 = _folded(w["w1"].T, w["b1"], w["mean"], w["std"])
        return {"w1": first.T.contiguous(), "b1": b1, "w2": w["w2"], "b2": w["b2"]}


_ESTIMATORS: dict[str, _Estimator] = {
    "logistic": _Logistic(),
    "ridge": _Ridge(),
    "knn": _KNN(),
    "mlp": _MLP(),
}


def _kind(model: str, task: str) -> str:
    if model not in get_args(ModelKind):
        raise ConfigError(f"model must be one of {get_args(ModelKind)}, got {model!r}.")
    kind = ("logistic" if task == "classification" else "ridge") if model == "linear" else model
    if task not in _ESTIMATORS[kind].tasks:
        other = "ridge" if kind == "logistic" else "logistic"
        raise ConfigError(
            f"model {kind!r} does not do {task}; use 'linear' (or {other!r}), 'knn' or 'mlp'."
        )
    return kind


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class MapModel:
    """A model fitted on embeddings, with its cross-validation scores.

    :func:`fit` makes one; :meth:`save` and :func:`load_model` keep it in a file;
    :func:`xclay.apply.predict` maps it over an embeddings store.

    Attributes
    ----------
    kind
        ``"logistic"``, ``"ridge"``, ``"knn"`` or ``"mlp"``.
    task
        ``"classification"`` or ``"regression"``.
    classes
        Class names in index order (classification); ``None`` for regression.
    params
        The model's parameters (chosen by cross-validation, or given).
    weights
        Name to float32 array: ``mean`` and ``std`` (standardisation), and the kind's own.
    scores
        The spatial cross-validation: how the blocks were made and the out-of-fold scores
        (accuracy, macro F1, per class, confusion; or R², RMSE, MAE).
    embeddings
        What it was fitted on: the embeddings' model card (compact), fingerprint, chip
        size and datacube CRS.
    labels
        The labels joined (:meth:`ChipLabels.describe`).
    created
        When it was fitted (ISO 8601, UTC).
    xclay_version
        The xclay that fitted it.
    """

    kind: str
    task: str
    classes: tuple[str, ...] | None
    params: dict[str, Any]
    weights: dict[str, np.ndarray]
    scores: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    xclay_version: str = __version__

    @property
    def outputs(self) -> int:
        """Values per chip the model gives: one per class, or 1."""
        return len(self.classes) if self.classes is not None else 1

    @property
    def fingerprint(self) -> str:
        return str(self.embeddings.get("fingerprint", ""))

    # -- prediction -------------------------------------------------------------

    def tensors(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The weights as torch tensors on ``device`` (float32), for :meth:`forward` (the
        standardisation folded into the first linear map where there is one)."""
        import torch

        stored = {
            k: torch.as_tensor(v, dtype=torch.float32, device=device)
            for k, v in self.weights.items()
        }
        return _ESTIMATORS[self.kind].raw(stored)

    def forward(self, vectors: torch.Tensor, weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[n, classes]`` probabilities, or ``[n]`` values, of ``[n, dim]`` float32 vectors
        (rows with a non-finite value come out NaN).

        Parameters
        ----------
        vectors
            ``[n, dim]`` embeddings on the device of ``weights``.
        weights
            :meth:`tensors` on that device.
        """
        import torch

        finite = torch.isfinite(vectors.sum(dim=1))  # one reduction: NaN or inf in a row
        out = _ESTIMATORS[self.kind].forward(weights, vectors, self.params)
        nan = torch.tensor(float("nan"), dtype=out.dtype, device=out.device)
        mask = finite[:, None] if out.ndim == 2 else finite
        return torch.where(mask, out, nan)

    def predict_vectors(self, vectors: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Probabilities ``[n, classes]`` or values ``[n]`` of ``[n, dim]`` vectors (NumPy).

        Parameters
        ----------
        vectors
            ``[n, dim]`` embeddings.
        device
            The torch device to compute on.
        """
        import torch

        weights = self.tensors(device)
        out = []
        with torch.inference_mode():
            for start in range(0, max(1, len(vectors)), _PREDICT_ROWS):
                part = torch.as_tensor(
                    np.asarray(vectors[start : start + _PREDICT_ROWS], dtype=np.float32),
                    device=device,
                )
                out.append(self.forward(part, weights).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.outputs), np.float32)

    # -- the embeddings it applies to -------------------------------------------

    def check_embeddings(self, emb: xr.Dataset) -> None:
        """Refuse embeddings of another encoder than the one the model was fitted on
        (a :class:`~xclay.errors.ModelError` naming both).

        Parameters
        ----------
        emb
            An embeddings Dataset.
        """
        card = dict(emb.attrs.get("model", {}))
        theirs = embeddings_fingerprint(card)
        if theirs != self.fingerprint:
            mine = self.embeddings.get("model", {})
            raise ModelError(
                f"this model was fitted on embeddings of {mine.get('name')!r} "
                f"({mine.get('dim')}-d, fingerprint {self.fingerprint[:12]}); these are of "
                f"{card.get('name')!r} ({card.get('dim')}-d, fingerprint {theirs[:12]}). "
                "Predict on embeddings made with the same encoder, checkpoint and settings, "
                "or fit a model on these."
            )

    # -- files ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Everything but the weights, as the model file's JSON holds it."""
        return {
            "convention": MODEL_CONVENTION,
            "kind": self.kind,
            "task": self.task,
            "classes": list(self.classes) if self.classes is not None else None,
            "params": plain(self.params),
            "scores": plain(self.scores),
            "embeddings": plain(self.embeddings),
            "labels": plain(self.labels),
            "created": self.created,
            "xclay_version": self.xclay_version,
        }

    def save(
        self,
        path: Where,
        *,
        overwrite: bool = False,
        storage_options: StorageOptions | None = None,
    ) -> Path | str:
        """Write the model: ``path`` (JSON) and its weights beside it (``<stem>.safetensors``).

        Parameters
        ----------
        path
            The JSON file (a path or URL).
        overwrite
            Replace existing files; by default an existing one is an
            :class:`~xclay.errors.OutputExistsError`.
        storage_options
            Settings for object storage beyond the environment.

        Returns
        -------
        pathlib.Path or str
            The JSON file written: its path, or its URL.
        """
        from safetensors.numpy import save as to_bytes

        target = location(path, storage_options)
        weights_at = target.with_suffix(".safetensors")
        blob = to_bytes(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.weights.items()}
        )
        with weights_at.staged(overwrite=overwrite) as tmp:
            tmp.write_bytes(blob)
        record = self.to_dict()
        record["weights"] = {
            "file": weights_at.name,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "format": "safetensors",
        }
        with target.staged(overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
        return target.path if target.is_local else target.url


def load_model(path: Where, *, storage_options: StorageOptions | None = None) -> MapModel:
    """Read a model file written by :meth:`MapModel.save` (its weights are checked against
    the sha256 the JSON records).

    Parameters
    ----------
    path
        The model's JSON file (a path or URL).
    storage_options
        Settings for object storage beyond the environment.
    """
    from safetensors.numpy import load as from_bytes

    where = location(path, storage_options)
    if not where.is_file():
        raise FileNotFoundError(f"no model file at {where}.")
    try:
        record = json.loads(where.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{where} is not a model file (not JSON: {err}).") from err
    if not isinstance(record, dict) or record.get("convention") != MODEL_CONVENTION:
        raise ModelError(
            f"{where} is not an xclay model file (no convention {MODEL_CONVENTION!r}); write "
            "one with xclay fit or MapModel.save."
        )
    weights_at = where.with_name(str(record["weights"]["file"]))
    if not weights_at.is_file():
        raise FileNotFoundError(
            f"the model's weights {weights_at} are missing (they go beside {where.name})."
        )
    blob = weights_at.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["weights"]["sha256"]:
        raise ModelError(
            f"the weights {weights_at} do not match the sha256 in {where.name}: the files are "
            "from different fits, or damaged. Fit the model again."
        )
    kind = str(record["kind"])
    if kind not in _ESTIMATORS:
        raise ModelError(f"{where}: unknown model kind {kind!r} (from a newer xclay?).")
    classes = record.get("classes")
    return MapModel(
        kind=kind,
        task=str(record["task"]),
        classes=tuple(classes) if classes is not None else None,
        params=dict(record.get("params", {})),
        weights={k: np.asarray(v) for k, v in from_bytes(blob).items()},
        scores=dict(record.get("scores", {})),
        embeddings=dict(record.get("embeddings", {})),
        labels=dict(record.get("labels", {})),
        created=str(record.get("created", "")),
        xclay_version=str(record.get("xclay_version", "")),
    )


# --------------------------------------------------------------------------- fitting


def _time_index(emb: xr.Dataset, time: int | None) -> int:
    steps = int(emb.sizes["time"])
    if time is None:
        if steps != 1:
            days = [str(np.datetime64(t, "D")) for t in emb["time"].values[:5]]
            raise ConfigError(
                f"these embeddings have {steps} time steps ({', '.join(days)}...): choose one "
                "with time=INDEX (CLI: --time)."
            )
        return 0
    if not 0 <= time < steps:
        raise ConfigError(f"time {time} is outside the {steps} time step(s).")
    return int(time)


def _pooled(values: np.ndarray) -> np.ndarray:
    """Patch grids (``[..., patch_y, patch_x, dim]``) averaged to one vector per chip."""
    values = np.asarray(values, dtype=np.float32)
    return values.mean(axis=(-3, -2)) if values.ndim >= 4 else values


def label_vectors(emb: xr.Dataset, labels: ChipLabels, time: int = 0) -> np.ndarray:
    """``[n, dim]`` float32 vectors of the labelled chips at time step ``time`` (NaN for
    chips without one); reads only those chips.

    Parameters
    ----------
    emb
        The embeddings the labels were joined to.
    labels
        Labels joined to ``emb`` (:func:`~xclay.apply.labels.join_labels`).
    time
        The time step (index).
    """
    if not len(labels):
        return np.zeros((0, int(emb.sizes["feature"])), dtype=np.float32)
    rows = xr.DataArray(labels.row, dims="label")
    cols = xr.DataArray(labels.col, dims="label")
    picked = emb["embedding"].isel(time=time).isel(chip_y=rows, chip_x=cols)
    values = np.asarray(picked.transpose("label", ...).values, dtype=np.float32)
    return _pooled(values) if values.ndim > 2 else values


def _open(emb: xr.Dataset | Where, storage_options: StorageOptions | None) -> xr.Dataset:
    if isinstance(emb, xr.Dataset):
        return emb
    from xclay.outputs.export import open_embeddings

    return open_embeddings(emb, storage_options=storage_options)


def fit(
    emb: xr.Dataset | Where,
    labels: Labels | ChipLabels,
    *,
    column: str | None = None,
    model: ModelKind = "linear",
    rule: JoinRule = "auto",
    min_cover: float = 0.5,
    task: Task = "auto",
    folds: int = 5,
    block_m: float | None = None,
    time: int | None = None,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> MapModel:
    """Fit a model from chip embeddings to labels, checked by spatial block cross-validation.

    Parameters
    ----------
    emb
        An embeddings Dataset, or the path or URL of an embeddings Zarr.
    labels
        Labels joined already (:class:`~xclay.apply.labels.ChipLabels`), or anything
        :func:`~xclay.apply.labels.join_labels` takes (points, polygons, a label raster).
    column
        The label column of vector labels.
    model
        ``"linear"`` (default), ``"logistic"``, ``"ridge"``, ``"knn"`` or ``"mlp"``
        (module docstring).
    rule, min_cover, task
        How labels join to chips (:func:`~xclay.apply.labels.join_labels`).
    folds
        Folds of the spatial cross-validation (at least 2).
    block_m
        Block edge in metres; default None: estimated from the labels' variogram
        (:func:`~xclay.apply.checking.estimate_block`).
    time
        The time step (index) of multi-step embeddings.
    params
        The model's parameters (``alpha``, ``k``, ``hidden``, ``epochs``, ``lr``,
        ``weight_decay``); given ones are not searched.
    seed
        Seed of the folds' shuffle and of the MLP's weights.
    device
        The torch device to fit on (``"cpu"``, ``"cuda"``, ``"auto"``).

    Returns
    -------
    MapModel
        The model fitted on every label, with its out-of-fold scores.
    """
    from xclay.devices import resolve_device

    emb = _open(emb, None)
    if not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"folds must be a whole number of at least 2, got {folds!r}.")
    t = _time_index(emb, time)
    joined = (
        labels
        if isinstance(labels, ChipLabels)
        else join_labels(emb, labels, column=column, rule=rule, task=task, min_cover=min_cover)
    )
    kind = _kind(model, joined.task)
    x = label_vectors(emb, joined, t)
    embedded = np.isfinite(x).all(axis=1)
    if not embedded.all():
        joined = joined.select(embedded)
        joined.dropped["chips not embedded"] = int((~embedded).sum())
        x = x[embedded]
    classes = joined.classes
    if classes is not None:
        present = np.unique(joined.target)
        if present.size < 2:
            raise LabelError(
                f"the labelled chips hold {present.size} class; a classifier needs at least 2."
            )
    if len(joined) < 2 * folds:
        raise LabelError(
            f"{len(joined)} labelled chips with embeddings; {folds}-fold cross-validation "
            f"needs at least {2 * folds}."
        )
    card = dict(emb.attrs["model"])
    grid = emb.attrs["config"]["grid"]
    step = int(grid.get("stride") or grid["chip_size"])
    chip_m = step * abs(float(emb.attrs["datacube"]["geotransform"][1]))
    block = estimate_block(
        joined.x,
        joined.y,
        joined.target,
        classification=classes is not None,
        chip_m=chip_m,
        folds=folds,
        block_m=block_m,
        seed=seed,
    )
    fold = spatial_folds(joined.x, joined.y, block.block_m, folds, seed)
    groups = inner_groups(joined.x, joined.y, block.block_m)
    dev = resolve_device(device)
    estimator = _ESTIMATORS[kind]
    outputs = len(classes) if classes is not None else 1
    given = dict(params or {})
    candidates = [given] if given else estimator.grid(len(joined))
    if kind == "mlp":
        candidates = [{**_MLP.defaults, **given}]
    y = joined.target.astype(np.float64 if classes is None else np.int64)
    oof = np.full((len(joined), outputs) if classes is not None else len(joined), np.nan)
    chosen_per_fold, fold_scores = [], []
    with _threads(dev, x.size):
        for f in range(folds):
            train, test = fold != f, fold == f
            best = _choose(
                estimator, candidates, x[train], y[train], groups[train], outputs, seed, dev
            )
            fitted = _fit_one(estimator, x[train], y[train], outputs, best, seed, dev)
            oof[test] = fitted.predict_vectors(x[test], str(dev))
            chosen_per_fold.append(best)
            fold_scores.append(_score(y[test], oof[test], classes))
        best = _choose(estimator, candidates, x, y, groups, outputs, seed, dev)
        final = _fit_one(estimator, x, y, outputs, best, seed, dev)
    scores = {
        "cv": {
            "method": "spatial block cross-validation",
            "folds": folds,
            "fold_sizes": np.bincount(fold, minlength=folds).tolist(),
            "blocks": int(np.unique(groups).size),
            **block.to_dict(),
        },
        "out_of_fold": _score(y, oof, classes),
        "per_fold": fold_scores,
        "params_per_fold": chosen_per_fold,
        "selection": "inner spatial cross-validation over the training folds' blocks"
        if len(candidates) > 1
        else "given (not searched)",
    }
    from xclay.model_card import ModelCard

    compact = ModelCard.from_dict(card).compact()
    return MapModel(
        kind=kind,
        task=joined.task,
        classes=classes,
        params=best,
        weights=final.weights,
        scores=scores,
        embeddings={
            "model": compact,
            "fingerprint": embeddings_fingerprint(card),
            "chip_size": int(grid["chip_size"]),
            "stride": grid.get("stride"),
            "crs_wkt": emb.attrs["datacube"]["crs_wkt"],
            "time": str(np.datetime64(emb["time"].values[t], "D")),
        },
        labels=joined.describe(),
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


@contextlib.contextmanager
def _threads(device: torch.device, size: int) -> Iterator[None]:
    """torch's threads for fitting: one for a few thousand labels (hundreds of small fits,
    where threads spin at barriers more than they compute), else the device's budget."""
    import torch

    from xclay.devices import ThreadBudget

    if size > _THREADED_VALUES or device.type == "cuda" or os.environ.get("OMP_NUM_THREADS"):
        with ThreadBudget.for_device(device).applied():
            yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _Fitted:
    """A fit without its scores (folds, inner searches)."""

    kind: str
    classes: tuple[str, ...] | None
    params: dict[str, Any]
    weights: dict[str, np.ndarray]

    def predict_vectors(self, vectors: np.ndarray, device: str) -> np.ndarray:
        model = MapModel(self.kind, "", self.classes, self.params, self.weights)
        return model.predict_vectors(vectors, device)


def _fit_one(
    estimator: _Estimator,
    x: np.ndarray,
    y: np.ndarray,
    outputs: int,
    params: dict[str, Any],
    seed: int,
    device: torch.device,
) -> _Fitted:
    import torch

    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    z = torch.as_tensor((x - mean) / std, dtype=torch.float32, device=device)
    target = torch.as_tensor(y, dtype=torch.float32, device=device)
    weights = estimator.fit(z, target, outputs, params, seed)
    arrays = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in weights.items()}
    arrays["mean"] = mean.astype(np.float32)
    arrays["std"] = std.astype(np.float32)
    kind = next(k for k, e in _ESTIMATORS.items() if e is estimator)
    classes = tuple(str(i) for i in range(outputs)) if outputs > 1 else None
    return _Fitted(kind, classes, params, arrays)


def _choose(
    estimator: _Estimator,
    candidates: list[dict[str, Any]],
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    outputs: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    """The candidate with the best inner spatial cross-validation score (the first on ties:
    candidates go from the most regularised)."""
    if len(candidates) == 1:
        return dict(candidates[0])
    unique = np.unique(groups)
    k = min(_INNER_FOLDS, unique.size)
    if k < 2:
        return dict(candidates[0])
    order = np.random.default_rng(seed + 1).permutation(unique)
    fold_of = {g: i % k for i, g in enumerate(order.tolist())}
    inner = np.array([fold_of[g] for g in groups.tolist()])
    losses = np.zeros(len(candidates))
    for f in range(k):
        train, test = inner != f, inner == f
        if outputs > 1 and np.unique(y[train]).size < 2:
            continue
        for c, params in enumerate(candidates):
            fitted = _fit_one(estimator, x[train], y[train], outputs, params, seed, device)
            guess = fitted.predict_vectors(x[test], str(device))
            if outputs > 1:
                losses[c] += float((guess.argmax(axis=1) != y[test]).sum())
            else:
                losses[c] += float(((guess - y[test]) ** 2).sum())
    return dict(candidates[int(np.argmin(losses))])


def _score(
    truth: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...] | None
) -> dict[str, Any]:
    if classes is not None:
        return classification_scores(truth, np.nan_to_num(predicted).argmax(axis=1), classes)
    return regression_scores(truth, predicted)
