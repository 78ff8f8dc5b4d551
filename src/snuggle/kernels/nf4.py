"""NF4 -> bf16/fp16/fp32 dequantization in one Triton pass, feeding cuBLAS.

One program takes up to 32 quantization blocks (2048 weights) of one row of the (out, ceil(in/2)) code
matrix and writes the weights they hold: both nibbles looked up in the 16-entry level table, each
block's absmax rebuilt once from its int8 code and its row-group's scale and mean (double quantization
undone in registers, never materialized), the products interleaved back into column order so the store
is contiguous. A pass reads ~0.53 bytes and writes 2 bytes per weight: a Llama-3 8B MLP weight
(14336 x 4096) takes ~0.13 ms on an H100 against ~0.65 ms for its matmul at 4096 tokens, so the dense
weight is made per use and freed instead of kept (benchmarks/nf4_dequant.py).

The matmul itself stays in cuBLAS: at training shapes (thousands of tokens a step) it is compute-bound,
where a Triton GEMM with the decode in its prologue does not reach cuBLAS' throughput.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from snuggle.kernels._utils import patch_interpreter, use_triton
from snuggle.quant.nf4 import BLOCK, GROUP, NF4_CODE, dequantize_nf4_reference

__all__ = ["dequantize_nf4"]

patch_interpreter()

_BLOCKS = 32  # quantization blocks a program: 2048 weights at 64 a block


@triton.jit
def _nf4_dequant_kernel(
    CODES,  # uint8 (out, nbytes): codes, even column in the high nibble
    ABSMAX_Q,  # int8 (out, nb): second-level codes of the block absmax
    ABSMAX_SCALE,  # fp32 (out, ng): scale per row group
    ABSMAX_MEAN,  # fp32 (out, ng): mean per row group
    LEVELS,  # fp32 (16,): the NF4 levels
    OUT,  # (out, n_in) the dense weight
    nbytes,  # packed bytes per row
    n_in,
    nb,
    ng,
    QBLOCK: tl.constexpr,
    QGROUP: tl.constexpr,
    BLOCKS: tl.constexpr,
):
    # grid (row, tile of BLOCKS quantization blocks): each block's absmax is loaded once and
    # broadcast over its QBLOCK weights, and no index needs a division by a runtime value
    row = tl.program_id(0).to(tl.int64)  # int64: out * in may pass 2^31
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)  # (BLOCKS,)
    half = tl.arange(0, QBLOCK // 2)  # byte within a block
    byte_idx = blk[:, None] * (QBLOCK // 2) + half[None, :]  # (BLOCKS, QBLOCK/2)
    bmask = blk < nb
    byte = tl.load(CODES + row * nbytes + byte_idx, mask=byte_idx < nbytes, other=0).to(tl.int32)
    hi = tl.load(LEVELS + ((byte >> 4) & 15))
    lo = tl.load(LEVELS + (byte & 15))
    a = tl.load(ABSMAX_Q + row * nb + blk, mask=bmask, other=0).to(tl.float32)
    s = tl.load(ABSMAX_SCALE + row * ng + blk // QGROUP, mask=bmask, other=0.0)
    m = tl.load(ABSMAX_MEAN + row * ng + blk // QGROUP, mask=bmask, other=0.0)
    absmax = (a * s + m)[:, None]  # (BLOCKS, 1)
    ty = OUT.dtype.element_ty
    # (BLOCKS, QBLOCK/2, 2) -> (BLOCKS, QBLOCK): high and low nibbles interleaved back into columns
    vals = tl.reshape(tl.join((hi * absmax).to(ty), (lo * absmax).to(ty)), [BLOCKS, QBLOCK])
    cols = blk[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    tl.store(OUT + row * n_in + cols, vals, mask=cols < n_in)  # odd `in`: the pad nibble is dropped


_codes: dict[torch.device, torch.Tensor] = {}


def _code_table(device: torch.device) -> torch.Tensor:
    if device not in _codes:
        _codes[device] = NF4_CODE.to(device)
    return _codes[device]


def dequantize_nf4(
    qweight: torch.Tensor,  # uint8 (out, ceil(in/2))
    absmax_q: torch.Tensor,  # int8 (out, nb)
    absmax_scale: torch.Tensor,  # fp32 (out, G)
    absmax_mean: torch.Tensor,  # fp32 (out, G)
    in_features: int,
    dtype: torch.dtype = torch.bfloat16,
    block: int = BLOCK,
    group: int = GROUP,
) -> torch.Tensor:
    """The dense (out, in) weight in `dtype`; equals `dequantize_nf4_reference` up to the final rounding."""
    if not use_triton(qweight) or block % 2 or block & (block - 1):  # the kernel takes powers of 2
        return dequantize_nf4_reference(
            qweight, absmax_q, absmax_scale, absmax_mean, in_features, dtype, block, group
        )
    out, nbytes = qweight.shape
    nb = absmax_q.shape[1]
    w = torch.empty(out, in_features, device=qweight.device, dtype=dtype)
    if out and nbytes:
        blocks = min(_BLOCKS, triton.next_power_of_2(nb))
        _nf4_dequant_kernel[(out, triton.cdiv(nb, blocks))](
            qweight.contiguous(),
            absmax_q.contiguous(),
            absmax_scale.contiguous(),
            absmax_mean.contiguous(),
            _code_table(qweight.device),
            w,
            nbytes,
            in_features,
            nb,
            absmax_scale.shape[1],
            QBLOCK=block,
            QGROUP=group,
            BLOCKS=blocks,
            num_warps=4,
        )
    return w
