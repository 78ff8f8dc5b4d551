"""RMSNorm: one pass forward that saves only the input and its per-row inverse RMS, fused backward.

Numerics follow `snuggle.model.decoder.RMSNorm` exactly: statistics in fp32, then
`weight.to(dtype) * normed.to(dtype)`, i.e. both factors rounded to the activation dtype before the product.

Backward is a grid-stride loop: each program walks a contiguous range of rows, writes dx row by row and
keeps its share of dw in registers, then stores one fp32 partial row; the (programs, C) partials are summed
at the end. A frozen weight (every RMSNorm under LoRA) skips that accumulation entirely.

Small rows (Qwen3's per-head q_norm/k_norm: C = head_dim) are packed several to a program, so a program
still holds a few thousand values instead of 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snuggle.kernels._utils import num_warps_for, patch_interpreter, rebind, reduction_programs, use_triton
from snuggle.kernels.reference import RMSNorm, rms_norm

__all__ = ["RMSNormFunction", "fast_rms_norm", "FastRMSNorm"]

patch_interpreter()

# values a program holds at once; rows narrower than this are packed BLOCK_R to a program
_TILE = 2048


@triton.jit
def _rmsnorm_fwd_kernel(
    X,  # (n_rows, C), row stride stride_x
    Y,  # (n_rows, C), row stride stride_y
    W,  # (C,)
    RSTD,  # (n_rows,) fp32
    stride_x,
    stride_y,
    n_rows,
    n_cols,
    eps,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    rmask = rows < n_rows
    cmask = cols < n_cols
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride overflows int32 past 2^31 elements
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # (BLOCK_R,)
    # round both factors to the activation dtype before the product, as the reference does
    out_ty = Y.dtype.element_ty
    normed = (x * rstd[:, None]).to(out_ty).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(out_ty).to(tl.float32)
    y = normed * w[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], y.to(out_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _rmsnorm_bwd_kernel(
    DY,  # (n_rows, C)
    X,  # (n_rows, C)
    W,  # (C,)
    RSTD,  # (n_rows,) fp32
    DX,  # (n_rows, C)
    DW_PARTIAL,  # (programs, C) fp32
    stride_dy,
    stride_x,
    stride_dx,
    n_rows,
    n_cols,
    rows_per_program,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    x_ty = X.dtype.element_ty
    w = tl.load(W + cols, mask=cmask, other=0.0).to(x_ty).to(tl.float32)  # (BLOCK_C,)
    dw_acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    for r0 in range(0, rows_per_program, BLOCK_R):
        rows = start + r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)  # (BLOCK_R,)
        normed = x * rstd[:, None]
        if COMPUTE_DX:
            # y = w * x * rstd(x):  dx = rstd * (dn - normed * mean(dn * normed)),  dn = dy * w
            dn = dy * w[None, :]
            dot = tl.sum(dn * normed, axis=1) / n_cols  # (BLOCK_R,)
            dx = rstd[:, None] * (dn - normed * dot[:, None])
            tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * normed.to(x_ty).to(tl.float32)  # the reference's dw sees the rounded normed
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=cmask)


def _blocks(n_cols: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(n_cols)
    return max(1, _TILE // block_c), block_c


def rmsnorm_forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 (n, C) with unit column stride -> (y (n, C) in x2's dtype, rstd (n,) fp32)."""
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=x2.dtype, device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows == 0:
        return y, rstd
    block_r, block_c = _blocks(n_cols)
    grid = (triton.cdiv(n_rows, block_r),)
    _rmsnorm_fwd_kernel[grid](
        x2, y, weight, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps_for(block_r * block_c),
    )  # fmt: skip
    return y, rstd


def rmsnorm_backward(
    dy2: torch.Tensor,  # (n, C)
    x2: torch.Tensor,  # (n, C)
    weight: torch.Tensor,  # (C,)
    rstd: torch.Tensor,  # (n,) fp32
    need_dx: bool,
    need_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    n_rows, n_cols = x2.shape
    # a fresh dx: dy may be shared with another branch (a residual add hands one tensor to both inputs)
    dx = torch.empty_like(x2) if need_dx else None
    if n_rows == 0 or not (need_dx or need_dw):
        return dx, (torch.zeros_like(weight) if need_dw else None)
    block_r, block_c = _blocks(n_cols)
    programs = min(reduction_programs(x2.device), triton.cdiv(n_rows, block_r))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), block_r) * block_r  # whole tiles each
    programs = triton.cdiv(n_rows, rows_per_program)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device) if need_dw else rstd
    _rmsnorm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, dx if need_dx else x2, partial,
        dy2.stride(0), x2.stride(0), dx.stride(0) if need_dx else 0,
        n_rows, n_cols, rows_per_program,
        COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, BLOCK_R=block_r, BLOCK_C=block_c,
        # twice the forward's warps: dy, x and the dw accumulator are live at once (no spills at C=4096)
        num_warps=num_warps_for(2 * block_r * block_c),
    )  # fmt: skip
    dw = partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., C) -> (n, C) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _rows(x)  # (n, C)
        y, rstd = rmsnorm_forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)  # x (already held by the graph) + 4 bytes a row
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        # the weight's own requires_grad decides: a frozen norm never reduces dw
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx, dw = rmsnorm_backward(_rows(dy), x2, weight, rstd, need_dx, need_dw)
        return (None if dx is None else dx.view(dy.shape)), dw, None


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., C); the reference where Triton cannot run (CPU tensors)."""
    if not use_triton(x):
        return rms_norm(x, weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


class FastRMSNorm(RMSNorm):
    """An `RMSNorm` (isinstance holds, same `weight` and `eps`) whose forward is the Triton kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not use_triton(x):
            return super().forward(x)
        return RMSNormFunction.apply(x, self.weight, self.eps)

    @classmethod
    def from_module(cls, norm: RMSNorm) -> FastRMSNorm:
        """A FastRMSNorm sharing `norm`'s Parameter (same object, same name) and eps; `norm` is untouched."""
        return rebind(cls, norm)
