"""The trainer end to end on one GPU: plain vs torchrun world size 1 (ddp, fsdp), same config.

Builds a random-init Llama-shaped model with a byte-level BPE tokenizer trained on the shipped Italian
corpus (no hub needed), then runs `snuggle train` three ways and compares tokens/s (median over steps
after the first 5) and the loss curve. Issue #5 asks that world size 1 under torchrun be as fast as
the plain run.

usage: python benchmarks/trainer_world1.py OUT_DIR [--steps 30]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = gzip.decompress((ROOT / "examples/data/debian-reference.it.txt.gz").read_bytes()).decode()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<s>", "</s>"])
    tk.train_from_iterator(text.splitlines(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def run(cmd: list[str], env: dict) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    out = Path(a.out)
    model_dir, corpus = out / "model", out / "corpus.jsonl"
    build_model(model_dir)
    subprocess.run([sys.executable, str(ROOT / "examples/prepare_corpus.py"), str(corpus)], check=True)
    env = {**os.environ, "SNUGGLE_CACHE": str(out / "cache"), "PYTHONUNBUFFERED": "1"}
    common = [
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        f"data.train={corpus}",
        "data.seq_len=1024",
        "data.val_fraction=0.02",
        "lora.r=16",
        "lora.alpha=16",
        f"train.steps={a.steps}",
        "train.batch_size=8",
        "train.lr=2e-4",
        "train.warmup_steps=2",
        "train.progress=false",
        "train.eval_rows=16",
    ]
    snug = [sys.executable, "-m", "snuggle", "train", str(ROOT / "examples/cpt_smollm2.yaml")]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "snuggle",
        "train",
        str(ROOT / "examples/cpt_smollm2.yaml"),
    ]
    variants = {
        "plain (none)": snug + ["train.parallel=none"],
        "torchrun ws1 ddp": torchrun + ["train.parallel=ddp"],
        "torchrun ws1 fsdp": torchrun + ["train.parallel=fsdp"],
    }
    rows = []
    for name, cmd in variants.items():
        run_dir = out / name.split()[0] / name.split()[-1].strip("()")
        run(cmd + common + [f"train.output_dir={run_dir}"], env)
        m = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in m if "loss" in r]
        tps = statistics.median(r["tokens_per_s"] for r in steps[5:])
        evals = [r for r in m if "eval_loss" in r]
        rows.append(
            (name, tps, steps[0]["loss"], steps[-1]["loss"], evals[-1]["eval_loss"], steps[-1]["mem_gib"])
        )
    lines = [
        "| run | tokens/s | loss step 1 | loss last | eval loss | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {n} | {t:,.0f} | {a0:.4f} | {a1:.4f} | {e:.4f} | {g:.1f} |" for n, t, a0, a1, e, g in rows]
    table = "\n".join(lines)
    (out / "trainer_world1.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
