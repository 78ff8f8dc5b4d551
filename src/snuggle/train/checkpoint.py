"""Atomic training checkpoints: written into a temp directory, fsynced, then renamed into place.

A checkpoint holds what continues the same curve: trainable tensors (safetensors), optimizer and
scheduler state, the step (which fixes the data position: batches are a pure function of the step)
and RNG states. A crash at any instant leaves either the previous complete checkpoint or the new one,
never a torn one: readers only trust directories named in `latest`, which is replaced atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from snuggle.errors import SnuggleError

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "load_trainables"]

_PREFIX = "checkpoint-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(path)


def save_checkpoint(
    run_dir: Path,
    step: int,
    trainables: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    meta: dict[str, Any],
    keep: int = 2,
) -> Path:
    final = run_dir / f"{_PREFIX}{step:07d}"
    tmp = run_dir / f".tmp-{_PREFIX}{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in trainables.items()}, str(tmp / "trainable.safetensors")
    )
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
        tmp / "state.pt",
    )
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
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
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "latest"
    if not pointer.is_file():
        return None
    ckpt = run_dir / pointer.read_text().strip()
    return ckpt if (ckpt / "meta.json").is_file() else None


def load_trainables(ckpt: Path, model: nn.Module) -> dict[str, Any]:
    """Copy a checkpoint's trainable tensors into `model` (names must match); returns its meta."""
    try:
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None
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


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
    meta = load_trainables(ckpt, model)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return meta
