"""Random convolutional features (RCF), the weight-free baseline encoder.

MOSAIKS (Rolf et al., Nature Communications 12, 4392, 2021): K filters are
random ``k x k`` patches of the imagery itself (ZCA-whitened); a chip's
features are the average over the chip of ``ReLU(response - b)`` and
``ReLU(-response - b)`` for every filter, so a chip gets ``2 K`` numbers.

Here the filters and the whitening are sampled once, reproducibly from a
seed, from chips of the cube being embedded (or loaded from a saved
checkpoint so that other cubes get comparable vectors). Whitening is folded
into the filters, so inference is one convolution. The convolution runs as
a matrix product over chunks of positions, pooling each chunk while it is in
cache: on a 2-core CPU that is ~7x faster than ``conv2d`` followed by ReLU
and mean over the full response map (docs/benchmarks.md).

Nodata never leaks into a vector: normalised nodata pixels are zero and
response positions whose ``k x k`` window touches nodata are left out of the
average. A chip with no fully valid window gets a NaN vector (not embedded).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from xclay.errors import CheckpointError, ModelError
from xclay.model_card import ModelCard
from xclay.models.normalization import Normalization, resolve_normalization
from xclay.models.plugin import EncoderPlugin, keyword_names

if TYPE_CHECKING:
    import torch

    from xclay.devices import ComputePrecision, Precision
    from xclay.protocols import ChipBatch, InputSpec, Sampler

__all__ = ["RCFEncoder", "RCFPlugin"]

log = logging.getLogger(__name__)

FORMAT = "xclay-rcf/1"
_POSITIONS_PER_CHUNK = 2048  # a [K, 2048] response chunk is reused while in cache


DEFAULT_NUM_FILTERS = 512


class RCFPlugin(EncoderPlugin):
    """rcf in the model registry: built from options, loaded from saved filters, rebuilt
    from its card (the filters are in it)."""

    name = "rcf"
    description = (
        "Random convolutional features (MOSAIKS, Rolf et al. 2021): weight-free, fitted on "
        "the cube from a seed; 2 x num_filters dims."
    )
    dim = 2 * DEFAULT_NUM_FILTERS
    bands = "any"
    normalization = ("sensor", "measured")

    def build(self, **options: Any) -> RCFEncoder:
        return RCFEncoder(**options)

    def load(self, checkpoint: str | os.PathLike[str] | None, **options: Any) -> RCFEncoder:
        if checkpoint is None:
            raise ModelError("rcf's load() needs the path of filters saved by RCFEncoder.save().")
        return RCFEncoder.from_checkpoint(checkpoint)

    def rebuild(
        self, card: ModelCard, *, checkpoint: str | os.PathLike[str] | None = None
    ) -> RCFEncoder:
        return RCFEncoder.from_card(card)

    def check_checkpoint(self, checkpoint: str | os.PathLike[str] | None) -> None:
        if checkpoint is not None:
            RCFEncoder.check_checkpoint(checkpoint)

    def option_names(self, *, checkpoint: bool) -> list[str] | None:
        return [] if checkpoint else keyword_names(RCFEncoder)  # saved filters fix them all

    def vector_values(self, options: Mapping[str, Any], chip_size: int) -> int:
        """Two values per filter (the ReLU of each sign), whatever the chip size."""
        return 2 * int(options.get("num_filters", DEFAULT_NUM_FILTERS))


class RCFEncoder:
    """Random convolutional features (MOSAIKS-style), deterministic under ``seed``.

    Parameters
    ----------
    num_filters
        K, the number of filters; the embedding has ``2 K`` dimensions.
    kernel_size
        Filter edge ``k`` in pixels.
    bias
        ReLU threshold ``b`` on the whitened response.
    seed
        Seeds the choice of sample chips, patches and filters.
    sample_chips
        How many chips of the cube to draw patches from when fitting.
    whiten
        ZCA-whiten patches (and so the filters), as MOSAIKS does.
    normalization
        ``"auto"``: the sensor table's constants for a known platform, else
        measured on the sample chips; ``"measured"``: always measured; or a
        mapping ``band -> (mean, std)``.
    """

    name = "rcf"

    def __init__(
        self,
        num_filters: int = DEFAULT_NUM_FILTERS,
        kernel_size: int = 3,
        bias: float = 1.0,
        seed: int = 0,
        sample_chips: int = 32,
        whiten: bool = True,
        normalization: Literal["auto", "measured"] | Mapping[str, tuple[float, float]] = "auto",
    ) -> None:
        if num_filters < 1:
            raise ModelError(f"num_filters must be >= 1, got {num_filters}.")
        if kernel_size < 1:
            raise ModelError(f"kernel_size must be >= 1, got {kernel_size}.")
        if sample_chips < 1:
            raise ModelError(f"sample_chips must be >= 1, got {sample_chips}.")
        self.num_filters = int(num_filters)
        self.kernel_size = int(kernel_size)
        self.bias = float(bias)
        self.seed = int(seed)
        self.sample_chips = int(sample_chips)
        self.whiten = bool(whiten)
        self.normalization_request = normalization
        # Fitted state: filters with whitening folded in, and what they were fitted on.
        self._kernels: np.ndarray | None = None  # [K, C, k, k] float32
        self._offsets: np.ndarray | None = None  # [K] float32
        self._norm: Normalization | None = None
        self._wavelengths: dict[str, float] = {}
        self._gsd: float | None = None
        self._checkpoint: tuple[str, str] | None = None
        # Compute state (set by prepare).
        self._device: torch.device | None = None
        self._dtype: torch.dtype | None = None
        self._tensors: dict[str, torch.Tensor] = {}

    # -- Encoder protocol ----------------------------------------------------

    @property
    def preferred_precision(self) -> Precision:
        return "fp32"  # the baseline is cheap; keep it exact and reproducible

    @property
    def fitted(self) -> bool:
        return self._kernels is not None

    def _settings(self) -> dict[str, Any]:
        """What rebuilds this encoder's filters: saved with them, and in its card."""
        return {
            "num_filters": self.num_filters,
            "kernel_size": self.kernel_size,
            "bias": self.bias,
            "seed": self.seed,
            "sample_chips": self.sample_chips,
            "whiten": self.whiten,
        }

    @property
    def card(self) -> ModelCard:
        params: dict[str, Any] = {
            **self._settings(),
            "pooling": "mean over positions whose window is all valid",
        }
        if self._kernels is not None and self._offsets is not None:
            params["filters"] = _encode_array(self._kernels)
            params["offsets"] = _encode_array(self._offsets)
            params["filters_sha256"] = hashlib.sha256(
                self._kernels.tobytes() + self._offsets.tobytes()
            ).hexdigest()
        norm = self._norm
        return ModelCard(
            name="rcf",
            version="1",
            family="random-convolutional-features",
            description=(
                "Random convolutional features (MOSAIKS, Rolf et al. 2021): ReLU(+/-response - b) "
                "of ZCA-whitened random image patches, averaged per chip."
            ),
            dim=2 * self.num_filters,
            output="pooled",
            output_shape=[2 * self.num_filters],
            normalization=norm.to_dict() if norm else {},
            normalization_source=norm.source if norm else "",
            wavelengths=dict(self._wavelengths),
            gsd=self._gsd,
            patch_size=None,
            checkpoint=self._checkpoint[0] if self._checkpoint else None,
            checkpoint_sha256=self._checkpoint[1] if self._checkpoint else None,
            license="Apache-2.0 (method: Rolf et al. 2021)",
            params=params,
        )

    def prepare(
        self, spec: InputSpec, sample: Sampler, *, device: torch.device, precision: ComputePrecision
    ) -> None:
        """Fit filters on sample chips of the cube (once), then move them to ``device``."""
        import torch

        if precision.name == "fp8":
            raise ModelError("rcf has no FP8 path (it is a single convolution); use 'bf16'.")
        dtype = precision.dtype

        if self._norm is None:
            self._norm = resolve_normalization(self.normalization_request, spec, sample, self.seed)
        self._norm.check_bands(spec.bands, what="rcf normalisation")
        if self._kernels is None:
            self._fit(spec, sample)
        elif self._kernels.shape[1] != len(spec.bands):
            raise ModelError(
                f"these rcf filters were fitted on {self._kernels.shape[1]} bands "
                f"({', '.join(self._norm.bands)}); the cube has {len(spec.bands)}."
            )
        if not self._wavelengths:
            self._wavelengths = dict(zip(spec.bands, spec.wavelengths, strict=True))
            self._gsd = spec.gsd
        assert self._kernels is not None and self._offsets is not None
        k, c = self.kernel_size, len(spec.bands)
        self._device, self._dtype = device, dtype
        mean, std = self._norm.arrays(spec.bands)
        self._tensors = {
            "mean": torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, c, 1, 1),
            "std": torch.as_tensor(std, dtype=torch.float32, device=device).view(1, c, 1, 1),
            "weights": torch.as_tensor(self._kernels.reshape(self.num_filters, c * k * k)).to(
                device=device, dtype=dtype
            ),  # [K, C*k*k]
            "offsets": torch.as_tensor(self._offsets).to(device=device, dtype=dtype).view(-1, 1),
        }

    def encode(self, batch: ChipBatch) -> torch.Tensor:
        """``[B, 2K]`` float32: pooled ReLU(+/-response - b) per filter; NaN if no valid window."""
        import torch
        import torch.nn.functional as F

        if not self._tensors or self._dtype is None:
            raise ModelError("call prepare() before encode(): the rcf filters are not ready.")
        x = self._normalise(batch)
        k, kk = self.kernel_size, self.num_filters
        weights, offsets = self._tensors["weights"], self._tensors["offsets"]
        # Response positions whose whole k x k window is valid.
        invalid = (~batch.valid).unsqueeze(1).to(torch.float32)
        window_ok = 1.0 - F.max_pool2d(invalid, k, stride=1)  # [B, 1, H-k+1, W-k+1]
        out = torch.zeros(len(batch), 2 * kk, dtype=torch.float32, device=x.device)
        for b in range(len(batch)):
            # [C*k*k, L]: responses come as [K, chunk] on column views, so no transposed copy.
            cols = F.unfold(x[b : b + 1], k)[0].to(self._dtype)
            w = window_ok[b].reshape(-1).to(self._dtype)
            for s in range(0, cols.shape[1], _POSITIONS_PER_CHUNK):
                e = s + _POSITIONS_PER_CHUNK
                r = torch.addmm(offsets, weights, cols[:, s:e])  # [K, chunk]
                out[b, :kk] += ((r - self.bias).clamp_min_(0.0) @ w[s:e]).float()
                # -r - b == -(r + b): reuse r's memory for the negative half
                out[b, kk:] += (r.add_(self.bias).neg_().clamp_min_(0.0) @ w[s:e]).float()
        count = window_ok.flatten(1).sum(1, keepdim=True)
        return torch.where(count > 0, out / count.clamp_min(1.0), torch.nan)

    # -- fitting ---------------------------------------------------------------

    def _normalise(self, batch: ChipBatch) -> torch.Tensor:
        import torch

        x = (batch.pixels.to(torch.float32) - self._tensors["mean"]) / self._tensors["std"]
        return x.masked_fill(~batch.valid.unsqueeze(1), 0.0)

    def _fit(self, spec: InputSpec, sample: Sampler) -> None:
        import torch
        import torch.nn.functional as F

        assert self._norm is not None
        chips = sample(self.sample_chips, self.seed)
        mean, std = self._norm.arrays(spec.bands)
        shape = (1, -1, 1, 1)
        x = (chips.pixels.to(torch.float64) - torch.as_tensor(mean).view(shape)) / torch.as_tensor(
            std
        ).view(shape)
        x = x.masked_fill(~chips.valid.unsqueeze(1), 0.0)
        k = self.kernel_size
        invalid = (~chips.valid).unsqueeze(1).to(torch.float32)
        window_ok = (F.max_pool2d(invalid, k, stride=1)[:, 0] == 0).numpy()
        n_idx, r_idx, c_idx = np.nonzero(window_ok)
        wanted = max(20 * self.num_filters, 20_000)
        if n_idx.size < self.num_filters:
            raise ModelError(
                f"only {n_idx.size} fully valid {k}x{k} windows in {len(chips)} sample chips, "
                f"fewer than num_filters={self.num_filters}: the cube is mostly nodata. Lower "
                "num_filters, or embed a cube with more valid pixels."
            )
        rng = np.random.default_rng(self.seed)
        pick = rng.choice(n_idx.size, size=min(wanted, n_idx.size), replace=False)
        xs = x.numpy()
        dr, dc = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
        patches = xs[
            n_idx[pick][:, None, None, None],
            np.arange(xs.shape[1])[None, :, None, None],
            r_idx[pick][:, None, None, None] + dr[None, None],
            c_idx[pick][:, None, None, None] + dc[None, None],
        ].reshape(pick.size, -1)  # [P, C*k*k] float64
        mu = patches.mean(axis=0)
        if self.whiten:
            cov = np.cov(patches - mu, rowvar=False)
            evals, evecs = np.linalg.eigh(cov)
            eps = 1e-2 * max(float(evals.mean()), 1e-12)
            zca = (evecs / np.sqrt(np.clip(evals, 0.0, None) + eps)) @ evecs.T
        else:
            zca = np.eye(patches.shape[1])
        filters = (patches[: self.num_filters] - mu) @ zca  # whitened patches
        # <filter, zca (q - mu)> == <zca filter, q> - <zca filter, mu>: fold whitening in.
        kernels = filters @ zca
        offsets = -(kernels @ mu)
        c = len(spec.bands)
        self._kernels = kernels.reshape(self.num_filters, c, k, k).astype(np.float32)
        self._offsets = offsets.astype(np.float32)
        log.info(
            "rcf: fitted %d filters on %d patches from %d chips",
            self.num_filters,
            pick.size,
            len(chips),
        )

    # -- persistence -------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save fitted filters, normalisation and settings (``torch.save``, weights-only safe)."""
        import torch

        if self._kernels is None or self._offsets is None or self._norm is None:
            raise ModelError("fit the encoder (embed a cube, or prepare()) before saving it.")
        payload = {
            "format": FORMAT,
            "settings": self._settings(),
            "normalization": self._norm.to_dict(),
            "normalization_source": self._norm.source,
            "wavelengths": dict(self._wavelengths),
            "gsd": self._gsd,
            "kernels": torch.from_numpy(self._kernels),
            "offsets": torch.from_numpy(self._offsets),
        }
        out = Path(path)
        torch.save(payload, out)
        return out

    @classmethod
    def check_checkpoint(cls, path: str | os.PathLike[str]) -> None:
        """Refuse a file :meth:`from_checkpoint` could not load (fitted filters are small:
        checking is loading)."""
        cls.from_checkpoint(path)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> RCFEncoder:
        """Load filters saved by :meth:`save` (a path or a URL); embeddings of any cube
        are then comparable."""
        import torch

        from xclay.models.checkpoints import file_sha256, read_torch_file
        from xclay.storage.cache import local_checkpoint

        file = local_checkpoint(path)  # a URL's cached copy
        payload = read_torch_file(file, model="rcf")
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(
                f"{file} is not an rcf checkpoint (expected format {FORMAT!r}); save one with "
                "RCFEncoder.save(), or omit checkpoint= to fit filters on the cube."
            )
        enc = cls(**payload["settings"])
        kernels, offsets = payload["kernels"], payload["offsets"]
        if not isinstance(kernels, torch.Tensor) or not isinstance(offsets, torch.Tensor):
            raise CheckpointError(f"{file}: kernels/offsets are not tensors; the file is damaged.")
        enc._set_fitted(
            kernels.numpy(),
            offsets.numpy(),
            Normalization.from_dict(payload["normalization"], payload["normalization_source"]),
            payload["wavelengths"],
            payload["gsd"],
        )
        enc._checkpoint = (file.name, file_sha256(file))
        return enc

    @classmethod
    def from_card(
        cls,
        card: ModelCard | Mapping[str, Any],
        *,
        checkpoint: str | os.PathLike[str] | None = None,
    ) -> RCFEncoder:
        """Rebuild the exact encoder that produced an embedding set from its model card
        (the filters are in the card; ``checkpoint`` is not needed)."""
        card = card if isinstance(card, ModelCard) else ModelCard.from_dict(dict(card))
        if card.name != "rcf" or "filters" not in card.params:
            raise ModelError("this model card is not a fitted rcf encoder's.")
        p = card.params
        enc = cls(
            num_filters=p["num_filters"],
            kernel_size=p["kernel_size"],
            bias=p["bias"],
            seed=p["seed"],
            sample_chips=p["sample_chips"],
            whiten=p["whiten"],
        )
        enc._set_fitted(
            _decode_array(p["filters"]),
            _decode_array(p["offsets"]),
            Normalization.from_dict(card.normalization, card.normalization_source),
            card.wavelengths,
            card.gsd,
        )
        if card.checkpoint and card.checkpoint_sha256:
            enc._checkpoint = (card.checkpoint, card.checkpoint_sha256)
        return enc

    def _set_fitted(
        self,
        kernels: np.ndarray,
        offsets: np.ndarray,
        norm: Normalization,
        wavelengths: Mapping[str, float],
        gsd: float | None,
    ) -> None:
        k = self.kernel_size
        if kernels.ndim != 4 or kernels.shape[0] != self.num_filters or kernels.shape[2:] != (k, k):
            raise CheckpointError(
                f"rcf filters have shape {kernels.shape}, expected ({self.num_filters}, C, {k}, {k})."
            )
        if offsets.shape != (self.num_filters,):
            raise CheckpointError(
                f"rcf offsets have shape {offsets.shape}, expected ({self.num_filters},)."
            )
        if kernels.shape[1] != len(norm.bands):
            raise CheckpointError("rcf filters and normalisation disagree on the number of bands.")
        self._kernels = np.ascontiguousarray(kernels, dtype=np.float32)
        self._offsets = np.ascontiguousarray(offsets, dtype=np.float32)
        self._norm = norm
        self._wavelengths = {str(b): float(w) for b, w in wavelengths.items()}
        self._gsd = None if gsd is None else float(gsd)


def _encode_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {
        "dtype": "<f4",
        "shape": list(a.shape),
        "base64": base64.b64encode(a.tobytes()).decode(),
    }


def _decode_array(d: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["base64"])
    return np.frombuffer(raw, dtype=d["dtype"]).reshape(d["shape"]).astype(np.float32)
