"""Everything the loop needs before step 0, each validated before anything is written to disk.

A second stage (`model.adapter`) starts from the LoRA factors (and trained embeddings) of a snuggle run
or a PEFT adapter: they are loaded onto the freshly built model here (`snuggle.train.adapter`), before
any optimizer or wrapper exists, so the new run trains them further with a fresh optimizer from step 0.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from snuggle.config import DataConfig, RunConfig
from snuggle.data import PackedRows, resolve_files, split_indices, tokenize_corpus
from snuggle.data.instruct import SUFFIXES as INSTRUCT_SUFFIXES
from snuggle.data.instruct import PackedExamples, check_conversations, tokenize_instruct
from snuggle.data.sources import check_documents
from snuggle.data.tokenize import check_token_ids, tokenizer_id_limit
from snuggle.errors import SnuggleError
from snuggle.load import load, load_deferred, resolve_dtype
from snuggle.lora import apply_lora, enable_full_finetune
from snuggle.model.decoder import Decoder
from snuggle.run_dir import CHECKPOINT_PREFIX, RUN_MARKERS, latest_checkpoint, stray_checkpoints
from snuggle.train.adapter import attach_adapter

__all__ = [
    "Data",
    "build_model",
    "build_data",
    "data_files",
    "pack_rows",
    "check_output_dir",
    "check_before_model",
    "check_tokenizer_fits",
    "default_cache_dir",
]


def default_cache_dir() -> Path:
    return Path(os.environ.get("SNUGGLE_CACHE", Path.home() / ".cache" / "snuggle"))


def check_output_dir(out: Path, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SnuggleError(f"train.output_dir {out} exists and is not a directory")
    if (
        not resume
        and out.is_dir()
        and (any((out / m).exists() for m in RUN_MARKERS) or any(out.glob(f"{CHECKPOINT_PREFIX}*")))
    ):
        if not any(out.glob("checkpoint-*")):
            # a run killed before its first checkpoint (out of host memory: exit 137) left only its
            # config and metrics: resume starts it afresh, which a user cannot guess from "continue"
            raise SnuggleError(
                f"train.output_dir {out} holds a run that saved no checkpoint (stopped before its first); "
                "set train.resume=true to start it afresh there, or choose another train.output_dir"
            )
        raise SnuggleError(
            f"train.output_dir {out} holds another run; set train.resume=true to continue it "
            "or choose another train.output_dir"
        )
    if out.is_dir():
        # an existing directory on a read-only mount (or immutable): found now, not after the model loaded
        probe = out / f".snuggle-write-test-{os.getpid()}"
        try:
            probe.touch()
            probe.unlink()
        except OSError as e:
            raise SnuggleError(f"train.output_dir {out}: cannot write there ({e.strerror or e})") from None
    if resume and out.is_dir() and latest_checkpoint(out) is None:
        # `latest` lost (deleted, or naming a checkpoint that is gone) while complete ones stand: starting
        # from step 0 here would overwrite the curve and prune those checkpoints, so ask instead of guessing
        if stray := stray_checkpoints(out, "train.resume=true, but "):
            raise SnuggleError(stray)


def check_before_model(cfg: RunConfig, device: torch.device) -> None:
    """What can be judged before the model loads (10-15 s even for a 135M model), said at once: every
    data path, the first record of every file (format, text field), and a dtype that crawls here."""
    dc = cfg.data
    if dc.format == "instruct":
        check_conversations(resolve_files(dc.train, INSTRUCT_SUFFIXES), dc.split)
    else:
        check_documents(resolve_files(dc.train), dc.text_field, dc.split)
    if device.type == "cpu" and resolve_dtype(cfg.model.dtype, device) == torch.float16:
        # CPUs have no float16 matmul units: torch converts on every product
        warnings.warn(
            f"model.dtype={cfg.model.dtype} on the CPU trains some 20-30x slower than float32 (most CPUs "
            "have no float16 matrix units; measured on SmolLM2-135M); use model.dtype=float32 (auto "
            "chooses it on the CPU)",
            stacklevel=2,
        )


def check_tokenizer_fits(tokenizer, model: Decoder, where: str) -> None:
    """Refuse a tokenizer that can produce ids the model's embedding has no row for (a tokenizer smaller
    than the embedding, a padded vocabulary, is fine): naming both sizes beats an index error mid-step."""
    if tokenizer is None:
        return
    limit, rows = tokenizer_id_limit(tokenizer), model.args.vocab_size
    if limit > rows:
        raise SnuggleError(
            f"{where}: the tokenizer has {limit} token ids but the model's embedding has {rows} rows "
            f"(vocab_size {rows}): ids {rows}..{limit - 1} have no embedding; the tokenizer does not "
            "belong to this model"
        )


def build_model(
    cfg: RunConfig, load_adapter: bool = True, defer_blocks: bool = False
) -> tuple[Decoder, object]:
    """Base model + tokenizer, with LoRA / trainable embeddings / full fine-tuning applied.

    With `model.adapter` the LoRA factors start from that adapter; `load_adapter=False` builds the same
    structure without reading it (for a run's own checkpoint, which holds every trainable tensor anyway).
    `defer_blocks` (FSDP's sharded load) reads only the root now: the blocks' base weights stay on the
    meta device until `apply_parallel` reads and shards them one block at a time, while everything
    built here (LoRA factors, their adapter values, the embeddings) is real, made as in one process.
    """
    loader = load_deferred if defer_blocks else load
    model, tokenizer = loader(
        cfg.model.path, dtype=cfg.model.dtype, device=cfg.model.device, quantize=cfg.model.quantize
    )
    check_tokenizer_fits(tokenizer, model, f"model.path {cfg.model.path}")
    if cfg.use_lora:
        if cfg.model.adapter is not None and load_adapter:
            attach_adapter(model, Path(cfg.model.adapter).expanduser(), cfg.model.path, cfg.lora)
        else:
            apply_lora(model, cfg.lora)
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
    rows: PackedRows | PackedExamples  # same row format: everything downstream takes either
    train_idx: np.ndarray
    val_idx: np.ndarray


def data_files(dc: DataConfig) -> list[Path]:
    """The files `dc.train` names, resolved before any model is read so that a bad path fails fast."""
    # instruction data: a directory's README.txt (or any text file) is passed over, not read as records
    return resolve_files(dc.train, INSTRUCT_SUFFIXES) if dc.format == "instruct" else resolve_files(dc.train)


def pack_rows(
    dc: DataConfig, files: list[Path], tokenizer, vocab_size: int | None = None
) -> PackedRows | PackedExamples:
    """`files` tokenized (through the token cache) and packed into rows of `dc.seq_len` tokens. Every id
    in the cache must be one the tokenizer can produce (and, given `vocab_size`, one the model has a row
    for): a cache another tokenizer wrote is refused by name instead of indexing past the embedding."""
    cache = Path(dc.cache_dir) if dc.cache_dir else default_cache_dir()
    rows: PackedRows | PackedExamples
    if dc.format == "instruct":
        stream = tokenize_instruct(
            files, tokenizer, cache_dir=cache, chat_template=dc.chat_template, split=dc.split
        )
        rows = PackedExamples(stream, dc.seq_len)
    else:
        stream = tokenize_corpus(files, tokenizer, text_field=dc.text_field, cache_dir=cache, split=dc.split)
        rows = PackedRows(stream, dc.seq_len)
    check_token_ids(stream, tokenizer_id_limit(tokenizer), "the tokenizer")
    if vocab_size is not None:
        check_token_ids(stream, vocab_size, "the model's vocabulary")
    return rows


def build_data(
    dc: DataConfig, tokenizer, seed: int, max_positions: int, vocab_size: int | None = None
) -> Data:
    """Token cache, packed rows (`pack_rows`) and the held-out split."""
    if dc.seq_len > max_positions:
        raise SnuggleError(
            f"data.seq_len {dc.seq_len} is above the model's limit of {max_positions} positions"
        )
    rows = pack_rows(dc, data_files(dc), tokenizer, vocab_size)
    train_idx, val_idx = split_indices(len(rows), dc.val_fraction, seed)
    if dc.val_fraction > 0 and not len(val_idx):
        # one row cannot be both trained on and held out: say so rather than skip evaluation unannounced
        warnings.warn(
            f"data.val_fraction={dc.val_fraction} holds out no rows: the corpus packs into "
            f"{len(rows)} row of data.seq_len={dc.seq_len} tokens, which trains; there is no evaluation",
            stacklevel=2,
        )
    return Data(rows, train_idx, val_idx)
