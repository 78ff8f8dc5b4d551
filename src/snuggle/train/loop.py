"""The training loop: one loop for LoRA, CPT with trainable embeddings, and full fine-tuning.

Reads top to bottom: setup (model, data, optimizer, resume), then per step: the micro-batches of that
step, forward/backward with the loss normalised by the valid tokens of the whole step, clip, update,
log, evaluate, checkpoint.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import yaml

from snuggle.config import RunConfig, to_dict
from snuggle.data import BatchPlan, collate, iterate_eval
from snuggle.lora import trainable_state
from snuggle.model.checkpointing import configure_checkpointing
from snuggle.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from snuggle.train.evaluate import evaluate, to_device
from snuggle.train.metrics import MetricsLog, ProgressBar, peak_memory_gib, plot_losses
from snuggle.train.optim import build_optimizer, build_scheduler
from snuggle.train.setup import build_data, build_model, check_output_dir

__all__ = ["train"]


def train(cfg: RunConfig) -> dict:
    t = cfg.train
    out = Path(t.output_dir)
    check_output_dir(out, t.resume)
    torch.manual_seed(t.seed)

    model, tokenizer = build_model(cfg)
    device = model.lm_head.weight.device
    data = build_data(cfg.data, tokenizer, t.seed, model.args.max_position_embeddings)
    plan = BatchPlan(data.train_idx, batch_size=t.batch_size, grad_accum=t.grad_accum, seed=t.seed)
    if t.gradient_checkpointing:
        configure_checkpointing(model, t.checkpoint_layers, t.offload_activations)
    trainables = trainable_state(model)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t)

    start = 0
    ckpt = latest_checkpoint(out) if t.resume else None
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, opt, sched)["step"]
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is None:
        # a fresh start (also resume=true on a run that died before its first checkpoint) must not
        # append its curve to the rows of the earlier attempt, which would give every step twice
        (out / "metrics.jsonl").unlink(missing_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    log = MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None)
    bar = ProgressBar(t.steps, start, t.progress)
    n_train = sum(p.numel() for p in trainables.values())
    n_total = sum(p.numel() for p in model.parameters())
    bar.write(
        f"snuggle: {n_train:,} trainable of {n_total:,} parameters; {len(data.train_idx)} train rows, "
        f"{len(data.val_idx)} held-out rows of {cfg.data.seq_len} tokens"
        + (f"; resumed from {ckpt.name}" if ckpt is not None else "")
    )

    def run_eval(step: int) -> dict | None:
        if len(data.val_idx) == 0:
            return None
        batches = iterate_eval(data.rows, data.val_idx, t.batch_size, t.eval_rows)
        res = evaluate(model, batches, device)
        log.write(
            {
                "step": step,
                "eval_loss": res["loss"],
                "eval_ppl": res["perplexity"],
                "eval_tokens": res["tokens"],
            }
        )
        bar.write(f"step {step}: eval loss {res['loss']:.4f}, perplexity {res['perplexity']:.2f}")
        return res

    def checkpoint(step: int) -> None:
        save_checkpoint(
            out,
            step,
            trainables,
            opt,
            sched,
            {"tokens_seen": step * tokens_per_step},
            keep=t.keep_checkpoints,
        )
        plot_losses(out / "metrics.jsonl", out / "loss.png")

    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    first_eval = run_eval(0) if start == 0 else None
    last_eval = None
    model.train()
    loss_val = float("nan")
    for step in range(start, t.steps):
        t0 = time.perf_counter()
        batches = [collate([data.rows[int(i)] for i in idx]) for idx in plan.micro_batches(step)]
        # the mean is over every valid token of the step, not a mean of micro-batch means
        n_valid = sum(int((b["labels"] != -100).sum()) for b in batches)
        loss_sum = torch.zeros((), device=device)
        for b in batches:
            b = to_device(b, device)
            loss = model.loss_sum(b["input_ids"], b["labels"], b["position_ids"], b["doc_ids"]) / max(
                n_valid, 1
            )
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = None
        if t.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trainables.values()), t.max_grad_norm))
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = float(loss_sum)
        dt = time.perf_counter() - t0
        done = step + 1
        mem = peak_memory_gib(device)
        if done % t.log_every == 0 or done == t.steps:
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
            log.write(row)
        bar.update(loss_val, lr, tokens_per_step / dt, mem)
        if t.eval_every and done % t.eval_every == 0 and done != t.steps:
            run_eval(done)
        if t.save_every and done % t.save_every == 0 and done != t.steps:
            checkpoint(done)
    bar.close()
    if start < t.steps or ckpt is None:
        last_eval = run_eval(t.steps)
        checkpoint(t.steps)
    log.close()
    summary = {"output_dir": str(out), "steps": t.steps, "final_loss": loss_val}
    if first_eval is not None:
        summary["eval_loss_before"], summary["eval_ppl_before"] = first_eval["loss"], first_eval["perplexity"]
    if last_eval is not None:
        summary["eval_loss"], summary["eval_ppl"] = last_eval["loss"], last_eval["perplexity"]
    if not math.isfinite(loss_val) and start < t.steps:
        summary["warning"] = "final training loss is not finite"
    return summary
