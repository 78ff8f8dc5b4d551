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
from snuggle.kernels.reference import swiglu

__all__ = ["SwiGLUFunction", "fast_swiglu"]

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
        dy = dy.contiguous()
        if ctx.reuse:
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
