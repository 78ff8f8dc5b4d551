"""Next-token loss from hidden states: lm_head projection fused with cross-entropy, in token chunks.

The tokens x vocab logits are the largest activation of a small model (2 x 2048 tokens x 49152 vocab is
805 MB in fp32, and as much again for their gradient). Above a size threshold we project and take the
loss chunk by chunk under activation checkpointing, so only one chunk's logits exist at a time and the
lm_head matmul is recomputed in backward. Below it, the plain path is faster and costs little memory,
so small runs do not pay for a saving they do not need.

This is the pure-PyTorch path (CPU, and the oracle for the fused GPU kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["cross_entropy_sum", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # the label value torch.nn.functional.cross_entropy skips by default
# logits elements (tokens x vocab) above which we go chunked: 2^27 fp32 values = 512 MiB
_PLAIN_LIMIT = 1 << 27


def _chunk_loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, w.to(h.dtype)).float()  # (n, V), fp32 for a stable log-softmax
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def cross_entropy_sum(
    hidden: torch.Tensor,  # (B, T, C)
    weight: torch.Tensor,  # (V, C) lm_head weight (possibly the tied embedding, possibly trainable)
    labels: torch.Tensor,  # (B, T) aligned targets, IGNORE_INDEX where there is none
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Sum of cross-entropy over valid tokens, fp32 scalar; gradients reach hidden and weight."""
    C = hidden.shape[-1]
    h, y = hidden.reshape(-1, C), labels.reshape(-1)
    valid = y != IGNORE_INDEX
    if not bool(valid.all()):
        # tokens without a target (document ends, padding) need no logits at all
        h, y = h[valid], y[valid]
    n, V = h.shape[0], weight.shape[0]
    if n == 0:
        return hidden.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) connected
    if chunk_tokens is None:
        if n * V <= _PLAIN_LIMIT:
            return _chunk_loss(h, weight, y)
        chunk_tokens = max(1, _PLAIN_LIMIT // (4 * V))
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, chunk_tokens):
        total = total + checkpoint(
            _chunk_loss, h[s : s + chunk_tokens], weight, y[s : s + chunk_tokens], use_reentrant=False
        )
    return total
