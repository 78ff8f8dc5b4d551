"""The LoRA products with a rank-sized dimension, as Triton kernels: memory-bound GEMMs cuBLAS runs badly.

Each LoRA projection does six small products beside its two frozen GEMMs (see `kernels.lora`):

    x A^T, g B           (n, r)    K = in or out: a long reduction into a narrow output
    xa B^T, gB A         (n, m)    K = r: every output element is one short dot product
    gB^T x, g^T xa       (r, m)    a reduction over the n tokens into a small output

They move x- and g-sized tensors once and do almost no arithmetic, so their floor is memory traffic.
cuBLAS picks tiles for compute-bound shapes: a (4096, 4096) x (4096, 48) product has only 32 output
tiles for 132 SMs, and on an H200 these calls ran at 15-25% of the copy bandwidth (benchmarks/lora_ops.py),
~1.3 ms a Llama-3 8B block against a floor of ~0.4. The kernels here tile for bandwidth instead: narrow
outputs get short row tiles (many programs), the reductions over tokens are split into partial sums
(fp32, summed once in a fixed order, so results do not change from run to run).

Only 16-bit inputs with ranks up to `MAX_RANK` take the kernels; fp32 (tf32 rounding in `tl.dot`) and
high ranks (compute-bound again, where cuBLAS is right) go to torch. Accumulation is fp32 throughout,
as cuBLAS's, so outputs differ from `torch.matmul` by rounding order only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snuggle.kernels._utils import interpreting, patch_interpreter, reduction_programs, use_triton

__all__ = ["MAX_RANK", "mm_narrow", "mm_rank_k", "mm_tn", "takes"]

patch_interpreter()

MAX_RANK = 64  # widest rank-sized dimension the kernels take (q/k/v at r = 16 is 48)


def takes(*ts: torch.Tensor) -> bool:
    """Whether the kernels take these operands: 16-bit, on CUDA (or under the interpreter)."""
    return all(t.dtype in (torch.bfloat16, torch.float16) and use_triton(t) for t in ts)


# DOT_F32 (the kernels' last constexpr): Triton's CPU interpreter multiplies bf16 tiles in `tl.dot` as
# their raw bits, so under it the tiles are widened to fp32 first (exact: the same products, accumulated
# in fp32 as the GPU's tensor cores do); compiled kernels feed the 16-bit tiles to the tensor cores


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))  # tl.dot needs every dimension >= 16


# ---- (M, K) @ (K, N) with N <= MAX_RANK: a long reduction into a narrow output ----


@triton.jit
def _narrow_kernel(
    A, B, C, m_size, n_size, k_size,
    sam, sak, sbk, sbn, scm, scn,
    alpha,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a_ptr = A + rm[:, None].to(tl.int64) * sam + rk[None, :] * sak  # (BM, BK)
    b_ptr = B + rk[:, None] * sbk + rn[None, :] * sbn  # (BK, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, k_size, BK):
        a = tl.load(a_ptr, mask=(rm[:, None] < m_size) & (rk[None, :] + k < k_size), other=0.0)
        b = tl.load(b_ptr, mask=(rk[:, None] + k < k_size) & (rn[None, :] < n_size), other=0.0)
        if DOT_F32:  # see DOT_F32 above _pow2
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptr += BK * sak
        b_ptr += BK * sbk
    c_ptr = C + rm[:, None].to(tl.int64) * scm + rn[None, :] * scn
    tl.store(
        c_ptr, (acc * alpha).to(C.dtype.element_ty), mask=(rm[:, None] < m_size) & (rn[None, :] < n_size)
    )


_NARROW_CONFIGS = [
    triton.Config({"BM": bm, "BK": bk}, num_warps=4, num_stages=s)
    for bm in (16, 32, 64)
    for bk in (128, 256)
    for s in (3,)
]
_narrow_tuned = triton.autotune(_NARROW_CONFIGS, key=["m_size", "n_size", "k_size", "BN"])(_narrow_kernel)


def mm_narrow(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha a @ b, (M, N), in a's dtype, for a (M, K) and b (K, N) with N <= MAX_RANK (any strides)."""
    M, K = a.shape
    N = b.shape[1]
    if not takes(a, b) or N > MAX_RANK or a.dtype != b.dtype:
        out = a @ b
        return out.mul_(alpha) if alpha != 1.0 else out
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    args = (a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), alpha)
    if interpreting():
        _narrow_kernel[(triton.cdiv(M, 16),)](*args, BM=16, BN=_pow2(N), BK=16, DOT_F32=True)
    else:
        _narrow_tuned[lambda m: (triton.cdiv(M, m["BM"]),)](*args, BN=_pow2(N), DOT_F32=False)
    return c


# ---- (M, R) @ (R, N) with R <= MAX_RANK: one short dot product per output element ----


@triton.jit
def _rank_k_kernel(
    U, F, BIAS, C, m_size, n_size, r_size,
    sum_, sur, sfr, sfn, scm, scn,
    alpha,
    HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    u_mask = (rm[:, None] < m_size) & (rr[None, :] < r_size)
    u = tl.load(U + rm[:, None].to(tl.int64) * sum_ + rr[None, :] * sur, mask=u_mask, other=0.0)  # (BM, BR)
    f = tl.load(
        F + rr[:, None] * sfr + rn[None, :] * sfn,
        mask=(rr[:, None] < r_size) & (rn[None, :] < n_size),
        other=0.0,
    )
    if DOT_F32:  # see DOT_F32 above _pow2
        u, f = u.to(tl.float32), f.to(tl.float32)
    acc = tl.dot(u, f) * alpha  # (BM, BN) fp32
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=rn < n_size, other=0.0).to(tl.float32)[None, :]
    c_ptr = C + rm[:, None].to(tl.int64) * scm + rn[None, :] * scn
    tl.store(c_ptr, acc.to(C.dtype.element_ty), mask=(rm[:, None] < m_size) & (rn[None, :] < n_size))


