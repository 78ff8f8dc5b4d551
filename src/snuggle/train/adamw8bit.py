"""AdamW with 8-bit optimizer state: 2 bytes per trainable parameter instead of fp32 AdamW's 8.

Each moment is stored blockwise (256 values a block, along each row of a matrix) as one byte per value
plus an fp32 absmax per block, on a logarithmic code: the 8 bits index levels spaced evenly in
log-magnitude, so every value keeps the same relative precision (~2-4%) whatever its size within the
block. A linear 8-bit code would round the small second moments of a block to zero, and dividing by
their square root would turn into steps of lr * m / eps: the failure 8-bit optimizers must avoid
(Dettmers et al., 2022, use a "dynamic" code for the same reason).

Per step and parameter the state is decoded to fp32, updated exactly as `torch.optim.AdamW` does, and
encoded again; the fp32 temporaries exist for one parameter at a time. Vectors and tensors smaller than
`min_8bit_size` (norm gains, biases) keep fp32 state: their saving is nil and their precision cheap.

Blocks never cross a row, so the state of a matrix is the same whether one process holds it or FSDP2
holds it as row shards (`Shard(0)`): each process codes its own rows, the same blocks one process would
code, and the curve does not depend on the world size. The state has the parameter's layout (codes
(*shape) uint8, absmax (*shape[:-1], blocks a row) fp32), as DTensors with the parameter's placements
under FSDP2, so checkpoints save it as any other state and a resume on another world size re-shards it.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor

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
    """fp32 x (*lead, n) -> uint8 codes (*lead, n) and fp32 absmax (*lead, ceil(n/256)): blocks along rows."""
    n = x.shape[-1]
    nb = math.ceil(n / BLOCK)
    blocks = torch.nn.functional.pad(x.float(), (0, nb * BLOCK - n)).view(*x.shape[:-1], nb, BLOCK)
    absmax = blocks.abs().amax(-1)  # (*lead, nb)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    _, bounds = _code(signed, x.device)
    # nearest level in linear terms: the boundaries are the midpoints between neighbouring levels
    codes = torch.bucketize(blocks / safe[..., None], bounds)
    if not signed:
        # a positive second moment never decodes to 0: its square root divides the step
        codes = torch.where(blocks > 0, codes.clamp_min(1), codes)
    codes = codes.to(torch.uint8).view(*x.shape[:-1], nb * BLOCK)
    return codes[..., :n].contiguous(), absmax


def decode(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes (*lead, n), fp32 absmax (*lead, nb) -> fp32 values (*lead, n)."""
    levels, _ = _code(signed, codes.device)
    n, nb = codes.shape[-1], absmax.shape[-1]
    vals = torch.nn.functional.pad(levels[codes.long()], (0, nb * BLOCK - n))
    vals = vals.view(*codes.shape[:-1], nb, BLOCK) * absmax[..., None]
    return vals.view(*codes.shape[:-1], nb * BLOCK)[..., :n]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor (FSDP2's shard); a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _like(p: torch.Tensor, local: torch.Tensor, last: int | None = None) -> torch.Tensor:
    """State made from `local` laid out as parameter `p` (its last dim `last` long, if given): a DTensor of
    p's mesh and placements when p is one, so that a checkpoint records (and a resume re-cuts) the whole
    tensor, not this rank's part. The state shards as p does: along rows (FSDP2's Shard(0))."""
    if not isinstance(p, DTensor):
        return local
    shape = (*p.shape[:-1], p.shape[-1] if last is None else last)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


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
                w, g = _local(p), _local(p.grad).float()  # this process's rows under FSDP2
                st = self.state[p]
                # by the whole tensor's size and rank: every world size codes the same tensors
                quantized = p.ndim >= 2 and p.numel() >= self.min_8bit_size
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    zeros = torch.zeros_like(g)
                    if quantized:
                        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                            codes, absmax = encode(zeros, signed)
                            st[f"{key}_q"] = _like(p, codes)
                            st[f"{key}_absmax"] = _like(p, absmax, last=absmax.shape[-1])
                    else:
                        st["exp_avg"], st["exp_avg_sq"] = _like(p, zeros), _like(p, zeros.clone())
                st["step"] += 1
                step = float(st["step"])
                if quantized:
                    m = decode(_local(st["exp_avg_q"]), _local(st["exp_avg_absmax"]), True)
                    v = decode(_local(st["exp_avg_sq_q"]), _local(st["exp_avg_sq_absmax"]), False)
                else:
                    m, v = _local(st["exp_avg"]), _local(st["exp_avg_sq"])
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bc1, bc2 = 1 - beta1**step, 1 - beta2**step
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                wf = w.float() if w.dtype != torch.float32 else w
                if wd:
                    wf.mul_(1 - lr * wd)
                wf.addcdiv_(m, denom, value=-lr / bc1)
                if wf is not w:
                    w.copy_(wf)
                if quantized:
                    for key, signed, x in (("exp_avg", True, m), ("exp_avg_sq", False, v)):
                        codes, absmax = encode(x, signed)
                        _local(st[f"{key}_q"]).copy_(codes)
                        _local(st[f"{key}_absmax"]).copy_(absmax)
        return loss
