"""Triton fast paths for the decoder's swap points: RMSNorm, RoPE, SwiGLU, fused linear + cross-entropy, LoRA.

Each kernel module holds the triad: `@triton.jit` kernel(s), a Python launcher, and a
`torch.autograd.Function`, with a thin module or function on top. `reference.py` collects the pure-PyTorch
oracles they are tested against, and `swap.apply_fast_path` plugs them into a `Decoder` in place.

Importing this package never imports triton: the kernel modules are loaded only by `apply_fast_path`
(or by a direct import), so a machine without triton, or without a GPU, pays nothing.
"""

from __future__ import annotations

# triton_available lives in `capabilities` (with what the fast path can recompute); _triton_importable is
# its cache, cleared by tests that hide triton
from snuggle.kernels.capabilities import _triton_importable, triton_available  # noqa: F401

__all__ = ["triton_available", "apply_fast_path"]


def apply_fast_path(model) -> list[str]:
    """Swap the Triton kernels into a `Decoder` in place; see `snuggle.kernels.swap.apply_fast_path`."""
    from snuggle.kernels.swap import apply_fast_path as _apply

    return _apply(model)
