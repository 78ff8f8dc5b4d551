"""The training loop: one loop for LoRA, CPT with trainable embeddings and full fine-tuning, 1 or N processes.

Reads top to bottom: setup (process group, model, data; agreed by every rank before anything can
block), data parallelism applied to the model, optimizer, resume; then per step: this rank's
micro-batches of that step, forward/backward with the loss normalised by the valid tokens of the whole
global step, clip, update, log (rank 0), evaluate, checkpoint.

With one process (`train.parallel` none) nothing is wrapped and no collective runs.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from snuggle.config import RunConfig, to_dict
from snuggle.data import BatchPlan, collate, iterate_eval
from snuggle.load import resolve_dtype
from snuggle.lora import trainable_state
from snuggle.model.checkpointing import configure_checkpointing
from snuggle.model.loss import IGNORE_INDEX
from snuggle.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from snuggle.train.evaluate import evaluate, to_device
from snuggle.train.metrics import MetricsLog, ProgressBar, peak_memory_gib, plot_losses
from snuggle.train.optim import build_optimizer, build_scheduler
from snuggle.train.parallel import (
    DistContext,
    apply_parallel,
    grad_sync,
    init_distributed,
    rank_device,
    resolve_strategy,
    unwrap,
)
from snuggle.train.reporters import Reporter, check_reporters, open_reporters
from snuggle.train.setup import build_data, build_model, check_output_dir

__all__ = ["train"]


def train(cfg: RunConfig) -> dict:
    """Train as `cfg` says; in a torchrun job every process calls this and rank 0 reports."""
    device = rank_device(cfg.model.device)
    ctx = init_distributed(cfg.train.dist_timeout_s, device)
    summary = _train(cfg, ctx, device)
    # only after success: a failed collective can leave the group unable to shut down cleanly, and
    # the process is about to exit anyway
    ctx.close()
    return summary


def _rank_config(cfg: RunConfig, ctx: DistContext, device: torch.device, strategy: str) -> RunConfig:
    """The config this rank builds its model from: its own GPU, or the CPU for FSDP to shard from."""
    if not ctx.enabled:
        return cfg
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    # FSDP moves each unit to the GPU as it shards it: building on the CPU means no card ever holds
    # the whole model (the price is host memory for one copy per process)
    build = "cpu" if strategy == "fsdp" and device.type == "cuda" else str(device)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=build, dtype=dtype))


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _train(cfg: RunConfig, ctx: DistContext, device: torch.device) -> dict:
    t = cfg.train
    out = Path(t.output_dir)
    say = print_on_main(ctx)

    # Setup, validated on every rank before any collective can block: a rank failing alone (bad
    # path, unreadable data) makes every rank stop with its message instead of waiting for it.
    # Rank 0 alone judges the shared output directory and tokenizes first; the others then find the
    # token cache complete instead of all building it at once.
    error: BaseException | None = None
    model = tokenizer = data = None
    strategy = "none"
    try:
        strategy = resolve_strategy(t.parallel, ctx.world_size, cfg.use_lora)
        if ctx.is_main:
            check_output_dir(out, t.resume)
            check_reporters(t.report_to)
        torch.manual_seed(t.seed)  # the same LoRA initialisation on every rank
        model, tokenizer = build_model(_rank_config(cfg, ctx, device, strategy))
        if ctx.is_main:
            data = build_data(cfg.data, tokenizer, t.seed, model.args.max_position_embeddings)
    except Exception as e:
        error = e
    ctx.agree(error)
    if not ctx.is_main:
        try:
            data = build_data(cfg.data, tokenizer, t.seed, model.args.max_position_embeddings)
        except Exception as e:
            error = e
    ctx.agree(error)
    plan = BatchPlan(
        data.train_idx,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        world_size=ctx.world_size,
        rank=ctx.rank,
        seed=t.seed,
    )
    if ctx.enabled:
        say(
            f"snuggle: {ctx.world_size} processes, train.parallel={strategy}"
            + (" (auto)" if t.parallel == "auto" else "")
        )
        # dropout draws its own masks on each rank (the same masks on different rows would be a
        # correlation no single-process run has)
        torch.manual_seed(_rank_seed(t.seed, ctx.rank))

    reporters: list[Reporter] = []
    try:
        return _run(cfg, ctx, device, strategy, model, data, plan, say, reporters)
    except Exception as e:
        # a collective that failed or timed out: name the rank that died or hangs, in one line
        explained = ctx.explain(e)
        if explained is None:
            raise
        raise explained from None
    finally:
        for r in reporters:
            r.close()


def print_on_main(ctx: DistContext) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if ctx.is_main:
            print(msg, file=sys.stderr, flush=True)

    return say


def _eval_batches(data, t, ctx: DistContext) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's share of the held-out rows; with FSDP every rank must run as many forwards.

    Shares differ by at most one row, so a rank may have one batch fewer than another: it runs a
    batch without targets instead (loss 0 over 0 tokens), because under FSDP every forward is a
    collective (parameter all-gathers) that all ranks must join.
    """
    yield from iterate_eval(
        data.rows, data.val_idx, t.batch_size, t.eval_rows, world_size=ctx.world_size, rank=ctx.rank
    )
    if not ctx.enabled:
        return
    n = len(data.val_idx) if t.eval_rows is None else min(len(data.val_idx), t.eval_rows)
    mine = len(np.array_split(np.arange(n), ctx.world_size)[ctx.rank])
    most = math.ceil(n / ctx.world_size)
    for _ in range(math.ceil(most / t.batch_size) - math.ceil(mine / t.batch_size)):
        pad = data.rows.batch(data.val_idx[:1])
        pad["labels"] = torch.full_like(pad["labels"], IGNORE_INDEX)
        yield pad


