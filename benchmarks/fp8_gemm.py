"""The frozen GEMMs of one block in bf16 and in FP8 (rowwise scales), timed and their error measured.

The LoRA step's frozen base GEMMs (forward y = x W^T and input gradient dx = g W) are ~60% of an 8B
step on an H200 and already run at cuBLAS's bf16 rate (benchmarks/results/where-the-time-goes-*.md), so
the one lever left on them is precision. This script measures what FP8 would give, so the question is
answered by figures and not by guess:

- `bf16`: x W^T and g W per projection, as the trainer does today.
- `fp8`: the weight quantized once to float8_e4m3fn with one scale per output row (forward) and once
  more, transposed, per input column (input gradient: `torch._scaled_mm` wants its second operand
  column-major); x and g quantized per token on every call (one compiled amax + scale + cast each),
  then `torch._scaled_mm` with bf16 output. The quantization of x is shared by the projections that
  read it (q/k/v, gate/up), as a trainer would share it.
- `snuggle fp8`: the trainer's own path (`snuggle.quant.fp8.FP8Weight`, `model.quantize: fp8`): one
  stored copy of the weight (per output row), power-of-two scales, eager per-token quantization of x
  and g (g with the weight's scales folded in) and, for the input gradient, a transposed 1-byte copy of
  the weight made on every call: the figure the trainer gets, against `fp8`'s ideal.
- error: ||y - y_fp32|| / ||y_fp32|| for the forward output and the input gradient, against fp32
  matmuls of the same bf16 inputs (bf16's own rounding of the output is ~2^-9).

usage: python benchmarks/fp8_gemm.py [--shape 1b|8b|all] [--out DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lora_gemm import parse_args, shape_groups  # same directory: the scripts run from benchmarks/
from nf4_dequant import timed

F8 = torch.float8_e4m3fn
F8_MAX = torch.finfo(F8).max
LAYERS = {"1b": 16, "8b": 32}
torch._dynamo.config.recompile_limit = 64  # one compiled quantize_rows per tensor shape, ~12 of them


@torch.compile(dynamic=False)
def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) bf16 -> (n, k) e4m3 and (n, 1) fp32 scales: each row's amax maps to e4m3's largest."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / F8_MAX
    return (t.float() / scale).to(F8), scale


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def time_group(shape: str, group: str, n: int, fan_in: int, outs: list[int]) -> list[dict]:
    """Rows for one group of projections sharing an input x (n, fan_in): each variant's ms and errors."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    Ws = [torch.randn(o, fan_in, device=dev, dtype=dt) * 0.02 for o in outs]  # (o, in)
    x = torch.randn(n, fan_in, device=dev, dtype=dt)
    g = [torch.randn(n, o, device=dev, dtype=dt) for o in outs]  # (n, o) output gradients
    Wq = [quantize_rows(W) for W in Ws]  # (o, in) per output row
    WTq = [quantize_rows(W.t().contiguous()) for W in Ws]  # (in, o) per input column
    xq0, gq0 = quantize_rows(x), [quantize_rows(gi) for gi in g]
    flop = sum(2 * 2 * n * fan_in * o for o in outs)

    def bf16():
        for W, gi in zip(Ws, g, strict=True):
            x @ W.t()
            gi @ W

    def fp8():
        xq, xs = quantize_rows(x)
        for (wq, ws), (wtq, wts), gi in zip(Wq, WTq, g, strict=True):
            torch._scaled_mm(xq, wq.t(), xs, ws.t(), out_dtype=dt)
            gq, gs = quantize_rows(gi)
            torch._scaled_mm(gq, wtq.t(), gs, wts.t(), out_dtype=dt)

    from snuggle.quant.fp8 import FP8Weight

    ours = [FP8Weight.from_dense(W) for W in Ws]

    def snuggle_fp8():
        for q, gi in zip(ours, g, strict=True):
            q.mm(x)
            q.mm_t(gi)

    def fp8_gemm_only():
        for (wq, ws), (wtq, wts), (q, s) in zip(Wq, WTq, gq0, strict=True):
            torch._scaled_mm(xq0[0], wq.t(), xq0[1], ws.t(), out_dtype=dt)
            torch._scaled_mm(q, wtq.t(), s, wts.t(), out_dtype=dt)

    # error of the group's first projection, forward and input gradient, against fp32 matmuls
    W0, (wq, ws), (wtq, wts), (gq, gs) = Ws[0], Wq[0], WTq[0], gq0[0]
    y_ref, d_ref = x.float() @ W0.float().t(), g[0].float() @ W0.float()
    err = {
        "bf16_fwd_err": rel_err(x @ W0.t(), y_ref),
        "bf16_dgrad_err": rel_err(g[0] @ W0, d_ref),
        "fp8_fwd_err": rel_err(torch._scaled_mm(xq0[0], wq.t(), xq0[1], ws.t(), out_dtype=dt), y_ref),
        "fp8_dgrad_err": rel_err(torch._scaled_mm(gq, wtq.t(), gs, wts.t(), out_dtype=dt), d_ref),
        "snuggle_fwd_err": rel_err(ours[0].mm(x), y_ref),
        "snuggle_dgrad_err": rel_err(ours[0].mm_t(g[0]), d_ref),
    }
    rows = []
    variants = (("bf16", bf16), ("fp8", fp8), ("fp8 GEMMs only", fp8_gemm_only), ("snuggle fp8", snuggle_fp8))
    for name, fn in variants:
        ms = timed(fn)
        row = {"shape": shape, "group": group, "variant": name, "ms": round(ms, 4)}
        row |= {"tflops": round(flop / ms / 1e9, 1), **{k: round(v, 5) for k, v in err.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    a = parse_args()
    rows = []
    for shape in a.shapes:
        n, groups = shape_groups(shape)
        for group, (fan_in, outs) in groups.items():
            rows += time_group(shape, group, n, fan_in, outs)
    print(
        "\n| shape | group | bf16 ms | fp8 ms (with quantization) | fp8 GEMMs only ms | snuggle fp8 ms "
        "| fwd error bf16 / fp8 / snuggle | dgrad error bf16 / fp8 / snuggle |"
    )
    print("|---|---|---|---|---|---|---|---|")
    by = {(r["shape"], r["group"], r["variant"]): r for r in rows}
    for shape, group in dict.fromkeys((r["shape"], r["group"]) for r in rows):
        b, f, o, s = (by[shape, group, v] for v in ("bf16", "fp8", "fp8 GEMMs only", "snuggle fp8"))
        print(
            f"| {shape} | {group} | {b['ms']:.3f} | {f['ms']:.3f} | {o['ms']:.3f} | {s['ms']:.3f} "
            f"| {b['bf16_fwd_err']:.4f} / {b['fp8_fwd_err']:.4f} / {b['snuggle_fwd_err']:.4f} "
            f"| {b['bf16_dgrad_err']:.4f} / {b['fp8_dgrad_err']:.4f} / {b['snuggle_dgrad_err']:.4f} |"
        )
    names = ("bf16", "fp8", "snuggle fp8")
    for shape in a.shapes:
        per = {v: sum(by[shape, grp, v]["ms"] for grp in shape_groups(shape)[1]) for v in names}
        blocks = LAYERS[shape]
        print(
            f"{shape}: one block's frozen GEMMs {per['bf16']:.2f} ms bf16, {per['fp8']:.2f} ms fp8, "
            f"{per['snuggle fp8']:.2f} ms snuggle fp8; x{blocks} blocks: {per['bf16'] * blocks:.1f} -> "
            f"{per['fp8'] * blocks:.1f} / {per['snuggle fp8'] * blocks:.1f} ms a step"
        )
    if a.out:
        path = Path(a.out) / f"fp8-gemm-{torch.cuda.get_device_name().replace(' ', '_')}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
