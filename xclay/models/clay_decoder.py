"""The Clay v1.5 MAE decoder, and the per-chip reconstruction loss it gives
(../shared/specs/clay-v1.5-encoder.md, decoder section).

The loss of a chip: mask 75 % of its patches, encode the rest, let the
decoder reconstruct every patch, and average the L1 error over the masked
patches of the normalised chip. A high loss flags what the model finds
unfamiliar: novel land cover, artefacts, inputs unlike its training data.

Reproducible masking: the permutation of a chip's L patches is
``argsort(splitmix64(s, k) for k in 0..L-1)`` (stable), where ``s`` is the
first 8 bytes (little-endian) of ``sha256("{seed}/{chip_id}/{time}")``,
``time`` the chip's time as ISO 8601 to the second (``NaT`` when unknown),
and ``splitmix64(s, k)`` the ``k``-th output of SplitMix64 seeded with ``s``.
The first ``int(0.75 L)`` indices are masked. Any chip's mask, hence its
loss, depends only on the seed, the chip and the weights: not on the batch,
the region or the machine.

``ClayDecoder.state_dict()`` has exactly the checkpoint's ``model.decoder.*``
keys (prefix stripped).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xclay.models.clay_encoder import (
    KERNEL_SCALE,
    META_DIMS,
    WAVE_DIM,
    FCBlock,
    Transformer,
    WeightGenerator,
    posemb_2d_gsd,
    token_encoding,
    wave_encoding,
)

__all__ = [
    "MASK_RATIO",
    "ClayDecoder",
    "DecoderSize",
    "chip_seeds",
    "mask_permutations",
    "reconstruction_loss",
]

MASK_RATIO = 0.75  # Clay's training mask ratio
MASK_RULE = (
    "permutation = stable argsort of SplitMix64(s) outputs k = 0..L-1, s = first 8 bytes "
    "(little-endian) of sha256('{seed}/{chip_id}/{time ISO 8601 to the second, NaT if unknown}'); "
    "the first int(0.75 L) patches are masked"
)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class DecoderSize:
    """Hyper-parameters of a Clay decoder; the defaults are v1.5's (512, 4, 4, 64, 4).

    Attributes
    ----------
    dim
        Width of the decoder's tokens.
    depth
        Number of transformer blocks.
    heads
        Attention heads per block (not stored in a state dict).
    dim_head
        Width of each attention head.
    mlp_ratio
        Hidden width of each block's MLP, as a multiple of ``dim``.
    """

    dim: int = 512
    depth: int = 4
    heads: int = 4
    dim_head: int = 64
    mlp_ratio: float = 4

    @classmethod
    def of_state_dict(cls, state: Mapping[str, torch.Tensor], *, heads: int = 4) -> DecoderSize:
        """Read the size off a decoder state dict (the head count is not stored: ``heads``)."""
        dim = int(state["mask_patch"].shape[0])
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("transformer.layers."))
        inner = int(state["transformer.layers.0.0.to_qkv.weight"].shape[0]) // 3
        hidden = int(state["transformer.layers.0.1.net.1.weight"].shape[0])
        if inner % heads:
            raise ValueError(f"decoder attention width {inner} is not divisible by {heads} heads.")
        return cls(dim, depth, heads, inner // heads, hidden / dim)


class PixelHead(nn.Module):
    """``embed_to_pixels``: a wave-conditioned generator of the token -> pixels projection."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.dim = dim
        self.fclayer = FCBlock(WAVE_DIM)
        self.weight_generator = WeightGenerator(patch_size, dim, with_bias=False)

    def projection(self, waves: torch.Tensor) -> torch.Tensor:
        """``[C * p * p, dim]`` (x0.02): rows in (band, kernel row, kernel column) order."""
        weights, _ = self.weight_generator(self.fclayer(wave_encoding(waves)))
        result: torch.Tensor = weights.reshape(-1, self.dim) * KERNEL_SCALE
        return result


