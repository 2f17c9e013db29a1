"""The Clay v1.5 encoder as a ``torch.nn.Module`` (../shared/specs/clay-v1.5-encoder.md).

Its ``state_dict()`` has exactly the official encoder's keys and shapes (the
checkpoint's ``model.encoder.*`` with that prefix stripped), so the official
weights load with ``strict=True``. The arithmetic is the reference's, step by
step; where the reference assumes square chips (a sqrt(L) x sqrt(L) token
grid) this uses the true (H/p) x (W/p) grid, which is the same for squares.

Formulas are free functions so that tests can check each one on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CLAY_SIZES",
    "ClayEncoder",
    "ClaySize",
    "posemb_2d_gsd",
    "wave_encoding",
]

WAVE_DIM = 128  # wave embedding width, and the weight generator's d_model
NUM_LATENT_TOKENS = 128  # weight tokens of the weight generator
KERNEL_SCALE = 0.02  # the generated patch kernel is multiplied by this
META_DIMS = 8  # time (4) + latlon (4), added to the last 8 dims of every patch token


@dataclass(frozen=True)
class ClaySize:
    """Hyper-parameters of one Clay encoder size (see :data:`CLAY_SIZES`).

    Attributes
    ----------
    name
        The size's name: ``tiny``, ``small``, ``base`` or ``large`` (v1.5's).
    dim
        Width of the encoder's tokens (the embedding length).
    depth
        Number of transformer blocks.
    heads
        Attention heads per block.
    dim_head
        Width of each attention head.
    mlp_ratio
        Hidden width of each block's MLP, as a multiple of ``dim``.
    """

    name: str
    dim: int
    depth: int
    heads: int
    dim_head: int
    mlp_ratio: int


PATCH_SIZE = 8  # v1.5 embeds 8 x 8 pixel patches

CLAY_SIZES = {
    s.name: s
    for s in (
        ClaySize("tiny", 192, 6, 4, 48, 2),
        ClaySize("small", 384, 6, 6, 64, 2),
        ClaySize("base", 768, 12, 12, 64, 4),
        ClaySize("large", 1024, 24, 16, 64, 4),
    )
}


# --------------------------------------------------------------------------- formulas


def wave_encoding(waves: torch.Tensor, dim: int = WAVE_DIM) -> torch.Tensor:
    """1-D sin-cos encoding of wavelengths: ``[C] -> [C, dim]``.

    ``omega_k = 1 / 10000 ** (k / (dim/2 - 1))``; ``concat(sin(w omega), cos(w omega))``.

    Parameters
    ----------
    waves
        ``[C]`` central wavelength of each band, in the units Clay trained with
        (micrometres for optical sensors).
    dim
        Width of the encoding, even; default 128, the width of Clay's weight generator.

    Returns
    -------
    torch.Tensor
        ``[C, dim]`` float32, on the device of ``waves``.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=waves.device)
    omega = 1.0 / (10000.0 ** (k / (half - 1)))
    scaled = waves.to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def posemb_2d_gsd(
    rows: int, cols: int, dim: int, gsd: float, device: torch.device | None = None
) -> torch.Tensor:
    """2-D sin-cos position encoding scaled by the ground sample distance: ``[rows*cols, dim]``.

    ``omega_k = (1 / 10000 ** (2 * (k / (dim/4 - 1)) / dim)) * gsd``, k = 0..dim/4-1;
    token (r, c), row-major: ``concat(sin(c omega), cos(c omega), sin(r omega), cos(r omega))``.

    Parameters
    ----------
    rows, cols
        The token grid: ``H / p`` rows and ``W / p`` columns of patches.
    dim
        Width of the encoding, a multiple of 4: the model's width less the 8
        metadata dims (1016 for Clay v1.5's encoder, 504 for its decoder).
    gsd
        Ground sample distance in metres.
    device
        Where to build the float32 encoding; default ``None``: torch's default device.
    """
    if dim % 4:
        raise ValueError(f"the position encoding width {dim} must be divisible by 4.")
    quarter = dim // 4
    k = torch.arange(quarter, dtype=torch.float32, device=device)
    omega = 1.0 / (10000.0 ** (2.0 * (k / (quarter - 1)) / dim)) * float(gsd)
    r, c = torch.meshgrid(
        torch.arange(rows, dtype=torch.float32, device=device),
        torch.arange(cols, dtype=torch.float32, device=device),
        indexing="ij",
    )
    x = c.flatten()[:, None] * omega[None, :]
    y = r.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


