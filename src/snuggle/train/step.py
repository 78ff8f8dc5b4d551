"""One training step: this rank's micro-batches through forward/backward, clip, reduce, update or skip.

The loss of every micro-batch is divided by the valid-token count of the whole global step (all
micro-batches, all ranks), so the gradients summed over micro-batches and ranks are those of the global
mean. A step whose reduced loss or gradient norm is not finite makes no update (docs/reliability.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from snuggle.model.loss import IGNORE_INDEX
from snuggle.train.data_parallel import grad_sync
from snuggle.train.evaluate import to_device
from snuggle.train.parallel import DistContext


class StopSignal(Protocol):
    """The loop's note of SIGTERM / SIGINT (loop._StopRequest): read once per step, at its boundary."""

    signum: int | None

    def boundary(self, stop_agreed: bool) -> None: ...


@dataclass(frozen=True)
class StepResult:
    """What one step did, in figures every rank agrees on (reduced over the ranks)."""

    loss: float  # the global step loss (mean over its valid tokens)
    grad_norm: float  # before clipping
    lr: float  # the lr the update used
    tokens: int  # valid tokens of the global step
    stop_asked: bool  # some rank got SIGTERM / SIGINT: every rank stops after this step

    @property
    def finite(self) -> bool:
        # loss and norm are global (reduced over ranks), so every rank skips the same steps
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def train_step(
    engine: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    params: list[torch.Tensor],
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    *,
    ctx: DistContext,
    device: torch.device,
    max_grad_norm: float | None,
    stop: StopSignal,
    done: int,
) -> StepResult:
    """Train on step `done`'s micro-batches (this rank's share) and update, or skip a non-finite step."""
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
                b["input_ids"],
                position_ids=b["position_ids"],
                doc_ids=b["doc_ids"],
                labels=b["labels"],
            ) / max(n_valid, 1)
            loss.backward()
        loss_sum += loss.detach()
    ctx.heartbeat(f"step {done}: update")
    grad_norm = _grad_norm(params, max_grad_norm)
    loss_val, stop_asked = _reduce_step(ctx, loss_sum, stop.signum is not None)
    stop.boundary(stop_asked)
    result = StepResult(loss_val, grad_norm, opt.param_groups[0]["lr"], n_valid, stop_asked)
    if result.finite:
        opt.step()
        sched.step()
    # else no update and no schedule step: the lr schedule counts real updates; the data position
    # still moves on, since the step number alone fixes the batch
    opt.zero_grad(set_to_none=True)
    return result


def _grad_norm(params: list[torch.Tensor], max_norm: float | None) -> float:
    """The global gradient norm, after clipping to `max_norm` when that is set.

    Computed even without clipping: a non-finite gradient can come with a finite loss (an overflow in
    backward), and the step must be skipped then too. Under FSDP the norm is a DTensor over the
    shards; `full_tensor` completes it (the all-reduce clip needs anyway).
    """
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _reduce_step(ctx: DistContext, loss_sum: torch.Tensor, stop: bool) -> tuple[float, bool]:
    """(the global step loss, whether any rank was asked to stop), in the one all-reduce the loss had."""
    loss = float(loss_sum)
    if not ctx.enabled:
        return loss, stop
    total, votes = ctx.all_reduce_sum(torch.tensor([loss, float(stop)], dtype=torch.float64)).tolist()
    return total, votes > 0
