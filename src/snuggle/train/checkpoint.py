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
and replaces `latest`, the only pointer readers trust. A write that fails (full disk, quota, I/O
error) on any rank removes the partial checkpoint and raises one SnuggleError on every rank, naming the
directory and its free space; `latest` still names the previous complete checkpoint.

meta.json also records the settings that shape the loss curve (`curve_fingerprint`): resuming with
other values is refused with each changed key named (`fingerprint_changes`), unless
`train.allow_config_change` says the change is meant.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from snuggle.config import RunConfig, curve_keys
from snuggle.errors import SnuggleError
from snuggle.lora import resolve_targets
from snuggle.run_dir import CHECKPOINT_PREFIX, TRAINABLE_FILE, latest_checkpoint
from snuggle.train.data_parallel import unwrap
from snuggle.train.dcp_safe import SafeLoadPlanner, SafeReader
from snuggle.train.parallel import DistContext, RankError

__all__ = [
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "load_trainables",
    "read_meta",
    "curve_fingerprint",
    "fingerprint_changes",
    "TRAINABLE_FILE",
    "run_room",
]

_TMP_PREFIX = f".tmp-{CHECKPOINT_PREFIX}"
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
    # and a checkpoint it cannot read makes it log tracebacks (to the root logger) before the error
    # snuggle names: quiet while DCP runs
    logs = [logging.getLogger(), logging.getLogger("torch.distributed.checkpoint")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


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
    """Write checkpoint `step` of `model` (plain, DDP or FSDP) collectively; every rank must call it.

    Four phases, each ended by an agreement of all ranks (so a rank that fails never leaves the others
    waiting in a collective): rank 0 makes a fresh temp directory; every rank writes its DCP shards;
    rank 0 adds scheduler/RNG state and meta.json and fsyncs the tree; rank 0 renames it into place and
    points `latest` at it. A failed write removes the temp directory before anyone raises.
    """
    ctx = ctx or DistContext()
    final = run_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = run_dir / f"{_TMP_PREFIX}{step:07d}"

    def phase(fn: Callable[[], None], everywhere: bool = False) -> None:
        error = _attempt(fn) if everywhere or ctx.is_main else None
        if not any(ctx.all_gather_object(error is not None)):
            return
        if ctx.is_main:
            _discard(run_dir, tmp, final)
        ctx.barrier()  # every rank then reports the free space after the cleanup: one message
        if isinstance(error, _WriteFailure):
            error = _disk_error(run_dir, step, error.cause)
        ctx.agree(error)

    phase(lambda: _fresh_tmp(run_dir, tmp))
    phase(lambda: _write_shards(tmp, model, optimizer, ctx), everywhere=True)
    rngs = ctx.all_gather_object(_rng_state())
    phase(lambda: _write_state(tmp, step, scheduler, rngs, meta))
    phase(lambda: _publish(run_dir, tmp, final, keep))
    # the checkpoint is complete (and `latest` names it) when any rank returns
    return final


class _WriteFailure(Exception):
    """A write refused by the filesystem (the OSError inside `cause`), as opposed to a bug."""

    def __init__(self, cause: OSError):
        super().__init__(str(cause))
        self.cause = cause


def _zip_write_failed(e: BaseException) -> bool:
    """torch.save's zip writer reports a short write (a full disk) as a RuntimeError, not an OSError."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("inline_container" in text or "PytorchStreamWriter" in text)


def _attempt(fn: Callable[[], None]) -> BaseException | None:
    """Run one phase; return its failure instead of raising it, so that every rank can agree on it.

    DCP reports a failed write as CheckpointException (a BaseException, not an Exception) holding
    each rank's OSError; those and plain OSErrors become _WriteFailure. Anything else is a bug and
    is returned as is (the failing rank re-raises it with its traceback).
    """
    try:
        fn()
    except OSError as e:
        return _WriteFailure(e)
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]
        oserr = next((c for c in causes if isinstance(c, OSError)), None)
        if oserr is None and any(_zip_write_failed(c) for c in causes):
            oserr = OSError(errno.EIO, "torch's file writer could not write (is the disk full?)")
        return _WriteFailure(oserr) if oserr is not None else RuntimeError(f"checkpoint write failed: {e}")
    except Exception as e:
        return e
    return None


def _fresh_tmp(run_dir: Path, tmp: Path) -> None:
    # temp directories of earlier attempts that died mid-write (one run writes one checkpoint at a
    # time, so every one found here is dead) would otherwise hold their disk space forever
    for stale in run_dir.glob(f"{_TMP_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    (run_dir / "latest.tmp").unlink(missing_ok=True)
    tmp.mkdir(parents=True)


def _write_shards(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext) -> None:
    model_sd, optim_sd = _state_dicts(model, optimizer)
    with _dcp_quiet():
        writer = dcp.HuggingFaceStorageWriter(
            str(tmp), save_distributed=ctx.enabled, enable_consolidation=ctx.enabled
        )
        dcp.save(model_sd, storage_writer=writer, no_dist=not ctx.enabled)
        dcp.save(optim_sd, checkpoint_id=str(tmp / _OPTIMIZER_DIR), no_dist=not ctx.enabled)


def _write_state(tmp: Path, step: int, scheduler: Any, rngs: list, meta: dict[str, Any]) -> None:
    # serialised in memory first: torch.save straight into a file on a full disk fails with an opaque
    # RuntimeError ("unexpected pos ..."); a plain write fails with the OSError that names the cause
    buf = io.BytesIO()
    torch.save({"scheduler": scheduler.state_dict(), "rng": rngs}, buf)
    (tmp / "state.pt").write_bytes(buf.getvalue())
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2, sort_keys=True))
    _settle_trainable_file(tmp)
    _fsync_tree(tmp)


def _publish(run_dir: Path, tmp: Path, final: Path, keep: int) -> None:
    if final.exists():
        # a complete checkpoint of this step from an attempt that died before pointing `latest` at it
        # (`latest` never names it: the loop never re-saves the step it resumed from)
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = run_dir / "latest.tmp"
    with open(latest_tmp, "w") as fh:
        fh.write(final.name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(latest_tmp, run_dir / "latest")
    _fsync_dir(run_dir)
    for old in sorted(run_dir.glob(f"{CHECKPOINT_PREFIX}*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def _discard(run_dir: Path, tmp: Path, final: Path) -> None:
    """After a failed phase: remove what this attempt wrote, never what `latest` names."""
    shutil.rmtree(tmp, ignore_errors=True)
    (run_dir / "latest.tmp").unlink(missing_ok=True)
    named = latest_checkpoint(run_dir)
    if final.exists() and (named is None or named.resolve() != final.resolve()):
        # renamed into place, but `latest` could not be pointed at it: nothing reads it, and on a full
        # disk its space is what the user needs back
        shutil.rmtree(final, ignore_errors=True)


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_room(run_dir: Path) -> str:
    """What a run directory's disk space holds, in one line: its checkpoints, split into the trainable
    tensors (what export, eval and a next stage read) and the optimizer state (AdamW keeps two moments a
    trainable value, twice the trainables' room, only for resuming), and how to keep less."""
    ckpts = sorted(p for p in run_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    total = _tree_bytes(run_dir)
    if not ckpts:
        return f"{run_dir}: {_human_bytes(total)}"
    trainable = sum(_tree_bytes(c / TRAINABLE_FILE) for c in ckpts if (c / TRAINABLE_FILE).exists())
    moments = sum(_tree_bytes(c / _OPTIMIZER_DIR) for c in ckpts if (c / _OPTIMIZER_DIR).exists())
    n = len(ckpts)
    return (
        f"{run_dir}: {_human_bytes(total)}, of it {n} checkpoint{'s' if n > 1 else ''} "
        f"(train.keep_checkpoints): trainable tensors {_human_bytes(trainable)}, optimizer state "
        f"{_human_bytes(moments)} (read only to resume); train.keep_checkpoints=1 keeps the newest alone"
    )


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps type checkers calm


def _disk_error(run_dir: Path, step: int, cause: OSError) -> SnuggleError:
    """One line: what failed, where, how much room is left, what survives and how to go on."""
    try:
        free = f"{_human_bytes(shutil.disk_usage(run_dir).free)} free there"
    except OSError:
        free = "free space unknown"
    reason = cause.strerror or str(cause)
    previous = latest_checkpoint(run_dir)
    kept = (
        f"the previous checkpoint {previous.name} is intact: free some space, then continue from it "
        "with train.resume=true"
        if previous is not None
        else "there is no earlier checkpoint to continue from"
    )
    return SnuggleError(
        f"cannot write the checkpoint of step {step} to {run_dir}: {reason} ({free}); the partial "
        f"checkpoint was removed and {kept}"
    )


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


def read_meta(ckpt: Path) -> dict[str, Any]:
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
    except (OSError, ValueError, SafetensorError) as e:
        raise SnuggleError(f"{ckpt}: unreadable checkpoint ({e})") from None
    meta = read_meta(ckpt)
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
                    f"{ckpt}: was trained on a different base model or lora config: {k} has shape "
                    f"{tuple(v.shape)}, this model has {tuple(params[k].shape)}"
                )
            params[k].copy_(v)
    return meta


def _damaged(ckpt: Path, e: BaseException, ctx: DistContext) -> RankError:
    """A checkpoint that cannot be read: its first error line, and the way back to an earlier one."""
    lines = str(e).splitlines() or [type(e).__name__]
    first = next((line.strip() for line in lines if "Error:" in line), lines[0])
    return RankError(
        f"{ckpt}: damaged or incompatible checkpoint ({first[:200]}); to resume from an earlier one, "
        f"write its name (checkpoint-NNNNNNN) into {ckpt.parent / 'latest'}",
        silent=not ctx.is_main,
    )


def load_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ctx: DistContext | None = None,
    *,
    fresh_moments: bool = False,
) -> dict[str, Any]:
    """Restore trainables, optimizer, scheduler and RNG into `model` (plain, DDP or FSDP) collectively.

    The checkpoint may come from any world size: DCP reads each rank's part of every tensor. RNG
    states are restored for the ranks the checkpoint has; they matter only with dropout, whose masks
    depend on the world size anyway. `fresh_moments`: the saved optimizer state is another optimizer's
    (train.optimizer changed, allowed by train.allow_config_change) and is not read; the optimizer
    starts empty, as at step 0, while the schedule continues.
    """
    ctx = ctx or DistContext()
    meta = read_meta(ckpt)
    if not (ckpt / _OPTIMIZER_DIR).is_dir():
        raise SnuggleError(
            f"{ckpt}: written by an older snuggle (no {_OPTIMIZER_DIR}/); it exports, but cannot be resumed"
        )
    model_sd, optim_sd = _state_dicts(model, optimizer)
    try:
        with safe_open(str(ckpt / TRAINABLE_FILE), framework="pt") as f:
            saved = set(f.keys())
    except (OSError, ValueError, SafetensorError) as e:
        raise _damaged(ckpt, e, ctx) from None
    if saved != set(model_sd):
        diff = sorted(saved ^ set(model_sd))
        raise SnuggleError(
            f"{ckpt}: trainable tensors differ from this run's ({diff[:3]}); "
            "was it made with another lora/model config?"
        )
    try:
        with _dcp_quiet():
            dcp.load(
                model_sd, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt)), no_dist=not ctx.enabled
            )
            if not fresh_moments:
                # never DCP's default reader: it unpickles .metadata and the param_groups unrestricted
                reader, planner = SafeReader(str(ckpt / _OPTIMIZER_DIR)), SafeLoadPlanner()
                dcp.load(optim_sd, storage_reader=reader, planner=planner, no_dist=not ctx.enabled)
    except (CheckpointException, RuntimeError, ValueError, OSError) as e:
        # DCP gathers every rank's failure into one CheckpointException raised on all ranks together
        raise _damaged(ckpt, e, ctx) from None
    # strict=False: the frozen base and a tied lm_head's second name are deliberately absent
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if fresh_moments:
        set_model_state_dict(model, model_sd, options=options)
        optimizer.state.clear()  # get_state_dict filled it with a zero-lr step: no step has been taken
    else:
        set_state_dict(
            model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=options
        )
    try:
        # weights_only: a state.pt that asks to run code is refused, not executed
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        scheduler_state, rngs = state["scheduler"], state["rng"]
    except Exception as e:  # any failure (refused pickle opcodes, truncation) is this one file's fault
        # an empty file raises a bare EOFError: its message has no first line to quote
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SnuggleError(f"{ckpt}/state.pt: refused or unreadable ({first})") from None
    scheduler.load_state_dict(scheduler_state)
    if ctx.rank < len(rngs):
        torch.set_rng_state(rngs[ctx.rank]["torch"])
        if "cuda" in rngs[ctx.rank] and torch.cuda.is_available():
            torch.cuda.set_rng_state(rngs[ctx.rank]["cuda"])
    return meta


