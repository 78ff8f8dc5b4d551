"""LoRA projections sharing one input: the op sequences of forward + backward, timed on one GPU.

Which order of cuBLAS calls does a LoRA block's projections fastest, before any of it goes into the
autograd Function? For each group of projections that read the same input (q/k/v, gate/up, o, down)
this times the whole forward and backward sequence of GEMMs (no autograd, no elementwise work):

- `base`: the frozen GEMMs alone (y = x W^T, dx = g W): the floor.
- `separate`: one projection at a time, as `kernels.lora.LoRALinearFunction` does today: the base GEMM,
  then the low-rank update accumulated onto its output (an extra read and write of y), and in backward
  each projection's dx summed by autograd.
- `grouped`: one x A_cat^T for the group; the low-rank update written first and the base GEMM
  accumulated onto it (beta = 1, read in cuBLAS's epilogue); in backward one gB_cat A_cat for dx with
  every base dgrad accumulated onto it, and dA_cat from one product with x.

A Triton GEMM with the low-rank update in its epilogue was tried too (Triton 3.6, pointer loads,
autotuned): without the update it ran 25-35% slower than cuBLAS on these shapes, so it lost overall
(benchmarks/results/lora-gemm-H200-wip.jsonl has those rows).

usage: python benchmarks/lora_gemm.py [--shape 1b|8b|all] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from nf4_dequant import timed  # same directory: the scripts run from benchmarks/

# tokens per micro-batch, hidden, kv width, intermediate (Llama-3.2 1B at 8x2048, Llama-3 8B at 2x2048)
SHAPES = {
    "1b": (16384, 2048, 512, 8192),
    "8b": (4096, 4096, 1024, 14336),
}
RANK, SCALE = 16, 2.0


def base(x, g, Ws, As, Bs):
    for W, gi in zip(Ws, g, strict=True):
        x @ W.t()
        gi @ W


def separate(x, g, Ws, As, Bs):
    dx = None
    for W, A, B, gi in zip(Ws, As, Bs, g, strict=True):
        xa = x @ A.t()  # (n, r)
        y = x @ W.t()
        y.addmm_(xa, B.t(), alpha=SCALE)
        gB = gi @ B  # backward
        d = gi @ W
        d.addmm_(gB, A, alpha=SCALE)
        (gB.t() @ x).mul_(SCALE)  # dA
        (gi.t() @ xa).mul_(SCALE)  # dB
        dx = d if dx is None else dx.add_(d)  # autograd's sum over the consumers of x


def grouped(x, g, Ws, As, Bs):
    r = RANK
    A_cat = torch.cat(As)  # (k r, in): in the real Function built once per step, tiny
    xa = x @ A_cat.t()  # (n, k r): x read once for the group
    for i, (W, B) in enumerate(zip(Ws, Bs, strict=True)):
        y = xa[:, i * r : (i + 1) * r] @ (B.t() * SCALE)  # the low-rank update written first
        y.addmm_(x, W.t())  # base GEMM accumulated on it (beta = 1)
    gB = torch.cat([gi @ B for gi, B in zip(g, Bs, strict=True)], dim=1)  # (n, k r)
    dx = gB @ (A_cat * SCALE)  # (n, in)
    for W, gi in zip(Ws, g, strict=True):
        dx.addmm_(gi, W)  # every base dgrad accumulated into one buffer
    (gB.t() @ x).mul_(SCALE)  # dA_cat
    for i, gi in enumerate(g):
        (gi.t() @ xa[:, i * r : (i + 1) * r]).mul_(SCALE)  # dB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="all", choices=["1b", "8b", "all"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    rows = []
    for shape in ["1b", "8b"] if a.shape == "all" else [a.shape]:
        n, h, kv, f = SHAPES[shape]
        groups = {"qkv": (h, [h, kv, kv]), "o": (h, [h]), "gate_up": (h, [f, f]), "down": (f, [h])}
        for group, (fan_in, outs) in groups.items():
            Ws = [torch.randn(o, fan_in, device=dev, dtype=dt) * 0.02 for o in outs]
            As = [torch.randn(RANK, fan_in, device=dev, dtype=dt) * 0.02 for _ in outs]
            Bs = [torch.randn(o, RANK, device=dev, dtype=dt) * 0.02 for o in outs]
            x = torch.randn(n, fan_in, device=dev, dtype=dt)
            g = [torch.randn(n, o, device=dev, dtype=dt) for o in outs]
            # the GEMM work: forward + dgrad of the frozen weights (what a LoRA step cannot avoid)
            flop = sum(2 * 2 * n * fan_in * o for o in outs)
            for name, fn in (("base", base), ("separate", separate), ("grouped", grouped)):
                ms = timed(lambda fn=fn, x=x, g=g, Ws=Ws, As=As, Bs=Bs: fn(x, g, Ws, As, Bs))
                rows.append(
                    {
                        "shape": shape,
                        "group": group,
                        "variant": name,
                        "ms": round(ms, 4),
                        "base_tflops": round(flop / ms / 1e9, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            del Ws, As, Bs, x, g
    names = list(dict.fromkeys(r["variant"] for r in rows))
    print("\n| shape | group | " + " | ".join(f"{v} ms" for v in names) + " |")
    print("|---|---|" + "---|" * len(names))
    by = {(r["shape"], r["group"], r["variant"]): r["ms"] for r in rows}
    for shape, group in dict.fromkeys((r["shape"], r["group"]) for r in rows):
        print(f"| {shape} | {group} | " + " | ".join(f"{by[shape, group, v]:.3f}" for v in names) + " |")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "lora-gemm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
