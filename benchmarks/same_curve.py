"""Fixed-seed CPU runs whose metrics must not move under a refactor: print them, diff two trees' output.

Trains tiny random models (tests/conftest.py) on a learnable corpus: LoRA with trained embeddings and
evaluation, full fine-tuning, a second stage from the LoRA run's adapter, and a resume, for a tied and
an untied family. Prints every metrics.jsonl row without its timing and memory fields, as JSON, so that

    git stash; python benchmarks/same_curve.py > before.json; git stash pop
    python benchmarks/same_curve.py > after.json; cmp before.json after.json

says whether a change that should not touch numerics kept every loss, gradient norm and learning rate
bit for bit. About a minute on one CPU core.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tiny_hf_model  # noqa: E402
from snuggle.train.loop import train  # noqa: E402
from test_train import learnable_docs, make_cfg, write_jsonl  # noqa: E402

# fields that depend on the machine and the moment, not on the numerics
_TIMING = ("time", "sec", "tok_per", "tokens_per", "mfu", "wall", "elapsed", "eta", "_s", "throughput", "mem")


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(t in k for t in _TIMING)} for r in rows]


def _train(model_dir: Path, corpus: Path, out: Path, *overrides: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(make_cfg(model_dir, corpus, out, *overrides))


def main() -> None:
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        corpus = write_jsonl(d / "corpus.jsonl", learnable_docs(60))
        for family, tie in (("llama", False), ("qwen2", True)):
            model_dir = d / family
            build_tiny_hf_model(family, tie, model_dir)
            lora = d / f"{family}-lora"
            _train(
                model_dir, corpus, lora, "lora.train_embeddings=true", "train.embedding_lr=0.01",
                "data.val_fraction=0.2", "train.eval_every=2", "train.steps=4",
            )  # fmt: skip
            _train(model_dir, corpus, d / f"{family}-full", "lora.enabled=false")
            stage2 = d / f"{family}-stage2"
            adapter = f"model.adapter={lora}"
            _train(model_dir, corpus, stage2, "lora.train_embeddings=true", adapter, "train.steps=2")
            resumed = d / f"{family}-resume"
            _train(model_dir, corpus, resumed, "train.steps=2", "train.save_every=2")
            _train(
                model_dir, corpus, resumed, "train.steps=4", "train.save_every=2", "train.resume=true",
                "train.allow_config_change=true",
            )  # fmt: skip
            for name in ("lora", "full", "stage2", "resume"):
                runs[f"{family}-{name}"] = _rows(d / f"{family}-{name}")
    print(json.dumps(runs, indent=1, sort_keys=True))


if __name__ == "__main__":
    main()
