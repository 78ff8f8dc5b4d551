"""Activation memory: per-block recomputation, optionally with the saved block inputs kept in CPU memory,
and blocks whose saved activations wait in CPU memory between forward and backward.

A checkpointed block keeps only its input (B, T, C) and recomputes its insides in backward: ~2N extra
FLOPs a token, activation memory of one block instead of all. Offloading moves even that input to pinned
host memory on a side stream during forward and brings it back, one block ahead, during backward, so
the copies (33 MB a block for an 8B model at 2 x 2048 tokens, ~1.5 ms over PCIe 4) hide under the
block's recomputation (~7 ms). Which blocks to checkpoint is a choice: each block left stored is faster
and costs its activations, so a run checkpoints only as many as its memory requires.

A block can also keep everything it saves for backward, but in pinned host memory
(`BlockActivationOffloader`): no recomputation, only copies, which cost nothing while the host link
keeps up with the compute. For an 8B model at 2 x 2048 tokens a block saves ~390 MB and its forward
takes ~3 ms, so an H100's host link (~55 GB/s measured) carries ~8 blocks' worth per forward: the
memory plan measures the link and offloads only as many blocks as it carries, and recomputes the rest
of what memory needs.

Block order: the first `offload_blocks` blocks have their activations offloaded (their copies get the
whole forward to leave the GPU), the next `checkpoint_layers` blocks are recomputed, the rest stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ActivationOffloader", "BlockActivationOffloader", "run_block", "configure_checkpointing"]


class ActivationOffloader:
    """Pinned host buffers (reused across steps) and a side stream for block inputs, keyed by layer."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.host: dict[int, torch.Tensor] = {}
        self.ready: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}

    def store(self, i: int, x: torch.Tensor) -> None:
        buf = self.host.get(i)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = torch.empty(x.shape, dtype=x.dtype, pin_memory=self.stream is not None)
            self.host[i] = buf
        if self.stream is None:
            buf.copy_(x)
            return
        # the copy must start after x is computed, and x must outlive the copy on the side stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
        x.record_stream(self.stream)

    def prefetch(self, i: int) -> None:
        if i in self.ready or i not in self.host:
            return
        buf = self.host[i]
        if self.stream is None:
            self.ready[i] = (buf.clone(), None)
            return
        with torch.cuda.stream(self.stream):
            x = buf.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.ready[i] = (x, ev)

    def fetch(self, i: int) -> torch.Tensor:
        self.prefetch(i)
        x, ev = self.ready.pop(i)
        if ev is not None:
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            x.record_stream(cur)
        return x


class _OffloadedBlock(torch.autograd.Function):
    """Forward without saving activations; backward fetches the input from host and recomputes."""

    @staticmethod
    def forward(ctx, x, layer, i, offloader, cos, sin, mask):
        ctx.layer, ctx.i, ctx.offloader, ctx.mask = layer, i, offloader, mask
        ctx.save_for_backward(cos, sin)
        # recomputation must see the same dropout masks as the forward did
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            y = layer(x, cos, sin, mask)
        offloader.store(i, x)
        return y

    @staticmethod
    def backward(ctx, gy):
        cos, sin = ctx.saved_tensors
        x = ctx.offloader.fetch(ctx.i)
        if ctx.i > 0:
            ctx.offloader.prefetch(ctx.i - 1)  # overlap the next block's copy with this recomputation
        x = x.detach().requires_grad_(True)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad():
                y = ctx.layer(x, cos, sin, ctx.mask)
        torch.autograd.backward(y, gy)
        return x.grad, None, None, None, None, None, None


class _Saved:
    """One tensor an offloaded block saved: its host copy, and its device copy once fetched back."""

    __slots__ = ("layer", "host", "device_copy", "event")

    def __init__(self, layer: int, host: torch.Tensor):
        self.layer, self.host = layer, host
        self.device_copy: torch.Tensor | None = None
        self.event: torch.cuda.Event | None = None


