"""AdamW with 8-bit optimizer state: 2 bytes per trainable parameter instead of fp32 AdamW's 8.

Each moment is stored blockwise (256 values a block) as one byte per value plus an fp32 absmax per block,
on a logarithmic code: the 8 bits index levels spaced evenly in log-magnitude, so every value keeps
the same relative precision (~2-4%) whatever its size within the block. A linear 8-bit code would round
the small second moments of a block to zero, and dividing by their square root would turn into
steps of lr * m / eps: the failure 8-bit optimizers must avoid (Dettmers et al., 2022, use a
"dynamic" code for the same reason).

Per step and parameter the state is decoded to fp32, updated exactly as `torch.optim.AdamW` does, and
encoded again; the fp32 temporaries exist for one parameter at a time. Tensors smaller than
`min_8bit_size` (norm gains, biases) keep fp32 state: their saving is nil and their precision cheap.
The state is plain tensors (uint8 codes, fp32 absmax), so checkpoints save and resume it as any other.
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdamW8bit", "encode", "decode", "signed_code", "unsigned_code"]

BLOCK = 256


def _log_levels(n: int, decades: float) -> torch.Tensor:
    """n magnitudes 10^-decades .. 1, evenly spaced in log."""
    return torch.logspace(-decades, 0.0, n, dtype=torch.float32)


def unsigned_code() -> torch.Tensor:
    """256 levels for a non-negative moment (v): 0 and 255 magnitudes over 10 decades."""
    return torch.cat((torch.zeros(1), _log_levels(255, 10.0)))


def signed_code() -> torch.Tensor:
    """256 levels for a signed moment (m): 0, +-127 magnitudes over 6 decades, one spare +1."""
    mag = _log_levels(127, 6.0)
    return torch.cat((-mag.flip(0), torch.zeros(1), mag, torch.ones(1)))


_codes: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _code(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels (256,) sorted ascending, decision boundaries (255,)) on `device`."""
    key = (signed, device)
    if key not in _codes:
        levels = (signed_code() if signed else unsigned_code()).to(device)
        _codes[key] = (levels, (levels[1:] + levels[:-1]) / 2)
    return _codes[key]


def encode(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x (any shape) -> uint8 codes (numel,) and fp32 absmax (ceil(numel/256),)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nb = math.ceil(n / BLOCK)
    blocks = torch.nn.functional.pad(flat, (0, nb * BLOCK - n)).view(nb, BLOCK)
    absmax = blocks.abs().amax(-1)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    _, bounds = _code(signed, x.device)
    # nearest level in linear terms: the boundaries are the midpoints between neighbouring levels
    codes = torch.bucketize(blocks / safe[:, None], bounds)
    if not signed:
        # a positive second moment never decodes to 0: its square root divides the step
        codes = torch.where(blocks > 0, codes.clamp_min(1), codes)
    codes = codes.to(torch.uint8)
    return codes.view(-1)[:n].contiguous(), absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool, shape) -> torch.Tensor:
    levels, _ = _code(signed, codes.device)
    n = codes.numel()
    nb = absmax.numel()
    vals = torch.nn.functional.pad(levels[codes.long()], (0, nb * BLOCK - n)).view(nb, BLOCK)
    return (vals * absmax[:, None]).view(-1)[:n].view(shape)


class AdamW8bit(torch.optim.Optimizer):
    """`torch.optim.AdamW` semantics (decoupled weight decay, bias correction) with 8-bit moments."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        min_8bit_size: int = 4096,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.min_8bit_size = min_8bit_size

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                st = self.state[p]
                quantized = p.numel() >= self.min_8bit_size
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    if quantized:
                        st["exp_avg_q"], st["exp_avg_absmax"] = encode(torch.zeros_like(g), True)
                        st["exp_avg_sq_q"], st["exp_avg_sq_absmax"] = encode(torch.zeros_like(g), False)
                    else:
                        st["exp_avg"] = torch.zeros_like(g)
                        st["exp_avg_sq"] = torch.zeros_like(g)
                st["step"] += 1
                step = float(st["step"])
                if quantized:
                    m = decode(st["exp_avg_q"], st["exp_avg_absmax"], True, g.shape)
                    v = decode(st["exp_avg_sq_q"], st["exp_avg_sq_absmax"], False, g.shape)
                else:
                    m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                pf = p.float() if p.dtype != torch.float32 else p
                if wd:
                    pf.mul_(1 - lr * wd)
                pf.addcdiv_(m, denom, value=-lr / bc1)
                if pf is not p:
                    p.copy_(pf)
                if quantized:
                    st["exp_avg_q"], st["exp_avg_absmax"] = encode(m, True)
                    st["exp_avg_sq_q"], st["exp_avg_sq_absmax"] = encode(v, False)
        return loss
