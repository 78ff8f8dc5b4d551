"""LoRA projection y = x W^T + b + s (x A^T) B^T as one autograd Function with a lean backward.

Every product here is a GEMM that cuBLAS already runs at peak, so this module has no Triton kernel: what
it fuses is the autograd graph. Forward keeps only x (the caller's tensor, alive anyway) and
xa = x A^T (n, r, tiny) plus the parameters, and accumulates the low-rank update into the base output
in the same addmm call (no (n, out) temporary for it, no separate add). Backward works in low-rank
order, never forming an out x in matrix, and with no scaled copy of the (n, out) gradient:

    gB = g B                 (n, r)
    dB = s g^T xa            (out, r)
    dA = s gB^T x            (r, in)
    dx = s gB A + g W        (n, in), the dgrad accumulated onto the LoRA term by its own GEMM

The order of the two products into one output matters for the bytes moved: the rank-r product alone is
memory-bound (K = r), so it runs first and only writes its (n, out) result; the base GEMM, which is
compute-bound, then adds onto it (beta = 1), reading it in cuBLAS's epilogue while other tiles keep the
tensor cores busy. Base first and then `y += s xa B^T` would read and write the whole output once more
in a memory-bound kernel.

The frozen W gets no gradient unless it requires one (full fine-tuning through this module).
Dropout on the LoRA input would need the dropped x kept too; the fused path takes p = 0 only and
`FastLoRALinear` falls back to the reference forward when dropout is active.
"""

from __future__ import annotations

import torch
from torch import nn

from snuggle.kernels._utils import rebind, use_triton
from snuggle.kernels.reference import LoRALinear
from snuggle.kernels.rmsnorm import FastRMSNorm, _rows, rmsnorm_backward, rmsnorm_forward
from snuggle.quant.base import QuantizedWeight, accumulates, frozen_mm, frozen_mm_t

__all__ = [
    "LoRALinearFunction",
    "LoRAGroupFunction",
    "lora_linear",
    "low_rank",
    "lora_output",
    "lora_input_grad",
    "lora_param_grads",
    "factor_grad",
    "apply_projections",
    "group_forward",
    "group_outputs",
    "group_grads",
    "save_projections",
    "saved_projections",
    "FastLoRALinear",
    "fast_project",
    "fusable",
    "norm_fusable",
]


def low_rank(u: torch.Tensor, factor: torch.Tensor, scale: float, bias=None) -> torch.Tensor:
    """scale u factor (+ bias), a new (n, m) tensor from u (n, r) and factor (r, m): the first of two
    products into one output (see the module docstring), the scale applied inside the GEMM."""
    if bias is not None:
        return torch.addmm(bias, u, factor, alpha=scale)
    out = torch.empty(u.shape[0], factor.shape[1], dtype=u.dtype, device=u.device)
    return out.addmm_(u, factor, beta=0, alpha=scale)  # beta = 0: the empty buffer is never read


def lora_output(x2, weight, bias, xa, lora_B, scale: float) -> torch.Tensor:
    """x2 W^T + b + scale xa B^T, (n, out), in x2's dtype: the low-rank update (and bias) written first,
    then the base GEMM accumulated onto it in place (beta = 1, no (n, out) temporary). `xa` = x2 A^T is
    the caller's, so a group of projections can share one product for it. A base whose GEMM cannot
    accumulate (FP8) writes first and the low-rank update is added onto its output instead."""
    dt = x2.dtype
    if not accumulates(weight):
        y = frozen_mm(x2, weight)  # (n, out)
        y.addmm_(xa, lora_B.to(dt).t(), alpha=scale)
        return y if bias is None else y.add_(bias.to(dt))
    y = low_rank(xa, lora_B.to(dt).t(), scale, None if bias is None else bias.to(dt))  # (n, out)
    # a dequantized 4-bit weight lives only inside this call: made again in backward
    return frozen_mm(x2, weight, acc=y)


def lora_input_grad(g2, weight, gB, lora_A, scale: float) -> torch.Tensor:
    """dx = scale gB A + g W, (n, in); the dgrad accumulated onto the LoRA term by the same addmm (an FP8
    base's dgrad first, the LoRA term then added onto it)."""
    dt = g2.dtype
    if not accumulates(weight):
        return frozen_mm_t(g2, weight).addmm_(gB, lora_A.to(dt), alpha=scale)
    return frozen_mm_t(g2, weight, acc=low_rank(gB, lora_A.to(dt), scale))