# --- the settings that shape the loss curve ----------------------------------------------------------


def _abspath(p: str | None) -> str | None:
    # as given, made absolute: a relative path read from another working directory is other data
    return None if p is None else os.path.abspath(os.path.expanduser(p))


def _files(train: str | list[str]) -> list[str | None]:
    return [_abspath(f) for f in ([train] if isinstance(train, str) else train)]


# how a curve field's value is recorded, where not as it is: paths made absolute, numbers as floats, a
# default spelled out, and 0 and null max_grad_norm both as no clipping
_RECORDED: dict[str, Callable[[Any, RunConfig], Any]] = {
    "model.path": lambda v, cfg: _abspath(v),
    "model.adapter": lambda v, cfg: _abspath(v),
    "lora.enabled": lambda v, cfg: cfg.use_lora,
    "lora.alpha": lambda v, cfg: float(v),
    "lora.dropout": lambda v, cfg: float(v),
    "lora.targets": lambda v, cfg: sorted(resolve_targets(v)),
    "data.train": lambda v, cfg: _files(v),
    "train.embedding_lr": lambda v, cfg: v or cfg.train.lr,
    "train.betas": lambda v, cfg: [float(b) for b in v],
    "train.max_grad_norm": lambda v, cfg: v or None,
}


def curve_fingerprint(cfg: RunConfig, dtype: str, global_batch: int) -> dict[str, Any]:
    """The settings whose change would change the loss curve from the checkpoint on, by dotted key: every
    config field marked `curve_field` (see snuggle.config), as `_RECORDED` records it.

    Left out, because the curve does not depend on them: the `run_field`s, such as where things go and
    how they are shown (output_dir, progress, log_every, report_to, ...), when evaluation and checkpoints
    happen, how the work is spread and computed (parallel, kernels, gradient checkpointing, offload,
    device, dist_timeout_s), and batch_size / grad_accum / world size on their own: only their product,
    the global batch, changes the curve. The LoRA settings count only with LoRA on, and `steps` only
    for a decaying schedule (it sets the decay). `dtype` is model.dtype resolved for the device ("auto"
    means bf16 on a GPU, fp32 on a CPU).
    """
    fp: dict[str, Any] = {}
    for section in ("model", "lora", "data", "train"):
        values = getattr(cfg, section)
        if section == "lora" and not cfg.use_lora:
            fp["lora.enabled"] = False
            continue
        if section == "train":
            fp["train.global_batch"] = global_batch
        for name in curve_keys(type(values)):
            key = f"{section}.{name}"
            if key == "train.steps" and cfg.train.schedule == "constant":
                continue
            value = dtype if key == "model.dtype" else getattr(values, name)
            fp[key] = _RECORDED[key](value, cfg) if key in _RECORDED else value
    return fp


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every key both fingerprints hold with different values.

    A key only one side holds is no change of its own: an older checkpoint records fewer keys, and
    `train.steps` exists only for decaying schedules (a switch of schedule is named as such). Values
    are compared after a JSON round trip, which is how the saved side was stored (tuples are lists).
    """
    now = json.loads(json.dumps(now))
    changed = {key: old for key, old in saved.items() if key in now and now[key] != old}
    if "data.seq_len" in changed:  # the row count follows from seq_len: not a second, data change
        changed.pop("data.rows", None)
    return [f"{_LABELS.get(key, key)}: {_show(old)} -> {_show(now[key])}" for key, old in changed.items()]


# keys that are no config key of their own, named by what the user sets
_LABELS = {
    "train.global_batch": "global batch (processes x train.batch_size x train.grad_accum)",
    "data.rows": "packed rows of data.train (the data changed)",
}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return "null" if value is None else str(value)