def _run(cfg, ctx: DistContext, device, strategy, model, data, plan, say, reporters: list[Reporter]) -> dict:
    """The run proper; `reporters` is filled here (rank 0) and closed by the caller, also on failure."""
    t = cfg.train
    out = Path(t.output_dir)
    ctx.heartbeat("wrapping the model")
    engine = apply_parallel(model, strategy, ctx, device)  # what forward is called on
    if t.gradient_checkpointing:
        # after wrapping: the settings are attributes read at forward time, and under FSDP the
        # offload buffers must be made for the GPU the shards now live on, not the CPU they were built on
        configure_checkpointing(model, t.checkpoint_layers, t.offload_activations)
    trainables = trainable_state(unwrap(engine))
    opt = build_optimizer(unwrap(engine), t)
    sched = build_scheduler(opt, t)

    start = 0
    ckpt = ctx.broadcast_object(latest_checkpoint(out) if t.resume and ctx.is_main else None)
    if ckpt is not None:
        ctx.heartbeat("resume")
        meta = load_checkpoint(ckpt, engine, opt, sched, ctx)
        start = meta["step"]
        if meta.get("global_batch", plan.global_batch) != plan.global_batch:
            say(
                f"snuggle: note: the global batch is {plan.global_batch} rows, the checkpoint's was "
                f"{meta['global_batch']}: the data order from step {start} on differs from that run's"
            )
    log = None
    error: BaseException | None = None
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        try:
            # before config.yaml: a tracker that cannot start leaves no run behind
            reporters.extend(
                open_reporters(t.report_to, out, t.wandb_project, to_dict(cfg), ckpt is not None)
            )
        except Exception as e:
            error = e
    ctx.agree(error)
    if ctx.is_main:
        if ckpt is None:
            # a fresh start (also resume=true on a run that died before its first checkpoint) must not
            # append its curve to the rows of the earlier attempt, which would give every step twice
            (out / "metrics.jsonl").unlink(missing_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log = MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None)

    def record(row: dict) -> None:
        # rank 0: metrics.jsonl, then every reporter, the same row
        if log is None:
            return
        log.write(row)
        for r in reporters:
            r.log(row)

    bar = ProgressBar(t.steps, start, t.progress and ctx.is_main)
    n_train = sum(p.numel() for p in trainables.values())
    n_total = sum(p.numel() for p in unwrap(engine).parameters())  # FSDP: DTensor numel is global
    if ctx.is_main:
        bar.write(
            f"snuggle: {n_train:,} trainable of {n_total:,} parameters; {len(data.train_idx)} train rows, "
            f"{len(data.val_idx)} held-out rows of {cfg.data.seq_len} tokens"
            + (f"; LoRA from {cfg.model.adapter}" if cfg.model.adapter and ckpt is None else "")
            + (f"; resumed from {ckpt.name}" if ckpt is not None else "")
        )

    def run_eval(step: int) -> dict | None:
        if len(data.val_idx) == 0:
            return None
        ctx.heartbeat(f"evaluation at step {step}")
        res = evaluate(engine, _eval_batches(data, t, ctx), device)
        if ctx.enabled:
            # each rank's mean back to its sum, then the mean over every rank's tokens
            part = torch.tensor([res["loss"] * res["tokens"], res["tokens"]], dtype=torch.float64)
            total, tokens = ctx.all_reduce_sum(part).tolist()
            loss = total / max(tokens, 1.0)
            res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
        record(
            {
                "step": step,
                "eval_loss": res["loss"],
                "eval_ppl": res["perplexity"],
                "eval_tokens": res["tokens"],
            }
        )
        if ctx.is_main:
            bar.write(f"step {step}: eval loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}")
        return res

    def checkpoint(step: int) -> None:
        ctx.heartbeat(f"checkpoint at step {step}")
        meta = {
            "tokens_seen": step * tokens_per_step,
            "world_size": ctx.world_size,
            "parallel": strategy,
            "global_batch": plan.global_batch,
        }
        save_checkpoint(out, step, engine, opt, sched, meta, keep=t.keep_checkpoints, ctx=ctx)
        if ctx.is_main:
            plot_losses(out / "metrics.jsonl", out / "loss.png")

    tokens_per_step = plan.global_batch * cfg.data.seq_len
    first_eval = run_eval(0) if start == 0 else None
    last_eval = None
    engine.train()
    loss_val = float("nan")
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        done = step + 1
        batches = [collate([data.rows[int(i)] for i in idx]) for idx in plan.micro_batches(step)]
        # the mean is over every valid token of the global step (all micro-batches, all ranks), not
        # a mean of micro-batch or per-rank means
        ctx.heartbeat(f"step {done}: token count")
        n_local = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        n_valid = int(ctx.all_reduce_sum(torch.tensor([n_local], dtype=torch.int64)).item())
        ctx.heartbeat(f"step {done}: forward/backward")
        loss_sum = torch.zeros((), device=device)
        for i, b in enumerate(batches):
            b = to_device(b, device)
            # DDP all-reduces gradients after the last micro-batch only; see grad_sync
            with grad_sync(engine, sync=i == len(batches) - 1):
                loss = engine(
                    b["input_ids"], position_ids=b["position_ids"], doc_ids=b["doc_ids"], labels=b["labels"]
                ) / max(n_valid, 1)
                loss.backward()
            loss_sum += loss.detach()
        ctx.heartbeat(f"step {done}: update")
        grad_norm = None
        if t.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(list(trainables.values()), t.max_grad_norm)
            # FSDP: a DTensor over the shards (its all-reduce already happened inside clip)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(loss_sum)
        if ctx.enabled:
            loss_val = float(ctx.all_reduce_sum(torch.tensor([loss_val], dtype=torch.float64)).item())
        dt = time.perf_counter() - t0
        mem = peak_memory_gib(device)
        if log is not None and (done % t.log_every == 0 or done == t.steps):
            row = {
                "step": done,
                "loss": loss_val,
                "lr": lr,
                "tokens_per_s": tokens_per_step / dt,
                "step_time_s": dt,
                "tokens": n_valid,
                "mem_gib": round(mem, 3),
            }
            if grad_norm is not None:
                row["grad_norm"] = grad_norm
            record(row)
        bar.update(loss_val, lr, tokens_per_step / dt, mem)
        if t.eval_every and done % t.eval_every == 0 and done != t.steps:
            run_eval(done)
        if t.save_every and done % t.save_every == 0 and done != t.steps:
            checkpoint(done)
    bar.close()
    if start < t.steps or ckpt is None:
        last_eval = run_eval(t.steps)
        checkpoint(t.steps)
    if log is not None:
        log.close()
    summary = {"output_dir": str(out), "steps": t.steps, "final_loss": loss_val}
    if ctx.enabled:
        summary["world_size"], summary["parallel"] = ctx.world_size, strategy
    if first_eval is not None:
        summary["eval_loss_before"], summary["eval_ppl_before"] = first_eval["loss"], first_eval["perplexity"]
    if last_eval is not None:
        summary["eval_loss"], summary["eval_ppl"] = last_eval["loss"], last_eval["perplexity"]
    if not math.isfinite(loss_val) and start < t.steps:
        summary["warning"] = "final training loss is not finite"
    return summary
