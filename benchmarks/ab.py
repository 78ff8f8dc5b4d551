"""Two trees, the same cases, interleaved: is a change faster than the code before it?

One run of one case in its own process varies by a few percent on the same GPU, more than many changes
gain, so a comparison takes rounds: in each, every case runs once from the base tree and once from this
one (the order alternating between rounds), each in its own process through that tree's own
benchmarks/bench.py and src/. Prints each case's median tokens/s per tree and their ratio.

usage: python benchmarks/ab.py BASE_TREE [--rounds N] [--out FILE.jsonl] [--this-env K=V ...] CASE [CASE ...]
       CASE = "MODEL BATCH SEQ CKPT CAP_GIB [bench.py flags]", e.g. "8b 2 2048 plan 24 --quantize nf4"
BASE_TREE is a copy of the base commit's tree (e.g. `git archive BASE | tar -x -C DIR`), or `.` with
--this-env to compare one tree under two environments (e.g. an allocator setting).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_tree(tree: Path, case: str, timeout: int, extra_env: dict[str, str] | None = None) -> dict:
    model, batch, seq, ckpt, cap, *extra = shlex.split(case)
    cmd = [sys.executable, str(tree / "benchmarks" / "bench.py"), "--variant", "snuggle", "--model", model]
    cmd += ["--batch", batch, "--seq", seq, "--ckpt", ckpt, "--cap-gib", cap, *extra]
    path = os.pathsep.join([str(tree / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, **(extra_env or {}), "PYTHONPATH": path}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        res = (
            json.loads(lines[-1])
            if lines
            else {"error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
        )
    except subprocess.TimeoutExpired:
        res = {"error": f"timeout after {timeout}s"}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("cases", nargs="+")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--this-env", action="append", default=[], help="K=V set for 'this' runs only")
    a = ap.parse_args()
    this_env = dict(kv.split("=", 1) for kv in a.this_env)
    trees = {"base": a.base.resolve(), "this": HERE.parent}
    results: dict[tuple[str, str], list[float]] = {}
    out = open(a.out, "a") if a.out else None
    for rnd in range(a.rounds):
        order = ["base", "this"] if rnd % 2 == 0 else ["this", "base"]
        for case in a.cases:
            for name in order:
                res = run_tree(trees[name], case, a.timeout, this_env if name == "this" else None)
                row = {
                    "tree": name,
                    "case": case,
                    "round": rnd,
                    **{k: v for k, v in res.items() if k != "losses"},
                }
                print(json.dumps(row), flush=True)
                if out:
                    out.write(json.dumps({**row, "losses": res.get("losses")}) + "\n")
                    out.flush()
                if "tokens_per_s" in res:
                    results.setdefault((case, name), []).append(res["tokens_per_s"])
    print("\n| case | base tokens/s (median) | this tokens/s (median) | this / base | runs |")
    print("|---|---|---|---|---|")
    for case in a.cases:
        b, t = results.get((case, "base"), []), results.get((case, "this"), [])
        if b and t:
            mb, mt = statistics.median(b), statistics.median(t)
            spread = f"base {min(b):,.0f}-{max(b):,.0f}, this {min(t):,.0f}-{max(t):,.0f}"
            print(f"| {case} | {mb:,.0f} | {mt:,.0f} | {mt / mb:.3f} | {spread} |")
        else:
            print(f"| {case} | {len(b)} ok | {len(t)} ok | - | failed runs: see the rows above |")


if __name__ == "__main__":
    main()
