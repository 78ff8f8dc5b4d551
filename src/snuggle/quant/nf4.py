"""NF4 (4-bit NormalFloat, QLoRA) frozen weights, blockwise with double-quantized scales.

Layout of an (out, in) weight, row-aligned so that every tensor can be sharded along dim 0 (FSDP2
shards parameters by rows) and a row never shares a block with another row:

    qweight       uint8 (out, ceil(in/2))   two 4-bit codes per byte, the even column in the high nibble
                                            (bitsandbytes' order)
    absmax_q      int8  (out, ceil(in/64))  each block's absolute maximum, quantized: the second
                                            quantization of "double quantization"
    absmax_scale  fp32  (out, G)            per group of up to 256 blocks of a row: absmax = q * scale + mean
    absmax_mean   fp32  (out, G)

An element is NF4_CODE[code] * absmax of its block. At 64 weights a block that is 4 + 8/64 bits per
weight, plus 64 bits per row and group: ~4.13 bits against bf16's 16.

Quantizing stores the nearest of the 16 code values (QLoRA's normal-float levels, the values
bitsandbytes uses, so pre-quantized `*-bnb-4bit` checkpoints keep their codes when converted).
`dequantize_nf4_reference` is the plain-PyTorch path (CPU, tests); on CUDA `NF4Weight.dequantize` runs
what its swap point `NF4Weight.cuda_dequantize` holds: the Triton kernel of `snuggle.kernels.nf4` once
`snuggle.kernels.swap.apply_fast_path` set it there (this package never imports the kernels).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from snuggle.quant.base import QuantizedWeight, as_dense

__all__ = [
    "NF4_CODE",
    "BLOCK",
    "GROUP",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4_reference",
    "as_dense",
    "QUANTIZABLE",
    "quantize_model",
]

# what QLoRA stores in 4 bits: every projection of every block (embeddings, norms and lm_head stay 16-bit)
QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")

# QLoRA's NF4 levels (Dettmers et al. 2023, as in bitsandbytes): quantiles of N(0, 1) scaled to [-1, 1],
# with an exact zero
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
BLOCK = 64  # weights per absmax (QLoRA's choice)
GROUP = 256  # absmax values per second-level scale


def _double_quantize(absmax: torch.Tensor, group: int):
    """absmax (out, nb) fp32 -> int8 codes (out, nb), scale and mean (out, G), per row and group."""
    out, nb = absmax.shape
    ng = math.ceil(nb / group)
    pad = ng * group - nb
    a = F.pad(absmax, (0, pad)).view(out, ng, group)
    valid = F.pad(torch.ones_like(absmax), (0, pad)).view(out, ng, group)
    mean = (a * valid).sum(-1) / valid.sum(-1)  # (out, G)
    dev = (a - mean[..., None]) * valid
    scale = dev.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale is exact
    q = torch.round(dev / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.view(out, ng * group)[:, :nb].contiguous(), scale.contiguous(), mean.contiguous()


def _block_absmax(
    absmax_q: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, group: int
) -> torch.Tensor:
    """Undo the second quantization: (out, nb) fp32."""
    g = torch.arange(absmax_q.shape[1], device=absmax_q.device) // group  # block -> its group
    return absmax_q.float() * scale[:, g] + mean[:, g]


@torch.no_grad()
def quantize_nf4(w: torch.Tensor, block: int = BLOCK, group: int = GROUP) -> dict[str, torch.Tensor]:
    """(out, in) float weight -> the four NF4 tensors (see the module docstring), on w's device."""
    if w.ndim != 2:
        raise ValueError(f"NF4 quantizes 2-D weights, got shape {tuple(w.shape)}")
    out, n = w.shape
    nb = math.ceil(n / block)
    wf = F.pad(w.float(), (0, nb * block - n)).view(out, nb, block)
    absmax = wf.abs().amax(-1)  # (out, nb)
    absmax_q, scale, mean = _double_quantize(absmax, group)
    # normalize by the absmax the kernel will see (after its 8-bit rounding), so that the codes are the
    # nearest levels of the weight as it will be reconstructed
    seen = _block_absmax(absmax_q, scale, mean, group)
    seen = torch.where(seen > 0, seen, torch.ones_like(seen))
    code = NF4_CODE.to(w.device)
    mids = (code[1:] + code[:-1]) / 2  # (15,) decision boundaries between neighbouring levels
    idx = torch.bucketize((wf / seen[..., None]).clamp_(-1, 1), mids).to(torch.uint8)
    idx = idx.view(out, nb * block)[:, :n]
    if n % 2:
        idx = F.pad(idx, (0, 1))
    packed = (idx[:, 0::2] << 4) | idx[:, 1::2]  # (out, ceil(n/2))
    return {"qweight": packed.contiguous(), "absmax_q": absmax_q, "absmax_scale": scale, "absmax_mean": mean}