class ClayDecoder(nn.Module):
    """The Clay MAE decoder: encoder tokens of the unmasked patches -> pixels of every patch.

    Parameters
    ----------
    encoder_dim
        Width of the encoder's tokens (1024 for Clay v1.5); when it differs from
        ``size.dim`` a linear layer projects them to the decoder's width.
    size
        The decoder's hyper-parameters (:class:`DecoderSize`, e.g. read off a
        checkpoint with :meth:`DecoderSize.of_state_dict`).
    patch_size
        Patch edge in pixels; default 8, Clay v1.5's.
    """

    def __init__(self, encoder_dim: int, size: DecoderSize, patch_size: int = 8) -> None:
        super().__init__()
        self.size = size
        self.patch_size = patch_size
        self.enc_to_dec: nn.Module = (
            nn.Linear(encoder_dim, size.dim) if encoder_dim != size.dim else nn.Identity()
        )
        self.mask_patch = nn.Parameter(torch.randn(size.dim) * 0.02)
        self.transformer = Transformer(
            size.dim, size.depth, size.heads, size.dim_head, int(size.dim * size.mlp_ratio)
        )
        self.embed_to_pixels = PixelHead(patch_size, size.dim)

    def forward(
        self,
        encoded: torch.Tensor,
        unmasked: torch.Tensor,
        masked: torch.Tensor,
        time: torch.Tensor,
        latlon: torch.Tensor,
        position: torch.Tensor,
        projection: torch.Tensor,
    ) -> torch.Tensor:
        """Reconstructed pixels ``[B, L, C * p * p]`` of every patch, in grid order.

        Parameters
        ----------
        encoded
            ``[B, 1 + Lu, encoder dim]``: the encoder's CLS and unmasked tokens.
        unmasked, masked
            ``[B, Lu]``, ``[B, Lm]`` (long): grid positions of the encoded and the masked patches.
        time, latlon
            ``[B, 4]`` each, as given to the encoder.
        position
            ``[L, dim - 8]``: :func:`posemb_2d_gsd` at the decoder's width.
        projection
            :meth:`PixelHead.projection` for the chip's bands.
        """
        x = self.enc_to_dec(encoded)
        cls, visible = x[:, :1], x[:, 1:]
        b, n_all, dim = visible.shape[0], position.shape[0], x.shape[-1]
        encoding = token_encoding(position, time, latlon).to(x.dtype)  # [B, L, dim]

        def at(idx: torch.Tensor) -> torch.Tensor:
            return torch.gather(encoding, 1, idx[..., None].expand(-1, -1, dim))

        tokens = x.new_empty((b, n_all, dim))
        tokens.scatter_(1, unmasked[..., None].expand(-1, -1, dim), visible + at(unmasked))
        hidden = self.mask_patch.to(x.dtype).expand(b, masked.shape[1], dim) + at(masked)
        tokens.scatter_(1, masked[..., None].expand(-1, -1, dim), hidden)
        out = self.transformer(torch.cat([cls, tokens], dim=1))
        result: torch.Tensor = (out @ projection.to(out.dtype).T)[:, 1:]
        return result

    def prepare(
        self, waves: torch.Tensor, rows: int, cols: int, gsd: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixel projection and position encoding of a cube (compute once per cube)."""
        position = posemb_2d_gsd(rows, cols, self.size.dim - META_DIMS, gsd, waves.device)
        return self.embed_to_pixels.projection(waves), position


# --------------------------------------------------------------------------- masking


def chip_seeds(chip_ids: Sequence[str], times: np.ndarray, seed: int) -> np.ndarray:
    """``[B]`` uint64 seeds: the first 8 bytes (little-endian) of
    ``sha256("{seed}/{chip_id}/{time}")``.

    Parameters
    ----------
    chip_ids
        ``[B]`` chip ids, as strings (:mod:`xclay.batch.chips`).
    times
        ``[B]`` datetime64 times of the chips, written to the second as ISO 8601;
        ``NaT`` where unknown.
    seed
        The run's loss seed (:meth:`~xclay.models.clay.ClayV15.enable_loss`), the
        same for every chip.
    """
    out = np.empty(len(chip_ids), dtype=np.uint64)
    stamps = np.asarray(times, dtype="datetime64[s]")
    for k, (chip, t) in enumerate(zip(chip_ids, stamps, strict=True)):
        key = f"{seed}/{chip}/{'NaT' if np.isnat(t) else np.datetime_as_string(t, unit='s')}"
        out[k] = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return out


def splitmix64(seeds: np.ndarray, n: int) -> np.ndarray:
    """``[B, n]``: the first ``n`` outputs of SplitMix64 for each uint64 seed."""
    k = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.asarray(seeds, dtype=np.uint64)[:, None] + k[None, :] * _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
    result: np.ndarray = z ^ (z >> np.uint64(31))
    return result


def mask_permutations(seeds: np.ndarray, n_patches: int) -> tuple[np.ndarray, np.ndarray]:
    """Masked and unmasked patch indices ``([B, Lm], [B, Lu])`` of each chip (see module doc).

    Parameters
    ----------
    seeds
        ``[B]`` uint64 per-chip seeds, from :func:`chip_seeds`.
    n_patches
        ``L``, the patches of a chip: ``(H / p) * (W / p)``.

    Returns
    -------
    tuple of numpy.ndarray
        ``(masked, unmasked)``: int64 patch indices (row-major grid order), each row
        in its chip's permutation order; masked are the permutation's first
        ``Lm = int(0.75 L)``, unmasked the other ``Lu``.
    """
    order = np.argsort(splitmix64(seeds, n_patches), axis=1, kind="stable")
    n_masked = int(MASK_RATIO * n_patches)
    return order[:, :n_masked], order[:, n_masked:]


# --------------------------------------------------------------------------- loss


def count_loss_flops(size: str, chip_size: int, bands: int, decoder: DecoderSize) -> float:
    """Floating-point operations of one chip's loss: the masked encoder pass (a quarter
    of the patch tokens) and the decoder over every token, with its pixel head."""
    from xclay.models.clay_encoder import CLAY_SIZES, transformer_flops

    s = CLAY_SIZES[size]
    p = 8
    n_patches = (chip_size // p) ** 2
    kept = n_patches - int(MASK_RATIO * n_patches) + 1
    encoder = transformer_flops(
        kept, s.dim, s.depth, s.heads * s.dim_head, int(s.dim * s.mlp_ratio)
    )
    embed = 2.0 * n_patches * s.dim * bands * p * p
    d = decoder
    decode = transformer_flops(
        n_patches + 1, d.dim, d.depth, d.heads * d.dim_head, int(d.dim * d.mlp_ratio)
    )
    head = 2.0 * (n_patches + 1) * d.dim * bands * p * p
    return encoder + embed + decode + head


def patchify(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W] -> [B, L, C * p * p]``: patches row-major, each in (band, row, col) order."""
    b, c, h, w = pixels.shape
    x = pixels.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def reconstruction_loss(
    predicted: torch.Tensor,
    pixels: torch.Tensor,
    masked: torch.Tensor,
    patch_size: int,
    *,
    norm_pix_loss: bool = False,
) -> torch.Tensor:
    """``[B]``: mean over each chip's masked patches of the per-patch mean L1 error.

    Computed in float32.

    Parameters
    ----------
    predicted
        ``[B, L, C * p * p]``: the decoder's reconstruction of every patch, in grid order.
    pixels
        ``[B, C, H, W]``: the normalised chips the encoder saw (nodata pixels 0).
    masked
        ``[B, Lm]`` (long): grid indices of each chip's masked patches.
    patch_size
        ``p``, the patch edge in pixels.
    norm_pix_loss
        Standardise each target patch first (unbiased variance, + 1e-6), as the
        checkpoint's ``norm_pix_loss`` hyper-parameter says; default False: not.
    """
    target = patchify(pixels.to(torch.float32), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True, unbiased=True)
        target = (target - mean) / torch.sqrt(var + 1e-6)
    per_patch = F.l1_loss(predicted.to(torch.float32), target, reduction="none").mean(dim=-1)
    return torch.gather(per_patch, 1, masked).mean(dim=1)