def _storage_ptr(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t  # FSDP: a DTensor's shard on this rank
    return local.untyped_storage().data_ptr()


def _covers_storage(t: torch.Tensor) -> bool:
    """Whether t is a dense layout of its whole storage (contiguous or permuted): copied as it is laid out,
    strides and all, in one memcpy; anything else is copied contiguous."""
    nbytes = t.numel() * t.element_size()
    return (
        t.storage_offset() == 0
        and t.untyped_storage().nbytes() == nbytes
        and all(st > 0 for st in t.stride())
    )


# smaller saved tensors (statistics, seeds, low-rank products) stay on the device: their copies would
# cost a launch each and free next to nothing
_MIN_OFFLOAD_BYTES = 1 << 20


class BlockActivationOffloader:
    """The tensors that the offloaded blocks save for backward, kept in pinned host memory in between.

    Forward (`saving(i)` around block i): every tensor the block saves on the model's device, from
    `min_bytes` up and not a parameter or a tensor shared between blocks (RoPE tables, the mask), is
    copied on a side stream to a pinned buffer (one per saved tensor, reused every step); its device
    memory is released when the copy is done. Backward: a block comes back whole, on the side stream,
    ahead of use. It is fetched once backward has freed a block's activations for it (each stored or
    offloaded block done in backward frees about what an offloaded block brings back, so prefetching
    never lifts the peak above the forward's), or at the latest when its first tensor is needed.
    """

    def __init__(
        self,
        device: torch.device,
        layers: Iterable[int],
        keep: Iterable[torch.Tensor],
        min_bytes: int | None = None,
    ):
        self.device = device
        self.layers = set(layers)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.keep = {_storage_ptr(t) for t in keep}  # the weights: on the device for the whole step
        self.min_bytes = _MIN_OFFLOAD_BYTES if min_bytes is None else min_bytes
        self.host: dict[tuple[int, int], torch.Tensor] = {}
        self.pending: dict[int, list[_Saved]] = {}  # offloaded in this forward, not yet fetched back
        self.credit = 0  # blocks' worth of device memory freed by backward and not yet refilled

    def _host_buffer(self, key: tuple[int, int], t: torch.Tensor, dense: bool) -> torch.Tensor:
        buf = self.host.get(key)
        stride = t.stride() if dense else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or (dense and buf.stride() != stride):
            pin = self.stream is not None
            if dense:
                buf = torch.empty_strided(t.shape, stride, dtype=t.dtype, pin_memory=pin)
            else:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            self.host[key] = buf
        return buf

    @contextmanager
    def saving(self, i: int, shared: Iterable[torch.Tensor | None] = ()):
        """Offload what block i saves during this context (its forward)."""
        keep = self.keep | {_storage_ptr(t) for t in shared if isinstance(t, torch.Tensor)}
        if i == min(self.layers):  # a new forward: nothing of an earlier one is still to come back
            self.credit = 0
            self.pending.clear()
        saved = self.pending[i] = []
        # one tensor saved by several nodes is copied once; the tensor is held until the block's forward
        # ends, so that no other tensor can take its address (and key) meanwhile
        seen: dict[tuple, tuple[_Saved, torch.Tensor]] = {}

        def pack(t: torch.Tensor):
            if t.device != self.device or t.numel() * t.element_size() < self.min_bytes:
                return t
            if isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad) or _storage_ptr(t) in keep:
                return t  # weights stay on the device all step anyway
            key = (_storage_ptr(t), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                return seen[key][0]
            dense = _covers_storage(t)
            buf = self._host_buffer((i, len(saved)), t, dense)
            if self.stream is None:
                buf.copy_(t)
            else:
                # after t is computed; t's memory is not reused until the copy is done
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    buf.copy_(t, non_blocking=True)
                t.record_stream(self.stream)
            handle = _Saved(i, buf)
            seen[key] = handle, t
            saved.append(handle)
            return handle

        def unpack(handle):
            if isinstance(handle, torch.Tensor):
                return handle
            if handle.device_copy is None:
                self.fetch(handle.layer)
            if handle.event is not None:
                torch.cuda.current_stream(self.device).wait_event(handle.event)
            return handle.device_copy

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                yield
        finally:
            seen.clear()

    def fetch(self, i: int) -> None:
        """Bring block i's saved tensors back to the device (queued on the side stream)."""
        saved = self.pending.pop(i, None)
        if not saved:
            return
        if self.stream is None:
            for h in saved:
                h.device_copy = h.host.clone()
            return
        cur = torch.cuda.current_stream(self.device)
        # allocated in the compute stream's order, so the copy must wait for that stream's queue
        copies = [
            torch.empty_strided(h.host.shape, h.host.stride(), dtype=h.host.dtype, device=self.device)
            for h in saved
        ]
        self.stream.wait_stream(cur)
        with torch.cuda.stream(self.stream):
            for h, d in zip(saved, copies, strict=True):
                d.copy_(h.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        for h, d in zip(saved, copies, strict=True):
            d.record_stream(self.stream)
            h.device_copy, h.event = d, event

    def block_done(self, i: int, stored: bool) -> None:
        """Backward finished block i (its activations are freed if it kept any): prefetch into that room."""
        if stored:
            self.credit += 1
        while self.credit > 0 and self.pending:
            self.fetch(max(self.pending))
            self.credit -= 1


def _on_backward(model, i: int, grad):
    """Hook on block i's output: its gradient is complete, so block i + 1 is done in backward."""
    j = i + 1
    if j < model.args.num_layers:
        model.saved_offloader.block_done(j, stored=j not in model.checkpoint_layers)


def run_block(layer: nn.Module, i: int, x, cos, sin, mask, cache, model) -> torch.Tensor:
    """Run block i as the model's checkpointing settings say (stored, recomputed, or offloaded)."""
    if not torch.is_grad_enabled() or cache is not None:
        return layer(x, cos, sin, mask, cache)
    saved_offloader = model.saved_offloader
    if i in model.checkpoint_layers:
        if model.offloader is not None:
            y = _OffloadedBlock.apply(x, layer, i, model.offloader, cos, sin, mask)
        else:
            y = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
    elif saved_offloader is not None and i in saved_offloader.layers:
        with saved_offloader.saving(i, (cos, sin, mask)):
            y = layer(x, cos, sin, mask)
    else:
        y = layer(x, cos, sin, mask)
    if saved_offloader is not None and y.requires_grad:
        y.register_hook(lambda g: _on_backward(model, i, g))
    return y


def configure_checkpointing(
    model: nn.Module, n_layers: int | None, offload: bool = False, offload_blocks: int = 0
) -> list[int]:
    """Keep the saved activations of the first `offload_blocks` blocks in CPU memory, and checkpoint the
    `n_layers` blocks after them (None: all the rest, 0: none), offloading their inputs if asked."""
    total = model.args.num_layers
    m = max(0, min(offload_blocks, total))
    n = total - m if n_layers is None else max(0, min(n_layers, total - m))
    model.checkpoint_layers = set(range(m, m + n))
    device = model.lm_head.weight.device
    model.offloader = ActivationOffloader(device) if offload and n else None
    weights = [*model.parameters(), *model.buffers()]
    model.saved_offloader = BlockActivationOffloader(device, range(m), weights) if m else None
    return sorted(model.checkpoint_layers)
