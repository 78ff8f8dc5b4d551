"""The trainer end to end in one process: plain `snuggle train` vs torchrun at world size 1, same config.

Issue #5 asks that world size 1 under torchrun be as fast as the plain run. Builds a random-init
Llama-shaped model with a byte-level BPE tokenizer trained on the shipped Italian corpus (no hub needed),
then runs the CPT recipe (examples/cpt_smollm2.yaml: rsLoRA on every projection, trained embeddings)
four ways, each in its own process:

    plain                 python -m snuggle train ...                               (train.parallel auto)
    torchrun ws1 auto     torchrun --standalone --nproc-per-node 1 -m snuggle train ... train.parallel=auto
    torchrun ws1 ddp      the same with train.parallel=ddp
    torchrun ws1 fsdp     the same with train.parallel=fsdp

At world size 1 every one of them is the plain trainer (a forced ddp/fsdp applies no wrapper and says
so), so the rows must agree in loss and should agree in speed. Per run: tokens/s = the median of
metrics.jsonl's per-step tokens/s after the first --warmup steps, peak GiB (the GPU's peak allocation,
or the process's RSS on CPU), the first and last training loss. With --rounds N the four runs are
repeated N times, interleaved (so drifting clocks or a busy host hit every variant alike), and the
table gives the median of the rounds and their range.

usage: python benchmarks/trainer_world1.py OUT_DIR [--steps 30] [--warmup 5] [--rounds 1]
       python benchmarks/trainer_world1.py OUT_DIR --device cpu --shape tiny --steps 4 --warmup 1  # CPU
Writes OUT_DIR/trainer_world1.md (and .json) and prints the table.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples/cpt_smollm2.yaml"

# the shape (what benchmarks/results/trainer-world1-* measured) and a tiny one for a CPU check
SHAPES: dict[str, dict] = {
    "default": dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}
# per device: dtype and batch shape (the GPU's is the issue's: 8 x 1024 in bf16)
DEVICES: dict[str, dict] = {
    "cuda": dict(dtype="bfloat16", seq_len=1024, batch_size=8),
    "cpu": dict(dtype="float32", seq_len=64, batch_size=2),
}
VARIANTS: tuple[tuple[str, str | None], ...] = (
    ("plain", None),
    ("torchrun ws1 auto", "auto"),
    ("torchrun ws1 ddp", "ddp"),
    ("torchrun ws1 fsdp", "fsdp"),
)


def build_model(out: Path, shape: dict) -> None:
    """A random-init Llama of `shape` (bf16 on disk) and a BPE tokenizer of its vocabulary size."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = gzip.decompress((ROOT / "examples/data/debian-reference.it.txt.gz").read_bytes()).decode()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=shape["vocab_size"], special_tokens=["<s>", "</s>"], show_progress=False
    )
    tk.train_from_iterator(text.splitlines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(
        **shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def overrides(model_dir: Path, corpus: Path, device: str, steps: int) -> list[str]:
    d = DEVICES[device]
    return [
        f"model.path={model_dir}",
        f"model.device={device}",
        f"model.dtype={d['dtype']}",
        f"data.train={corpus}",
        f"data.seq_len={d['seq_len']}",
        "data.val_fraction=0.02",
        "lora.r=16",
        "lora.alpha=16",
        f"train.steps={steps}",
        f"train.batch_size={d['batch_size']}",
        "train.lr=2e-4",
        "train.warmup_steps=2",
        "train.progress=false",
        "train.eval_rows=16",
    ]


def command(parallel: str | None) -> list[str]:
    """The launch of one variant: the plain CLI, or torchrun with one process and `parallel`."""
    if parallel is None:
        return [sys.executable, "-m", "snuggle", "train", str(CONFIG)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    return [*torchrun, "-m", "snuggle", "train", str(CONFIG), f"train.parallel={parallel}"]


def summarize(rows: list[dict], warmup: int) -> dict:
    """One run's figures from its metrics.jsonl rows: median tokens/s after `warmup` steps, peak, losses."""
    steps = [r for r in rows if "loss" in r]
    if len(steps) <= warmup:
        raise SystemExit(f"trainer_world1.py: {len(steps)} steps logged, need more than --warmup {warmup}")
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[warmup:]),
        "peak_gib": max(r["mem_gib"] for r in steps),
        "loss_first": steps[0]["loss"],
        "loss_last": steps[-1]["loss"],
    }


def run_variant(cmd: list[str], args: list[str], run_dir: Path, env: dict, warmup: int) -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier invocation's run: the trainer refuses it
    p = subprocess.run([*cmd, *args, f"train.output_dir={run_dir}"], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    res = summarize(rows, warmup)
    res["one_process_note"] = "applies no wrapper" in p.stderr
    return res


def combine(runs: list[dict]) -> dict:
    """A variant's rounds: the median tokens/s and its range; peak and losses of the first round."""
    tps = [r["tokens_per_s"] for r in runs]
    return {**runs[0], "tokens_per_s": statistics.median(tps), "tokens_per_s_range": [min(tps), max(tps)]}


def table(results: dict[str, dict]) -> str:
    base = results["plain"]["tokens_per_s"]
    lines = [
        "| run | tokens/s | vs plain | range over rounds | peak GiB | loss first | loss last |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lo, hi = r["tokens_per_s_range"]
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.3f} | {lo:,.0f} - {hi:,.0f} "
            f"| {r['peak_gib']:.2f} | {r['loss_first']:.4f} | {r['loss_last']:.4f} |"
        )
    return "\n".join(lines)


def environment(device: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else "cpu"
    # SNUGGLE_COMMIT first, as run.py: a tree copied without its .git (a device machine's snapshot)
    # would otherwise report the commit of whatever repository encloses it
    commit = os.environ.get("SNUGGLE_COMMIT", "")
    if not commit:
        try:
            git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
            commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() or "unknown"
        except OSError:
            commit = "unknown"
    return {"device": gpu, "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the four runs, interleaved")
    ap.add_argument("--device", choices=sorted(DEVICES), default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="default")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir, corpus = out / "model", out / "corpus.jsonl"
    if not (model_dir / "config.json").is_file():
        build_model(model_dir, SHAPES[a.shape])
    if not corpus.is_file():
        prepare = [sys.executable, str(ROOT / "examples/prepare_corpus.py"), str(corpus)]
        subprocess.run(prepare, check=True, capture_output=True)
    env = {**os.environ, "SNUGGLE_CACHE": str(out / "cache"), "PYTHONUNBUFFERED": "1"}
    args = overrides(model_dir, corpus, a.device, a.steps)
    runs: dict[str, list[dict]] = {name: [] for name, _ in VARIANTS}
    for k in range(a.rounds):
        for name, parallel in VARIANTS:
            run_dir = out / "runs" / f"{name.replace(' ', '-')}-{k}"
            runs[name].append(run_variant(command(parallel), args, run_dir, env, a.warmup))
    results = {name: combine(r) for name, r in runs.items()}
    env_info = environment(a.device)
    head = (
        f"# Trainer in one process: plain vs torchrun world size 1 ({env_info['device']})\n\n"
        f"commit {env_info['commit']}, torch {env_info['torch']}; shape {a.shape} "
        f"({SHAPES[a.shape]}), {DEVICES[a.device]}, CPT recipe (examples/cpt_smollm2.yaml, LoRA r=16), "
        f"{a.steps} steps, tokens/s = median after {a.warmup} warm-up steps, {a.rounds} round(s).\n"
    )
    text = head + "\n" + table(results) + "\n"
    (out / "trainer_world1.md").write_text(text)
    (out / "trainer_world1.json").write_text(
        json.dumps({"env": env_info, "args": vars(a), "results": results, "runs": runs}, indent=1)
    )
    print(text)


if __name__ == "__main__":
    main()
