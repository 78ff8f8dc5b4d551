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
  every base dgrad accumulated onto it, and dA_cat from one product with x. This is
  `kernels.lora.LoRAGroupFunction`'s sequence; `grouped, base first` is the same with each output's
  base GEMM first and the low-rank update added after it, as that Function did before.

A Triton GEMM with the low-rank update in its epilogue was tried too (Triton 3.6, pointer loads,
autotuned): without the update it ran 25-35% slower than cuBLAS on these shapes, so it lost overall
(the rows are in benchmarks/results/lora-gemm-H200-wip.jsonl as of commit 9b97eec).

- `augmented` (and `augmented+copy`): the low-rank factors folded into the base GEMM's K dimension.
  One buffer per group holds [W_cat | B_blocks] over [A_cat | 0], shape (sum out + R, in + R):
  forward is one GEMM of [x | s x A^T] with its top rows, backward one GEMM of [g | s g B] with its
  left columns, so no pass reads an output back to add the low-rank term, and q/k/v (gate/up) become
  one GEMM each way. `augmented` assumes the producers of x and g write them into the wider buffers
  (the RMSNorm, SwiGLU and RoPE kernels can); `+copy` pays a copy of x and of g into them.

usage: python benchmarks/lora_gemm.py [--shape 1b|8b|all] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from nf4_dequant import timed  # same directory: the scripts run from benchmarks/

# tokens per micro-batch, hidden, kv width, intermediate (Llama-3.2 1B at 8x2048, Llama-3 8B at 2x2048)
SHAPES = {
    "1b": (16384, 2048, 512, 8192),
    "8b": (4096, 4096, 1024, 14336),
}
RANK, SCALE = 16, 2.0


def parse_args() -> argparse.Namespace:
    """--shape 1b|8b|all, --out DIR; seeds torch, as both scripts of LoRA timings start."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="all", choices=["1b", "8b", "all"])
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    a.shapes = ["1b", "8b"] if a.shape == "all" else [a.shape]
    torch.manual_seed(0)
    return a


def shape_groups(shape: str) -> tuple[int, dict[str, tuple[int, list[int]]]]:
    """(tokens, {group: (fan_in, the outputs' widths)}) for the projections that share an input."""
    n, h, kv, f = SHAPES[shape]
    return n, {"qkv": (h, [h, kv, kv]), "o": (h, [h]), "gate_up": (h, [f, f]), "down": (f, [h])}


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


def grouped_base_first(x, g, Ws, As, Bs):
    """`grouped` with each output's two products in the other order: the base GEMM first, then the
    low-rank update added onto it (a memory-bound pass that reads and writes the output); what
    `kernels.lora` did before the low-rank term went first."""
    r = RANK
    A_cat = torch.cat(As)
    xa = x @ A_cat.t()
    for i, (W, B) in enumerate(zip(Ws, Bs, strict=True)):
        y = x @ W.t()
        y.addmm_(xa[:, i * r : (i + 1) * r], B.t(), alpha=SCALE)
    gB = torch.cat([gi @ B for gi, B in zip(g, Bs, strict=True)], dim=1)
    dx = None
    for W, gi in zip(Ws, g, strict=True):
        dx = gi @ W if dx is None else dx.addmm_(gi, W)
    dx.addmm_(gB, A_cat, alpha=SCALE)
    (gB.t() @ x).mul_(SCALE)
    for i, gi in enumerate(g):
        (gi.t() @ xa[:, i * r : (i + 1) * r]).mul_(SCALE)


def augment(Ws, As, Bs):
    """(sum out + R, in + R): [W_cat | B_blocks] over [A_cat | 0] (B_i at rank columns i, zeros else)."""
    outs, fan_in, r = [W.shape[0] for W in Ws], Ws[0].shape[1], RANK
    S, R = sum(outs), r * len(Ws)
    big = Ws[0].new_zeros(S + R, fan_in + R)
    row = 0
    for i, (W, A, B) in enumerate(zip(Ws, As, Bs, strict=True)):
        big[row : row + W.shape[0], :fan_in] = W
        big[row : row + W.shape[0], fan_in + i * r : fan_in + (i + 1) * r] = B
        big[S + i * r : S + (i + 1) * r, :fan_in] = A
        row += W.shape[0]
    return big


def augmented(x, g, Ws, As, Bs, *, big, xbuf, gbuf, copy: bool):
    n, fan_in = x.shape
    S = big.shape[0] - (big.shape[1] - fan_in)  # sum of outs
    if copy:  # the producers did not write into the wide buffers
        xbuf[:, :fan_in].copy_(x)
        off = 0
        for gi in g:
            gbuf[:, off : off + gi.shape[1]].copy_(gi)
            off += gi.shape[1]
    xin = xbuf[:, :fan_in]
    xbuf[:, fan_in:] = (xin @ big[S:, :fan_in].t()).mul_(SCALE)  # s x A_cat^T, (n, R)
    xbuf @ big[:S].t()  # y_cat (n, S): base and low-rank in one GEMM
    gin = gbuf[:, :S]
    gbuf[:, S:] = (gin @ big[:S, fan_in:]).mul_(SCALE)  # s [g_i B_i] in one GEMM, (n, R)
    gbuf @ big[:, :fan_in]  # dx (n, in): every dgrad and low-rank term in one GEMM
    gbuf[:, S:].t() @ xin  # dA_cat (R, in), scale already in
    gin.t() @ xbuf[:, fan_in:]  # dB (S, R); only the diagonal blocks are used


def main() -> None:
    a = parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows = []
    for shape in a.shapes:
        n, groups = shape_groups(shape)
        for group, (fan_in, outs) in groups.items():
            Ws = [torch.randn(o, fan_in, device=dev, dtype=dt) * 0.02 for o in outs]
            As = [torch.randn(RANK, fan_in, device=dev, dtype=dt) * 0.02 for _ in outs]
            Bs = [torch.randn(o, RANK, device=dev, dtype=dt) * 0.02 for o in outs]
            x = torch.randn(n, fan_in, device=dev, dtype=dt)
            g = [torch.randn(n, o, device=dev, dtype=dt) for o in outs]
            # the GEMM work: forward + dgrad of the frozen weights (what a LoRA step cannot avoid)
            flop = sum(2 * 2 * n * fan_in * o for o in outs)
            big = augment(Ws, As, Bs)
            R = big.shape[1] - fan_in
            xbuf = torch.randn(n, fan_in + R, device=dev, dtype=dt)
            gbuf = torch.randn(n, sum(outs) + R, device=dev, dtype=dt)
            variants = [
                ("base", base),
                ("separate", separate),
                ("grouped", grouped),
                ("grouped, base first", grouped_base_first),
            ]
            for copy in (False, True):
                aug = partial(augmented, big=big, xbuf=xbuf, gbuf=gbuf, copy=copy)
                variants.append(("augmented+copy" if copy else "augmented", aug))
            for name, fn in variants:
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
            del Ws, As, Bs, x, g, big, xbuf, gbuf
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
