"""Sequence tiling of the MLP: long-context activation memory without the (tokens, intermediate) tensors.

An MLP's activations are the largest of a block: gate, up and their SwiGLU product are each
(tokens, intermediate), 3.5x the hidden size for Llama-3, so at 128k tokens one block's MLP holds
~10 GiB in bf16. The MLP is per-token, so it can run over the sequence in tiles with nothing lost:
`tiled_mlp` runs the tiles in forward without keeping their insides (only the input is saved) and,
in backward, recomputes one tile at a time and back-propagates it at once, accumulating the weight
gradients (LoRA factors) tile by tile. Peak MLP memory is then that of one tile, whatever the length;
the price is one more MLP forward (~1/3 of the MLP's FLOPs), so it is only worth it where memory is short.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["tiled_mlp"]


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: Callable, tile: int, *params: torch.Tensor) -> torch.Tensor:
        # params are passed only so autograd runs this backward when they, not x, need gradients
        ctx.fn, ctx.tile = fn, tile
        # recomputation must draw the same dropout masks (LoRA dropout) as this forward
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])  # (n, C)
        out = torch.empty_like(flat)
        with torch.no_grad():
            for s in range(0, flat.shape[0], tile):
                out[s : s + tile] = fn(flat[s : s + tile])
        return out.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        flat, gflat = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        dx = torch.empty_like(flat) if ctx.needs_input_grad[0] else None
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            for s in range(0, flat.shape[0], ctx.tile):
                xt = flat[s : s + ctx.tile].detach().requires_grad_(dx is not None)
                with torch.enable_grad():
                    y = ctx.fn(xt)
                # the weight gradients accumulate into .grad here, tile by tile
                torch.autograd.backward(y, gflat[s : s + ctx.tile])
                if dx is not None:
                    dx[s : s + ctx.tile] = xt.grad
        n_params = len(ctx.needs_input_grad) - 3
        return (None if dx is None else dx.view_as(x), None, None, *([None] * n_params))


def tiled_mlp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, params) -> torch.Tensor:
    """fn(x) for a per-token fn over x (..., C), `tile` tokens at a time, keeping only x for backward.

    `params`: the trainable tensors fn uses; their gradients are accumulated in backward. Without grad
    (evaluation) the tiles just bound the peak.
    """
    if x.reshape(-1, x.shape[-1]).shape[0] <= tile:
        return fn(x)
    if not torch.is_grad_enabled():
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([fn(flat[s : s + tile]) for s in range(0, flat.shape[0], tile)]).view_as(x)
    trainable = [p for p in params if p.requires_grad]
    if not x.requires_grad and not trainable:
        return fn(x)
    return _TiledMLP.apply(x, fn, tile, *trainable)
