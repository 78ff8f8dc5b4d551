"""Trained embeddings whose optimizer state lives in CPU memory, updated there.

At a 128k vocabulary the embed_tokens and lm_head copies of an 8B model are 1.05B parameters: fp32
AdamW keeps 8 bytes of moments for each (8.4 GB), as much as the copies and their gradients together.
With `train.embedding_offload: cpu` the GPU holds only the copies (fp32, as before) and their
gradients; an fp32 master of each copy and its optimizer state sit in CPU memory (pinned on a GPU
host, so the copies move by DMA). Each optimizer step sends the (clipped) gradients to the host,
updates the master there with the same optimizer as the other groups, and sends the master back:
8 bytes a parameter over the host link, once per optimizer step (gradient accumulation divides it).

`HostOffloadOptimizer` is one `torch.optim.Optimizer` to the rest of the run: its `param_groups` are
the model's parameters (the scheduler sets every group's lr, checkpoints name state by parameter), its
`state` holds the device groups' state and, for the embeddings, the host tensors.
"""

from __future__ import annotations

import torch

__all__ = ["HostOffloadOptimizer"]


class HostOffloadOptimizer(torch.optim.Optimizer):
    """Routes the device groups to `device_opt` and the `host_group` to an optimizer over CPU masters.

    `make_opt(groups)` builds the optimizer of either side (the same class and settings, so the
    embeddings follow the same update rule as on the GPU)."""

    def __init__(self, device_groups: list[dict], host_group: dict, make_opt) -> None:
        self._device_groups = device_groups
        self.device_opt = make_opt(device_groups) if device_groups else None
        pin = any(p.is_cuda for p in host_group["params"])
        self._pairs = []  # (parameter on its device, fp32 master in CPU memory)
        for p in host_group["params"]:
            master = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
            master.grad = torch.empty_like(master, pin_memory=pin)
            self._pairs.append((p, master))
        masters = {**host_group, "params": [m for _, m in self._pairs]}
        self.host_opt = make_opt([masters])
        # the run's groups are the model's parameters: the device optimizer's dicts (shared, so the
        # scheduler's lr reaches it) and the embeddings' group, whose settings are copied to the host
        # optimizer's group at every step
        super().__init__(device_groups + [host_group], {})
        self._link_state()
        self._stale = True  # masters are filled from the parameters at the first step

    def _link_state(self) -> None:
        """The device optimizer writes into this optimizer's `state`; the embeddings' entries are the
        host optimizer's. Entries appear only once a step made them: an empty `state` tells a
        checkpoint loader that the optimizer still needs its first (zero-lr) step."""
        if self.device_opt is not None:
            self.device_opt.param_groups = self.param_groups[: len(self._device_groups)]
            self.device_opt.state = self.state
        for p, m in self._pairs:
            if m in self.host_opt.state:
                self.state[p] = self.host_opt.state[m]

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        if self.device_opt is not None:
            self.device_opt.step()
        host_group = self.param_groups[-1]
        for k, v in host_group.items():
            if k != "params":
                self.host_opt.param_groups[0][k] = v
        if self._stale:
            for p, m in self._pairs:
                m.copy_(p.detach())
            self._stale = False
        for p, m in self._pairs:
            if p.grad is None:
                m.grad.zero_()
            else:
                m.grad.copy_(p.grad, non_blocking=True)
        if any(p.is_cuda for p, _ in self._pairs):
            torch.cuda.synchronize()  # the gradients are on the host before the update reads them
        self.host_opt.step()
        self._link_state()
        for p, m in self._pairs:
            # pinned source: an asynchronous copy; the master is next written after the next step's sync
            p.copy_(m, non_blocking=True)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.device_opt is not None:
            self.device_opt.zero_grad(set_to_none)
        for p, _ in self._pairs:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def load_state_dict(self, state_dict: dict) -> None:
        # the embeddings' entries go straight to the host optimizer: the base class would move every
        # saved tensor to its parameter's device first, the moments through the GPU (8 GB at 128k)
        host_ids = state_dict["param_groups"][-1]["params"]
        state = dict(state_dict["state"])
        saved = [state.pop(i, None) for i in host_ids]
        super().load_state_dict({**state_dict, "state": state})
        for (_, m), entry in zip(self._pairs, saved, strict=True):
            if entry is not None:
                self.host_opt.state[m] = {k: _to_host(v) for k, v in entry.items()}
        self._link_state()
        self._stale = True  # the parameters are loaded too: the masters follow them


def _to_host(v):
    # a copy: the loaded state must not share storage with the dict it came from
    return v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v
