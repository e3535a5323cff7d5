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

q4 cuts a transformer layer to 62% of int8's bytes (5 bits a weight), for a target streamed
from storage (fewer bytes per pass) or a draft that must fit beside it. Each linear weight
is 4-bit with a bf16 scale and offset per group of `Q4_GROUP` input columns, in the packed
layout of PyTorch's own CPU kernel (`_weight_int4pack_mm_for_cpu`), prepared when the model
is converted, so a layer read from storage is used as read. That kernel takes
bf16 activations and gives bf16 outputs (rounded back to fp32 here); its rows are
independent too (checked in the tests: same bits at any row count and thread count), so
q4 speculation is as exact as int8. It is as fast as int8 at one to four rows and about
six times slower at 32 (0.45 ms per row for a 1536x8960 matrix on one core): cheap reads,
dearer large trees. The embedding and output head stay int8 (rows are looked up one at a
time; the head sees every row of a tree).

gguf computes a GGUF model's own quantized blocks as they are (Q4_K, Q6_K, Q8_0, Q5_0, the
formats of a Q4_K_M file) with the native kernels of `llmcad.kernels`: converting such a
model requantizes nothing, its output head included (Q6_K: 190 MB for the 1.5B target,
against 233 MB in int8). A matrix of any other type, or a Hugging Face folder's, is
quantized to Q8_0. Rows are independent here too (the kernels' per-row bit identity), so
gguf speculation is exact. The embedding stays int8, as in q4.

q4_0 runs on the same kernels with every matrix in 4-bit blocks: a GGUF's Q4_K blocks are
kept, every other matrix (Q5_0, Q6_K, Q8_0 blocks, dequantized; or a folder's floats) is
requantized to Q4_0 (4.5 bits a weight) when the model is loaded or converted. It is the
default for a draft beside a gguf target: a draft's precision changes only its speed and
acceptance, never the output, and the default draft takes 279 MB instead of 393.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from llmcad import kernels

PRECISIONS = ("fp32", "int8", "q4", "gguf", "q4_0")
# the precisions the native kernels compute: the GGUF blocks each keeps as they are, and the
# format it quantizes any other matrix to
KEPT_BLOCKS = {"gguf": tuple(kernels.QTYPES), "q4_0": ("q4_k", "q4_0")}
BLOCKS_OF = {"gguf": "q8_0", "q4_0": "q4_0"}
Q4_GROUP = 32  # input columns sharing one 4-bit scale and offset (a Q4_K sub-block)


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
    return FloatLinear(embedding.weight)


def quantize_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric 4-bit: per group of Q4_GROUP columns, codes 0..15 with
    w ~= (code - 8) * scale + offset. Returns the kernel's packed codes (uint8 [N, K/2]) and
    bf16 scales and offsets [K/Q4_GROUP, N, 2].

    A group whose values already lie on an evenly spaced grid of at most 16 levels (a 4-bit
    GGUF source: Q4_K's sub-blocks are these groups of 32) keeps that grid, so converting
    such a model loses only the rounding of its scales to bf16; any other group spans its
    minimum to its maximum."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // Q4_GROUP, Q4_GROUP)
    ordered = groups.sort(-1).values
    low, span = ordered[..., 0], ordered[..., -1] - ordered[..., 0]
    gaps = ordered.diff(dim=-1)
    gaps = torch.where(gaps > span[..., None] * 1e-4, gaps, torch.inf)  # equal values are one level
    step = gaps.amin(-1)  # inf for a constant group: one level, spanned like any other
    multiples = gaps / step[..., None]
    on_grid = step.isfinite() & (span <= 15.001 * step) & ((multiples - multiples.round()).abs() < 1e-3).logical_or(gaps.isinf()).all(-1)
    scale = torch.where(on_grid, step, span / 15).clamp_(min=1e-8).bfloat16().float()  # codes are chosen for the stored values
    offset = (low + 8 * scale).bfloat16().float()
    codes = torch.round((groups - offset[..., None]) / scale[..., None] + 8).clamp_(0, 15).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(rows, cols), 1)
    return packed, torch.stack([scale.t(), offset.t()], -1).bfloat16().contiguous()


def q4_fits(weight: torch.Tensor) -> bool:
    """Whether the 4-bit kernel takes a matrix of this shape (rows in 16s, columns in groups)."""
    rows, cols = weight.shape
    return rows % 16 == 0 and cols % Q4_GROUP == 0


class Q4Linear(nn.Module):
    """y = x W^T + b with W in q4 (`qweight` packed codes, `qscales` bf16 scales and offsets)."""

    def __init__(self, qweight: torch.Tensor, qscales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.qweight, self.qscales, self.bias = qweight, qscales, bias
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, Q4_GROUP, self.qscales).float()
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)


@dataclass(frozen=True)
class QuantBlocks:
    """A matrix in GGUF's blocks as read from the file: `data` uint8 [rows, row bytes] of
    `qtype` (a `kernels.QTYPES` name), `cols` weights a row."""

    qtype: str
    data: torch.Tensor
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.data.shape[0], self.cols)


