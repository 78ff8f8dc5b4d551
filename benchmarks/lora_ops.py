"""Each cuBLAS call of a LoRA group's forward + backward timed alone, beside its memory-traffic floor.

`lora_gemm.py` times whole sequences; this splits `kernels.lora.LoRAGroupFunction`'s sequence into its
calls so that the time over the frozen GEMMs can be put on the ones that take it. For the rank-r products
(memory-bound: K or N is the rank) the floor is the bytes they must move at the card's copy bandwidth
(measured here with a device-to-device copy); for the base GEMMs the row says what accumulating onto an
existing output (beta = 1) costs over writing a fresh one.

On an H200 the rank-sized products of one Llama-3 8B block take 1.35 ms against a floor of 0.42, and
of one Llama-3.2 1B block 1.78 against 0.91 (results/lora-ops-H200-42e9286.jsonl). Each call is timed alone
with the GPU idle before it, so these figures include its launch latency: inside a training step
(`bench.py --profile`) the same products take 0.60 ms an 8B block and 1.12 ms a 1B block
(results/where-the-time-goes-H200-adb5593.md). Triton kernels tiled
for bandwidth (one per product shape, commit "Experiment: Triton kernels for the LoRA products ...")
ran 1.5-4x slower than these cuBLAS calls in the same run (8B: 3.04 ms a block against 1.30), and the
8B step at 0.915x (results/lora-ops-H200-rank-kernels-wip.jsonl and ab-H200-42e9286-vs-rank-kernels.jsonl
as of commit b1e6ae9),
so they were taken out again.

The `(...)^T` rows time the same rank-sized products as the transpose of the transposed problem (cuBLAS
then picks among other kernels). On an H200 they were no faster (8B: 0.78 ms against 0.70 for the four
products a block; 1B 1.00 against 0.98), and with them in the LoRA Functions the step ran at 1.005x
(8B) and 0.996x (1B), within noise (results/lora-ops-H200-919f1f6-transposed.jsonl and
ab-H200-919f1f6-vs-transposed-rank-products.jsonl as of commit 294d5d4); not taken. The same calls timed
20-40% apart on two machines of the same kind, so compare rows of one run only.

usage: python benchmarks/lora_ops.py [--shape 1b|8b|all] [--out DIR]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lora_gemm import (  # same directory: the scripts run from benchmarks/
    RANK,
    SCALE,
    parse_args,
    shape_groups,
)
from nf4_dequant import timed


def copy_bandwidth(dev) -> float:
    """Bytes per ms of a large device-to-device copy (read + write counted)."""
    a = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ms = timed(lambda: b.copy_(a), reps=20)
    return 2 * a.numel() / ms


def group_ops(n, fan_in, outs, dev, dt):
    """(name, call, bytes that must move or None for the compute-bound base GEMMs) per call of the group;
    the base GEMMs' rows say what accumulating onto an output (beta = 1) costs."""
    k, r = len(outs), RANK
    Ws = [torch.randn(o, fan_in, device=dev, dtype=dt) * 0.02 for o in outs]
    A_cat = torch.randn(k * r, fan_in, device=dev, dtype=dt) * 0.02
    Bs = [torch.randn(o, r, device=dev, dtype=dt) * 0.02 for o in outs]
    x = torch.randn(n, fan_in, device=dev, dtype=dt)
    g = [torch.randn(n, o, device=dev, dtype=dt) for o in outs]
    xa = x @ A_cat.t()
    gB = torch.cat([gi @ B for gi, B in zip(g, Bs, strict=True)], dim=1)
    ys = [torch.empty(n, o, device=dev, dtype=dt) for o in outs]
    dx = torch.empty(n, fan_in, device=dev, dtype=dt)
    e = x.element_size()
    S = sum(outs)
    xai = [xa[:, i * r : (i + 1) * r] for i in range(k)]
    return [
        ("x A^T (n, R)", lambda: x @ A_cat.t(), e * (n * fan_in + n * k * r)),
        (
            "xa_i B_i^T into y_i (beta 0)",
            lambda: [y.addmm_(u, B.t(), beta=0, alpha=SCALE) for y, u, B in zip(ys, xai, Bs, strict=True)],
            e * (n * S + n * k * r),
        ),
        ("base x W_i^T, beta 0", lambda: [x @ W.t() for W in Ws], None),
        (
            "base x W_i^T onto y_i, beta 1",
            lambda: [y.addmm_(x, W.t()) for y, W in zip(ys, Ws, strict=True)],
            None,
        ),
        ("g_i B_i (n, R)", lambda: [gi @ B for gi, B in zip(g, Bs, strict=True)], e * (n * S + n * k * r)),
        (
            "gB A into dx (beta 0)",
            lambda: dx.addmm_(gB, A_cat, beta=0, alpha=SCALE),
            e * (n * fan_in + n * k * r),
        ),
        ("base g_i W_i, beta 0", lambda: [gi @ W for gi, W in zip(g, Ws, strict=True)], None),
        (
            "base g_i W_i onto dx, beta 1",
            lambda: [dx.addmm_(gi, W) for gi, W in zip(g, Ws, strict=True)],
            None,
        ),
        ("dA = gB^T x (R, in)", lambda: gB.t() @ x, e * (n * fan_in + n * k * r)),
        (
            "dB_i = g_i^T xa_i (out, r)",
            lambda: [gi.t() @ u for gi, u in zip(g, xai, strict=True)],
            e * (n * S + n * k * r),
        ),
        # the same rank-sized products as the transpose of the transposed problem: cuBLAS then sees the
        # rank as its other dimension and picks among other kernels (the result is a transposed view)
        ("(A x^T)^T", lambda: (A_cat @ x.t()).t(), e * (n * fan_in + n * k * r)),
        (
            "(B_i^T g_i^T)^T",
            lambda: [(B.t() @ gi.t()).t() for gi, B in zip(g, Bs, strict=True)],
            e * (n * S + n * k * r),
        ),
        ("(x^T gB)^T", lambda: (x.t() @ gB).t(), e * (n * fan_in + n * k * r)),
        (
            "(xa_i^T g_i)^T",
            lambda: [(u.t() @ gi).t() for gi, u in zip(g, xai, strict=True)],
            e * (n * S + n * k * r),
        ),
    ]


def main() -> None:
    a = parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = copy_bandwidth(dev)
    print(f"copy bandwidth: {bw / 1e9:.2f} TB/s", flush=True)
    rows = []
    for shape in a.shapes:
        n, groups = shape_groups(shape)
        for group, (fan_in, outs) in groups.items():
            for name, fn, nbytes in group_ops(n, fan_in, outs, dev, dt):
                ms = timed(fn)
                row = {"shape": shape, "group": group, "op": name, "ms": round(ms, 4)}
                if nbytes is not None:
                    row["floor_ms"] = round(nbytes / bw, 4)
                rows.append(row)
                print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    print("\n| shape | group | op | ms | floor ms |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['group']} | {r['op']} | {r['ms']:.3f} | {r.get('floor_ms', '')} |")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = [r for r in rows if r["shape"] == shape and "floor_ms" in r and not r["op"].startswith("(")]
        print(
            f"{shape}: rank-sized products a block {sum(r['ms'] for r in mine):.3f} ms, "
            f"floor {sum(r['floor_ms'] for r in mine):.3f} ms"
        )
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "lora-ops.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
