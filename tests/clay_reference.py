"""The Clay v1.5 encoder computed in float64 NumPy, straight from the spec.

An independent reference for the tests: it shares no code with xclay (only
the state-dict arrays), and every step follows
../shared/specs/clay-v1.5-encoder.md literally.
"""

from __future__ import annotations

import math

import numpy as np

_erf = np.vectorize(math.erf)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU: 0.5 x (1 + erf(x / sqrt 2))."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    out = x @ w.T
    return out + b if b is not None else out


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """[..., n, d] heads: softmax(q k^T / sqrt d) v."""
    return softmax(q @ np.swapaxes(k, -1, -2) / math.sqrt(q.shape[-1])) @ v


def wave_encoding(waves: np.ndarray, dim: int = 128) -> np.ndarray:
    half = dim // 2
    omega = np.array([1.0 / 10000 ** (k / (half - 1)) for k in range(half)])
    s = waves[:, None] * omega[None, :]
    return np.concatenate([np.sin(s), np.cos(s)], axis=1)


def posemb(rows: int, cols: int, dim: int, gsd: float) -> np.ndarray:
    q = dim // 4
    omega = np.array([(1.0 / 10000 ** (2 * (k / (q - 1)) / dim)) * gsd for k in range(q)])
    out = np.zeros((rows * cols, dim))
    for r in range(rows):
        for c in range(cols):
            out[r * cols + c] = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
            )
    return out


def post_norm_layer(
    x: np.ndarray, sd: dict[str, np.ndarray], pre: str, heads: int = 4
) -> np.ndarray:
    """torch.nn.TransformerEncoderLayer(norm_first=False, gelu, no dropout) on one sequence [n, d]."""
    n, d = x.shape
    qkv = linear(x, sd[pre + "self_attn.in_proj_weight"], sd[pre + "self_attn.in_proj_bias"])
    q, k, v = (
        qkv[:, i * d : (i + 1) * d].reshape(n, heads, d // heads).transpose(1, 0, 2)
        for i in range(3)
    )
    a = attention(q, k, v).transpose(1, 0, 2).reshape(n, d)
    a = linear(a, sd[pre + "self_attn.out_proj.weight"], sd[pre + "self_attn.out_proj.bias"])
    x = layer_norm(x + a, sd[pre + "norm1.weight"], sd[pre + "norm1.bias"])
    f = linear(
        gelu(linear(x, sd[pre + "linear1.weight"], sd[pre + "linear1.bias"])),
        sd[pre + "linear2.weight"],
        sd[pre + "linear2.bias"],
    )
    return layer_norm(x + f, sd[pre + "norm2.weight"], sd[pre + "norm2.bias"])


def patch_kernel(
    sd: dict[str, np.ndarray], waves: np.ndarray, dim: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    pe = "patch_embedding."
    e = wave_encoding(waves)
    e = e + gelu(
        linear(
            gelu(linear(e, sd[pe + "fclayer.l1.weight"], sd[pe + "fclayer.l1.bias"])),
            sd[pe + "fclayer.l2.weight"],
            sd[pe + "fclayer.l2.bias"],
        )
    )
    wg = pe + "weight_generator."
    x = np.concatenate([sd[wg + "weight_tokens"], e, sd[wg + "bias_token"]], axis=0)
    o = post_norm_layer(x, sd, wg + "encoder.layers.0.")
    w = linear(o[128:-1] + x[128:-1], sd[wg + "fc_weight.weight"], sd[wg + "fc_weight.bias"])
    b = linear(o[-1], sd[wg + "fc_bias.weight"], sd[wg + "fc_bias.bias"])
    c = waves.shape[0]
    kernel = np.zeros((dim, c, p, p))
    for ch in range(c):
        for d in range(dim):
            for i in range(p):
                for j in range(p):
                    kernel[d, ch, i, j] = 0.02 * w[ch, d * p * p + i * p + j]
    return kernel, b


def forward(
    sd: dict[str, np.ndarray],
    pixels: np.ndarray,
    time: np.ndarray,
    latlon: np.ndarray,
    gsd: float,
    waves: np.ndarray,
    *,
    heads: int,
    patch_size: int = 8,
) -> np.ndarray:
    """[B, C, H, W] -> [B, 1 + L, dim], all float64."""
    dim = sd["cls_token"].shape[-1]
    p = patch_size
    kernel, bias = patch_kernel(sd, waves, dim, p)
    b, c, h, w = pixels.shape
    rows, cols = h // p, w // p
    # Patches flattened in (band, kernel row, kernel column) order, tokens row-major.
    patches = (
        pixels.reshape(b, c, rows, p, cols, p)
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(b, rows * cols, c * p * p)
    )
    tokens = patches @ kernel.reshape(dim, -1).T + bias
    meta = np.concatenate([time, latlon], axis=1)
    enc = np.concatenate(
        [
            np.broadcast_to(posemb(rows, cols, dim - 8, gsd), (b, rows * cols, dim - 8)),
            np.broadcast_to(meta[:, None, :], (b, rows * cols, 8)),
        ],
        axis=-1,
    )
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, dim)), tokens + enc], axis=1)
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers."))
    for i in range(depth):
        pre = f"transformer.layers.{i}."
        y = layer_norm(x, sd[pre + "0.norm.weight"], sd[pre + "0.norm.bias"])
        qkv = linear(y, sd[pre + "0.to_qkv.weight"])
        inner = qkv.shape[-1] // 3
        q, k, v = (
            qkv[..., j * inner : (j + 1) * inner]
            .reshape(b, -1, heads, inner // heads)
            .transpose(0, 2, 1, 3)
            for j in range(3)
        )
        a = attention(q, k, v).transpose(0, 2, 1, 3).reshape(b, -1, inner)
        x = x + linear(a, sd[pre + "0.to_out.weight"])
        y = layer_norm(x, sd[pre + "1.net.0.weight"], sd[pre + "1.net.0.bias"])
        x = x + linear(
            gelu(linear(y, sd[pre + "1.net.1.weight"], sd[pre + "1.net.1.bias"])),
            sd[pre + "1.net.3.weight"],
            sd[pre + "1.net.3.bias"],
        )
    return layer_norm(x, sd["transformer.norm.weight"], sd["transformer.norm.bias"])
