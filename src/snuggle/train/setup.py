"""Everything the loop needs before step 0, each validated before anything is written to disk.

A second stage (`model.adapter`) starts from the LoRA factors (and trained embeddings) of a snuggle run
or a PEFT adapter: they are loaded onto the freshly built model here, before any optimizer or wrapper
exists, so the new run trains them further with a fresh optimizer from step 0.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from snuggle.config import DataConfig, LoraConfig, RunConfig
from snuggle.data import PackedRows, resolve_files, split_indices, tokenize_corpus
from snuggle.data.instruct import SUFFIXES as INSTRUCT_SUFFIXES
from snuggle.data.instruct import PackedExamples, check_conversations, tokenize_instruct
from snuggle.data.sources import check_documents
from snuggle.data.tokenize import check_token_ids, tokenizer_id_limit
from snuggle.errors import SnuggleError
from snuggle.load import load, load_deferred, resolve_dtype
from snuggle.lora import LoRALinear, apply_lora, enable_full_finetune, resolve_targets
from snuggle.model.decoder import Decoder
from snuggle.train.checkpoint import latest_checkpoint, load_trainables

__all__ = [
    "Data",
    "build_model",
    "build_data",
    "check_output_dir",
    "check_before_model",
    "check_tokenizer_fits",
    "default_cache_dir",
    "run_checkpoint",
    "RUN_MARKERS",
]

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
        if stray := _stray_checkpoints(out, "train.resume=true, but "):
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


def _stray_checkpoints(run: Path, lead: str) -> str | None:
    """What to say when `latest` is missing or names no complete checkpoint while complete ones stand."""
    complete = sorted(p.name for p in run.glob("checkpoint-*") if (p / "meta.json").is_file())
    if not complete:
        return None
    latest = run / "latest"
    what = "names no complete checkpoint" if latest.exists() else "is missing"
    return (
        f"{lead}{latest} {what} while {', '.join(complete[-3:])} "
        f"{'is one' if len(complete) == 1 else 'are'}; to use the newest, write its name there "
        f"(echo {complete[-1]} > {latest}); nothing was changed"
    )


def _same_base(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


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


def run_checkpoint(run: Path) -> Path:
    """A run's latest complete checkpoint, which must lie inside the run: `latest` is a file in the run
    directory, and a name in it like '../../elsewhere' must not send us reading other directories."""
    try:
        ckpt = latest_checkpoint(run)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, a NUL in the name
        raise SnuggleError(f"{run}/latest: unreadable checkpoint pointer ({e})") from None
    if ckpt is None:
        raise SnuggleError(_stray_checkpoints(run, "") or f"{run}: the run has no complete checkpoint yet")
    if not ckpt.resolve().is_relative_to(run.resolve()) or ckpt.resolve() == run.resolve():
        raise SnuggleError(f"{run}/latest names {ckpt}, which is not a checkpoint inside the run")
    return ckpt


def check_run_shapes(ckpt: Path, model: Decoder, what: str) -> None:
    """The base a run's checkpoint was trained on (its tensor shapes) must be `model`'s: hidden size,
    layers and vocabulary, whatever the run's recorded model.path says (paths differ between machines)."""
    from safetensors import SafetensorError, safe_open

    from snuggle.io.peft_format import check_base_shape
    from snuggle.train.checkpoint import TRAINABLE_FILE

    try:
        with safe_open(str(ckpt / TRAINABLE_FILE), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None
    check_base_shape(shapes, model, what, every_layer=True)


def _lora_mismatch(lc: LoraConfig, have: dict, adapter: str) -> None:
    """Error naming every structural LoRA setting in which the config differs from the adapter's."""
    want = {
        "r": lc.r,
        "alpha": float(lc.alpha),
        "rslora": bool(lc.rslora),
        "targets": tuple(resolve_targets(lc.targets)),
        "train_embeddings": bool(lc.train_embeddings),
    }
    diff = []
    for key, value in want.items():
        theirs = have[key]
        if key == "targets":
            same = set(value) == set(theirs)
            value, theirs = list(value), list(theirs)
        else:
            same = value == theirs
        if not same:
            diff.append(f"lora.{key}={value} (adapter: {theirs})")
    if diff:
        raise SnuggleError(
            f"lora settings differ from model.adapter {adapter}: {', '.join(diff)}; set them to the adapter's"
        )


def _start_from_run(model: Decoder, cfg: RunConfig, run: Path) -> None:
    """The run's latest trainables (LoRA factors, embedding copies) onto the model, LoRA as the run had it."""
    from snuggle.run_dir import run_config

    run_cfg = run_config(run)
    if not run_cfg.use_lora:
        raise SnuggleError(
            f"model.adapter {run} is a full fine-tuning run, not an adapter; export it with "
            f"`snuggle export {run} --format hf` and give that directory as model.path"
        )
    rl = run_cfg.lora
    have = {
        "r": rl.r,
        "alpha": float(rl.alpha),
        "rslora": bool(rl.rslora),
        "targets": tuple(resolve_targets(rl.targets)),
        "train_embeddings": bool(rl.train_embeddings),
    }
    _lora_mismatch(cfg.lora, have, str(run))
    ckpt = run_checkpoint(run)
    check_run_shapes(ckpt, model, f"model.adapter {run}")
    if not _same_base(run_cfg.model.path, cfg.model.path):
        # the shapes fit: a model copied to another path, or another machine; the name alone proves nothing
        warnings.warn(
            f"model.adapter {run} was trained on {run_cfg.model.path}, not on model.path {cfg.model.path}; "
            "the shapes fit, so it is used: make sure it is the same base model",
            stacklevel=2,
        )
    lc = cfg.lora
    apply_lora(model, lc.r, lc.alpha, lc.dropout, lc.rslora, lc.targets, lc.train_embeddings)
    load_trainables(ckpt, model)


def _start_from_peft(model: Decoder, cfg: RunConfig, adapter: Path) -> None:
    from snuggle.io.peft_format import load_peft_adapter, peft_lora_settings

    have = peft_lora_settings(adapter)
    base = have["base"]
    _lora_mismatch(cfg.lora, have, str(adapter))
    load_peft_adapter(model, adapter)  # the shapes: a different base model is refused here, named
    # a hub id names no local path, and a local path differs between machines: the name alone is a hint
    if base and Path(base).expanduser().exists() and not _same_base(base, cfg.model.path):
        warnings.warn(
            f"model.adapter {adapter} was trained on {base}, not on model.path {cfg.model.path}; "
            "the shapes fit, so it is used: make sure it is the same base model",
            stacklevel=2,
        )
    # the adapter's lora_dropout was its own training's; this stage trains with the config's
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.dropout = nn.Dropout(cfg.lora.dropout) if cfg.lora.dropout > 0 else nn.Identity()


def _start_from_adapter(model: Decoder, cfg: RunConfig) -> None:
    from snuggle.io.peft_format import ADAPTER_CONFIG

    a = Path(cfg.model.adapter).expanduser()
    if (a / "config.yaml").is_file():
        _start_from_run(model, cfg, a)
    elif (a / ADAPTER_CONFIG).is_file():
        _start_from_peft(model, cfg, a)
    elif not a.exists():
        raise SnuggleError(f"model.adapter not found: {a}")
    else:
        raise SnuggleError(
            f"model.adapter {a}: not a snuggle run directory (config.yaml) "
            f"nor a PEFT adapter ({ADAPTER_CONFIG})"
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
        lc = cfg.lora
        if cfg.model.adapter is not None and load_adapter:
            _start_from_adapter(model, cfg)
        else:
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
    rows: PackedRows | PackedExamples  # same row format: everything downstream takes either
    train_idx: np.ndarray
    val_idx: np.ndarray


def build_data(
    dc: DataConfig, tokenizer, seed: int, max_positions: int, vocab_size: int | None = None
) -> Data:
    """Token cache, packed rows and the held-out split. Every id in the cache must be one the tokenizer
    can produce (and, given `vocab_size`, one the model has a row for): a cache another tokenizer wrote
    is refused by name instead of indexing past the embedding."""
    if dc.seq_len > max_positions:
        raise SnuggleError(
            f"data.seq_len {dc.seq_len} is above the model's limit of {max_positions} positions"
        )
    # instruction data: a directory's README.txt (or any text file) is passed over, not read as records
    files = resolve_files(dc.train, INSTRUCT_SUFFIXES) if dc.format == "instruct" else resolve_files(dc.train)
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
    train_idx, val_idx = split_indices(len(rows), dc.val_fraction, seed)
    if dc.val_fraction > 0 and not len(val_idx):
        # one row cannot be both trained on and held out: say so rather than skip evaluation unannounced
        warnings.warn(
            f"data.val_fraction={dc.val_fraction} holds out no rows: the corpus packs into "
            f"{len(rows)} row of data.seq_len={dc.seq_len} tokens, which trains; there is no evaluation",
            stacklevel=2,
        )
    return Data(rows, train_idx, val_idx)
