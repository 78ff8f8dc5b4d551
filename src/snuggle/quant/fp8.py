"""FP8 frozen weights: float8 e4m3 with one scale per output channel, and FP8 GEMMs for the frozen products.

An (out, in) weight W is stored as

    qweight  uint8 (out, in)  the float8_e4m3fn bytes of W / scale, row by row; uint8 so that FSDP2
                              shards it by rows like NF4's codes and its mixed-precision cast (which
                              rounds floating parameters to bf16) leaves it alone
    scale    fp32  (out, 1)   a buffer (4 bytes a row, not worth sharding)

1 byte a weight plus 4 a row: an 8B base takes ~8 GB instead of 16.

Every scale here, the weight's per row and the activations' per token, is the least power of two at
least amax / 448 (e4m3's largest value; torchao's rowwise recipe rounds its scales so too). Multiplying
by a power of two is exact in bf16, so quantizing a 16-bit tensor needs no fp32 copy of it and rounds
once, to e4m3; and the input gradient can fold the weight's per-channel scales into the gradient
exactly (below). Against the plain amax / 448 scale it leaves at most one binade of e4m3's range unused:
its relative precision (3 mantissa bits) is the same in every binade, so only values below about 2^-14
of their row's maximum (one binade sooner) lose bits to subnormals.

The frozen products, with x (n, in) and the output gradient g (n, out):

    forward    y  = x W^T   x quantized per token (e4m3), one scaled GEMM with rowwise scales
    dgrad      dx = g W = (g diag(s_W)) W8: g's columns scaled by the weight's scales (exact: powers of
                    two), then quantized per token, against W8 transposed (the GEMM wants its second
                    operand column-major: a 1-byte-a-weight copy made in backward and freed, rather
                    than a second stored copy, which would cost what FP8 saves)

The gradient is quantized to e4m3, not e5m2: with a scale per token the range a row needs is covered by
its scale, and e4m3's extra mantissa bit halves the rounding error (torchtitan's rowwise recipe makes the
same choice). The quantization of x and g is straight-through: dx is the gradient of x W^T at x, as
if x were not rounded. The frozen W gets no gradient.

On a CUDA GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell) the GEMMs run in
`torch._scaled_mm` (fp32 accumulation, the scales applied in its epilogue). On the CPU the reference
path computes the same function in fp32 (the same e4m3 values and scales, dequantized, multiplied):
it trains and is the tests' oracle, and is no faster than fp32. A CUDA GPU without FP8 GEMMs is refused
with one line (`check_fp8_device`): there the reference would only be a slower bf16. The per-token
quantization runs as a few eager kernels (amax, scale, multiply, cast); fusing them is left to a kernel
once a GPU profile says it matters.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from snuggle.errors import SnuggleError
from snuggle.quant.base import QuantizedWeight

__all__ = [
    "F8",
    "F8_MAX",
    "FP8Weight",
    "FP8LinearFunction",
    "quantize_rows",
    "fp8_mm",
    "fp8_mm_reference",
    "fp8_mm_scaled",
    "fp8_gemm_available",
    "check_fp8_device",
]

F8 = torch.float8_e4m3fn
F8_MAX = float(torch.finfo(F8).max)  # 448
_ALIGN = 16  # _scaled_mm wants the reduction and output dims in multiples of 16


def _pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The least power of two 2^e with amax / 2^e <= F8_MAX (any amax >= 0, fp32); 1 for a zero row.

    At least 2^-126 (fp32's least normal), so that its inverse is finite: a row below ~1e-35 then
    quantizes to zeros."""
    m, e = torch.frexp(amax / F8_MAX)  # amax / 448 = m 2^e, m in [0.5, 1): 2^e is above it ...
    e = e - (m == 0.5).to(e.dtype)  # ... or 2^(e-1) is amax / 448 itself
    e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp_(min=-126)
    return torch.ldexp(torch.ones_like(amax), e)


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    # bf16 and fp32 share fp32's exponent range, so scaling by a power of two is exact in them; fp16's
    # narrow range could overflow or flush, so it scales in fp32
    return t.dtype if t.dtype in (torch.bfloat16, torch.float32) else torch.float32


