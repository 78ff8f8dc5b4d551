"""Text generation with a KV cache: prefill the prompt once, then one token per forward."""

from __future__ import annotations

from collections.abc import Callable

import torch

from snuggle.model.decoder import Decoder, KVCache

__all__ = ["generate"]


@torch.no_grad()
def generate(
    model: Decoder,
    input_ids: torch.Tensor,  # (1, T) prompt
    max_new_tokens: int = 64,
    temperature: float = 0.0,  # 0: greedy
    top_p: float = 1.0,
    eos_token_ids: set[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    model.eval()
    cache = KVCache()
    limit = model.args.max_position_embeddings
    logits = model(input_ids, cache=cache)[:, -1]  # (1, V)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            tok = int(logits.argmax(-1))
        else:
            probs = torch.softmax(logits.float() / temperature, dim=-1)[0]
            if top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < top_p  # smallest prefix with mass >= top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            tok = int(torch.multinomial(probs, 1, generator=generator))
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        stop = eos_token_ids and tok in eos_token_ids
        # no forward for a token nobody will read: after the last one the loop is over anyway
        if stop or len(out) == max_new_tokens or cache.length() + 1 >= limit:
            break
        logits = model(torch.tensor([[tok]], device=input_ids.device), cache=cache)[:, -1]
    return out
