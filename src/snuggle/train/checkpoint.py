"""Atomic training checkpoints through torch.distributed.checkpoint (DCP), one format for 1 and N processes.

A checkpoint holds what continues the same curve:

    checkpoint-NNNNNNN/
      trainable.safetensors  every trainable tensor, whole, by its HF name (a tied lm_head once, as the
                             embedding); written by DCP's safetensors storage, each rank its shards,
                             then consolidated into this one file
      optimizer/             DCP: AdamW state by parameter name, one shard file per rank
      state.pt               scheduler state and every rank's RNG state (rank 0 writes it)
      meta.json              step (which fixes the data position: batches are a pure function of the
                             step), world size, strategy, global batch, tokens seen

DCP loads both parts into any world size and strategy: shards are re-cut to the reader's layout, so a
run saved on 2 processes resumes on 1 and the other way round. `trainable.safetensors` is a plain
safetensors file, so export, eval and `load_run` read it without any process group.

A crash at any instant leaves either the previous complete checkpoint or the new one, never a torn
one: every rank writes into a temp directory; after a barrier rank 0 fsyncs it, renames it into place
and replaces `latest`, the only pointer readers trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from snuggle.errors import SnuggleError
from snuggle.train.parallel import DistContext, unwrap

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "load_trainables", "TRAINABLE_FILE"]

_PREFIX = "checkpoint-"
TRAINABLE_FILE = "trainable.safetensors"
_OPTIMIZER_DIR = "optimizer"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        if f.is_dir():
            _fsync_tree(f)
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


@contextlib.contextmanager
def _dcp_quiet() -> Iterator[None]:
    # without a process group DCP warns that it assumes one process, which is exactly our intent
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(trainable tensors by name, optimizer state by parameter name), sharded as the model is.

    `ignore_frozen_params` keeps the frozen base out: it is the model file, not run state. A tied
    lm_head would appear twice (one tensor under two names); keeping the names `named_parameters`
    gives keeps it once, as the embedding, which is also what safetensors requires.
    """
    names = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    return {k: v for k, v in model_sd.items() if k in names}, optim_sd


def _rng_state() -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return rng


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    keep: int = 2,
    ctx: DistContext | None = None,
) -> Path:
    """Write checkpoint `step` of `model` (plain, DDP or FSDP) collectively; every rank must call it."""
    ctx = ctx or DistContext()
    final = run_dir / f"{_PREFIX}{step:07d}"
    tmp = run_dir / f".tmp-{_PREFIX}{step:07d}"
    if ctx.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    ctx.barrier()
    model_sd, optim_sd = _state_dicts(model, optimizer)
    with _dcp_quiet():
        writer = dcp.HuggingFaceStorageWriter(
            str(tmp), save_distributed=ctx.enabled, enable_consolidation=ctx.enabled
        )
        dcp.save(model_sd, storage_writer=writer, no_dist=not ctx.enabled)
        dcp.save(optim_sd, checkpoint_id=str(tmp / _OPTIMIZER_DIR), no_dist=not ctx.enabled)
    rngs = ctx.all_gather_object(_rng_state())
    if ctx.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "rng": rngs}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
        _settle_trainable_file(tmp)
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = run_dir / "latest.tmp"
        latest_tmp.write_text(final.name)
        with open(latest_tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(latest_tmp, run_dir / "latest")
        _fsync_dir(run_dir)
        for old in sorted(run_dir.glob(f"{_PREFIX}*"))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    ctx.barrier()  # the checkpoint is complete (and `latest` names it) when any rank returns
    return final


def _settle_trainable_file(tmp: Path) -> None:
    """DCP's safetensors writer names its output like an HF model; give it our name, drop the rest.

    Left behind: the per-rank shards it consolidated (`sharded/`) and an HF index, neither of which a
    reader needs: DCP's reader and safetensors both read the one consolidated file.
    """
    files = sorted(tmp.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one consolidated safetensors file in {tmp}, found {files}")
    os.replace(files[0], tmp / TRAINABLE_FILE)
    shutil.rmtree(tmp / "sharded", ignore_errors=True)
    (tmp / "model.safetensors.index.json").unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    ckpt = run_dir / pointer.read_text().strip()
    return ckpt if (ckpt / "meta.json").is_file() else None


def _read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None


def load_trainables(ckpt: Path, model: nn.Module) -> dict[str, Any]:
    """Copy a checkpoint's trainable tensors into an unwrapped `model` (names must match); returns its meta.

    Reads the consolidated safetensors file alone: no process group, no DCP, any world size it was
    written with.
    """
    try:
        tensors = load_file(str(ckpt / TRAINABLE_FILE))
    except (OSError, ValueError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None
    meta = _read_meta(ckpt)
    params = dict(model.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise SnuggleError(
            f"{ckpt}: checkpoint tensors not in the model: {missing[:3]} "
            "(was it made with another lora/model config?)"
        )
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise SnuggleError(
                    f"{ckpt}: {k} has shape {tuple(v.shape)}, model has {tuple(params[k].shape)}"
                )
            params[k].copy_(v)
    return meta


def load_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext | None = None,
) -> dict[str, Any]:
    """Restore trainables, optimizer, scheduler and RNG into `model` (plain, DDP or FSDP) collectively.

    The checkpoint may come from any world size: DCP reads each rank's part of every tensor. RNG
    states are restored for the ranks the checkpoint has; they matter only with dropout, whose masks
    depend on the world size anyway.
    """
    ctx = ctx or DistContext()
    meta = _read_meta(ckpt)
    if not (ckpt / _OPTIMIZER_DIR).is_dir():
        raise SnuggleError(
            f"{ckpt}: written by an older snuggle (no {_OPTIMIZER_DIR}/); it exports, but cannot be resumed"
        )
    model_sd, optim_sd = _state_dicts(model, optimizer)
    try:
        with safe_open(str(ckpt / TRAINABLE_FILE), framework="pt") as f:
            saved = set(f.keys())
    except (OSError, ValueError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None
    if saved != set(model_sd):
        diff = sorted(saved ^ set(model_sd))
        raise SnuggleError(
            f"{ckpt}: trainable tensors differ from this run's ({diff[:3]}); "
            "was it made with another lora/model config?"
        )
    with _dcp_quiet():
        dcp.load(model_sd, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt)), no_dist=not ctx.enabled)
        dcp.load(optim_sd, checkpoint_id=str(ckpt / _OPTIMIZER_DIR), no_dist=not ctx.enabled)
    # strict=False: the frozen base and a tied lm_head's second name are deliberately absent
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_sd,
        optim_state_dict=optim_sd,
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    if ctx.rank < len(rngs):
        torch.set_rng_state(rngs[ctx.rank]["torch"])
        if "cuda" in rngs[ctx.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rngs[ctx.rank]["cuda"])
    return meta
