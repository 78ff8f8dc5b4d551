"""NF4 paths for one Llama-3 8B MLP weight (14336 x 4096): dequantize and matmul, timed on one GPU.

Compares what the QLoRA forward can use for `x @ W^T` with W in 4 bits: snuggle's Triton dequantization
then cuBLAS, the same through plain PyTorch ops (snuggle's reference path), torchao's NF4Tensor
(`linear_nf4`, what torchtune uses) where torchao imports, and bitsandbytes' `dequantize_4bit` where
it imports; the bf16 matmul alone is the floor. Prints one JSON line per path (milliseconds a call,
median of 50 after warm-up) and writes them to --out if given.

usage: python benchmarks/nf4_dequant.py [--tokens 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def timed(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from snuggle.kernels.nf4 import dequantize_nf4
    from snuggle.quant.nf4 import NF4Weight, dequantize_nf4_reference

    dev = torch.device("cuda")
    w = (torch.randn(14336, 4096, device=dev) * 0.02).to(torch.bfloat16)
    x = torch.randn(a.tokens, 4096, device=dev, dtype=torch.bfloat16)
    q = NF4Weight.from_dense(w)
    parts = (q.qweight, q.absmax_q, q.absmax_scale, q.absmax_mean, q.in_features)
    rows = []

    def add(name: str, ms: float, **extra) -> None:
        rows.append({"path": name, "ms": round(ms, 4), **extra})
        print(json.dumps(rows[-1]), flush=True)

    gb = (q.nbytes() + w.numel() * 2) / 1e9  # bytes moved by one dequantization
    t = timed(lambda: dequantize_nf4(*parts, dtype=torch.bfloat16))
    add("snuggle triton dequant", t, gb_per_s=round(gb / (t / 1e3), 1))
    t = timed(lambda: dequantize_nf4_reference(*parts, dtype=torch.bfloat16))
    add("snuggle torch-ops dequant (reference)", t, gb_per_s=round(gb / (t / 1e3), 1))
    add("bf16 matmul alone", timed(lambda: x @ w.t()))
    ours = timed(lambda: x @ dequantize_nf4(*parts, dtype=torch.bfloat16).t())
    add("snuggle triton dequant + matmul", ours)
    try:
        from torchao.dtypes.nf4tensor import linear_nf4, to_nf4

        tw = to_nf4(w)
        add("torchao linear_nf4", timed(lambda: linear_nf4(x, tw)))
        add("torchao dequant", timed(lambda: tw.get_original_weight()))
    except Exception as e:  # absent or incompatible: a row saying so
        add("torchao", float("nan"), error=f"{type(e).__name__}: {e}"[:120])
    try:
        import bitsandbytes.functional as bf

        packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        add("bitsandbytes dequantize_4bit", timed(lambda: bf.dequantize_4bit(packed, state)))
        add("bitsandbytes dequant + matmul", timed(lambda: x @ bf.dequantize_4bit(packed, state).t()))
    except Exception as e:
        add("bitsandbytes", float("nan"), error=f"{type(e).__name__}: {e}"[:120])
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        name = torch.cuda.get_device_name().replace(" ", "_")
        (Path(a.out) / f"nf4-dequant-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
