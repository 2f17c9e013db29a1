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


def generated_weights(
    sd: dict[str, np.ndarray], pe: str, waves: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    """The wave-conditioned generator under prefix ``pe``: W [C, p*p*dim] and b (or None)."""
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
    if wg + "fc_bias.weight" not in sd:
        return w, None
    return w, linear(o[-1], sd[wg + "fc_bias.weight"], sd[wg + "fc_bias.bias"])


def patch_kernel(
    sd: dict[str, np.ndarray], waves: np.ndarray, dim: int, p: int
) -> tuple[np.ndarray, np.ndarray]:
    w, b = generated_weights(sd, "patch_embedding.", waves)
    assert b is not None
    c = waves.shape[0]
    kernel = np.zeros((dim, c, p, p))
    for ch in range(c):
        for d in range(dim):
            for i in range(p):
                for j in range(p):
                    kernel[d, ch, i, j] = 0.02 * w[ch, d * p * p + i * p + j]
    return kernel, b


def patchify(pixels: np.ndarray, p: int) -> np.ndarray:
    """[B, C, H, W] -> [B, L, C*p*p]: tokens row-major, each patch in (band, row, col) order."""
    b, c, h, w = pixels.shape
    rows, cols = h // p, w // p
    return (
        pixels.reshape(b, c, rows, p, cols, p)
        .transpose(0, 2, 4, 1, 3, 5)
        .reshape(b, rows * cols, c * p * p)
    )


def encodings(
    rows: int, cols: int, dim: int, gsd: float, time: np.ndarray, latlon: np.ndarray
) -> np.ndarray:
    """[B, L, dim]: 2-D position encoding (dim - 8) then the chip's time and latlon."""
    b = time.shape[0]
    meta = np.concatenate([time, latlon], axis=1)
    return np.concatenate(
        [
            np.broadcast_to(posemb(rows, cols, dim - 8, gsd), (b, rows * cols, dim - 8)),
            np.broadcast_to(meta[:, None, :], (b, rows * cols, 8)),
        ],
        axis=-1,
    )


def transformer(sd: dict[str, np.ndarray], x: np.ndarray, heads: int) -> np.ndarray:
    """Pre-norm blocks ``transformer.layers.i`` then ``transformer.norm``."""
    b = x.shape[0]
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
    keep: np.ndarray | None = None,
) -> np.ndarray:
    """[B, C, H, W] -> [B, 1 + L, dim] (or [B, 1 + Lu, dim] keeping the tokens ``keep`` [B, Lu])."""
    dim = sd["cls_token"].shape[-1]
    p = patch_size
    kernel, bias = patch_kernel(sd, waves, dim, p)
    b, _, h, w = pixels.shape
    tokens = patchify(pixels, p) @ kernel.reshape(dim, -1).T + bias
    tokens = tokens + encodings(h // p, w // p, dim, gsd, time, latlon)
    if keep is not None:
        tokens = np.stack([tokens[i, keep[i]] for i in range(b)])
    x = np.concatenate([np.broadcast_to(sd["cls_token"], (b, 1, dim)), tokens], axis=1)
    return transformer(sd, x, heads)


# --------------------------------------------------------------------------- the loss

_M64 = (1 << 64) - 1


def mask_order(seed: int, chip_id: str, time: str, n: int) -> list[int]:
    """The spec'd permutation: stable argsort of SplitMix64 outputs 1..n of the chip's seed."""
    import hashlib

    s = int.from_bytes(hashlib.sha256(f"{seed}/{chip_id}/{time}".encode()).digest()[:8], "little")
    keys = []
    for k in range(1, n + 1):
        z = (s + k * 0x9E3779B97F4A7C15) & _M64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        keys.append(z ^ (z >> 31))
    return sorted(range(n), key=lambda i: (keys[i], i))


def masked_loss(
    enc: dict[str, np.ndarray],
    dec: dict[str, np.ndarray],
    pixels: np.ndarray,
    time: np.ndarray,
    latlon: np.ndarray,
    gsd: float,
    waves: np.ndarray,
    orders: list[list[int]],
    *,
    enc_heads: int,
    dec_heads: int,
    norm_pix_loss: bool = False,
    patch_size: int = 8,
) -> np.ndarray:
    """[B] masked-reconstruction loss of normalised chips, each masked by its ``orders`` row."""
    b, c, h, w = pixels.shape
    p = patch_size
    n = (h // p) * (w // p)
    n_masked = int(0.75 * n)
    masked = np.array([o[:n_masked] for o in orders])
    unmasked = np.array([o[n_masked:] for o in orders])
    x = forward(enc, pixels, time, latlon, gsd, waves, heads=enc_heads, keep=unmasked)
    if "enc_to_dec.weight" in dec:
        x = linear(x, dec["enc_to_dec.weight"], dec["enc_to_dec.bias"])
    dim = x.shape[-1]
    enc_dec = encodings(h // p, w // p, dim, gsd, time, latlon)
    tokens = np.zeros((b, n, dim))
    for i in range(b):
        tokens[i, unmasked[i]] = x[i, 1:] + enc_dec[i, unmasked[i]]
        tokens[i, masked[i]] = dec["mask_patch"] + enc_dec[i, masked[i]]
    out = transformer(dec, np.concatenate([x[:, :1], tokens], axis=1), dec_heads)
    weights, _ = generated_weights(dec, "embed_to_pixels.", waves)
    predicted = (out @ (0.02 * weights.reshape(c * p * p, dim)).T)[:, 1:]
    target = patchify(pixels, p)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, ddof=1, keepdims=True)
        target = (target - mean) / np.sqrt(var + 1e-6)
    per_patch = np.abs(predicted - target).mean(axis=-1)
    return np.array([per_patch[i, masked[i]].mean() for i in range(b)])