@torch.no_grad()
def quantize_rows(
    t: torch.Tensor, col_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float -> (n, k) e4m3 and (n, 1) fp32 power-of-two scales: t ~ q * scale, row by row.

    With `col_scale` (1, k), powers of two, the rows of t * col_scale are quantized (the input gradient's
    fold of the weight's scales)."""
    wd = _work_dtype(t)
    u = t.to(wd)  # t itself when already in wd
    if col_scale is not None:
        u = u * col_scale.to(wd)  # exact: powers of two
    amax = torch.linalg.vector_norm(u, float("inf"), dim=1, keepdim=True).float()  # (n, 1)
    scale = _pow2_scale(amax)
    inv = (1.0 / scale).to(wd)  # exact
    # one 16-bit copy of t at most: scaled in place when u is already a copy, never writing into t
    q = u.mul_(inv) if u is not t else u * inv
    return q.clamp_(-F8_MAX, F8_MAX).to(F8), scale


def fp8_mm_reference(
    a8: torch.Tensor,  # e4m3 (n, k)
    sa: torch.Tensor,  # fp32 (n, 1)
    b8: torch.Tensor,  # e4m3 (m, k)
    sb: torch.Tensor,  # fp32 (m, 1)
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """(a8 diag-scaled by sa) (b8 diag-scaled by sb)^T, (n, m): in fp32, then rounded to `out_dtype`."""
    return ((a8.float() * sa) @ (b8.float() * sb).t()).to(out_dtype)


def _pad_to(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """An e4m3 (r, c) tensor zero-padded to (rows, cols), through its bytes (e4m3's zero is byte 0)."""
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    return F.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r)).view(F8)


def fp8_mm_scaled(a8, sa, b8, sb, out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_mm_reference` by `torch._scaled_mm` with rowwise scales (CUDA, compute capability 8.9+; torch
    has a CPU kernel too, which the tests use to check this call's conventions without a GPU).

    Shapes that are not multiples of 16 (never a real model's) are zero-padded: zeros add nothing. The
    GEMM writes bf16, the one output type rowwise scaling takes on every torch build we target; another
    activation dtype gets it cast (an fp32 run on a GPU rounds the frozen products to bf16)."""
    n, k = a8.shape
    m = b8.shape[0]
    kp, mp = -(-k // _ALIGN) * _ALIGN, -(-m // _ALIGN) * _ALIGN
    a8, b8 = _pad_to(a8, n, kp), _pad_to(b8, mp, kp)
    if mp != m:
        sb = F.pad(sb, (0, 0, 0, mp - m), value=1.0)
    # b8 (m, k) row-major is b8^T (k, m) column-major, the layout _scaled_mm takes as its second operand
    y = torch._scaled_mm(
        a8, b8.t(), scale_a=sa.contiguous(), scale_b=sb.t().contiguous(), out_dtype=torch.bfloat16
    )  # (n, mp)
    y = y if mp == m else y[:, :m]
    return y.to(out_dtype) if out_dtype != torch.bfloat16 else y.contiguous()


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _rowwise_runs(index: int) -> bool:
    """Whether this torch build has a rowwise-scaled FP8 GEMM for GPU `index`: one tiny call, once."""
    dev = torch.device("cuda", index)
    a8, sa = quantize_rows(torch.ones(16, 16, device=dev))
    try:
        fp8_mm_scaled(a8, sa, a8, sa, torch.bfloat16)
    except RuntimeError:
        return False
    return True


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def fp8_gemm_available(device: torch.device) -> bool:
    """Whether `device` runs FP8 GEMMs: a CUDA GPU of compute capability 8.9 or newer whose torch build
    has the rowwise-scaled GEMM."""
    if device.type != "cuda":
        return False
    return _capability(_index(device)) >= (8, 9) and _rowwise_runs(_index(device))


def check_fp8_device(device: torch.device) -> None:
    """One line for a CUDA GPU without FP8 GEMMs (the CPU runs the reference path)."""
    if device.type != "cuda" or fp8_gemm_available(device):
        return
    major, minor = _capability(_index(device))
    if (major, minor) < (8, 9):
        raise SnuggleError(
            f"model.quantize=fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper, "
            f"Blackwell); this one is {major}.{minor}: use model.quantize=nf4 or none"
        )
    raise SnuggleError(
        f"model.quantize=fp8: torch {torch.__version__} has no rowwise-scaled FP8 GEMM (torch._scaled_mm) "
        f"for this GPU ({major}.{minor}): upgrade torch, or use model.quantize=nf4 or none"
    )


def fp8_mm(a8, sa, b8, sb, out_dtype: torch.dtype) -> torch.Tensor:
    """(a8 sa)(b8 sb)^T, (n, m): the scaled GEMM on CUDA, the reference elsewhere."""
    if a8.is_cuda:
        check_fp8_device(a8.device)
        return fp8_mm_scaled(a8, sa, b8, sb, out_dtype)
    return fp8_mm_reference(a8, sa, b8, sb, out_dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # a Parameter (not a buffer) so that FSDP2 shards it (by rows) with the block; never trained
    return nn.Parameter(t, requires_grad=False)


class FP8Weight(QuantizedWeight):
    """A frozen (out, in) linear weight held in float8 e4m3 with per-output-channel scales.

    Set as `linear.weight` (names `q_proj.weight.qweight`, `q_proj.weight.scale`). Its products run as
    FP8 GEMMs (`mm`, `mm_t`, `linear`); `dequantize` gives the dense weight (merges and exports).
    """

    accumulates = False  # the scaled GEMM writes a new output

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.qweight = _frozen(qweight)  # uint8 (out, in): e4m3 bytes
        # fp32 and a buffer: a data-parallel wrapper's bf16 cast of floating parameters must not touch it
        self.register_buffer("scale", scale)  # fp32 (out, 1), powers of two
        self.dtype = dtype

    @classmethod
    @torch.no_grad()
    def from_dense(cls, w: torch.Tensor, dtype: torch.dtype | None = None) -> FP8Weight:
        if w.ndim != 2:
            raise ValueError(f"FP8 quantizes 2-D weights, got shape {tuple(w.shape)}")
        q, scale = quantize_rows(w.float())  # once, at load: fp32 whatever the checkpoint's dtype
        return cls(q.view(torch.uint8), scale, dtype or w.dtype)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def w8(self) -> torch.Tensor:
        return self.qweight.view(F8)  # (out, in) e4m3, no copy

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.w8.float() * self.scale).to(dtype or self.dtype)

    def mm(self, x2: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        x8, sx = quantize_rows(x2)  # (n, in), (n, 1)
        y = fp8_mm(x8, sx, self.w8, self.scale, x2.dtype)  # (n, out)
        return y if acc is None else acc.add_(y)

    def mm_t(self, g2: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
        g8, sg = quantize_rows(g2, self.scale.t())  # g diag(s_W), per token: (n, out), (n, 1)
        wt8 = self.w8.t().contiguous()  # (in, out): W8^T row-major, the scaled GEMM's layout
        # W's scales are in g8 already
        ones = torch.ones(wt8.shape[0], 1, dtype=torch.float32, device=wt8.device)
        dx = fp8_mm(g8, sg, wt8, ones, g2.dtype)  # (n, in)
        return dx if acc is None else acc.add_(dx)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return FP8LinearFunction.apply(x, bias, self)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, dtype={self.dtype}"


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b with the FP8 weight `weight`: FP8 GEMMs forward and for dx; saves nothing of x
    (a frozen weight needs no x for its gradient)."""

    @staticmethod
    def forward(ctx, x, bias, weight: FP8Weight):
        y = weight.mm(x.reshape(-1, x.shape[-1]))  # (n, out)
        if bias is not None:
            y.add_(bias.to(y.dtype))
        ctx.weight = weight
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g2 = g.reshape(-1, g.shape[-1])  # (n, out)
        dx = ctx.weight.mm_t(g2).view(*g.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        db = g2.sum(0) if ctx.needs_input_grad[1] else None
        return dx, db, None