def factor_grad(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """scale a @ b in `dtype`: a LoRA factor's gradient from 16-bit activations. On CUDA an fp32 factor
    gets it from one GEMM that accumulates and writes fp32 with the scale in its epilogue (out_dtype):
    never rounded to 16 bits, and no upcast or scaling pass after it (two small kernels a factor, ~900
    an 8B step). Elsewhere the product in the operands' dtype, upcast, then scaled."""
    half = a.dtype in (torch.bfloat16, torch.float16) and b.dtype == a.dtype
    if dtype == torch.float32 and a.is_cuda and half:
        out = torch.empty(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
        return torch.addmm(out, a, b, beta=0, alpha=scale, out_dtype=torch.float32)  # out is never read
    g = (a @ b).to(dtype)
    return g.mul_(scale) if scale != 1.0 else g  # scaled after the upcast


def lora_param_grads(g2, gB, x2, xa, weight, bias, lora_A, lora_B, scale: float, need):
    """(dW, db, dA, dB) of one LoRA projection, None where `need` (four flags in that order) is False."""
    need_w, need_b, need_a, need_bb = need
    dA = factor_grad(gB.t(), x2, scale, lora_A.dtype) if need_a else None  # (r, in)
    dB = factor_grad(g2.t(), xa, scale, lora_B.dtype) if need_bb else None  # (out, r)
    dw = (g2.t() @ x2).to(weight.dtype) if need_w else None  # (out, in): only when the base weight trains
    db = g2.sum(0).to(bias.dtype) if need_b else None
    return dw, db, dA, dB


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float):
        x2 = x.reshape(-1, x.shape[-1])  # (n, in)
        xa = x2 @ lora_A.to(x.dtype).t()  # (n, r)
        y = lora_output(x2, weight, bias, xa, lora_B, scale)
        ctx.scale = scale
        # a quantized weight is a module, not a tensor: kept on ctx (its tensors live in the model anyway)
        ctx.nf4 = weight if isinstance(weight, QuantizedWeight) else None
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
        dx = None
        if need_x:
            dx = lora_input_grad(g2, weight, gB, lora_A, s).view(*g.shape[:-1], -1)
        dw, db, dA, dB = lora_param_grads(
            g2, gB, x2, xa, weight, bias, lora_A, lora_B, s, (need_w, need_b, need_a, need_bb)
        )
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


class LoRAGroupFunction(torch.autograd.Function):
    """Several LoRA projections of one input (q/k/v, gate/up): y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T.

    Each projection done alone reads x for its own x A_i^T and dA_i, and autograd then sums the
    projections' dx with an extra read and write of x-sized tensors per consumer. For the group, x A^T
    and dA are one product each over the concatenated ranks, and every dgrad is accumulated into one
    dx buffer by the GEMMs themselves (beta = 1). On an H200 the forward + backward GEMM sequence of
    a 1B model's q/k/v runs 1.28x faster this way, gate/up 1.08x (benchmarks/lora_gemm.py).

    `flat` holds (W, b, A, B) per projection (b may be None, W a `QuantizedWeight`); gradients as
    `LoRALinearFunction`.

    With `norm_weight` the group projects RMSNorm(x) (the Triton kernel, `eps`) and keeps x and the
    norm's per-row statistics instead of the normalized input: x is the block's residual stream, which
    is kept anyway, so the group keeps one (n, in) tensor less. Backward forms dA from x and those
    statistics; only a trained base weight's dW makes the normalized input again.
    """

    @staticmethod
    def forward(ctx, x, scales: tuple[float, ...], norm_weight, eps: float, *flat):
        Ws, bs, As, Bs = flat[0::4], flat[1::4], flat[2::4], flat[3::4]
        x_in, _, rstd, xa, ys = group_forward(x, norm_weight, eps, Ws, bs, As, Bs, scales)
        ctx.scales, ctx.eps = scales, eps
        # with a norm: its input, not x2
        ctx.save_for_backward(x_in, rstd, norm_weight, xa, *save_projections(ctx, Ws, bs, As, Bs))
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *gs):
        x_in, rstd, norm_weight, xa, *rest = ctx.saved_tensors  # x_in: x, or the norm's input
        Ws, bs, As, Bs = saved_projections(ctx, rest)
        need_x, need_norm = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        g2 = [g.reshape(-1, g.shape[-1]) for g in gs]  # (n, out_i)
        x2 = x_in if norm_weight is None else None  # with a norm: made again only where needed
        dx, dnorm, grads = group_grads(
            g2, x_in, x2, rstd, norm_weight, ctx.eps, xa, Ws, bs, As, Bs, ctx.scales,
            need_x, need_norm, ctx.needs_input_grad[4:],
        )  # fmt: skip
        dx = None if dx is None else dx.view(*gs[0].shape[:-1], dx.shape[-1])
        return (dx, None, dnorm, None, *grads)