# --------------------------------------------------------------------------- modules


class FCBlock(nn.Module):
    """``x + gelu(l2(gelu(l1(x))))`` on the wave encoding (``patch_embedding.fclayer``)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(size, size)
        self.l2 = nn.Linear(size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.l2(F.gelu(self.l1(x))))


class _LayerStack(nn.Module):
    """Layers applied in turn, kept in ``layers`` (state-dict keys ``layers.<i>.*``)."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class WeightGenerator(nn.Module):
    """Turns wave encodings into a patch kernel and bias (``patch_embedding.weight_generator``)."""

    def __init__(self, patch_size: int, out_dim: int, *, with_bias: bool = True) -> None:
        super().__init__()
        self.weight_tokens = nn.Parameter(torch.randn(NUM_LATENT_TOKENS, WAVE_DIM) * 0.02)
        self.bias_token = nn.Parameter(torch.randn(1, WAVE_DIM) * 0.02)
        # One post-norm layer, in a ModuleList so its keys are encoder.layers.0.*
        layer = nn.TransformerEncoderLayer(
            d_model=WAVE_DIM,
            nhead=4,
            dim_feedforward=2048,
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=1e-5,
            batch_first=True,
            norm_first=False,
        )
        self.encoder = _LayerStack([layer])
        self.fc_weight = nn.Linear(WAVE_DIM, patch_size * patch_size * out_dim)
        self.fc_bias = nn.Linear(WAVE_DIM, out_dim) if with_bias else None

    def forward(self, waves_encoded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[C, 128] -> (W [C, p*p*out_dim], b [out_dim] or None)``."""
        x = torch.cat([self.weight_tokens, waves_encoded, self.bias_token], dim=0)
        out = self.encoder(x)
        weights = self.fc_weight(out[NUM_LATENT_TOKENS:-1] + x[NUM_LATENT_TOKENS:-1])
        bias = self.fc_bias(out[-1]) if self.fc_bias is not None else None
        return weights, bias


class DynamicPatchEmbedding(nn.Module):
    """Wavelength-conditioned patch embedding (DOFA-style): any bands, any count."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.dim = dim
        self.fclayer = FCBlock(WAVE_DIM)
        self.weight_generator = WeightGenerator(patch_size, dim)

    def kernel(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv kernel ``[dim, C, p, p]`` (already x0.02) and bias ``[dim]`` for these wavelengths."""
        encoded = self.fclayer(wave_encoding(waves))
        weights, bias = self.weight_generator(encoded)
        assert bias is not None
        p, c = self.patch_size, waves.shape[0]
        # Each band's row of W is (dim, kernel row, kernel column), dim outermost.
        kernel = weights.reshape(c, self.dim, p, p).permute(1, 0, 2, 3) * KERNEL_SCALE
        return kernel, bias

    def forward(
        self, pixels: torch.Tensor, kernel: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """``[B, C, H, W] -> [B, (H/p)(W/p), dim]`` tokens, row-major."""
        out = F.conv2d(pixels, kernel, bias=bias, stride=self.patch_size)
        return out.flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Pre-norm multi-head self-attention without biases (``transformer.layers.i.0``)."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # scale dim_head ** -0.5
        result: torch.Tensor = self.to_out(out.transpose(1, 2).reshape(b, n, -1))
        return result


class FeedForward(nn.Module):
    """``LayerNorm -> Linear -> GELU (exact) -> Linear`` (``transformer.layers.i.1.net``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.net(x)
        return result


class Transformer(nn.Module):
    """Pre-norm blocks, then a final LayerNorm (``transformer``)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Attention(dim, heads, dim_head), FeedForward(dim, mlp_dim)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            attn, ff = block[0], block[1]  # type: ignore[index]
            x = x + attn(x)
            x = x + ff(x)
        result: torch.Tensor = self.norm(x)
        return result


class ClayEncoder(nn.Module):
    """The Clay v1.5 encoder.

    Parameters
    ----------
    dim, depth, heads, dim_head, mlp_ratio
        Transformer size (see :data:`CLAY_SIZES`; v1.5 is ``large``).
    patch_size
        Patch edge in pixels (8 for v1.5).
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 24,
        heads: int = 16,
        dim_head: int = 64,
        mlp_ratio: float = 4,
        patch_size: int = PATCH_SIZE,
    ) -> None:
        super().__init__()
        if (dim - META_DIMS) % 4:
            raise ValueError(f"dim - 8 must be divisible by 4 (position encoding), got dim={dim}.")
        self.dim = dim
        self.patch_size = patch_size
        # The precision the weights were turned into for inference (xclay.models.clay):
        # None while they are as loaded (fp32).
        self.converted_to: str | None = None
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.patch_embedding = DynamicPatchEmbedding(patch_size, dim)
        self.transformer = Transformer(dim, depth, heads, dim_head, int(dim * mlp_ratio))

    @classmethod
    def from_size(cls, size: str, patch_size: int = PATCH_SIZE) -> ClayEncoder:
        """An encoder of a named size (``tiny``, ``small``, ``base``, ``large``), random weights."""
        s = CLAY_SIZES[size]
        return cls(s.dim, s.depth, s.heads, s.dim_head, s.mlp_ratio, patch_size)

    def patch_kernel(self, waves: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The wave-conditioned patch kernel and bias: compute once per band set."""
        return self.patch_embedding.kernel(waves)

    def forward(
        self,
        *,
        pixels: torch.Tensor,
        time: torch.Tensor,
        latlon: torch.Tensor,
        gsd: float,
        waves: torch.Tensor,
    ) -> torch.Tensor:
        """``[B, 1 + L, dim]``: CLS token then the patch tokens, row-major.

        Parameters
        ----------
        pixels
            ``[B, C, H, W]`` normalised pixels; H and W multiples of the patch size.
        time
            ``[B, 4]`` ``[sin w, cos w, sin h, cos h]`` (zeros: unknown).
        latlon
            ``[B, 4]`` ``[sin lat, cos lat, sin lon, cos lon]``, latitude first (zeros: unknown).
        gsd
            Ground sample distance in metres.
        waves
            ``[C]`` central wavelengths.
        """
        kernel, bias = self.patch_kernel(waves)
        return self.forward_with_kernel(pixels, time, latlon, gsd, kernel, bias)

    def forward_with_kernel(
        self,
        pixels: torch.Tensor,
        time: torch.Tensor,
        latlon: torch.Tensor,
        gsd: float,
        kernel: torch.Tensor,
        bias: torch.Tensor,
        position: torch.Tensor | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:meth:`forward` with the patch kernel (and optionally the position encoding) given.

        ``keep`` ``[B, Lu]`` (long): the patch tokens the transformer sees, in
        that order, after their position and metadata encodings are added
        (the masked pass of the reconstruction loss); the output is then
        ``[B, 1 + Lu, dim]``.
        """
        b, _, h, w = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"chip of {h} x {w} px is not a multiple of the patch size {p}.")
        tokens = self.patch_embedding(pixels, kernel.to(pixels.dtype), bias.to(pixels.dtype))
        if position is None:
            position = posemb_2d_gsd(h // p, w // p, self.dim - META_DIMS, gsd, pixels.device)
        tokens = tokens + token_encoding(position, time, latlon).to(tokens.dtype)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
        x = torch.cat([self.cls_token.to(tokens.dtype).expand(b, -1, -1), tokens], dim=1)
        result: torch.Tensor = self.transformer(x)
        return result


def token_encoding(
    position: torch.Tensor, time: torch.Tensor, latlon: torch.Tensor
) -> torch.Tensor:
    """``[B, L, D' + 8]``: every token's position encoding ``[L, D']`` then its chip's
    ``concat(time, latlon)`` ``[B, 8]``."""
    b, n = time.shape[0], position.shape[0]
    meta = torch.cat([time, latlon], dim=1).to(position.dtype)
    return torch.cat([position.expand(b, -1, -1), meta[:, None, :].expand(-1, n, -1)], dim=-1)


def count_forward_flops(
    size: str, chip_size: int, bands: int, patch_size: int = PATCH_SIZE
) -> float:
    """Floating-point operations (2 x multiply-adds) of one forward on one chip."""
    s = CLAY_SIZES[size]
    tokens = (chip_size // patch_size) ** 2 + 1
    patch = (tokens - 1) * s.dim * bands * patch_size * patch_size
    inner, mlp = s.heads * s.dim_head, int(s.dim * s.mlp_ratio)
    return transformer_flops(tokens, s.dim, s.depth, inner, mlp) + 2.0 * patch


def transformer_flops(tokens: int, dim: int, depth: int, inner: int, mlp: int) -> float:
    """Floating-point operations of ``depth`` pre-norm blocks over ``tokens`` tokens."""
    per_layer = (
        tokens * (dim * 3 * inner + inner * dim + 2 * dim * mlp) + 2 * tokens * tokens * inner
    )
    return 2.0 * depth * per_layer
