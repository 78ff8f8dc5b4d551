"""Data parallelism as a function applied to the model: one training loop for 1 and N processes.

`apply_parallel(model, strategy, ctx, device)` returns the module the loop calls:

- `none`: the model itself (one process; exactly the single-process trainer).
- `ddp`: `DistributedDataParallel`. The base model is replicated and only trainable gradients are
  all-reduced, in buckets that overlap with backward. The right choice for LoRA on a model that fits
  one card.
- `fsdp`: FSDP2 (`fully_shard`) on every decoder block, then on the root, which holds `embed_tokens`,
  `lm_head` (one tensor when tied) and the final norm. Parameters, gradients and optimizer state are
  sharded; for full fine-tuning and for models larger than a card. The base is loaded sharded: the
  loop builds the model with its blocks still on the meta device (`load_deferred`; the root, LoRA
  factors and adapters are real), and each block is read from the checkpoint just before it is
  sharded, so a process holds one whole block at a time besides its shards (and the root).

One process is always `none`: a forced ddp/fsdp there has nothing to communicate or shard, and the loop
says so and runs unwrapped.

Both reduce gradients by SUM, not by the wrappers' default mean: every rank divides its token-loss sum
by the valid-token count of the *global* step, so the sum over ranks is already the gradient of the
global mean, and the curve equals the single-process one for the same global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from snuggle.errors import SnuggleError
from snuggle.train.parallel import DistContext

__all__ = ["STRATEGIES", "apply_parallel", "grad_sync", "resolve_strategy", "unwrap"]

STRATEGIES = ("auto", "none", "ddp", "fsdp")


def resolve_strategy(requested: str, world_size: int, use_lora: bool, fits_one_card: bool = True) -> str:
    """`auto`: one process -> none; LoRA on a model that fits one card -> ddp; full fine-tuning, or a
    model too large for one card (`fits_one_card` False) -> fsdp. One process is always none."""
    if requested not in STRATEGIES:
        raise SnuggleError(f"train.parallel must be one of {', '.join(STRATEGIES)}, got {requested!r}")
    if world_size == 1:
        return "none"
    if requested == "none":
        raise SnuggleError(
            f"train.parallel=none needs one process, but this job has {world_size}; use auto, ddp or fsdp"
        )
    if requested == "auto":
        return "ddp" if use_lora and fits_one_card else "fsdp"
    return requested


def _sum_allreduce_hook(group, bucket):
    """DDP comm hook: all-reduce SUM (DDP's own hook divides by the world size; see the module doc).

    (group: ProcessGroup | None, bucket: GradBucket) -> Future[Tensor]; unannotated because DDP
    compares the `bucket` annotation with `dist.GradBucket`, and postponed annotations are strings.
    """
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _bf16_sum_allreduce_hook(group, bucket):
    """DDP comm hook for `train.reduce_dtype: bfloat16`: the SUM all-reduce of a bf16 copy of the bucket.

    Half the bytes of the fp32 gradients on the link; the sum comes back into the fp32 bucket. Each
    rank's share is rounded to bf16 (~3 significant digits) before the sum, and the sum is rounded
    along the ring, so gradients differ from the fp32 reduction by about bf16's precision.
    """
    buf = bucket.buffer()
    work = dist.all_reduce(buf.to(torch.bfloat16), group=group, async_op=True)
    return work.get_future().then(lambda fut: buf.copy_(fut.value()[0]))


def _check_trainable_dtypes(module: nn.Module, name: str) -> None:
    # FSDP2 reduce-scatters one flat buffer per unit, so every *trainable* tensor of a unit must share
    # a dtype; frozen ones may differ (they are all-gathered as bytes and never reduced). lora.py keeps
    # every trainable in fp32, so this only fires if that policy changes.
    dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    if len(dtypes) > 1:
        raise SnuggleError(f"fsdp: trainable parameters of {name} mix dtypes {sorted(map(str, dtypes))}")


def apply_parallel(
    model: nn.Module,
    strategy: str,
    ctx: DistContext,
    device: torch.device,
    reduce_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Wrap `model` for `strategy`; returns the module to call (forward with labels gives the loss).

    `reduce_dtype`: the dtype gradients cross the link in (`train.reduce_dtype`); bf16 halves the bytes
    of a step's gradient reduction, the trainables and their gradients stay fp32. `device` is where
    training runs. FSDP accepts a model still on the CPU and moves each unit there
    as it shards it, so a model larger than one card never has to fit on one whole.

    A model built with deferred blocks (`load_deferred`: FSDP's sharded load) gets each block read just
    before it is sharded, so this process holds one whole block at a time besides its shards (and the
    root, sharded last). Any other strategy reads every block first: there is nothing to shard.
    """
    deferred = getattr(model, "deferred_blocks", None)
    if deferred is not None:
        del model.deferred_blocks  # consumed here, whatever the strategy
        if strategy != "fsdp":
            deferred.fill_all(model)
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Every trainable gets exactly one gradient per backward (an empty micro-batch still connects
        # the graph, see loss.cross_entropy_sum), so no unused-parameter search is needed. That also
        # keeps the offloaded checkpointed blocks, which run a nested backward, compatible with the
        # reducer: each parameter is marked ready once, whichever graph task computes it.
        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        hook = _bf16_sum_allreduce_hook if reduce_dtype == torch.bfloat16 else _sum_allreduce_hook
        ddp.register_comm_hook(None, hook)
        return ddp
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(device.type, (ctx.world_size,))
        # all-gather and compute in the model's dtype (trainable fp32 copies are cast like the
        # single-process path casts them at use); reduce gradients in `reduce_dtype` (fp32 unless
        # asked) into the fp32 shards
        mp = MixedPrecisionPolicy(param_dtype=model.compute_dtype, reduce_dtype=reduce_dtype)
        units: list[nn.Module] = []
        for i, block in enumerate(model.model.layers):
            if deferred is not None:
                deferred.fill(model, i)  # the whole block, until fully_shard keeps this rank's rows
            _check_trainable_dtypes(block, f"model.layers.{i}")
            units.append(fully_shard(block, mesh=mesh, mp_policy=mp))
        # the root unit holds embed_tokens, lm_head and the final norm: a tied lm_head is one
        # parameter in one unit, and the loss (computed inside the root forward) reads it unsharded
        _check_trainable_dtypes(model, "the root (embeddings, lm_head, norm)")
        units.append(fully_shard(model, mesh=mesh, mp_policy=mp))
        for unit in units:
            unit.set_force_sum_reduction_for_comms(True)
            unit.set_gradient_divide_factor(1.0)
        return model
    raise SnuggleError(f"unknown parallel strategy {strategy!r}")


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Around one micro-batch's forward+backward: reduce its gradients now (`sync`) or keep them local.

    DDP skips the all-reduce of all but the last micro-batch of a step (`no_sync`). FSDP reduces
    every micro-batch: skipping would hold the unsharded gradients of every block until the last
    micro-batch, and in the compute dtype, which is the memory FSDP exists to save.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    if isinstance(model, DDP) and not sync:
        with model.no_sync():
            yield
    else:
        yield


def unwrap(model: nn.Module) -> nn.Module:
    """The Decoder inside a DDP wrapper (FSDP2 wraps in place, so that is the model itself)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return model.module if isinstance(model, DDP) else model
