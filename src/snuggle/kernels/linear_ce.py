"""Fused lm_head + cross-entropy: the summed token loss and its gradients, without tokens x vocab logits.

Tokens go through in chunks. For each chunk, torch (cuBLAS) computes logits = h @ W^T into one reused
buffer; one Triton program per row then takes the row's log-sum-exp in a single online pass, writes the
row's loss, and overwrites the row in place with d(loss)/d(logits) = softmax - onehot. The same buffer
then feeds the two gradient matmuls, dh_chunk = dlogits @ W and dW += dlogits^T @ h_chunk, all in
forward. So only one chunk of logits ever exists, nothing vocabulary-sized is saved but dW itself, and
backward merely scales the stored dh and dW by the incoming scalar gradient.

Numerics follow `snuggle.model.loss.cross_entropy_sum`: logits in the activation dtype (as F.linear
gives them), softmax in fp32, d(logits) rounded back to the activation dtype. dW accumulates across
chunks in fp32 whatever the activation dtype, so a trainable fp32 lm_head (or tied embedding) gets
a gradient as precise as the unchunked reference's. Tokens whose label is IGNORE_INDEX are dropped
before the matmuls (they contribute neither loss nor gradient), exactly as the reference does.

Returns the SUM over valid tokens in fp32; the trainer divides by the global valid-token count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snuggle.kernels._utils import patch_interpreter, use_triton
from snuggle.kernels.reference import IGNORE_INDEX, cross_entropy_sum

__all__ = ["LinearCrossEntropyFunction", "fused_linear_cross_entropy"]

patch_interpreter()

# logits elements a chunk may hold: 2^27 = 256 MiB of bf16; few chunks keep the fp32 dW read-modify-write
# per chunk cheap next to the matmuls, and the buffer small next to the model
_CHUNK_LOGITS = 1 << 27
# vocabulary columns a program holds at once (8 warps x 32 threads x 16 values)
_MAX_BLOCK_V = 4096


@triton.jit
def _ce_rows_kernel(
    LOGITS,  # (n, n_vocab) activation dtype; overwritten with d(loss)/d(logits) when COMPUTE_GRAD
    stride_row,
    LABELS,  # (n,) int
    LOSS,  # (n,) fp32
    n_vocab,
    ignore_index,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride_row
    y = tl.load(LABELS + row)
    if y == ignore_index:
        # no target: no loss, and a zero gradient row so the matmuls that follow add nothing
        if COMPUTE_GRAD:
            for off in range(0, n_vocab, BLOCK_V):
                cols = off + tl.arange(0, BLOCK_V)
                tl.store(ptr + cols, tl.zeros((BLOCK_V,), dtype=LOGITS.dtype.element_ty), mask=cols < n_vocab)
        tl.store(LOSS + row, 0.0)
        return
    # online log-sum-exp in one pass: running max m and running sum d of exp(x - m)
    m = float("-inf")
    d = 0.0
    for off in range(0, n_vocab, BLOCK_V):
        cols = off + tl.arange(0, BLOCK_V)
        x = tl.load(ptr + cols, mask=cols < n_vocab, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)
    x_y = tl.load(ptr + y).to(tl.float32)  # read before the gradient pass overwrites it
    tl.store(LOSS + row, lse - x_y)
    if COMPUTE_GRAD:
        for off in range(0, n_vocab, BLOCK_V):
            cols = off + tl.arange(0, BLOCK_V)
            mask = cols < n_vocab
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(cols == y, p - 1.0, p)
            tl.store(ptr + cols, p.to(LOGITS.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(X, SCALE, n, BLOCK: tl.constexpr):
    """X *= SCALE[0], the scalar read on device in fp32: no host sync, no rounding of the scale to bf16."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(SCALE).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(X + offs, (x * s).to(X.dtype.element_ty), mask=mask)


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, compute_grad: bool) -> None:
    """Per-row loss of logits (n, V) into loss (n,) fp32; with compute_grad, logits become their gradient."""
    n, V = logits.shape
    if n == 0:
        return
    block_v = min(triton.next_power_of_2(V), _MAX_BLOCK_V)
    _ce_rows_kernel[(n,)](
        logits, logits.stride(0), labels, loss, V, IGNORE_INDEX,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
    )  # fmt: skip


def scale_(x: torch.Tensor, scale: torch.Tensor) -> None:
    """In place x *= scale for a contiguous x and a one-element scale tensor on the same device."""
    n = x.numel()
    if n:
        block = 2048
        _scale_kernel[(triton.cdiv(n, block),)](x, scale, n, BLOCK=block, num_warps=8)


