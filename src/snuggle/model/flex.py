"""Exact, memory-linear attention for packed documents: FlexAttention with a block-sparse document mask.

SDPA's flash kernel takes only a plain causal mask; packed rows (several documents a row, none seeing
another) need a (T, T) boolean mask, which both forces SDPA onto a slower kernel and costs T^2 bytes:
16 GiB for one 128k-token row. FlexAttention compiles the same mask into a block-sparse kernel: the
mask is evaluated per 128 x 128 tile (a tile wholly inside another document is skipped, one wholly
inside the causal part of the same document runs unmasked), memory stays linear in T, and the
arithmetic is the flash-attention recurrence, so results equal SDPA's up to rounding.

Used on CUDA (selected by `kernels.swap.apply_fast_path`); elsewhere the decoder keeps SDPA with the
boolean mask, which is the reference the tests compare this with.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["flex_available", "document_block_mask", "flex_attention"]


@functools.lru_cache(maxsize=1)
def _flex_importable() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return False
    return True


def flex_available(device: torch.device) -> bool:
    return device.type == "cuda" and _flex_importable()


def document_block_mask(doc_ids: torch.Tensor, window: int | None = None):
    """A BlockMask for rows of packed documents (B, T): causal, within a document, within `window`."""
    from torch.nn.attention.flex_attention import create_block_mask

    B, T = doc_ids.shape

    def mask_mod(b, h, q, kv):
        m = (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])
        if window is not None:
            m = m & (q - kv < window)
        return m

    # compiled mask construction evaluates the mask per tile instead of materializing B x T x T
    return create_block_mask(mask_mod, B, None, T, T, device=doc_ids.device, _compile=doc_ids.is_cuda)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as fa

    # compiled once per process; without compilation FlexAttention runs a slow reference
    return torch.compile(fa, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D)."""
    if q.is_cuda:
        fn = _compiled_flex()
    else:  # tests on CPU: the eager reference implementation
        from torch.nn.attention.flex_attention import flex_attention as fn
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])