def dequantize_nf4_reference(
    qweight: torch.Tensor,  # uint8 (out, ceil(in/2))
    absmax_q: torch.Tensor,  # int8 (out, nb)
    absmax_scale: torch.Tensor,  # fp32 (out, G)
    absmax_mean: torch.Tensor,  # fp32 (out, G)
    in_features: int,
    dtype: torch.dtype = torch.float32,
    block: int = BLOCK,
    group: int = GROUP,
) -> torch.Tensor:
    """The (out, in) weight in `dtype`; plain PyTorch, the oracle of the Triton kernel."""
    out = qweight.shape[0]
    nb = absmax_q.shape[1]
    idx = torch.stack(((qweight >> 4) & 15, qweight & 15), dim=-1).view(out, -1)[:, :in_features]
    vals = NF4_CODE.to(qweight.device)[idx.long()]  # (out, in)
    vals = F.pad(vals, (0, nb * block - in_features)).view(out, nb, block)
    absmax = _block_absmax(absmax_q, absmax_scale, absmax_mean, group)
    return (vals * absmax[..., None]).view(out, nb * block)[:, :in_features].to(dtype)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    # Parameters (not buffers) so that FSDP2 shards them (by rows) with the block; never trained
    return nn.Parameter(t, requires_grad=False)


class NF4Weight(QuantizedWeight):
    """A frozen (out, in) linear weight held in NF4; takes the place of the `weight` Parameter.

    Set as `linear.weight`, it keeps the checkpoint name as a prefix (`q_proj.weight.qweight`, ...).
    Modules multiply by it through `snuggle.quant.base` (`frozen_linear`, `frozen_mm`, ...), which
    dequantize it into a temporary of the activation dtype (a Triton kernel on CUDA), used for one
    matmul and freed: the dense weight never persists, in forward or backward.
    """

    # the swap point of CUDA weights' dequantization (same signature as the reference), set by the fast
    # path; class-wide rather than per module, because FSDP's sharded load makes the NF4 weights of its
    # blocks after the fast path was swapped into the model
    cuda_dequantize: ClassVar[Callable[..., torch.Tensor]] = staticmethod(dequantize_nf4_reference)

    def __init__(
        self,
        qweight: torch.Tensor,
        absmax_q: torch.Tensor,
        absmax_scale: torch.Tensor,
        absmax_mean: torch.Tensor,
        in_features: int,
        dtype: torch.dtype = torch.bfloat16,
        block: int = BLOCK,
        group: int = GROUP,
    ):
        super().__init__()
        self.qweight = _frozen(qweight)
        self.absmax_q = _frozen(absmax_q)
        # the fp32 second-level scales are buffers: 8 bytes a row, not worth sharding, and a data-parallel
        # wrapper's mixed-precision cast (FSDP2 casts floating parameters to bf16) must not round them,
        # or the weights would differ from a single process's
        self.register_buffer("absmax_scale", absmax_scale)
        self.register_buffer("absmax_mean", absmax_mean)
        self.in_features, self.block, self.group = in_features, block, group
        self.dtype = dtype  # the dtype of the dense weight it stands for (merges and exports use it)

    @classmethod
    def from_dense(
        cls, w: torch.Tensor, dtype: torch.dtype | None = None, block: int = BLOCK, group: int = GROUP
    ) -> NF4Weight:
        parts = quantize_nf4(w, block, group)
        return cls(**parts, in_features=w.shape[1], dtype=dtype or w.dtype, block=block, group=group)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.qweight.shape[0], self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight in `dtype` (default: the dtype it was quantized from)."""
        dtype = dtype or self.dtype
        args = (self.qweight, self.absmax_q, self.absmax_scale, self.absmax_mean, self.in_features)
        fn = self.cuda_dequantize if self.qweight.is_cuda else dequantize_nf4_reference
        return fn(*args, dtype=dtype, block=self.block, group=self.group)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, block={self.block}, group={self.group}, dtype={self.dtype}"


@torch.no_grad()
def quantize_model(model: nn.Module, dtype: torch.dtype | None = None, cls=NF4Weight) -> int:
    """Swap every dense block projection weight of a built model for its quantized form (`cls`: NF4Weight,
    or `snuggle.quant.fp8.FP8Weight`), one at a time.

    For models made in memory (benchmarks, tests); loading from a checkpoint quantizes as it reads
    (`snuggle.load(..., quantize="nf4")`). Returns how many weights were quantized.
    """
    n = 0
    for name, mod in list(model.named_modules()):
        w = mod._parameters.get("weight")
        if w is None or not QUANTIZABLE.fullmatch(f"{name}.weight"):
            continue
        q = cls.from_dense(w.detach(), dtype=dtype or w.dtype)
        del mod._parameters["weight"]
        mod.weight = q  # the dense tensor is freed here unless someone else holds it
        n += 1
    return n
