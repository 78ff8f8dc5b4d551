"""What the fast path can do here and for a given model, asked without importing a kernel (or triton).

The rest of the package asks these questions (the trainer whether to swap, the memory plan what the
swapped model can recompute in backward) through this module only: the kernels' internals stay theirs.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

__all__ = ["triton_available", "can_recompute_product", "can_recompute_norm"]


@functools.lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (missing libs, wrong CUDA) counts as no triton
        return False
    return True


def triton_available() -> bool:
    """True when triton imports and kernels can run: on a CUDA device, or under TRITON_INTERPRET=1 (CPU)."""
    return _triton_importable() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


def _kernels_run_on(model: nn.Module) -> bool:
    """Whether the fast path's kernels take this model's activations (its device), or fall back."""
    from snuggle.kernels._utils import use_triton

    return use_triton(model.lm_head.weight)


def can_recompute_product(model: nn.Module) -> bool:
    """Whether the blocks' MLPs run SwiGLU inside the LoRA down projection (the fast path's act_down), which
    makes the SwiGLU product again in backward instead of keeping it."""
    if not _triton_importable():  # then nothing was swapped in
        return False
    from snuggle.kernels.lora import fusable
    from snuggle.model.decoder import act_down

    mlps = [block.mlp for block in model.model.layers]
    # the swap point replaced (by the fast path), a down projection it can fuse, and activations the
    # kernel can take (a model on the CPU of a GPU machine has the fast path swapped in, but runs the
    # reference beneath it, which keeps the product)
    return (
        bool(mlps)
        and _kernels_run_on(model)
        and all(m.act_down is not act_down and fusable([m.down_proj]) for m in mlps)
    )


def can_recompute_norm(model: nn.Module) -> bool:
    """Whether every block's q/k/v and gate/up are LoRA groups that take their norm inside (fast path),
    which keep only the norms' inputs."""
    if not _triton_importable():
        return False
    from snuggle.kernels.lora import fast_project, fusable, norm_fusable

    blocks = list(model.model.layers)
    return (
        bool(blocks)
        and _kernels_run_on(model)
        and all(
            b.self_attn.project is fast_project
            and b.mlp.project is fast_project
            and norm_fusable(b.input_layernorm)
            and norm_fusable(b.post_attention_layernorm)
            and fusable([b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj])
            and fusable([b.mlp.gate_proj, b.mlp.up_proj])
            for b in blocks
        )
    )
