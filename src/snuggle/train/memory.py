"""The memory plan: the cheapest activation savings that fit `train.memory_budget_gib`, chosen before step 0.

Peak memory of a training step is predicted from the model as built (its tensors' real bytes: 4-bit
or 16-bit base, fp32 trainables) and from what one block keeps for backward, counted from the
shapes (activation dtype, per token of a micro-batch):

    stored block     4h + 2q + 2kv + 3f   inputs and outputs of the norms, q, k, v, the attention
                                          output (o_proj's input), the residual, and gate, up and
                                          their product (2f with the fast path's SwiGLU inside the
                                          LoRA down projection, which makes the product again; 2h
                                          less with the norms inside the fast path's LoRA group
                                          Functions, which keep only the norms' inputs)
    tiled MLP        4h + 2q + 2kv        the MLP keeps only its input; one tile's 3f at a time
    recomputed block h                    its input only (0 on the GPU when offloaded to CPU)
    offloaded block  0                    a stored block whose saved tensors wait in pinned CPU
                                          memory (plus one block in flight to and from the host)

plus one recomputed block's full activations and the gradients in flight during backward, the loss
(hidden states and their gradient; one chunk of logits) and the trainables' gradients and AdamW state.
With h = hidden, q = heads x head_dim, kv = kv heads x head_dim, f = intermediate size.

Savings, in the order they are taken (each costs time, so a run takes only what it needs): with the
fast path, make the SwiGLU product and the norms' outputs again in backward instead of keeping them
(elementwise passes); keep the saved activations of as many blocks in CPU memory as the host link
carries during one forward (measured on the card before planning: copies that keep up with the
compute cost nothing); recompute the fewest blocks that fit (each recomputed block costs one more
block forward), keeping their inputs in pinned CPU memory where that saves one block more (copies
hidden under recomputation); then run the MLP in sequence tiles (long context). If the most frugal
plan does not fit either, the run stops before training and says which sequence length or batch size
would fit.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from snuggle.errors import SnuggleError
from snuggle.kernels.capabilities import can_recompute_norm, can_recompute_product
from snuggle.model.args import ModelArgs
from snuggle.model.checkpointing import configure_checkpointing

__all__ = [
    "MemoryPlan",
    "plan_memory",
    "predict_bytes",
    "memory_plan_for",
    "apply_memory_plan",
    "plan_for_model",
    "predict_for_model",
    "enforce_budget",
    "static_bytes",
    "device_budget_gib",
    "prefer_expandable_segments",
    "host_peak_bytes",
    "check_host_memory",
]

GIB = 2**30
# the caching allocator's slack beyond the live tensors: rounding to blocks, fragmentation
_FRAGMENTATION = 1.02
_FIXED_SLACK = 0.25 * GIB
_LOGITS_CHUNK = 1 << 28  # bytes of one chunk of logits in the chunked loss (see kernels.linear_ce)
_TILE_TOKENS = 8192  # MLP tile: (8192, f) activations, 224 MiB for Llama-3 8B


@dataclasses.dataclass
class MemoryPlan:
    checkpoint_layers: int  # the first n blocks are recomputed in backward
    offload: bool  # their inputs wait in pinned CPU memory
    tile_tokens: int  # MLP sequence tile (0: untiled)
    predicted_gib: float
    budget_gib: float
    static_gib: float  # weights, trainables' gradients and optimizer state
    num_layers: int
    recompute_product: bool = False  # the MLPs keep gate and up, and make their SwiGLU product again
    recompute_norm: bool = False  # the LoRA groups keep the norms' inputs, and normalize again
    offload_blocks: int = 0  # the first n blocks keep their saved activations in pinned CPU memory
    # where the trained embeddings' optimizer state and fp32 master live: "gpu", "cpu", or "" (none train)
    embeddings: str = ""

    def describe(self) -> str:
        again = [
            what
            for what, on in (
                ("SwiGLU product", self.recompute_product and not self.tile_tokens),
                ("norms", self.recompute_norm),
            )
            if on
        ]
        if self.checkpoint_layers == 0:
            ckpt = "no block checkpointing" if again else "no activation checkpointing"
        else:
            ckpt = f"checkpointing {self.checkpoint_layers} of {self.num_layers} blocks"
            if self.offload:
                ckpt += " (inputs offloaded to CPU)"
        if self.offload_blocks:
            ckpt += f", activations of {self.offload_blocks} blocks kept in CPU memory"
        tiles = f", MLP in tiles of {self.tile_tokens} tokens" if self.tile_tokens else ""
        if again:
            tiles += f", {' and '.join(again)} recomputed"
        return (
            f"memory plan for {self.budget_gib:.1f} GiB: {ckpt}{tiles}; predicted peak "
            f"{self.predicted_gib:.1f} GiB ({self.static_gib:.1f} weights and optimizer state)"
            + _EMBEDDING_PLACES.get(self.embeddings, "")
        )


_EMBEDDING_PLACES = {
    "gpu": "; embed_tokens/lm_head copies, gradients and optimizer state on the GPU",
    "cpu": (
        "; embed_tokens/lm_head copies and gradients on the GPU, their optimizer state and fp32 master "
        "in CPU memory (updated there)"
    ),
}


def _local_bytes(t: torch.Tensor) -> int:
    # FSDP: a DTensor's numel is global; this rank holds its shard
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def static_bytes(model: nn.Module, optimizer: str = "adamw", host_state: frozenset[int] = frozenset()) -> int:
    """Bytes that live through the whole step: every tensor of the model, plus gradient and
    optimizer state of the trainable ones (fp32 gradient; AdamW 8 bytes, 8-bit AdamW ~2).
    `host_state`: ids of parameters whose optimizer state lives in CPU memory (embedding_offload)."""
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        n = _local_bytes(t)
        total += n
        if t.requires_grad:
            numel = n // t.element_size()
            total += 4 * numel
            if id(t) not in host_state:
                total += 8 * numel if optimizer == "adamw" else 2 * numel + numel // 64
    return total


def _block_bytes(
    args: ModelArgs,
    tokens: int,
    mlp_tokens: int,
    act_bytes: int,
    fused_mlp: bool = False,
    fused_norm: bool = False,
) -> tuple[float, float]:
    """(one block's saved activations, its gradients in flight in backward) for `tokens` tokens whose
    MLP runs `mlp_tokens` at a time (= tokens when untiled); `fused_mlp`: the SwiGLU product is not
    kept but made again in backward (kernels.swiglu.SwiGLUDownFunction); `fused_norm`: neither are the
    norms' outputs (kernels.lora.LoRAGroupFunction with the norm inside)."""
    h, f = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    attn = ((2 if fused_norm else 4) * h + 2 * q + 2 * kv) * tokens
    saved = attn + (2 if fused_mlp else 3) * f * mlp_tokens
    # d(activations) alive at once: the MLP's (d of the SwiGLU output and, fused, the product made
    # again; dx), or attention's (dq, dk, dv, do, and the flash backward's fp32 dq accumulator)
    mlp_grads = act_bytes * ((2 if fused_mlp else 1) * f * mlp_tokens + 2 * h * tokens)
    attn_grads = (act_bytes * (2 * q + 2 * kv + h) + 4 * q) * tokens
    return act_bytes * saved, max(mlp_grads, attn_grads)


def predict_bytes(
    args: ModelArgs,
    tokens: int,
    static: int,
    act_bytes: int,
    checkpoint_layers: int,
    offload: bool,
    tile_tokens: int,
    trainable_head: bool = False,
    transient: int = 0,
    fused_mlp: bool = False,
    fused_norm: bool = False,
    offload_blocks: int = 0,
    transient_per_token: int = 0,
) -> int:
    """Predicted peak bytes of one training step with `tokens` tokens per micro-batch.

    `transient`: bytes of short-lived buffers beside the activations (a dequantized 4-bit weight);
    `transient_per_token`: those that grow with the tokens (FP8's quantized copy of a GEMM's input).
    `fused_mlp`: the MLP keeps gate and up but not their product (see `_block_bytes`); a plan's
    `recompute_product`. `fused_norm`: the norms' outputs are not kept; a plan's `recompute_norm`.
    `offload_blocks`: blocks whose saved activations wait in CPU memory (see checkpointing).
    """
    L = args.num_layers
    mlp_tokens = tile_tokens if tile_tokens and tile_tokens < tokens else tokens
    block, work = _block_bytes(args, tokens, mlp_tokens, act_bytes, fused_mlp, fused_norm)
    # backward runs from the last block down: by the time the first k (checkpointed) blocks are
    # recomputed, the stored blocks' activations are freed, so one recomputed block counts as one
    # stored block when none is stored
    stored = L - checkpoint_layers - offload_blocks
    acts = max(stored, 1 if checkpoint_layers or offload_blocks else 0) * block
    if offload_blocks:
        acts += block  # an offloaded block's tensors until their copy is done, or fetched back early
    if checkpoint_layers and not offload:
        acts += checkpoint_layers * act_bytes * args.hidden_size * tokens
    # loss: final hidden states and their gradient, one chunk of logits; a trainable head's fp32 dW
    loss = 2 * act_bytes * args.hidden_size * tokens + min(
        _LOGITS_CHUNK, act_bytes * args.vocab_size * tokens
    )
    if trainable_head:
        loss += 4 * args.vocab_size * args.hidden_size
    # the embedding output and the residual stream entering the first block
    acts += 2 * act_bytes * args.hidden_size * tokens
    transient += transient_per_token * tokens
    return int((static + acts + work + loss + transient) * _FRAGMENTATION + _FIXED_SLACK)


def _candidates(L: int, can_offload: bool, rp: bool, rn: bool, offload_max: int = 0):
    """(checkpoint_layers, offload, tile_tokens, recompute_product, recompute_norm, offload_blocks) in
    the order of their cost in time (the predicted peak mostly falls along it; the plan takes the first
    that fits); `rp`, `rn`: whether the model can make the SwiGLU product / the
    norms' outputs again in backward; `offload_max`: how many blocks' saved activations the host link
    carries during one forward.

    Making the SwiGLU product again costs one elementwise pass a block (within noise of nothing for
    Llama-3 8B on an H100) and frees a third of every stored MLP's activations, so it goes first; then
    the norms' outputs (2h of a block's 6h + 2kv + 2f for 8B; their backward works from the norms'
    inputs, so this costs little more than a few small products). Then blocks' activations go to CPU
    memory, one block more each, up to what the link carries (copies hidden under compute). Then blocks
    are recomputed, each for one more block forward (~1.5% of an 8B step); moving the recomputed
    blocks' inputs to CPU memory hides under that recomputation, so at each count of recomputed blocks
    offloading comes before one block more. Offloaded blocks are fetched back while the stored blocks'
    backward frees room for them, so there are never more of them than stored blocks.
    """
    yield 0, False, 0, False, False, 0
    if rp:
        yield 0, False, 0, True, False, 0
    if rn:
        yield 0, False, 0, rp, True, 0
    # one offloaded block saves nothing: its room is kept for the block in flight to or from the host
    for m in range(2, min(offload_max, L // 2) + 1):
        yield 0, False, 0, rp, rn, m
    for k in range(1, L + 1):
        m = min(offload_max, (L - k) // 2)
        m = m if m >= 2 else 0
        yield k, False, 0, rp, rn, m
        if can_offload:
            yield k, True, 0, rp, rn, m
    yield L, can_offload, _TILE_TOKENS, rp, rn, 0


def plan_memory(
    args: ModelArgs,
    static: int,
    batch_size: int,
    seq_len: int,
    budget_gib: float,
    act_bytes: int = 2,
    trainable_head: bool = False,
    can_offload: bool = True,
    transient: int = 0,
    can_recompute_product: bool = False,
    can_recompute_norm: bool = False,
    offload_blocks_max: int = 0,
    transient_per_token: int = 0,
) -> MemoryPlan:
    """The fastest plan whose predicted peak fits the budget, or a SnuggleError saying what would fit.

    `can_recompute_product`: the model's MLPs can make their SwiGLU product again in backward (the
    fast path's `act_down`); `can_recompute_norm`: its LoRA groups can take their norm inside (the fast
    path's `project`); a plan may choose these before checkpointing blocks. `offload_blocks_max`: how
    many blocks' saved activations may wait in CPU memory (`offload_capacity`; 0 without a GPU).
    """
    budget = budget_gib * GIB

    def predict(
        tokens: int, k: int, offload: bool, tile: int, rp=can_recompute_product, rn=can_recompute_norm, m=0
    ) -> int:
        return predict_bytes(
            args, tokens, static, act_bytes, k, offload, tile, trainable_head, transient, rp, rn, m,
            transient_per_token,
        )  # fmt: skip

    tokens = batch_size * seq_len
    candidates = _candidates(
        args.num_layers, can_offload, can_recompute_product, can_recompute_norm, offload_blocks_max
    )
    for k, off, tile, rp, rn, m in candidates:
        peak = predict(tokens, k, off, tile, rp, rn, m)
        if peak <= budget:
            tile = tile if tile < tokens else 0
            return MemoryPlan(k, off, tile, peak / GIB, budget_gib, static / GIB, args.num_layers, rp, rn, m)
    if static * _FRAGMENTATION + _FIXED_SLACK > budget:
        raise SnuggleError(
            f"the model alone needs {(static * _FRAGMENTATION + _FIXED_SLACK) / GIB:.2f} GiB (weights, "
            f"gradients, optimizer state, allocator reserve), above train.memory_budget_gib={budget_gib:g}: "
            "use model.quantize=nf4 (or fp8), "
            "train.optimizer=adamw8bit, fewer trainable parameters, or a larger budget"
        )

    # the longest sequence (at this batch size) and the largest batch (at this length) that would fit
    # the most frugal plan (the last candidate)
    def fits(b: int, s: int) -> bool:
        return predict(b * s, args.num_layers, can_offload, _TILE_TOKENS) <= budget

    frugal = predict(tokens, args.num_layers, can_offload, _TILE_TOKENS)
    lo, hi = 0, seq_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(batch_size, mid) else (lo, mid - 1)
    best_b = max((b for b in range(1, batch_size) if fits(b, seq_len)), default=0)
    advice = f"data.seq_len <= {lo // 64 * 64}" if lo >= 64 else "a much shorter data.seq_len"
    if best_b:
        advice += f" or train.batch_size <= {best_b}"
    raise SnuggleError(
        f"predicted peak {frugal / GIB:.1f} GiB for batch {batch_size} x {seq_len} tokens, even with every "
        f"block recomputed{' and offloaded' if can_offload else ''} and the MLP tiled, is above "
        f"train.memory_budget_gib={budget_gib:g}: {advice} would fit"
    )


def device_budget_gib(device: torch.device) -> float:
    """What the card offers this process's allocator now: its free memory plus what the allocator
    already holds (the loaded weights), and no more than the per-process fraction allows. Free
    memory, not the card's size: the CUDA context and other processes (a desktop on a consumer
    card) hold memory that the allocator can never get."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    fraction = float(get_fraction(idx)) if get_fraction is not None else 1.0
    free, _ = torch.cuda.mem_get_info(idx)
    return min(total * min(1.0, fraction), free + torch.cuda.memory_reserved(idx)) / GIB


def prefer_expandable_segments() -> None:
    """Let the CUDA caching allocator grow its segments in place (`expandable_segments:True`) unless the
    user configured it: memory that comes and goes in every step (activations, logits chunks, tiles of
    odd sizes) then leaves no fragments, so what the allocator reserves stays near what tensors hold
    and the memory plan's prediction bounds the reservation, which is what a card's size or the
    budget's cap limits. Set before CUDA starts (the setting is read then); no effect afterwards.
    Measured on one H200: speed within noise on five 1B/8B cases; reserved memory over the peak of
    live tensors from 0.2-1.0 GiB to 0.0-0.2 (docs/performance.md, "Memory")."""
    if any(k in os.environ for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")):
        return
    if torch.cuda.is_initialized():
        return
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def apply_memory_plan(model: nn.Module, plan: MemoryPlan) -> None:
    """Set the plan on the model: which blocks recompute (and offload), and the MLP tiles."""
    configure_checkpointing(model, plan.checkpoint_layers, plan.offload, plan.offload_blocks)
    for block in model.model.layers:
        block.mlp.tile_tokens = plan.tile_tokens
        block.mlp.recompute_product = plan.recompute_product
        block.recompute_norm = plan.recompute_norm


def _model_terms(model: nn.Module, optimizer: str = "adamw", host_embeddings: bool = False) -> dict:
    """predict_bytes' arguments that a built `Decoder` fixes: its real bytes (an FP8 or NF4 weight
    counts its own: 1 byte a weight plus 4 a row, ~4.13 bits a weight), activation dtype, head and the
    transient copies its quantized weights make; `host_embeddings`: the trained embeddings' optimizer
    state is in CPU memory."""
    from snuggle.quant.fp8 import FP8Weight
    from snuggle.quant.nf4 import NF4Weight

    act_bytes = torch.empty((), dtype=model.compute_dtype).element_size()
    # NF4: one dequantized weight in forward, one in backward; FP8: backward's transposed 1-byte copy,
    # and per token the quantized copy of the widest GEMM input (its scaled rows, then e4m3 bytes)
    nf4 = [2 * act_bytes * m.shape.numel() for m in model.modules() if isinstance(m, NF4Weight)]
    fp8 = [m for m in model.modules() if isinstance(m, FP8Weight)]
    return dict(
        static=static_bytes(model, optimizer, _embedding_ids(model) if host_embeddings else frozenset()),
        act_bytes=act_bytes,
        trainable_head=bool(model.lm_head.weight.requires_grad),
        transient=max(nf4 + [m.shape.numel() for m in fp8], default=0),
        transient_per_token=max((act_bytes + 1) * max(m.shape) for m in fp8) if fp8 else 0,
    )


def _embedding_ids(model: nn.Module) -> frozenset[int]:
    """ids of the trained embed_tokens / lm_head copies (one for a tied pair)."""
    return frozenset(
        id(w) for w in (model.model.embed_tokens.weight, model.lm_head.weight) if w.requires_grad
    )


def predict_for_model(
    model: nn.Module,
    tokens: int,
    optimizer: str = "adamw",
    host_embeddings: bool = False,
    checkpoint_layers: int | None = None,
) -> int:
    """Predicted peak bytes of a step of `tokens` tokens with the savings the model is set to now
    (checkpointed and offloaded blocks, MLP tiles, recomputed product and norms): what a plan with
    these settings would have predicted, so that any configuration's measured peak can be held
    against the model the plans are chosen by. `checkpoint_layers`: that many recomputed blocks
    instead of the model's."""
    block = model.model.layers[0]
    saved = getattr(model, "saved_offloader", None)
    if checkpoint_layers is None:
        checkpoint_layers = len(getattr(model, "checkpoint_layers", ()))
    return predict_bytes(
        model.args,
        tokens,
        checkpoint_layers=checkpoint_layers,
        offload=getattr(model, "offloader", None) is not None,
        tile_tokens=block.mlp.tile_tokens,
        fused_mlp=bool(block.mlp.recompute_product),
        fused_norm=bool(getattr(block, "recompute_norm", False)),
        offload_blocks=len(saved.layers) if saved is not None else 0,
        **_model_terms(model, optimizer, host_embeddings),
    )


def plan_for_model(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    budget_gib: float,
    optimizer: str = "adamw",
    can_offload: bool = True,
    offload_blocks_max: int | None = None,
    embedding_offload: str = "gpu",
) -> MemoryPlan:
    """`plan_memory` for a built `Decoder` (see `_model_terms`).

    `offload_blocks_max`: None measures what the host link carries on the model's GPU
    (`offload_capacity`; 0 elsewhere or without `can_offload`). `embedding_offload`: where the trained
    embeddings' optimizer state lives, gpu or cpu; auto keeps it on the GPU when any plan fits there
    (an update on the host costs every optimizer step a round trip of the copies over the host link
    and a CPU AdamW pass) and moves it to the host when none does."""
    if not _embedding_ids(model):
        return _plan_for_model(
            model, batch_size, seq_len, budget_gib, optimizer, can_offload, offload_blocks_max
        )
    if embedding_offload == "auto":
        try:
            return plan_for_model(
                model, batch_size, seq_len, budget_gib, optimizer, can_offload, offload_blocks_max, "gpu"
            )
        except SnuggleError:
            embedding_offload = "cpu"
    plan = _plan_for_model(
        model,
        batch_size,
        seq_len,
        budget_gib,
        optimizer,
        can_offload,
        offload_blocks_max,
        embedding_offload == "cpu",
    )
    plan.embeddings = embedding_offload
    return plan


def _plan_for_model(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    budget_gib: float,
    optimizer: str,
    can_offload: bool,
    offload_blocks_max: int | None,
    host_embeddings: bool = False,
) -> MemoryPlan:
    terms = _model_terms(model, optimizer, host_embeddings)
    rp, rn = can_recompute_product(model), can_recompute_norm(model)
    device = model.lm_head.weight.device
    if offload_blocks_max is None:
        offload_blocks_max = 0
        if can_offload and device.type == "cuda":
            tokens = batch_size * seq_len
            block = _block_bytes(model.args, tokens, tokens, terms["act_bytes"], rp, rn)[0]
            offload_blocks_max = offload_capacity(model.args, tokens, block, model.compute_dtype, device)
    return plan_memory(
        model.args,
        terms["static"],
        batch_size,
        seq_len,
        budget_gib,
        act_bytes=terms["act_bytes"],
        trainable_head=terms["trainable_head"],
        can_offload=can_offload,
        transient=terms["transient"],
        transient_per_token=terms["transient_per_token"],
        can_recompute_product=rp,
        can_recompute_norm=rn,
        offload_blocks_max=offload_blocks_max,
    )


def _timed(fn, device: torch.device, reps: int) -> float:
    """Seconds per call of `fn` on the GPU, after one warm-up call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(torch.cuda.current_stream(device))
    for _ in range(reps):
        fn()
    end.record(torch.cuda.current_stream(device))
    end.synchronize()
    return start.elapsed_time(end) / 1000 / reps


# share of the forward the copies may fill: the link is measured alone, and the copies must be done
# before the step's peak (the loss), a little before the forward's end
_LINK_SHARE = 0.8


def host_link_rate(device: torch.device) -> float:
    """Bytes per second of a device-to-pinned-host copy on this GPU (64 MiB, four times)."""
    src = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    dst = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    return src.numel() / _timed(lambda: dst.copy_(src, non_blocking=True), device, 4)


def gemm_rate(args: ModelArgs, tokens: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of the model's largest projection (hidden -> intermediate) in `dtype` on this GPU."""
    h, f = args.hidden_size, args.intermediate_size
    rows = min(tokens, 4096)
    with torch.no_grad():
        x = torch.randn(rows, h, dtype=dtype, device=device)
        w = torch.randn(f, h, dtype=dtype, device=device)
        return 2 * rows * h * f / _timed(lambda: x @ w.t(), device, 4)


def offload_capacity(args: ModelArgs, tokens: int, block_bytes: float, dtype: torch.dtype, device) -> int:
    """How many blocks' saved activations (`block_bytes` each) the host link carries to CPU memory
    during one forward of `tokens` tokens, measured on this GPU (~50 ms): the device-to-pinned-host copy
    rate, and the time of one forward estimated from the blocks' GEMM FLOPs at the rate a GEMM of these
    shapes runs here. Attention, LoRA and elementwise work are left out, so the forward is longer than
    the estimate and the copies have more time than counted."""
    if block_bytes <= 0:
        return 0
    h, f = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    block_flops = 2 * tokens * (h * (q + 2 * kv) + q * h + 3 * h * f)
    forward_s = args.num_layers * block_flops / gemm_rate(args, tokens, dtype, device)
    carried = int(_LINK_SHARE * host_link_rate(device) * forward_s // block_bytes)
    # pinned pages cannot be swapped out: take at most half of what the host has free, shared by the
    # processes of this host (torchrun sets LOCAL_WORLD_SIZE)
    share = 0.5 * host_available_bytes() / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return min(carried, int(share // block_bytes))


def host_available_bytes() -> int:
    """Memory the host can give without swapping (MemAvailable; free pages where /proc is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_plan_for(
    model: nn.Module,
    device: torch.device,
    *,
    batch_size: int,
    seq_len: int,
    optimizer: str,
    budget_gib: float | None,
    gradient_checkpointing: bool | None,
    embedding_offload: str = "auto",
) -> MemoryPlan | None:
    """The plan for this run, or None when `gradient_checkpointing` (the config's) settles it.

    Planned when `gradient_checkpointing` is left unset (auto) and there is a budget: on a GPU always
    (default: what the card has), elsewhere only with an explicit `budget_gib`.
    """
    if gradient_checkpointing is not None:
        return None
    if budget_gib is None and device.type != "cuda":
        return None
    budget = budget_gib if budget_gib is not None else device_budget_gib(device)
    return plan_for_model(
        model,
        batch_size,
        seq_len,
        budget,
        optimizer,
        can_offload=device.type == "cuda",
        embedding_offload=embedding_offload,
    )


def enforce_budget(budget_gib: float | None, device: torch.device) -> None:
    """An explicit budget binds: the allocator refuses to grow the process past it on this GPU."""
    if budget_gib is None or device.type != "cuda":
        return
    idx = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib * GIB / total), idx)


def estimate_weight_bytes(args: ModelArgs, dtype_bytes: int, quantize: str = "none") -> int:
    """The model's weights before it is built, from its shapes: what one card must hold to replicate it."""
    h, f, L = args.hidden_size, args.intermediate_size, args.num_layers
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    block = h * (q + 2 * kv) + q * h + 3 * h * f
    # NF4: ~4.13 bits a weight; FP8: a byte a weight plus an fp32 scale a row (output channel)
    per_weight = {"nf4": 4.13 / 8, "fp8": 1}.get(quantize, dtype_bytes)
    rows = (q + 2 * kv) + h + 2 * f + h  # output channels of q/k/v, o, gate/up, down
    scales = 4 * L * rows if quantize == "fp8" else 0
    embeddings = args.vocab_size * h * (1 if args.tie_word_embeddings else 2)
    return int(L * block * per_weight + scales + (embeddings + (2 * L + 1) * h) * dtype_bytes)


def auto_strategy_fits(
    model_path: str, dtype: str, quantize: str, budget_gib: float | None, device: torch.device
) -> tuple[bool, str]:
    """Whether the base model at `model_path` (in `dtype`, `quantize`d) fits one card with room to train,
    and the figures, for `parallel: auto`. `budget_gib` None: what the card has."""
    if device.type != "cuda":
        return True, ""
    from snuggle.load import load_model_args, resolve_dtype

    args = load_model_args(model_path)
    dtype_bytes = torch.empty((), dtype=resolve_dtype(dtype, device)).element_size()
    need = estimate_weight_bytes(args, dtype_bytes, quantize)
    budget = budget_gib if budget_gib is not None else device_budget_gib(device)
    # replicated weights may take at most ~3/4 of the card: the rest is activations and LoRA state
    fits = need <= 0.75 * budget * GIB
    return fits, f"weights {need / GIB:.1f} GiB, {budget:.1f} GiB a card"


# --- the same prediction for a step on the CPU ---------------------------------------------------------


def _scores_bytes(args: ModelArgs, batch_size: int, seq_len: int, act_bytes: int, stored_blocks: int) -> int:
    """The attention scores a step on the CPU keeps: there SDPA runs its math path, which saves the
    (B, heads, T, T) weights (and their softmax) of every stored block for backward and makes their
    gradients in backward, quadratic in the row length (4.5 GiB a block of SmolLM2-135M at 8192 tokens,
    fp32). Measured on SmolLM2-135M: ~7 bytes per score in fp32 for a stored block; 2 x act_bytes here,
    so that with the linear terms the whole prediction errs high, by up to a third at 512-1024 tokens."""
    per_block = 2 * act_bytes * batch_size * args.num_heads * seq_len * seq_len
    return per_block * (stored_blocks + 1)  # + the gradients of one block's scores in backward


def host_peak_bytes(
    model: nn.Module,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    checkpoint_layers: int | None = None,
) -> int:
    """Predicted peak bytes of a training step on the CPU with the savings the model is set to now
    (`checkpoint_layers`: that many recomputed blocks instead): the GPU plan's model
    (`predict_for_model`) plus the attention scores the CPU path keeps."""
    L = model.args.num_layers
    k = len(getattr(model, "checkpoint_layers", ())) if checkpoint_layers is None else checkpoint_layers
    stored = L - k + (1 if k else 0)  # a recomputed block stores its scores again during its backward
    act_bytes = torch.empty((), dtype=model.compute_dtype).element_size()
    return predict_for_model(model, batch_size * seq_len, optimizer, k) + _scores_bytes(
        model.args, batch_size, seq_len, act_bytes, stored
    )


def _tensor_bytes(model: nn.Module) -> int:
    return sum(_local_bytes(t) for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())


def check_host_memory(cfg, model: nn.Module, device: torch.device) -> None:
    """On the CPU, refuse a step that the host's memory cannot hold, before training, with the figures
    and the settings that fit: out of host memory the kernel kills the process (exit 137), with no
    message and no checkpoint. The model's weights are already held; the rest must be available
    (MemAvailable, shared by the processes of this host)."""
    if device.type != "cpu":
        return
    t, T = cfg.train, cfg.data.seq_len
    held = _tensor_bytes(model)
    available = host_available_bytes() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))

    def fits(b: int, s: int) -> bool:
        return host_peak_bytes(model, b, s, t.optimizer) - held <= available

    need = host_peak_bytes(model, t.batch_size, T, t.optimizer)
    if need - held <= available:
        return
    lo, hi = 0, T
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(t.batch_size, mid) else (lo, mid - 1)
    fit_len = lo // 64 * 64 if lo >= 64 else lo  # a multiple of 64 where there is room for one
    fixes = [f"data.seq_len <= {fit_len}" if fit_len >= 2 else "a much shorter data.seq_len"]
    if best_b := max((b for b in range(1, t.batch_size) if fits(b, T)), default=0):
        fixes.append(f"train.batch_size <= {best_b} (raise train.grad_accum to keep the global batch)")
    L = model.args.num_layers
    every = host_peak_bytes(model, t.batch_size, T, t.optimizer, checkpoint_layers=L) - held <= available
    if len(getattr(model, "checkpoint_layers", ())) < L and every:
        fixes.append("train.gradient_checkpointing=true (slower: every block is computed twice)")
    raise SnuggleError(
        f"out of host memory ahead: a step of batch {t.batch_size} x {T} tokens on the CPU is predicted to "
        f"peak at {need / GIB:.1f} GiB ({held / GIB:.1f} of it the model, loaded), and the host has "
        f"{available / GIB:.1f} GiB more available; to fit: {' or '.join(fixes)}"
    )
