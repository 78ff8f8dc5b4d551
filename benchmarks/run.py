"""Run benchmark cases, each in its own process, and print/write a table with GPU, commit and versions.

usage: python benchmarks/run.py SUITE [--out DIR]     (suites: tiny, 1b, 8b, all; see SUITES; the CPT
recipe's suites cpt, cpt-parity run benchmarks/cpt.py, see CPT_SUITES)
Results: DIR/<suite>-<gpu>-<commit>.{md,csv,jsonl} (DIR defaults to benchmarks/results).
MFU counts model FLOPs only (no recomputation): 4N a token for LoRA (forward 2N, input gradients 2N;
frozen weights get no weight gradient) plus causal attention 6*L*T*d; N = matmul weights incl. lm_head.
`mfu` is against the datasheet dense bf16 peak (989 TFLOP/s, H100/H200 SXM), `bound` against the bf16
matmul rate measured at the start of the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cpt  # noqa: E402
from bench import SHAPES  # noqa: E402

# (variant, model, batch, seq, ckpt, cap_gib, extra flags)
SUITES: dict[str, list[tuple]] = {
    "tiny": [
        ("snuggle", "tiny", 2, 256, "none", 0, ()),
        ("snuggle", "tiny", 2, 256, "offload", 0, ()),
        ("hf", "tiny", 2, 256, "all", 0, ()),
    ],
    "1b": [
        ("hf", "1b", 8, 2048, "all", 0, ()),
        ("liger", "1b", 8, 2048, "all", 0, ()),
        ("liger", "1b", 8, 2048, "none", 0, ()),
        ("unsloth", "1b", 8, 2048, "all", 0, ()),
        ("unsloth", "1b", 8, 2048, "none", 0, ()),
        ("snuggle", "1b", 8, 2048, "none", 0, ()),
        ("snuggle", "1b", 8, 2048, "none", 0, ("--no-kernels",)),
        ("snuggle", "1b", 8, 2048, "offload", 0, ()),
        ("snuggle", "1b", 8, 2048, "none", 24, ()),
    ],
    "8b": [
        ("hf", "8b", 2, 2048, "all", 0, ()),
        ("unsloth", "8b", 2, 2048, "all", 0, ()),
        ("unsloth", "8b", 2, 2048, "none", 0, ()),
        ("snuggle", "8b", 2, 2048, "none", 0, ()),
        ("snuggle", "8b", 2, 2048, "offload", 0, ()),
        ("snuggle", "8b", 2, 2048, "offload", 24, ()),
        ("snuggle", "8b", 2, 2048, "plan", 24, ()),
        ("snuggle", "8b", 2, 2048, "layers:24", 24, ("--offload",)),
        ("snuggle", "8b", 2, 2048, "layers:16", 24, ("--offload",)),
        ("snuggle", "8b", 2, 2048, "layers:8", 24, ("--offload",)),
    ],
}
NF4 = ("--quantize", "nf4")
# QLoRA (8B, batch 2 x 2048; and batch 1 x long sequences capped at 24 GiB)
SUITES["qlora"] = [
    ("unsloth", "8b", 2, 2048, "none", 24, NF4),
    ("unsloth", "8b", 2, 2048, "all", 0, NF4),
    ("snuggle", "8b", 2, 2048, "none", 24, NF4),
    ("snuggle", "8b", 2, 2048, "plan", 24, NF4),
    ("snuggle", "8b", 2, 2048, "offload", 0, NF4),
]
SUITES["qlora-long"] = [
    ("unsloth", "8b", 1, 32768, "all", 24, (*NF4, "--warmup", "1", "--steps", "2")),
    ("unsloth", "8b", 1, 65536, "all", 24, (*NF4, "--warmup", "1", "--steps", "2")),
    ("snuggle", "8b", 1, 32768, "plan", 24, (*NF4, "--warmup", "1", "--steps", "2")),
    ("snuggle", "8b", 1, 65536, "plan", 24, (*NF4, "--warmup", "1", "--steps", "2")),
    ("snuggle", "8b", 1, 131072, "plan", 24, (*NF4, "--warmup", "1", "--steps", "1")),
]
# snuggle alone on the headline cases, for checking a change (peers' figures: an earlier peers run, below)
SUITES["quick"] = [
    ("snuggle", "1b", 8, 2048, "none", 0, ()),
    ("snuggle", "8b", 2, 2048, "none", 0, ()),
    ("snuggle", "8b", 2, 2048, "none", 0, ("--recompute-product",)),
    ("snuggle", "8b", 2, 2048, "none", 0, ("--recompute-product", "--recompute-norm")),
    ("snuggle", "8b", 2, 2048, "plan", 24, ()),
    ("snuggle", "8b", 2, 2048, "none", 24, NF4),
    ("snuggle", "8b", 2, 2048, "none", 24, (*NF4, "--recompute-product", "--recompute-norm")),
    ("snuggle", "8b", 2, 2048, "plan", 24, NF4),
]
# what making gate and up again costs (against the row before it) and frees, beside a recomputed block's
# cost (layers:N rows of the 8b suite): the figures the memory plan needs before it may choose it
SUITES["gate-up"] = [
    ("snuggle", "8b", 2, 2048, "none", 0, ("--recompute-norm",)),
    ("snuggle", "8b", 2, 2048, "none", 0, ("--recompute-norm", "--recompute-gate-up")),
    ("snuggle", "8b", 2, 2048, "layers:8", 0, ("--recompute-norm",)),
    ("snuggle", "1b", 8, 2048, "none", 0, ("--recompute-norm",)),
    ("snuggle", "1b", 8, 2048, "none", 0, ("--recompute-norm", "--recompute-gate-up")),
]
# Unsloth in the same run, in the configurations the targets of issues #3 and #4 name: its fastest
# (no checkpointing), and for 8B under a 24 GiB cap its fastest that fits (its offloaded checkpointing)
SUITES["peers"] = [
    ("unsloth", "1b", 8, 2048, "none", 0, ()),
    ("unsloth", "8b", 2, 2048, "none", 0, ()),
    ("unsloth", "8b", 2, 2048, "all", 0, ()),
    ("unsloth", "8b", 2, 2048, "none", 24, NF4),
]
# its smallest footprints (offloaded checkpointing), for the "at least its speed there" targets
SUITES["peers-footprint"] = [
    ("unsloth", "1b", 8, 2048, "all", 0, ()),
    ("unsloth", "8b", 2, 2048, "all", 24, NF4),
]
# snuggle at its own smallest footprints (every block recomputed, inputs offloaded), against Unsloth's
# (its offloaded checkpointing, 16-bit and QLoRA): "at least its speed there". Uncapped: the harness
# builds the 16-bit weights on the GPU before quantizing, which a cap of a few GiB would not hold.
RECOMPUTE = ("--recompute-product", "--recompute-norm")
SUITES["footprints"] = [
    ("snuggle", "8b", 2, 2048, "offload", 0, RECOMPUTE),
    ("snuggle", "8b", 2, 2048, "offload", 0, (*NF4, *RECOMPUTE)),
    ("unsloth", "8b", 2, 2048, "all", 0, ()),
    *SUITES["peers-footprint"][1:],
]
# snuggle's rows of those targets, with the peers beside them: one table with same-run ratios
SUITES["targets"] = [
    ("snuggle", "1b", 8, 2048, "none", 0, ()),
    ("snuggle", "8b", 2, 2048, "none", 0, ()),
    ("snuggle", "8b", 2, 2048, "plan", 24, ()),
    ("snuggle", "8b", 2, 2048, "plan", 24, NF4),
    *SUITES["peers"],
]
# the same steps with no adapters (bench.py --no-lora): the frozen GEMMs, attention, norms, SwiGLU and
# loss of a LoRA step, and no LoRA work at all, so no LoRA implementation on this base path can beat it
SUITES["bound"] = [
    ("snuggle", "1b", 8, 2048, "none", 0, ("--no-lora",)),
    ("snuggle", "8b", 2, 2048, "none", 0, ("--no-lora",)),
]
# the benchmark's loss curves against HF + PEFT's from the same weights (#3: equal within bf16 tolerance)
SUITES["parity"] = [
    ("hf", "1b", 8, 2048, "all", 0, ()),
    ("snuggle", "1b", 8, 2048, "none", 0, ()),
    ("hf", "8b", 2, 2048, "all", 0, ()),
    ("snuggle", "8b", 2, 2048, "none", 0, ()),
]
# Unsloth's fastest configuration that fits 24 GiB may keep some layers un-checkpointed
# (UNSLOTH_GC_KEEP_LAYERS=auto): the capped rows again with that setting
KEEP = ("--gc-keep-layers", "auto")
SUITES["peers-keep"] = [
    ("unsloth", "8b", 2, 2048, "all", 24, KEEP),
    ("unsloth", "8b", 2, 2048, "all", 24, (*NF4, *KEEP)),
    ("unsloth", "1b", 8, 2048, "all", 24, KEEP),
]
SUITES["all"] = SUITES["1b"] + SUITES["8b"] + SUITES["qlora"] + SUITES["qlora-long"]
SUITES["8b-cap"] = [c for c in SUITES["8b"] if c[5]]
# the CPT recipe through each stack's trainer (benchmarks/cpt.py): (stack, shape, cap GiB, extra flags),
# under a 24 GiB cap and uncapped, on Mistral-7B-v0.3's shape and Llama-3-8B's (128k vocabulary)
_CPT_STACKS = ("snuggle", "unsloth-logits", "unsloth", "hf")
CPT_SUITES: dict[str, list[tuple]] = {
    "cpt": [
        (stack, shape, cap, extra)
        for shape in ("mistral7b", "llama3-8b")
        for cap in (24, 0)
        for stack, extra in [(s, ()) for s in _CPT_STACKS]
        + [("unsloth-logits", ("--keep-layers", "auto")), ("unsloth", ("--keep-layers", "auto"))]
    ],
    # snuggle with the embeddings' optimizer state on the host, against the plan's own choice
    "cpt-offload": [
        ("snuggle", shape, 24, ("--embedding-offload", "cpu")) for shape in ("mistral7b", "llama3-8b")
    ],
    "cpt-tiny": [("snuggle", "tiny", 0, ("--seq", "64", "--quantize", "none", "--r", "8"))],
}
# 20 steps from the same weights, LoRA factors (HF's, given to snuggle as model.adapter) and data (one
# optimizer step = every document, so the order of the rows cannot differ), bf16 base and AdamW: the
# curves must agree within bf16 tolerance (cpt.PARITY_RTOL); then the same with the recipe's NF4 and
# 8-bit AdamW, where each stack's own quantization and 8-bit code add their own differences
PARITY = ("--warmup", "0", "--steps", "20", "--docs", "16")
CPT_PARITY = {
    "bf16": (*PARITY, "--quantize", "none", "--optim", "adamw"),
    "nf4-8bit": (*PARITY, "--quantize", "nf4", "--optim", "adamw8bit"),
}
CPT_SUITES["cpt-parity"] = [
    (stack, shape, 0, (*flags, "--parity", name))
    for shape in ("mistral7b", "llama3-8b")
    for name, flags in CPT_PARITY.items()
    for stack in ("hf", "snuggle")
]
# peers' figures measured on one H100 with this setup (bench.py, 2026-11-25), for rows not run here
ANCHORS = {
    ("unsloth", "1b", "all"): (53759, 4.8),
    ("unsloth", "1b", "none"): (71616, 19.3),
    ("unsloth", "8b", "all"): (10569, 16.7),
    ("unsloth", "8b", "none"): (14665, 30.6),
}
# Unsloth QLoRA on one H100 (bench.py, 2026-11-25), by (batch, seq, checkpointing): "none" is its fastest
# configuration under a 24 GiB cap, "all" its smallest footprint; 65,536 tokens runs out of memory
QLORA_ANCHORS = {
    (2, 2048, "none"): (14104, 21.0),
    (2, 2048, "all"): (9898, 7.0),
    (1, 32768, "all"): (6356, 14.3),
}


def anchor_rows() -> list[dict]:
    """The earlier peers run's Unsloth figures as rows shaped like measured ones (an H100's only)."""

    def row(model, batch, seq, ckpt, quantize, figures):
        tokens_per_s, peak_gib = figures
        return dict(variant="unsloth", model=model, batch=batch, seq=seq, ckpt=ckpt, quantize=quantize,
                    cap_gib=0, tokens_per_s=tokens_per_s, peak_gib=peak_gib, anchor=True)  # fmt: skip

    rows = [row(m, 8 if m == "1b" else 2, 2048, c, "none", f) for (_, m, c), f in ANCHORS.items()]
    return rows + [row("8b", b, q, c, "nf4", f) for (b, q, c), f in QLORA_ANCHORS.items()]


def best_peer(r: dict, peers: list[dict]) -> float | None:
    """The peers' figure a snuggle row is held against: for an offloaded row, the fastest peer run with
    checkpointing (the smallest-footprint comparison); else the fastest peer configuration that fits the
    row's memory cap (its peak under the cap, or itself run under one no larger). Same model, batch,
    sequence and precision; `peers` are measured rows first, anchors only where none was measured."""
    cap = r.get("cap_gib") or 0

    def fits(p: dict) -> bool:
        return not cap or 0 < (p.get("cap_gib") or 0) <= cap or p["peak_gib"] <= cap

    same = [
        p
        for p in peers
        if "tokens_per_s" in p
        and (p["model"], p["batch"], p["seq"], p.get("quantize", "none"))
        == (r["model"], r["batch"], r["seq"], r.get("quantize", "none"))
    ]
    if r["ckpt"] in ("offload", "all"):
        same = [p for p in same if p["ckpt"] != "none"]
    else:
        same = [p for p in same if fits(p)]
    measured = [p["tokens_per_s"] for p in same if not p.get("anchor")]
    anchors = [p["tokens_per_s"] for p in same if p.get("anchor")]
    return max(measured or anchors, default=None)


DATASHEET_TFLOPS = 989.0


def flops_per_token(model: str, seq: int) -> float:
    s = SHAPES[model]
    d, f, L, V = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = s["num_key_value_heads"] * d // s["num_attention_heads"]
    n = L * (2 * d * d + 2 * d * kv + 3 * d * f) + V * d
    return 4 * n + 6 * L * seq * d


def measure_matmul_tflops() -> float:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - t) / 1e12


def environment() -> dict:
    import torch

    env = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }
    from importlib.metadata import PackageNotFoundError, version

    # distribution metadata, not __version__: liger_kernel has none, and importing unsloth patches things
    for dist in ("transformers", "peft", "triton", "liger-kernel", "unsloth", "bitsandbytes"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = "absent"
    # SNUGGLE_COMMIT first: a tree copied without its .git (a device machine's snapshot) would
    # otherwise report the commit of whatever repository encloses it
    env["commit"] = os.environ.get("SNUGGLE_COMMIT", "")
    if not env["commit"]:
        try:
            env["commit"] = subprocess.check_output(
                ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True, stderr=subprocess.DEVNULL
            ).strip()
        except Exception:
            env["commit"] = "unknown"
    return env


def run_case(case: tuple, timeout: int) -> dict:
    variant, model, batch, seq, ckpt, cap, extra = case
    cmd = [
        sys.executable,
        str(HERE / "bench.py"),
        "--variant",
        variant,
        "--model",
        model,
        "--batch",
        str(batch),
        "--seq",
        str(seq),
        "--ckpt",
        ckpt,
        "--cap-gib",
        str(cap),
        *extra,
    ]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if line:
            return json.loads(line[-1])
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        err = f"timeout after {timeout}s"
    return {
        "variant": variant,
        "model": model,
        "batch": batch,
        "seq": seq,
        "ckpt": ckpt,
        "cap_gib": cap,
        "error": err[:200],
        "kernels_off": "--no-kernels" in extra,
        "no_lora": "--no-lora" in extra,
        "quantize": "nf4" if "nf4" in extra else "none",
    }


def label(r: dict) -> str:
    name = r["variant"] + (" (no kernels)" if r.get("kernels_off") else "")
    name += " no LoRA (bound)" if r.get("no_lora") else ""
    name += " QLoRA" if r.get("quantize") == "nf4" else ""
    if r.get("batch", 0) * r.get("seq", 0) > 8192:
        name += f" {r['batch']}x{r['seq']}"
    ck = r["ckpt"] + ("+offload" if r.get("offload") and r["ckpt"].startswith("layers") else "")
    again = [
        w
        for w, k in (
            ("product", "recompute_product"),
            ("norms", "recompute_norm"),
            ("gate/up", "recompute_gate_up"),
        )
        if r.get(k)
    ]
    ck += f" +{' and '.join(again)} recomputed" if again else ""
    ck += f", keep layers {r['gc_keep_layers']}" if r.get("gc_keep_layers") else ""
    cap = f", cap {r['cap_gib']:g} GiB" if r.get("cap_gib") else ""
    return f"{r['model']} {name}, ckpt {ck}{cap}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "suite", nargs="+", choices=list(SUITES) + list(CPT_SUITES), help="one or more, run in this order"
    )
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument(
        "--only", default="", help="only the cases of this variant (e.g. snuggle; CPT suites: stack,shape)"
    )
    ap.add_argument(
        "--rows",
        default="",
        help="no runs: the table from the JSON lines an earlier run printed (its first line the "
        "environment), e.g. of a run stopped before its end; SUITE then only names the files",
    )
    a = ap.parse_args()
    suite = "-".join(a.suite)  # file names of letters, digits, dots, dashes
    recipe = [name in CPT_SUITES for name in a.suite]
    if any(recipe) and not all(recipe):
        ap.error("CPT suites (" + ", ".join(CPT_SUITES) + ") run apart from the others")
    if a.rows:
        lines = [json.loads(ln) for ln in Path(a.rows).read_text().splitlines() if ln.startswith("{")]
        head, peak = lines[0], lines[0]["matmul_tflops"]
        if all(recipe):
            write_cpt_tables(
                suite, head["environment"], with_parity(lines[1:], head["environment"]), Path(a.out)
            )
            return
        rows = [r if "mfu" in r else add_rates(r, peak) for r in lines[1:]]  # bench.py's own lines lack them
        write_tables(suite, head["environment"], peak, rows, Path(a.out))
        return
    env = environment()
    peak = measure_matmul_tflops() if env["gpu"] != "cpu" else float("nan")
    # first, so that a run stopped before its end still has them beside its rows (see --rows)
    print(json.dumps({"environment": env, "matmul_tflops": peak}), flush=True)
    rows = []
    if all(recipe):
        work = Path(os.environ.get("SNUGGLE_CPT_WORK", "/tmp/snuggle-cpt")) / "runs"
        for case in cpt_cases(a.suite, a.only):
            r = run_cpt_case(case, a.timeout, work)
            rows.append(r)
            print(json.dumps(r), flush=True)
        write_cpt_tables(suite, env, with_parity(rows, env), Path(a.out))
        return
    for case in [c for name in a.suite for c in SUITES[name] if not a.only or c[0] == a.only]:
        r = add_rates(run_case(case, a.timeout), peak)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    write_tables(suite, env, peak, rows, Path(a.out))


def cpt_cases(suites: list[str], only: str = "") -> list[tuple]:
    """The CPT cases of `suites`; `only`: stacks and shapes, comma-separated, all of which a case must
    match (a few rows fit one call of 10 minutes; merge the calls' printed lines with --rows)."""
    terms = [t for t in only.split(",") if t]
    return [c for name in suites for c in CPT_SUITES[name] if all(t in c[:2] for t in terms)]


def cpt_command(case: tuple, work: Path) -> tuple[list[str], dict[str, str], str]:
    """(command, environment, parity run name) of one CPT case: `--parity NAME` becomes HF saving its
    starting adapter and snuggle starting from it (model.adapter); the environment is the stack's own
    (cpt.stack_env: no inherited allocator setting, Unsloth's switches)."""
    stack, shape, cap, extra = case
    extra, parity = list(extra), ""
    if "--parity" in extra:
        i = extra.index("--parity")
        parity = extra[i + 1]
        del extra[i : i + 2]
        init = str(work / f"init-{shape}-{parity}")
        extra += ["--save-init-adapter", init] if stack == "hf" else ["--adapter", init]
    keep = extra[extra.index("--keep-layers") + 1] if "--keep-layers" in extra else ""
    cmd = [
        sys.executable,
        str(HERE / "cpt.py"),
        "--stack",
        stack,
        "--shape",
        shape,
        "--cap",
        str(cap),
        "--out-dir",
        str(work),
        *extra,
    ]
    return cmd, cpt.stack_env(stack, keep), parity


_prepared: set[tuple] = set()


def run_cpt_case(case: tuple, timeout: int, work: Path) -> dict:
    """One CPT variant in its own process; the shape's model directory and corpus are written first,
    in a process of their own (on the GPU when there is one), once per shape and corpus."""
    cmd, env, parity = cpt_command(case, work)
    stack, shape, cap, _ = case
    data_flags = tuple(cmd[cmd.index("--out-dir") + 2 :])
    if (shape, data_flags) not in _prepared:
        prep = [sys.executable, str(HERE / "cpt.py"), "--prepare", "--shape", shape, *data_flags]
        subprocess.run(prep, env=env, capture_output=True, text=True, timeout=max(timeout, 1800))
        _prepared.add((shape, data_flags))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        row = json.loads(line[-1]) if line else None
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
    except subprocess.TimeoutExpired:
        row, err = None, f"timeout after {timeout}s"
    if row is None:
        row = {"stack": stack, "shape": shape, "cap_gib": cap, "error": err[:200]}
    if parity:
        row["parity_run"] = parity
    return row


def with_parity(rows: list[dict], env: dict) -> list[dict]:
    """Each snuggle row of a parity run gets the verdict against the HF row of the same shape and run."""
    rtol = cpt.PARITY_RTOL["fp32" if env.get("gpu") == "cpu" else "bf16"]
    ref = {(r["shape"], r["parity_run"]): r for r in rows if r.get("parity_run") and r["stack"] == "hf"}
    for r in rows:
        key = (r.get("shape"), r.get("parity_run"))
        if r.get("stack") == "snuggle" and key in ref and "losses" in r and "losses" in ref[key]:
            r.update(cpt.compare_curves(r, ref[key], rtol))
    return rows


def table_head(heading: str, env: dict, header: list[str], *notes: str) -> list[str]:
    """A results table's heading, environment, notes and column header (markdown lines)."""
    return [
        f"# {heading}",
        "",
        "environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        *notes,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]


def cpt_label(r: dict) -> str:
    name = f"{r['shape']} {r['stack']}"
    if r.get("keep_layers"):
        name += f" keep layers {r['keep_layers']}"
    if r.get("embedding_offload") not in (None, "", "auto"):
        name += f" embeddings' state on {r['embedding_offload']}"
    if r.get("parity_run"):
        name += f" (parity, {r['parity_run']})"
    return name + (f", cap {r['cap_gib']:g} GiB" if r.get("cap_gib") else "")


def write_cpt_tables(suite: str, env: dict, rows: list[dict], out: Path) -> None:
    """The CPT recipe's table (markdown, printed too) and its rows as JSON lines."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}-{env['gpu'].replace(' ', '_')}-{env['commit']}"
    header = ["case", "s / step", "tokens/s", "peak GiB", "loss first", "loss last", "150 steps", "notes"]
    lines = table_head(f"snuggle benchmark `{suite}`: the continued-pretraining recipe", env, header)
    for r in rows:
        if "error" in r:
            lines.append(f"| {cpt_label(r)} | {r['error']} |" + " |" * (len(header) - 2))
            continue
        notes = []
        if "parity" in r:
            verdict = "equal" if r["parity"] else "NOT equal"
            notes.append(f"curve {verdict} to HF's (max rel. diff {r.get('max_rel_diff', float('nan')):.1e})")
        moved = r.get("embeddings_changed") or {}
        if moved and not all(v > 0 for v in moved.values()):
            notes.append("embeddings did not change")
        if r.get("placement") or r.get("plan"):
            notes.append(r.get("placement") or r["plan"].removeprefix("snuggle: "))
        lines.append(
            f"| {cpt_label(r)} | {r['step_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | "
            f"{r['loss_first']:.4f} | {r['loss_last']:.4f} | {r['wall_150_s'] / 60:.1f} min | "
            f"{'; '.join(notes)} |"
        )
    lines += [
        "",
        "s / step: median seconds of an optimizer step (batch x seq x accumulation tokens: 32,768 in the "
        "recipe) after the warm-up steps; 150 steps: 150 x their mean; peak: torch.cuda.max_memory_allocated "
        "over the process.",
    ]
    table = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(table)
    with open(out / f"{stem}.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({**r, **env}) + "\n")
    print(table)


def add_rates(r: dict, peak: float) -> dict:
    """MFU (against the datasheet peak) and the share of the measured matmul rate, for a row that ran."""
    if "tokens_per_s" in r:
        achieved = r["tokens_per_s"] * flops_per_token(r["model"], r["seq"]) / 1e12
        r["mfu"] = achieved / DATASHEET_TFLOPS
        r["bound"] = achieved / peak
    return r


def write_tables(suite: str, env: dict, peak: float, rows: list[dict], out: Path) -> None:
    """The ratios to the best peer, then the table as markdown (printed too), CSV and JSON lines."""
    # ratio to the best peer that ran here; the earlier peers run's figures stand in only on its card
    # (an H100), and only for cases no peer ran for in this run
    peers = [p for p in rows if p["variant"] != "snuggle"]
    if "H100" in env["gpu"]:
        peers += anchor_rows()
    for r in rows:
        peer = best_peer(r, peers) if r["variant"] == "snuggle" and "tokens_per_s" in r else None
        if peer:
            r["vs_best_peer"] = r["tokens_per_s"] / peer
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}-{env['gpu'].replace(' ', '_')}-{env['commit']}"
    header = [
        "case",
        "tokens/s",
        "step s",
        "peak GiB",
        "reserved GiB",
        "MFU",
        "of bound",
        "vs best peer",
        "loss first",
        "loss last",
    ]
    lines = table_head(
        f"snuggle benchmark `{suite}`", env, header, f"measured bf16 matmul: {peak:.0f} TFLOP/s"
    )
    for r in rows:
        if "error" in r:
            lines.append(f"| {label(r)} | {r['error']} |" + " |" * (len(header) - 2))
            continue
        reserved = f"{r['reserved_gib']:.1f}" if "reserved_gib" in r else "-"  # older rows lack it
        lines.append(
            f"| {label(r)} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_gib']:.1f} | "
            f"{reserved} | "
            f"{r['mfu']:.1%} | {r['bound']:.1%} | {r.get('vs_best_peer', float('nan')):.2f} | "
            f"{r['loss_first']:.4f} | {r['loss_last']:.4f} |"
        )
    lines += [
        "",
        "vs best peer: against the peers run above; on an H100, the earlier figures below stand in for the "
        "peers not run. Peers' figures from an earlier run of benchmarks/bench.py (same setup, one H100, "
        "2026-11-25): "
        + "; ".join(
            f"{k[0]} {k[1]} ckpt {k[2]}: {v[0]:,} tokens/s at {v[1]} GiB" for k, v in ANCHORS.items()
        ),
        "",
        "Unsloth QLoRA 8B (earlier run of benchmarks/bench.py, one H100): "
        + "; ".join(
            f"{b} x {s} ckpt {c}: {v[0]:,} tokens/s at {v[1]} GiB" for (b, s, c), v in QLORA_ANCHORS.items()
        )
        + "; 1 x 65536 capped at 24 GiB: out of memory. HF+PEFT+bitsandbytes: 2,556 tokens/s at 17.7 GiB.",
    ]
    plans = [f"- {label(r)}: {r['plan']}" for r in rows if r.get("plan")]
    if plans:
        lines += ["", "Memory plans chosen (`--ckpt plan`, as the trainer does):", *plans]
    table = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(table)
    with open(out / f"{stem}.jsonl", "w") as fh:
        for r in rows:
            fh.write(json.dumps({**r, **env}) + "\n")
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        keys = [
            "variant",
            "model",
            "batch",
            "seq",
            "ckpt",
            "cap_gib",
            "tokens_per_s",
            "step_s",
            "peak_gib",
            "mfu",
            "bound",
            "vs_best_peer",
            "loss_first",
            "loss_last",
            "error",
        ]
        w = csv.DictWriter(fh, fieldnames=keys + list(env), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, **env})
    print(table)


if __name__ == "__main__":
    main()
