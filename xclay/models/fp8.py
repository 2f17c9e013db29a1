"""FP8 linear layers: e4m3 weights and activations with per-row scales, fp32 accumulation.

A linear layer ``y = x W^T + b`` becomes ``y = (q(x) s_x)(q(W) s_W)^T + b``: each row of
``x`` (a token) and of ``W`` (an output feature) is scaled so its largest magnitude maps to
e4m3's largest finite value (448), rounded to e4m3, and the product accumulated in fp32
(``torch._scaled_mm`` on FP8 tensor cores). Where the GPU cannot scale per row, one scale
per tensor is used. ``emulate=True`` computes exactly the same quantised operands and
multiplies them in fp32 on any device: the CPU twin the tests and accuracy checks run.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["E4M3_MAX", "FP8Linear", "convert_linears", "fp8_scaling", "quantize"]

E4M3_MAX = 448.0
Scaling = Literal["row", "tensor"]


def quantize(x: torch.Tensor, scaling: Scaling = "row") -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> (``float8_e4m3fn [M, K]``, fp32 scales ``[M, 1]`` (per row) or
    ``[1, 1]`` (per tensor)) with ``x ~ q * scale``; an all-zero row gets scale 1.

    Parameters
    ----------
    x
        ``[M, K]`` values of any float dtype (computed in fp32): a weight's rows
        (output features) or a layer's inputs (tokens).
    scaling
        ``"row"`` (default): one scale per row, mapping its largest magnitude to
        :data:`E4M3_MAX`; ``"tensor"``: one scale for the whole tensor.
    """
    values = x.float()
    amax = values.abs().amax(dim=-1, keepdim=True)
    if scaling == "tensor":
        amax = amax.amax(dim=0, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = (values / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


class FP8Linear(nn.Module):
    """A frozen :class:`torch.nn.Linear` in FP8 (inference only); outputs bf16.

    Parameters
    ----------
    linear
        The layer to convert: its weight is quantised to e4m3 (with its scales) and
        its bias, if any, kept in bf16. The layer itself is left unchanged.
    scaling
        ``"row"``: one scale per row of the weight and of each input (per output
        feature and per token); ``"tensor"``: one scale per tensor, for GPUs whose
        FP8 kernels cannot scale per row (see :func:`fp8_scaling`).
    emulate
        Multiply the same quantised operands in fp32 instead of on FP8 tensor cores:
        runs on any device, the CPU twin of the GPU product (slow).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, *, scaling: Scaling = "row", emulate: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scaling: Scaling = scaling
        self.emulate = emulate
        weight, scale = quantize(linear.weight.detach(), scaling)
        self.register_buffer("weight", weight)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale)  # [N, 1] or [1, 1]
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        q, scale = quantize(rows, self.scaling)
        if self.emulate:
            with torch.autocast(x.device.type, enabled=False):
                y = (q.float() @ self.weight.float().t()) * scale * self.weight_scale.t()
        else:
            y = _scaled_mm(q, self.weight, scale, self.weight_scale)
        y = y.to(torch.bfloat16)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "tensor cores"
        return f"{self.in_features} -> {self.out_features}, e4m3 per {self.scaling}, {mode}"


def _scaled_mm(
    q: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """FP8 tensor-core product, fp32 accumulation, bf16 out. The row count is padded to a
    multiple of 16 (the kernels' tile), the padding dropped after."""
    m = q.shape[0]
    pad = -m % 16
    if pad:
        q = torch.cat([q, q.new_zeros((pad, q.shape[1]))])
        if scale.shape[0] > 1:
            scale = torch.cat([scale, scale.new_ones((pad, 1))])
    out = torch._scaled_mm(
        q,
        weight.t(),  # column-major [K, N], as the kernels want
        scale_a=scale,
        scale_b=weight_scale.t(),
        out_dtype=torch.bfloat16,
    )
    return out[:m]


def fp8_scaling(device: torch.device) -> Scaling:
    """Per-row scales where this GPU's FP8 kernels take them (Hopper and newer), else one
    scale per tensor: decided by trying a small product, not from a version table.

    Parameters
    ----------
    device
        The device the FP8 layers will run on; a CUDA device is tried with a small
        product, any other gets ``"row"`` without a trial.
    """
    if device.type != "cuda":
        return "row"
    a, sa = quantize(torch.randn(32, 64, device=device), "row")
    b, sb = quantize(torch.randn(48, 64, device=device), "row")
    try:
        _scaled_mm(a, b, sa, sb)
    except (RuntimeError, NotImplementedError):
        return "tensor"
    return "row"


def convert_linears(module: nn.Module, *, scaling: Scaling, emulate: bool) -> int:
    """Replace every :class:`torch.nn.Linear` under ``module`` by an :class:`FP8Linear`
    (in place); returns how many were replaced.

    Parameters
    ----------
    module
        The module whose children are converted, at any depth (a ``Linear`` passed
        itself is not: only those under it).
    scaling, emulate
        Given to every :class:`FP8Linear`: ``"row"`` or ``"tensor"`` scales (see
        :func:`fp8_scaling`), and whether to multiply in fp32 instead of on FP8
        tensor cores.
    """
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear(child, scaling=scaling, emulate=emulate))
            count += 1
        else:
            count += convert_linears(child, scaling=scaling, emulate=emulate)
    return count
