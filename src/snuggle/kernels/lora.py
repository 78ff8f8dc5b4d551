"""LoRA projection y = x W^T + b + s (x A^T) B^T as one autograd Function with a lean backward.

Every product here is a GEMM that cuBLAS already runs at peak, so this module has no Triton kernel: what
it fuses is the autograd graph. Forward keeps only x (the caller's tensor, alive anyway) and
xa = x A^T (n, r, tiny) plus the parameters, and accumulates the low-rank update into the base output
in the same addmm call (no (n, out) temporary for it, no separate add). Backward works in low-rank
order, never forming an out x in matrix, and with no scaled copy of the (n, out) gradient:

    gB = g B                 (n, r)
    dB = s g^T xa            (out, r)
    dA = s gB^T x            (r, in)
    dx = g W + s gB A        (n, in), the LoRA term accumulated by the same addmm, not summed after

The frozen W gets no gradient unless it requires one (full fine-tuning through this module).
Dropout on the LoRA input would need the dropped x kept too; the fused path takes p = 0 only and
`FastLoRALinear` falls back to the reference forward when dropout is active.
"""

from __future__ import annotations

import torch
from torch import nn

from snuggle.kernels._utils import rebind
from snuggle.kernels.reference import LoRALinear
from snuggle.quant.nf4 import NF4Weight, as_dense

__all__ = ["LoRALinearFunction", "lora_linear", "FastLoRALinear"]


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float):
        dt = x.dtype
        x2 = x.reshape(-1, x.shape[-1])  # (n, in)
        xa = x2 @ lora_A.to(dt).t()  # (n, r)
        w = as_dense(weight, dt)  # (out, in); a no-op cast when stored in the activation dtype
        y = torch.addmm(bias.to(dt), x2, w.t()) if bias is not None else x2 @ w.t()  # (n, out)
        del w  # a dequantized 4-bit weight: freed now, made again in backward
        y.addmm_(xa, lora_B.to(dt).t(), alpha=scale)  # the low-rank update, accumulated in place
        ctx.scale = scale
        # an NF4Weight is a module, not a tensor: kept on ctx (its tensors live in the model anyway)
        ctx.nf4 = weight if isinstance(weight, NF4Weight) else None
        ctx.save_for_backward(x2, xa, None if ctx.nf4 is not None else weight, lora_A, lora_B, bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x2, xa, weight, lora_A, lora_B, bias = ctx.saved_tensors
        if ctx.nf4 is not None:
            weight = ctx.nf4
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        s, dt = ctx.scale, g.dtype
        g2 = g.reshape(-1, g.shape[-1])  # (n, out)
        gB = g2 @ lora_B.to(dt)  # (n, r)
        dx = dw = db = dA = dB = None
        if need_x:
            dx = g2 @ as_dense(weight, dt)  # (n, in)
            dx.addmm_(gB, lora_A.to(dt), alpha=s)
            dx = dx.view(*g.shape[:-1], dx.shape[-1])
        if need_a:
            dA = (gB.t() @ x2).to(lora_A.dtype).mul_(s)  # (r, in); scaled after the upcast
        if need_bb:
            dB = (g2.t() @ xa).to(lora_B.dtype).mul_(s)  # (out, r)
        if need_w:
            dw = (g2.t() @ x2).to(weight.dtype)  # (out, in): only when the base weight trains
        if need_b:
            db = g2.sum(0).to(bias.dtype)
        return dx, dw, db, dA, dB, None


def lora_linear(
    x: torch.Tensor,  # (..., in)
    weight: torch.Tensor,  # (out, in)
    bias: torch.Tensor | None,  # (out,)
    lora_A: torch.Tensor,  # (r, in)
    lora_B: torch.Tensor,  # (out, r)
    scale: float,
) -> torch.Tensor:
    """x W^T + b + scale (x A^T) B^T, weights cast to x's dtype; gradients as `reference.lora_linear`."""
    return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scale)


class FastLoRALinear(LoRALinear):
    """A `LoRALinear` (isinstance holds: merge and PEFT export see no difference) with the fused Function."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not isinstance(self.dropout, nn.Identity):
            return super().forward(x)  # active dropout: the reference path keeps the dropped input
        return LoRALinearFunction.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scale)

    @classmethod
    def from_module(cls, lora: LoRALinear) -> FastLoRALinear:
        """A FastLoRALinear sharing `lora`'s Parameters (same objects, names, order) and settings."""
        return rebind(cls, lora)
