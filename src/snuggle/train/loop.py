"""The training loop: one loop for LoRA, CPT with trainable embeddings and full fine-tuning, 1 or N processes.

Reads top to bottom: setup (process group, model, data; agreed by every rank before anything can
block), data parallelism applied to the model, optimizer, resume; then per step: this rank's
micro-batches of that step, forward/backward with the loss normalised by the valid tokens of the whole
global step, clip, update, log (rank 0), evaluate, checkpoint.

With one process nothing is wrapped and no collective runs, whatever `train.parallel` asks (a forced
ddp/fsdp is noted in one line): the plain trainer, under torchrun too.

Faults (docs/reliability.md): a step whose loss or gradient norm is not finite is skipped (no update,
the lr schedule does not advance, the data moves on) with a warning naming it, and
`train.max_bad_steps` of them in a row stop the run with a checkpoint; SIGTERM / SIGINT finish the
step, checkpoint it and return (exit status 128 + signal); running out of GPU memory is one line with
the figures and the settings that lower the need; resuming with settings that change the curve is
refused with each one named (`train.allow_config_change` overrides). Workers that torchrun starts
again after a failure (`train.max_restarts`, `--max-restarts`) continue from `latest` with
`train.resume: auto`; their rows in metrics.jsonl carry the restart number, and `train.global_batch`
keeps the curve when they come back on another number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml

from snuggle.config import RunConfig, TrainConfig, to_dict, with_absolute_paths
from snuggle.data import BatchPlan, collate, grad_accum_for, iterate_eval
from snuggle.errors import SnuggleError
from snuggle.load import resolve_dtype
from snuggle.lora import count_parameters, trainable_state
from snuggle.model.checkpointing import configure_checkpointing
from snuggle.model.decoder import Decoder
from snuggle.model.loss import IGNORE_INDEX
from snuggle.train.checkpoint import (
    curve_fingerprint,
    fingerprint_changes,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    run_room,
    save_checkpoint,
)
from snuggle.train.data_parallel import apply_parallel, resolve_strategy, unwrap
from snuggle.train.evaluate import evaluate
from snuggle.train.memory import (
    apply_memory_plan,
    auto_strategy_fits,
    check_host_memory,
    enforce_budget,
    memory_plan_for,
    prefer_expandable_segments,
)
from snuggle.train.metrics import (
    MetricsLog,
    ProgressBar,
    peak_memory_gib,
    phase_notes,
    plot_losses,
    plot_title,
)
from snuggle.train.optim import build_optimizer, build_scheduler
from snuggle.train.parallel import DistContext, RankError, init_distributed, rank_device
from snuggle.train.reporters import Reporter, check_reporters, open_reporters
from snuggle.train.setup import Data, build_data, build_model, check_before_model, check_output_dir
from snuggle.train.step import StepResult, train_step

__all__ = ["grad_accum_for_config", "oom_message", "restart_count", "train"]


def train(cfg: RunConfig) -> dict:
    """Train as `cfg` says; in a torchrun job every process calls this and rank 0 reports.

    A run stopped by SIGTERM/SIGINT returns normally, after checkpointing; its summary then holds
    `stopped_by`, `stopped_at_step` and `exit_status` (128 + the signal number, for the CLI).
    """
    if cfg.train.max_bad_steps < 0:
        raise SnuggleError(f"train.max_bad_steps must be >= 0 (0: never stop), got {cfg.train.max_bad_steps}")
    prefer_expandable_segments()  # before anything starts CUDA
    device = rank_device(cfg.model.device)
    ctx = init_distributed(cfg.train.dist_timeout_s, device)
    try:
        summary = _train(cfg, ctx, device)
    except RankError as e:
        # every rank raised it at the same point, outside any collective: they leave the group in step.
        # The frames of the run (the wrapped model) go first, so that nothing holds the group after.
        _drop_tracebacks(e)
        with contextlib.suppress(Exception):  # a peer killed meanwhile: the group stays open (see below)
            ctx.close()
        raise
    # any other failure may have left a peer dead or inside a collective, so no rank tears down with
    # the others: the CLI ends such a process without interpreter shutdown (parallel.leave_now)
    ctx.close()
    return summary


def _drop_tracebacks(e: BaseException | None) -> None:
    """Free the frames an exception chain holds (rank 0 prints only the message of a RankError)."""
    while e is not None:
        e.__traceback__ = None
        e = e.__cause__ or e.__context__


def _rank_config(cfg: RunConfig, ctx: DistContext, device: torch.device, strategy: str) -> RunConfig:
    """The config this rank builds its model from: its own GPU, or the CPU for FSDP to shard from."""
    if not ctx.enabled:
        return cfg
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    # FSDP moves each unit to the GPU as it shards it: building on the CPU means no card ever holds
    # the whole model, and the sharded load (build_model's defer_blocks) means no host holds it either
    build = "cpu" if strategy == "fsdp" and device.type == "cuda" else str(device)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=build, dtype=dtype))


def _rank_seed(seed: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _train(cfg: RunConfig, ctx: DistContext, device: torch.device) -> dict:
    t = cfg.train
    say = print_on_main(ctx)
    strategy, sizes, grad_accum, model, data = _setup(cfg, ctx, device)
    plan = BatchPlan(
        data.train_idx,
        batch_size=t.batch_size,
        grad_accum=grad_accum,
        world_size=ctx.world_size,
        rank=ctx.rank,
        seed=t.seed,
    )
    _say_processes(cfg, ctx, strategy, sizes, grad_accum, plan, say)
    if ctx.enabled:
        # dropout draws its own masks on each rank (the same masks on different rows would be a
        # correlation no single-process run has)
        torch.manual_seed(_rank_seed(t.seed, ctx.rank))

    reporters: list[Reporter] = []
    try:
        return _run(cfg, ctx, device, strategy, model, data, plan, say, reporters)
    except Exception as e:
        if _is_oom(e):
            # this rank alone raises; the others stop when torchrun ends the job or a collective times out
            raise _oom_to_user_error(e, cfg, device, ctx._phase) from None
        if isinstance(e, SnuggleError):
            # a deliberate refusal (a changed resume, bad data) that every rank raised together: a peer
            # whose heartbeat is a phase behind at that instant has not hung, so no rank is blamed
            raise
        # a collective that failed or timed out: name the rank that died or hangs, in one line
        explained = ctx.explain(e)
        if explained is None:
            raise
        raise explained from None
    finally:
        for r in reporters:
            r.close()


def _setup(cfg: RunConfig, ctx: DistContext, device: torch.device) -> tuple[str, str, int, Decoder, Data]:
    """(strategy, the auto strategy's sizes line, grad_accum, model, data), agreed by every rank.

    Validated on every rank before any collective can block: a rank failing alone (bad path, unreadable
    data) makes every rank stop with its message instead of waiting for it. Rank 0 alone judges the
    shared output directory and tokenizes first; the others then find the token cache complete instead
    of all building it at once.
    """
    t = cfg.train
    note = phase_notes(t.progress and ctx.is_main)
    model = tokenizer = data = None
    strategy, sizes, grad_accum = "none", "", t.grad_accum
    with ctx.agreed(lambda e: _oom_to_user_error(e, cfg, device, "building the model")):
        fits = True
        if ctx.enabled and t.parallel == "auto":
            m = cfg.model
            fits, sizes = auto_strategy_fits(m.path, m.dtype, m.quantize, t.memory_budget_gib, device)
        strategy = resolve_strategy(t.parallel, ctx.world_size, cfg.use_lora, fits)
        _check_restartable(t)
        grad_accum = grad_accum_for_config(cfg, ctx.world_size)
        if ctx.is_main:
            check_output_dir(Path(t.output_dir), t.resume)
            check_reporters(t.report_to)
            check_before_model(cfg, device)  # data paths and formats: said before the model loads
        torch.manual_seed(t.seed)  # the same LoRA initialisation on every rank
        rank_cfg = _rank_config(cfg, ctx, device, strategy)
        note(f"loading the model {cfg.model.path}")
        if strategy == "fsdp":
            # sharded load: only the root is read now; apply_parallel reads each block and shards it
            model, tokenizer = build_model(rank_cfg, defer_blocks=True)
        else:
            model, tokenizer = build_model(rank_cfg)
        if ctx.is_main:
            note("reading and tokenizing the corpus (the tokens are cached for later runs)")
            data = _rank_data(cfg, model, tokenizer)
    with ctx.agreed():
        if not ctx.is_main:
            data = _rank_data(cfg, model, tokenizer)
    return strategy, sizes, grad_accum, model, data


def _rank_data(cfg: RunConfig, model: Decoder, tokenizer: object) -> Data:
    args = model.args
    return build_data(
        cfg.data, tokenizer, cfg.train.seed, args.max_position_embeddings, vocab_size=args.vocab_size
    )


def _say_processes(
    cfg: RunConfig, ctx: DistContext, strategy: str, sizes: str, grad_accum: int, plan: BatchPlan, say
) -> None:
    """The line on how many processes train and how (rank 0), when there is anything to say."""
    t = cfg.train
    if not ctx.enabled and t.parallel in ("ddp", "fsdp"):
        say(_one_process_note(t.parallel))
    derived = ""
    if t.global_batch is not None or t.global_batch_tokens is not None:
        derived = f"; grad_accum {grad_accum} for a global batch of {plan.global_batch} rows"
        if not ctx.enabled:
            say(f"snuggle: 1 process{derived}")
    if ctx.enabled:
        say(
            f"snuggle: {ctx.world_size} processes, train.parallel={strategy}"
            + (f" (auto{': ' + sizes if sizes else ''})" if t.parallel == "auto" else "")
            + (f"; {ctx.link}" if ctx.link else "")
            + derived
        )


def _check_restartable(t: TrainConfig) -> None:
    """A job that torchrun restarts (`--max-restarts`) must continue its run, not refuse its own directory."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if restarts and t.resume is False:
        raise SnuggleError(
            f"torchrun restarts failed workers (--max-restarts {restarts}), but train.resume=false would "
            "refuse the run they continue: set train.resume=auto"
        )


def grad_accum_for_config(cfg: RunConfig, world_size: int) -> int:
    """train.grad_accum, or the count that makes train.global_batch (_tokens) on this many processes."""
    t = cfg.train
    if t.global_batch is not None:
        named = f"train.global_batch={t.global_batch}"
        return grad_accum_for(t.global_batch, t.batch_size, world_size, named)
    if t.global_batch_tokens is not None:
        rows = t.global_batch_tokens // cfg.data.seq_len  # a whole number: config.validate checked it
        named = f"train.global_batch_tokens={t.global_batch_tokens}"
        return grad_accum_for(rows, t.batch_size, world_size, named)
    return t.grad_accum


def restart_count() -> int:
    """How many times torchrun has restarted this job's workers (0 for a first start or no torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _one_process_note(requested: str) -> str:
    # one process has no peer to all-reduce with and nothing to shard across: a wrapper would only add
    # its hooks and copies to every step, so the run is the plain one (same curve, same checkpoints,
    # which DCP reshards for any later world size)
    return (
        f"snuggle: one process: train.parallel={requested} applies no wrapper (nothing to communicate or "
        "shard); training as the plain run does"
    )


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


@dataclasses.dataclass
class _Run:
    """What the step loop, its evaluations and its checkpoints share; the methods run on every rank."""

    cfg: RunConfig
    ctx: DistContext
    device: torch.device
    strategy: str
    engine: torch.nn.Module  # what forward is called on: the model, or its DDP / FSDP wrapping
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    plan: BatchPlan
    data: Data
    fingerprint: dict  # the settings that change the curve, saved with each checkpoint
    log: MetricsLog | None  # rank 0's metrics.jsonl
    reporters: list[Reporter]
    bar: ProgressBar
    restart: int  # torchrun's restart number, written in every row of a restarted job
    saved_at: int | None  # the step of the newest checkpoint on disk

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def tokens_per_step(self) -> int:
        return self.plan.global_batch * self.cfg.data.seq_len

    def record(self, row: dict) -> None:
        # rank 0: metrics.jsonl, then every reporter, the same row; rows of a restarted job say which
        if self.log is None:
            return
        if self.restart:
            row = {**row, "restart": self.restart}
        self.log.write(row)
        for r in self.reporters:
            r.log(row)

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()

    def evaluate(self, step: int) -> dict | None:
        """The held-out loss at `step`, over every rank's share; logged and returned (None: no rows)."""
        ctx, data = self.ctx, self.data
        if len(data.val_idx) == 0:
            return None
        ctx.heartbeat(f"evaluation at step {step}")
        self.bar.phase(f"eval at step {step}")
        res = evaluate(self.engine, _eval_batches(data, self.cfg.train, ctx), self.device)
        self.bar.phase("train")
        if ctx.enabled:
            # each rank's mean back to its sum, then the mean over every rank's tokens
            part = torch.tensor([res["loss"] * res["tokens"], res["tokens"]], dtype=torch.float64)
            total, tokens = ctx.all_reduce_sum(part).tolist()
            loss = total / max(tokens, 1.0)
            res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
        self.record(
            {
                "step": step,
                "eval_loss": res["loss"],
                "eval_ppl": res["perplexity"],
                "eval_tokens": res["tokens"],
            }
        )
        if ctx.is_main:
            self.bar.write(f"step {step}: eval loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}")
        return res

    def checkpoint(self, step: int) -> None:
        if self.saved_at == step:
            return  # a stop right after a scheduled save: that checkpoint is this state
        self.ctx.heartbeat(f"checkpoint at step {step}")
        meta = {
            "tokens_seen": step * self.tokens_per_step,
            "world_size": self.ctx.world_size,
            "parallel": self.strategy,
            "global_batch": self.plan.global_batch,
            "curve_config": self.fingerprint,
        }
        self.bar.phase(f"saving step {step}")
        t = self.cfg.train
        save_checkpoint(
            self.out, step, self.engine, self.opt, self.sched, meta, keep=t.keep_checkpoints, ctx=self.ctx
        )
        self.bar.phase("train")
        self.saved_at = step
        if self.ctx.is_main:
            plot_losses(
                self.out / "metrics.jsonl",
                self.out / "loss.png",
                plot_title(self.cfg, self.plan.global_batch),
            )

    def report_step(self, step: int, res: StepResult, dt: float, bad_steps: list[int]) -> None:
        """Log the step (every log_every, and each skipped one), warn of a skip, move the bar."""
        t = self.cfg.train
        done = step + 1
        mem = peak_memory_gib(self.device)
        if self.log is not None and (not res.finite or done % t.log_every == 0 or done == t.steps):
            row = {
                "step": done,
                "loss": res.loss,
                "lr": res.lr,
                "tokens_per_s": self.tokens_per_step / dt,
                "step_time_s": dt,
                "tokens": res.tokens,
                "mem_gib": round(mem, 3),
                "grad_norm": res.grad_norm,
            }
            if not res.finite:
                row["skipped"] = True
            self.record(row)
        if not res.finite and self.ctx.is_main:
            rows = self.plan.global_rows(step * self.plan.global_batch, done * self.plan.global_batch)
            warnings.warn(
                _skipped_step_message(done, res.loss, res.grad_norm, rows, len(bad_steps), t.max_bad_steps),
                stacklevel=1,
            )
        self.bar.update(res.loss, res.lr, self.tokens_per_step / dt, mem, step_time_s=dt)


def _run(
    cfg: RunConfig,
    ctx: DistContext,
    device: torch.device,
    strategy: str,
    model: Decoder,
    data: Data,
    plan: BatchPlan,
    say: Callable[[str], None],
    reporters: list[Reporter],
) -> dict:
    """The run proper; `reporters` is filled here (rank 0) and closed by the caller, also on failure."""
    t = cfg.train
    engine, mem_plan = _wrap(cfg, ctx, device, strategy, model, say)
    trainables = trainable_state(unwrap(engine))
    host_embeddings = _host_embeddings(t.embedding_offload, mem_plan, strategy)
    if host_embeddings and mem_plan is None:
        say("snuggle: embed_tokens/lm_head optimizer state and fp32 master in CPU memory (updated there)")
    opt = build_optimizer(unwrap(engine), t, host_embeddings=host_embeddings)
    sched = build_scheduler(opt, t)
    dtype = str(resolve_dtype(cfg.model.dtype, device)).removeprefix("torch.")
    fingerprint = curve_fingerprint(cfg, dtype, plan.global_batch)
    # the corpus behind an unchanged data.train may have changed: other rows re-draw the held-out split
    # (rows evaluated before would be trained on) and every batch from the checkpoint on
    fingerprint["data.rows"] = len(data.rows)
    start, ckpt = _resume(cfg, ctx, engine, opt, sched, fingerprint, say)
    log = _open_log(cfg, ctx, reporters, ckpt, start)
    restart = restart_count()
    bar = ProgressBar(t.steps, start, t.progress and ctx.is_main)
    n_train = sum(p.numel() for p in trainables.values())
    n_total = count_parameters(unwrap(engine))
    if ctx.is_main:
        bar.write(
            f"snuggle: {n_train:,} trainable of {n_total:,} parameters; {len(data.train_idx)} train rows, "
            f"{len(data.val_idx)} held-out rows of {cfg.data.seq_len} tokens"
            + (f"; LoRA from {cfg.model.adapter}" if cfg.model.adapter and ckpt is None else "")
            + (f"; resumed from {ckpt.name}" if ckpt is not None else "")
            + (f"; restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS')}" if restart else "")
        )
    run = _Run(
        cfg=cfg,
        ctx=ctx,
        device=device,
        strategy=strategy,
        engine=engine,
        opt=opt,
        sched=sched,
        plan=plan,
        data=data,
        fingerprint=fingerprint,
        log=log,
        reporters=reporters,
        bar=bar,
        restart=restart,
        saved_at=start if ckpt is not None else None,
    )
    return _steps(run, list(trainables.values()), start, ckpt, say)


def _steps(
    run: _Run, params: list[torch.Tensor], start: int, ckpt: Path | None, say: Callable[[str], None]
) -> dict:
    """The step loop from `start`: train, log, evaluate and checkpoint; stop on a signal or bad steps."""
    t, ctx, out = run.cfg.train, run.ctx, run.out
    stop = _StopRequest(watchdog=ctx.enabled)
    bad_steps: list[int] = []  # the current streak of skipped steps (1-based numbers)
    loss_val = float("nan")
    with stop:
        first_eval = run.evaluate(0) if start == 0 else None
        last_eval = None
        run.engine.train()
        for step in range(start, t.steps):
            t0 = time.perf_counter()
            done = step + 1
            batches = [collate([run.data.rows[int(i)] for i in idx]) for idx in run.plan.micro_batches(step)]
            res = train_step(
                run.engine,
                batches,
                params,
                run.opt,
                run.sched,
                ctx=ctx,
                device=run.device,
                max_grad_norm=t.max_grad_norm,
                stop=stop,
                done=done,
            )
            loss_val = res.loss
            if res.finite:
                bad_steps.clear()
            else:
                bad_steps.append(done)
            run.report_step(step, res, time.perf_counter() - t0, bad_steps)
            if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                run.evaluate(done)
            if t.save_every and done % t.save_every == 0 and done != t.steps:
                run.checkpoint(done)
            if t.max_bad_steps and len(bad_steps) >= t.max_bad_steps:
                # the parameters are those of the last good update: skipped steps never touched them
                run.checkpoint(done)
                run.close_log()
                raise RankError(
                    _too_many_bad_steps_message(bad_steps, t.max_bad_steps, out, done),
                    silent=not ctx.is_main,
                )
            if res.stop_asked and done != t.steps:
                run.checkpoint(done)
                run.close_log()
                return _stopped(stop.signum, done, t.steps, out, loss_val, ctx, run.strategy, say, run.bar)
        run.bar.close()
        if start < t.steps or ckpt is None:
            last_eval = run.evaluate(t.steps)
            run.checkpoint(t.steps)
            if t.progress:
                say(f"snuggle: {run_room(out)}")  # what the run keeps on disk, and how to keep less
        elif ctx.is_main:
            # resumed at (or past) the last step: nothing trains; report the loss the run ended with
            say(f"snuggle: {out} is complete at step {start} of {t.steps}; nothing to train")
            logged = [r["loss"] for r in MetricsLog.read(out / "metrics.jsonl") if "loss" in r]
            loss_val = logged[-1] if logged else loss_val
            loss_val = math.nan if loss_val is None else loss_val  # a non-finite loss is logged as null
    run.close_log()
    return _summary(run, loss_val, start, first_eval, last_eval)


def _summary(run: _Run, loss_val: float, start: int, first_eval: dict | None, last_eval: dict | None) -> dict:
    """What train() returns for a run that ran to its last step (or was complete already)."""
    t, ctx, out = run.cfg.train, run.ctx, run.out
    summary = {"output_dir": str(out), "steps": t.steps, "final_loss": loss_val}
    if run.restart:
        summary["restarts"] = run.restart
    if ctx.enabled:
        summary["world_size"], summary["parallel"] = ctx.world_size, run.strategy
    if first_eval is not None:
        summary["eval_loss_before"], summary["eval_ppl_before"] = first_eval["loss"], first_eval["perplexity"]
    if last_eval is not None:
        summary["eval_loss"], summary["eval_ppl"] = last_eval["loss"], last_eval["perplexity"]
    if not math.isfinite(loss_val) and start < t.steps:
        summary["warning"] = "final training loss is not finite"
    return summary


def _wrap(cfg: RunConfig, ctx: DistContext, device: torch.device, strategy: str, model: Decoder, say):
    """(the engine forward is called on, the memory plan or None), with the plan applied to the model."""
    t = cfg.train
    ctx.heartbeat("wrapping the model")
    engine = None
    with ctx.agreed(lambda e: _oom_to_user_error(e, cfg, device, "building the model")):
        # what forward is called on; under FSDP this also reads the base, block by block, and a
        # checkpoint that fails to read on one rank must stop every rank, not leave them waiting
        engine = apply_parallel(model, strategy, ctx, device, getattr(torch, t.reduce_dtype))
    # after wrapping: the settings are attributes read at forward time, and under FSDP the offload
    # buffers must be made for the GPU the shards now live on, and the plan must count shards
    mem_plan = None
    with ctx.agreed():  # a run that cannot fit stops on every rank, before any step
        enforce_budget(t.memory_budget_gib, device)
        mem_plan = memory_plan_for(
            model,
            device,
            batch_size=t.batch_size,
            seq_len=cfg.data.seq_len,
            optimizer=t.optimizer,
            budget_gib=t.memory_budget_gib,
            gradient_checkpointing=t.gradient_checkpointing,
            embedding_offload=t.embedding_offload,
        )
    # one plan for every rank: its offload depends on each rank's own measurement of its host link
    mem_plan = ctx.broadcast_object(mem_plan)
    if mem_plan is not None:
        say(f"snuggle: {mem_plan.describe()}")
        apply_memory_plan(model, mem_plan)
    elif t.gradient_checkpointing:
        configure_checkpointing(model, t.checkpoint_layers, t.offload_activations)
    with ctx.agreed():
        check_host_memory(cfg, model, device)  # on the CPU: refused now, not killed (exit 137) mid-step
    return engine, mem_plan


def _resume(
    cfg: RunConfig, ctx: DistContext, engine, opt, sched, fingerprint: dict, say
) -> tuple[int, Path | None]:
    """(the step to start from, its checkpoint or None) under train.resume; loaded when there is one."""
    t = cfg.train
    ckpt = ctx.broadcast_object(latest_checkpoint(Path(t.output_dir)) if t.resume and ctx.is_main else None)
    if ckpt is None:
        return 0, None
    ctx.heartbeat("resume")
    # before loading: a changed setting is named as such, not as the tensor mismatch it may cause
    saved = read_meta(ckpt)
    _check_resume_config(saved, fingerprint, ckpt, t.allow_config_change, ctx, say)
    # another optimizer's state (adamw <-> adamw8bit) does not load into this one: its moments restart
    saved_opt = (saved.get("curve_config") or {}).get("train.optimizer", t.optimizer)
    meta = load_checkpoint(ckpt, engine, opt, sched, ctx, fresh_moments=saved_opt != t.optimizer)
    if saved_opt != t.optimizer:
        say(f"snuggle: note: {t.optimizer}'s moments start fresh: {ckpt.name} holds {saved_opt}'s")
    return meta["step"], ckpt


def _open_log(
    cfg: RunConfig, ctx: DistContext, reporters: list[Reporter], ckpt: Path | None, start: int
) -> MetricsLog | None:
    """Rank 0: the output directory, the reporters (into `reporters`), config.yaml and metrics.jsonl."""
    t = cfg.train
    out = Path(t.output_dir)
    with ctx.agreed():
        if ctx.is_main:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SnuggleError(f"train.output_dir {out}: cannot create it ({e.strerror or e})") from None
            # before config.yaml: a tracker that cannot start leaves no run behind
            reporters.extend(
                open_reporters(t.report_to, out, t.wandb_project, to_dict(cfg), ckpt is not None)
            )
    if not ctx.is_main:
        return None
    if ckpt is None:
        # a fresh start (also resume=true on a run that died before its first checkpoint) must not
        # append its curve to the rows of the earlier attempt, which would give every step twice
        (out / "metrics.jsonl").unlink(missing_ok=True)
    # paths made absolute: export and generate read this file from any working directory
    saved = to_dict(with_absolute_paths(cfg))
    _write_atomic(out / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    return MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None)


def _write_atomic(path: Path, text: str) -> None:
    # a kill while writing leaves the old file or the new one, never half of one (export reads it)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# --- faults during the step loop ---------------------------------------------------------------------


class _StopRequest:
    """SIGTERM / SIGINT while training: note it, so the loop checkpoints at the next step boundary.

    The handler only sets a flag (a checkpoint must not start in the middle of a step, nor inside a
    collective); the loop reads it once per step, through the all-reduce that already carries the
    loss, so in a multi-process job every rank stops after the same step even when only one got the
    signal. Handlers are only installed from the main thread (Python allows no other) and are
    restored on exit.

    A second signal means "now" (SIGINT: KeyboardInterrupt, SIGTERM: termination), unless it comes
    within DUPLICATE_S of the first: launchers forward the signal that the whole process group already
    got (torchrun on Ctrl-C, SLURM on scancel), and that copy must not cancel the checkpoint.

    With several processes a rank can be stuck where no step boundary will come: in a collective that
    waits for a rank that died (torchrun then sends SIGTERM to the survivors). A watchdog ends the
    process if no step boundary is agreed within `max(MIN_GRACE_S, 2 x the longest step so far)`,
    instead of leaving it to the launcher's SIGKILL some 30 s later.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    DUPLICATE_S = 1.0
    MIN_GRACE_S = 5.0

    def __init__(self, watchdog: bool) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._watchdog = watchdog
        self._timer: threading.Timer | None = None
        self._first_at = 0.0
        self._last_boundary = time.monotonic()
        self._longest_step = 0.0

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self.acknowledge()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def boundary(self, stop_agreed: bool) -> None:
        """A step's all-reduce returned: time the step; once every rank agreed to stop, no watchdog."""
        now = time.monotonic()
        self._longest_step = max(self._longest_step, now - self._last_boundary)
        self._last_boundary = now
        if stop_agreed:
            self.acknowledge()

    def acknowledge(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            if self._watchdog:
                grace = max(self.MIN_GRACE_S, 2 * self._longest_step)
                self._timer = threading.Timer(grace, _give_up, args=(signum, grace))
                self._timer.daemon = True
                self._timer.start()
            return
        if time.monotonic() - self._first_at < self.DUPLICATE_S:
            return
        self.acknowledge()
        previous = self._previous.get(signum)
        if previous is None or previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        elif callable(previous):
            previous(signum, frame)


def _give_up(signum: int, grace: float) -> None:
    """The watchdog's end: this rank cannot reach a step boundary, so it stops without a checkpoint."""
    rank = int(os.environ.get("RANK", "0"))
    print(
        f"snuggle: {'[rank ' + str(rank) + '] ' if rank else ''}stopped by "
        f"{signal.Signals(signum).name} without a checkpoint: no step ended within {grace:.0f} s "
        "(a collective is waiting for another process)",
        file=sys.stderr,
        flush=True,
    )
    os._exit(128 + signum)


def _stopped(signum, done: int, steps: int, out: Path, loss: float, ctx, strategy, say, bar) -> dict:
    """The summary (and the one line on stderr) of a run stopped by a signal after checkpointing."""
    bar.close()
    # a rank that did not get the signal itself stops because another one did
    name = signal.Signals(signum).name if signum is not None else "a signal to another process"
    say(
        f"snuggle: stopped by {name} at step {done} of {steps}; checkpoint saved in {out}: continue "
        "with train.resume=true"
    )
    summary = {
        "output_dir": str(out),
        "steps": steps,
        "final_loss": loss,
        "stopped_by": name,
        "stopped_at_step": done,
        "exit_status": 128 + (signum if signum is not None else signal.SIGTERM),
    }
    if ctx.enabled:
        summary["world_size"], summary["parallel"] = ctx.world_size, strategy
    return summary


def _host_embeddings(setting: str, mem_plan, strategy: str) -> bool:
    """Whether the trained embeddings' optimizer runs on the host: as set, or as the memory plan chose."""
    host = setting == "cpu" or (mem_plan is not None and mem_plan.embeddings == "cpu")
    if host and strategy == "fsdp":
        # FSDP shards the copies and reduces their gradients itself
        raise SnuggleError(
            f"train.embedding_offload={setting}: the embeddings' optimizer state goes to CPU memory on one "
            "process or under DDP, not under FSDP; set train.memory_budget_gib higher or use more GPUs"
        )
    return host


def _rows_text(rows, limit: int = 8) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return f"[{shown}, ...] ({len(rows)} rows)" if len(rows) > limit else f"[{shown}]"


def _skipped_step_message(done: int, loss: float, norm: float, rows, streak: int, max_bad: int) -> str:
    bad = [f"loss {loss}"] if not math.isfinite(loss) else []
    if not math.isfinite(norm):
        bad.append(f"gradient norm {norm}")
    limit = (
        f"train.max_bad_steps={max_bad} in a row stop the run"
        if max_bad
        else "train.max_bad_steps=0: the run goes on"
    )
    return (
        f"step {done} skipped: non-finite {' and '.join(bad)} on packed rows {_rows_text(rows)} of the "
        f"training data; no update was made (parameters, optimizer state and lr schedule unchanged); "
        f"{streak} in a row, {limit}"
    )


def _too_many_bad_steps_message(bad: list[int], max_bad: int, out: Path, done: int) -> str:
    span = f"steps {bad[0]}-{bad[-1]}" if len(bad) > 1 else f"step {bad[0]}"
    return (
        f"training stopped: {span} ({len(bad)} in a row, train.max_bad_steps={max_bad}) had a non-finite "
        f"loss or gradient; none of them changed the parameters, and the checkpoint of step {done} in "
        f"{out} holds them as the update of step {bad[0] - 1} left them. Lower train.lr, set "
        "train.max_grad_norm, check the rows named in the warnings or train in bfloat16/float32 rather "
        "than float16; continue with train.resume=true (changed settings need "
        "train.allow_config_change=true)"
    )


def _check_resume_config(meta: dict, now: dict, ckpt: Path, allow: bool, ctx: DistContext, say) -> None:
    """Refuse (or, with train.allow_config_change, note) a resume whose settings change the curve.

    Every rank runs this on the same meta.json and config, so all raise together, and rank 0 prints.
    A checkpoint from before fingerprints still has its global batch checked.
    """
    saved = meta.get("curve_config")
    if saved is None:
        saved = {"train.global_batch": meta["global_batch"]} if "global_batch" in meta else {}
    changes = fingerprint_changes(saved, now)
    if not changes:
        return
    what = "; ".join(changes)
    if allow:
        say(
            f"snuggle: note: resuming {ckpt.name} with changed settings (train.allow_config_change=true): "
            f"{what}; from step {meta['step']} on the curve is not the saved run's"
        )
        return
    raise RankError(
        f"train.resume: {ckpt} was trained with other settings that change the loss curve: {what}. "
        "Set them back, or set train.allow_config_change=true to continue with the new ones",
        silent=not ctx.is_main,
    )


# --- out of GPU memory -------------------------------------------------------------------------------

_SIZE = r"([\d.]+ (?:[KMGTP]iB|bytes))"  # torch's format_size: "512 bytes", "20.00 MiB", "2.00 GiB"
_NEEDED = re.compile(rf"Tried to allocate {_SIZE}")
_CAPACITY = re.compile(rf"total capacity of {_SIZE} of which {_SIZE} is free")


def _gib(n: int | None) -> str | None:
    # torch's own style: "6.19 MiB", "79.18 GiB"
    if n is None:
        return None
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def oom_message(
    text: str,
    cfg: RunConfig,
    *,
    device: str,
    phase: str,
    free_bytes: int | None = None,
    total_bytes: int | None = None,
    peak_bytes: int | None = None,
) -> str:
    """One line for an out-of-memory error: the figures, then the settings that lower the need.

    `text` is torch's message; its figures (the failed allocation, the card's capacity and what was
    free at that moment) win over `free_bytes`/`total_bytes`, read afterwards, when the failed step's
    tensors are already gone. Pure, so it is tested without a GPU.
    """
    needed = _NEEDED.search(text)
    capacity = _CAPACITY.search(text)
    total = capacity.group(1) if capacity else _gib(total_bytes)
    free = capacity.group(2) if capacity else _gib(free_bytes)
    figures = [f"needed {needed.group(1)} more" if needed else "needed more than was free"]
    if free is not None and total is not None:
        figures.append(f"{free} of {total} free")
    elif free is not None:
        figures.append(f"{free} free")
    if peak_bytes is not None:
        figures.append(f"peak allocated by this run {_gib(peak_bytes)}")
    t = cfg.train
    if phase.startswith("building") or phase == "setup":
        fixes = [
            "model.dtype=bfloat16",
            "model.quantize=fp8 or nf4 (LoRA on an 8-bit or 4-bit base)",
        ]
        fixes.append("several GPUs with train.parallel=fsdp")
        advice = "the model does not fit: try " + ", ".join(fixes)
    else:
        fixes = [
            f"lower train.batch_size (now {t.batch_size}; raise train.grad_accum to keep the global batch)",
            f"lower data.seq_len (now {cfg.data.seq_len})",
        ]
        # gradient_checkpointing None (auto) leaves checkpointing and offload to the memory plan
        if t.gradient_checkpointing is False:
            fixes.append("turn on train.gradient_checkpointing (and train.offload_activations)")
        elif t.gradient_checkpointing and t.checkpoint_layers is not None:
            fixes.append("checkpoint every block (train.checkpoint_layers=null)")
        elif t.gradient_checkpointing and not t.offload_activations:
            fixes.append("turn on train.offload_activations")
        trains_embeddings = cfg.lora is None or not cfg.lora.enabled or cfg.lora.train_embeddings
        if trains_embeddings and t.embedding_offload != "cpu":
            fixes.append("train.embedding_offload=cpu (the embeddings' optimizer state in CPU memory)")
        if t.memory_budget_gib is not None:
            fixes.append(
                f"lower train.memory_budget_gib (now {t.memory_budget_gib:g}) so the memory plan saves more"
            )
        else:
            fixes.append("set train.memory_budget_gib below the free memory so the memory plan saves more")
        advice = "to fit: " + "; ".join(fixes)
    return f"out of GPU memory on {device} ({phase}): {', '.join(figures)}; {advice}"


# Out of memory outside torch's caching allocator: the CUDA libraries' own allocations (a cuBLAS
# handle, seen on an H100 whose memory was full before the first matmul; cuDNN, cuSOLVER workspaces)
# and plain cudaMalloc failures come as RuntimeError with these in the text.
_OOM_MARKERS = (
    "CUDA error: out of memory",
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUSOLVER_STATUS_ALLOC_FAILED",
)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(m in str(e) for m in _OOM_MARKERS)
    )


def _oom_to_user_error(e: BaseException, cfg: RunConfig, device: torch.device, phase: str) -> BaseException:
    """A CUDA out-of-memory error as a SnuggleError with the card's figures; anything else unchanged."""
    if not _is_oom(e):
        return e
    free = total = peak = None
    if device.type == "cuda":
        if device.index is None:  # name the card: "cuda:0", not "cuda"
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            free, total = torch.cuda.mem_get_info(device)
            peak = torch.cuda.max_memory_allocated(device)
        except Exception:  # the figures are a courtesy; the message stands without them
            pass
    text = str(e)
    return SnuggleError(
        oom_message(
            text, cfg, device=str(device), phase=phase, free_bytes=free, total_bytes=total, peak_bytes=peak
        )
    )
