"""RoPE on q and k in one launch, in place, in the half-split layout HF checkpoints use.

q heads and k heads (GQA: the two counts differ) are rows of one index space, so a single launch rotates
both: a program takes a tile of (token, head) rows, each with its token's cos/sin (re-reads of a token's
cos/sin row across its heads hit cache). Any strides are accepted, so the (B, H, T, D) views the attention
makes by transposing (B, T, H, D) projections are rotated where they lie, with no copy.

Forward overwrites q and k: the pre-rotation values are needed by nothing (backward needs only cos and
sin), so writing in place saves two activation-sized allocations. Autograd is told through the version
counter, so a graph that did keep the old values fails loudly instead of reading rotated ones.

Backward applies the transposed rotation (rotation by -sin when both halves of cos/sin agree, as they do
for `rope_cos_sin`) to dq, dk, into fresh buffers: an incoming gradient may be shared with another branch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snuggle.kernels._utils import num_warps_for, patch_interpreter, use_triton
from snuggle.kernels.reference import rope_qk

__all__ = ["RopeFunction", "fast_rope_qk"]

patch_interpreter()

# (row, column) values a program holds: BLOCK_R head rows x BLOCK_D half-columns
_TILE = 2048


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    q_sb, q_sh, q_st, q_sd,
    k_sb, k_sh, k_st, k_sd,
    qo_sb, qo_sh, qo_st, qo_sd,
    ko_sb, ko_sh, ko_st, ko_sd,
    c_sb, c_st, c_sd,
    s_sb, s_st, s_sd,
    n_rows, seq_len, n_q_heads, n_heads, half,
    BACKWARD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # rows enumerate (token, head) with each token's q heads first, then its k heads; every row is
    # independent, so a program takes BLOCK_R consecutive rows whatever the head counts
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: rows * stride may pass 2^31
    bt = r // n_heads  # token index b * T + t
    h = (r - bt * n_heads)[:, None]  # (BLOCK_R, 1) head among the token's n_q_heads + n_k heads
    b = (bt // seq_len)[:, None]
    t = (bt % seq_len)[:, None]
    is_q = h < n_q_heads
    hk = h - n_q_heads
    d = tl.arange(0, BLOCK_D)[None, :]  # (1, BLOCK_D) index into each half
    mask = (r < n_rows)[:, None] & (d < half)
    cos = COS + b * c_sb + t * c_st + d * c_sd
    sin = SIN + b * s_sb + t * s_st + d * s_sd
    c1 = tl.load(cos, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + half * c_sd, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + half * s_sd, mask=mask, other=0.0).to(tl.float32)
    src = tl.where(
        is_q, Q + b * q_sb + t * q_st + h * q_sh + d * q_sd, K + b * k_sb + t * k_st + hk * k_sh + d * k_sd
    )
    dst = tl.where(
        is_q,
        QO + b * qo_sb + t * qo_st + h * qo_sh + d * qo_sd,
        KO + b * ko_sb + t * ko_st + hk * ko_sh + d * ko_sd,
    )
    src2 = src + tl.where(is_q, q_sd, k_sd) * half  # the second half of the same head
    dst2 = dst + tl.where(is_q, qo_sd, ko_sd) * half
    # both halves are loaded before anything is stored: in place, each element is read before written
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src2, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # transpose of the forward map below: dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    out_ty = QO.dtype.element_ty
    tl.store(dst, y1.to(out_ty), mask=mask)
    tl.store(dst2, y2.to(out_ty), mask=mask)


def rope_launch(
    q: torch.Tensor,  # (B, H, T, D) read
    k: torch.Tensor,  # (B, Hkv, T, D) read
    q_out: torch.Tensor,  # (B, H, T, D) written; may be q itself
    k_out: torch.Tensor,  # (B, Hkv, T, D) written; may be k itself
    cos: torch.Tensor,  # (B, T, D), stride 0 over B allowed
    sin: torch.Tensor,  # (B, T, D)
    backward: bool,
) -> None:
    B, n_q, T, D = q.shape
    n_heads = n_q + k.shape[1]
    n_rows = B * T * n_heads
    if n_rows == 0:
        return
    half = D // 2
    block_d = triton.next_power_of_2(half)
    block_r = max(1, _TILE // block_d)
    _rope_kernel[(triton.cdiv(n_rows, block_r),)](
        q, k, q_out, k_out, cos, sin,
        *q.stride(), *k.stride(), *q_out.stride(), *k_out.stride(), *cos.stride(), *sin.stride(),
        n_rows, T, n_q, n_heads, half,
        BACKWARD=backward, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d),
    )  # fmt: skip


def _angles(t: torch.Tensor, B: int, T: int, D: int) -> torch.Tensor:
    """cos or sin as (B, T, D): (T, D) and (1, T, D) broadcast over the batch with stride 0, no copy."""
    if t.dim() == 2:
        t = t[None]
    return t.expand(B, T, D)


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        B, _, T, D = q.shape
        cos, sin = _angles(cos, B, T, D), _angles(sin, B, T, D)
        rope_launch(q, k, q, k, cos, sin, backward=False)
        # a raw kernel write bumps no version counter; do it, so stale saved copies of q/k raise in backward
        torch.autograd.graph.increment_version(q)
        torch.autograd.graph.increment_version(k)
        ctx.save_for_backward(cos, sin)
        # returned as-is without mark_dirty: mark_dirty is refused for several outputs that are views
        # (q, k are transposed views of the projections); autograd re-wraps them as views with our backward
        return q, k

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = torch.empty_like(dq), torch.empty_like(dk)
        rope_launch(dq, dk, dq_in, dk_in, cos, sin, backward=True)
        return dq_in, dk_in, None, None


def fast_rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Drop-in for `decoder.rope_qk`: q (B, H, T, D), k (B, Hkv, T, D), cos/sin (B, T, D) -> rotated (q, k).

    q and k are rotated in place (their storage holds the result) unless they are leaves that require
    grad, which autograd forbids writing; those are copied first. cos/sin get no gradient (they are
    functions of the positions, never trained).
    """
    if not use_triton(q):
        return rope_qk(q, k, cos, sin)
    if q.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {q.shape[-1]}")
    if q.is_leaf and q.requires_grad:
        q = q.clone()
    if k.is_leaf and k.requires_grad:
        k = k.clone()
    return RopeFunction.apply(q, k, cos, sin)
