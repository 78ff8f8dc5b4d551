"""Everything the loop needs before step 0, each validated before anything is written to disk."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snuggle.config import DataConfig, RunConfig
from snuggle.data import PackedRows, resolve_files, split_indices, tokenize_corpus
from snuggle.errors import SnuggleError
from snuggle.load import load
from snuggle.lora import apply_lora, enable_full_finetune
from snuggle.model.decoder import Decoder

__all__ = ["Data", "build_model", "build_data", "check_output_dir", "default_cache_dir", "RUN_MARKERS"]

# files whose presence means a directory already holds a run
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "latest")


def default_cache_dir() -> Path:
    return Path(os.environ.get("SNUGGLE_CACHE", Path.home() / ".cache" / "snuggle"))


def check_output_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SnuggleError(f"train.output_dir {out} exists and is not a directory")
    if (
        not resume
        and out.is_dir()
        and (any((out / m).exists() for m in RUN_MARKERS) or any(out.glob("checkpoint-*")))
    ):
        raise SnuggleError(
            f"train.output_dir {out} holds another run; set train.resume=true to continue it "
            "or choose another train.output_dir"
        )


def build_model(cfg: RunConfig) -> tuple[Decoder, object]:
    """Base model + tokenizer, with LoRA / trainable embeddings / full fine-tuning applied."""
    model, tokenizer = load(cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device)
    if cfg.use_lora:
        lc = cfg.lora
        apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.rslora, lc.targets, lc.train_embeddings)
    else:
        enable_full_finetune(model)
    if cfg.train.kernels != "torch":
        # after LoRA (the swap replaces LoRALinear too) and before any optimizer or parallel wrapper
        from snuggle.kernels import apply_fast_path, triton_available

        if cfg.train.kernels == "triton" and not triton_available():
            raise SnuggleError("train.kernels=triton needs a CUDA GPU and an importable triton")
        apply_fast_path(model)
    return model, tokenizer


@dataclass
class Data:
    rows: PackedRows
    train_idx: np.ndarray
    val_idx: np.ndarray


def build_data(dc: DataConfig, tokenizer, seed: int, max_positions: int) -> Data:
    if dc.seq_len > max_positions:
        raise SnuggleError(
            f"data.seq_len {dc.seq_len} is above the model's limit of {max_positions} positions"
        )
    files = resolve_files(dc.train)
    cache = Path(dc.cache_dir) if dc.cache_dir else default_cache_dir()
    stream = tokenize_corpus(files, tokenizer, text_field=dc.text_field, cache_dir=cache)
    rows = PackedRows(stream, dc.seq_len)
    train_idx, val_idx = split_indices(len(rows), dc.val_fraction, seed)
    return Data(rows, train_idx, val_idx)
