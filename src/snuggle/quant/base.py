"""What every frozen quantized weight (NF4, FP8) offers the modules that multiply by it.

A quantized weight is a module set in place of a linear layer's `weight` Parameter. Code that multiplies
by a frozen weight goes through the functions here, which take a plain tensor or a quantized weight:

    frozen_linear(x, W, b)   x W^T + b with autograd (the reference modules)
    frozen_mm(x2, W, acc)    acc + x2 W^T, no autograd (the fused LoRA Functions' forward)
    frozen_mm_t(g2, W, acc)  acc + g2 W, no autograd (their input gradient)
    as_dense(W, dtype)       the dense weight (merges, exports)

A format that only stores compactly (NF4) dequantizes into a temporary of the activation dtype for each
product; a format with its own GEMMs (FP8) overrides `linear`, `mm` and `mm_t`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QuantizedWeight", "as_dense", "frozen_linear", "frozen_mm", "frozen_mm_t", "accumulates"]


class QuantizedWeight(nn.Module):
    """A frozen (out, in) weight in a compact format; subclasses define `shape` and `dequantize`.

    `dtype` is the 16-bit (or fp32) dtype the weight stands for: merges and exports write it.
    `accumulates`: whether its GEMMs can add onto an existing output in place (beta = 1), as cuBLAS's
    dense GEMMs do; FP8's scaled GEMM writes a new output and cannot.
    """

    dtype: torch.dtype
    accumulates = True

    @property
    def shape(self) -> torch.Size:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), bias)

    def mm(self, x2: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        w = self.dequantize(x2.dtype)  # (out, in), freed on return
        return x2 @ w.t() if acc is None else acc.addmm_(x2, w.t())

    def mm_t(self, g2: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        w = self.dequantize(g2.dtype)
        return g2 @ w if acc is None else acc.addmm_(g2, w)


Weight = torch.Tensor | QuantizedWeight


def as_dense(weight: Weight, dtype: torch.dtype) -> torch.Tensor:
    """A plain or quantized weight as a dense tensor of `dtype` (a no-op cast when a plain one already is)."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight.to(dtype)


def frozen_linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T + b, (..., out), in x's dtype, differentiable in x (and b)."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    return F.linear(x, weight.to(x.dtype), bias)


def frozen_mm(x2: torch.Tensor, weight: Weight, acc: torch.Tensor | None = None) -> torch.Tensor:
    """x2 W^T (n, out) from x2 (n, in), added onto `acc` in place when given."""
    if isinstance(weight, QuantizedWeight):
        return weight.mm(x2, acc)
    w = weight.to(x2.dtype)  # a no-op when stored in the activation dtype
    return x2 @ w.t() if acc is None else acc.addmm_(x2, w.t())


def frozen_mm_t(g2: torch.Tensor, weight: Weight, acc: torch.Tensor | None = None) -> torch.Tensor:
    """g2 W (n, in) from g2 (n, out): the input gradient, added onto `acc` in place when given."""
    if isinstance(weight, QuantizedWeight):
        return weight.mm_t(g2, acc)
    w = weight.to(g2.dtype)
    return g2 @ w if acc is None else acc.addmm_(g2, w)


def accumulates(weight: Weight) -> bool:
    """Whether products with `weight` can be accumulated onto an output by the GEMM itself (beta = 1)."""
    return not isinstance(weight, QuantizedWeight) or weight.accumulates
