"""SwiGLU, silu(gate) * up, with a backward that recomputes silu and reuses the input buffers.

Forward saves only gate and up (the output is not needed). Backward recomputes sigmoid(gate) and writes
d(gate) and d(up) over gate and up themselves: after backward those activations are dead, so the two
intermediate-sized gradients cost no new memory (the MLP's largest activations on long sequences).

Rounding follows the reference: silu(gate) is rounded to the activation dtype before the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snuggle.kernels._utils import patch_interpreter, use_triton
from snuggle.kernels.lora import fusable, lora_input_grad, lora_output, lora_param_grads
from snuggle.kernels.reference import swiglu
from snuggle.quant.base import QuantizedWeight

__all__ = [
    "SwiGLUFunction",
    "SwiGLUDownFunction",
    "swiglu_down_forward",
    "swiglu_down_grads",
    "fast_swiglu",
    "fast_act_down",
]

patch_interpreter()

_BLOCK = 1024  # elements a program; 4 warps x 32 threads x 8 values


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: n may pass 2^31
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    ty = Y.dtype.element_ty
    silu = (g * tl.sigmoid(g)).to(ty).to(tl.float32)
    tl.store(Y + offs, (silu * u).to(ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    du = dy * silu.to(G.dtype.element_ty).to(tl.float32)
    # d silu / dg = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    # DG, DU may be G, U: every element is loaded above before it is overwritten here
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u contiguous, same shape and dtype -> silu(g) * u."""
    y = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](g, u, y, n, BLOCK=_BLOCK, num_warps=4)
    return y


def swiglu_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, dg: torch.Tensor, du: torch.Tensor):
    """Writes d(gate) into dg and d(up) into du (they may be g and u); all contiguous, same shape."""
    n = g.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, g, u, dg, du, n, BLOCK=_BLOCK, num_warps=4)


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        g, u = g.contiguous(), u.contiguous()  # no-ops for projection outputs
        # a leaf's storage is the user's tensor: its gradient must not overwrite it
        ctx.reuse = not (g.is_leaf or u.is_leaf)
        ctx.save_for_backward(g, u)
        return swiglu_forward(g, u)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u = ctx.saved_tensors
        return swiglu_grads(dy.contiguous(), g, u, ctx.reuse)


def swiglu_grads(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor, reuse: bool):
    """(d gate, d up), written over gate and up themselves when `reuse` (they are dead after this)."""
    if reuse:
        swiglu_backward(dy, g, u, g, u)
        # the raw write bumps no version counter: do it, so anything else that saved gate/up (or a
        # second backward through this graph) raises instead of silently reading gradients
        torch.autograd.graph.increment_version(g)
        torch.autograd.graph.increment_version(u)
        return g, u
    dg, du = torch.empty_like(g), torch.empty_like(u)
    swiglu_backward(dy, g, u, dg, du)
    return dg, du


def fast_swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Drop-in for `decoder.swiglu`: silu(gate) * up, same shapes and dtype."""
    if not use_triton(gate) or gate.shape != up.shape or gate.dtype != up.dtype:
        return swiglu(gate, up)  # broadcasting or mixed dtypes: not the MLP's case, leave it to torch
    return SwiGLUFunction.apply(gate, up)


class SwiGLUDownFunction(torch.autograd.Function):
    """y = down(silu(gate) * up) for a LoRA down projection, keeping gate and up but not their product.

    The product h (n, intermediate) is the largest activation a block would keep for backward: 3.5 x
    the hidden size for Llama-3 8B, 112 MiB a block at 4096 tokens. Backward makes it again from gate
    and up (one elementwise pass) for the down projection's dA, then writes d(gate), d(up) over gate
    and up as `SwiGLUFunction` does. Products as `kernels.lora.LoRALinearFunction`.
    """

    @staticmethod
    def forward(ctx, g, u, weight, bias, lora_A, lora_B, scale: float):
        g, u = g.contiguous(), u.contiguous()
        y, xa = swiglu_down_forward(g, u, weight, bias, lora_A, lora_B, scale)
        ctx.scale, ctx.reuse = scale, not (g.is_leaf or u.is_leaf)
        ctx.nf4 = weight if isinstance(weight, QuantizedWeight) else None
        ctx.save_for_backward(g, u, xa, None if ctx.nf4 is not None else weight, lora_A, lora_B, bias)
        return y.view(*g.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g, u, xa, weight, lora_A, lora_B, bias = ctx.saved_tensors
        if ctx.nf4 is not None:
            weight = ctx.nf4
        dy2 = dy.reshape(-1, dy.shape[-1])  # (n, out)
        need = ctx.needs_input_grad[:6]
        grads = swiglu_down_grads(dy2, g, u, xa, weight, bias, lora_A, lora_B, ctx.scale, need, ctx.reuse)
        return (*grads, None)


def swiglu_down_forward(g, u, weight, bias, lora_A, lora_B, scale: float):
    """`SwiGLUDownFunction`'s forward without autograd, g and u contiguous (n, f) or (..., f):
    (y (n, out), xa = h A^T (n, r)) with h = silu(g) * u made and freed here."""
    h = swiglu_forward(g, u).view(-1, g.shape[-1])  # (n, f)
    xa = h @ lora_A.to(h.dtype).t()  # (n, r)
    y = lora_output(h, weight, bias, xa, lora_B, scale)  # (n, out)
    return y, xa


def swiglu_down_grads(dy2, g, u, xa, weight, bias, lora_A, lora_B, scale: float, need, reuse: bool):
    """(d gate, d up, dW, db, dA, dB) of y = down(silu(g) * u) from dy2 (n, out), None where `need` (six
    flags in that order) is False; d gate and d up are written over g and u when `reuse`."""
    need_g, need_u, need_w, need_b, need_a, need_bb = need
    gB = dy2 @ lora_B.to(dy2.dtype)  # (n, r)
    h = swiglu_forward(g, u).view(-1, g.shape[-1]) if (need_a or need_w) else None  # (n, f), again
    dw, db, dA, dB = lora_param_grads(
        dy2, gB, h, xa, weight, bias, lora_A, lora_B, scale, (need_w, need_b, need_a, need_bb)
    )
    del h  # before d(product) is made: the two never coexist
    dg = du = None
    if need_g or need_u:
        dh = lora_input_grad(dy2, weight, gB, lora_A, scale)  # (n, f)
        dg, du = swiglu_grads(dh.view(g.shape), g, u, reuse)
    return dg, du, dw, db, dA, dB


def fast_act_down(gate: torch.Tensor, up: torch.Tensor, act_fn, down) -> torch.Tensor:
    """Drop-in for `decoder.act_down`: down(act_fn(gate, up)), as one Function for SwiGLU and a LoRA down."""
    ok = (
        act_fn is fast_swiglu
        and fusable([down])
        and use_triton(gate)
        and gate.shape == up.shape
        and gate.dtype == up.dtype
    )
    if not ok:
        return down(act_fn(gate, up))
    return SwiGLUDownFunction.apply(gate, up, down.weight, down.bias, down.lora_A, down.lora_B, down.scale)