_RANK_K_CONFIGS = [
    triton.Config({"BM": bm, "BN": bn}, num_warps=w)
    for bm, bn, w in ((64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 256, 8), (128, 256, 8))
]
_rank_k_tuned = triton.autotune(_RANK_K_CONFIGS, key=["m_size", "n_size", "BR"])(_rank_k_kernel)


def mm_rank_k(u: torch.Tensor, f: torch.Tensor, alpha: float = 1.0, bias: torch.Tensor | None = None):
    """alpha u @ f (+ bias), a new (M, N) tensor in u's dtype, for u (M, R) and f (R, N), R <= MAX_RANK."""
    M, R = u.shape
    N = f.shape[1]
    if not takes(u, f) or R > MAX_RANK or u.dtype != f.dtype:
        if bias is not None:
            return torch.addmm(bias, u, f, alpha=alpha)
        out = torch.empty(M, N, dtype=u.dtype, device=u.device)
        return out.addmm_(u, f, beta=0, alpha=alpha)  # beta = 0: the empty buffer is never read
    c = torch.empty(M, N, dtype=u.dtype, device=u.device)
    b = bias.contiguous() if bias is not None else c  # not read without HAS_BIAS
    args = (u, f, b, c, M, N, R, *u.stride(), *f.stride(), *c.stride(), alpha)
    if interpreting():
        grid = (triton.cdiv(M, 16), triton.cdiv(N, 16))
        _rank_k_kernel[grid](*args, HAS_BIAS=bias is not None, BM=16, BN=16, BR=_pow2(R), DOT_F32=True)
    else:
        grid = lambda m: (triton.cdiv(M, m["BM"]), triton.cdiv(N, m["BN"]))  # noqa: E731
        _rank_k_tuned[grid](*args, HAS_BIAS=bias is not None, BR=_pow2(R), DOT_F32=False)
    return c


# ---- p^T q over the M rows, with p (M, P) or q (M, Q) rank-sized: a reduction over tokens ----


@triton.jit
def _tn_kernel(
    PT, QT, PART, m_size, n_p, n_q, rows_per_split,
    spm, spp, sqm, sqq,
    BP: tl.constexpr, BQ: tl.constexpr, BM: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    # grid (p tiles, q tiles, splits of the rows): one fp32 partial (BP, BQ) tile per program into
    # PART (splits, n_p, n_q)
    rp = tl.program_id(0) * BP + tl.arange(0, BP)
    rq = tl.program_id(1) * BQ + tl.arange(0, BQ)
    split = tl.program_id(2)
    start = split * rows_per_split
    rm = start + tl.arange(0, BM)
    p_ptr = PT + rm[:, None].to(tl.int64) * spm + rp[None, :] * spp  # (BM, BP)
    q_ptr = QT + rm[:, None].to(tl.int64) * sqm + rq[None, :] * sqq  # (BM, BQ)
    end = tl.minimum(start + rows_per_split, m_size)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    for m in range(start, end, BM):
        rows = rm + (m - start)
        p = tl.load(p_ptr, mask=(rows[:, None] < end) & (rp[None, :] < n_p), other=0.0)
        q = tl.load(q_ptr, mask=(rows[:, None] < end) & (rq[None, :] < n_q), other=0.0)
        if DOT_F32:  # see DOT_F32 above _pow2
            p, q = p.to(tl.float32), q.to(tl.float32)
        acc = tl.dot(tl.trans(p), q, acc)
        p_ptr += BM * spm
        q_ptr += BM * sqm
    out_ptr = PART + split.to(tl.int64) * n_p * n_q + rp[:, None] * n_q + rq[None, :]
    tl.store(out_ptr, acc, mask=(rp[:, None] < n_p) & (rq[None, :] < n_q))


def mm_tn(p: torch.Tensor, q: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """alpha p^T q, (P, Q) fp32, for p (M, P) and q (M, Q) with P or Q <= MAX_RANK (any strides)."""
    M, P = p.shape
    Q = q.shape[1]
    if M == 0:
        return torch.zeros(P, Q, dtype=torch.float32, device=p.device)
    if not takes(p, q) or min(P, Q) > MAX_RANK or p.dtype != q.dtype:
        return (p.t() @ q).float().mul_(alpha)
    if interpreting():
        BP, BQ, BM, warps = _pow2(min(P, 64)), _pow2(min(Q, 64)), 16, 4
    else:  # the rank-sized side whole in one tile, the other in 128-wide tiles
        BP = _pow2(P) if P <= MAX_RANK else 128
        BQ = _pow2(Q) if P > MAX_RANK or Q <= MAX_RANK else 128
        BM, warps = 64, 4
    tiles = triton.cdiv(P, BP) * triton.cdiv(Q, BQ)
    # enough row splits to fill the card (two programs an SM), each at least four row tiles long
    splits = max(1, min(triton.cdiv(reduction_programs(p.device), tiles), triton.cdiv(M, 4 * BM)))
    rows = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    splits = triton.cdiv(M, rows)
    part = torch.empty(splits, P, Q, dtype=torch.float32, device=p.device)
    grid = (triton.cdiv(P, BP), triton.cdiv(Q, BQ), splits)
    _tn_kernel[grid](
        p,
        q,
        part,
        M,
        P,
        Q,
        rows,
        *p.stride(),
        *q.stride(),
        BP=BP,
        BQ=BQ,
        BM=BM,
        DOT_F32=interpreting(),
        num_warps=warps,
    )
    out = part[0] if splits == 1 else part.sum(0)  # a fixed order: the same result every run
    return out.mul_(alpha) if alpha != 1.0 else out
