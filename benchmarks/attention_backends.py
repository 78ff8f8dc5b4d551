"""Causal attention forward + backward on one GPU, per SDPA backend, at the benchmark's shapes.

Which exact attention is fastest for the decoder's layout (q (B, H, T, D), k/v (B, H_kv, T, D) as
transposed views of (B, T, H, D) projections, GQA)? The model calls
`F.scaled_dot_product_attention(..., is_causal=True, enable_gqa=True)` and lets PyTorch pick; this times
each backend forced, and with k/v expanded to all heads for the backends that need it.

usage: python benchmarks/attention_backends.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from nf4_dequant import timed  # same directory: the scripts run from benchmarks/
from torch.nn.attention import SDPBackend, sdpa_kernel

# batch, heads, kv heads, seq, head dim (Llama-3.2 1B at 8x2048, Llama-3 8B at 2x2048)
SHAPES = {"1b": (8, 32, 8, 2048, 64), "8b": (2, 32, 8, 2048, 128)}
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def step(q, k, v, g, gqa: bool):
    if not gqa:  # k/v repeated to every query head
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    y.backward(g)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    for shape, (B, H, Hkv, T, D) in SHAPES.items():
        # the decoder's layout: (B, T, heads, D) projections viewed as (B, heads, T, D)
        q = torch.randn(B, T, H, D, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
        k = torch.randn(B, T, Hkv, D, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
        v = torch.randn(B, T, Hkv, D, device=dev, dtype=dt).transpose(1, 2).requires_grad_()
        g = torch.randn(B, T, H, D, device=dev, dtype=dt).transpose(1, 2)
        flop = 4 * B * H * T * T * D / 2 * 3.5  # causal: fwd 2 GEMMs, bwd 5, half the square
        for name, backend in [("auto", None), *BACKENDS.items()]:
            for gqa in (True, False):
                fn = partial(step, q, k, v, g, gqa)
                try:
                    if backend is None:
                        ms = timed(fn)
                    else:
                        with sdpa_kernel([backend]):
                            ms = timed(fn)
                    row = {"shape": shape, "backend": name, "gqa": gqa, "ms": round(ms, 3)}
                    row["tflops"] = round(flop / ms / 1e9, 1)
                except RuntimeError as e:  # backend refuses this layout
                    row = {"shape": shape, "backend": name, "gqa": gqa, "error": str(e).splitlines()[0][:120]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "attention-backends.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