# Masked rows are dropped before the matmuls (a host sync to count them); without it every row goes
# through them and the kernel gives masked ones zero loss and gradient: no sync, so a CUDA graph can
# capture the step.
DROP_MASKED_ROWS = True


def _auto_chunk(V: int) -> int:
    chunk = max(1, _CHUNK_LOGITS // V)
    return chunk // 64 * 64 if chunk >= 64 else chunk  # whole 64-row tiles for the matmuls


def linear_ce_forward(
    h: torch.Tensor,  # (N, C) activations
    weight: torch.Tensor,  # (V, C) any float dtype; cast to h's dtype as the reference does
    labels: torch.Tensor,  # (N,) int, IGNORE_INDEX where there is no target
    need_dh: bool,
    need_dw: bool,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss_sum fp32 0-dim, dh (N, C) in h's dtype or None, dW (V, C) in weight's dtype or None)."""
    N, C = h.shape
    V = weight.shape[0]
    dtype, dev = h.dtype, h.device
    rows, n = None, N
    if DROP_MASKED_ROWS:
        valid = labels != IGNORE_INDEX
        n = int(valid.sum())  # one host sync, as in the reference; it saves the matmuls of masked tokens
    if n < N:
        rows = valid.nonzero().squeeze(1)  # (n,)
        h, labels = h.index_select(0, rows), labels.index_select(0, rows)
    w = weight.to(dtype)  # (V, C): a copy only when the lm_head is stored wider than the activations
    need_grad = need_dh or need_dw
    chunk = max(1, min(n, chunk_tokens or _auto_chunk(V)))
    buf = torch.empty((min(chunk, n), V), dtype=dtype, device=dev)  # one chunk of logits, reused
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    dh = torch.empty((n, C), dtype=dtype, device=dev) if need_dh else None
    # dW accumulates in fp32; with fp32 activations straight into it, else through one product buffer
    dw = torch.zeros((V, C), dtype=torch.float32, device=dev) if need_dw else None
    prod = torch.empty((V, C), dtype=dtype, device=dev) if need_dw and dtype != torch.float32 else None
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        h_c = h[s:e]  # (c, C)
        logits = buf[: e - s]  # (c, V)
        torch.mm(h_c, w.t(), out=logits)
        ce_rows(logits, labels[s:e], loss[s:e], compute_grad=need_grad)  # logits now hold dlogits
        if need_dh:
            torch.mm(logits, w, out=dh[s:e])  # (c, C)
        if need_dw:
            if prod is None:
                dw.addmm_(logits.t(), h_c)
            else:
                torch.mm(logits.t(), h_c, out=prod)  # (V, C), fp32-accumulated inside the matmul
                dw.add_(prod)
    del buf, prod
    if need_dh and rows is not None:
        dh_all = torch.zeros((N, C), dtype=dtype, device=dev)
        dh = dh_all.index_copy_(0, rows, dh)  # masked tokens get a zero gradient
    if need_dw and dw.dtype != weight.dtype:
        dw = dw.to(weight.dtype)
    return loss.sum(), dh, dw


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens):
        C = hidden.shape[-1]
        # the weight's own requires_grad decides: a frozen lm_head never pays for dW
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, dh, dw = linear_ce_forward(
            hidden.reshape(-1, C), weight, labels.reshape(-1), need_dh, need_dw, chunk_tokens
        )
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(dh, dw)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dh, dw = ctx.saved_tensors
        # d(sum)/d(...) was computed for grad 1; the trainer's 1/count (or any upstream factor) scales it.
        # In place: these are ours alone. The version bump makes a second backward through this graph
        # (retain_graph) raise instead of scaling twice.
        g = grad.reshape(1).to(torch.float32)
        for t in (dh, dw):
            if t is not None:
                scale_(t, g)
                torch.autograd.graph.increment_version(t)
        return (None if dh is None else dh.view(ctx.hidden_shape)), dw, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,  # (B, T, C)
    weight: torch.Tensor,  # (V, C) lm_head weight (possibly the tied embedding, possibly trainable fp32)
    labels: torch.Tensor,  # (B, T) aligned targets, IGNORE_INDEX where there is none
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Drop-in for `loss.cross_entropy_sum`: sum of cross-entropy over valid tokens, fp32 scalar.

    Gradients reach hidden and weight (each only if it requires grad). Without grad mode, or when nothing
    requires grad (evaluation), only the loss is computed.
    """
    if not use_triton(hidden):
        return cross_entropy_sum(hidden, weight, labels, chunk_tokens)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        C = hidden.shape[-1]
        loss, _, _ = linear_ce_forward(
            hidden.reshape(-1, C), weight, labels.reshape(-1), False, False, chunk_tokens
        )
        return loss
    return LinearCrossEntropyFunction.apply(hidden, weight, labels, chunk_tokens)