def save_projections(ctx, Ws, bs, As, Bs) -> list:
    """What a Function of several LoRA projections saves for backward: the dense base weights (an
    `QuantizedWeight` is a module, not a tensor: it is kept on ctx, its tensors live in the model anyway), the
    factors, then the biases there are. `saved_projections` takes them apart again."""
    ctx.nf4 = [W if isinstance(W, QuantizedWeight) else None for W in Ws]
    ctx.n_bias = [b is not None for b in bs]
    dense = [None if q is not None else W for W, q in zip(Ws, ctx.nf4, strict=True)]
    return [*dense, *As, *Bs, *(b for b in bs if b is not None)]


def saved_projections(ctx, rest) -> tuple[list, list, tuple, tuple]:
    """(Ws, bs, As, Bs) from the saved tensors `save_projections` gave (`rest`, in that order)."""
    k = len(ctx.nf4)
    Ws = [q if q is not None else w for w, q in zip(rest[:k], ctx.nf4, strict=True)]
    As, Bs, bias = tuple(rest[k : 2 * k]), tuple(rest[2 * k : 3 * k]), iter(rest[3 * k :])
    return Ws, [next(bias) if has else None for has in ctx.n_bias], As, Bs


def cat_factors(As, dt: torch.dtype) -> torch.Tensor:
    """The group's A factors stacked, (sum r, in), in the activation dtype: concatenated first, then
    cast as one tensor (two kernels, not one cast per factor and the concatenation)."""
    if len({A.dtype for A in As}) == 1:
        return torch.cat(As).to(dt)
    return torch.cat([A.to(dt) for A in As])


def group_forward(x, norm_weight, eps: float, Ws, bs, As, Bs, scales):
    """`LoRAGroupFunction`'s forward without autograd: (x_in, x2, rstd, xa, ys) with x_in = x as (n, in)
    (the norm's input when there is one), x2 the projected input (norm(x) or x), rstd the norm's
    statistics (None without one), xa = x2 A_cat^T (n, sum r) and each projection's output (n, out_i)."""
    dt = x.dtype
    x_in = x.reshape(-1, x.shape[-1])  # (n, in)
    x2, rstd = x_in, None
    if norm_weight is not None:
        x_in = _rows(x_in)  # unit column stride for the kernel
        x2, rstd = rmsnorm_forward(x_in, norm_weight, eps)
    xa = x2 @ cat_factors(As, dt).t()  # (n, sum r): x read once for the whole group
    return x_in, x2, rstd, xa, group_outputs(x2, xa, Ws, bs, Bs, scales)


def group_outputs(x2, xa, Ws, bs, Bs, scales) -> list[torch.Tensor]:
    """Each projection's x2 W_i^T + b_i + s_i xa_i B_i^T, (n, out_i), from the group's xa (n, sum r)."""
    ys, off = [], 0
    for W, b, B, s in zip(Ws, bs, Bs, scales, strict=True):
        r = B.shape[1]
        ys.append(lora_output(x2, W, b, xa[:, off : off + r], B, s))  # (n, out)
        off += r
    return ys


