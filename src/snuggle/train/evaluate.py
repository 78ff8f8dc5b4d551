"""Held-out loss and perplexity: the mean next-token loss over every valid token of the rows given."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from snuggle.model.decoder import Decoder

__all__ = ["evaluate", "to_device"]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(
    model: Decoder, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    for b in batches:
        b = to_device(b, device)
        # through forward, so a DDP/FSDP-wrapped model runs its hooks (FSDP unshards the lm_head there)
        total += model(
            b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"], labels=b["labels"]
        ).double()
        tokens += int((b["labels"] != -100).sum())
    model.train(was_training)
    loss = float(total) / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
