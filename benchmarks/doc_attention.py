"""Attention over packed documents, forward + backward on one GPU: FlexAttention against varlen.

The trainer packs documents into rows and must keep them apart. On CUDA it uses FlexAttention with a
block-sparse document mask (`model/flex.py`); `torch.nn.attention.varlen.varlen_attn` (flash
attention over cumulative sequence lengths) is the other exact path PyTorch offers. This times, per
shape, with ~4 documents a row of random lengths:

- `cudnn causal`: SDPA over whole rows, no document mask: not the same attention (documents see each
  other), only the speed of the kernel the model uses when a batch has one document a row;
- `flex`: the trainer's path, block mask built once outside the timing (`flex mask` times building it);
- `varlen`: the rows flattened to (tokens, heads, dim), one sequence per document, causal.

and checks that flex and varlen agree (max |difference| of outputs and input gradients).

usage: python benchmarks/doc_attention.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from nf4_dequant import timed  # same directory: the scripts run from benchmarks/

# batch, heads, kv heads, seq, head dim: SmolLM2-135M and Llama-3.2 1B at 8x2048, Llama-3 8B at 2x2048
SHAPES = {"135m": (8, 9, 3, 2048, 64), "1b": (8, 32, 8, 2048, 64), "8b": (2, 32, 8, 2048, 128)}


def doc_ids_for(B: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """(B, T) document ids, ~4 documents a row at random boundaries."""
    ids = torch.zeros(B, T, dtype=torch.int64)
    for b in range(B):
        cuts = torch.randperm(T - 1, generator=gen)[:3].sort().values + 1
        ids[b, cuts] = 1
    return ids.cumsum(1)


def varlen_call(q, k, v, cu, max_len):
    """varlen_attn causal with GQA, in whichever keyword form this torch has."""
    from torch.nn.attention.varlen import varlen_attn

    try:
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, window_size=(-1, 0), enable_gqa=True)
    except TypeError:  # older signature: is_causal, no GQA keyword
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, is_causal=True)


def time_shape(shape: str, B: int, H: int, Hkv: int, T: int, D: int, gen: torch.Generator) -> list[dict]:
    """Rows for one shape: each variant's ms, with flex against varlen's differences (or varlen's error)."""
    from snuggle.model.flex import document_block_mask, flex_attention

    dev, dt = torch.device("cuda"), torch.bfloat16
    doc = doc_ids_for(B, T, gen).to(dev)
    q = torch.randn(B, H, T, D, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(B, H, T, D, device=dev, dtype=dt)
    mask = document_block_mask(doc)
    # varlen layout: (B*T, H, D), one sequence per document of each row
    lens = torch.stack([torch.bincount(doc[b] - doc[b, 0], minlength=T) for b in range(B)]).flatten()
    lens = lens[lens > 0]
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32, device=dev)
    cu[1:] = lens.cumsum(0)
    max_len = int(lens.max())

    def packed(t):
        return t.detach().transpose(1, 2).reshape(B * T, t.shape[1], D).requires_grad_(True)

    qp, kp, vp = packed(q), packed(k), packed(v)
    gp = g.transpose(1, 2).reshape(B * T, H, D)

    def cudnn():
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)

    def flex():
        flex_attention(q, k, v, mask).backward(g)

    def varlen():
        varlen_call(qp, kp, vp, cu, max_len).backward(gp)

    variants = {"cudnn causal": cudnn, "flex": flex, "flex mask": lambda: document_block_mask(doc)}
    try:
        y_v = varlen_call(qp, kp, vp, cu, max_len)
        y_v.backward(gp)
        y_f = flex_attention(q, k, v, mask)
        y_f.backward(g)
        err = {
            "out_maxdiff": (y_v - y_f.transpose(1, 2).reshape(B * T, H, D)).abs().max().item(),
            "dq_maxdiff": (qp.grad - q.grad.transpose(1, 2).reshape(B * T, H, D)).abs().max().item(),
        }
        variants["varlen"] = varlen
    except Exception as e:  # a torch without varlen_attn, or a shape it refuses: a row saying so
        err = {"varlen_error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]}
    rows = []
    for name, fn in variants.items():
        row = {"shape": shape, "variant": name, "ms": round(timed(fn, reps=20), 4), "docs": lens.numel()}
        rows.append(row | err)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape, dims in SHAPES.items():
        rows += time_shape(shape, *dims, gen)
    if a.out:
        Path(a.out, "doc-attention.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
