"""A LoRA MLP, down(silu(gate(x)) * up(x)), as one autograd Function that keeps only its input.

With the fast path an MLP keeps gate and up for backward, 2 x intermediate a token (224 MiB a block for
Llama-3 8B at 4096 tokens: 61% of what a block keeps once its SwiGLU product and norms are made again).
This Function keeps x (the block's residual stream, alive anyway), the norm's per-row statistics and
the low-rank products x A^T and h A_down^T (n x r each), and in backward makes gate and up again:
the norm, and the gate/up GEMMs (2 x hidden x intermediate a token, 54% of a block's forward GEMMs)
with the saved low-rank products, but not the down projection, whose output backward never needs.
Recomputing a whole block instead frees 368 MiB for one whole block forward (the attention too): this
frees 224 MiB for about half of that, so where memory is short it is the cheaper of the two per byte.

Backward then runs as the two Functions it replaces would: `swiglu.swiglu_down_grads` for the down
projection (writing d gate, d up over the recomputed gate and up) and `lora.group_grads` for gate/up
(the normalized input is at hand, so dA is formed from it rather than from x and the statistics).
Outputs equal `LoRAGroupFunction` followed by `SwiGLUDownFunction` exactly, and so do the gradients
without a norm; with one, dA differs from theirs by rounding only.
"""

from __future__ import annotations

import torch

from snuggle.kernels._utils import use_triton
from snuggle.kernels.lora import (
    apply_projections,
    fast_project,
    fusable,
    group_forward,
    group_grads,
    group_outputs,
    norm_fusable,
    save_projections,
    saved_projections,
)
from snuggle.kernels.rmsnorm import rmsnorm_forward
from snuggle.kernels.swiglu import fast_act_down, fast_swiglu, swiglu_down_forward, swiglu_down_grads

__all__ = ["LoRAMLPFunction", "fast_gate_up_down"]


class LoRAMLPFunction(torch.autograd.Function):
    """y = down(silu(gate(x')) * up(x')), x' = RMSNorm(x) with `norm_weight` (else x); `flat` holds
    (W, b, A, B) for gate, up and down, in that order (b may be None, W a `QuantizedWeight`)."""

    @staticmethod
    def forward(ctx, x, scales: tuple[float, float, float], norm_weight, eps: float, *flat):
        Ws, bs, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        x_in, _, rstd, xa, (g, u) = group_forward(
            x, norm_weight, eps, Ws[:2], bs[:2], As[:2], Bs[:2], scales[:2]
        )
        y, xa_down = swiglu_down_forward(g, u, Ws[2], bs[2], As[2], Bs[2], scales[2])
        del g, u  # the point of this Function: made again in backward
        ctx.scales, ctx.eps = scales, eps
        ctx.save_for_backward(x_in, rstd, norm_weight, xa, xa_down, *save_projections(ctx, Ws, bs, As, Bs))
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x_in, rstd, norm_weight, xa, xa_down, *rest = ctx.saved_tensors
        Ws, bs, As, Bs = saved_projections(ctx, rest)
        need = ctx.needs_input_grad[4:]  # per projection: W, b, A, B
        need_x, need_norm = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        scales = ctx.scales
        # gate and up again: the norm, then the base GEMMs onto the saved low-rank products
        x2 = x_in if norm_weight is None else rmsnorm_forward(x_in, norm_weight, ctx.eps)[0]
        g, u = group_outputs(x2, xa, Ws[:2], bs[:2], Bs[:2], scales[:2])  # (n, f) each
        dy2 = dy.reshape(-1, dy.shape[-1])  # (n, out)
        # g and u are this backward's own: their gradients are written over them
        dg, du, *down = swiglu_down_grads(
            dy2, g, u, xa_down, Ws[2], bs[2], As[2], Bs[2], scales[2], (True, True, *need[8:12]), True
        )
        del g, u
        dx, dnorm, gate_up = group_grads(
            [dg, du], x_in, x2, rstd, norm_weight, ctx.eps, xa, Ws[:2], bs[:2], As[:2], Bs[:2],
            scales[:2], need_x, need_norm, need[:8],
        )  # fmt: skip
        dx = None if dx is None else dx.view(*dy.shape[:-1], dx.shape[-1])
        return (dx, None, dnorm, None, *gate_up, *down)


def fast_gate_up_down(mods, x: torch.Tensor, act_fn, norm=None) -> torch.Tensor:
    """Drop-in for `decoder.gate_up_down`: down(act_fn(gate(x'), up(x'))), x' = norm(x) when a norm is
    given, as one Function (keeping only x) for SwiGLU between LoRA projections; otherwise the fast
    path's pieces one by one, which keep gate and up."""
    ok = act_fn is fast_swiglu and fusable(mods) and use_triton(x) and (norm is None or norm_fusable(norm))
    if not ok:
        gate, up = fast_project(mods[:2], x, norm)
        return fast_act_down(gate, up, act_fn, mods[2])
    return apply_projections(LoRAMLPFunction, mods, x, norm)
