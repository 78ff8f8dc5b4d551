"""Activation memory: per-block recomputation, optionally with the saved block inputs kept in CPU memory.

A checkpointed block keeps only its input (B, T, C) and recomputes its insides in backward: ~2N extra
FLOPs a token, activation memory of one block instead of all. Offloading moves even that input to pinned
host memory on a side stream during forward and brings it back, one block ahead, during backward, so
the copies (33 MB a block for an 8B model at 2 x 2048 tokens, ~1.5 ms over PCIe 4) hide under the
block's recomputation (~7 ms). Which blocks to checkpoint is a choice: each block left stored is faster
and costs its activations, so a run checkpoints only as many as its memory requires.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ActivationOffloader", "run_block", "configure_checkpointing"]


class ActivationOffloader:
    """Pinned host buffers (reused across steps) and a side stream for block inputs, keyed by layer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: dict[int, torch.Tensor] = {}
        self.ready: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def store(self, i: int, x: torch.Tensor) -> None:
        buf = self.host.get(i)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.stream is not None)
            self.host[i] = buf
        if self.stream is None:
            buf.copy_(x)
            return
        # the copy must start after x is computed, and x must outlive the copy on the side stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
        x.record_stream(self.stream)

    def prefetch(self, i: int) -> None:
        if i in self.ready or i not in self.host:
            return
        buf = self.host[i]
        if self.stream is None:
            self.ready[i] = (buf.clone(), None)
            return
        with torch.cuda.stream(self.stream):
            x = buf.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.ready[i] = (x, ev)

    def fetch(self, i: int) -> torch.Tensor:
        self.prefetch(i)
        x, ev = self.ready.pop(i)
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            x.record_stream(cur)
        return x


class _OffloadedBlock(torch.autograd.Function):
    """Forward without saving activations; backward fetches the input from host and recomputes."""

    @staticmethod
    def forward(ctx, x, layer, i, offloader, cos, sin, mask):
        ctx.layer, ctx.i, ctx.offloader, ctx.mask = layer, i, offloader, mask
        ctx.save_for_backward(cos, sin)
        # recomputation must see the same dropout masks as the forward did
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            y = layer(x, cos, sin, mask)
        offloader.store(i, x)
        return y

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved_tensors
        x = ctx.offloader.fetch(ctx.i)
        if ctx.i > 0:
            ctx.offloader.prefetch(ctx.i - 1)  # overlap the next block's copy with this recomputation
        x = x.detach().requires_grad_(True)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad():
                y = ctx.layer(x, cos, sin, ctx.mask)
        torch.autograd.backward(y, gy)
        return x.grad, None, None, None, None, None, None


def run_block(layer: nn.Module, i: int, x, cos, sin, mask, cache, model) -> torch.Tensor:
    """Run block i as the model's checkpointing settings say (stored, recomputed, or offloaded)."""
    if not torch.is_grad_enabled() or cache is not None or i not in model.checkpoint_layers:
        return layer(x, cos, sin, mask, cache)
    if model.offloader is not None:
        return _OffloadedBlock.apply(x, layer, i, model.offloader, cos, sin, mask)
    return checkpoint(layer, x, cos, sin, mask, use_reentrant=False)


def configure_checkpointing(model: nn.Module, n_layers: int | None, offload: bool = False) -> list[int]:
    """Checkpoint the first `n_layers` blocks (None: all, 0: none), offloading their inputs if asked."""
    total = model.args.num_layers
    n = total if n_layers is None else max(0, min(n_layers, total))
    model.checkpoint_layers = set(range(n))
    device = model.lm_head.weight.device
    model.offloader = ActivationOffloader(device) if offload and n else None
    return sorted(model.checkpoint_layers)