def group_grads(g2, x_in, x2, rstd, norm_weight, eps, xa, Ws, bs, As, Bs, scales, need_x, need_norm, need):
    """The gradients of a LoRA group (see `LoRAGroupFunction`) from its outputs' gradients g2 (n, out_i):
    (dx (n, in) or None, d norm_weight or None, [dW, db, dA, dB] per projection). `x2` is the projected
    input, or None where a norm's output was not kept: it is then made again only for a trained base's
    dW, and dA comes from x_in and the norm's statistics. `need`: per projection W, b, A, B flags."""
    k = len(scales)
    need_w = any(need[4 * i] for i in range(k))
    if x2 is None and need_w:
        x2 = rmsnorm_forward(x_in, norm_weight, eps)[0]  # bit-identical to the forward's
    dt = g2[0].dtype
    gB = torch.cat([g @ B.to(dt) for g, B in zip(g2, Bs, strict=True)], dim=1)  # (n, sum r)
    dx = dnorm = None
    if need_x or need_norm:  # d(the projected input), then through the norm when there is one
        A_cat = cat_factors(As, dt)  # (sum r, in)
        gBs, s = gB, scales[0]
        if len(set(scales)) != 1:  # per-projection scales: on the rank columns of gB (n x sum r, tiny)
            ranks = [A.shape[0] for A in As]
            col = torch.repeat_interleave(torch.tensor(scales, dtype=dt), torch.tensor(ranks))
            gBs, s = gB * col.to(gB.device), 1.0
        if all(accumulates(W) for W in Ws):  # the low-rank term first, every dgrad then summed onto it
            dx = low_rank(gBs, A_cat, s)
            for g, W in zip(g2, Ws, strict=True):  # by the GEMMs themselves (beta = 1)
                dx = frozen_mm_t(g, W, acc=dx)
        else:  # FP8: the first dgrad writes dx, the others and the low-rank term are added onto it
            dx = frozen_mm_t(g2[0], Ws[0])
            for g, W in zip(g2[1:], Ws[1:], strict=True):
                dx = frozen_mm_t(g, W, acc=dx)
            dx.addmm_(gBs, A_cat, alpha=s)
        if norm_weight is not None:
            dx, dnorm = rmsnorm_backward(dx, x_in, norm_weight, rstd, need_x, need_norm)
    grads: list[torch.Tensor | None] = []
    dA_cat = None  # (sum r, in), in the factors' dtype, scaled already when the group has one scale
    one = scales[0] if len(set(scales)) == 1 and len({A.dtype for A in As}) == 1 else None
    if any(need[4 * i + 2] for i in range(k)):
        a_dt = As[0].dtype if one is not None else torch.float32
        if x2 is not None:
            dA_cat = factor_grad(gB.t(), x2, one if one is not None else 1.0, a_dt)
        else:  # gB^T norm(x) = (gB^T diag(rstd) x) diag(w): from x, no normalized copy made again
            gB_r = (gB.float() * rstd[:, None]).to(dt)  # (n, sum r)
            w = norm_weight.to(dt).to(a_dt)  # the weight as the forward's norm applied it
            dA_cat = factor_grad(gB_r.t(), x_in, one if one is not None else 1.0, a_dt).mul_(w)
    off = 0
    for i, (g, W, b, A, B, s) in enumerate(zip(g2, Ws, bs, As, Bs, scales, strict=True)):
        r = A.shape[0]
        w_b_bb = (need[4 * i], need[4 * i + 1], False, need[4 * i + 3])  # dA: from dA_cat above
        dW, db, _, dB = lora_param_grads(g, None, x2, xa[:, off : off + r], W, b, A, B, s, w_b_bb)
        dA = None
        if need[4 * i + 2]:  # rows of dA_cat: a view, no copy, when it is already scaled
            dA = dA_cat[off : off + r] if one is not None else dA_cat[off : off + r].to(A.dtype).mul_(s)
        grads += [dW, db, dA, dB]
        off += r
    return dx, dnorm, grads


def _hooked(m: nn.Module) -> bool:
    """A module with forward hooks: a fused Function, which never calls its forward, would skip them."""
    return bool(m._forward_hooks or m._forward_pre_hooks)


def fusable(mods) -> bool:
    """Modules a fused Function can take in their place: FastLoRALinear with dropout off and no hooks."""
    return all(
        type(m) is FastLoRALinear and isinstance(m.dropout, nn.Identity) and not _hooked(m) for m in mods
    )


def norm_fusable(norm) -> bool:
    """A norm the group Function can take inside: a FastRMSNorm without hooks."""
    return type(norm) is FastRMSNorm and not _hooked(norm)


def fast_project(mods, x: torch.Tensor, norm: nn.Module | None = None) -> tuple[torch.Tensor, ...]:
    """Drop-in for `decoder.project`: each module applied to x (to norm(x) when a norm is given), as one
    Function when all are LoRA; a FastRMSNorm without hooks goes inside that Function too."""
    grouped = len(mods) >= 2 and fusable(mods)
    inside = grouped and norm_fusable(norm) and use_triton(x)
    if norm is not None and not inside:
        x, norm = norm(x), None
    if not grouped:
        return tuple(m(x) for m in mods)
    return apply_projections(LoRAGroupFunction, mods, x, norm)


def apply_projections(fn, mods, x: torch.Tensor, norm=None):
    """`fn.apply` in the calling convention of the Functions of several LoRA projections
    (`LoRAGroupFunction`, `kernels.mlp.LoRAMLPFunction`): x, the scales, the norm's weight and eps (None
    and 0 without a norm), then (W, b, A, B) of each module in `mods`."""
    flat = []
    for m in mods:
        flat += [m.weight, m.bias, m.lora_A, m.lora_B]
    norm_weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
    return fn.apply(x, tuple(m.scale for m in mods), norm_weight, eps, *flat)
