"""The pure-PyTorch oracles the kernels replace, collected in one place.

Most live where the model uses them (decoder, loss, lora) and are re-exported here rather than copied, so
a change to the model's math is a change to the oracle too. Only what has no functional form elsewhere
is defined here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snuggle.lora import LoRALinear
from snuggle.model.decoder import RMSNorm, apply_rope, rope_qk, swiglu
from snuggle.model.loss import IGNORE_INDEX, cross_entropy_sum

__all__ = [
    "IGNORE_INDEX",
    "LoRALinear",
    "RMSNorm",
    "apply_rope",
    "cross_entropy_sum",
    "lora_linear",
    "rms_norm",
    "rope_qk",
    "swiglu",
]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.forward` as a function of (x, weight, eps)."""
    with torch.device("meta"):  # a shell only: functional_call supplies the real weight
        norm = RMSNorm(weight.shape[0], eps)
    return torch.func.functional_call(norm, {"weight": weight}, (x,))


def lora_linear(
    x: torch.Tensor,  # (..., in)
    weight: torch.Tensor,  # (out, in) frozen
    bias: torch.Tensor | None,  # (out,)
    lora_A: torch.Tensor,  # (r, in)
    lora_B: torch.Tensor,  # (out, r)
    scale: float,
) -> torch.Tensor:
    """`LoRALinear.forward` without dropout, as a function of its tensors."""
    dt = x.dtype
    y = F.linear(x, weight.to(dt), None if bias is None else bias.to(dt))
    return y + F.linear(F.linear(x, lora_A.to(dt)), lora_B.to(dt)) * scale
