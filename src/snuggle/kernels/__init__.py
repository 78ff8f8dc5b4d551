"""Triton fast paths for the decoder's swap points: RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy, LoRA.

Each kernel module holds the triad: `@triton.jit` kernel(s), a Python launcher, and a
`torch.autograd.Function`, with a thin module or function on top. `reference.py` collects the pure-PyTorch
oracles they are tested against, and `swap.apply_fast_path` plugs them into a `Decoder` in place.

Importing this package never imports triton: the kernel modules are loaded only by `apply_fast_path`
(or by a direct import), so a machine without triton, or without a GPU, pays nothing.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_available", "apply_fast_path"]


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


def apply_fast_path(model) -> list[str]:
    """Swap the Triton kernels into a `Decoder` in place; see `snuggle.kernels.swap.apply_fast_path`."""
    from snuggle.kernels.swap import apply_fast_path as _apply

    return _apply(model)
