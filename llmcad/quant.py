"""Compute precisions: fp32 (the exact reference) and int8.

int8 stores every linear weight as int8 with one fp32 scale per output channel. At run
time each activation row is quantized to int8 with its own scale (symmetric, per token),
multiplied in integers (`torch._int_mm`, exact int32 accumulation) and rescaled. Every
step of that is per row, so a row's result does not depend on the other rows in the pass:
verifying a token tree in one pass gives bit for bit what one-token-at-a-time decoding
gives, and speculation with an int8 target stays lossless.

On a 2-core AVX2 CPU, `_int_mm` against the weight's transposed view takes 0.63 ms for a
1536x8960 matrix at one row (fp32: 1.22 ms) and 0.92 ms at 17 rows (fp32: 4.5 ms). The
weights are plain int8 tensors, so a layer streamed from storage is used as read, with no
per-pass packing (fbgemm's prepacking costs 114 ms for the same matrix).

The token embedding keeps the same int8 rows and scales and dequantizes only the rows a
step looks up.
"""

from __future__ import annotations

import torch
from torch import nn

PRECISIONS = ("fp32", "int8")


def quantize_rows(weight: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight ~= q * scale[:, None]. Works `chunk` rows at a time so
    a 150k-row embedding needs no full-size temporaries."""
    scale = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1).clamp(min=1e-12) / 127.0
    q = torch.empty(weight.shape, dtype=torch.int8)
    for i in range(0, weight.shape[0], chunk):
        rows = slice(i, i + chunk)
        q[rows] = torch.round(weight[rows] / scale[rows, None]).clamp_(-127, 127)
    return q, scale.float()


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp32 times int8 `weight` [N, K] (per-row `scale` [N]) -> [M, N] fp32.
    Activations are quantized per row, so each output row depends only on its input row."""
    x_scale = x.abs().amax(-1, keepdim=True).clamp_(min=1e-12) / 127.0
    xq = torch.round(x / x_scale).to(torch.int8)
    return torch._int_mm(xq, weight.t()).float().mul_(x_scale * scale)


class Int8Linear(nn.Module):
    """y = x W^T + b with W as per-channel int8 (`weight` int8 [out, in], `scale` fp32 [out])."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.scale, self.bias = weight, scale, bias
        self.out_features, self.in_features = weight.shape

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        q, scale = quantize_rows(weight.float())
        return cls(q, scale, None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = int8_matmul(x.reshape(-1, shape[-1]), self.weight, self.scale)
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)


class Int8Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.weight, self.scale = weight, scale

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Embedding:
        return cls(*quantize_rows(weight.float()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].float() * self.scale[ids, None]


def tied_head(embedding: nn.Module) -> nn.Module:
    """An output head that shares `embedding`'s matrix (and int8 scales): no second copy."""
    if isinstance(embedding, Int8Embedding):
        return Int8Linear(embedding.weight, embedding.scale)
    head = nn.Linear(embedding.weight.shape[1], embedding.weight.shape[0], bias=False)
    head.weight = embedding.weight
    return head


def to_precision(module: nn.Module, precision: str) -> nn.Module:
    """The module in the compute precision: fp32 as is, int8 for Linear and Embedding."""
    if precision == "fp32":
        return module
    if isinstance(module, nn.Linear):
        return Int8Linear.quantize(module.weight.data, None if module.bias is None else module.bias.data)
    if isinstance(module, nn.Embedding):
        return Int8Embedding.quantize(module.weight.data)
    return module


def convert_submodule(model: nn.Module, name: str, precision: str) -> None:
    """Replace `model`'s submodule `name` by its version in `precision`, if that differs."""
    module = model.get_submodule(name)
    converted = to_precision(module, precision)
    if converted is not module:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, converted)