class QuantLinear(nn.Module):
    """y = x W^T + b with W in a GGUF block format packed for the native kernels (`blocks`
    uint8 [out, packed row bytes], from `kernels.pack`)."""

    def __init__(self, qtype: str, blocks: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.qtype, self.blocks, self.bias = qtype, blocks, bias
        self.out_features, self.in_features = blocks.shape[0], kernels.packed_cols(blocks, qtype)
        self.product = kernels.Product([(blocks, qtype)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.product(x.reshape(-1, shape[-1]))
        if self.bias is not None:
            y += self.bias
        return y.view(*shape[:-1], self.out_features)


class SharedInput:
    """Linear layers that take the same input (a layer's q, k and v; its gate and up), run as
    one native call where all are `QuantLinear`: the input is quantized once and the threads
    share out all their columns (same bits as one call each). Else each runs on its own. The
    call is prepared for the modules it last saw, and again when they change."""

    def __init__(self):
        self.linears: tuple[nn.Module, ...] = ()
        self.product: kernels.Product | None = None

    def __call__(self, x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
        if not all(isinstance(linear, QuantLinear) for linear in linears):
            return [linear(x) for linear in linears]
        if len(linears) != len(self.linears) or any(a is not b for a, b in zip(linears, self.linears)):
            self.linears, self.product = linears, kernels.Product([(linear.blocks, linear.qtype) for linear in linears])
        shape = x.shape
        outputs = self.product(x.reshape(-1, shape[-1])).view(*shape[:-1], self.product.width).split(self.product.widths, dim=-1)
        for y, linear in zip(outputs, linears):
            if linear.bias is not None:
                y += linear.bias
        return list(outputs)


def packed_blocks(weight: torch.Tensor | QuantBlocks, qtype: str, chunk: int = 8192) -> torch.Tensor:
    """A matrix in the native kernels' tiles of `qtype`, requantized from its own blocks
    (`kernels.pack(..., into=)`: q4_0 only) or quantized from floats (q8_0 by the `gguf`
    package, q4_0 by the native quantizer; both ggml's reference arithmetic) `chunk` rows at
    a time, so a 150k-row head needs no full-size float copy."""
    if isinstance(weight, QuantBlocks):
        return kernels.pack(weight.data, weight.qtype, weight.cols, into=qtype)
    rows, cols = weight.shape
    blocks = torch.empty(rows, kernels.row_bytes(qtype, cols), dtype=torch.uint8)
    for start in range(0, rows, chunk):
        dense = weight[start : start + chunk].float()
        if qtype == "q8_0":
            from gguf import GGMLQuantizationType
            from gguf.quants import quantize

            blocks[start : start + chunk] = torch.from_numpy(np.ascontiguousarray(quantize(dense.numpy(), GGMLQuantizationType.Q8_0)))
        else:
            blocks[start : start + chunk] = kernels.quantize(dense, qtype)
    return kernels.pack(blocks, qtype, cols)


def linear_tensors(weight: torch.Tensor | QuantBlocks, bias: torch.Tensor | None, precision: str) -> dict[str, torch.Tensor]:
    """A linear layer's tensors as stored in `precision` (names relative to the layer):
    fp32 `weight`; int8 `weight` + `scale`; q4 `qweight` + `qscales` (int8 where the 4-bit
    kernel does not take the shape); gguf and q4_0 blocks packed for the native kernels under
    their type's name (`q4_k`, ...): gguf a GGUF matrix's own blocks, q4_0 those in 4-bit
    blocks already (`KEPT_BLOCKS`); any other matrix requantized to `BLOCKS_OF[precision]`,
    or int8 where that does not take the shape; `bias` in fp32 when there is one. `weight`
    may be GGUF blocks (`QuantBlocks`)."""
    if isinstance(weight, QuantBlocks) and weight.qtype in KEPT_BLOCKS.get(precision, ()):
        out = {weight.qtype: kernels.pack(weight.data, weight.qtype, weight.cols)}
    elif precision in BLOCKS_OF and kernels.fits(qtype := BLOCKS_OF[precision], weight.shape[1]):
        out = {qtype: packed_blocks(weight, qtype)}
    else:
        out = _unpacked_linear_tensors(weight.float(), precision)
    if bias is not None:
        out["bias"] = bias.float()
    return out


def _unpacked_linear_tensors(weight: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    if precision == "q4" and q4_fits(weight):
        return dict(zip(("qweight", "qscales"), quantize_q4(weight)))
    if precision != "fp32":
        return dict(zip(("weight", "scale"), quantize_rows(weight)))
    return {"weight": weight}


def linear_from(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The linear layer over `tensors` as `linear_tensors` names them (used as they are: views
    into a streaming buffer stay views)."""
    bias = tensors.get("bias")
    qtype = next((name for name in tensors if name in kernels.QTYPES), None)
    if qtype is not None:
        return QuantLinear(qtype, tensors[qtype], bias)
    if "qweight" in tensors:
        return Q4Linear(tensors["qweight"], tensors["qscales"], bias)
    if "scale" in tensors:
        return Int8Linear(tensors["weight"], tensors["scale"], bias)
    return FloatLinear(tensors["weight"], bias)


class FloatLinear(nn.Module):
    """fp32 y = x W^T + b over tensors owned elsewhere."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def vocab_precision(precision: str) -> str:
    """The precision of the vocabulary matrices (embedding, output head): q4 keeps them
    int8; gguf and q4_0 keep the embedding int8 (an untied GGUF head is in their blocks)."""
    return "int8" if precision in ("q4", *BLOCKS_OF) else precision


def to_precision(module: nn.Module, precision: str) -> nn.Module:
    """The module in the compute precision: Linear and Embedding converted, others as they are."""
    if isinstance(module, nn.Linear) and precision != "fp32":
        return linear_from(linear_tensors(module.weight.data, None if module.bias is None else module.bias.data, precision))
    if isinstance(module, nn.Embedding) and vocab_precision(precision) == "int8":
        return Int8Embedding.quantize(module.weight.data)
    return module


def convert_submodule(model: nn.Module, name: str, precision: str) -> None:
    """Replace `model`'s submodule `name` by its version in `precision`, if that differs."""
    module = model.get_submodule(name)
    converted = to_precision(module, precision)
    if converted is not module:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, converted)
